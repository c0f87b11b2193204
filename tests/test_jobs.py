"""Retraining jobs and the scheduler, for real: logged feedback in SQLite -> dataset -> training and
evaluation child processes on the tiny model -> registered, promoted and hot-swapped adapter. Also one
job at a time, cancel from another process, a SIGKILLed trainer (serving untouched, job failed), and
start-up recovery of a job a crash left running."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from assistant.config import Settings
from assistant.server import build_services
from memory.db import utcnow, write_transaction
from memory.schema import training_jobs
from tests.conftest import make_random_adapter
from training.jobs import JobBusy, JobRunner, NotReady, runner_for
from training.loop import CycleOptions, teacher_options
from training.registry import Registry
from training.scheduler import LoopSettings, LoopState, Scheduler, due, load_loop_settings, save_loop_settings

CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"), ("Japan", "Tokyo"),
            ("Egypt", "Cairo"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Kenya", "Nairobi"), ("Norway", "Oslo"),
            ("Sweden", "Stockholm"), ("Poland", "Warsaw"), ("Greece", "Athens"), ("Turkey", "Ankara"),
            ("India", "New Delhi"), ("China", "Beijing"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"),
            ("Brazil", "Brasilia"), ("Cuba", "Havana"), ("Ireland", "Dublin"), ("Austria", "Vienna"),
            ("Hungary", "Budapest"), ("Portugal", "Lisbon"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
            ("Belgium", "Brussels"), ("Russia", "Moscow"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi")]
BUILD = {"split_ratios": [0.6, 0.1, 0.3], "heldout_min_rows": 10, "replay_ratio": 0.0}
QUICK = {"max_steps": 10, "sft_learning_rate": 1e-2, "dpo_learning_rate": 1e-3, "evals_per_epoch": 1,
         "lora_r": 16, "lora_alpha": 32}
# The capitals have no documents, and 30 conversations leave about 9 held-out ones: the gate is set to judge held-out
# loss at that size (the default gate declines there: tests/test_evaluate.py), so the machinery can be watched here.
LOSS_GATE = {"target_metrics": ["val_loss", "pref_accuracy"], "gain_metrics": ["val_loss"], "gain_significance": 0.0,
             "min_sft_rows": 1, "min_pair_rows": 1, "min_liked_correct_rows": 1}
LONG = {"stages": ["sft"], "max_steps": 5000, "evals_per_epoch": 0}  # runs until it is stopped
SMALL_BUILD = {"replay_ratio": 0.0, "split_ratios": [0.5, 0.1, 0.4]}  # a dozen conversations still leave held-out rows


def seed_feedback(store, n: int = len(CAPITALS)) -> None:
    """Users edited vague answers into the right one: SFT targets and DPO pairs."""
    user = store.create_user("alice", "pw-alice")
    for country, city in CAPITALS[:n]:
        conv = store.create_conversation(user.id, country)
        _, a = store.add_turn(conv.id, f"What is the capital of {country}?", "I am not sure about that.")
        store.add_edit(user.id, a.id, f"The capital of {country} is {city}.")


@pytest.fixture
def services(home: Path, learnable_tiny_model_dir: Path):
    s = Settings.load(env={}, home=home, model=str(learnable_tiny_model_dir), torch_threads=1)
    svc = build_services(s, with_agent=False)
    yield svc
    runner = svc.jobs
    if runner is not None:  # never leave a job thread (and its child) behind
        for job in runner.list():
            if job.active:
                runner.cancel(job.id)
                runner.wait(job.id, 60)
    svc.close()


def wait_for(predicate, timeout: float = 180, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out waiting")


def training_child(runner: JobRunner, job_id: int) -> int:
    """pid of the job's training process, once it has reported a training step."""
    def ready():
        job = runner.get(job_id)
        assert job.status in ("queued", "running"), (job.status, job.error)
        return job.pid if job.pid and runner.events(job_id, kinds=("progress",)) else None
    return wait_for(ready, timeout=240)


