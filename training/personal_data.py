"""Whose data a dataset build may read: one user's own for their personal adapter, and nobody's forgotten rows.

In: the store (table ``personal_settings``: who opted in to a personal adapter and up to which feedback id
they asked it to forget them) and a `TrainingLog` read by `training.dataset_sources`. Out: the log a build
may use (`restrict_log`) and `check_privacy`, the builder's last check before anything is written.

The rule (README, "Personal adapters"):

- The shared adapter is served to everyone, so its datasets hold no user's private documents or memories:
  only passages of shared documents go into its rows (`with_serving_context` without `private_chunks`).
- A personal adapter is served to its owner only, so its datasets may hold that user's own private
  passages, and nothing of anyone else's: only conversations the owner had, and private passages read from
  the owner's own collection (`KnowledgeBase.private_chunks`). Long-term memories go into no dataset.
- "Forget what you learned from me" records the user's newest feedback id; their feedback up to it is left
  out of every later build, shared and personal, and out of the frozen held-out set.

`check_privacy` refuses a build (`PrivacyError`, nothing written) whose rows break the rule, whatever code
produced them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import sqlalchemy as sa

from memory.db import utcnow, write_transaction
from memory.schema import personal_settings
from memory.store import Store
from training.dataset_sources import Example, TrainingLog


class PrivacyError(RuntimeError):
    """A dataset row would carry data its adapter's users must not be served; the build stops."""


# ------------------------------------------------------------------------------------------ settings
def personal_row(store: Store, user_id: int) -> dict[str, Any]:
    """A user's personal-adapter choice: {"opted_in": bool, "forgotten_through": int | None}."""
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(personal_settings).where(personal_settings.c.user_id == user_id)).first()
    if row is None:
        return {"opted_in": False, "forgotten_through": None, "updated_at": None}
    return {"opted_in": bool(row.opted_in), "forgotten_through": row.forgotten_through,
            "updated_at": row.updated_at.isoformat() if row.updated_at else None}


def _upsert(store: Store, user_id: int, **values: Any) -> None:
    with write_transaction(store.engine) as conn:
        exists = conn.execute(sa.select(personal_settings.c.user_id)
                              .where(personal_settings.c.user_id == user_id)).first()
        if exists:
            conn.execute(personal_settings.update().where(personal_settings.c.user_id == user_id)
                         .values(updated_at=utcnow(), **values))
        else:
            conn.execute(personal_settings.insert().values(
                user_id=user_id, opted_in=values.pop("opted_in", False), updated_at=utcnow(), **values))


def set_opted_in(store: Store, user_id: int, opted_in: bool) -> None:
    _upsert(store, user_id, opted_in=bool(opted_in))


def opted_in_users(store: Store) -> list[int]:
    with store.engine.connect() as conn:
        return sorted(conn.execute(sa.select(personal_settings.c.user_id)
                                   .where(personal_settings.c.opted_in.is_(True))).scalars())


def mark_forgotten(store: Store, user_id: int) -> int:
    """Record the user's newest feedback id: everything up to it stays out of later builds. Returns it."""
    newest = store.newest_feedback_id(user_id) or 0
    _upsert(store, user_id, forgotten_through=newest)
    return newest


def forget_marks(store: Store) -> dict[int, int]:
    """user id -> the feedback id up to which that user asked to be forgotten."""
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(personal_settings.c.user_id, personal_settings.c.forgotten_through)
                            .where(personal_settings.c.forgotten_through.is_not(None))).all()
    return {int(u): int(f) for u, f in rows}


def feedback_count(store: Store, user_id: int, after: int | None = None) -> int:
    """Feedback rows the user gave (after feedback id `after`, when given)."""
    return store.count_feedback(user_id=user_id, after_id=after)


# ------------------------------------------------------------------------------------------ the log
def restrict_log(log: TrainingLog, owner_id: int | None, marks: dict[int, int]) -> TrainingLog:
    """The part of `log` a build may use: without forgotten feedback, and only `owner_id`'s conversations
    for a personal build (None: everyone's, for the shared adapter)."""
    if owner_id is None and not marks:
        return log

    def usable_conversation(cid: int) -> bool:
        return owner_id is None or log.owners.get(cid) == owner_id

    def usable_feedback(f: Any) -> bool:
        m = log.messages.get(f.message_id)
        if m is None or not usable_conversation(m.conversation_id):
            return False
        owner = log.owners.get(m.conversation_id)
        return owner not in marks or f.id > marks[owner]

    by_conv = {c: ms for c, ms in log.by_conversation.items() if usable_conversation(c)}
    kept_ids = {m.id for ms in by_conv.values() for m in ms}
    return replace(log, messages={i: m for i, m in log.messages.items() if i in kept_ids},
                   by_conversation=by_conv, feedback=[f for f in log.feedback if usable_feedback(f)],
                   owners={c: u for c, u in log.owners.items() if usable_conversation(c)})


def check_privacy(examples: Iterable[Example], log: TrainingLog, owner_id: int | None) -> None:
    """Refuse rows that break the rule in the module docstring (a bug elsewhere, never the user's doing)."""
    for ex in examples:
        where = f"row from {ex.prov.source}:{ex.prov.origin} (conversation {ex.prov.conversation_id})"
        if owner_id is None:
            if any(p.scope != "shared" for p in ex.passages):
                raise PrivacyError(f"{where} quotes a private passage in a shared build")
            continue
        if ex.prov.source == "teacher":
            raise PrivacyError(f"{where}: a personal build holds the user's own feedback and replay only")
        if ex.prov.source == "human" and log.owners.get(ex.prov.conversation_id or -1) != owner_id:
            raise PrivacyError(f"{where} is not user {owner_id}'s")
