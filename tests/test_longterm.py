"""Long-term memory on the real SQL store: remember, supersede with lineage, edit, forget for good, recall.

Slot-based facts and bookkeeping use the tiny random embedder; similarity-based superseding and
recall relevance depend on real vectors and use the embedded all-MiniLM-L6-v2 (marked slow).
"""

from __future__ import annotations

import re

import pytest
import sqlalchemy as sa

from assistant.config import Settings
from memory.longterm import (
    LongTermMemory,
    extract_facts,
    forget_request,
    remember_request,
)
from memory.schema import memories, memory_tombstones


@pytest.fixture
def mem(settings: Settings, store, tiny_embedder_dir) -> LongTermMemory:
    return LongTermMemory(settings.model_copy(update={"embedder": str(tiny_embedder_dir)}), store)


@pytest.fixture
def real_mem(settings: Settings, store) -> LongTermMemory:
    return LongTermMemory(settings, store)


@pytest.fixture
def alice(store):
    return store.create_user("alice", "pw-alice")


@pytest.fixture
def bob(store):
    return store.create_user("bob", "pw-bob")


def rows(mem: LongTermMemory, table: sa.Table = memories) -> list:
    with mem.engine.connect() as conn:
        return list(conn.execute(sa.select(table)))


# ---------------------------------------------------------------------------------------- extraction
@pytest.mark.parametrize(("message", "expected"), [
    ("My name is Bob.", [("My name is Bob.", "fact", "name", "Bob")]),
    ("Hi! my name is Alice and I live in Berlin, Germany.",
     [("My name is Alice.", "fact", "name", "Alice"), ("I live in Berlin.", "fact", "location", "Berlin")]),
    ("Please remember that my dog is called Rex", [("My dog is called Rex.", "fact", "my:dog", "Rex")]),
    ("remember: the wifi password rotates on Mondays",
     [("The wifi password rotates on Mondays.", "note", None, "the wifi password rotates on Mondays")]),
    ("I prefer short answers.", [("I prefer short answers.", "preference", None, "short answers")]),
    ("My favorite color is green.", [("My favourite color is green.", "fact", "favourite:color", "green")]),
    ("I prefer short answers, and my timezone is CET",
     [("I prefer short answers.", "preference", None, "short answers"),
      ("My timezone is CET.", "fact", "my:timezone", "CET")]),
    ("What is my name?", []),
    ("If my name is Bob, what would my nickname be?", []),
    ("my name is not Bob", []),
    ("my question is how to reset the VPN", []),
    ("I like this answer", []),
    ("never mind", []),
    ("Can you summarise the expense policy?", []),
])
def test_extract_facts(message: str, expected: list[tuple]):
    assert [(c.text, c.kind, c.slot, c.value) for c in extract_facts(message)] == expected


def test_command_detection():
    assert remember_request("Please remember that I take the 7:10 train") == "I take the 7:10 train"
    assert remember_request("remember: lunch at noon") == "lunch at noon"
    assert remember_request("Do you remember my name?") is None
    assert forget_request("Please forget my name.") == "my name"
    assert forget_request("forget that I like tea") == "I like tea"
    assert forget_request("I always forget my keys") is None


# ---------------------------------------------------------------------------------------- bookkeeping
def test_remember_and_exact_duplicates(mem: LongTermMemory, alice):
    first = mem.remember(alice.id, "My name is Bob.", slot="name")
    again = mem.remember(alice.id, "  my name is   BOB ", slot="name")
    assert first.action == "added" and again.action == "duplicate" and again.memory.id == first.memory.id
    assert [m.text for m in mem.list(alice.id)] == ["My name is Bob."]
    assert len(rows(mem)) == 1
    got = mem.get(alice.id, first.memory.id)
    assert got is not None and (got.kind, got.slot, got.source, got.status) == ("fact", "name", "explicit", "active")