def test_scheduler_starts_a_cycle_that_trains_evaluates_registers_and_promotes(services) -> None:
    seed_feedback(services.store)
    save_loop_settings(services.store, {"enabled": True, "mode": "feedback", "min_new_feedback": 20,
                                        "min_interval_hours": 1, "train": QUICK, "build": BUILD, "gate": LOSS_GATE},
                       by="root")
    sched = Scheduler(services, poll_s=3600)
    first = sched.tick()
    assert first["due"] and first["reason"] == "30 new feedback" and first["started_job"] == 1
    runner = runner_for(services)
    assert sched.tick()["reason"] == "job 1 is running"
    job = runner.wait(1, timeout=600)
    assert job.status == "succeeded", job.error
    assert job.params["train"] == QUICK and job.params["build"] == BUILD  # from the stored settings
    result = job.result
    assert result["status"] == "promoted" and result["candidate"] == "v0001" and result["passed"]
    assert job.progress["phase"] == "done" and job.progress["fraction"] == 1.0 and job.pid is None
    assert job.trigger == "schedule" and job.requested_by == "scheduler"
    assert {"dataset", "train", "evaluate"} <= set(result["timings"])
    assert [s["stage"] for s in result["train"]["stages"]] == ["sft", "dpo"]

    # progress lines streamed into the store: phases, steps with losses, evaluation steps
    phases = [e.data["phase"] for e in runner.events(1, kinds=("phase",))]
    assert phases == ["dataset", "train", "evaluate", "register", "done"]
    progress = runner.events(1, kinds=("progress",))
    assert progress and all("step" in e.data and "eta_s" in e.data for e in progress)
    curve = runner.loss_curve(1)
    assert {p["series"] for p in curve} >= {"sft loss", "dpo loss"}
    assert {e.data["model"] for e in runner.events(1, kinds=("eval",))} == {"base", "candidate"}
    assert (runner.job_dir(1) / "job.log").stat().st_size > 0

    # registered with its report and provenance, promoted, hot-swapped into the running backend
    reg: Registry = services.registry
    v = reg.get("v0001")
    assert v.gate == "passed" and v.job_id == 1 and v.dataset == result["dataset"] and v.parent is None
    assert (v.adapter_dir / "train_config.json").is_file() and (v.adapter_dir / "dataset_manifest.json").is_file()
    report = v.report()
    assert report["candidate"] == "v0001" and report["decision"]["passed"]
    # judged in float32 whatever the server's dtype: greedy answers must not depend on their batch-mates
    assert report["precision"] == "cpu float32" and report["gate"]["precision"] == "float32"
    assert (v.eval_dir / "report.md").read_text().startswith("# Evaluation: v0001 vs the base model")
    assert "(cpu float32)." in (v.eval_dir / "report.md").read_text()
    assert reg.serving() == "v0001" and services.chat.serving_adapter == "v0001"
    assert services.backend.has_adapter("v0001")
    ev = reg.history()[-1]
    assert (ev.action, ev.version, ev.actor) == ("promote", "v0001", "scheduler")

    # not due again: no new feedback since the job started, and the interval has not passed
    again = sched.tick()
    assert not again["due"] and again["reason"] == "0/20 new feedback"


def test_one_job_at_a_time_even_across_processes(services) -> None:
    seed_feedback(services.store, 12)
    runner = runner_for(services)
    job = runner.start({"train": LONG, "build": SMALL_BUILD}, requested_by="root")
    other_process = JobRunner(services)  # a CLI beside the server: same database, different runner
    with pytest.raises(JobBusy, match=f"job {job.id} is (queued|running)"):
        other_process.start({}, requested_by="bob")
    with pytest.raises(JobBusy):
        runner.start({})
    # the database itself refuses a second active job, whatever the code above checked
    with pytest.raises(sa.exc.IntegrityError), write_transaction(services.store.engine) as conn:
        conn.execute(training_jobs.insert().values(kind="retrain", status="queued", trigger="manual", params={},
                                                   progress={}, result={}, cancel_requested=False,
                                                   created_at=utcnow()))
    pid = training_child(runner, job.id)
    other_process.cancel(job.id, by="bob")  # recorded in the store; the owning runner picks it up
    done = runner.wait(job.id, timeout=120)
    assert done.status == "cancelled" and done.cancel_requested and done.error == "training was cancelled"
    assert wait_for(lambda: not _alive(pid), timeout=60)
    assert Registry(services.settings, services.store).list() == []
    assert runner.start({"train": LONG, "build": SMALL_BUILD}).status in ("queued", "running")  # free again


