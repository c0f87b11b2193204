"""Dataset builds from a real SQLite store (training/dataset_build.py): formats and provenance, PII never
written, near-duplicates removed, stable grouped splits, frozen held-out set, deletions honoured, and one
real TRL step each for SFT, DPO and KTO on the tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from assistant.config import Settings
from memory.store import Store
from tests.conftest import fast_password_hasher
from training.dataset_build import (
    KINDS,
    SPLITS,
    BuildError,
    BuildOptions,
    build_datasets,
    latest_snapshot,
    list_snapshots,
    load_split,
    prune_snapshots,
    read_manifest,
)
from training.synth import SyntheticPairs
from training.teacher import TeacherPair

CATALOGUE = json.loads((Path(__file__).parent / "data" / "pii_catalogue.json").read_text(encoding="utf-8"))
ALL_IN_TRAIN = dict(split_ratios=(1.0, 0.0, 0.0), replay_ratio=0.0)


def _user(store: Store, name: str = "alice"):
    return store.create_user(name, "pw-" + name)


def _teacher_pair(doc_id: str, question: str, answer: str, rejected: str | None = None) -> TeacherPair:
    return TeacherPair(doc_id=doc_id, chunk_id="0", chunk_sha256="0" * 64, question=question,
                       question_source="template", answer=answer, accepted=True, score=0.9, teacher="test-teacher",
                       rejected=rejected, rejected_score=0.1 if rejected else None)


def _rows(snapshot: Path, kind: str, split: str) -> list[dict]:
    path = snapshot / "jsonl" / f"{kind}.{split}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _all_rows(snapshot: Path) -> list[dict]:
    return [r for k in KINDS for s in SPLITS for r in _rows(snapshot, k, s)]


def _all_bytes(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------------------- formats


def seed_every_feedback_kind(store: Store) -> dict[str, int]:
    """One conversation per kind of feedback; returns the ids the tests look for."""
    u = _user(store)
    ids: dict[str, int] = {}
    # thumbs up in a two-turn conversation: the first exchange is the context
    c = store.create_conversation(u.id, "geo")
    store.add_turn(c.id, "What is the capital of France?", "Paris is the capital of France.")
    _, a = store.add_turn(c.id, "And of Italy?", "Rome is the capital of Italy.", adapter="v3")
    ids["up"] = a.id
    store.add_thumb(u.id, a.id, 1)
    # an edit: corrected text is the SFT target and the DPO chosen answer
    c = store.create_conversation(u.id, "math")
    _, a = store.add_turn(c.id, "What is 7 times 8?", "7 times 8 is 54.")
    ids["edited"] = a.id
    store.add_edit(u.id, a.id, "7 times 8 is 56.")
    # thumbs down, then regenerate-and-choose: the chosen regeneration beats the rated-down answer
    c = store.create_conversation(u.id, "sky")
    q, a = store.add_turn(c.id, "Why is the sky blue?", "Because the ocean reflects onto it.")
    ids["down"] = a.id
    store.add_thumb(u.id, a.id, -1, reason="wrong")
    alt = store.add_message(c.id, "assistant", "Air molecules scatter blue sunlight more than red light.",
                            parent_id=q.id, status="alternative")
    ids["regen"] = alt.id
    store.add_pair(u.id, a.id, alt.id, chosen_message_id=alt.id)
    store.set_message_status(alt.id, "complete")
    store.set_message_status(a.id, "alternative")
    # thumbs down, then a regeneration rated up (no explicit choice): still a better answer to the same question
    c = store.create_conversation(u.id, "tea")
    q, a = store.add_turn(c.id, "How long should green tea steep?", "Boil it for ten minutes.")
    ids["down2"] = a.id
    store.add_thumb(u.id, a.id, -1, reason="wrong")
    alt = store.add_message(c.id, "assistant", "Steep green tea for two to three minutes at about 80 degrees.",
                            parent_id=q.id, status="alternative")
    ids["regen2"] = alt.id
    store.add_thumb(u.id, alt.id, 1)
    # a teacher pair from a document, with a rejected candidate
    ids["syn"] = SyntheticPairs(store).add(_teacher_pair(
        "pricing", "How much does the Team plan cost?", "The Team plan costs 8 dollars per member per month.",
        rejected="It is free for everyone."))
    return ids


def test_formats_sources_and_provenance(store, settings):
    ids = seed_every_feedback_kind(store)
    result = build_datasets(store, settings, BuildOptions(**ALL_IN_TRAIN))
    snap = result.path
    assert snap == latest_snapshot(settings) and snap.name == "v0001"

    sft_rows = _rows(snap, "sft", "train")
    sft = {r["origin"]: r for r in sft_rows}
    assert set(sft) == {"thumb_up", "edit", "teacher"}
    up = {r["message_id"]: r for r in sft_rows if r["origin"] == "thumb_up"}
    assert set(up) == {ids["up"], ids["regen2"]}
    assert up[ids["up"]]["messages"] == [
        {"role": "system", "content": settings.system_prompt},  # the serving system prompt, not the template's
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris is the capital of France."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome is the capital of Italy."},
    ]
    assert up[ids["up"]]["adapter"] == "v3" and up[ids["up"]]["feedback_id"] is not None
    assert sft["edit"]["messages"][-1]["content"] == "7 times 8 is 56."
    assert sft["teacher"]["source"] == "teacher" and sft["teacher"]["doc_id"] == "pricing"
    assert sft["teacher"]["synthetic_id"] == ids["syn"] and sft["teacher"]["group"] == f"synthetic:{ids['syn']}"
    # no knowledge base in this build: the teacher's question without its passage
    assert sft["teacher"]["messages"][1] == {"role": "user", "content": "How much does the Team plan cost?"}

    dpo = {r["origin"]: r for r in _rows(snap, "dpo", "train")}
    assert set(dpo) == {"edit", "pair", "regen_vs_down", "teacher"}
    assert dpo["edit"]["chosen"][0]["content"] == "7 times 8 is 56."
    assert dpo["edit"]["rejected"][0]["content"] == "7 times 8 is 54."
    assert dpo["pair"]["chosen"][0]["content"].startswith("Air molecules")
    assert dpo["pair"]["rejected"][0]["content"].startswith("Because the ocean")
    assert dpo["pair"]["prompt"] == [{"role": "system", "content": settings.system_prompt},
                                     {"role": "user", "content": "Why is the sky blue?"}]
    assert dpo["regen_vs_down"]["message_id"] == ids["regen2"]
    assert dpo["regen_vs_down"]["other_message_id"] == ids["down2"]
    assert dpo["teacher"]["rejected"][0]["content"] == "It is free for everyone."

    kto = {(r["origin"], r["label"]) for r in _rows(snap, "kto", "train")}
    assert kto == {("thumb_up", True), ("thumb_down", False)}

    m = read_manifest(snap)
    assert m["counts"]["sft"] == {"train": 4, "validation": 0, "test": 0}
    # the sky answer's thumb-down-vs-chosen-regeneration pair is the same pair as the user's choice
    assert {f["name"]: f["removed"] for f in m["filters"]["dpo"]}["dedup:exact"] == 1
    assert m["by_source"]["dpo"]["train"] == {"human:edit": 1, "human:pair": 1, "human:regen_vs_down": 1,
                                              "teacher:teacher": 1}
    for name, digest in m["hashes"].items():
        import hashlib
        assert hashlib.sha256((snap / name).read_bytes()).hexdigest() == digest
    # the HF datasets copy has the same rows as the JSONL
    ds = load_split(snap, "dpo", "train", trl_only=False)
    assert sorted(ds["origin"]) == sorted(dpo)
    assert load_split(snap, "dpo", "train").column_names == ["prompt", "chosen", "rejected"]


# --------------------------------------------------------------------------------------- PII


def test_planted_pii_never_reaches_any_dataset_file(store, settings):
    u = _user(store)
    syn = SyntheticPairs(store)
    for case in CATALOGUE["pii"]:
        c = store.create_conversation(u.id, case["id"])
        _, a = store.add_turn(c.id, f"Case {case['id']}: please keep this: {case['text']}",
                              f"Noted for case {case['id']}. You wrote: {case['text']}")
        store.add_thumb(u.id, a.id, 1)
        store.add_edit(u.id, a.id, f"Corrected for case {case['id']}: {case['text']}")
    for case in CATALOGUE["keep"]:
        c = store.create_conversation(u.id, case["id"])
        _, a = store.add_turn(c.id, f"Keep case {case['id']}: {case['text']}",
                              f"Sure, case {case['id']}: {case['text']}")
        store.add_thumb(u.id, a.id, 1)
    for case in CATALOGUE["pii"][:10]:  # the teacher path is scrubbed too
        syn.add(_teacher_pair(f"doc-{case['id']}", f"What does doc {case['id']} contain?",
                              f"Doc {case['id']} says: {case['text']}", rejected=f"Nothing about {case['text']}"))

    result = build_datasets(store, settings, BuildOptions(heldout_min_rows=1, near_dup_threshold=0.95))
    files = _all_bytes(settings.datasets_dir)
    assert any(p.suffix == ".arrow" for p in files) and any(p.suffix == ".jsonl" for p in files)
    for case in CATALOGUE["pii"]:
        for value in case["forbidden"]:
            needle = value.encode("utf-8")
            leaks = [str(p.relative_to(settings.datasets_dir)) for p, data in files.items() if needle in data]
            assert not leaks, f"{case['id']}: {value!r} found in {leaks}"

    # Every planted row is still there (scrubbed, not dropped), so the check above saw them all.
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in _all_rows(result.path))
    heldout = "\n".join((result.path / "heldout" / f"{k}.jsonl").read_text(encoding="utf-8") for k in KINDS)
    for case in CATALOGUE["pii"]:
        assert f"Corrected for case {case['id']}" in text + heldout, case["id"]
    for case in CATALOGUE["keep"]:
        for value in case["keep"]:
            assert value in text + heldout, f"{case['id']}: {value!r} did not survive"
    pii = next(f for f in result.manifest["filters"]["sft"] if f["name"] == "pii_scrub")
    assert pii["rows_changed"] >= len(CATALOGUE["pii"])
    assert set(pii["by_kind"]) == {"email", "phone", "card", "rrn", "ip", "secret", "url_credentials"}


def test_memories_sources_and_system_prompts_never_leak(store, settings):
    u = _user(store)
    c = store.create_conversation(u.id, "memories")
    store.add_message(c.id, "system", "Known about the user: MEMORY-MARKER-7f3 likes sailing.")
    q = store.add_message(c.id, "user", "Plan my weekend, please.")
    store.add_message(c.id, "tool", "TOOL-MARKER-91 search results")
    a = store.add_message(c.id, "assistant", "How about a quiet walk by the river on Saturday?", parent_id=q.id,
                          memories=[{"id": 4, "text": "MEMORY-MARKER-7f3 likes sailing"}],
                          sources=[{"doc_id": "d1", "snippet": "SOURCE-MARKER-22"}],
                          generation={"client_system": "CLIENT-SYSTEM-MARKER-5"})
    store.add_thumb(u.id, a.id, 1)
    result = build_datasets(store, settings, BuildOptions(**ALL_IN_TRAIN))
    assert result.manifest["counts"]["sft"]["train"] == 1
    assert _rows(result.path, "sft", "train")[0]["messages"] == [
        {"role": "system", "content": settings.system_prompt},
        {"role": "user", "content": "Plan my weekend, please."},
        {"role": "assistant", "content": "How about a quiet walk by the river on Saturday?"},
    ]
    for data in _all_bytes(settings.datasets_dir).values():
        for marker in (b"MEMORY-MARKER", b"TOOL-MARKER", b"SOURCE-MARKER", b"CLIENT-SYSTEM-MARKER"):
            assert marker not in data


def test_training_prompts_are_the_served_prompts_with_shared_passages_only(store, settings, tiny_embedder_dir):
    """A served answer's training row is the prompt the model was served, passages included, except that
    a private document's passage stays out of it; deleting the shared document takes its passage out."""
    from assistant.agent import Agent
    from assistant.prompt import Passage, render_turn
    from memory.knowledge import KnowledgeBase
    from memory.longterm import LongTermMemory

    s = settings.model_copy(update={"embedder": str(tiny_embedder_dir)})
    kb = KnowledgeBase(s)
    try:
        agent = Agent(s, store, kb, LongTermMemory(s, store))
        alice, bob = _user(store), _user(store, "bob")
        shared = kb.ingest(alice, "plans.md", b"# Plans\n\nThe LUMEN-77 plan costs 8 dollars per member per month.",
                           scope="shared")
        kb.ingest(alice, "diary.md", b"# Diary\n\nPRIVATE-MARKER-31: my LUMEN-77 invoice is overdue.", scope="private")
        question = "What does the LUMEN-77 plan cost?"
        served = {}
        answers = {alice.id: "8 dollars per member per month.", bob.id: "Each member costs 8 dollars a month, Bob."}
        for who in (alice, bob):
            prepared = agent.prepare(who, [], question)
            c = store.create_conversation(who.id, "plans")
            _, a = store.add_turn(c.id, question, answers[who.id], sources=prepared.sources)
            store.add_thumb(who.id, a.id, 1)
            served[a.id] = prepared
        scopes = {mid: sorted(src["scope"] for src in p.sources) for mid, p in served.items()}
        assert sorted(scopes.values()) == [["private", "shared"], ["shared"]]  # alice was served her diary too

        built = build_datasets(store, s, BuildOptions(**ALL_IN_TRAIN), knowledge=kb)
        rows = {r["message_id"]: r for r in _rows(built.path, "sft", "train")}
        chunk = kb.document_chunks(alice, shared.doc_id)[0]
        expected = render_turn(s.system_prompt, [], question, passages=[Passage(shared.title, "shared", chunk.text)])
        for mid, prepared in served.items():
            assert rows[mid]["messages"][:-1] == expected
            assert rows[mid]["passage_ids"] == [chunk.chunk_id]
            if scopes[mid] == ["shared"]:  # nothing private was served: byte for byte the served prompt
                assert rows[mid]["messages"][:-1] == prepared.messages
        prompts = built.manifest["prompts"]
        assert prompts["private_passages_left_out"] == 2  # alice's SFT and KTO rows
        assert prompts["rows_with_passages"] == 4 and prompts["passages_missing"] == 0
        for data in _all_bytes(settings.datasets_dir).values():
            assert b"PRIVATE-MARKER-31" not in data

        # freeze a held-out set holding those rows (nearly every group goes to test at 99 %)
        frozen = build_datasets(store, s, BuildOptions(split_ratios=(0.01, 0.0, 0.99), heldout_min_rows=1,
                                                       replay_ratio=0.0), knowledge=kb)
        assert frozen.manifest["heldout"]["counts"]["sft"] >= 1
        assert b"The LUMEN-77 plan costs" in b"".join(_all_bytes(settings.datasets_dir / "heldout").values())

        kb.delete_document(alice, shared.doc_id)
        again = build_datasets(store, s, BuildOptions(**ALL_IN_TRAIN), knowledge=kb)
        assert again.manifest["prompts"]["passages_missing"] == 4
        assert again.manifest["heldout"]["removed_deleted_now"] >= 1
        for data in {**_all_bytes(again.path), **_all_bytes(settings.datasets_dir / "heldout")}.values():
            assert b"The LUMEN-77 plan costs" not in data  # gone from the new rows and from the frozen ones
    finally:
        kb.close()


