"""The conversation store on real SQLite and (when ASSISTANT_TEST_PG_URL is set) real PostgreSQL.

Every test runs once per backend; the PostgreSQL run gets a fresh schema of its own.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from argon2 import PasswordHasher

from memory import schema as tables
from memory.db import utcnow, write_transaction
from memory.migrations import latest_version
from memory.store import FeedbackLog, Store
from memory.types import REASON_TAGS
from tests.conftest import fast_password_hasher


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, settings) -> str:
    if request.param == "sqlite":
        return settings.db_url
    return request.getfixturevalue("pg_url")


@pytest.fixture
def store(db_url):
    s = Store.open(db_url, password_hasher=fast_password_hasher())
    yield s
    s.close()


@pytest.fixture
def alice(store):
    return store.create_user("alice", "alice-pw")


@pytest.fixture
def bob(store):
    return store.create_user("bob", "bob-pw")


def rows(store: Store, table: sa.Table, *where) -> list:
    with store.engine.connect() as conn:
        return conn.execute(sa.select(table).where(*where)).fetchall()


def snapshot(store: Store) -> dict:
    """Every row of every table, to prove that a failed call changed nothing."""
    with store.engine.connect() as conn:
        return {t.name: sorted(tuple(map(str, r)) for r in conn.execute(sa.select(t)))
                for t in tables.metadata.sorted_tables}


def chat(store: Store, user, n_turns: int = 1, title: str = "chat"):
    conv = store.create_conversation(user.id, title)
    answers = [store.add_turn(conv.id, f"question {i}", f"answer {i}")[1] for i in range(n_turns)]
    return conv, answers


# ------------------------------------------------------------------------------------------ users


def test_users_roles_and_passwords(store):
    alice = store.create_user("alice", "s3cret")
    admin = store.create_user("root", "admin-pw", role="admin")
    assert (alice.username, alice.role, alice.is_admin) == ("alice", "user", False)
    assert admin.is_admin
    assert alice.created_at.tzinfo is not None and alice.created_at.utcoffset().total_seconds() == 0
    assert store.get_user(alice.id) == alice
    assert store.get_user_by_name("alice") == alice
    assert store.get_user(10_000) is None and store.get_user_by_name("nobody") is None
    assert [u.username for u in store.list_users()] == ["alice", "root"]

    assert store.authenticate("alice", "s3cret") == alice
    assert store.authenticate("alice", "wrong") is None
    assert store.authenticate("nobody", "s3cret") is None
    assert store.authenticate("alice", "") is None

    # Only an argon2 hash is stored, never the password.
    (row,) = rows(store, tables.users, tables.users.c.id == alice.id)
    assert row.password_hash.startswith("$argon2id$") and "s3cret" not in row.password_hash

    store.set_password(alice.id, "new-pw")
    assert store.authenticate("alice", "s3cret") is None
    assert store.authenticate("alice", "new-pw") == alice
    with pytest.raises(LookupError):
        store.set_password(10_000, "x")
    with pytest.raises(ValueError):
        store.set_password(alice.id, "")

    store.set_role(alice.id, "admin")
    assert store.get_user(alice.id).is_admin
    with pytest.raises(ValueError):
        store.set_role(alice.id, "superuser")


@pytest.mark.parametrize(
    ("username", "password", "role"),
    [("alice", "pw", "user"),  # duplicate (created below first)
     ("", "pw", "user"), ("   ", "pw", "user"), ("has space", "pw", "user"), ("x" * 65, "pw", "user"),
     ("carol", "", "user"), ("carol", "pw", "owner"), ("carol", "pw", "")],
)
def test_create_user_rejects_bad_input(store, username, password, role):
    store.create_user("alice", "pw")
    before = snapshot(store)
    with pytest.raises(ValueError):
        store.create_user(username, password, role)
    assert snapshot(store) == before


def test_authenticate_upgrades_weak_hash(db_url):
    weak = Store.open(db_url, password_hasher=fast_password_hasher())
    user = weak.create_user("alice", "pw")
    weak.close()
    with Store.open(db_url) as strong:  # production defaults
        assert strong.authenticate("alice", "pw") == user
        (row,) = rows(strong, tables.users)
        assert not PasswordHasher().check_needs_rehash(row.password_hash)
        assert strong.authenticate("alice", "pw") == user


def test_api_key_round_trip_and_revoke(store, alice, bob):
    key = store.create_api_key(alice.id, "laptop")
    other = store.create_api_key(alice.id)
    assert key.startswith("sk-") and len(key) > 40 and key != other
    assert store.user_for_api_key(key) == alice
    assert store.user_for_api_key(other) == alice

    listed = store.list_api_keys(alice.id)
    assert [k["name"] for k in listed] == ["laptop", "default"]
    assert set(listed[0]) == {"id", "name", "prefix", "created_at"}
    assert key.startswith(listed[0]["prefix"]) and len(listed[0]["prefix"]) < 16
    assert store.list_api_keys(bob.id) == []
    # The plaintext key is stored nowhere.
    assert key not in str(snapshot(store))

    for bad in ("", "sk-", key + "x", key[:-1], "Bearer " + key, None, 42):
        assert store.user_for_api_key(bad) is None

    assert store.revoke_api_key(bob.id, listed[0]["id"]) is False  # not his
    assert store.user_for_api_key(key) == alice
    assert store.revoke_api_key(alice.id, listed[0]["id"]) is True
    assert store.user_for_api_key(key) is None
    assert store.user_for_api_key(other) == alice
    assert store.revoke_api_key(alice.id, listed[0]["id"]) is False
    with pytest.raises(LookupError):
        store.create_api_key(10_000)
    with pytest.raises(ValueError):
        store.create_api_key(alice.id, " ")


# ------------------------------------------------------------------------------------------ conversations


def test_conversations_listed_newest_updated_first(store, alice, bob):
    first = store.create_conversation(alice.id, "first")
    second = store.create_conversation(alice.id, "second", source="api")
    store.create_conversation(bob.id, "bob's")
    assert [c.id for c in store.list_conversations(alice.id)] == [second.id, first.id]
    assert store.get_conversation(second.id, alice.id).source == "api"

    store.add_turn(first.id, "hi", "hello")
    assert [c.id for c in store.list_conversations(alice.id)] == [first.id, second.id]
    assert store.get_conversation(first.id, alice.id).updated_at > first.updated_at

    assert store.rename_conversation(second.id, alice.id, "  renamed  ") is True
    assert store.get_conversation(second.id, alice.id).title == "renamed"
    assert store.list_conversations(alice.id)[0].id == second.id
    for bad in ("", "   ", "x" * 201):
        with pytest.raises(ValueError):
            store.rename_conversation(second.id, alice.id, bad)
    with pytest.raises(ValueError):
        store.create_conversation(alice.id, "")
    with pytest.raises(LookupError):
        store.create_conversation(10_000)
    assert store.rename_conversation(10_000, alice.id, "x") is False
    assert store.delete_conversation(10_000, alice.id) is False


def test_ownership_isolation(store, alice, bob):
    conv, (answer,) = chat(store, alice)
    conv, (answer2,) = conv, [store.add_turn(conv.id, "again", "second answer")[1]]
    store.add_thumb(alice.id, answer.id, 1)
    before = snapshot(store)

    assert store.get_conversation(conv.id, bob.id) is None
    assert store.list_conversations(bob.id) == []
    assert store.rename_conversation(conv.id, bob.id, "pwned") is False
    assert store.delete_conversation(conv.id, bob.id) is False
    assert store.get_message(answer.id, bob.id) is None
    with pytest.raises(PermissionError):
        store.messages(conv.id, user_id=bob.id)
    with pytest.raises(PermissionError):
        store.add_thumb(bob.id, answer.id, -1, "wrong")
    with pytest.raises(PermissionError):
        store.add_edit(bob.id, answer.id, "a different answer")
    with pytest.raises(PermissionError):
        store.add_pair(bob.id, answer.id, answer2.id, answer2.id)
    (alices_thumb,) = store.feedback_for_message(answer.id)
    assert store.delete_feedback(bob.id, alices_thumb.id) is False

    assert snapshot(store) == before
    # The owner still sees everything.
    assert store.get_conversation(conv.id, alice.id).title == "chat"
    assert store.get_message(answer.id, alice.id) == answer
    assert [m.content for m in store.messages(conv.id, user_id=alice.id)] == [
        "question 0", "answer 0", "again", "second answer"]
    with pytest.raises(LookupError):
        store.messages(10_000, user_id=alice.id)


# ------------------------------------------------------------------------------------------ messages


def test_add_turn_stores_both_messages_with_metadata(store, alice):
    conv = store.create_conversation(alice.id)
    meta = dict(adapter="v3", generation={"temperature": 0.7, "seed": 1, "model": "smollm2"},
                sources=[{"doc": "guide.pdf", "chunk": 3, "score": 0.81}],
                memories=[{"id": 9, "text": "prefers short answers"}],
                steps=[{"tool": "search", "args": {"q": "x"}, "ms": 12}])
    user_msg, answer = store.add_turn(conv.id, "What is LoRA?", "A low-rank adapter.", **meta)
    assert (user_msg.role, user_msg.content, user_msg.parent_id) == ("user", "What is LoRA?", None)
    assert (answer.role, answer.parent_id, answer.status) == ("assistant", user_msg.id, "complete")
    assert store.messages(conv.id) == [user_msg, answer]
    stored = store.get_message(answer.id)
    assert (stored.adapter, stored.generation, stored.sources, stored.memories, stored.steps) == (
        meta["adapter"], meta["generation"], meta["sources"], meta["memories"], meta["steps"])
    assert user_msg.generation == {} and user_msg.sources == [] and user_msg.adapter is None
    assert answer.created_at.tzinfo is not None and answer.created_at.utcoffset().total_seconds() == 0
    assert answer.created_at >= user_msg.created_at
    assert store.get_conversation(conv.id, alice.id).updated_at == answer.created_at

    stopped = store.add_message(conv.id, "assistant", "", status="stopped", parent_id=user_msg.id)
    assert stopped.status == "stopped" and store.messages(conv.id)[-1] == stopped
    # The model may stop at once: an empty answer is still logged, so it can be rated.
    _, empty = store.add_turn(conv.id, "Say nothing.", "")
    assert (empty.content, empty.status) == ("", "complete")


def test_set_message_status_after_choosing(store, alice, bob):
    conv, (first,) = chat(store, alice)
    second = store.add_message(conv.id, "assistant", "another answer", parent_id=first.parent_id,
                               status="alternative")
    store.add_pair(alice.id, first.id, second.id, chosen_message_id=second.id)
    store.set_message_status(second.id, "complete", user_id=alice.id)
    store.set_message_status(first.id, "alternative")
    assert [m.status for m in store.messages(conv.id)] == ["complete", "alternative", "complete"]

    before = snapshot(store)
    with pytest.raises(LookupError):
        store.set_message_status(first.id, "complete", user_id=bob.id)  # not his
    with pytest.raises(LookupError):
        store.set_message_status(10_000, "complete")
    with pytest.raises(ValueError):
        store.set_message_status(first.id, "deleted")
    assert snapshot(store) == before


@pytest.mark.parametrize("bad_meta", [
    {"status": "finished"},                     # not a known status
    {"generation": {"when": datetime.now(UTC)}},  # not JSON
    {"sources": "guide.pdf"},                   # not a list
    {"adapter": ""},
    {"parent_id": 1},                           # add_turn sets it itself
    {"bogus": 1},
])
def test_add_turn_is_atomic_on_bad_answer(store, alice, bad_meta):
    conv, _ = chat(store, alice)
    before = snapshot(store)
    with pytest.raises(ValueError):
        store.add_turn(conv.id, "a new question", "an answer", **bad_meta)
    assert snapshot(store) == before


def test_add_turn_rolls_back_user_message_when_answer_insert_fails_in_db(store, alice):
    """The failure comes from the database driver after the user message was inserted."""
    conv, _ = chat(store, alice)
    before = snapshot(store)
    inserts: list[str] = []

    def fail_on_answer(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("INSERT INTO MESSAGES"):
            inserts.append(statement)
            if len(inserts) == 2:
                raise RuntimeError("disk full (injected)")

    sa.event.listen(store.engine, "before_cursor_execute", fail_on_answer)
    try:
        with pytest.raises(RuntimeError, match="disk full"):
            store.add_turn(conv.id, "question", "answer")
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", fail_on_answer)
    assert len(inserts) == 2  # the user message really was inserted first
    assert snapshot(store) == before
    user_msg, answer = store.add_turn(conv.id, "question", "answer")  # the store is still usable
    assert store.messages(conv.id)[-2:] == [user_msg, answer]


def test_schema_rejects_invalid_role_even_past_the_store(store, alice):
    conv = store.create_conversation(alice.id)
    with pytest.raises(sa.exc.IntegrityError), write_transaction(store.engine) as conn:
        conn.execute(tables.messages.insert().values(
            conversation_id=conv.id, role="wizard", content="x", generation={}, sources=[], memories=[],
            steps=[], status="complete", created_at=datetime.now(UTC)))
    assert store.messages(conv.id) == []


def test_add_messages_bulk_is_one_transaction(store, alice):
    conv = store.create_conversation(alice.id)
    out = store.add_messages(conv.id, [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello", "adapter": "v1", "generation": {"top_p": 0.9}},
    ])
    assert [m.role for m in out] == ["system", "user", "assistant"] == [m.role for m in store.messages(conv.id)]
    assert out[2].generation == {"top_p": 0.9}

    before = snapshot(store)
    for bad in (
        [{"role": "user", "content": "ok"}, {"role": "wizard", "content": "no"}],
        [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "ok", "colour": "red"}],
        [{"role": "user", "content": "ok"}, "not a dict"],
        [{"role": "user", "content": "ok"}, {"role": "assistant"}],
        [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "x", "parent_id": 10_000}],
    ):
        with pytest.raises(ValueError):
            store.add_messages(conv.id, bad)
    assert snapshot(store) == before


def test_add_message_validation(store, alice):
    conv, (answer,) = chat(store, alice)
    other, _ = chat(store, alice, title="other")
    with pytest.raises(LookupError):
        store.add_message(10_000, "user", "hi")
    with pytest.raises(ValueError):
        store.add_message(conv.id, "wizard", "hi")
    with pytest.raises(ValueError):
        store.add_message(conv.id, "user", "   ")
    with pytest.raises(ValueError, match="parent_id"):
        store.add_message(other.id, "assistant", "x", parent_id=answer.id)
    assert store.get_message(10_000) is None
    assert store.get_message(answer.id) == answer


def test_delete_conversation_cascades(store, alice):
    conv, answers = chat(store, alice, n_turns=3)
    keep, (kept_answer,) = chat(store, alice, title="keep")
    store.add_thumb(alice.id, answers[0].id, -1, "wrong", "no")
    store.add_edit(alice.id, answers[1].id, "a better answer")
    store.add_pair(alice.id, answers[1].id, answers[2].id, answers[2].id)
    store.add_thumb(alice.id, kept_answer.id, 1)
    ids = [m.id for m in store.messages(conv.id)]

    assert store.delete_conversation(conv.id, alice.id) is True
    assert store.get_conversation(conv.id, alice.id) is None
    assert rows(store, tables.messages, tables.messages.c.id.in_(ids)) == []
    assert rows(store, tables.feedback, sa.or_(tables.feedback.c.message_id.in_(ids),
                                              tables.feedback.c.other_message_id.in_(ids))) == []
    # The other conversation and its feedback are untouched.
    assert len(store.messages(keep.id)) == 2
    assert [f.rating for f in store.feedback_for_message(kept_answer.id)] == [1]
    assert store.counts() == {"users": 1, "conversations": 1, "messages": 2, "thumbs_up": 1,
                              "thumbs_down": 0, "edits": 0, "pairs": 0}
    assert store.integrity_check() is True


# ------------------------------------------------------------------------------------------ feedback


def test_feedback_kinds_and_listing(store, alice):
    conv, (a1, a2) = chat(store, alice, n_turns=2)
    thumb = store.add_thumb(alice.id, a1.id, -1, "wrong", "  the date is off ")
    assert (thumb.kind, thumb.rating, thumb.reason, thumb.comment, thumb.user_id) == (
        "thumb", -1, "wrong", "the date is off", alice.id)
    # A second thumb from the same user replaces the first.
    thumb2 = store.add_thumb(alice.id, a1.id, 1)
    assert [f.id for f in store.feedback_for_message(a1.id)] == [thumb2.id]

    edit = store.add_edit(alice.id, a2.id, "  The corrected answer.  ")
    assert (edit.kind, edit.corrected) == ("edit", "The corrected answer.")
    pair = store.add_pair(alice.id, a1.id, a2.id, chosen_message_id=a2.id)
    assert (pair.kind, pair.message_id, pair.other_message_id, pair.chosen_message_id) == (
        "pair", a1.id, a2.id, a2.id)
    assert [f.kind for f in store.feedback_for_message(a2.id)] == ["edit", "pair"]

    everything = store.list_feedback()
    assert [f.id for f in everything] == [thumb2.id, edit.id, pair.id]
    assert [f.id for f in store.list_feedback(since_id=thumb2.id)] == [edit.id, pair.id]
    assert [f.id for f in store.list_feedback(limit=1)] == [thumb2.id]
    assert store.list_feedback(since_id=pair.id) == []
    assert all(f.created_at.tzinfo is not None for f in everything)

    assert store.delete_feedback(alice.id, thumb2.id) is True
    assert store.feedback_for_message(a1.id) == [pair]
    assert store.counts() == {"users": 1, "conversations": 1, "messages": 4, "thumbs_up": 0,
                              "thumbs_down": 0, "edits": 1, "pairs": 1}


def test_feedback_validation(store, alice):
    conv, (a1, a2) = chat(store, alice, n_turns=2)
    other, (a3,) = chat(store, alice, title="other")
    question = store.messages(conv.id)[0]
    before = snapshot(store)

    for rating in (0, 2, -2, True, 1.0, "1", None):
        with pytest.raises(ValueError):
            store.add_thumb(alice.id, a1.id, rating)
    with pytest.raises(ValueError):
        store.add_thumb(alice.id, a1.id, -1, reason="meh")
    with pytest.raises(ValueError, match="assistant"):
        store.add_thumb(alice.id, question.id, 1)
    with pytest.raises(LookupError):
        store.add_thumb(alice.id, 10_000, 1)

    for corrected in ("", "   ", "answer 0", "  answer 0 "):
        with pytest.raises(ValueError):
            store.add_edit(alice.id, a1.id, corrected)
    with pytest.raises(ValueError):
        store.add_edit(alice.id, question.id, "better")
    with pytest.raises(LookupError):
        store.add_edit(alice.id, 10_000, "better")

    with pytest.raises(ValueError):
        store.add_pair(alice.id, a1.id, a1.id, a1.id)
    with pytest.raises(ValueError):
        store.add_pair(alice.id, a1.id, a2.id, a3.id)  # chosen is not one of the two
    with pytest.raises(ValueError, match="same conversation"):
        store.add_pair(alice.id, a1.id, a3.id, a3.id)
    with pytest.raises(ValueError, match="assistant"):
        store.add_pair(alice.id, a1.id, question.id, a1.id)
    with pytest.raises(LookupError):
        store.add_pair(alice.id, a1.id, 10_000, a1.id)
    assert snapshot(store) == before
    assert set(REASON_TAGS) >= {"wrong", "other"}
    assert store.add_thumb(alice.id, a1.id, -1, reason="other").reason == "other"


def test_counts(store, alice, bob):
    assert store.counts() == {"users": 2, "conversations": 0, "messages": 0, "thumbs_up": 0,
                              "thumbs_down": 0, "edits": 0, "pairs": 0}
    _, (a1, a2, a3) = chat(store, alice, n_turns=3)
    _, (b1,) = chat(store, bob)
    store.add_thumb(alice.id, a1.id, 1)
    store.add_thumb(alice.id, a2.id, -1, "unhelpful")
    store.add_thumb(bob.id, b1.id, -1)
    store.add_edit(alice.id, a2.id, "fixed")
    store.add_edit(bob.id, b1.id, "fixed too")
    store.add_pair(alice.id, a2.id, a3.id, a3.id)
    assert store.counts() == {"users": 2, "conversations": 2, "messages": 8, "thumbs_up": 1,
                              "thumbs_down": 2, "edits": 2, "pairs": 1}


def test_the_reads_training_uses(store, alice, bob):
    """The store functions a dataset build and the retraining loop read through, on real rows."""
    assert store.count_feedback() == 0 and store.newest_feedback_id() is None
    assert store.read_feedback_log() == FeedbackLog(feedback=[], messages=[], max_message_id=0, owners={})
    rated, (a1, a2) = chat(store, alice, n_turns=2)
    unrated, (u1,) = chat(store, alice)
    bobs, (b1,) = chat(store, bob)
    f1 = store.add_thumb(alice.id, a1.id, 1)
    cut = utcnow()
    f2 = store.add_edit(alice.id, a2.id, "fixed")
    f3 = store.add_thumb(bob.id, b1.id, -1)

    assert store.count_feedback() == 3 and store.count_feedback(user_id=alice.id) == 2
    assert store.count_feedback(since=cut) == 2 and store.count_feedback(user_id=bob.id, since=cut) == 1
    assert store.count_feedback(user_id=alice.id, after_id=f1.id) == 1
    assert store.newest_feedback_id() == f3.id and store.newest_feedback_id(alice.id) == f2.id

    log = store.read_feedback_log()
    assert [f[:3] for f in log.feedback] == [(f1.id, a1.id, "thumb"), (f2.id, a2.id, "edit"), (f3.id, b1.id, "thumb")]
    assert log.feedback[1][4] == "fixed"
    # only the conversations with feedback, user and assistant messages, by conversation then id
    assert [(m[0], m[1], m[2]) for m in log.messages] == [
        (m.id, rated.id, m.role) for m in store.messages(rated.id)] + [
        (m.id, bobs.id, m.role) for m in store.messages(bobs.id)]
    assert log.owners == {rated.id: alice.id, bobs.id: bob.id} and log.max_message_id == b1.id

    assert store.existing_message_ids([a1.id, u1.id, 10**9]) == {a1.id, u1.id}
    assert store.existing_message_ids(range(1, 2000)) == {m.id for c in (rated, unrated, bobs)
                                                          for m in store.messages(c.id)}
    assert store.conversation_owners([rated.id, bobs.id, 10**9]) == {rated.id: alice.id, bobs.id: bob.id}
    store.delete_conversation(rated.id, alice.id)
    assert store.existing_message_ids([a1.id, u1.id]) == {u1.id}
    assert store.conversation_owners(range(1, 2000)) == {unrated.id: alice.id, bobs.id: bob.id}


# ------------------------------------------------------------------------------------------ engine


def test_engine_settings(store, db_url):
    assert store.integrity_check() is True
    assert store.schema_version() == latest_version() >= 2
    if not db_url.startswith("sqlite"):
        return
    with store.engine.connect() as conn:
        pragma = {p: conn.exec_driver_sql(f"PRAGMA {p}").scalar()
                  for p in ("journal_mode", "foreign_keys", "busy_timeout")}
    assert pragma == {"journal_mode": "wal", "foreign_keys": 1, "busy_timeout": 10_000}


def test_naive_datetimes_are_refused(store, alice):
    with pytest.raises(sa.exc.StatementError, match="naive datetime"), write_transaction(store.engine) as conn:
        conn.execute(tables.conversations.insert().values(
            user_id=alice.id, title="t", source="ui", created_at=datetime(2026, 1, 1),
            updated_at=datetime(2026, 1, 1)))


def test_concurrent_writers_from_separate_engines(db_url, store, alice):
    """Two engines (like the API server and the training worker) writing turns at the same time."""
    conv = store.create_conversation(alice.id)
    errors: list[BaseException] = []
    n = 25

    def writer(tag: str) -> None:
        other = Store(db_url, password_hasher=fast_password_hasher())
        try:
            for i in range(n):
                store_ = other if i % 2 else store
                store_.add_turn(conv.id, f"{tag} q{i}", f"{tag} a{i}")
        except BaseException as exc:  # collected and re-raised by the test below
            errors.append(exc)
        finally:
            other.close()

    threads = [threading.Thread(target=writer, args=(t,)) for t in ("x", "y")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    msgs = store.messages(conv.id)
    assert len(msgs) == 4 * n
    # Every answer sits right after its own question: turns never interleave.
    by_id = {m.id: m for m in msgs}
    for m in msgs:
        if m.role == "assistant":
            assert by_id[m.parent_id].content.replace(" q", " a") == m.content
    assert store.integrity_check() is True


def test_open_rejects_bad_urls(tmp_path):
    for bad in ("", "   ", "nosuchdb://x", "mysql://u@h/db"):
        with pytest.raises(ValueError):
            Store(bad)
