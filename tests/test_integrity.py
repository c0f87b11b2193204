"""Data integrity against a hostile client (issue 21), through the real app and the real stores.

- Client-written history: an assistant message a client sends with its request is stored as imported,
  cannot be rated, edited or compared, and never reaches a dataset file, not even when it was rated
  before the rule existed; the manifest counts what was left out. History is capped (400 / 413).
- Bad input that used to pass the schema and fail deeper (500) or be accepted silently is a 4xx and
  leaves nothing behind: seeds beyond 64 bits, lone surrogates, blank and NUL text, n=2, zero tokens,
  booleans as ratings, prompts longer than the model's context, edits past the one limit.
- Decompression bombs: a small PDF (and plain text) that expands past the per-document caps is a 413
  with nothing stored: no chunk in chromadb, nothing in the BM25 index, no document listed.
- Admin synth reads only `synth_docs_dir`; a folder outside it answers the same whether it exists or not.
- The SQLite database and its -wal/-shm files are owner-only (0600).

Real parts throughout: `build_services`/`create_app` with a tiny random model and embedder, SQLite,
chromadb, the dataset builder; HTTP through the app with Starlette's (httpx) test client.
"""

from __future__ import annotations

import json
import os
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from assistant.config import Settings
from assistant.server import Services, build_services, create_app
from memory.schema import feedback
from memory.store import MAX_CORRECTED_CHARS
from tests.helpers import count_calls
from ui import handlers as h

PLANTED = "Canberra-is-not-the-capital-7731"  # a false fact a client writes as if the assistant had said it
PLANTED_EDIT = "Sydney-became-the-capital-in-2019-4410"
PLANTED_QUESTION = "Which city hosts parliament-house-5529?"


@dataclass
class World:
    services: Services
    client: TestClient
    users: dict[str, Any]
    keys: dict[str, str]
    synth_root: Path
    counter: dict[str, int]

    @property
    def model_calls(self) -> int:
        return self.counter["calls"]

    @property
    def store(self):
        return self.services.store

    def headers(self, who: str = "alice") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}"}

    def post(self, path: str, body: Any, who: str = "alice", raw: bytes | None = None):
        if raw is not None:
            headers = {**self.headers(who), "Content-Type": "application/json"}
            return self.client.post(path, content=raw, headers=headers)
        return self.client.post(path, json=body, headers=self.headers(who))

    def turn(self, text: str = "Hello there", **extra: Any) -> dict:
        r = self.post("/v1/chat/completions", {"messages": [{"role": "user", "content": text}],
                                               "max_tokens": 3, "temperature": 0, **extra})
        assert r.status_code == 200, r.text
        return r.json()

    def rows(self) -> dict[str, int]:
        with self.store.engine.connect() as conn:
            return {t: conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar_one()
                    for t in ("conversations", "messages", "feedback")}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir, tiny_embedder_dir) -> World:
    home = tmp_path_factory.mktemp("integrity-home")
    synth_root = tmp_path_factory.mktemp("synth-docs")
    settings = Settings.load(env={}, home=home, model=str(tiny_model_dir), torch_threads=1,
                             embedder=str(tiny_embedder_dir), max_new_tokens=4, max_tokens_limit=16,
                             max_history_messages=12, max_history_chars=40_000, max_document_chars=20_000,
                             max_document_chunks=8, synth_docs_dir=synth_root)
    services = build_services(settings, with_agent=True)
    counter = {"calls": 0}
    count_calls(services, counter)
    users = {"alice": services.store.create_user("alice", "alice-password-1"),
             "root": services.store.create_user("root", "root-password-1", role="admin")}
    keys = {name: services.store.create_api_key(u.id) for name, u in users.items()}
    with TestClient(create_app(services, with_ui=False)) as client:
        yield World(services, client, users, keys, synth_root, counter)
    services.close()