def test_style_feedback_does_not_teach_a_fact_the_passage_contradicts(store, settings, tiny_embedder_dir):
    """Issue 26: liked-but-wrong answers rose from 3 to 7 of 32 in a loop run. A liked answer whose number its cited
    passage does not hold is no SFT target (nor a desirable KTO row), and a style edit that keeps the wrong number
    is neither an SFT target nor a DPO chosen side; a correct liked answer and a fact-keeping edit still train.
    A liked answer that only hands the question back trains nothing either."""
    from memory.knowledge import KnowledgeBase

    s = settings.model_copy(update={"embedder": str(tiny_embedder_dir)})
    kb = KnowledgeBase(s)
    try:
        alice = _user(store)
        doc = kb.ingest(alice, "pricing.md", b"# Pricing\n\nThe Team plan costs 8 dollars per member per month. "
                        b"Staff from the wet lab gather at assembly point B.", scope="shared")
        chunk = kb.document_chunks(alice, doc.doc_id)[0]
        cited = [{"doc_id": doc.doc_id, "chunk_id": chunk.chunk_id, "scope": "shared", "title": doc.title}]
        feedback = [("How much is the Team plan?", "Lumen Desk Team costs 8 dollars.", 1, None),
                    ("What does the Team plan cost?", "Lumen Desk Team costs 15 dollars.", 1, None),
                    ("Where does the wet lab gather?", "The wet lab staff go to assembly point A, which is the "
                     "lawn next to the flagpole outside.", -1, "Lumen Desk: assembly point A."),
                    ("Team plan price?", "It is a plan for teams that many people like.", -1,
                     "Lumen Desk Team costs 8 dollars per member."),
                    # liked in the loop bench (short, names the product), and it states nothing
                    ("When does the wet lab gather?", "Your question: when does the wet lab gather?", 1, None)]
        for question, answer, rating, edit in feedback:
            c = store.create_conversation(alice.id, question)
            _, a = store.add_turn(c.id, question, answer, sources=cited)
            store.add_thumb(alice.id, a.id, rating, reason=None if rating > 0 else "style")
            if edit:
                store.add_edit(alice.id, a.id, edit)
        built = build_datasets(store, s, BuildOptions(**ALL_IN_TRAIN), knowledge=kb)
        targets = sorted(r["messages"][-1]["content"] for r in _rows(built.path, "sft", "train"))
        assert targets == ["Lumen Desk Team costs 8 dollars per member.", "Lumen Desk Team costs 8 dollars."]
        assert [r["chosen"][0]["content"] for r in _rows(built.path, "dpo", "train")] == [
            "Lumen Desk Team costs 8 dollars per member."]
        kto = {r["completion"][0]["content"]: r["label"] for r in _rows(built.path, "kto", "train")}
        assert "Lumen Desk Team costs 15 dollars." not in kto and kto["Lumen Desk Team costs 8 dollars."] is True
        removed = {k: {f["name"]: f["removed"] for f in built.manifest["filters"][k]} for k in ("sft", "dpo", "kto")}
        assert removed["sft"]["contradicts_passage"] == 2 and removed["dpo"]["contradicts_passage"] == 1
        assert removed["kto"]["contradicts_passage"] == 1
        assert removed["sft"]["echoes_question"] == 1 and removed["kto"]["echoes_question"] == 1
        assert not any("Your question" in text for text in kto)
    finally:
        kb.close()


