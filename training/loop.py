"""One turn of the self-improvement loop: data -> (synthetic pairs) -> train -> evaluate -> register -> promote.

In: the services (``settings``, ``store``; ``backend`` and ``chat`` when a server is running, for
synthetic generation and the hot-swap; ``services.knowledge`` for the document passages of the
grounded check), `CycleOptions`, and optional `CycleHooks` (progress events, cancellation, the pid of
each child process). Out: a `CycleResult`; the candidate is registered (with its evaluation report)
whether it passed or not, and promoted when it passed and auto-promotion is on.

Training and evaluation each run as a SEPARATE PROCESS (``python -m training.train`` /
``python -m training.evaluate``) in its own process group, limited to ``settings.train_threads`` torch
threads, so a crash, an out-of-memory kill or a ``kill -9`` never takes the server down, and the
server keeps a core to answer with. Their JSON progress lines come back through the hooks.

Used by `training.jobs` (jobs started from the API, the UI, the scheduler) and by
``bench/cycle.py``; ``assistant admin train`` goes through the job runner.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.evaluate import GateConfig
from training.gate_decision import RULES_VERSION
from training.personal import PERSONAL_GATE, enforce_disk
from training.registry import Registry, UnknownVersion
from training.train_config import TrainConfig

if TYPE_CHECKING:
    from assistant.config import Settings
    from assistant.services import Services
    from memory.knowledge import KnowledgeBase
    from memory.store import Store
    from memory.types import User
    from training.registry import AdapterVersion

log = logging.getLogger("assistant.loop")
PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Share of the overall progress bar each phase takes (synth only when it runs).
PHASES = {"synth": 0.10, "dataset": 0.05, "train": 0.60, "evaluate": 0.22, "register": 0.03}


class CycleCancelled(Exception):
    """The cycle was cancelled; nothing was registered or promoted."""


class CycleFailed(RuntimeError):
    """A step failed; the message says which and why. Serving is untouched."""


@dataclass
class CycleOptions:
    """What one cycle does. Every field has a CPU-friendly default."""

    dataset: str | None = None  # an existing snapshot name (vNNNN); None = build a new one
    build: dict[str, Any] = field(default_factory=dict)  # BuildOptions overrides
    synth: bool = False  # ask the teacher for document pairs first
    synth_docs: str | None = None  # folder of .md/.txt documents; None = the knowledge base
    synth_max_chunks: int = 8  # chunks the teacher reads per cycle: unread ones first, spread over documents
    synth_questions_per_chunk: int = 2
    teacher: dict[str, Any] = field(default_factory=dict)  # TeacherOptions overrides (candidates, answer_max_tokens)
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides
    gate: dict[str, Any] = field(default_factory=dict)  # GateConfig overrides
    eval_doc_qa: str | None = None  # JSONL of curated document questions added to the grounded check
    continue_from_serving: bool = False  # start from the serving adapter instead of a fresh one
    anchor_replay: bool = True  # replay answers by the base model itself (training/anchor.py)
    auto_promote: bool = True
    keep_last: int = 5  # adapter versions kept on disk (never the serving one or its parent)
    user_id: int | None = None  # a personal retrain of this user (training/personal.py); None = the shared adapter

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> CycleOptions:
        data = dict(data or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown retrain options: {unknown}; known: {sorted(known)}")
        opts = cls(**data)
        opts.validate()
        return opts

    def validate(self) -> None:
        for name in ("build", "train", "gate", "teacher"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be an object of overrides")
        bad = sorted(set(self.train) & {"base_model", "init_adapter"})
        if bad:
            raise ValueError(f"train overrides may not set {bad}: the loop chooses them")
        TrainConfig.from_dict({**self.train, "base_model": "x"})  # field names and types
        GateConfig.from_dict(self.gate)
        build_options(self.build)
        if self.keep_last < 1 or self.synth_max_chunks < 1 or self.synth_questions_per_chunk < 1:
            raise ValueError("keep_last, synth_max_chunks and synth_questions_per_chunk must be >= 1")
        teacher_options(self.teacher)
        if self.eval_doc_qa is not None and not Path(self.eval_doc_qa).is_file():
            raise ValueError(f"eval_doc_qa file {self.eval_doc_qa} does not exist")
        if self.dataset is not None and not (isinstance(self.dataset, str) and self.dataset.startswith("v")):
            raise ValueError(f"dataset must be a snapshot name like v0003, got {self.dataset!r}")
        if self.user_id is not None:
            if not isinstance(self.user_id, int) or isinstance(self.user_id, bool) or self.user_id < 1:
                raise ValueError(f"user_id must be a user's id, got {self.user_id!r}")
            if self.synth or self.eval_doc_qa:
                raise ValueError("a personal retrain learns from its user's feedback only: no synth, no eval_doc_qa")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CycleResult:
    status: str  # "promoted" | "rejected" | "registered" (passed, auto-promotion off) | "unchanged" (see below)
    dataset: str
    candidate: str
    parent: str | None
    passed: bool
    reason: str
    promoted: bool
    headline: dict[str, Any]
    timings: dict[str, float]
    train: dict[str, Any]
    synth: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CycleHooks:
    """How a caller watches and steers a cycle. All optional."""

    event: Callable[[str, dict[str, Any]], None] = lambda kind, data: None  # kind: phase/progress/eval/log
    should_stop: Callable[[], bool] = lambda: False
    on_process: Callable[[int | None], None] = lambda pid: None  # pid of the running child, None when done
    log_line: Callable[[str], None] = lambda line: None  # raw stderr of the children


# ------------------------------------------------------------------------------------------ processes
def child_env(threads: int) -> dict[str, str]:
    """Environment of a training / evaluation process: few threads, no network, project importable."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