def test_sigkilled_training_leaves_serving_untouched_and_fails_the_job(services, learnable_tiny_model_dir,
                                                                      tmp_path) -> None:
    seed_feedback(services.store, 12)
    reg = Registry(services.settings, services.store)
    services.registry = reg
    serving = reg.register(make_random_adapter(learnable_tiny_model_dir, tmp_path / "serving", seed=5),
                           gate="passed").name
    reg.promote(serving, services)
    runner = runner_for(services)
    job = runner.start({"train": LONG, "build": SMALL_BUILD}, requested_by="root")
    pid = training_child(runner, job.id)
    os.kill(pid, signal.SIGKILL)
    done = runner.wait(job.id, timeout=120)
    assert done.status == "failed" and "killed by signal SIGKILL" in done.error, done.error
    # The child's memory is named, as an out-of-memory kill leaves no message of its own.
    assert re.search(r"it held \d+\.\d GiB of this machine's \d+\.\d GiB", done.error), done.error
    assert done.progress["phase"] == "failed" and done.pid is None and done.finished_at is not None
    assert reg.serving() == serving and services.chat.serving_adapter == serving
    assert [v.name for v in reg.list()] == [serving]
    # the server still answers with the serving adapter
    from assistant.chat import TurnRequest

    user = services.store.get_user_by_name("alice")
    reply = services.chat.reply(TurnRequest(user=user, text="Hello?", max_tokens=4, temperature=0)).drain()
    assert reply.adapter == serving and reply.assistant_message is not None


def test_start_up_recovery_marks_orphaned_jobs_failed_and_stops_their_child(services) -> None:
    runner = JobRunner(services)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # an orphaned "training process": its command line names training.train, in its own group
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "training.train"],
                              start_new_session=True)
    # Until the child has exec'd, its /proc cmdline is still ours: recovery rightly leaves such a pid alone.
    wait_for(lambda: b"training.train" in Path(f"/proc/{orphan.pid}/cmdline").read_bytes(), timeout=30, every=0.02)
    host = __import__("socket").gethostname()
    with write_transaction(services.store.engine) as conn:
        conn.execute(training_jobs.insert().values(
            kind="retrain", status="running", trigger="manual", params={}, result={}, cancel_requested=False,
            progress={"phase": "train", "runner": {"host": host, "pid": dead.pid}}, pid=orphan.pid,
            created_at=utcnow(), started_at=utcnow(), heartbeat_at=utcnow()))
    assert runner.recover() == [1]
    job = runner.get(1)
    assert job.status == "failed" and job.error.startswith("interrupted: the process running this job stopped")
    assert job.progress["phase"] == "failed" and job.pid is None
    assert orphan.wait(timeout=10) == -signal.SIGKILL
    assert runner.recover() == []  # idempotent


def test_recovery_leaves_a_live_runner_alone_until_its_heartbeat_stops(services) -> None:
    runner = JobRunner(services)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = __import__("socket").gethostname()
        with write_transaction(services.store.engine) as conn:
            conn.execute(training_jobs.insert().values(
                kind="retrain", status="running", trigger="cli", params={}, result={}, cancel_requested=False,
                progress={"runner": {"host": host, "pid": live.pid}}, created_at=utcnow(), heartbeat_at=utcnow()))
        assert runner.recover() == [] and runner.get(1).status == "running"
        with write_transaction(services.store.engine) as conn:
            conn.execute(training_jobs.update().values(heartbeat_at=utcnow() - timedelta(minutes=5)))
        assert runner.recover() == [1]
    finally:
        live.kill()
        live.wait()