def test_forgotten_memory_never_in_a_later_build(store, settings, tiny_embedder_dir):
    from memory.longterm import LongTermMemory

    mem = LongTermMemory(settings.model_copy(update={"embedder": str(tiny_embedder_dir)}), store)
    alice, bob = _user(store), _user(store, "bob")
    for owner, dog in ((alice, "Zorblax"), (bob, "Biscuit")):
        c = store.create_conversation(owner.id, "pets")
        _, a = store.add_turn(c.id, f"My dog is called {dog}. What food suits a young dog?",
                              "A puppy food with enough protein suits a young dog; ask your vet about amounts.")
        store.add_thumb(owner.id, a.id, 1)
        _, a = store.add_turn(c.id, "Thanks! Which walks are good for a puppy?",
                              "Short walks of five minutes per month of age, twice a day, are a common rule.")
        store.add_thumb(owner.id, a.id, 1)
    remembered = mem.remember(alice.id, "My dog is called Zorblax")
    first = build_datasets(store, settings, BuildOptions(heldout_min_rows=1))
    assert b"Zorblax" in b"".join(_all_bytes(first.path).values())

    mem.forget(alice.id, remembered.memory.id)
    second = build_datasets(store, settings, BuildOptions(heldout_min_rows=1))
    for p, data in {**_all_bytes(second.path), **_all_bytes(settings.datasets_dir / "heldout")}.items():
        assert b"Zorblax" not in data, p
    assert any("Biscuit" in json.dumps(r) for r in _all_rows(second.path))  # bob forgot nothing
    removed = {f["name"]: f["removed"] for k in KINDS for f in second.manifest["filters"][k]}
    assert removed.get("forgotten_memory", 0) >= 2


