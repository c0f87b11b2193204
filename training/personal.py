"""Personal adapters: each opted-in user's assistant learns from that user's own feedback.

In: the services (settings, store, registry, and backend / chat / knowledge when a server runs) and a user id.
Out: that user's personal retrain decided and scheduled, their adapter served to them alone, their status and
report, and everything of theirs removed on "forget what you learned from me" or when they are deleted.

How it fits the shared loop:

- **Training.** A personal retrain is a retrain job (`training.jobs`, `CycleOptions.user_id`) like the
  shared one, one job at a time, SFT alone at a higher learning rate (`PERSONAL_TRAIN`). It starts from the
  weights of the shared adapter serving now (or a fresh adapter on the base model when none serves), so serving
  stays one adapter per request in the batch engine. Its dataset is the user's own thumbs, edits and choices in
  the served prompt format (their own private passages included), plus the shared replay rows against
  forgetting (`build_datasets(owner_id=)`, training/personal_data.py states what it may hold).
- **Gate.** `PERSONAL_GATE`: judged against the shared adapter on the user's own held-out questions (are its
  greedy answers nearer what the user edited into or chose than what they turned down: edit_match), on the
  general-ability suite (against the base model and the shared adapter) and on the shared gate's held-out
  document questions. A candidate that does not beat the shared adapter for its own user is registered, not
  served, and the report says why.
- **Registry.** `Registry(owner_id=user)`: versions ``u<user>-vNNNN`` under ``adapters/personal/<user>/``,
  with their own serving history; promotion points only that user's requests at the version.
- **Scheduling.** `next_personal` picks, when no job runs and the shared retrain is not due, the opted-in
  user whose feedback is enough and whose last personal retrain is oldest (never one over the day's limit or
  their disk), so every user gets a turn behind the shared adapter.
- **Serving.** `sync_personal` keeps the chat service's per-user table in step with the records: a user is
  served their promoted version only while the feature is on and they are opted in.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from memory.db import utcnow, write_transaction
from memory.schema import training_jobs
from training.personal_data import (
    HELDOUT_FLOOR,
    feedback_count,
    mark_forgotten,
    opted_in_users,
    personal_row,
    set_opted_in,
)
from training.registry import Registry, RegistryError, UnknownVersion, folder_bytes

log = logging.getLogger("assistant.personal")

# What a personal cycle uses unless the caller overrides it (docs/personal.md, "Design choices", says why).
# - Held-out: a personal build splits by question with a floor (training/personal_data.py): once a user has the
#   feedback a first retrain needs, the held-out part holds HELDOUT_FLOOR answers and pairs (when the user gave
#   any), and the gate judges from one fewer, so it decides instead of declining. No significance test (none can be
#   significant at that size: the report says what each check can see).
# - The gain is on what the user gets: edit_match answers the user's held-out questions greedily, as served, with
#   the candidate and with the shared adapter, and asks of each answer whether it is nearer the answer the user
#   edited into or chose than the one they turned down (training/gate_metrics.py, `leaning`). Held-out loss and
#   preference accuracy are measured and shown, never decide: a run of bench/personal.py served adapters on "gain
#   in val_loss" whose greedy answers were the shared adapter's, word for word. Closeness to the user's answer
#   alone was tried first and refused an adapter that answered 15 of 16 held-out paraphrases as the list its user
#   wanted: the facts its lists got wrong weighed more than the shape.
# - Grounding on the shared gate's held-out document questions is judged from one question: a personal adapter may
#   not answer them worse than the shared one (declining below a minimum would keep every personal adapter out).
# - General suite: 40 of the 120 questions, spread over its areas (min_general_rows is 40); the base model's and the
#   shared adapter's answers to them are kept between evaluations (training/evaluate.py), so a candidate answers
#   40, not 120. At 40 one question is 0.025: the tolerance keeps the shared gate's rule, a net loss of one question
#   passes and two do not.
# - Generation in batches of up to 40 rows and 4,096 prompt tokens (longest prompt first): the 40 general questions
#   go in one batch (24.7 s for the embedded model on 2 threads, 56.7 s in batches of 8: decoding steps cost a CPU
#   about the same at 8 rows as at 40), the document questions, ~450 tokens each, in batches of about nine.
# - No validation split: early stopping on one or two rows is noise, so they train instead and the trainer runs no
#   evaluation passes. No DPO stage (PERSONAL_TRAIN below); a caller who asks for one gets none on fewer than
#   MIN_DPO_PAIRS pairs (training/personal_data.py).
PERSONAL_GATE: dict[str, Any] = {
    "target_metrics": ["edit_match", "grounded"],
    "gain_metrics": ["edit_match"],
    "gain_significance": 0.0,
    "min_edit_match_rows": HELDOUT_FLOOR - 1, "min_grounded_rows": 1,
    "max_general": 40, "general_qa_tolerance": 0.025,
    "batch_size": 40, "batch_tokens": 4096,
}
# Training: SFT alone at a learning rate ten times the shared one's. At the shared 1e-4 (with a DPO stage of three
# optimizer steps on 12 pairs) a "bullets" user's adapter still answered in one plain sentence; SFT at 1e-3 for the
# same two epochs answered 15 of 16 held-out paraphrases as a list, and took 229 s instead of 791 s (2 threads vs 1,
# docs/personal.md). The user's edits still train: as SFT rows.
# No LoRA dropout (a step ~15 % faster; tens of rows at a high rate for a dozen steps need no regularising), and
# at most 48 rows read (`sft_row_budget`): 24 training rows get both epochs, 64 get one, so a user with more feedback
# does not wait twice as long. Every layer trains: training only the last 8 or 16 layers' LoRA weights (the
# `lora_layers` option) was 12 % faster for 16 and lost the "bullets" user's lists (100 % liked with every layer,
# 87.5 % with the last 16, 12.5 % with the last 8; docs/personal.md).
# The prompt is read without gradients (`prompt_gradients` false): a user's rows are served prompts of ~500 tokens,
# retrieved passages included, before an answer of ~20-60, and the loss is on the answer alone. Training took
# 25-32 s instead of 63-69 s for 20-24 rows, with the same like rates for all four users of the bench
# (docs/personal.md).
PERSONAL_TRAIN: dict[str, Any] = {"stages": ["sft"], "sft_learning_rate": 1e-3, "lora_dropout": 0.0,
                                  "sft_row_budget": 48, "prompt_gradients": False}
# As many shared replay rows as training rows (they are short general questions, so they cost little): at 0.5 the
# "short" user's adapter answered general questions in its user's clipped style ("The season comes after winter.")
# and lost two of the gate's 40.
PERSONAL_BUILD: dict[str, Any] = {"split_ratios": [0.8, 0.0, 0.2], "heldout_min_rows": 1, "replay_ratio": 1.0}
PERSONAL_KEEP = 2  # personal versions kept on disk per user (the serving one is always kept)


class PersonalError(ValueError):
    """A personal-adapter request that cannot be done (feature off, not opted in...)."""


def registry_for(services: Any, user_id: int) -> Registry:
    return Registry(services.settings, services.store, owner_id=user_id)


def disk_bytes(settings: Any, user_id: int) -> int:
    """What one user's personal adapters and datasets hold on disk."""
    return (folder_bytes(settings.personal_adapters_dir / str(user_id))
            + folder_bytes(settings.personal_datasets_dir / str(user_id)))


