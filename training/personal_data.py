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

How a personal build splits (docs/personal.md, "Design choices"): a user has tens of rows, often in a handful of
conversations, so splitting by conversation left one held-out conversation at 16-20 ratings and the gate declined
every first personal candidate. A personal build splits by question instead (`by_question`, `personal_splits`):
the held-out part is taken from whole conversations in a fixed hashed order, each from its last question backwards,
until it holds `HELDOUT_FLOOR` answers with an SFT row and `HELDOUT_FLOOR` preference pairs (when the user has
them) and the split's test share, never more than `HELDOUT_MAX_SHARE` of the questions. Training scores every
assistant turn of a row, history included, so a train row of the same conversation that holds an answer a held-out
row scores is left out (`drop_heldout_context`): what the gate measures was never trained on. A DPO stage on
fewer than `MIN_DPO_PAIRS` pairs would be one or two optimizer steps of noise; the pairs stay out of dpo/train
(their corrected answers still train as SFT rows) and the stage is skipped (`drop_few_pairs`).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from memory.db import utcnow, write_transaction
from memory.schema import personal_settings
from memory.store import Store
from training.dataset_sources import Example, TrainingLog
from training.snapshots import KINDS, read_jsonl

# The personal split (module docstring). The personal gate judges held-out loss and preference accuracy from one
# fewer than the floor (PERSONAL_GATE in training/personal.py), so one deleted conversation does not stop it.
HELDOUT_FLOOR = 3  # held-out answers with an SFT row, and held-out preference pairs, at least
HELDOUT_MAX_SHARE = 0.5  # of the user's questions held out at most: the rest trains
MIN_DPO_PAIRS = 8  # fewer train pairs than this: no DPO stage (batch 4: two optimizer steps)


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


# ------------------------------------------------------------------------------------------ the split
def by_question(by_kind: dict[str, list[Example]], log: TrainingLog) -> dict[str, list[Example]]:
    """The same rows, each of the user's rows grouped by the question it answers (``turn:<user message id>``):
    a thumb, an edit, a choice and a regenerated answer to one question stay together."""

    def regroup(ex: Example) -> Example:
        m = log.messages.get(ex.prov.message_id) if ex.prov.source == "human" and ex.prov.message_id else None
        if m is None or m.parent_id is None:
            return ex
        return replace(ex, prov=replace(ex.prov, group=f"turn:{m.parent_id}"))

    return {k: [regroup(e) for e in rows] for k, rows in by_kind.items()}


def _turn_number(group: str) -> int:
    head, _, tail = group.partition(":")
    return int(tail) if head == "turn" and tail.isdigit() else 0


def personal_splits(by_kind: dict[str, list[Example]], ratios: tuple[float, float, float],
                    fraction: Callable[[str], float], frozen: bool) -> tuple[dict[str, str], dict[str, Any]]:
    """Each group's split in a personal build, and what was held out. `fraction(key)` is the build's stable hash
    in [0, 1). With a frozen held-out set (or a test share of 0) nothing goes to test: the groups split between
    train and validation by their hash."""
    kinds: dict[str, set[str]] = defaultdict(set)
    conv: dict[str, int | None] = {}
    for kind, rows in by_kind.items():
        for ex in rows:
            kinds[ex.prov.group].add(kind)
            conv.setdefault(ex.prov.group, ex.prov.conversation_id)
    train, val, test = ratios
    out = {g: "validation" if val > 0 and fraction(g) >= train / (train + val) else "train" for g in kinds}
    info: dict[str, Any] = {"unit": "question", "questions": len(kinds), "floor": HELDOUT_FLOOR,
                            "max_share": HELDOUT_MAX_SHARE, "held_out_questions": 0, "held_out_sft": 0,
                            "held_out_pairs": 0}
    if frozen or test <= 0 or not kinds:
        info["held_out"] = "frozen set reused" if frozen else "none asked for"
        return out, info
    want = math.ceil(test * len(kinds) - 1e-9)
    cap = int(HELDOUT_MAX_SHARE * len(kinds))
    need_sft = min(HELDOUT_FLOOR, sum("sft" in k for k in kinds.values()))
    need_pairs = min(HELDOUT_FLOOR, sum("dpo" in k for k in kinds.values()))
    by_conv: dict[int | None, list[str]] = defaultdict(list)
    for g, c in conv.items():
        by_conv[c].append(g)
    held = 0
    sft = pairs = 0
    for c in sorted(by_conv, key=lambda c: (fraction(f"conv:{c}"), str(c))):
        for g in sorted(by_conv[c], key=lambda g: (_turn_number(g), g), reverse=True):  # its last question first
            if held >= cap or (held >= want and sft >= need_sft and pairs >= need_pairs):
                break
            out[g] = "test"
            held += 1
            sft += "sft" in kinds[g]
            pairs += "dpo" in kinds[g]
    info.update(held_out="chosen now", held_out_questions=held, held_out_sft=sft, held_out_pairs=pairs)
    return out, info


def _assistant_texts(row: dict[str, Any]) -> set[str]:
    return {m["content"] for col in ("messages", "prompt", "chosen", "rejected", "completion")
            for m in row.get(col) or [] if m.get("role") == "assistant"}


def _example_texts(ex: Example) -> set[str]:
    out = {c for role, c in ex.prompt if role == "assistant"} | {ex.completion}
    return out | ({ex.rejected} if ex.rejected is not None else set())


def drop_heldout_context(split_rows: dict[str, dict[str, list[Example]]],
                         heldout_rows: dict[str, list[dict[str, Any]]]) -> Counter:
    """Leave out the train and validation rows of a conversation that hold (as an answer or in their history) an
    answer that conversation's held-out rows score. Returns the rows left out, by kind."""
    scored: dict[int, set[str]] = defaultdict(set)
    for rows in heldout_rows.values():
        for r in rows:
            if r.get("conversation_id") is not None:
                scored[r["conversation_id"]] |= _assistant_texts(r)
    dropped: Counter = Counter()
    for kind, splits in split_rows.items():
        for s in ("train", "validation"):
            kept = [e for e in splits[s] if not (scored.get(e.prov.conversation_id) or set()) & _example_texts(e)]
            dropped[kind] += len(splits[s]) - len(kept)
            splits[s] = kept
    return dropped


def drop_few_pairs(split_rows: dict[str, dict[str, list[Example]]]) -> int:
    """Empty dpo/train when it holds fewer than `MIN_DPO_PAIRS` pairs (the DPO stage is then skipped). Returns the
    pairs left out."""
    n = len(split_rows["dpo"]["train"])
    if 0 < n < MIN_DPO_PAIRS:
        split_rows["dpo"]["train"] = []
        return n
    return 0


def heldout_outdated(heldout_dir: Path) -> bool:
    """Whether a user's frozen held-out set must be chosen again: grouped by conversation (before the split by
    question), or holding fewer answers or pairs than the floor (rows deleted since, or a user with fewer pairs than
    the floor: then it is chosen again at every build, from the same hashed order)."""
    meta = heldout_dir / "meta.json"
    if not meta.is_file():
        return False
    rows = {k: read_jsonl(heldout_dir / f"{k}.jsonl") if (heldout_dir / f"{k}.jsonl").is_file() else []
            for k in KINDS}
    groups = {r.get("group") or "" for k in KINDS for r in rows[k] if r.get("source") == "human"}
    if any(g.startswith("conv:") for g in groups):
        return True
    return len(rows["sft"]) < HELDOUT_FLOOR or len(rows["dpo"]) < HELDOUT_FLOOR