# --------------------------------------------------------------------------------------- hygiene


def test_near_duplicates_and_junk_are_removed(store, settings):
    u = _user(store)
    base = ("To reset sync, open Settings, choose Sync and press Rebuild local copy; it takes under five "
            "minutes and downloads the whole workspace again.")
    answers = [
        base,
        base.upper().replace(";", " ;"),  # exact after normalisation
        base.replace("under five minutes", "under 5 minutes"),  # near
        base.replace("whole workspace", "entire workspace"),  # near
        "Open the Sync panel and press Rebuild; support can also help by chat on weekdays.",
        "Deleted pages stay in the trash for thirty days before they are removed for good.",
        ".",  # too short
        "@@@@ #### $$$$ %%%% ^^^^ &&&& **** ~~~~ |||| ++++ ==== <<<< >>>>",  # not text
    ]
    for i, text in enumerate(answers):
        c = store.create_conversation(u.id, f"dup{i}")
        _, a = store.add_turn(c.id, "How do I reset sync?", text)
        store.add_thumb(u.id, a.id, 1)
    result = build_datasets(store, settings, BuildOptions(**ALL_IN_TRAIN))
    kept = [r["messages"][-1]["content"] for r in _rows(result.path, "sft", "train")]
    assert len(kept) == 3 and base in kept
    removed = {f["name"]: f["removed"] for f in result.manifest["filters"]["sft"]}
    assert removed["dedup:exact"] == 1 and removed["dedup:near"] == 2
    assert removed["quality:too_short"] == 1 and removed["quality:non_text"] == 1


# --------------------------------------------------------------------------------------- splits


def _seed_conversations(store: Store, user, start: int, n: int) -> None:
    topics = ["printer", "invoice", "garden", "laptop", "train", "recipe", "budget", "holiday", "piano", "bike"]
    for i in range(start, start + n):
        t = topics[i % len(topics)]
        c = store.create_conversation(user.id, f"conv {i}")
        _, a1 = store.add_turn(c.id, f"Question {i} about my {t}: what should I check first (case {i})?",
                               f"For case {i}, check the {t} settings first, then restart it ({i * 7} s).")
        store.add_thumb(user.id, a1.id, 1 if i % 3 else -1)
        _, a2 = store.add_turn(c.id, f"Follow-up {i}: and if the {t} still fails?",
                               f"Then for case {i} reinstall the {t} driver version {i}.0.")
        store.add_edit(user.id, a2.id, f"Then, for case {i}, contact support about the {t} (ticket {i * 13}).")


def _split_of_groups(snapshot: Path) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for k in KINDS:
        for s in SPLITS:
            for r in _rows(snapshot, k, s):
                out.setdefault(r["group"], set()).add(s)
    return out


def _heldout_groups(snapshot: Path) -> set[str]:
    return {json.loads(line)["group"] for k in KINDS
            for line in (snapshot / "heldout" / f"{k}.jsonl").read_text(encoding="utf-8").splitlines()}


def test_splits_are_grouped_stable_and_heldout_is_frozen(store, settings):
    u = _user(store)
    _seed_conversations(store, u, 0, 80)
    syn = SyntheticPairs(store)
    for d in range(12):
        for q in range(3):
            syn.add(_teacher_pair(f"doc{d}", f"What does document {d} say about point {q}?",
                                  f"Document {d} says point {q} is number {d * 10 + q}."))
    options = BuildOptions(heldout_min_rows=5)
    first = build_datasets(store, settings, options)
    groups = _split_of_groups(first.path)
    assert all(len(s) == 1 for s in groups.values()), "a conversation or document spans two splits"
    by_split = {s: {g for g, ss in groups.items() if s in ss} for s in SPLITS}
    assert all(by_split[s] for s in SPLITS), by_split
    # teacher pairs are split one question at a time: every document has pairs in train
    assert any(g.startswith("synthetic:") for g in by_split["test"])
    trained_docs = {r["doc_id"] for r in _rows(first.path, "sft", "train") if r["group"].startswith("synthetic:")}
    assert trained_docs == {f"doc{d}" for d in range(12)}
    heldout = _heldout_groups(first.path)
    assert heldout and heldout <= by_split["test"]
    assert first.manifest["heldout"]["frozen"] and first.manifest["heldout"]["frozen_by_build"] == "v0001"

    again = build_datasets(store, settings, options)
    assert again.version == "v0002"
    assert again.manifest["content_sha256"] == first.manifest["content_sha256"]  # deterministic rebuild
    assert again.manifest["heldout"]["hashes"] == first.manifest["heldout"]["hashes"]

    _seed_conversations(store, u, 80, 40)
    grown = build_datasets(store, settings, options)
    grown_groups = _split_of_groups(grown.path)
    assert len(grown_groups) > len(groups)
    for g, s in groups.items():
        assert grown_groups[g] == s, f"{g} moved from {s} to {grown_groups[g]}"
    assert _heldout_groups(grown.path) == heldout  # frozen: new test rows do not join it
    assert grown.manifest["heldout"]["frozen_by_build"] == "v0001"

    # Even with other ratios, no held-out group may reach train or validation.
    reshaped = build_datasets(store, settings, BuildOptions(heldout_min_rows=5, split_ratios=(0.95, 0.03, 0.02)))
    reshaped_groups = _split_of_groups(reshaped.path)
    trainable = {g for g, s in reshaped_groups.items() if s & {"train", "validation"}}
    assert not trainable & heldout
    excluded = {f["name"]: f["removed"] for k in KINDS for f in reshaped.manifest["filters"][k]}
    assert excluded.get("heldout_group_excluded", 0) > 0