# ------------------------------------------------------------------------------------------ readiness
@dataclass
class PersonalReadiness:
    ready: bool
    feedback: int  # feedback rows usable now (after anything they had forgotten)
    needs: int  # settings.personal_min_feedback
    retrains_today: int
    retrains_per_day: int
    disk_bytes: int
    disk_limit_bytes: int
    missing: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PersonalJob:
    id: int
    user_id: int
    status: str
    created_at: datetime
    phase: str | None
    error: str | None
    result: dict[str, Any]

    @property
    def active(self) -> bool:
        return self.status in ("queued", "running")


def personal_jobs(services: Any, user_id: int | None = None, limit: int = 1000) -> list[PersonalJob]:
    """Personal retrain jobs (of one user when given), newest first (`training_jobs` rows whose options name a
    user: `CycleOptions.user_id`)."""
    cols = (training_jobs.c.id, training_jobs.c.status, training_jobs.c.params, training_jobs.c.created_at,
            training_jobs.c.progress, training_jobs.c.error, training_jobs.c.result)
    out = []
    with services.store.engine.connect() as conn:
        for r in conn.execute(sa.select(*cols).order_by(training_jobs.c.id.desc()).limit(limit * 20)):
            uid = (r.params or {}).get("user_id")
            if uid is None or (user_id is not None and uid != user_id):
                continue
            out.append(PersonalJob(r.id, int(uid), r.status, r.created_at, (r.progress or {}).get("phase"), r.error,
                                   r.result or {}))
            if len(out) >= limit:
                break
    return out