def test_newer_fact_for_the_same_slot_supersedes_with_lineage(mem: LongTermMemory, alice):
    old = mem.remember(alice.id, "My name is Bob.", slot="name").memory
    done = mem.remember(alice.id, "My name is Robert.", slot="name", source="extracted")
    assert done.action == "superseded" and [m.id for m in done.replaced] == [old.id]
    assert [m.text for m in mem.list(alice.id)] == ["My name is Robert."]
    history = mem.list(alice.id, include_history=True)
    assert {(m.text, m.status) for m in history} == {("My name is Robert.", "active"),
                                                     ("My name is Bob.", "superseded")}
    before = mem.get(alice.id, old.id)
    assert before is not None and before.superseded_by == done.memory.id
    assert [m.id for m in mem.history(alice.id, done.memory.id)] == [done.memory.id, old.id]
    assert [r.memory.text for r in mem.recall(alice.id, "name", min_score=-1)] == ["My name is Robert."]


def test_learn_from_messages(mem: LongTermMemory, alice):
    got = mem.learn_from(alice.id, "Hi! my name is Alice and I live in Berlin.")
    assert [(r.action, r.memory.text, r.memory.source) for r in got] == [
        ("added", "My name is Alice.", "extracted"), ("added", "I live in Berlin.", "extracted")]
    assert mem.learn_from(alice.id, "What is my name?") == []
    assert [r.action for r in mem.learn_from(alice.id, "my name is Alice.")] == ["duplicate"]
    assert mem.learn_from(alice.id, "Forget that my name is Alice") == []  # a forget request teaches nothing
    moved = mem.learn_from(alice.id, "Actually, I live in Oslo now.")
    assert [(r.action, r.memory.text) for r in moved] == [("superseded", "I live in Oslo.")]
    assert [m.text for m in moved[0].replaced] == ["I live in Berlin."]
    assert sorted(m.text for m in mem.list(alice.id)) == ["I live in Oslo.", "My name is Alice."]


def test_edit_is_a_new_version(mem: LongTermMemory, alice):
    m = mem.remember(alice.id, "I prefer short answers.", kind="preference").memory
    new = mem.edit(alice.id, m.id, "I prefer short answers with one example.")
    assert (new.source, new.kind, new.status) == ("edit", "preference", "active")
    assert [x.text for x in mem.list(alice.id)] == ["I prefer short answers with one example."]
    assert mem.get(alice.id, m.id).superseded_by == new.id
    with pytest.raises(LookupError):
        mem.edit(alice.id, m.id, "editing a superseded version")
    with pytest.raises(ValueError):
        mem.edit(alice.id, new.id, "   ")


def test_forget_deletes_every_version_and_keeps_only_digests(mem: LongTermMemory, alice, bob):
    mem.remember(alice.id, "My name is Bob.", slot="name")
    current = mem.remember(alice.id, "My name is Robert.", slot="name").memory
    keep = mem.remember(alice.id, "I live in Bergen.", slot="location").memory
    mem.remember(bob.id, "My name is Robert.", slot="name")

    assert mem.forget(alice.id, current.id) == 2
    texts = [r.text for r in rows(mem) if r.user_id == alice.id]
    assert texts == ["I live in Bergen."]
    assert [m.id for m in mem.list(alice.id, include_history=True)] == [keep.id]
    assert all("name" not in r.memory.text for r in mem.recall(alice.id, "what is my name", min_score=-1))
    stones = rows(mem, memory_tombstones)
    assert stones and all(re.fullmatch(r"[0-9a-f]{64}", s.digest) for s in stones)
    assert all(s.user_id == alice.id for s in stones)
    # what training-data hygiene asks: does a text mention something this user had forgotten?
    assert mem.contains_forgotten(alice.id, "Robert called about the meeting")
    assert mem.contains_forgotten(alice.id, "Hello, this is BOB.")  # the older version is gone too
    assert not mem.contains_forgotten(alice.id, "Bergen is rainy")
    assert not mem.contains_forgotten(bob.id, "Robert called about the meeting")
    with pytest.raises(LookupError):
        mem.forget(alice.id, current.id)