def test_a_heldout_set_frozen_by_document_keeps_those_documents_out_of_training(store, settings):
    """Held-out sets frozen before teacher pairs were split by question name whole documents."""
    syn = SyntheticPairs(store)
    for d in range(12):
        for q in range(3):
            syn.add(_teacher_pair(f"doc{d}", f"What does document {d} say about point {q}?",
                                  f"Document {d} says point {q} is number {d * 10 + q}."))
    build_datasets(store, settings, BuildOptions(heldout_min_rows=1, replay_ratio=0.0))
    frozen = settings.datasets_dir / "heldout"
    rows = [json.loads(line) for line in (frozen / "sft.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows, "nothing was frozen"
    legacy = {r["doc_id"] for r in rows}
    for r in rows:  # as the old builder froze them
        r["group"] = f"doc:{r['doc_id']}"
    (frozen / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    again = build_datasets(store, settings, BuildOptions(heldout_min_rows=1, replay_ratio=0.0))
    trainable = [r for s in ("train", "validation") for r in _rows(again.path, "sft", s)]
    assert trainable and not {r["doc_id"] for r in trainable} & legacy


def test_row_order_does_not_depend_on_random_document_ids(tmp_path):
    """The same feedback and teacher pairs, with the documents ingested under other ids, train in the
    same order (the trainer's shuffle is seeded, so the order decides the adapter)."""
    orders = []
    for run, prefix in enumerate(("d3f9a", "d07c1")):
        settings = Settings.load(env={}, home=tmp_path / f"home{run}")
        settings.ensure_dirs()
        store = Store.open(settings.db_url, password_hasher=fast_password_hasher())
        try:
            _seed_conversations(store, _user(store), 0, 6)
            syn = SyntheticPairs(store)
            for d in range(3):
                syn.add(_teacher_pair(f"{prefix}{d}", f"What does document {d} say?", f"Document {d} says {d}."))
            snap = build_datasets(store, settings, BuildOptions(**ALL_IN_TRAIN)).path
            orders.append([r["messages"][-1]["content"] for r in _rows(snap, "sft", "train")])
        finally:
            store.close()
    assert len(orders[0]) == 6 * 2 + 3 - 2  # thumbs-down answers are not SFT targets
    assert orders[0] == orders[1]


def test_deleted_conversation_is_gone_from_later_builds_and_heldout(store, settings):
    u = _user(store)
    convs = []
    for i in range(40):
        c = store.create_conversation(u.id, f"c{i}")
        _, a = store.add_turn(c.id, f"Tell me fact number {i} about owls, please.",
                              f"Owl fact {i}: marker-ZQX{i:03d}-owl, they hunt at night number {i}.")
        store.add_thumb(u.id, a.id, 1)
        convs.append(c)
    first = build_datasets(store, settings, BuildOptions(heldout_min_rows=1))
    heldout = _heldout_groups(first.path)
    train = {r["group"] for r in _rows(first.path, "sft", "train")}
    gone = [sorted(heldout)[0], sorted(train)[0]]
    for g in gone:
        assert store.delete_conversation(int(g.split(":")[1]), u.id)
    markers = [f"marker-ZQX{int(g.split(':')[1]) - 1:03d}-owl".encode() for g in gone]
    assert all(m in b"".join(_all_bytes(first.path).values()) for m in markers)  # they were there before

    second = build_datasets(store, settings, BuildOptions(heldout_min_rows=1))
    for folder in (second.path, settings.datasets_dir / "heldout"):
        for p, data in _all_bytes(folder).items():
            for m in markers:
                assert m not in data, f"{m!r} still in {p}"
    assert second.manifest["heldout"]["removed_deleted_now"] >= 1
    assert not ({r["group"] for r in _all_rows(second.path)} & set(gone))

    # Pruning old snapshots is how the data deleted since leaves the disk.
    assert prune_snapshots(settings, keep=1) == ["v0001"]
    assert [p.name for p in list_snapshots(settings)] == ["v0002"]
    for data in _all_bytes(settings.datasets_dir).values():
        assert not any(m in data for m in markers)


# --------------------------------------------------------------------------------------- bad input


def test_bad_options_and_failed_builds_publish_nothing(store, settings, tmp_path):
    seed_every_feedback_kind(store)
    with pytest.raises(ValueError, match="split_ratios"):
        build_datasets(store, settings, BuildOptions(split_ratios=(0.5, 0.2, 0.2)))
    with pytest.raises(ValueError, match="replay file"):
        build_datasets(store, settings, BuildOptions(replay_path=tmp_path / "missing.jsonl"))
    good = build_datasets(store, settings, BuildOptions(**ALL_IN_TRAIN))
    bad_replay = tmp_path / "replay.jsonl"
    bad_replay.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n', encoding="utf-8")
    with pytest.raises(BuildError, match="replay.jsonl:1"):
        build_datasets(store, settings, BuildOptions(split_ratios=(1.0, 0.0, 0.0), replay_path=bad_replay,
                                                     replay_ratio=1.0))
    assert [p.name for p in list_snapshots(settings)] == [good.version]
    assert latest_snapshot(settings) == good.path
    assert sorted(p.name for p in settings.datasets_dir.iterdir()) == ["LATEST", good.version]


def test_replay_mix_and_synthetic_cap(store, settings):
    u = _user(store)
    _seed_conversations(store, u, 0, 10)
    syn = SyntheticPairs(store)
    words = ("boilers radiators thermostats valves pumps fuses breakers sockets cables switches lamps dimmers "
             "fans heaters filters vents ducts pipes taps drains gutters tiles shingles windows doors locks hinges "
             "alarms sensors cameras").split()
    for q, word in enumerate(words):
        syn.add(_teacher_pair("manual", f"What does the manual say about {word}?",
                              f"Chapter {q} explains how to inspect and maintain {word} safely at home."))
    options = BuildOptions(split_ratios=(1.0, 0.0, 0.0), max_synthetic_share=0.5, synthetic_floor=0,
                           replay_ratio=0.5)
    result = build_datasets(store, settings, options)
    src = result.manifest["by_source"]["sft"]["train"]
    human = src["human:edit"] + src["human:thumb_up"]
    assert src["teacher:teacher"] == human  # share 0.5: as many teacher rows as human ones
    cap = result.manifest["synthetic_cap"]["sft"]
    assert cap["teacher_rows"] == len(words) and cap["removed"] == len(words) - human
    assert src["replay:replay"] == result.manifest["replay"]["used"] == round(0.5 * 2 * human)
    assert all(r["source"] != "replay" for s in ("validation", "test") for r in _rows(result.path, "sft", s))


@pytest.mark.postgres
def test_build_on_postgresql(pg_url, settings):
    store = Store.open(pg_url)
    try:
        seed_every_feedback_kind(store)
        result = build_datasets(store, settings, BuildOptions(**ALL_IN_TRAIN))
        assert result.manifest["counts"]["dpo"]["train"] == 4
        assert result.manifest["counts"]["kto"]["train"] == 4
    finally:
        store.close()


# --------------------------------------------------------------------------------------- TRL


def test_built_datasets_train_one_step_in_trl(store, settings, tiny_model_dir):
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, SFTConfig, SFTTrainer

    from training.chat_template import training_template_for

    torch.set_num_threads(1)
    seed_every_feedback_kind(store)
    u = _user(store, "bob")
    _seed_conversations(store, u, 0, 4)
    snap = build_datasets(store, settings, BuildOptions(**ALL_IN_TRAIN)).path

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = training_template_for(tok)  # {% generation %} markers for assistant-only loss
    common = dict(use_cpu=True, bf16=False, activation_checkpointing=False, max_steps=1, learning_rate=1e-3,
                  per_device_train_batch_size=2, max_length=128, report_to="none", save_strategy="no",
                  logging_steps=1)
    runs = [("sft", SFTTrainer, SFTConfig(output_dir=str(settings.home / "sft"), assistant_only_loss=True, **common)),
            ("dpo", DPOTrainer, DPOConfig(output_dir=str(settings.home / "dpo"), **common)),
            ("kto", KTOTrainer, KTOConfig(output_dir=str(settings.home / "kto"), **common))]
    for kind, trainer_cls, args in runs:
        train = load_split(snap, kind, "train")
        assert len(train) >= 2
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        trainer = trainer_cls(model=model, args=args, train_dataset=train, processing_class=tok,
                              peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                     task_type="CAUSAL_LM"))
        out = trainer.train()
        assert trainer.state.global_step == 1, kind
        assert math.isfinite(out.training_loss), kind
        lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
        assert lora_b and any(p.detach().abs().sum() > 0 for p in lora_b), f"{kind}: the step changed nothing"


def test_only_the_last_answer_of_a_conversation_row_is_trained(tiny_model_dir):
    """A multi-turn SFT row carries the conversation's history as it was served, earlier answers included (some
    disliked or edited): assistant-only loss must score the row's own answer alone, with the text unchanged."""
    from transformers import AutoTokenizer

    from training.chat_template import renders_identically, training_template_for

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    stock = tok.chat_template
    template = training_template_for(tok)
    assert template is not None
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "First question?"},
                {"role": "assistant", "content": "A disliked old answer."},
                {"role": "user", "content": "Second question?"}, {"role": "assistant", "content": "The target answer."}]
    tok.chat_template = template
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    trained = tok.decode([t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m])
    assert trained == "The target answer.<|im_end|>"
    tok.chat_template = stock
    assert tok.apply_chat_template(messages, tokenize=False) == (
        tok.apply_chat_template(messages, tokenize=False, chat_template=template))
    assert renders_identically(tok, template, [messages, messages[:3], messages[:4]])
    # TRL's own check that the stop token is trained (it renders user, assistant, user) finds <|im_end|> marked:
    # without it every SFT job logged "the model may not learn to stop".
    from trl.chat_template_utils import is_chat_template_stop_token_trained

    assert is_chat_template_stop_token_trained(tok, chat_template=template)