def readiness(services: Any, user_id: int, now: datetime | None = None) -> PersonalReadiness:
    """Whether a personal retrain of `user_id` may start now, and if not, plain sentences saying why."""
    s, store = services.settings, services.store
    now = now or utcnow()
    row = personal_row(store, user_id)
    n = feedback_count(store, user_id, after=row["forgotten_through"])
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    today = sum(1 for j in personal_jobs(services, user_id, limit=200) if j.created_at >= day)
    used = disk_bytes(s, user_id)
    limit = s.personal_disk_mb * 2**20
    missing = []
    if not s.personal_adapters:
        missing.append("Personal adapters are off for this installation (setting personal_adapters).")
    if not row["opted_in"]:
        missing.append("This user has not asked for a personal adapter.")
    if n < s.personal_min_feedback:
        missing.append(f"{n} of the {s.personal_min_feedback} ratings, edits or choices a first personal retrain "
                       "needs.")
    if today >= s.personal_retrains_per_day:
        missing.append(f"{today} personal retrains today already; the limit is {s.personal_retrains_per_day} a day.")
    if used > limit:
        missing.append(f"Personal adapters and datasets use {used / 2**20:.1f} MiB of the {s.personal_disk_mb} MiB "
                       "allowed per user.")
    return PersonalReadiness(not missing, n, s.personal_min_feedback, today, s.personal_retrains_per_day, used,
                             limit, missing)


def next_personal(services: Any, now: datetime | None = None) -> tuple[int | None, str]:
    """The opted-in user whose personal retrain should start now (fairness: the one whose last personal
    retrain is oldest, never-trained first), or None and why not."""
    if not services.settings.personal_adapters:
        return None, "personal adapters are off"
    now = now or utcnow()
    last: dict[int, datetime] = {}
    for j in personal_jobs(services, limit=1000):
        last.setdefault(j.user_id, j.created_at)
    ready = []
    for uid in opted_in_users(services.store):
        r = readiness(services, uid, now)
        if r.ready and _has_new_feedback(services, uid, last.get(uid)):
            ready.append(uid)
    if not ready:
        return None, "no opted-in user has enough new feedback"
    floor = datetime.min.replace(tzinfo=now.tzinfo)
    uid = min(ready, key=lambda u: (last.get(u, floor), u))
    return uid, f"user {uid}: personal retrain due"


def _has_new_feedback(services: Any, user_id: int, since: datetime | None) -> bool:
    """Feedback arrived since the user's last personal retrain started (none yet: any feedback)."""
    if since is None:
        return True
    return services.store.count_feedback(user_id=user_id, since=since) > 0