@dataclass
class ChildExit:
    """How a child process ended: its exit code (negative: the killing signal), its last stderr lines,
    and the most memory it was seen to hold (the kernel's resident high-water mark, read every 0.5 s)."""

    code: int
    tail: list[str]
    peak_rss_bytes: int | None = None


# How long a cancelled child may take to stop on its own before it is killed. The trainer stops at the
# end of an optimizer step, and one step of a real model on a CPU can take longer than an admin should
# wait for "cancel" (a SmolLM2 step at a few tokens a second: tens of seconds); a cancelled training or
# evaluation keeps nothing (the adapter is written only at the very end), so killing it loses nothing.
# The job polls the store for a cancel every second and the watcher below every 0.5 s: a cancel takes
# effect within about 7 s.
CANCEL_GRACE_S = 5.0


def run_child(cmd: list[str], *, threads: int, hooks: CycleHooks, on_json: Callable[[dict[str, Any]], None],
              cancel_file: Path | None = None, kill_after_s: float = CANCEL_GRACE_S) -> ChildExit:
    """Run `cmd` in its own process group; JSON stdout lines go to `on_json`, stderr to `hooks.log_line`.

    Cancellation (``hooks.should_stop()``): create `cancel_file`, SIGTERM the group, SIGKILL it after
    `kill_after_s`.
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                            env=child_env(threads), cwd=str(PROJECT_ROOT), start_new_session=True)
    hooks.on_process(proc.pid)
    tail: deque[str] = deque(maxlen=40)

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            line = line.rstrip("\n")
            tail.append(line)
            hooks.log_line(line)

    err_thread = threading.Thread(target=read_stderr, daemon=True, name="child-stderr")
    err_thread.start()
    stopping_since: float | None = None
    peak: int | None = None
    stop_watch = threading.Event()

    def watch_cancel() -> None:
        nonlocal stopping_since, peak
        while not stop_watch.wait(0.5):
            if proc.poll() is not None:
                return
            hwm = _resident_peak(proc.pid)
            if hwm is not None:
                peak = max(peak or 0, hwm)
            if stopping_since is None and hooks.should_stop():
                stopping_since = time.monotonic()
                if cancel_file is not None:
                    cancel_file.touch()
                _signal_group(proc.pid, signal.SIGTERM)
            elif stopping_since is not None and time.monotonic() - stopping_since > kill_after_s:
                _signal_group(proc.pid, signal.SIGKILL)
                return

    watcher = threading.Thread(target=watch_cancel, daemon=True, name="child-cancel")
    watcher.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                hooks.log_line(line)
                continue
            if isinstance(event, dict):
                on_json(event)
        code = proc.wait()
    except BaseException:
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        stop_watch.set()
        err_thread.join(timeout=5)
        hooks.on_process(None)
    return ChildExit(code=code, tail=list(tail), peak_rss_bytes=peak)


def _resident_peak(pid: int) -> int | None:
    """The process's resident-memory high-water mark in bytes (Linux VmHWM), or None where unreadable."""
    return _proc_kb(Path(f"/proc/{pid}/status"), "VmHWM:")