# --------------------------------------------------------------------------------------- CLI


def test_cli_build_and_list(store, settings):
    from typer.testing import CliRunner

    from training.cli import app

    seed_every_feedback_kind(store)
    runner = CliRunner()
    home = ["--home", str(settings.home)]
    out = runner.invoke(app, ["build", *home, "--split", "1,0,0", "--replay-ratio", "0"])
    assert out.exit_code == 0, out.output
    assert "v0001:" in out.output and "dpo: train 4, validation 0, test 0" in out.output
    out = runner.invoke(app, ["build", *home, "--json", "--no-teacher", "--replay-ratio", "0", "--distractors", "2",
                              "--abstain-rows", "0.25", "--max-style-share", "0.5"])
    assert out.exit_code == 0, out.output
    manifest = json.loads(out.output[out.output.index("{"):])
    assert manifest["version"] == "v0002" and manifest["inputs"]["teacher_pairs_accepted"] == 0
    chosen = [manifest["options"][k] for k in ("distractor_passages", "abstain_rows", "max_style_share")]
    assert chosen == [2, 0.25, 0.5]
    assert "teacher:teacher" not in manifest["by_source"]["dpo"]["train"]
    listing = runner.invoke(app, ["list", *home])
    assert listing.exit_code == 0 and "v0002 (latest)" in listing.output and "v0001" in listing.output
    bad = runner.invoke(app, ["build", *home, "--split", "0.5,0.5"])
    assert bad.exit_code == 2 and "three numbers" in bad.output
    bad = runner.invoke(app, ["build", *home, "--distractors", "-1"])
    assert bad.exit_code == 2 and "distractor_passages" in bad.output
    assert [p.name for p in list_snapshots(settings)] == ["v0001", "v0002"]


def test_an_answer_chosen_later_for_an_earlier_question_sits_in_its_place_in_later_prompts(store, settings):
    """Regenerate-and-choose on the first answer after a second turn: the chosen answer is stored last,
    but the second answer's training prompt shows it right after the first question."""
    u = _user(store)
    c = store.create_conversation(u.id, "two turns")
    q1, a1 = store.add_turn(c.id, "Which port does the VPN client use?", "It uses some port, probably.")
    _, a2 = store.add_turn(c.id, "And which protocol?", "The client speaks WireGuard over UDP.")
    chosen = store.add_message(c.id, "assistant", "The VPN client uses port 51820.", parent_id=q1.id,
                               status="alternative")
    store.add_pair(u.id, a1.id, chosen.id, chosen.id)
    store.set_message_status(chosen.id, "complete")
    store.set_message_status(a1.id, "alternative")
    store.add_thumb(u.id, a2.id, 1)
    result = build_datasets(store, settings, BuildOptions(**ALL_IN_TRAIN))
    [row] = [r for r in _rows(result.path, "sft", "train") if r["message_id"] == a2.id]
    turns = [(m["role"], m["content"]) for m in row["messages"] if m["role"] != "system"]
    assert turns[:2] == [("user", "Which port does the VPN client use?"),
                         ("assistant", "The VPN client uses port 51820.")]
    assert turns[-2:] == [("user", "And which protocol?"), ("assistant", "The client speaks WireGuard over UDP.")]


# --------------------------------------------------------------------------------------- passages (issue 26)

LIBRARY = {"plans.md": b"# Plans\n\nThe LUMEN-77 plan costs 8 dollars per member per month.",
           "boats.md": b"# Boats\n\nThe harbour ferry leaves pier 4 every 20 minutes.",
           "garden.md": b"# Garden\n\nTomatoes are watered at dawn in the north greenhouse.",
           "trains.md": b"# Trains\n\nThe night train to Ostend departs from platform 9."}
PRIVATE_DIARY = b"# Diary\n\nPRIVATE-MARKER-31: my LUMEN-77 invoice is overdue and the ferry was late."