def cycle_options(user_id: int, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The options (for `CycleOptions.from_dict`) of a personal retrain: the personal build and training defaults
    under `overrides` (the gate's are applied by the cycle itself, `PERSONAL_GATE`)."""
    data = dict(overrides or {})
    data["build"] = {**PERSONAL_BUILD, **(data.get("build") or {})}
    data["train"] = {**PERSONAL_TRAIN, **(data.get("train") or {})}
    data.setdefault("keep_last", PERSONAL_KEEP)
    data["user_id"] = user_id
    return data


# ------------------------------------------------------------------------------------------ serving
def sync_personal(services: Any) -> dict[int, str | None]:
    """Serve each user what their records say: their promoted version while the feature is on and they are
    opted in, else the shared adapter. Loads what is needed, unloads personal versions nobody is served.
    Returns the changes (user id -> now served, None = the shared adapter again)."""
    chat, backend = getattr(services, "chat", None), getattr(services, "backend", None)
    if chat is None or backend is None:
        return {}
    from training.registry import personal_owner

    on = services.settings.personal_adapters
    wanted: dict[int, str] = {}
    current = chat.personal_users()
    for uid in opted_in_users(services.store) if on else []:
        reg = registry_for(services, uid)
        name = reg.serving()
        if name is None:
            continue
        if current.get(uid) == name and backend.has_adapter(name):
            wanted[uid] = name  # verified when it was loaded; not hashed again every tick
            continue
        try:
            v = reg.verify(name)
            if not backend.has_adapter(name):
                backend.load_adapter(name, v.adapter_dir)
            wanted[uid] = name
        except Exception as e:  # noqa: BLE001 - a broken personal adapter: the user gets the shared one
            log.error("personal adapter %s of user %s cannot be served: %s", name, uid, e)
    changes: dict[int, str | None] = {}
    for uid, name in wanted.items():
        if current.get(uid) != name:
            chat.set_personal(uid, name)
            changes[uid] = name
    for uid in set(current) - set(wanted):
        chat.set_personal(uid, None)
        changes[uid] = None
    served = set(wanted.values())
    for name in backend.adapters():
        if personal_owner(name) is not None and name not in served:
            with contextlib.suppress(Exception):  # still streaming: the next sync unloads it
                backend.unload_adapter(name)
    return changes


# ------------------------------------------------------------------------------------------ the user's view
def status(services: Any, user_id: int) -> dict[str, Any]:
    """What the user sees: opted in or not, the version serving them, its gate and why, and the next retrain."""
    row = personal_row(services.store, user_id)
    reg = registry_for(services, user_id)
    serving = reg.serving()
    versions = reg.list()
    ready = readiness(services, user_id)
    jobs = personal_jobs(services, user_id, limit=200)
    latest = versions[0] if versions else None
    if not services.settings.personal_adapters:
        state = "off"
    elif not row["opted_in"]:
        state = "not opted in"
    elif jobs and jobs[0].active:
        state = "training"
    elif serving:
        state = "serving"
    elif latest is not None:
        state = "not served: did not beat the shared adapter"
    else:
        state = "waiting for feedback" if ready.feedback < ready.needs else "waiting for its turn"
    return {
        "user_id": user_id, "enabled": bool(services.settings.personal_adapters), "opted_in": row["opted_in"],
        "state": state, "serving": serving, "shared_serving": services.registry.serving(),
        "latest": _version_view(latest) if latest else None,
        "versions": [_version_view(v) for v in versions],
        "readiness": ready.to_dict(),
        "last_job": _job_view(jobs[0]) if jobs else None,
        "forgotten_through_feedback": row["forgotten_through"],
    }


def _version_view(v: Any) -> dict[str, Any]:
    return {"name": v.name, "parent": v.parent, "gate": v.gate, "reason": v.note, "metrics": v.metrics,
            "created_at": v.created_at.isoformat(), "job_id": v.job_id}


def _job_view(j: PersonalJob) -> dict[str, Any]:
    return {"id": j.id, "status": j.status, "phase": j.phase, "error": j.error,
            "result": {k: j.result.get(k) for k in ("status", "candidate", "reason", "timings") if k in j.result},
            "created_at": j.created_at.isoformat()}


def report(services: Any, user_id: int, version: str | None = None) -> dict[str, Any]:
    """The evaluation report of one of the user's own versions (default: the newest). UnknownVersion when
    `version` is not theirs: another user's name is not found, as if it did not exist."""
    reg = registry_for(services, user_id)
    if version is None:
        versions = reg.list()
        if not versions:
            raise UnknownVersion("you have no personal adapter yet")
        v = versions[0]
    else:
        v = reg.get(version)
    data = v.report()
    if data is None:
        raise UnknownVersion(f"personal adapter {v.name} has no evaluation report")
    md = v.eval_dir / "report.md"
    return {"version": v.name, "gate": v.gate, "reason": v.note, "serving": reg.serving() == v.name,
            "report": data, "markdown": md.read_text(encoding="utf-8") if md.is_file() else None}


def opt(services: Any, user_id: int, opted_in: bool) -> dict[str, Any]:
    """Opt in or out. Out stops serving and training at once; the adapter stays until the user forgets it."""
    set_opted_in(services.store, user_id, opted_in)
    sync_personal(services)
    return status(services, user_id)


def forget(services: Any, user_id: int) -> dict[str, Any]:
    """Delete the user's personal adapters, their datasets and job folders, and leave their feedback so far out of
    every later build (shared and personal). While a personal retrain of theirs runs, it is cancelled and
    PersonalError asks to try again once it has stopped (nothing is deleted then)."""
    running = [j for j in personal_jobs(services, user_id, limit=200) if j.active]
    if running:
        if services.jobs is not None:
            for j in running:
                services.jobs.cancel(j.id, by=f"forget of user {user_id}")
        raise PersonalError("a personal retrain of yours is running; it is being stopped, try again in a minute")
    chat = getattr(services, "chat", None)
    if chat is not None:
        chat.set_personal(user_id, None)
    removed = registry_for(services, user_id).delete_all(getattr(services, "backend", None))
    data_dir = services.settings.personal_datasets_dir / str(user_id)
    data_bytes = folder_bytes(data_dir)
    shutil.rmtree(data_dir, ignore_errors=True)
    jobs_removed = 0
    for j in personal_jobs(services, user_id, limit=10_000):
        shutil.rmtree(services.settings.jobs_dir / f"job-{j.id}", ignore_errors=True)  # their reports and configs
        jobs_removed += 1
    through = mark_forgotten(services.store, user_id)
    return {"versions": removed["versions"], "serving_events": removed["serving_events"],
            "adapter_bytes": removed["bytes"], "dataset_bytes": data_bytes, "job_folders": jobs_removed,
            "feedback_forgotten_through": through}


def delete_files(settings: Any, store: Any, user_id: int) -> dict[str, int]:
    """For deleting a user (assistant/actions/users.py): their personal adapters (rows and folders), datasets and
    personal job folders, without a running server's help (the next sync unloads what was loaded)."""
    holder = _Holder(settings, store)
    jobs = personal_jobs(holder, user_id, limit=10_000)
    removed = Registry(settings, store, owner_id=user_id).delete_all(None)
    data_dir = settings.personal_datasets_dir / str(user_id)
    data_bytes = folder_bytes(data_dir)
    shutil.rmtree(data_dir, ignore_errors=True)
    for j in jobs:
        shutil.rmtree(settings.jobs_dir / f"job-{j.id}", ignore_errors=True)
    if jobs:  # their job records go too (events cascade); the account's deletion stays in the audit log
        with write_transaction(store.engine) as conn:
            conn.execute(training_jobs.delete().where(training_jobs.c.id.in_([j.id for j in jobs])))
    return {"personal_versions": removed["versions"], "personal_bytes": removed["bytes"] + data_bytes,
            "personal_job_folders": len(jobs)}


@dataclass
class _Holder:
    settings: Any
    store: Any


# ------------------------------------------------------------------------------------------ the admin's view
def overview(services: Any, users: list[Any]) -> list[dict[str, Any]]:
    """One line per user who opted in or has a personal adapter: state, versions, serving, disk use."""
    opted = set(opted_in_users(services.store))
    out = []
    for u in users:
        reg = registry_for(services, u.id)
        versions = reg.list()
        if u.id not in opted and not versions:
            continue
        jobs = personal_jobs(services, u.id, limit=50)
        out.append({"user_id": u.id, "username": u.username, "opted_in": u.id in opted,
                    "serving": reg.serving(), "versions": len(versions),
                    "latest": versions[0].name if versions else None,
                    "latest_gate": versions[0].gate if versions else None,
                    "disk_bytes": disk_bytes(services.settings, u.id),
                    "disk_limit_bytes": services.settings.personal_disk_mb * 2**20,
                    "last_job": _job_view(jobs[0]) if jobs else None})
    return out


def enforce_disk(services: Any, user_id: int) -> list[str]:
    """Prune the user's older versions (never the serving one) while they are over their disk limit."""
    reg = registry_for(services, user_id)
    limit = services.settings.personal_disk_mb * 2**20
    removed: list[str] = []
    keep = PERSONAL_KEEP
    while disk_bytes(services.settings, user_id) > limit and keep > 1:
        keep -= 1
        try:
            removed += reg.prune(keep)
        except RegistryError:
            break
    return removed