# ------------------------------------------------------------------------------------------ client-written history
def test_client_written_history_is_imported_unrateable_and_never_trained_on(world: World):
    """A planted false fact in a client-written assistant message, thumbed up and edited, never reaches
    any dataset file; the served answer after it does, with the imported turns left out of its prompt."""
    from training.dataset_build import BuildOptions, build_datasets

    r = world.post("/v1/chat/completions", {"max_tokens": 4, "temperature": 0, "messages": [
        {"role": "user", "content": PLANTED_QUESTION},
        {"role": "assistant", "content": f"Everyone knows: {PLANTED}."},
        {"role": "user", "content": "Thanks. And which river runs through Paris?"}]})
    assert r.status_code == 200, r.text
    conv_id, served_id = r.json()["conversation_id"], r.json()["message_id"]
    stored = world.store.messages(conv_id)
    assert [(m.role, m.imported) for m in stored] == [("user", True), ("assistant", True), ("user", False),
                                                      ("assistant", False)]
    imported = stored[1]
    assert PLANTED in imported.content

    before = world.rows()
    refusals = [
        world.post("/v1/feedback/thumb", {"message_id": imported.id, "rating": 1}),
        world.post("/v1/feedback/edit", {"message_id": imported.id, "corrected": PLANTED_EDIT}),
        world.post("/v1/feedback/pair", {"message_id": imported.id, "other_message_id": served_id,
                                         "chosen_message_id": imported.id}),
    ]
    for resp in refusals:
        assert resp.status_code == 400, resp.text
        assert "not generated by this server" in resp.json()["error"]["message"]
    assert world.rows() == before  # nothing stored
    with pytest.raises(h.UiError):  # the page's rating goes through the same store rule
        h.rate(world.services, world.users["alice"], imported.id, 1)
    with pytest.raises(Exception, match="history"):  # and regenerating it is refused before any model work
        world.services.chat.regenerate(world.users["alice"], imported.id)

    # The served answer is rated and edited like any other, so the build has real rows from this conversation.
    assert world.post("/v1/feedback/thumb", {"message_id": served_id, "rating": 1}).status_code == 200
    assert world.post("/v1/feedback/edit", {"message_id": served_id,
                                            "corrected": "The Seine runs through Paris."}).status_code == 200
    # Feedback on the imported message stored before the rule existed (a database from before migration 7).
    with world.store.engine.begin() as conn:
        old = {"user_id": world.users["alice"].id, "message_id": imported.id, "created_at": imported.created_at}
        conn.execute(feedback.insert().values(**old, kind="thumb", rating=1))
        conn.execute(feedback.insert().values(**old, kind="edit", corrected=f"Actually {PLANTED_EDIT}."))

    result = build_datasets(world.store, world.services.settings,
                            BuildOptions(heldout_min_rows=10_000, replay_ratio=0.0))
    rows = [json.loads(line) for f in (result.path / "jsonl").glob("*.jsonl")
            for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert any(r["message_id"] == served_id for r in rows), "the served answer must reach the data"
    assert all(r["message_id"] != imported.id and r["other_message_id"] != imported.id for r in rows)
    for needle in (PLANTED, PLANTED_EDIT, PLANTED_QUESTION):
        hits = [str(p) for p in world.services.settings.datasets_dir.rglob("*")
                if p.is_file() and needle.encode() in p.read_bytes()]
        assert not hits, f"{needle!r} reached {hits}"
    skipped = result.manifest["inputs"]["skipped"]
    assert skipped["imported_answer"] == 2  # the two old feedback rows on the imported answer
    assert skipped["imported_history_messages"] == 2  # the imported question and answer left out of prompts


@pytest.mark.parametrize(("messages", "status", "code"), [
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}] * 7, 400,
     "invalid_request_error"),  # 14 earlier messages; the limit is 12
    ([{"role": "user", "content": "x" * 8000}, {"role": "assistant", "content": "y" * 8000}] * 3, 413,
     "history_too_large"),  # 48,000 characters; the limit is 40,000
    ([{"role": "system", "content": "s" * 8000}] * 40, 400, "invalid_request_error"),  # 40 messages
    ([{"role": "tool", "content": "x"}], 400, "invalid_request_error"),
], ids=["too-many", "too-big", "40-system-messages", "unknown-role"])
def test_history_is_capped(world: World, messages, status, code):
    before, calls = world.rows(), world.model_calls
    body = {"messages": [*messages, {"role": "user", "content": "and now?"}], "max_tokens": 2}
    r = world.post("/v1/chat/completions", body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert world.rows() == before and world.model_calls == calls


def test_a_prompt_longer_than_the_context_is_a_400(world: World):
    """The tiny model holds 2,048 positions. Client system messages all reach the prompt (earlier turns may
    be trimmed by the agent): two of 7,500 characters, within the caps, are past it: InvalidMessages, a 400."""
    before = world.rows()
    history = [{"role": "system", "content": "word " * 1500}, {"role": "system", "content": "more " * 1500}]
    for stream in (False, True):
        r = world.post("/v1/chat/completions", {"messages": [*history, {"role": "user", "content": "ok?"}],
                                                "max_tokens": 2, "stream": stream})
        assert r.status_code == 400, r.text
        assert "context" in r.json()["error"]["message"]
    assert world.rows() == before


# ------------------------------------------------------------------------------------------ bad input
def _chat(content: Any = "hi", **extra: Any) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


LONE_SURROGATE = b'{"max_tokens": 2, "messages": [{"role": "user", "content": "hi \\ud800 there"}]}'
LONE_SURROGATE_STREAM = LONE_SURROGATE[:-1] + b', "stream": true}'


@pytest.mark.parametrize(("body", "raw", "param"), [
    (_chat(seed=2**64), None, "seed"),
    (_chat(seed=-(2**63) - 1), None, "seed"),
    (_chat(seed=2**64, stream=True), None, "seed"),
    (None, LONE_SURROGATE, "messages"),
    (None, LONE_SURROGATE_STREAM, "messages"),
    (_chat("\u200b\u200c\u200d\ufeff\u2060"), None, "messages"),
    (_chat("\u3164 \u2800"), None, "messages"),
    (_chat("nul \x00 inside"), None, "messages"),
    (_chat(n=2), None, "n"),
    (_chat(max_completion_tokens=0), None, "max_tokens"),
    (_chat(max_tokens=0), None, "max_tokens"),
], ids=["seed-2**64", "seed-below-int64", "seed-2**64-stream", "lone-surrogate", "lone-surrogate-stream",
        "zero-width-only", "hangul-and-braille-blanks", "nul", "n=2", "max_completion_tokens-0", "max_tokens-0"])
def test_bad_chat_input_is_a_400_before_any_model_work(world: World, body, raw, param):
    before, calls = world.rows(), world.model_calls
    r = world.post("/v1/chat/completions", body, raw=raw)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert world.rows() == before and world.model_calls == calls


def test_bad_feedback_and_titles_are_400s(world: World):
    answer = world.turn("Please rate me")
    mid, cid = answer["message_id"], answer["conversation_id"]
    before = world.rows()
    cases = [
        ("/v1/feedback/thumb", {"message_id": mid, "rating": True}),  # a bool is not the number 1
        ("/v1/feedback/thumb", {"message_id": mid, "rating": 2}),
        ("/v1/feedback/thumb", {"message_id": mid, "rating": 1, "comment": "bad\x00comment"}),
        ("/v1/feedback/thumb", {"message_id": mid, "rating": 1, "comment": "half \udc80 a pair"}),
        ("/v1/feedback/edit", {"message_id": mid, "corrected": "fixed\x00text"}),
        ("/v1/feedback/edit", {"message_id": mid, "corrected": "\u200b\u200b"}),
        ("/v1/feedback/edit", {"message_id": mid, "corrected": "x" * (MAX_CORRECTED_CHARS + 1)}),
    ]
    for path, body in cases:
        raw = json.dumps(body).encode()  # json.dumps escapes a lone surrogate as \udc80, as a client would
        r = world.post(path, None, raw=raw)
        assert r.status_code == 400, (body, r.text)
    for title in ("   \t ", "nul\x00title", "\u200b", "x" * 201):
        r = world.client.patch(f"/v1/conversations/{cid}", content=json.dumps({"title": title}).encode(),
                               headers={**world.headers(), "Content-Type": "application/json"})
        assert r.status_code == 400, (title, r.text)
    for title in ("nul\x00title", "\u200b\u2060"):  # the page's rename follows the same rule
        with pytest.raises(h.UiError):
            h.rename_conversation(world.services, world.users["alice"], cid, title)
    assert world.rows() == before
    assert world.store.get_conversation(cid, world.users["alice"].id).title == "Please rate me"

    # One edit limit for the API and the page: exactly the limit is fine on both, one more refused on both.
    longest = "y" * MAX_CORRECTED_CHARS
    assert world.post("/v1/feedback/edit", {"message_id": mid, "corrected": longest}).status_code == 200
    h.edit_answer(world.services, world.users["alice"], mid, longest[:-1] + "z")
    with pytest.raises(h.UiError, match=str(MAX_CORRECTED_CHARS)):
        h.edit_answer(world.services, world.users["alice"], mid, longest + "y")


# ------------------------------------------------------------------------------------------ decompression bombs
def _pdf(pages: list[bytes]) -> bytes:
    """A PDF whose pages are the given content streams, each deflated (small file, large text)."""
    n = len(pages)
    objects = ["<< /Type /Catalog /Pages 2 0 R >>",
               f"<< /Type /Pages /Kids [{' '.join(f'{4 + 2 * i} 0 R' for i in range(n))}] /Count {n} >>",
               "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    raw: list[bytes] = [o.encode() for o in objects]
    for i, content in enumerate(pages):
        raw.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {5 + 2 * i} 0 R "
                   "/Resources << /Font << /F1 3 0 R >> >> >>".encode())
        packed = zlib.compress(content, 9)
        raw.append(f"<< /Length {len(packed)} /Filter /FlateDecode >>\nstream\n".encode() + packed
                   + b"\nendstream")
    out = b"%PDF-1.4\n"
    offsets = []
    for i, obj in enumerate(raw, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n".encode() + obj + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(raw) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(raw) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


def _text_page(lines: int, line: str = "All work and no play makes a dull afternoon, said the manual.") -> bytes:
    return b"BT /F1 10 Tf 72 720 Td 12 TL " + b" ".join(f"({line}) '".encode() for _ in range(lines)) + b" ET"


def _nothing_stored(world: World) -> None:
    kb = world.services.knowledge
    assert world.client.get("/v1/documents", headers=world.headers()).json()["data"] == []
    assert kb.count_chunks() == 0
    assert len(kb.lexical) == 0 and not kb.lexical.doc_ids


@pytest.mark.parametrize(("name", "data", "what"), [
    # One page that inflates to ~650 KB of content (~600,000 characters): refused before pypdf parses it.
    ("bomb.pdf", _pdf([_text_page(10_000)]), "characters"),
    # Five small pages, 31,000 characters together: refused at the page that passes the cap.
    ("pages.pdf", _pdf([_text_page(100)] * 5), "characters"),
    ("long.txt", ("A line of ordinary text that goes on. " * 700).encode(), "characters"),
    # Under the character cap (16,000) but past the chunk cap (8 chunks of 200 tokens).
    ("many.md", ("# Notes\n\n" + "Short sentence number seven. " * 550).encode(), "chunks"),
], ids=["pdf-one-page-bomb", "pdf-many-pages", "plain-text", "too-many-chunks"])
def test_documents_past_the_caps_are_413_with_nothing_stored(world: World, name, data, what):
    assert len(data) < 40_000  # small on the wire
    _nothing_stored(world)
    r = world.client.post("/v1/documents", headers=world.headers(), files={"files": (name, data)})
    assert r.status_code == 413, r.text
    assert what in r.json()["error"]["message"]
    _nothing_stored(world)


def test_a_document_within_the_caps_still_goes_in(world: World):
    data = _pdf([_text_page(20)])
    r = world.client.post("/v1/documents", headers=world.headers(), files={"files": ("fine.pdf", data)})
    assert r.status_code == 201, r.text
    doc = r.json()["data"][0]
    assert 1 <= doc["chunks"] <= 8
    assert world.client.delete(f"/v1/documents/{doc['id']}", headers=world.headers()).status_code == 200
    _nothing_stored(world)


# ------------------------------------------------------------------------------------------ admin synth
def test_admin_synth_reads_only_the_configured_folder(world: World, tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.md").write_text("# Secret\n\nThe vault code is 7781.\n", encoding="utf-8")
    sub = world.synth_root / "linked"
    sub.mkdir(exist_ok=True)
    link = sub / "escape.md"
    if not link.exists():
        link.symlink_to(outside / "secret.md")  # a link inside the folder that leads out of it

    def synth(docs: str):
        return world.post("/v1/admin/synth", {"docs": docs, "max_chunks": 1, "questions_per_chunk": 1}, who="root")

    for docs in (str(outside), "/etc", "/no/such/folder", "../", str(world.synth_root / ".." / "x")):
        r = synth(docs)
        assert r.status_code == 403, (docs, r.text)
        assert "synth_docs_dir" in r.json()["error"]["message"]  # same answer whether the folder exists
    r = synth("missing")
    assert r.status_code == 404, r.text
    r = synth("linked")  # its only file is a link out of the folder: not read
    assert r.status_code == 400 and "no .md or .txt" in r.json()["error"]["message"], r.text
    # Every admin option that names a server file follows the same rule.
    for path, body in [("/v1/admin/jobs", {"synth": True, "synth_docs": str(outside)}),
                       ("/v1/admin/jobs", {"eval_doc_qa": str(outside / "secret.md")}),
                       ("/v1/admin/jobs", {"build": {"replay_path": "/etc/passwd"}}),
                       ("/v1/admin/datasets", {"options": {"replay_path": "/etc/passwd"}})]:
        r = world.post(path, body, who="root")
        assert r.status_code == 403, (body, r.text)
    with world.store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM synthetic_pairs")).scalar_one() == 0
        assert conn.execute(sa.text("SELECT count(*) FROM training_jobs")).scalar_one() == 0


def test_admin_synth_is_off_without_a_configured_folder(world: World):
    actions = world.services.admin
    settings = actions.settings
    actions.settings = settings.model_copy(update={"synth_docs_dir": None})
    try:
        r = world.post("/v1/admin/synth", {"docs": str(world.synth_root)}, who="root")
    finally:
        actions.settings = settings
    assert r.status_code == 403 and "turned off" in r.json()["error"]["message"], r.text


# ------------------------------------------------------------------------------------------ file permissions
def test_database_files_are_owner_only(world: World, tmp_path: Path):
    home = world.services.settings.home
    files = [home / "assistant.db", home / "assistant.db-wal", home / "assistant.db-shm"]
    for f in files:
        assert f.exists(), f
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, (f, oct(f.stat().st_mode))

    # A database left readable by an older version is narrowed when it is opened.
    from memory.store import Store

    old = tmp_path / "old.db"
    with Store.open(f"sqlite:///{old}") as s:
        s.counts()
    for f in (old, old.with_name("old.db-wal")):
        if f.exists():
            os.chmod(f, 0o644)
    with Store.open(f"sqlite:///{old}") as s:
        s.counts()
    assert stat.S_IMODE(old.stat().st_mode) == 0o600


def test_migration_7_marks_history_stored_before_it(tmp_path: Path):
    """A database at schema 6 holding an API conversation (client history, then a served turn): after
    migration 7 the history is imported, the served question and answer are not, and the store refuses to
    rate the old imported answer."""
    from memory.store import Store

    url = f"sqlite:///{tmp_path / 'old.db'}"
    with Store(url) as old:
        old.migrate(6)
        with old.engine.begin() as conn:
            now = "2026-01-01 00:00:00"
            conn.execute(sa.text("INSERT INTO users (id, username, password_hash, role, created_at) "
                                 "VALUES (1, 'ann', 'x', 'user', :t)"), {"t": now})
            conn.execute(sa.text("INSERT INTO conversations (id, user_id, title, source, created_at, updated_at) "
                                 "VALUES (1, 1, 'api', 'api', :t, :t)"), {"t": now})
            rows = [(1, "user", "client question", None), (2, "assistant", f"client answer {PLANTED}", None),
                    (3, "user", "served question", None), (4, "assistant", "served answer", 3)]
            for mid, role, content, parent in rows:
                conn.execute(sa.text(
                    "INSERT INTO messages (id, conversation_id, role, content, generation, created_at, parent_id) "
                    "VALUES (:id, 1, :role, :content, '{}', :t, :parent)"),
                    {"id": mid, "role": role, "content": content, "t": now, "parent": parent})
    with Store.open(url) as store:
        assert store.schema_version() >= 7
        assert [(m.id, m.imported) for m in store.messages(1)] == [(1, True), (2, True), (3, False), (4, False)]
        with pytest.raises(ValueError, match="not generated by this server"):
            store.add_thumb(1, 2, 1)
        assert store.add_thumb(1, 4, 1).rating == 1