def _library(store, kb):
    """Four shared documents and one private one; alice asked two questions about the plans, citing the plans'
    chunk (and, once, her private diary), and a teacher pair cites the boats' chunk with a citation mark."""
    alice = _user(store)
    docs = {name: kb.ingest(alice, name, data, scope="shared") for name, data in LIBRARY.items()}
    diary = kb.ingest(alice, "diary.md", PRIVATE_DIARY, scope="private")
    chunk = {name: kb.document_chunks(alice, d.doc_id)[0] for name, d in docs.items()}
    private = kb.document_chunks(alice, diary.doc_id)[0]
    plans = {"doc_id": docs["plans.md"].doc_id, "chunk_id": chunk["plans.md"].chunk_id, "scope": "shared"}
    for question, answer, sources in (
            ("What does the LUMEN-77 plan cost?", "It costs 8 dollars per member per month.", [plans]),
            ("How much is LUMEN-77 a month?", "8 dollars a member, every month.",
             [plans, {"doc_id": diary.doc_id, "chunk_id": private.chunk_id, "scope": "private"}])):
        c = store.create_conversation(alice.id, question)
        _, a = store.add_turn(c.id, question, answer, sources=sources)
        store.add_thumb(alice.id, a.id, 1)
    pair = TeacherPair(doc_id=docs["boats.md"].doc_id, chunk_id=chunk["boats.md"].chunk_id, chunk_sha256="0" * 64,
                       question="How often does the harbour ferry leave?", question_source="template",
                       answer="Every 20 minutes, from pier 4 [1].", accepted=True, score=0.9, teacher="test-teacher")
    SyntheticPairs(store).add(pair)
    return alice, docs, chunk


def test_distractor_passages_shuffle_other_shared_documents_in(store, settings, tiny_embedder_dir):
    """RAFT-style rows: every grounded train SFT row shows its own passage among N passages of other shared
    documents, in a stable order; a private chunk never appears; the answer's "[1]" follows its passage."""
    from memory.knowledge import KnowledgeBase

    s = settings.model_copy(update={"embedder": str(tiny_embedder_dir)})
    kb = KnowledgeBase(s)
    try:
        alice, docs, chunk = _library(store, kb)
        doc_of = {c.chunk_id: name for name, c in chunk.items()}
        plain = build_datasets(store, s, BuildOptions(**ALL_IN_TRAIN), knowledge=kb)
        assert {len(r["passage_ids"]) for r in _rows(plain.path, "sft", "train")} == {1}  # off: rows as served

        options = BuildOptions(**ALL_IN_TRAIN, distractor_passages=2)
        built = build_datasets(store, s, options, knowledge=kb)
        rows = _rows(built.path, "sft", "train")
        assert len(rows) == 3 and built.manifest["passage_rows"]["distractors"]["rows"] == 3
        for r in rows:
            own = chunk["boats.md" if r["source"] == "teacher" else "plans.md"]
            ids = r["passage_ids"]
            assert len(ids) == 3 and own.chunk_id in ids and len(set(ids)) == 3
            assert [doc_of[c] for c in ids].count(doc_of[own.chunk_id]) == 1  # no other chunk of its own document
            turn = r["messages"][-2]["content"]
            assert turn.count("(shared document)") == 3 and own.text.splitlines()[-1] in turn
            for cid in ids:  # every passage shown is the shared chunk named, in the order named
                assert kb.shared_chunks([cid])[cid][1].splitlines()[-1] in turn
            assert turn.index(kb.shared_chunks([ids[0]])[ids[0]][1][-20:]) < turn.index(
                kb.shared_chunks([ids[2]])[ids[2]][1][-20:])
            if r["source"] == "teacher":
                place = ids.index(own.chunk_id) + 1
                assert r["messages"][-1]["content"] == f"Every 20 minutes, from pier 4 [{place}]."
        # the passages differ between rows, but not between builds: the choice is a salted hash
        again = build_datasets(store, s, options, knowledge=kb)
        assert [(r["passage_ids"], r["messages"]) for r in _rows(again.path, "sft", "train")] == [
            (r["passage_ids"], r["messages"]) for r in rows]
        salted = build_datasets(store, s, BuildOptions(**ALL_IN_TRAIN, distractor_passages=2, split_salt="other"),
                                knowledge=kb)
        assert sorted(map(tuple, (r["passage_ids"] for r in _rows(salted.path, "sft", "train")))) != sorted(
            map(tuple, (r["passage_ids"] for r in rows)))
        for data in _all_bytes(s.datasets_dir).values():
            assert b"PRIVATE-MARKER-31" not in data
        # validation and test rows stay as served: the gate judges the prompts users send
        held = build_datasets(store, s, BuildOptions(split_ratios=(0.01, 0.0, 0.99), replay_ratio=0.0,
                                                     heldout_min_rows=10_000, distractor_passages=2), knowledge=kb)
        assert {len(r["passage_ids"]) for r in _rows(held.path, "sft", "test")} == {1}
    finally:
        kb.close()
    with pytest.raises(ValueError, match="distractor_passages"):
        BuildOptions(distractor_passages=-1).validate()


def test_title_negatives_prefer_each_grounded_answer_over_its_documents_title(store, settings, tiny_embedder_dir):
    """A DPO pair per grounded train SFT row: the answer chosen over the cited document's title, in the prompt as
    served (its own passage, not the distractors shuffled into the SFT row); off by default."""
    from memory.knowledge import KnowledgeBase

    s = settings.model_copy(update={"embedder": str(tiny_embedder_dir)})
    kb = KnowledgeBase(s)
    try:
        alice, docs, chunk = _library(store, kb)
        off = build_datasets(store, s, BuildOptions(**ALL_IN_TRAIN), knowledge=kb)
        assert not [r for r in _rows(off.path, "dpo", "train") if r["origin"] == "title_negative"]
        assert off.manifest["passage_rows"]["title_negatives"] == {"on": False, "added": 0}
        built = build_datasets(store, s, BuildOptions(**ALL_IN_TRAIN, title_negatives=True, distractor_passages=2),
                               knowledge=kb)
        pairs = [r for r in _rows(built.path, "dpo", "train") if r["origin"] == "title_negative"]
        sft = {r["messages"][-2]["content"].rsplit("My question: ", 1)[-1]: r
               for r in _rows(built.path, "sft", "train")}
        assert len(pairs) == 3 and built.manifest["passage_rows"]["title_negatives"]["added"] == 3
        title_of = {chunk[name].chunk_id: docs[name].title for name in LIBRARY}
        for r in pairs:
            question = r["prompt"][-1]["content"].rsplit("My question: ", 1)[-1]
            assert len(r["passage_ids"]) == 1 and r["rejected"][0]["content"] == title_of[r["passage_ids"][0]]
            assert len(sft[question]["passage_ids"]) == 3  # the SFT row got its distractors; the pair did not
            assert r["chosen"][0]["content"].split("[")[0] == sft[question]["messages"][-1]["content"].split("[")[0]
        assert {r["rejected"][0]["content"] for r in pairs} == {docs["plans.md"].title, docs["boats.md"].title}
        from training.loop import build_options
        assert build_options({"title_negatives": True}).title_negatives  # a retrain's `build` params take it
        with pytest.raises(ValueError, match="title_negatives must be true or false"):
            build_options({"title_negatives": "yes"})
        for data in _all_bytes(s.datasets_dir).values():
            assert b"PRIVATE-MARKER-31" not in data
    finally:
        kb.close()


