"""Personal adapters, for real: each user's own feedback -> their own dataset -> a personal retrain job on the
tiny model -> their own registry -> served to them alone, in the same batch as everyone else. Also: a user's
private data never reaches another user's dataset or the shared one, "forget what you learned from me" and
deleting a user remove every file and row of theirs, nobody reads another user's adapter or report, and
nothing trains for a user who has not opted in."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from assistant.actions.base import NotFound, Operator
from assistant.actions.personal import PersonalActions
from assistant.actions.users import UserAdmin
from assistant.chat import TurnRequest
from assistant.config import Settings
from assistant.server import build_services
from memory.db import utcnow
from memory.schema import adapter_serving, adapter_versions, personal_settings, training_jobs
from tests.conftest import make_random_adapter
from tests.helpers import start_server
from tests.test_jobs import CAPITALS, QUICK
from training.dataset_build import BuildOptions, build_datasets
from training.evaluate import load_eval_set
from training.jobs import NotReady, runner_for
from training.loop import CycleOptions
from training.personal import (
    PERSONAL_BUILD,
    PERSONAL_GATE,
    cycle_options,
    next_personal,
    registry_for,
    sync_personal,
)
from training.personal_data import HELDOUT_FLOOR
from training.registry import Registry
from training.scheduler import Scheduler
from training.snapshots import read_jsonl, write_jsonl

pytestmark = pytest.mark.timeout(900)
ALL_IN_TRAIN = dict(split_ratios=(1.0, 0.0, 0.0), replay_ratio=0.0)
OPERATOR = Operator("cli:test")


def _all_bytes(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else {}


def _feedback(store, user, n: int, tag: str = "") -> list[int]:
    """`n` conversations in which `user` edited a vague answer into the right one (SFT + DPO rows)."""
    out = []
    for country, city in CAPITALS[:n]:
        conv = store.create_conversation(user.id, country)
        _, a = store.add_turn(conv.id, f"What is the capital of {country}?{tag}", "I am not sure about that.")
        out.append(store.add_edit(user.id, a.id, f"The capital of {country} is {city}.{tag}").id)
    return out


def _mixed_feedback(store, user, n: int, tag: str = "", per_conversation: int = 4) -> None:
    """Exactly `n` feedback rows, one per question, in conversations of `per_conversation` questions: every other
    answer edited into the right one (SFT + DPO rows), the others liked as they were (SFT + KTO rows)."""
    conv = None
    for i, (country, city) in enumerate(CAPITALS[:n]):
        if i % per_conversation == 0:
            conv = store.create_conversation(user.id, f"capitals {i}")
        if i % 2 == 0:
            _, a = store.add_turn(conv.id, f"And the capital of {country}?{tag}", f"Maybe a city in {country}.{tag}")
            store.add_edit(user.id, a.id, f"The capital of {country} is {city}.{tag}")
        else:
            _, a = store.add_turn(conv.id, f"And the capital of {country}?{tag}", f"It is {city}.{tag}")
            store.add_thumb(user.id, a.id, 1)


def _assistant_texts(row: dict) -> set[str]:
    return {m["content"] for col in ("messages", "prompt", "chosen", "rejected", "completion")
            for m in row.get(col) or [] if m["role"] == "assistant"}


@pytest.fixture
def services(home: Path, learnable_tiny_model_dir: Path):
    # float32: a mixed batch is compared with each request alone, token for token (tests/conftest.py, tiny_settings)
    s = Settings.load(env={}, home=home, model=str(learnable_tiny_model_dir), torch_threads=1, dtype="float32",
                      personal_adapters=True, personal_min_feedback=10, personal_retrains_per_day=3)
    svc = build_services(s, with_agent=False)
    yield svc
    if svc.jobs is not None:
        for job in svc.jobs.list():
            if job.active:
                svc.jobs.cancel(job.id)
                svc.jobs.wait(job.id, 60)
    svc.close()


# ------------------------------------------------------------------------------------------ privacy
def test_private_data_reaches_only_its_owners_adapter(store, settings, tiny_embedder_dir):
    """Alice's private document and her conversations go into her own personal dataset and nowhere else: not Bob's,
    not the shared one. Memories go into none. The positive control (her own dataset holds her private passage)
    shows the test can fail."""
    from assistant.agent import Agent
    from memory.knowledge import KnowledgeBase
    from memory.longterm import LongTermMemory

    s = settings.model_copy(update={"embedder": str(tiny_embedder_dir)})
    kb = KnowledgeBase(s)
    try:
        agent = Agent(s, store, kb, LongTermMemory(s, store))
        alice, bob = store.create_user("alice", "pw-alice"), store.create_user("bob", "pw-bob")
        kb.ingest(alice, "plans.md", b"# Plans\n\nThe LUMEN-77 plan costs 8 dollars per member per month.",
                  scope="shared")
        kb.ingest(alice, "diary.md", b"# Diary\n\nALICE-PRIVATE-31: my LUMEN-77 invoice is overdue.", scope="private")
        question = "What does the LUMEN-77 plan cost?"
        for who, answer in ((alice, "8 dollars, zebrafinch."), (bob, "Eight dollars a month, quokkabob.")):
            prepared = agent.prepare(who, [], question)
            c = store.create_conversation(who.id, "plans")
            _, a = store.add_turn(c.id, question, answer, sources=prepared.sources,
                                  memories=[{"id": 1, "text": f"MEMORY-{who.username.upper()}-9 likes sailing"}])
            store.add_thumb(who.id, a.id, 1)

        shared = build_datasets(store, s, BuildOptions(**ALL_IN_TRAIN), knowledge=kb)
        mine = build_datasets(store, s, BuildOptions(**ALL_IN_TRAIN), knowledge=kb, owner_id=alice.id)
        theirs = build_datasets(store, s, BuildOptions(**ALL_IN_TRAIN), knowledge=kb, owner_id=bob.id)
        assert mine.path.parent == s.personal_datasets_dir / str(alice.id) and mine.manifest["owner_id"] == alice.id
        assert theirs.manifest["counts"]["sft"]["train"] == 1 and mine.manifest["counts"]["sft"]["train"] == 1

        alice_files = b"".join(_all_bytes(mine.path).values())
        assert b"ALICE-PRIVATE-31" in alice_files and b"zebrafinch" in alice_files  # her own adapter: yes
        assert b"quokkabob" not in alice_files
        bob_files = b"".join(_all_bytes(theirs.path).values())
        assert b"quokkabob" in bob_files
        for data in (bob_files, b"".join(_all_bytes(s.datasets_dir / shared.version).values()),
                     b"".join(_all_bytes(s.datasets_dir / "heldout").values())):
            assert b"ALICE-PRIVATE-31" not in data
        assert b"zebrafinch" not in bob_files
        for data in _all_bytes(s.datasets_dir).values():  # every snapshot, shared and personal
            assert b"MEMORY-ALICE-9" not in data and b"MEMORY-BOB-9" not in data
    finally:
        kb.close()


# ------------------------------------------------------------------------------------------ the split
def test_a_personal_split_holds_out_what_the_gate_needs_and_never_trains_on_it(store, settings) -> None:
    """A user with exactly the feedback a first personal retrain needs, in multi-question conversations: the
    held-out part reaches the floor of answers and pairs (by conversation it was one conversation, and the gate
    declined), no train row of a conversation holds an answer its held-out rows score, and a rebuild reuses the
    frozen set unless it was grouped by conversation."""
    bob = store.create_user("bob", "pw-bob")
    _mixed_feedback(store, bob, settings.personal_min_feedback)  # the default: 20 questions in 5 conversations
    assert store.count_feedback(user_id=bob.id) == settings.personal_min_feedback == 20
    opts = BuildOptions(**{**PERSONAL_BUILD, "split_ratios": tuple(PERSONAL_BUILD["split_ratios"]),
                           "replay_ratio": 0.0})
    first = build_datasets(store, settings, opts, owner_id=bob.id)
    split = first.manifest["personal_split"]
    assert split["held_out_sft"] >= HELDOUT_FLOOR and split["held_out_pairs"] >= HELDOUT_FLOOR
    assert split["held_out_questions"] <= settings.personal_min_feedback // 2
    sizes = load_eval_set(first.path).sizes()
    assert sizes["sft"] >= HELDOUT_FLOOR - 1
    assert len(load_eval_set(first.path).own_choices()) >= PERSONAL_GATE["min_edit_match_rows"]
    held = {k: read_jsonl(first.path / "heldout" / f"{k}.jsonl") for k in ("sft", "dpo", "kto")}
    train = {k: read_jsonl(first.path / "jsonl" / f"{k}.train.jsonl") for k in ("sft", "dpo", "kto")}
    assert first.manifest["heldout"]["frozen"] and all(r["group"].startswith("turn:") for r in held["sft"])
    scored: dict[int, set[str]] = {}
    for r in (r for rows in held.values() for r in rows):
        scored.setdefault(r["conversation_id"], set()).update(_assistant_texts(r))
    trained = [(r["conversation_id"], _assistant_texts(r)) for rows in train.values() for r in rows]
    assert trained and not [c for c, texts in trained if texts & scored.get(c, set())]
    split_convs = {c for c, _ in trained} & set(scored)  # a conversation split between the two...
    dropped = {f["name"]: f["removed"] for f in first.manifest["filters"]["sft"]}.get("heldout_answer_in_context")
    assert split_convs and dropped  # ...whose earlier answers the held-out rows score were left out of training
    assert first.manifest["counts"]["dpo"]["train"] == 0  # fewer than MIN_DPO_PAIRS: no DPO stage

    again = build_datasets(store, settings, opts, owner_id=bob.id)
    assert again.manifest["heldout"]["frozen_by_build"] == first.version  # reused
    heldout_sft = settings.personal_datasets_dir / str(bob.id) / "heldout" / "sft.jsonl"
    old = [{**r, "group": f"conv:{r['conversation_id']}"} for r in read_jsonl(heldout_sft)]
    write_jsonl(heldout_sft, old)  # a set frozen before the split by question
    third = build_datasets(store, settings, opts, owner_id=bob.id)
    assert third.manifest["heldout"]["frozen_by_build"] == third.version
    assert third.manifest["personal_split"]["held_out_pairs"] >= HELDOUT_FLOOR


# ------------------------------------------------------------------------------------------ the cycle
def test_a_personal_retrain_trains_from_the_shared_adapter_judges_and_serves_only_its_user(services, tmp_path):
    store, settings = services.store, services.settings
    alice, bob = store.create_user("alice", "pw-alice"), store.create_user("bob", "pw-bob")
    shared = Registry(settings, store)
    # the shared version keeps the held-out document questions its gate asked; every personal gate asks them too
    judged = tmp_path / "shared-eval"
    judged.mkdir()
    questions = [{"question": f"What colour is lamp {i}?", "passage": f"Lamp {i} of the office is teal.",
                  "title": "Lamps", "key_facts": ["teal"], "split": "held-out"} for i in range(3)]
    (judged / "doc_qa.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    v1 = shared.register(make_random_adapter(Path(settings.model), tmp_path / "shared", seed=5), gate="passed",
                         report_dir=judged).name
    shared.promote(v1, services)
    # exactly what a first retrain needs, one question per conversation as in bench/personal.py: split by
    # conversation, that held out one answer and no pair, and the gate declined every first personal candidate
    _mixed_feedback(store, bob, settings.personal_min_feedback, " Bob", per_conversation=1)
    _feedback(store, alice, 4)
    actions = PersonalActions(services)

    # not opted in: nothing trains, and the scheduler picks nobody
    with pytest.raises(NotReady, match="has not asked for a personal adapter"):
        actions.train(OPERATOR, bob.id, {"train": QUICK})
    assert next_personal(services)[0] is None
    assert not runner_for(services).list()

    st = actions.set_opt_in(bob, True)
    assert st["opted_in"] and st["state"] == "waiting for its turn" and st["readiness"]["ready"]
    assert next_personal(services)[0] == bob.id
    # quick: no replay (anchoring it to the base model means 120 generations), short general answers; the personal
    # gate's own checks otherwise
    quick = {"train": {**QUICK, "stages": ["sft"]}, "build": {"replay_ratio": 0.0}, "anchor_replay": False,
             "gate": {"max_new_tokens": 8}}
    job = actions.train(OPERATOR, bob.id, quick)
    job = runner_for(services).wait(job["id"], timeout=600)
    assert job.status == "succeeded", job.error
    print("personal cycle timings", job.result["timings"], "gate:", job.result["reason"])
    assert job.params["user_id"] == bob.id and job.params["build"] == {**PERSONAL_BUILD, "replay_ratio": 0.0}
    result = job.result
    name = result["candidate"]
    assert name.startswith(f"u{bob.id}-v") and result["parent"] == v1

    mine = registry_for(services, bob.id)
    v = mine.get(name)
    assert v.parent == v1 and v.path.parent == settings.personal_adapters_dir / str(bob.id)
    with pytest.raises(LookupError):
        shared.get(name)  # not a shared version
    assert shared.serving() == v1  # the shared adapter is untouched whatever the gate said
    cfg = (v.adapter_dir / "train_config.json").read_text()
    assert str(shared.get(v1).adapter_dir) in cfg  # trained from the shared adapter's weights
    manifest = (settings.personal_datasets_dir / str(bob.id) / result["dataset"] / "manifest.json").read_text()
    assert '"owner_id": ' + str(bob.id) in manifest
    report = actions.report(bob)
    assert report["version"] == name and report["report"]["baseline"] == v1 and report["reason"]
    # the gate decided (promoted, or refused with a reason), on held-out data it can judge, and says what it can see
    decision = report["report"]["decision"]
    assert not decision["declined"] and not result["reason"].startswith("declined"), result["reason"]
    # on what bob gets: his held-out questions answered by the candidate and the shared adapter, nearer the answers
    # he chose than those he turned down?, and no worse on the shared gate's document questions
    assert not decision["too_small"] and {c["metric"] for c in decision["checks"] if c["kind"] != "forgetting"} == {
        "edit_match", "grounded"}
    assert [c["name"] for c in decision["checks"] if c["kind"] == "gain"] == ["edit_match gain"]
    assert any(p.startswith("edit_match on ") for p in decision["power"])
    metrics = report["report"]["metrics"]
    assert len(metrics["candidate"]["edit_match_scores"]) == len(metrics["baseline"]["edit_match_scores"]) >= 2
    assert len(metrics["candidate"]["grounded_scores"]) == len(metrics["baseline"]["grounded_scores"]) == 3
    # held-out loss and preference accuracy decide nothing here, so they are not spent on
    assert metrics["candidate"]["val_loss"] is None and metrics["candidate"]["pref_accuracy"] is None
    assert {"edit_match", "grounded", "general"} <= set(metrics["candidate"]["check_seconds"])
    # the shared adapter's answers to those questions are kept for the next user's gate
    kept = [json.loads(f.read_text()) for f in (settings.home / "cache" / "gate").glob("adapter-general-*.json")]
    assert [len(k["grounded"]) for k in kept] == [1] and len(next(iter(kept[0]["grounded"].values()))) == 3
    # and its answers to bob's own held-out questions, with bob's data (forgetting him removes them)
    (own,) = (settings.personal_datasets_dir / str(bob.id) / "gate-cache").glob("baseline-*.json")
    assert len(json.loads(own.read_text())) == len(metrics["baseline"]["edit_match_scores"])
    assert any(s["check"] == "edit_match" for s in report["report"]["samples"])
    assert any(p.startswith("general_qa on 40 questions") for p in decision["power"])
    assert len(report["report"]["metrics"]["candidate"]["general_qa_scores"]) == 40  # the personal subset
    if result["passed"]:
        assert result["status"] == "promoted" and mine.serving() == name
        assert services.chat.personal_adapter(bob.id) == name
        assert services.chat.resolve_model(None, bob) == name and services.chat.resolve_model(None, alice) == v1
    else:  # not served, and the status says why
        assert mine.serving() is None and actions.status(bob)["state"].startswith("not served")
    # the other user can neither read the report nor name the adapter
    with pytest.raises(NotFound):
        actions.report(alice, name)
    from assistant.chat import ModelNotFound
    with pytest.raises(ModelNotFound):
        services.chat.resolve_model(name, alice)
    assert name not in services.chat.model_names(alice)


def test_the_scheduler_queues_personal_retrains_behind_the_shared_one(services) -> None:
    store = services.store
    bob, carol = store.create_user("bob", "pw-bob"), store.create_user("carol", "pw-carol")
    _feedback(store, bob, 12)
    _feedback(store, carol, 12, " C")
    actions = PersonalActions(services)
    actions.set_opt_in(bob, True)
    actions.set_opt_in(carol, True)
    # a shared job is active: personal retrains wait for it (one job at a time), and nothing personal is recorded
    shared_job = _job(store, {}, "running")
    out = Scheduler(services, poll_s=3600).tick()["personal"]
    assert "started_job" not in out and out["reason"] == f"job {shared_job} is running; one retrain at a time"
    assert not [j for j in runner_for(services).list() if j.params.get("user_id")]
    with store.engine.begin() as conn:
        conn.execute(training_jobs.update().values(status="succeeded"))
    # fair turns: never-trained users first (lowest id on a tie), then whoever waited longest
    assert next_personal(services)[0] == bob.id
    _job(store, {"user_id": bob.id}, "succeeded")
    _feedback(store, bob, 1, " again")  # bob has new feedback too, but carol has waited longer
    assert next_personal(services)[0] == carol.id
    _job(store, {"user_id": carol.id}, "succeeded")
    assert next_personal(services)[0] == bob.id  # carol has no feedback since her retrain


def _job(store, params: dict, status: str) -> int:
    """A job record as the runner leaves one (its work is not what these tests look at)."""
    with store.engine.begin() as conn:
        return conn.execute(training_jobs.insert().values(
            kind="retrain", status=status, trigger="manual", params=params, progress={}, result={},
            cancel_requested=False, created_at=utcnow())).inserted_primary_key[0]


# ------------------------------------------------------------------------------------------ forget, delete
def _personal_state(services, tmp_path, user, seed: int) -> str:
    """A promoted personal adapter, a personal dataset and a job folder of `user`, as a retrain leaves them."""
    s, store = services.settings, services.store
    reg = registry_for(services, user.id)
    name = reg.register(make_random_adapter(Path(s.model), tmp_path / f"p{seed}", seed=seed), gate="passed").name
    reg.promote(name, services)
    build_datasets(store, s, BuildOptions(**ALL_IN_TRAIN), owner_id=user.id)
    job_id = _job(store, {"user_id": user.id}, "succeeded")
    (s.jobs_dir / f"job-{job_id}" / "eval").mkdir(parents=True)
    (s.jobs_dir / f"job-{job_id}" / "eval" / "report.json").write_text("{}")
    return name


def _rows(store, user_id: int) -> dict[str, int]:
    with store.engine.connect() as conn:
        return {t.name: conn.execute(sa.select(sa.func.count()).select_from(t).where(t.c.owner_id == user_id))
                .scalar_one() for t in (adapter_versions, adapter_serving)}


def test_forget_and_user_deletion_remove_every_file_and_row_of_theirs(services, tmp_path) -> None:
    store, s = services.store, services.settings
    bob, carol = store.create_user("bob", "pw-bob"), store.create_user("carol", "pw-carol")
    bob_fb = _feedback(store, bob, 6, " BOB-7")
    _feedback(store, carol, 6, " CAROL-8")
    actions = PersonalActions(services)
    for u in (bob, carol):
        actions.set_opt_in(u, True)
    names = {u.id: _personal_state(services, tmp_path, u, seed) for u, seed in ((bob, 11), (carol, 12))}
    sync_personal(services)
    assert services.chat.personal_adapter(bob.id) == names[bob.id] and services.backend.has_adapter(names[bob.id])
    assert _rows(store, bob.id) == {"adapter_versions": 1, "adapter_serving": 1}
    bob_job = next(j for j in runner_for(services).list() if j.params.get("user_id") == bob.id)

    done = actions.forget(bob)["deleted"]
    assert done["versions"] == 1 and done["job_folders"] == 1 and done["feedback_forgotten_through"] == bob_fb[-1]
    assert not (s.personal_adapters_dir / str(bob.id)).exists()
    assert not (s.personal_datasets_dir / str(bob.id)).exists()
    assert not runner_for(services).job_dir(bob_job.id).exists()
    assert _rows(store, bob.id) == {"adapter_versions": 0, "adapter_serving": 0}
    assert services.chat.personal_adapter(bob.id) is None and not services.backend.has_adapter(names[bob.id])
    assert actions.status(bob)["state"] == "waiting for feedback"  # still opted in; learns only from new feedback
    # his rows are out of every later build, shared and personal; carol's stay
    later_shared = build_datasets(store, s, BuildOptions(**ALL_IN_TRAIN))
    later_mine = build_datasets(store, s, BuildOptions(**ALL_IN_TRAIN), owner_id=bob.id)
    shared_bytes = b"".join(_all_bytes(later_shared.path).values())
    assert b"BOB-7" not in shared_bytes and b"CAROL-8" in shared_bytes
    assert later_mine.manifest["counts"]["sft"]["train"] == 0
    new = _feedback(store, bob, 1, " BOB-NEW")
    assert new[0] > bob_fb[-1]
    again = build_datasets(store, s, BuildOptions(**ALL_IN_TRAIN), owner_id=bob.id)
    assert again.manifest["counts"]["sft"]["train"] == 1  # new feedback counts again

    # deleting carol deletes her personal adapter, datasets, job folders and rows too
    carol_job = next(j for j in runner_for(services).list() if j.params.get("user_id") == carol.id)
    admin = store.create_user("root", "pw-root-123", role="admin")
    report = UserAdmin(s, store).delete_user(admin, carol.id)["deleted"]
    assert report["personal_versions"] == 1 and report["personal_job_folders"] == 1
    assert not (s.personal_adapters_dir / str(carol.id)).exists()
    assert not (s.personal_datasets_dir / str(carol.id)).exists()
    assert not runner_for(services).job_dir(carol_job.id).exists()
    assert _rows(store, carol.id) == {"adapter_versions": 0, "adapter_serving": 0}
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(personal_settings).where(personal_settings.c.user_id == carol.id)).first() is None
        assert conn.execute(sa.select(training_jobs).where(training_jobs.c.id == carol_job.id)).first() is None
    sync_personal(services)  # the running server stops serving and unloads it
    assert services.chat.personal_adapter(carol.id) is None and not services.backend.has_adapter(names[carol.id])


# ------------------------------------------------------------------------------------------ serving
def test_each_user_gets_their_own_adapter_inside_one_mixed_batch(services, tmp_path) -> None:
    store, s = services.store, services.settings
    alice, bob, carol = (store.create_user(n, f"pw-{n}") for n in ("alice", "bob", "carol"))
    shared = Registry(s, store)
    v1 = shared.register(make_random_adapter(Path(s.model), tmp_path / "shared", seed=21), gate="passed").name
    shared.promote(v1, services)
    actions = PersonalActions(services)
    names = {}
    for u, seed in ((bob, 22), (carol, 23)):
        reg = registry_for(services, u.id)
        names[u.id] = reg.register(make_random_adapter(Path(s.model), tmp_path / u.username, seed=seed),
                                   gate="passed").name
        reg.promote(names[u.id], services)
    actions.set_opt_in(bob, True)  # carol has an adapter but is not opted in: she gets the shared one
    sync_personal(services)
    assert services.chat.personal_users() == {bob.id: names[bob.id]}

    def turn(user, model=None):
        return services.chat.reply(TurnRequest(user=user, text="Tell me something about the sea.",
                                               model=model or "assistant", temperature=0.0, max_tokens=16))

    engine = services.backend._engine
    replies = [turn(u) for u in (alice, bob, carol)]
    assert len(engine.rows) >= 2  # they share the batch
    threads = [threading.Thread(target=r.drain) for r in replies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [r.adapter for r in replies] == [v1, names[bob.id], v1]
    alone = {a: turn(bob, a).drain().text for a in (v1, names[bob.id])}  # bob may name his own adapter
    assert alone[v1] != alone[names[bob.id]]  # the adapters really differ, so a mix-up would show
    assert [r.text for r in replies] == [alone[v1], alone[names[bob.id]], alone[v1]]
    stored = [r.assistant_message.adapter for r in replies]
    assert stored == [v1, names[bob.id], v1]  # logged with the adapter that answered


def test_the_api_keeps_each_users_adapter_and_report_their_own(tmp_path, learnable_tiny_model_dir) -> None:
    srv = start_server(tmp_path / "home", learnable_tiny_model_dir, personal_adapters=True)
    try:
        store, s = srv.services.store, srv.services.settings
        keys = {}
        for name, role in (("root", "admin"), ("alice", "user"), ("bob", "user")):
            u = store.create_user(name, f"pw-{name}-123", role=role)
            keys[name] = (u, store.create_api_key(u.id))
        bob = keys["bob"][0]
        reg = registry_for(srv.services, bob.id)
        eval_dir = tmp_path / "eval"
        eval_dir.mkdir()
        (eval_dir / "report.json").write_text('{"candidate": "x", "decision": {"passed": true}}')
        name = reg.register(make_random_adapter(learnable_tiny_model_dir, tmp_path / "b", seed=31), gate="passed",
                            report_dir=eval_dir, note="gain on val_loss").name

        def call(who, method, path, **kw):
            return httpx.request(method, srv.url + path, headers={"Authorization": f"Bearer {keys[who][1]}"},
                                 timeout=60, **kw)

        assert call("bob", "PUT", "/v1/personal", json={"opted_in": True}).json()["opted_in"] is True
        assert call("bob", "PUT", "/v1/personal", json={"opted_in": "maybe"}).status_code in (400, 422)
        mine = call("bob", "GET", "/v1/personal/report")
        assert mine.status_code == 200 and mine.json()["version"] == name
        assert call("bob", "GET", "/v1/personal").json()["latest"]["name"] == name
        # alice: bob's report and adapter read as not found; the admin routes are forbidden to her
        assert call("alice", "GET", f"/v1/personal/report?version={name}").status_code == 404
        assert call("alice", "GET", "/v1/personal/report").status_code == 404
        assert call("alice", "GET", "/v1/admin/personal").status_code == 403
        assert call("alice", "GET", f"/v1/admin/personal/{bob.id}").status_code == 403
        assert call("alice", "POST", f"/v1/admin/personal/{bob.id}/train", json={}).status_code == 403
        reg.promote(name, srv.services)
        models = [m["id"] for m in call("alice", "GET", "/v1/models").json()["data"]]
        assert name not in models and name in [m["id"] for m in call("bob", "GET", "/v1/models").json()["data"]]
        chat = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert call("alice", "POST", "/v1/chat/completions", json=chat).status_code == 404
        assert call("bob", "POST", "/v1/chat/completions", json=chat).status_code == 200
        # the admin sees the list with disk use, not the report
        line = call("root", "GET", "/v1/admin/personal").json()["data"]
        assert [(x["username"], x["latest"]) for x in line] == [("bob", name)] and line[0]["disk_bytes"] > 0
        assert call("root", "GET", "/v1/personal/report").status_code == 404  # the admin's own: none
        refused = call("root", "POST", f"/v1/admin/personal/{bob.id}/train", json={})
        assert refused.status_code == 400 and "ratings, edits or choices" in refused.json()["error"]["message"]
        assert call("bob", "DELETE", "/v1/personal").json()["deleted"]["versions"] == 1
        assert call("bob", "GET", "/v1/personal/report").status_code == 404
        assert not (s.personal_adapters_dir / str(bob.id)).exists()
    finally:
        srv.stop()


def test_personal_options_are_checked() -> None:
    opts = CycleOptions.from_dict(cycle_options(3))
    assert opts.user_id == 3 and opts.train == {"stages": ["sft"], "sft_learning_rate": 1e-3, "lora_dropout": 0.0,
                                                "sft_row_budget": 48, "prompt_gradients": False}  # PERSONAL_TRAIN
    assert cycle_options(3, {"train": {"sft_learning_rate": 2e-4}})["train"]["sft_learning_rate"] == 2e-4
    with pytest.raises(ValueError, match="user_id"):
        CycleOptions.from_dict({"user_id": 0})
    with pytest.raises(ValueError, match="no synth"):
        CycleOptions.from_dict({"user_id": 3, "synth": True})


def test_the_command_line_opts_in_lists_and_forgets(home, tmp_path, tiny_model_dir) -> None:
    from typer.testing import CliRunner

    from assistant.cli import app
    from memory.store import Store

    def run(*args: str):
        env = {"ASSISTANT_HOME": str(home), "ASSISTANT_PERSONAL_ADAPTERS": "1"}
        return CliRunner().invoke(app, list(args), env=env)

    s = Settings.load(env={}, home=home, personal_adapters=True)
    s.ensure_dirs()
    store = Store.open(s.db_url)
    bob = store.create_user("bob", "pw-bob-123")
    _feedback(store, bob, 3)
    assert run("personal", "opt-in", "--user", "bob").exit_code == 0
    name = Registry(s, store, owner_id=bob.id).register(
        make_random_adapter(tiny_model_dir, tmp_path / "b", seed=41), gate="failed", note="no gain on val_loss").name
    listed = run("personal", "list")
    assert listed.exit_code == 0 and "bob\topted in\tserving -\t1 versions" in listed.output
    st = run("personal", "status", "--user", "bob")
    assert f"newest {name} (failed: no gain on val_loss)" in st.output and "3 of the 20" in st.output
    refused = run("personal", "train", "bob")
    assert refused.exit_code == 2 and "3 of the 20 ratings" in refused.output
    gone = run("personal", "forget", "--user", "bob", "--yes")
    assert gone.exit_code == 0 and "versions 1" in gone.output
    assert not (s.personal_adapters_dir / str(bob.id)).exists()
    assert run("personal", "opt-out", "--user", "bob").output.strip() == "bob: not opted in"
    store.close()


def test_the_page_shows_a_users_own_adapter_and_the_console_everyones(store, settings, tiny_model_dir, tmp_path):
    from types import SimpleNamespace

    from ui import personal as page

    s = settings.model_copy(update={"personal_adapters": True})
    svc = SimpleNamespace(settings=s, store=store, registry=Registry(s, store), backend=None, chat=None, jobs=None)
    bob, root = store.create_user("bob", "pw-bob-123"), store.create_user("root", "pw-root-123", role="admin")
    assert page.status_markdown(svc, bob) == (False, "**You have not asked for a personal adapter. Everyone "
                                                     "shares one adapter.**")
    assert page.set_opt_in(svc, bob, True).startswith("You now have a personal adapter")
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    (eval_dir / "report.json").write_text("{}")
    (eval_dir / "report.md").write_text("# Evaluation: u1 vs v0001\n\nheld-out loss worse")
    name = Registry(s, store, owner_id=bob.id).register(make_random_adapter(tiny_model_dir, tmp_path / "b", seed=51),
                                                        gate="failed", report_dir=eval_dir, note="no gain").name
    on, text = page.status_markdown(svc, bob)
    assert on and "did not answer you better than the shared one" in text and f"`{name}`, gate failed" in text
    assert "held-out loss worse" in page.report_markdown(svc, bob)
    assert page.report_markdown(svc, root) == "No evaluation report yet."  # never bob's
    frame = page.personal_frame(svc, root)
    assert frame.values.tolist()[0][:6] == ["bob", "yes", "-", 1, name, "failed"]
    with pytest.raises(PermissionError):
        page.personal_frame(svc, bob)
    assert page.forget(svc, bob, False).startswith("Tick the box first")
    assert page.forget(svc, bob, True).startswith("Forgotten: 1 personal versions")
    assert not (s.personal_adapters_dir / str(bob.id)).exists()