def _proc_kb(path: Path, key: str) -> int | None:
    """A "<key> <n> kB" line of a /proc file, in bytes; None where the file or the line is missing."""
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the child leads its own group (start_new_session)
    except ProcessLookupError:
        pass  # already gone


# ------------------------------------------------------------------------------------------ the cycle
def run_cycle(services: Services, options: CycleOptions | None = None, *, hooks: CycleHooks | None = None,
              job_id: int | None = None, actor: str | None = None, work_dir: Path | None = None,
              passage_for: Callable[[dict[str, Any]], tuple[str, str] | None] | None = None) -> CycleResult:
    """Build -> synth (optional) -> train -> evaluate -> register -> promote/reject. See module docstring.

    Raises `CycleCancelled` or `CycleFailed` (serving untouched in both cases) and ValueError for bad
    options. `passage_for(row)` finds the source passage of a held-out teacher row (default: the
    knowledge base in ``services.knowledge``); rows without one are left out of the grounded check.
    """
    options = options or CycleOptions()
    options.validate()
    hooks = hooks or CycleHooks()
    settings, store = services.settings, services.store
    shared: Registry = services.registry
    personal = options.user_id is not None
    # A personal candidate is registered in its user's own registry; it starts from, and is judged against,
    # the shared adapter serving now (training/personal.py).
    registry = Registry(settings, store, owner_id=options.user_id) if personal else shared
    work = Path(work_dir or settings.jobs_dir / (f"job-{job_id}" if job_id else f"cycle-{int(time.time())}"))
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    phases = [p for p in PHASES if p != "synth" or options.synth]
    total_w = sum(PHASES[p] for p in phases)
    starts = {p: sum(PHASES[q] for q in phases[:i]) / total_w for i, p in enumerate(phases)}

    def phase(name: str, frac: float = 0.0, **data: Any) -> None:
        hooks.event("phase", {"phase": name, "fraction": round(starts[name] + frac * PHASES[name] / total_w, 4),
                              **data})

    def check_stop() -> None:
        if hooks.should_stop():
            raise CycleCancelled("cancelled")

    # 1. synthetic pairs (they go into the store, so the build below picks them up)
    synth_info = None
    if options.synth:
        phase("synth")
        t0 = time.perf_counter()
        def synth_progress(done: int, total: int) -> None:
            phase("synth", done / max(total, 1), done=done, total=total)
            check_stop()  # between chunks: the pairs of the chunks done so far stay stored

        synth_info = _synth(services, options, synth_progress)
        timings["synth"] = round(time.perf_counter() - t0, 2)
        check_stop()

    # 2. dataset snapshot (its general replay answered by the base model, when a backend is here)
    phase("dataset")
    t0 = time.perf_counter()

    def anchor_progress(done: int, total: int) -> None:
        phase("dataset", 0.9 * done / max(total, 1), done=done, total=total)
        if done == 1 or done == total or done % 20 == 0:  # minutes on a CPU the first time: say so
            hooks.event("log", {"message": f"base model answering general questions: {done} of {total}"})
        check_stop()  # ~90 s for the embedded model on first use: cancellable between answers

    anchor = _anchor(services, options, anchor_progress)
    if anchor is not None:
        hooks.event("log", {"message": f"replay anchored to the base model: {anchor.base_answers} of "
                                       f"{anchor.rows + anchor.dropped} "
                                       f"general questions answered in its own words, {anchor.dropped} it got "
                                       f"wrong left out" + (" (cached)" if anchor.cached else "")})
        timings["anchor"] = round(anchor.seconds, 2)
    snapshot = _dataset(settings, store, options, services.knowledge,
                        replay_path=anchor.path if anchor else None)
    timings["dataset"] = round(time.perf_counter() - t0, 2)
    hooks.event("log", {"message": f"dataset {snapshot.name}"})
    _check_evaluable(snapshot)  # before training: a candidate nobody can evaluate is wasted CPU
    check_stop()

    # 3. train (child process)
    from assistant.models import prepare_model

    base_model = prepare_model(settings, progress=False)
    parent = shared.serving()
    parent_dir = shared.verify(parent).adapter_dir if parent else None
    from_parent = (options.continue_from_serving or personal) and parent_dir is not None
    train_cfg = TrainConfig.from_dict({
        "threads": settings.train_threads, **options.train, "base_model": str(base_model),
        "init_adapter": str(parent_dir) if from_parent else None})
    # A personal candidate answers the held-out document questions the serving shared adapter was judged on (the
    # user's own data has none); a shared version registered without them leaves the latest shared snapshot's.
    shared_questions = _gate_questions(shared, parent) if personal else None
    qa_from = (_latest_shared_snapshot(settings) if shared_questions is None else None) if personal else snapshot
    gate_cfg = GateConfig.from_dict({**(PERSONAL_GATE if personal else {}), **options.gate})
    inputs = cycle_inputs(settings, snapshot, train_cfg, parent if from_parent else None, parent, gate_cfg, qa_from,
                          shared_questions)
    twin = refused_twin(registry, inputs)
    if twin is not None:
        # Training is deterministic (fixed seeds): the same inputs give the same candidate and the same verdict.
        reason = (f"nothing new to learn: the data, the training options, the starting adapter and the gate are "
                  f"those of {twin.name}, which the gate refused ({twin.note})")
        hooks.event("log", {"message": reason})
        hooks.event("phase", {"phase": "done", "fraction": 1.0, "status": "unchanged", "candidate": twin.name})
        return CycleResult(status="unchanged", dataset=snapshot.name, candidate=twin.name, parent=parent,
                           passed=False, reason=reason, promoted=False, headline={}, timings=timings, train={},
                           synth=synth_info)
    cfg_path = train_cfg.save(work / "train_config.json")
    train_out = work / "train"
    phase("train", max_steps=None)
    t0 = time.perf_counter()
    train_result: dict[str, Any] = {}
    last_error: list[str] = []
    stage_pos = {"index": 0, "count": len(train_cfg.stages)}

    def on_train(ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        if kind == "stage_start":
            stage_pos.update(index=int(ev.get("index") or 0), count=len(ev.get("stages") or train_cfg.stages))
            hooks.event("train", ev)
        elif kind == "progress" or kind == "eval":
            step, max_steps = ev.get("step") or 0, ev.get("max_steps") or 0
            # Stages run one after the other: the bar moves through them instead of restarting.
            frac = (stage_pos["index"] + (min(step / max_steps, 1.0) if max_steps else 0.0)) / stage_pos["count"]
            hooks.event("progress", {**ev, "phase": "train"})
            phase("train", min(frac, 1.0), step=step, max_steps=max_steps, stage=ev.get("stage"))
        elif kind == "done":
            train_result.update(ev.get("result") or {})
        elif kind == "error":
            last_error.append(str(ev.get("error")))
            hooks.event("log", {"message": f"training error: {ev.get('error')}"})
        else:
            hooks.event("train", ev)

    done = run_child([sys.executable, "-m", "training.train", "--config", str(cfg_path), "--data",
                      str(snapshot), "--out", str(train_out), "--cancel-file", str(work / "CANCEL")],
                     threads=settings.train_threads, hooks=hooks, on_json=on_train, cancel_file=work / "CANCEL")
    timings["train"] = round(time.perf_counter() - t0, 2)
    if done.code == 3 or (done.code != 0 and hooks.should_stop()):
        raise CycleCancelled("training was cancelled")
    if done.code != 0:
        raise CycleFailed(f"training failed ({_describe_exit(done)}): "
                          f"{last_error[-1] if last_error else _last_lines(done.tail)}")
    adapter_dir = train_out / "adapter"
    if not (adapter_dir / "adapter_config.json").is_file():
        raise CycleFailed(f"training exited 0 but wrote no adapter in {adapter_dir}")
    check_stop()

    # 4. evaluate (child process)
    phase("evaluate")
    t0 = time.perf_counter()
    if shared_questions is not None:
        doc_qa = work / GATE_QUESTIONS
        doc_qa.write_bytes(shared_questions.read_bytes())
    else:
        doc_qa = _doc_qa_file(services, qa_from, work, passage_for, options.eval_doc_qa) if qa_from else None
    gate_path = work / "gate.json"
    gate_path.write_text(json.dumps(gate_cfg.to_dict(), indent=2), encoding="utf-8")
    eval_out = work / "eval"
    verdict: dict[str, Any] = {}
    eval_error: list[str] = []
    eval_steps = {"n": 0}

    def on_eval(ev: dict[str, Any]) -> None:
        if ev.get("event") == "eval_progress":
            eval_steps["n"] += 1
            phase("evaluate", min(eval_steps["n"] / 12, 0.95), model=ev.get("model"), check=ev.get("check"))
            hooks.event("eval", ev)
        elif ev.get("event") == "eval_done":
            verdict.update(ev)
        elif ev.get("event") == "error":
            eval_error.append(str(ev.get("error")))

    device, dtype = _serving_precision(settings)
    if gate_cfg.precision == "float32":
        dtype = "float32"
    cmd = [sys.executable, "-m", "training.evaluate", "--base-model", str(base_model), "--candidate",
           str(adapter_dir), "--candidate-name", "candidate", "--data", str(snapshot), "--out", str(eval_out),
           "--gate", str(gate_path), "--threads", str(settings.train_threads), "--device", device,
           "--dtype", dtype, "--system-prompt", settings.system_prompt,
           "--base-cache", str(settings.home / "cache" / "gate")]
    if parent_dir is not None:
        cmd += ["--baseline", str(parent_dir), "--baseline-name", str(parent)]
    if doc_qa is not None:
        cmd += ["--doc-qa", str(doc_qa)]
    if personal:  # the shared adapter's answers to this user's held-out questions, kept with the user's data
        cmd += ["--own-cache", str(settings.personal_datasets_dir / str(options.user_id) / "gate-cache")]
    done = run_child(cmd, threads=settings.train_threads, hooks=hooks, on_json=on_eval)
    timings["evaluate"] = round(time.perf_counter() - t0, 2)
    if done.code != 0 and hooks.should_stop():
        raise CycleCancelled("evaluation was cancelled")
    if done.code != 0 or not verdict:
        raise CycleFailed(f"evaluation failed ({_describe_exit(done)}): "
                          f"{eval_error[-1] if eval_error else _last_lines(done.tail)}")
    check_stop()

    # 5. register (with the report, pass or fail), then 6. promote or reject
    phase("register")
    passed = bool(verdict["passed"])
    if eval_out.is_dir():  # what decided this candidate, so that a retrain on the same can be skipped
        (eval_out / INPUTS_FILE).write_text(json.dumps(inputs, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if doc_qa is not None and not personal:  # kept with the version: its users' personal gates ask them too
            keep_held_out_questions(doc_qa, eval_out / GATE_QUESTIONS)
    version = registry.register(adapter_dir, parent=parent, gate="passed" if passed else "failed",
                                metrics=verdict.get("headline") or {}, report_dir=eval_out, job_id=job_id,
                                dataset=snapshot.name, note=verdict.get("reason"), move=True)
    _retitle_report(version)
    promoted = False
    if passed and options.auto_promote:
        t0 = time.perf_counter()
        registry.promote(version.name, services, actor=actor or "auto-promotion",
                         reason=f"gate passed: {verdict.get('reason')}")
        timings["promote"] = round(time.perf_counter() - t0, 3)
        promoted = True
    pruned = registry.prune(options.keep_last)
    if personal:
        pruned += enforce_disk(services, options.user_id)
    if pruned:
        hooks.event("log", {"message": f"pruned old adapter versions {pruned}"})
    status = "promoted" if promoted else ("registered" if passed else "rejected")
    hooks.event("phase", {"phase": "done", "fraction": 1.0, "status": status, "candidate": version.name})
    return CycleResult(status=status, dataset=snapshot.name, candidate=version.name, parent=parent, passed=passed,
                       reason=str(verdict.get("reason")), promoted=promoted, headline=verdict.get("headline") or {},
                       timings=timings, train=_train_summary(train_result), synth=synth_info)


# ------------------------------------------------------------------------------------------ steps
INPUTS_FILE = "inputs.json"  # in a version's eval/ folder: `cycle_inputs` of the cycle that made it


def cycle_inputs(settings: Settings, snapshot: Path, train_cfg: TrainConfig, init_from: str | None,
                 judged_against: str | None, gate_cfg: GateConfig, eval_from: Path | None,
                 questions: Path | None = None) -> dict[str, Any]:
    """Everything that decides a candidate and its verdict, without paths: the dataset's content, the training
    options, the adapter it starts from, the adapter and the gate it is judged with, and the held-out document
    questions' dataset. Two cycles with equal inputs train the same adapter (fixed seeds) and get the same verdict."""
    def content(folder: Path | None) -> str | None:
        manifest = folder / "manifest.json" if folder else None
        if manifest is None or not manifest.is_file():
            return None
        return json.loads(manifest.read_text(encoding="utf-8")).get("content_sha256")

    train = {k: v for k, v in train_cfg.to_dict().items() if k not in ("base_model", "init_adapter", "threads")}
    out = {"base_model": settings.model, "dataset": content(snapshot), "train": train, "init_from": init_from,
           "judged_against": judged_against, "gate": gate_cfg.to_dict(), "gate_rules": RULES_VERSION,
           "eval_data": content(eval_from)}
    if questions is not None:
        out["gate_questions"] = hashlib.sha256(questions.read_bytes()).hexdigest()
    return out


GATE_QUESTIONS = "doc_qa.jsonl"  # a version's held-out document questions, kept in its evaluation folder


def keep_held_out_questions(doc_qa: Path, dest: Path) -> None:
    """The held-out rows of a gate's document questions (those that decide), to `dest`."""
    rows = [line for line in doc_qa.read_text(encoding="utf-8").splitlines()
            if line.strip() and (json.loads(line).get("split") or "held-out") == "held-out"]
    if rows:
        dest.write_text("\n".join(rows) + "\n", encoding="utf-8")


def _gate_questions(shared: Registry, version: str | None) -> Path | None:
    """The held-out document questions the shared `version` was judged on, or None (no version, or one
    registered before they were kept)."""
    if version is None:
        return None
    try:
        path = shared.get(version).eval_dir / GATE_QUESTIONS
    except UnknownVersion:
        return None
    return path if path.is_file() else None


def refused_twin(registry: Registry, inputs: dict[str, Any]) -> AdapterVersion | None:
    """The latest candidate the gate refused whose cycle had exactly these inputs (None when there is none, or
    when the inputs cannot be compared: a dataset without a content hash)."""
    if inputs.get("dataset") is None:
        return None
    for v in sorted(registry.list(), key=lambda v: v.created_at, reverse=True):
        if v.gate != "failed":
            continue
        recorded = v.eval_dir / INPUTS_FILE
        try:
            if recorded.is_file() and json.loads(recorded.read_text(encoding="utf-8")) == inputs:
                return v
        except (OSError, json.JSONDecodeError):
            continue
    return None


def _serving_precision(settings: Settings) -> tuple[str, str]:
    """Device and dtype the server generates with: the gate judges the candidate on the server's device, and in
    its dtype unless the gate's `precision` asks for float32."""
    import torch

    from assistant.models import resolve_device, resolve_dtype

    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    return device.type, {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32")


def _check_evaluable(snapshot: Path) -> None:
    from training.evaluate import EvalDataError, load_eval_set

    try:
        load_eval_set(snapshot)
    except EvalDataError as e:
        raise CycleFailed(
            f"dataset {snapshot.name} has no held-out rows to judge a candidate on, so nothing was trained. "
            "Collect feedback in a few more conversations: held-out examples come from whole conversations.") from e


def _anchor(services: Services, options: CycleOptions, progress: Callable[[int, int], None]) -> Any:
    """`training.anchor.AnchorReport` for this cycle's replay, or None (no backend, no replay, or off)."""
    from training.anchor import anchored_replay
    from training.dataset_build import DEFAULT_REPLAY

    backend = getattr(services, "backend", None)
    if (not options.anchor_replay or backend is None or options.dataset
            or build_options(options.build).replay_ratio == 0):
        return None
    settings = services.settings
    return anchored_replay(backend, DEFAULT_REPLAY, settings.system_prompt, settings.home / "cache" / "anchors",
                           progress=progress)


def _dataset(settings: Settings, store: Store, options: CycleOptions, knowledge: KnowledgeBase | None = None,
             replay_path: Path | None = None) -> Path:
    from training.dataset_build import build_datasets

    root = settings.datasets_dir if options.user_id is None else settings.personal_datasets_dir / str(options.user_id)
    if options.dataset:
        path = root / options.dataset
        if not (path / "manifest.json").is_file():
            raise CycleFailed(f"dataset snapshot {options.dataset} does not exist in {settings.datasets_dir}")
        return path
    try:
        opts = build_options(options.build)
        if replay_path is not None:
            opts = replace(opts, replay_path=replay_path)
        result = build_datasets(store, settings, opts, knowledge=knowledge, owner_id=options.user_id)
    except ValueError as e:
        raise CycleFailed(f"dataset build refused its options: {e}") from e
    return result.path


# Dataset build options an admin may set from the API / UI / schedule (plain values only).
BUILD_OPTION_KEYS = ("split_ratios", "context_messages", "near_dup_threshold", "include_teacher",
                     "max_synthetic_share", "synthetic_floor", "replay_ratio", "heldout_min_rows",
                     "heldout_max_per_kind", "refreeze_heldout", "distractor_passages", "abstain_rows",
                     "max_style_share", "title_negatives")


def build_options(overrides: dict[str, Any] | None) -> Any:
    """`training.dataset_build.BuildOptions` from plain overrides; ValueError names unknown keys."""
    from training.dataset_build import BuildOptions

    data = dict(overrides or {})
    unknown = sorted(set(data) - set(BUILD_OPTION_KEYS))
    if unknown:
        raise ValueError(f"unknown dataset build options {unknown}; known: {list(BUILD_OPTION_KEYS)}")
    if "split_ratios" in data:
        if not isinstance(data["split_ratios"], list | tuple) or len(data["split_ratios"]) != 3:
            raise ValueError("split_ratios must be three numbers (train, validation, test)")
        data["split_ratios"] = tuple(float(x) for x in data["split_ratios"])
    opts = BuildOptions(**data)
    opts.validate()
    return opts


TEACHER_OPTION_KEYS = ("candidates", "question_samples", "temperature", "top_p", "question_max_tokens",
                       "answer_max_tokens", "dpo_margin", "seed", "extract", "extract_wins_ties")


def teacher_options(overrides: dict[str, Any] | None) -> Any:
    """`training.teacher.TeacherOptions` from plain overrides; ValueError names unknown or bad values."""
    from training.teacher import TeacherOptions

    data = dict(overrides or {})
    unknown = sorted(set(data) - set(TEACHER_OPTION_KEYS))
    if unknown:
        raise ValueError(f"unknown teacher options {unknown}; known: {list(TEACHER_OPTION_KEYS)}")
    for key in ("candidates", "question_samples", "question_max_tokens", "answer_max_tokens"):
        least = 0 if key == "candidates" else 1  # no samples: the extract alone answers (docs/teacher.md)
        if key in data and (not isinstance(data[key], int) or isinstance(data[key], bool) or data[key] < least):
            raise ValueError(f"teacher option {key} must be a whole number >= {least}, got {data[key]!r}")
    return TeacherOptions(**data)


def _synth(services: Services, options: CycleOptions, progress: Callable[[int, int], None]) -> dict[str, Any]:
    from training.synth import SyntheticPairs, chunks_from_folder, chunks_from_knowledge, pick_chunks, run_synth
    from training.teacher import self_teacher

    backend = getattr(services, "backend", None)
    if backend is None:
        raise CycleFailed("synthetic generation needs the model backend (run it in the server or the bench)")
    if options.synth_docs:
        chunks = chunks_from_folder(Path(options.synth_docs))
    else:
        kb = services.knowledge
        admin = _first_admin(services.store)
        if kb is None or admin is None:
            raise CycleFailed("synthetic generation from the knowledge base needs a knowledge base and an admin user")
        chunks = chunks_from_knowledge(kb, admin)
    chunks = pick_chunks(chunks, options.synth_max_chunks, SyntheticPairs(services.store).read_chunks())
    if not chunks:
        raise CycleFailed("no document chunks to generate synthetic pairs from")
    teacher = self_teacher(backend, options=teacher_options(options.teacher))
    report = run_synth(services.store, teacher, chunks,
                       questions_per_chunk=options.synth_questions_per_chunk,
                       progress=lambda done, total, _pairs: progress(done, total))
    return {"chunks": report.chunks, "pairs": report.pairs, "accepted": report.accepted,
            "dpo_pairs": report.dpo_pairs, "accepted_extracts": report.accepted_extracts,
            "seconds": round(report.seconds, 2)}


def _first_admin(store: Store) -> User | None:
    return next((u for u in store.list_users() if u.is_admin), None)


def _latest_shared_snapshot(settings: Settings) -> Path | None:
    from training.snapshots import latest_snapshot

    return latest_snapshot(settings)


def _doc_qa_file(services: Services, snapshot: Path, work: Path,
                 passage_for: Callable[[dict[str, Any]], tuple[str, str] | None] | None,
                 extra: str | None = None) -> Path | None:
    """Held-out teacher rows (document questions) with their source passage and title, then the curated
    `extra` questions, for the grounded check. The teacher's rows come first: they are the loop's own
    held-out questions, and the gate's `max_doc_qa` must not cut them off behind a long curated file."""
    out: list[dict[str, Any]] = []
    rows_path = snapshot / "heldout" / "sft.jsonl"
    finder = passage_for or _kb_passages(services)
    lines = rows_path.read_text(encoding="utf-8").splitlines() if rows_path.is_file() and finder else []
    for line in lines:
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("source") != "teacher" or not row.get("messages"):
            continue
        found = finder(row)
        msgs = row["messages"]
        question = next((m["content"] for m in msgs if m["role"] == "user"), None)
        answer = next((m["content"] for m in reversed(msgs) if m["role"] == "assistant"), None)
        if found and question and answer:
            title, passage = found
            out.append({"question": question, "passage": passage, "title": title, "answer": answer,
                        "source": f"{row.get('doc_id')}#{row.get('chunk_id')}"})
    if extra is not None:
        from training.evaluate import doc_qa_item, read_jsonl

        for row in read_jsonl(Path(extra), ("question",)):
            doc_qa_item(row)  # refuse a malformed curated question here, with its message
            out.append(row)
    if not out:
        return None
    path = work / "doc_qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in out), encoding="utf-8")
    return path


def _kb_passages(services: Services) -> Callable[[dict[str, Any]], tuple[str, str] | None] | None:
    kb = services.knowledge
    if kb is None:
        return None

    def find(row: dict[str, Any]) -> tuple[str, str] | None:
        # Shared documents only, as the dataset builder reads passages for training rows.
        chunk_id = row.get("chunk_id")
        return kb.shared_chunks([str(chunk_id)]).get(str(chunk_id)) if chunk_id else None

    return find


def folder_passages(folder: Path | str) -> Callable[[dict[str, Any]], tuple[str, str] | None]:
    """Passage finder for teacher rows made from a documents folder (`training.synth.chunks_from_folder`)."""
    from training.synth import chunks_from_folder

    by_id = {(c.doc_id, str(c.chunk_id)): (c.title, c.text) for c in chunks_from_folder(Path(folder))}
    return lambda row: by_id.get((str(row.get("doc_id")), str(row.get("chunk_id"))))


def _retitle_report(version: AdapterVersion) -> None:
    """The report was written before the candidate had a version name; put the name in."""
    p = version.eval_dir / "report.json"
    if not p.is_file():
        return
    from training.evaluate import plot_report, render_markdown

    data = json.loads(p.read_text(encoding="utf-8"))
    data["candidate"] = version.name
    p.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    (version.eval_dir / "report.md").write_text(render_markdown(data), encoding="utf-8")
    plot_report(data, version.eval_dir / "report.png")


def _train_summary(result: dict[str, Any]) -> dict[str, Any]:
    stages = result.get("stages") or []
    return {"seconds": result.get("seconds"), "runtime": result.get("runtime"),
            "stages": [{k: s.get(k) for k in ("stage", "status", "train_rows", "steps", "first_loss", "last_loss",
                                               "best_eval_loss", "seconds", "tokens_per_s",
                                               "peak_rss_gib")} for s in stages]}


def _describe_exit(done: ChildExit) -> str:
    code = done.code
    if code >= 0:
        return f"exit code {code}"
    try:
        text = f"killed by signal {signal.Signals(-code).name}"
    except ValueError:
        text = f"killed by signal {-code}"
    if -code == signal.SIGKILL and done.peak_rss_bytes:
        # The kernel's out-of-memory killer sends SIGKILL and leaves no message in the child's output.
        total = _memory_total()
        text += f"; it held {done.peak_rss_bytes / 2**30:.1f} GiB"
        if total:
            text += f" of this machine's {total / 2**30:.1f} GiB"
            if done.peak_rss_bytes > 0.5 * total:
                text += ": most likely out of memory (the kernel's OOM killer); a smaller micro_batch_size " \
                        "or max_length needs less"
    return text


def _memory_total() -> int | None:
    return _proc_kb(Path("/proc/meminfo"), "MemTotal:")


_BAR = re.compile(r"\d+%\|.*\|")  # tqdm's "45%|████▌     | 9/20"


def is_noise(line: str) -> bool:
    """A child's stderr line nobody reads: empty, a warning, or a progress bar (tqdm redraws with \\r)."""
    return (not line.strip() or "Warning" in line or "warnings.warn" in line or "\r" in line
            or "it/s]" in line or "s/it]" in line or "examples/s]" in line or bool(_BAR.search(line)))


def _last_lines(lines: list[str], n: int = 5) -> str:
    """The child's last meaningful stderr lines: no warnings, no progress bars."""
    kept = [ln for ln in lines if not is_noise(ln)]
    return " | ".join(kept[-n:]) or "no output"
