"""Retraining jobs: start, watch, cancel, recover; one at a time.

In: the services (``settings``, ``store``, and ``backend`` / ``chat`` when a server runs) and the
`CycleOptions` of a job. Out: `Job` records in the store (table ``training_jobs``, with the latest
progress in a JSON column) and their `JobEvent`s (table ``job_events``: phases, training progress
lines with step / loss / eval_loss / ETA, evaluation steps, log messages); the children's stderr goes to
``<jobs_dir>/job-<id>/job.log``.

A job runs `training.loop.run_cycle` in a background thread of the process that started it; the
heavy steps are child processes (see `training.loop`). Rules:

- One job at a time, enforced by the database (a partial unique index on active jobs), so a CLI run
  beside a server, or two servers on one database, cannot start a second one: `JobBusy`.
- Cancel works from any process: `cancel` records the request in the store; the runner polls it,
  then stops the child (cancel file, SIGTERM, SIGKILL after a grace period).
- A killed child (``kill -9``, out of memory) fails the job; the serving adapter is untouched.
- `recover` at start-up marks jobs failed whose runner is gone (a crash or a restart mid-job) and
  stops their orphaned child processes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from memory.db import utcnow, write_transaction
from memory.schema import job_events, training_jobs
from memory.store import Store
from training.loop import (
    CycleCancelled,
    CycleFailed,
    CycleHooks,
    CycleOptions,
    CycleResult,
    is_noise,
    run_cycle,
)
from training.personal import readiness as personal_readiness
from training.readiness import Readiness, check_readiness
from training.train_config import TrainConfig

if TYPE_CHECKING:
    from assistant.services import Services

log = logging.getLogger("assistant.jobs")
JOB_KIND = "retrain"
ACTIVE = ("queued", "running")
FINAL = ("succeeded", "failed", "cancelled")
TRIGGERS = ("manual", "schedule", "cli", "bench")
HEARTBEAT_S = 5.0
STALE_AFTER_S = 60.0  # a running job whose heartbeat is older than this has lost its runner

class JobBusy(RuntimeError):
    """Another job is queued or running."""


class JobNotFound(LookupError):
    pass


class NotReady(ValueError):
    """Too little data to train or to judge a candidate: refused before anything was recorded or run.

    The message is the readiness check's plain sentences; `readiness` has the counts behind them.
    """

    def __init__(self, readiness: Readiness) -> None:
        super().__init__(" ".join(readiness.missing))
        self.readiness = readiness


@dataclass(frozen=True)
class Job:
    id: int
    status: str  # queued | running | succeeded | failed | cancelled
    trigger: str
    requested_by: str | None
    params: dict[str, Any]
    progress: dict[str, Any]  # latest: phase, fraction, step, max_steps, loss, eval_loss, eta_s...
    result: dict[str, Any]  # CycleResult.to_dict() when it finished
    error: str | None
    pid: int | None  # the running child process
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status, "trigger": self.trigger, "requested_by": self.requested_by,
                "params": self.params, "progress": self.progress, "result": self.result, "error": self.error,
                "pid": self.pid, "cancel_requested": self.cancel_requested, "created_at": _iso(self.created_at),
                "started_at": _iso(self.started_at), "finished_at": _iso(self.finished_at),
                "heartbeat_at": _iso(self.heartbeat_at)}


@dataclass(frozen=True)
class JobEvent:
    id: int
    job_id: int
    kind: str  # phase | progress | eval | train | log | error
    data: dict[str, Any]
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "data": self.data, "created_at": self.created_at.isoformat()}


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t else None


def _job(row: Any) -> Job:
    return Job(id=row.id, status=row.status, trigger=row.trigger, requested_by=row.requested_by,
               params=row.params or {}, progress=row.progress or {}, result=row.result or {}, error=row.error,
               pid=row.pid, cancel_requested=bool(row.cancel_requested), created_at=row.created_at,
               started_at=row.started_at, finished_at=row.finished_at, heartbeat_at=row.heartbeat_at)


def _json_safe(data: dict[str, Any]) -> dict[str, Any]:
    """Progress lines may carry NaN losses; JSON columns refuse them."""
    return json.loads(json.dumps(data, default=str).replace("NaN", "null").replace("Infinity", "null"))


# ------------------------------------------------------------------------------------------ runner
class JobRunner:
    """Starts cycles as jobs and answers questions about them. One per process (`services.jobs`)."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.store = services.store
        self.settings = services.settings
        self._threads: dict[int, threading.Thread] = {}
        self._cancel: dict[int, threading.Event] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ reading
    def get(self, job_id: int) -> Job:
        with self.store.engine.connect() as conn:
            row = conn.execute(sa.select(training_jobs).where(training_jobs.c.id == job_id)).first()
        if row is None:
            raise JobNotFound(f"job {job_id} not found")
        return _job(row)

    def list(self, limit: int = 50) -> list[Job]:
        """Newest first."""
        with self.store.engine.connect() as conn:
            rows = conn.execute(sa.select(training_jobs).order_by(training_jobs.c.id.desc()).limit(limit))
            return [_job(r) for r in rows]

    def active(self) -> Job | None:
        with self.store.engine.connect() as conn:
            row = conn.execute(sa.select(training_jobs).where(training_jobs.c.status.in_(ACTIVE))).first()
        return _job(row) if row else None

    def events(self, job_id: int, since_id: int = 0, kinds: tuple[str, ...] | None = None,
               limit: int = 5000) -> list[JobEvent]:
        q = (sa.select(job_events).where(job_events.c.job_id == job_id, job_events.c.id > since_id)
             .order_by(job_events.c.id).limit(limit))
        if kinds:
            q = q.where(job_events.c.kind.in_(kinds))
        with self.store.engine.connect() as conn:
            return [JobEvent(r.id, r.job_id, r.kind, r.data or {}, r.created_at) for r in conn.execute(q)]

    def loss_curve(self, job_id: int) -> list[dict[str, Any]]:
        """(step, loss / eval_loss, stage) points of the training progress lines, in order."""
        points = []
        for ev in self.events(job_id, kinds=("progress",)):
            d = ev.data
            # Training lines carry the latest eval loss too; it is plotted only where it was measured.
            key = "eval_loss" if d.get("event") == "eval" else "loss"
            if isinstance(d.get(key), int | float):
                points.append({"step": d.get("step"), "value": d[key], "series": f"{d.get('stage', '')} {key}".strip(),
                               "stage": d.get("stage")})
        return points

    def job_dir(self, job_id: int) -> Path:
        return self.settings.jobs_dir / f"job-{job_id}"

    def log_tail(self, job_id: int, lines: int = 200) -> str:
        path = self.job_dir(job_id) / "job.log"
        if not path.is_file():
            return ""
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256 * lines))
            text = f.read().decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    # ------------------------------------------------------------------ writing
    def _update(self, job_id: int, **values: Any) -> None:
        with write_transaction(self.store.engine) as conn:
            conn.execute(training_jobs.update().where(training_jobs.c.id == job_id).values(**values))

    def _event(self, job_id: int, kind: str, data: dict[str, Any]) -> None:
        with write_transaction(self.store.engine) as conn:
            conn.execute(job_events.insert().values(job_id=job_id, kind=kind, data=_json_safe(data),
                                                    created_at=utcnow()))

    def start(self, options: CycleOptions | dict[str, Any] | None = None, *, requested_by: str | None = None,
              trigger: str = "manual", wait: bool = False) -> Job:
        """Record a job and run it in a background thread (or in this thread with `wait=True`).

        Raises `JobBusy` when a job is active, `NotReady` when the data is too little to train or to
        judge a candidate (training/readiness.py), ValueError for bad options (nothing recorded then).
        """
        opts = options if isinstance(options, CycleOptions) else CycleOptions.from_dict(options)
        opts.validate()
        if trigger not in TRIGGERS:
            raise ValueError(f"trigger must be one of {TRIGGERS}")
        self.check_ready(opts)
        now = utcnow()
        try:
            with write_transaction(self.store.engine) as conn:
                busy = conn.execute(sa.select(training_jobs.c.id, training_jobs.c.status)
                                    .where(training_jobs.c.status.in_(ACTIVE))).first()
                if busy is not None:
                    raise JobBusy(f"job {busy.id} is {busy.status}; one retrain at a time")
                job_id = conn.execute(training_jobs.insert().values(
                    kind=JOB_KIND, status="queued", trigger=trigger, requested_by=requested_by,
                    params=opts.to_dict(), progress={"phase": "queued", "fraction": 0.0,
                                                     "runner": {"host": socket.gethostname(), "pid": os.getpid()}},
                    result={}, cancel_requested=False, created_at=now, heartbeat_at=now)).inserted_primary_key[0]
        except sa.exc.IntegrityError as e:
            # The partial unique index: another process started one between our check and insert.
            raise JobBusy("another retrain started at the same moment; one retrain at a time") from e
        cancel = threading.Event()
        with self._lock:
            self._cancel[job_id] = cancel
        if wait:
            self._run(job_id, opts, requested_by, cancel)
        else:
            t = threading.Thread(target=self._run, args=(job_id, opts, requested_by, cancel), daemon=True,
                                 name=f"retrain-job-{job_id}")
            with self._lock:
                self._threads[job_id] = t
            t.start()
        return self.get(job_id)

    def check_ready(self, opts: CycleOptions) -> Readiness | None:
        """Refuse up front (`NotReady`) what would fail minutes in. Skipped for a given snapshot, and when
        the teacher adds pairs first (the rows it makes are not there yet to count)."""
        if opts.user_id is not None:
            personal = personal_readiness(self.services, opts.user_id)
            if not personal.ready:
                raise NotReady(Readiness(ready=False, feedback={"personal": personal.feedback}, rows={},
                                         heldout_frozen=False, needs={"feedback": personal.needs},
                                         missing=personal.missing, summary=" ".join(personal.missing)))
            return None
        if opts.dataset is not None or opts.synth:
            return None
        stages = TrainConfig.from_dict({**opts.train, "base_model": "x"}).stages
        ready = check_readiness(self.store, self.settings, opts.build, stages, self.services.knowledge)
        if not ready.ready:
            raise NotReady(ready)
        return ready

    def running_here(self, job_id: int) -> bool:
        """Whether this process runs the job (its thread is alive)."""
        t = self._threads.get(job_id)
        return t is not None and t.is_alive()

    def wait(self, job_id: int, timeout: float | None = None) -> Job:
        t = self._threads.get(job_id)
        if t is not None:
            t.join(timeout)
        return self.get(job_id)

    def cancel(self, job_id: int, by: str | None = None) -> Job:
        """Ask a queued or running job to stop (from any process). Finished jobs are left as they are."""
        job = self.get(job_id)
        if not job.active:
            return job
        self._update(job_id, cancel_requested=True)
        self._event(job_id, "log", {"message": f"cancel requested by {by or 'unknown'}"})
        ev = self._cancel.get(job_id)
        if ev is not None:
            ev.set()
        return self.get(job_id)

    # ------------------------------------------------------------------ running
    def _run(self, job_id: int, opts: CycleOptions, actor: str | None, cancel: threading.Event) -> None:
        work = self.job_dir(job_id)
        work.mkdir(parents=True, exist_ok=True)
        log_file = open(work / "job.log", "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed below
        state: dict[str, Any] = {"progress": {"phase": "starting", "fraction": 0.0,
                                              "runner": {"host": socket.gethostname(), "pid": os.getpid()}},
                                 "last_write": 0.0, "last_poll": 0.0}
        lock = threading.Lock()

        def flush(force: bool = False) -> None:
            now = time.monotonic()
            if force or now - state["last_write"] >= 1.0:
                state["last_write"] = now
                self._update(job_id, progress=_json_safe(state["progress"]), heartbeat_at=utcnow())

        def event(kind: str, data: dict[str, Any]) -> None:
            with lock:
                new_phase = False
                if kind == "phase":
                    state["progress"].update(data)
                    new_phase = data.get("phase") != state.get("last_phase")
                    state["last_phase"] = data.get("phase")
                    if new_phase:  # fraction updates within a phase only go to the progress column
                        self._event(job_id, kind, data)
                else:
                    if kind == "progress":
                        first = state["progress"].get("step") is None
                        state["progress"].update({k: data[k] for k in ("step", "max_steps", "loss", "eval_loss",
                                                                       "epoch", "eta_s", "stage") if k in data})
                        if first:  # the step reaches the progress column before the curve's first point does
                            flush(force=True)
                    self._event(job_id, kind, data)
                if kind == "log":
                    log_file.write(f"[loop] {data.get('message')}\n")
                flush(force=new_phase)

        def should_stop() -> bool:
            if cancel.is_set():
                return True
            now = time.monotonic()
            if now - state["last_poll"] >= 1.0:  # a cancel recorded by another process
                state["last_poll"] = now
                with self.store.engine.connect() as conn:
                    if conn.execute(sa.select(training_jobs.c.cancel_requested)
                                    .where(training_jobs.c.id == job_id)).scalar():
                        cancel.set()
            return cancel.is_set()

        stop_beat = threading.Event()

        def heartbeat() -> None:
            while not stop_beat.wait(HEARTBEAT_S):
                with lock:
                    self._update(job_id, heartbeat_at=utcnow())

        beat = threading.Thread(target=heartbeat, daemon=True, name=f"job-{job_id}-heartbeat")
        hooks = CycleHooks(event=event, should_stop=should_stop,
                           on_process=lambda pid: self._update(job_id, pid=pid),
                           log_line=lambda line: None if is_noise(line) else log_file.write(line + "\n"))
        status, error, result = "failed", None, {}
        try:
            self._update(job_id, status="running", started_at=utcnow())
            beat.start()
            if should_stop():
                raise CycleCancelled("cancelled before it started")
            res: CycleResult = run_cycle(self.services, opts, hooks=hooks, job_id=job_id, actor=actor, work_dir=work)
            status, result = "succeeded", res.to_dict()
        except CycleCancelled as e:
            status, error = "cancelled", str(e)
        except CycleFailed as e:
            status, error = "failed", str(e)
        except Exception as e:  # noqa: BLE001 - any failure is recorded on the job; serving is untouched
            log.exception("job %s failed", job_id)  # the server log keeps the exception type and traceback
            status, error = "failed", f"an unexpected error stopped the job: {e}"
        finally:
            stop_beat.set()
            with lock:
                progress = dict(state["progress"])
                if status != "succeeded":
                    progress["phase"] = status
                self._update(job_id, status=status, error=error, result=_json_safe(result), pid=None,
                             progress=_json_safe(progress), finished_at=utcnow(), heartbeat_at=utcnow())
                self._event(job_id, "error" if status == "failed" else "log",
                            {"message": f"job {status}" + (f": {error}" if error else ""), "status": status})
            log_file.write(f"[loop] job {status}{': ' + error if error else ''}\n")
            log_file.close()
            with self._lock:
                self._cancel.pop(job_id, None)
            log.warning("job %s %s%s", job_id, status, f": {error}" if error else "")

    # ------------------------------------------------------------------ recovery
    def recover(self, stale_after_s: float = STALE_AFTER_S) -> list[int]:
        """Mark failed every active job whose runner is gone; stop its orphaned child process."""
        me = socket.gethostname()
        now = utcnow()
        recovered = []
        for job in [j for j in self.list(limit=1000) if j.active]:
            if self.running_here(job.id):
                continue  # ours, alive
            runner = job.progress.get("runner") or {}
            same_host = runner.get("host") == me
            runner_alive = same_host and runner.get("pid") != os.getpid() and _pid_alive(runner.get("pid"))
            beat = job.heartbeat_at or job.created_at
            stale = now - beat > timedelta(seconds=stale_after_s)
            if runner_alive and not stale:
                continue  # another live process on this host runs it (a CLI beside the server)
            if not same_host and not stale:
                continue  # another host's runner, still beating
            if job.pid and same_host:
                _kill_orphan(job.pid)
            self._update(job.id, status="failed", pid=None, finished_at=now,
                         error="interrupted: the process running this job stopped (crash or restart); "
                               "marked failed at start-up",
                         progress=_json_safe({**job.progress, "phase": "failed"}))
            self._event(job.id, "error", {"message": "marked failed at start-up: its runner is gone"})
            recovered.append(job.id)
        return recovered


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie answers kill(0) but is not running
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _kill_orphan(pid: int) -> None:
    """Stop a training/evaluation child left by a dead runner, if that pid is still one of ours."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return  # gone (or not Linux): nothing to stop
    if "training.train" in cmdline or "training.evaluate" in cmdline:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def job_history(store: Store) -> list[tuple[datetime, dict[str, Any]]]:
    """(created_at, params) of every job, newest first: what the automatic loop's rules look at."""
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(training_jobs.c.created_at, training_jobs.c.params)
                            .order_by(training_jobs.c.id.desc()))
        return [(r.created_at, r.params or {}) for r in rows]


def active_job_id(store: Store) -> int | None:
    """The queued or running job's id, if any."""
    with store.engine.connect() as conn:
        return conn.execute(sa.select(training_jobs.c.id).where(training_jobs.c.status.in_(ACTIVE))).scalar()


def runner_for(services: Services) -> JobRunner:
    """The process's job runner (created once, kept in ``services.jobs``)."""
    runner = services.jobs
    if runner is None:
        runner = services.jobs = JobRunner(services)
    return runner