def test_users_never_see_each_others_memories(mem: LongTermMemory, alice, bob):
    secret = mem.remember(alice.id, "My bank PIN hint is the dog's birthday.", kind="note").memory
    assert mem.list(bob.id) == [] and mem.recall(bob.id, "bank PIN hint", min_score=-1) == []
    assert mem.get(bob.id, secret.id) is None and mem.history(bob.id, secret.id) == []
    with pytest.raises(LookupError):
        mem.forget(bob.id, secret.id)
    with pytest.raises(LookupError):
        mem.edit(bob.id, secret.id, "hijacked")
    assert mem.forget_matching(bob.id, "everything") == []
    assert [m.text for m in mem.list(alice.id)] == ["My bank PIN hint is the dog's birthday."]


@pytest.mark.parametrize(("text", "kwargs", "error"), [
    ("", {}, ValueError), ("   \n ", {}, ValueError), ("x" * 501, {}, ValueError), ("a\x00b", {}, ValueError),
    (42, {}, ValueError), ("ok", {"kind": "secret"}, ValueError), ("ok", {"source": "model"}, ValueError),
])
def test_bad_memories_are_refused(mem: LongTermMemory, alice, text, kwargs, error):
    with pytest.raises(error):
        mem.remember(alice.id, text, **kwargs)
    assert rows(mem) == []


def test_unknown_user_is_refused(mem: LongTermMemory):
    with pytest.raises(LookupError):
        mem.remember(999, "My name is Ghost.")
    assert rows(mem) == []


# ---------------------------------------------------------------------------------------- real vectors
@pytest.mark.slow
def test_contradicting_preference_supersedes_but_a_compatible_one_does_not(real_mem: LongTermMemory, alice):
    short = real_mem.remember(alice.id, "I prefer short answers.", kind="preference").memory
    long_ = real_mem.remember(alice.id, "I prefer long answers.", kind="preference")
    assert long_.action == "superseded" and [m.id for m in long_.replaced] == [short.id]
    tea = real_mem.remember(alice.id, "I like tea.", kind="preference")
    coffee = real_mem.remember(alice.id, "I like coffee.", kind="preference")
    assert (tea.action, coffee.action) == ("added", "added")
    assert sorted(m.text for m in real_mem.list(alice.id)) == [
        "I like coffee.", "I like tea.", "I prefer long answers."]
    assert [m.text for m in real_mem.preferences(alice.id)][0] == "I like coffee."


@pytest.mark.slow
def test_recall_finds_the_relevant_memory_and_forget_matching(real_mem: LongTermMemory, alice):
    for msg in ("My name is Bob.", "I live in Berlin.", "I prefer short answers.", "My dog is called Rex.",
                "I work as a nurse."):
        real_mem.learn_from(alice.id, msg)
    assert real_mem.recall(alice.id, "What is my dog called?", k=1)[0].memory.text == "My dog is called Rex."
    assert real_mem.recall(alice.id, "Which city do I live in?", k=1)[0].memory.text == "I live in Berlin."
    assert real_mem.recall(alice.id, "What do I do for a living?", k=1)[0].memory.text == "I work as a nurse."
    assert real_mem.recall(alice.id, "quantum chromodynamics lattice gauge", k=5, min_score=0.3) == []

    assert [m.text for m in real_mem.forget_matching(alice.id, "my name")] == ["My name is Bob."]
    assert [m.text for m in real_mem.forget_matching(alice.id, "that I'm a nurse")] == ["I work as a nurse."]
    assert real_mem.forget_matching(alice.id, "my favourite football club") == []
    assert sorted(m.text for m in real_mem.list(alice.id)) == [
        "I live in Berlin.", "I prefer short answers.", "My dog is called Rex."]
