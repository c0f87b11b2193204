"""Automatic retraining: when enough new feedback has accumulated, or on a schedule; one job at a time.

In: the services and the admin-editable `LoopSettings`, stored in the store (table ``loop_settings``,
key ``"schedule"``). Out: retrain jobs started through `training.jobs.JobRunner` (trigger
"schedule"), and a server kept in step with the registry.

Modes (`LoopSettings.mode`):
- ``feedback``: retrain when at least `min_new_feedback` feedback rows arrived since the last job
  started and at least `min_interval_hours` have passed since then.
- ``daily``: once a day at `daily_at` (HH:MM, UTC).
- ``interval``: every `every_hours` hours since the last job started.

`Scheduler` is a daemon thread in the server (`start_loop(services)` starts it together with the
start-up recovery). Each tick it also makes the server serve what the registry records (a promotion
from the CLI or another process takes effect within one tick) and unloads adapter versions no longer
needed after a grace period. `due` is a pure function so the rules can be tested without waiting.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

import sqlalchemy as sa

from memory.db import utcnow, write_transaction
from memory.schema import loop_settings
from memory.store import Store
from training.jobs import JobBusy, NotReady, active_job_id, job_history, runner_for
from training.loop import CycleOptions
from training.personal import cycle_options as personal_options
from training.personal import next_personal, sync_personal
from training.registry import Registry

if TYPE_CHECKING:
    from assistant.services import Services

log = logging.getLogger("assistant.scheduler")
SETTINGS_KEY = "schedule"
_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")

def _f(default: Any, help: str) -> Any:
    if isinstance(default, dict):
        return field(default_factory=dict, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class LoopSettings:
    """Admin-editable settings of the automatic loop (every field carries its help text)."""

    enabled: bool = _f(False, "Retrain automatically. Off by default: an admin turns it on.")
    mode: Literal["feedback", "daily", "interval"] = _f(
        "feedback", "'feedback': when enough new feedback arrived; 'daily': at daily_at; "
        "'interval': every every_hours hours.")
    min_new_feedback: int = _f(50, "feedback mode: new feedback rows (ratings, edits, choices) needed.")
    min_interval_hours: float = _f(24.0, "feedback mode: least hours between two automatic retrains.")
    daily_at: str = _f("03:00", "daily mode: time of day, HH:MM in UTC.")
    every_hours: float = _f(24.0, "interval mode: hours between retrains.")
    auto_promote: bool = _f(True, "Promote a candidate that passes the evaluation gate without asking.")
    keep_last: int = _f(5, "Adapter versions kept on disk (the serving one and its parent always stay).")
    synth: bool = _f(False, "Generate synthetic document pairs with the teacher before each retrain.")
    build: dict[str, Any] = _f({}, "Dataset build overrides (split_ratios, replay_ratio, heldout_min_rows...).")
    train: dict[str, Any] = _f({}, "Training config overrides (see TrainConfig.help()).")
    gate: dict[str, Any] = _f({}, "Evaluation gate overrides (see GateConfig.help()).")

    def validate(self) -> None:
        errors = []
        if self.mode not in ("feedback", "daily", "interval"):
            errors.append(f"mode must be feedback, daily or interval, got {self.mode!r}")
        if not isinstance(self.daily_at, str) or not _HHMM.match(self.daily_at):
            errors.append(f"daily_at must be HH:MM (00:00-23:59), got {self.daily_at!r}")
        if not isinstance(self.min_new_feedback, int) or isinstance(self.min_new_feedback, bool) \
                or self.min_new_feedback < 1:
            errors.append("min_new_feedback must be an integer >= 1")
        for name in ("min_interval_hours", "every_hours"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or isinstance(v, bool) or v < 0 or (name == "every_hours" and v <= 0):
                errors.append(f"{name} must be a number {'> 0' if name == 'every_hours' else '>= 0'}")
        for name in ("enabled", "auto_promote", "synth"):
            if not isinstance(getattr(self, name), bool):
                errors.append(f"{name} must be true or false")
        if errors:
            raise ValueError("invalid schedule: " + "; ".join(errors))
        self.cycle_options()  # train / gate / keep_last are checked where they are used

    def cycle_options(self) -> CycleOptions:
        opts = CycleOptions(synth=self.synth, build=dict(self.build), train=dict(self.train), gate=dict(self.gate),
                            auto_promote=self.auto_promote, keep_last=self.keep_last)
        opts.validate()
        return opts

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoopSettings:
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown schedule settings: {unknown}")
        ls = cls(**data)
        ls.validate()
        return ls

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata["help"] for f in fields(cls)}


def load_loop_settings(store: Store) -> LoopSettings:
    with store.engine.connect() as conn:
        value = conn.execute(sa.select(loop_settings.c.value).where(loop_settings.c.key == SETTINGS_KEY)).scalar()
    return LoopSettings.from_dict(value) if value else LoopSettings()


def save_loop_settings(store: Store, changes: dict[str, Any], by: str | None = None) -> LoopSettings:
    """Apply `changes` to the stored settings; ValueError (nothing saved) when the result is invalid."""
    if not isinstance(changes, dict):
        raise ValueError("schedule changes must be an object")
    merged = LoopSettings.from_dict({**load_loop_settings(store).to_dict(), **changes})
    with write_transaction(store.engine) as conn:
        exists = conn.execute(sa.select(loop_settings.c.key).where(loop_settings.c.key == SETTINGS_KEY)).first()
        values = {"value": merged.to_dict(), "updated_by": by, "updated_at": utcnow()}
        if exists:
            conn.execute(loop_settings.update().where(loop_settings.c.key == SETTINGS_KEY).values(**values))
        else:
            conn.execute(loop_settings.insert().values(key=SETTINGS_KEY, **values))
    return merged


# ------------------------------------------------------------------------------------------ the rules
@dataclass(frozen=True)
class LoopState:
    last_job_at: datetime | None  # when the last job (any status) was created
    new_feedback: int  # feedback rows created since then (all of them if there was no job)
    active_job: int | None


def loop_state(store: Store) -> LoopState:
    # The shared adapter's last job: personal retrains (training/personal.py) neither delay nor feed it.
    last = next((at for at, params in job_history(store) if params.get("user_id") is None), None)
    if last is not None and last.tzinfo is None:
        last = last.replace(tzinfo=UTC)
    return LoopState(last, store.count_feedback(since=last), active_job_id(store))


def due(ls: LoopSettings, state: LoopState, now: datetime) -> tuple[bool, str]:
    """Whether an automatic retrain should start now, and why (or why not)."""
    if not ls.enabled:
        return False, "automatic retraining is off"
    if state.active_job is not None:
        return False, f"job {state.active_job} is running"
    since = now - state.last_job_at if state.last_job_at else None
    if ls.mode == "feedback":
        if state.new_feedback < ls.min_new_feedback:
            return False, f"{state.new_feedback}/{ls.min_new_feedback} new feedback"
        if since is not None and since < timedelta(hours=ls.min_interval_hours):
            wait = timedelta(hours=ls.min_interval_hours) - since
            return False, f"enough feedback, next retrain allowed in {_hours(wait)}"
        return True, f"{state.new_feedback} new feedback"
    if ls.mode == "interval":
        if since is not None and since < timedelta(hours=ls.every_hours):
            return False, f"next retrain in {_hours(timedelta(hours=ls.every_hours) - since)}"
        return True, f"every {ls.every_hours:g} h"
    hh, mm = (int(x) for x in ls.daily_at.split(":"))
    slot = now.astimezone(UTC).replace(hour=hh, minute=mm, second=0, microsecond=0)
    if now < slot:
        slot -= timedelta(days=1)  # the most recent slot that has passed
    if state.last_job_at is not None and state.last_job_at >= slot:
        nxt = slot + timedelta(days=1)
        return False, f"next retrain at {nxt:%Y-%m-%d %H:%M} UTC"
    return True, f"daily at {ls.daily_at} UTC"


def _hours(d: timedelta) -> str:
    return f"{d.total_seconds() / 3600:.1f} h"


# ------------------------------------------------------------------------------------------ the thread
class Scheduler:
    """Ticks every `poll_s` seconds: sync serving, unload retired adapters, start a due retrain."""

    def __init__(self, services: Services, poll_s: float = 30.0, unload_grace_s: float | None = None) -> None:
        self.services = services
        self.poll_s = poll_s
        s = services.settings
        # Requests resolve the serving alias when they start, then wait in the queue and generate;
        # after this long every request that could still hold a retired adapter has finished.
        self.unload_grace_s = unload_grace_s if unload_grace_s is not None else \
            s.queue_timeout_s + s.generation_timeout_s + 60
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_check: dict[str, Any] = {}

    @property
    def registry(self) -> Registry:
        return self.services.registry

    def tick(self, now: datetime | None = None) -> dict[str, Any]:
        """One round; returns what it saw and did (also kept in `last_check` for the admin view)."""
        now = now or utcnow()
        out: dict[str, Any] = {"at": now.isoformat()}
        backend = getattr(self.services, "backend", None)
        if backend is not None and getattr(self.services, "chat", None) is not None:
            out["synced"] = self.registry.sync_serving(self.services)
            out["unloaded"] = self.registry.unload_retired(backend, self.unload_grace_s)
        ls = load_loop_settings(self.services.store)
        state = loop_state(self.services.store)
        go, why = due(ls, state, now)
        out.update(due=go, reason=why, new_feedback=state.new_feedback)
        if go:
            try:
                job = runner_for(self.services).start(ls.cycle_options(), requested_by="scheduler",
                                                     trigger="schedule")
                out["started_job"] = job.id
                log.warning("scheduler started retrain job %s (%s)", job.id, why)
            except (JobBusy, NotReady) as e:  # not ready: the next tick asks again
                out["started_job"] = None
                out["reason"] = str(e)
        busy = ("the shared retrain goes first" if out.get("started_job") is not None else
                f"job {state.active_job} is running; one retrain at a time" if state.active_job is not None else None)
        out["personal"] = self._personal_tick(now, busy)
        self.last_check = out
        return out

    def _personal_tick(self, now: datetime, busy: str | None) -> dict[str, Any]:
        """Personal adapters: serve each user what the records say, then start one due personal retrain, behind
        the shared one (only when no job runs and none just started), the user waiting longest first."""
        out: dict[str, Any] = {"changed": {str(k): v for k, v in sync_personal(self.services).items()}}
        if busy is not None:
            out["reason"] = busy
            return out
        uid, why = next_personal(self.services, now)
        out["reason"] = why
        if uid is not None:
            try:
                job = runner_for(self.services).start(CycleOptions.from_dict(personal_options(uid)),
                                                     requested_by="scheduler", trigger="schedule")
                out["started_job"] = job.id
                log.warning("scheduler started personal retrain job %s for user %s", job.id, uid)
            except (JobBusy, NotReady) as e:
                out["reason"] = str(e)
        return out

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> Scheduler:
        if self.running:
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="retrain-scheduler")
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - a bad tick (database hiccup) must not end the scheduler
                log.exception("scheduler tick failed; trying again in %.0f s", self.poll_s)


def start_loop(services: Services, *, poll_s: float = 30.0, start_thread: bool = True) -> Scheduler:
    """Server start-up: recover jobs a crash left running, restore the serving adapter, start the scheduler.

    Keeps the job runner and scheduler in ``services.jobs`` and ``services.scheduler``.
    """
    from training.registry import restore_serving

    recovered = runner_for(services).recover()
    if recovered:
        log.warning("marked interrupted retrain jobs %s as failed", recovered)
    restore_serving(services)
    sync_personal(services)  # each opted-in user's promoted personal adapter, loaded and served to them
    scheduler = services.scheduler
    if scheduler is None:
        scheduler = services.scheduler = Scheduler(services, poll_s=poll_s)
    if start_thread:
        scheduler.start()
    return scheduler