def test_bad_options_are_refused_before_anything_is_recorded(services) -> None:
    runner = runner_for(services)
    for options, msg in (({"epochs": 3}, "unknown retrain options"), ({"train": {"lora_r": "8"}}, "lora_r"),
                         ({"train": {"base_model": "/etc"}}, "may not set"), ({"gate": {"x": 1}}, "unknown gate"),
                         ({"build": {"split_ratios": [1, 1]}}, "split_ratios"), ({"keep_last": 0}, "keep_last"),
                         ({"teacher": {"candidates": -1}}, "candidates"),
                         ({"teacher": {"judge": 1}}, "unknown teacher"),
                         ({"build": {"distractor_passages": 2.5}}, "distractor_passages"),
                         ({"build": {"abstain_rows": 2}}, "abstain_rows"),
                         ({"build": {"max_style_share": -1}}, "max_style_share")):
        with pytest.raises(ValueError, match=msg):
            runner.start(options)
    assert runner.list() == []
    assert CycleOptions.from_dict({"train": {"max_steps": 3}}).train == {"max_steps": 3}
    assert teacher_options(CycleOptions.from_dict({"teacher": {"candidates": 2}}).teacher).candidates == 2
    rows = {"distractor_passages": 3, "abstain_rows": 0.2, "max_style_share": 0.4}  # issue 26's candidates
    assert CycleOptions.from_dict({"build": rows}).build == rows


# ---------------------------------------------------------------------------------------------- schedule rules
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def test_due_rules() -> None:
    on = LoopSettings(enabled=True, min_new_feedback=10, min_interval_hours=6)
    assert due(LoopSettings(), LoopState(None, 999, None), NOW) == (False, "automatic retraining is off")
    assert due(on, LoopState(None, 9, None), NOW) == (False, "9/10 new feedback")
    assert due(on, LoopState(None, 10, None), NOW) == (True, "10 new feedback")
    assert due(on, LoopState(NOW - timedelta(hours=2), 50, None), NOW) == (
        False, "enough feedback, next retrain allowed in 4.0 h")
    assert due(on, LoopState(NOW - timedelta(hours=7), 50, None), NOW)[0]
    assert due(on, LoopState(NOW, 50, 4), NOW) == (False, "job 4 is running")
    every = LoopSettings(enabled=True, mode="interval", every_hours=12)
    assert due(every, LoopState(NOW - timedelta(hours=11), 0, None), NOW) == (False, "next retrain in 1.0 h")
    assert due(every, LoopState(NOW - timedelta(hours=12), 0, None), NOW)[0]
    daily = LoopSettings(enabled=True, mode="daily", daily_at="03:30")
    assert due(daily, LoopState(NOW - timedelta(hours=2), 0, None), NOW) == (
        False, "next retrain at 2026-11-23 03:30 UTC")  # ran at 10:00, after today's slot
    assert due(daily, LoopState(NOW - timedelta(days=1), 0, None), NOW) == (True, "daily at 03:30 UTC")
    early = NOW.replace(hour=2)  # before today's slot: yesterday's slot counts
    assert due(daily, LoopState(early - timedelta(hours=24), 0, None), early)[0]  # last ran before 03:30
    assert not due(daily, LoopState(early - timedelta(hours=1), 0, None), early)[0]