def test_abstain_rows_pair_a_question_with_passages_that_do_not_hold_its_answer(store, settings, tiny_embedder_dir):
    """Honest rows: a grounded question with other shared documents' passages only, answered with a sentence the
    loop bench counts as "the documents do not say"; never a private chunk, as many passages as a grounded row."""
    from bench.loop import abstains as bench_abstains
    from memory.knowledge import KnowledgeBase
    from training.fact_check import ABSTAIN_ANSWER, abstains

    assert abstains(ABSTAIN_ANSWER) and bench_abstains(ABSTAIN_ANSWER)
    s = settings.model_copy(update={"embedder": str(tiny_embedder_dir)})
    kb = KnowledgeBase(s)
    try:
        alice, docs, chunk = _library(store, kb)
        doc_of = {c.chunk_id: name for name, c in chunk.items()}
        built = build_datasets(store, s, BuildOptions(**ALL_IN_TRAIN, abstain_rows=1.0), knowledge=kb)
        rows = _rows(built.path, "sft", "train")
        honest = [r for r in rows if r["origin"] == "abstain"]
        grounded = [r for r in rows if r["origin"] != "abstain"]
        assert len(grounded) == 3 and len(honest) == 3
        assert built.manifest["passage_rows"]["abstain"]["added"] == 3
        assert built.manifest["by_source"]["sft"]["train"]["human:abstain"] == 2
        questions = {r["messages"][-2]["content"].rsplit("My question: ", 1)[-1]: r for r in grounded}
        for r in honest:
            assert r["messages"][-1]["content"] == ABSTAIN_ANSWER
            source = questions[r["messages"][-2]["content"].rsplit("My question: ", 1)[-1]]
            own = doc_of[source["passage_ids"][0]]
            assert len(r["passage_ids"]) == 1 and doc_of[r["passage_ids"][0]] != own
            assert (r["source"], r["group"], r["message_id"]) == (source["source"], source["group"],
                                                                  source["message_id"])
        # with distractors, an honest row shows as many passages as a grounded one, all of other documents
        both = BuildOptions(**ALL_IN_TRAIN, abstain_rows=0.5, distractor_passages=2)
        mixed = build_datasets(store, s, both, knowledge=kb)
        rows = _rows(mixed.path, "sft", "train")
        honest = [r for r in rows if r["origin"] == "abstain"]
        assert len(honest) == 2 and {len(r["passage_ids"]) for r in rows} == {3}
        for r in honest:
            question = r["messages"][-2]["content"].rsplit("My question: ", 1)[-1]
            own = "boats.md" if "ferry" in question else "plans.md"
            assert sorted(doc_of[c] for c in r["passage_ids"]) == sorted(set(LIBRARY) - {own})
        again = build_datasets(store, s, both, knowledge=kb)
        assert _rows(again.path, "sft", "train") == rows
        for data in _all_bytes(s.datasets_dir).values():
            assert b"PRIVATE-MARKER-31" not in data
    finally:
        kb.close()
    with pytest.raises(ValueError, match="abstain_rows"):
        BuildOptions(abstain_rows=1.5).validate()


def test_style_rows_are_capped_against_grounded_rows(store, settings, tiny_embedder_dir):
    """max_style_share: users' SFT rows of answers given the reason "style" (edited or liked for it) keep to that
    share of style plus grounded train rows; the rest of the build is untouched and the manifest says what went."""
    from memory.knowledge import KnowledgeBase

    s = settings.model_copy(update={"embedder": str(tiny_embedder_dir)})
    kb = KnowledgeBase(s)
    try:
        alice, _, _ = _library(store, kb)  # three grounded rows: two liked answers and a teacher pair
        topics = ["the office kettle", "the bicycle shed", "the printer queue", "the parking rota", "the fire door"]
        style_ids = set()
        for i, topic in enumerate(topics):
            c = store.create_conversation(alice.id, topic)
            _, a = store.add_turn(c.id, f"Tell me about {topic}.", f"Here is a long ramble about {topic} ...")
            style_ids.add(a.id)
            if i == 0:  # liked for its style
                store.add_thumb(alice.id, a.id, 1, reason="style")
            else:  # rated down for its style and restyled
                store.add_thumb(alice.id, a.id, -1, reason="style")
                store.add_edit(alice.id, a.id, f"Lumen Desk: {topic} is covered in the handbook.")

        def build(share: float):
            built = build_datasets(store, s, BuildOptions(**ALL_IN_TRAIN, max_style_share=share), knowledge=kb)
            rows = _rows(built.path, "sft", "train")
            return built, [r for r in rows if r["message_id"] in style_ids], [r for r in rows
                                                                               if r["message_id"] not in style_ids]

        whole, style, other = build(1.0)
        assert len(style) == 5 and len(other) == 3
        assert whole.manifest["style_cap"] == {"share": 1.0, "style_rows": 5, "grounded_rows": 3, "allowed": 5,
                                               "removed": 0}
        chosen = {}
        for share, kept in ((0.5, 3), (0.25, 1), (0.0, 0)):
            built, capped, rest = build(share)
            chosen[share] = [r["message_id"] for r in capped]
            assert len(capped) == kept and rest == other  # only style rows go
            assert {r["message_id"] for r in capped} <= style_ids
            assert built.manifest["style_cap"]["removed"] == 5 - kept
            removed = {f["name"]: f["removed"] for f in built.manifest["filters"]["sft"]}
            assert removed.get("style_cap", 0) == 5 - kept
            assert built.counts("dpo")["train"] == whole.counts("dpo")["train"]  # SFT rows only
        assert [r["message_id"] for r in build(0.25)[1]] == chosen[0.25]  # a stable choice
        assert set(chosen[0.25]) < set(chosen[0.5])
    finally:
        kb.close()
    with pytest.raises(ValueError, match="max_style_share"):
        BuildOptions(max_style_share=-0.1).validate()