def test_schedule_settings_are_validated_and_stored(store) -> None:
    assert load_loop_settings(store) == LoopSettings()
    saved = save_loop_settings(store, {"enabled": True, "mode": "daily", "daily_at": "04:15"}, by="root")
    assert load_loop_settings(store) == saved and saved.daily_at == "04:15" and saved.mode == "daily"
    for changes, msg in (({"daily_at": "25:00"}, "daily_at"), ({"mode": "hourly"}, "mode"),
                         ({"min_new_feedback": 0}, "min_new_feedback"), ({"every_hours": 0}, "every_hours"),
                         ({"train": {"nope": 1}}, "unknown training config keys"), ({"colour": "red"}, "unknown"),
                         ({"enabled": "yes"}, "enabled")):
        with pytest.raises(ValueError, match=msg):
            save_loop_settings(store, changes)
    assert load_loop_settings(store) == saved  # nothing half-saved
    assert set(LoopSettings.help()) == set(saved.to_dict())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_grounded_questions_come_from_held_out_teacher_rows_and_a_curated_file(tmp_path: Path) -> None:
    from dataclasses import replace
    from types import SimpleNamespace

    from training.evaluate import EvalDataError, grounded_prompt, load_eval_set
    from training.loop import _doc_qa_file, folder_passages, keep_held_out_questions
    from training.synth import chunks_from_folder

    docs = Path(__file__).parent / "data" / "docs"
    chunk = next(c for c in chunks_from_folder(docs) if c.doc_id == "pricing")
    snap = tmp_path / "snap"
    (snap / "heldout").mkdir(parents=True)
    rows = [{"source": "teacher", "doc_id": "pricing", "chunk_id": chunk.chunk_id,
             "messages": [{"role": "user", "content": "How much does the Team plan cost?"},
                          {"role": "assistant", "content": "The Team plan costs 8 dollars per member per month."}]},
            {"source": "human", "doc_id": None, "chunk_id": None,
             "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
            {"source": "teacher", "doc_id": "gone", "chunk_id": "0",  # its document was deleted: left out
             "messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]}]
    (snap / "heldout" / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    curated = tmp_path / "curated.jsonl"
    curated.write_text(json.dumps({"question": "Where is Brightleaf Labs based?", "passage": "It is in Busan.",
                                   "key_facts": ["Busan"]}) + "\n")
    services = SimpleNamespace(knowledge=None)
    path = _doc_qa_file(services, snap, tmp_path, folder_passages(docs), str(curated))
    es = load_eval_set(snap, path)
    # the loop's own held-out questions first, then the curated ones
    assert [q.question for q in es.doc_qa] == ["How much does the Team plan cost?", "Where is Brightleaf Labs based?"]
    teacher_q = es.doc_qa[0]
    assert teacher_q.passage == chunk.text and "dollars" in teacher_q.key_facts
    # asked under its document's title, as retrieval serves it
    assert teacher_q.title == chunk.title == "Lumen Desk plans and pricing"
    user_turn = grounded_prompt(teacher_q)[-1]["content"]
    assert '[1] "Lumen Desk plans and pricing" (shared document)' in user_turn
    # a curated question without a title is shown under its source, as before
    assert '[1] "pricing#0" (shared document)' in grounded_prompt(replace(teacher_q, title=""))[-1]["content"]
    assert len(es.sft) == 3  # the same rows still count for the held-out loss
    # the version keeps the held-out ones (those that decide) for its users' personal gates; trained ones stay out
    with curated.open("a") as f:
        f.write(json.dumps({"question": "What does Team cost?", "passage": "8 dollars.", "key_facts": ["8"],
                            "split": "trained"}) + "\n")
    path = _doc_qa_file(services, snap, tmp_path, folder_passages(docs), str(curated))
    keep_held_out_questions(path, tmp_path / "kept.jsonl")
    assert [q.question for q in load_eval_set(snap, tmp_path / "kept.jsonl").doc_qa] == [
        "How much does the Team plan cost?", "Where is Brightleaf Labs based?"]
    assert _doc_qa_file(services, snap, tmp_path, None) is None  # no passages, no curated file: not measured
    curated.write_text(json.dumps({"question": "Q?", "passage": "P."}) + "\n")
    with pytest.raises(EvalDataError, match="no key facts"):
        _doc_qa_file(services, snap, tmp_path, None, str(curated))


def test_replay_is_anchored_to_the_base_model_before_the_build(services) -> None:
    """A cycle with general replay first asks the serving backend (adapter off) for its own answers to the
    replay questions; the snapshot's replay rows come from that file (training/anchor.py)."""
    seed_feedback(services.store)
    runner = runner_for(services)
    job = runner.wait(runner.start({"build": {**BUILD, "replay_ratio": 0.5}, "train": QUICK}).id, timeout=600)
    assert job.status == "succeeded", job.error
    assert "anchor" in job.result["timings"]
    logs = [e.data["message"] for e in runner.events(job.id, kinds=("log",))]
    assert any(m.startswith("replay anchored to the base model: ") and "of 120 general questions" in m
               for m in logs), logs
    anchored = list((services.settings.home / "cache" / "anchors").glob("replay-*.jsonl"))
    assert len(anchored) == 1
    manifest = json.loads((services.settings.datasets_dir / job.result["dataset"] / "manifest.json").read_text())
    assert manifest["replay"]["path"] == str(anchored[0]) and manifest["replay"]["used"] > 0
    answers = {json.loads(line)["messages"][-1]["content"] for line in anchored[0].read_text().splitlines()}
    snapshot = services.settings.datasets_dir / job.result["dataset"]
    train = [json.loads(line) for line in (snapshot / "jsonl" / "sft.train.jsonl").read_text().splitlines()]
    replayed = [r["messages"][-1]["content"] for r in train if r["origin"] == "replay"]
    assert len(replayed) == manifest["replay"]["used"] and set(replayed) <= answers


def test_a_retrain_on_what_the_gate_already_refused_is_skipped(services) -> None:
    """Training is deterministic: a cycle whose data, options, starting adapter and gate equal those of a refused
    candidate ends before training ("unchanged"), and new feedback trains again."""
    seed_feedback(services.store)
    runner = runner_for(services)
    refusing = {**LOSS_GATE, "min_val_loss_gain": 100.0}  # no candidate can gain that much
    opts = {"build": BUILD, "train": QUICK, "gate": refusing}
    first = runner.wait(runner.start(opts).id, timeout=600)
    assert first.status == "succeeded" and first.result["status"] == "rejected", (first.error, first.result)
    v1 = services.registry.get(first.result["candidate"])
    recorded = json.loads((v1.eval_dir / "inputs.json").read_text())
    assert recorded["gate"]["min_val_loss_gain"] == 100.0 and recorded["dataset"]

    again = runner.wait(runner.start(opts).id, timeout=600)
    assert again.status == "succeeded", again.error
    res = again.result
    assert res["status"] == "unchanged" and res["candidate"] == v1.name and not res["passed"], res
    assert res["reason"].startswith(f"nothing new to learn: the data, the training options, the starting adapter "
                                    f"and the gate are those of {v1.name}, which the gate refused (no gain"), res
    assert "train" not in res["timings"] and not runner.events(again.id, kinds=("progress",))
    assert [v.name for v in services.registry.list()] == [v1.name]  # nothing trained, nothing registered

    # one more conversation with feedback: new data, a new candidate
    user = services.store.get_user_by_name("alice")
    conv = services.store.create_conversation(user.id, "Iceland")
    _, a = services.store.add_turn(conv.id, "What is the capital of Iceland?", "I am not sure about that.")
    services.store.add_edit(user.id, a.id, "The capital of Iceland is Reykjavik.")
    third = runner.wait(runner.start(opts).id, timeout=600)
    assert third.status == "succeeded" and third.result["status"] == "rejected", (third.error, third.result)
    assert len(services.registry.list()) == 2 and runner.events(third.id, kinds=("progress",))


def test_too_little_data_is_refused_before_a_job_starts(services) -> None:
    seed_feedback(services.store, 4)  # no test share: nothing would be left to judge a candidate on
    runner = runner_for(services)
    with pytest.raises(NotReady) as refused:
        runner.start({"build": {"split_ratios": [0.9, 0.1, 0.0], "replay_ratio": 0.0}})
    assert "examples it never trained on; there are 0" in str(refused.value)
    assert refused.value.readiness.feedback["edits"] == 4
    assert runner.list() == []  # nothing recorded, nothing run
    assert not any(services.settings.datasets_dir.glob("v0*"))  # not even a dataset was built


def test_start_loop_recovers_restores_and_ticks(services, learnable_tiny_model_dir, tmp_path) -> None:
    from training.scheduler import start_loop

    reg = Registry(services.settings, services.store)
    v = reg.register(make_random_adapter(learnable_tiny_model_dir, tmp_path / "a", seed=3), gate="passed").name
    reg.promote(v)  # recorded by another process: this server has not loaded it yet
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with write_transaction(services.store.engine) as conn:
        conn.execute(training_jobs.insert().values(
            kind="retrain", status="running", trigger="manual", params={}, result={}, cancel_requested=False,
            progress={"runner": {"host": __import__("socket").gethostname(), "pid": dead.pid}},
            created_at=utcnow(), heartbeat_at=utcnow()))
    sched = start_loop(services, poll_s=0.2)
    try:
        assert runner_for(services).get(1).status == "failed"
        assert services.chat.serving_adapter == v and services.backend.has_adapter(v)
        assert services.scheduler is sched and sched.running
        wait_for(lambda: sched.last_check.get("reason") == "automatic retraining is off", timeout=30)
    finally:
        sched.stop()
    assert not sched.running


def test_a_failed_childs_message_names_its_memory_and_drops_progress_bars() -> None:
    from training.loop import ChildExit, _describe_exit, _last_lines, _memory_total

    total = _memory_total()
    assert total and total > 2**30
    oom = _describe_exit(ChildExit(code=-signal.SIGKILL, tail=[], peak_rss_bytes=int(0.9 * total)))
    assert oom.startswith("killed by signal SIGKILL; it held ") and "most likely out of memory" in oom, oom
    small = _describe_exit(ChildExit(code=-signal.SIGKILL, tail=[], peak_rss_bytes=2**30))
    assert "it held 1.0 GiB" in small and "out of memory" not in small, small
    assert _describe_exit(ChildExit(code=-signal.SIGTERM, tail=[], peak_rss_bytes=2**30)) == "killed by signal SIGTERM"
    assert _describe_exit(ChildExit(code=2, tail=[])) == "exit code 2"
    tail = ["Traceback (most recent call last):", "ValueError: the snapshot has no rows",
            "Dropping fully truncated examples from train dataset:   0%|  | 0/42 [00:00<?, ? examples/s]"
            "\rDropping fully truncated examples from train dataset: 100%|##| 42/42 [00:00<00:00, 3810.78 examples/s]",
            "Loading weights: 100%|##| 103/103 [00:00<00:00, 2587.74it/s]", "  warnings.warn("]
    assert _last_lines(tail) == "Traceback (most recent call last): | ValueError: the snapshot has no rows"


def test_a_cancelled_child_that_does_not_stop_is_killed_within_seconds(tmp_path: Path) -> None:
    """Cancel reaches a child stuck in one long step (it ignores SIGTERM, as a trainer finishing its
    optimizer step does): it is killed after the grace period, so "cancel" takes effect within 10 s."""
    from training.loop import CANCEL_GRACE_S, CycleHooks, run_child

    ready = tmp_path / "ready"
    code = (f"import signal, time, pathlib; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            f"pathlib.Path({str(ready)!r}).touch(); time.sleep(120)")
    asked: dict[str, float] = {}

    def should_stop() -> bool:
        if ready.exists() and "at" not in asked:
            asked["at"] = time.monotonic()
        return "at" in asked

    done = run_child([sys.executable, "-c", code], threads=1, hooks=CycleHooks(should_stop=should_stop),
                     on_json=lambda ev: None, cancel_file=tmp_path / "CANCEL")
    took = time.monotonic() - asked["at"]
    assert done.code == -signal.SIGKILL and (tmp_path / "CANCEL").exists()
    assert CANCEL_GRACE_S <= took < 10, f"the child was stopped {took:.1f} s after the cancel"
