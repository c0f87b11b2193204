"""Documents, memories and conversation exports through the real HTTP server, as an operator scripts them.

A real server (uvicorn in a thread, tiny random model and embedder, real SQLite and chromadb) and
httpx; every check asserts on what the knowledge base and the store hold afterwards. Bad input gets
a 4xx and leaves nothing behind; another user's document or memory reads as not found.
"""

from __future__ import annotations

import httpx
import pytest
import sqlalchemy as sa

from memory.db import utcnow, write_transaction
from memory.schema import synthetic_pairs
from tests.helpers import ServerThread, start_server

NOTES = b"# Lumen desk\n\nThe Lumen desk costs 80 euros and ships in two days from the Lyon warehouse.\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir, tiny_embedder_dir):
    home = tmp_path_factory.mktemp("operator-home")
    srv = start_server(home, tiny_model_dir, with_agent=True, embedder=str(tiny_embedder_dir),
                       max_new_tokens=4, upload_max_bytes=20_000)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def keys(server: ServerThread) -> dict[str, str]:
    store = server.services.store
    out = {}
    for name, role in (("alice", "user"), ("bob", "user"), ("root", "admin")):
        u = store.create_user(name, f"pw-{name}-123", role=role)
        out[name] = store.create_api_key(u.id)
    return out


def client(server: ServerThread, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def chunk_count(server: ServerThread) -> int:
    return server.services.knowledge.count_chunks()


def add_pair(server: ServerThread, doc_id: str) -> int:
    """A teacher pair made from `doc_id`, as `assistant data synth` would store it."""
    with write_transaction(server.services.store.engine) as conn:
        return conn.execute(synthetic_pairs.insert().values(
            kind="doc", teacher="test", doc_id=doc_id, chunk_id=f"{doc_id}:00000", question="What costs 80 euros?",
            question_source="model", answer="The Lumen desk.", accepted=True, score=1.0, judge={},
            created_at=utcnow()).returning(synthetic_pairs.c.id)).scalar_one()


def pairs_for(server: ServerThread, doc_id: str) -> int:
    with server.services.store.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(synthetic_pairs)
                            .where(synthetic_pairs.c.doc_id == doc_id)).scalar_one()


def test_documents_upload_list_get_delete(server, keys):
    alice, bob = client(server, keys["alice"]), client(server, keys["bob"])
    r = alice.post("/v1/documents", files=[("files", ("desk.md", NOTES, "text/markdown")),
                                           ("files", ("chair.txt", b"The Aria chair is blue and costs 40 euros.\n",
                                                      "text/plain"))])
    assert r.status_code == 201, r.text
    docs = r.json()["data"]
    assert [d["filename"] for d in docs] == ["desk.md", "chair.txt"]
    assert all(d["scope"] == "private" and d["chunks"] >= 1 for d in docs)
    desk = docs[0]["id"]

    listed = alice.get("/v1/documents").json()["data"]
    assert {d["id"] for d in listed} == {d["id"] for d in docs}
    got = alice.get(f"/v1/documents/{desk}").json()
    assert got["title"] == "Lumen desk" and got["chunks"] == docs[0]["chunks"]

    # Another user: not in the listing, not found by id, cannot delete.
    assert bob.get("/v1/documents").json()["data"] == []
    assert bob.get(f"/v1/documents/{desk}").status_code == 404
    before = chunk_count(server)
    assert bob.delete(f"/v1/documents/{desk}").status_code == 404
    assert chunk_count(server) == before

    # Deleting removes the chunks and the teacher pairs made from the document.
    add_pair(server, desk)
    r = alice.delete(f"/v1/documents/{desk}")
    assert r.status_code == 200 and r.json()["chunks"] == docs[0]["chunks"] and r.json()["synthetic_pairs"] == 1
    assert chunk_count(server) == before - docs[0]["chunks"]
    assert pairs_for(server, desk) == 0
    assert alice.get(f"/v1/documents/{desk}").status_code == 404
    assert alice.delete(f"/v1/documents/{docs[1]['id']}").status_code == 200


def test_shared_documents_need_an_admin(server, keys):
    alice, bob, root = (client(server, keys[n]) for n in ("alice", "bob", "root"))
    before = chunk_count(server)
    r = alice.post("/v1/documents", files=[("files", ("team.md", b"# Team\n\nShared notes.\n", "text/markdown"))],
                   data={"scope": "shared"})
    assert r.status_code == 403 and "only admins" in r.json()["error"]["message"]
    assert chunk_count(server) == before
    r = root.post("/v1/documents", files=[("files", ("team.md", b"# Team\n\nShared notes.\n", "text/markdown"))],
                  data={"scope": "shared"})
    assert r.status_code == 201, r.text
    doc = r.json()["data"][0]["id"]
    assert doc in [d["id"] for d in bob.get("/v1/documents").json()["data"]]  # everyone reads it
    assert bob.delete(f"/v1/documents/{doc}").status_code == 403  # only the uploader or an admin deletes it
    assert root.delete(f"/v1/documents/{doc}").status_code == 200
    assert chunk_count(server) == before


HUGE = b"word " * 5000  # 25 kB, over this server's 20 kB upload limit


@pytest.mark.parametrize("name,data,ctype,status,words", [
    ("tool.exe", b"MZ\x90\x00binary", "application/octet-stream", 400, "unsupported file type"),
    ("image.txt", b"\x89PNG\r\n\x1a\n....", "text/plain", 400, "PNG"),
    ("empty.md", b"", "text/markdown", 400, "empty"),
    ("huge.txt", HUGE, "text/plain", 413, "upload limit"),
    ("../../etc/passwd.md", b"# x\n\ntext\n", "text/markdown", 400, "path"),
    (".hidden.md", b"# x\n\ntext\n", "text/markdown", 400, "not allowed"),
])
def test_bad_uploads_get_a_4xx_and_store_nothing(server, keys, tmp_path, name, data, ctype, status, words):
    alice = client(server, keys["alice"])
    before = (chunk_count(server), len(alice.get("/v1/documents").json()["data"]))
    uploads = server.services.settings.uploads_dir
    r = alice.post("/v1/documents", files=[("files", (name, data, ctype))])
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]
    assert (chunk_count(server), len(alice.get("/v1/documents").json()["data"])) == before
    assert not any(p.is_file() for p in uploads.rglob("*")), "an upload left a file behind"
    assert not (server.services.settings.home.parent / "etc").exists()


def test_a_batch_is_all_or_nothing(server, keys):
    alice = client(server, keys["alice"])
    before = chunk_count(server)
    r = alice.post("/v1/documents", files=[("files", ("good.md", b"# Good\n\nA fine document.\n", "text/markdown")),
                                           ("files", ("bad.md", b"", "text/markdown"))])
    assert r.status_code == 400 and "bad.md" in r.json()["error"]["message"]
    # A duplicate found while ingesting: the first file of the batch is taken out again.
    assert alice.post("/v1/documents", files=[("files", ("one.md", NOTES, "text/markdown"))]).status_code == 201
    mid = chunk_count(server)
    r = alice.post("/v1/documents", files=[("files", ("two.md", b"# Two\n\nAnother text.\n", "text/markdown")),
                                           ("files", ("again.md", NOTES, "text/markdown"))])
    assert r.status_code == 409, r.text
    assert chunk_count(server) == mid > before
    assert [d["filename"] for d in alice.get("/v1/documents").json()["data"]] == ["one.md"]
    for d in alice.get("/v1/documents").json()["data"]:
        alice.delete(f"/v1/documents/{d['id']}")


def test_wrong_shapes_and_unknown_ids(server, keys):
    alice = client(server, keys["alice"])
    assert alice.post("/v1/documents", json={"files": ["desk.md"]}).status_code == 400  # not multipart
    assert alice.post("/v1/documents", files=[("files", ("a.md", b"# A\n\ntext\n", "text/markdown"))],
                      data={"scope": "everyone"}).status_code == 400
    assert alice.get("/v1/documents", params={"scope": "nope"}).status_code == 400
    assert alice.get("/v1/documents/d0000000000000000").status_code == 404
    assert alice.delete("/v1/documents/d0000000000000000").status_code == 404
    assert alice.get("/v1/memories/999999").status_code == 404
    assert alice.patch("/v1/memories/abc", json={"text": "x"}).status_code == 400
    assert alice.post("/v1/memories", json={"text": ""}).status_code == 400
    assert alice.post("/v1/memories", json={"text": 5}).status_code == 400
    assert alice.get("/v1/export/conversations/999999").status_code == 404
    assert alice.get("/v1/export/conversations", params={"format": "pdf"}).status_code == 400
    assert httpx.get(server.url + "/v1/documents").status_code == 401


def test_memories_list_edit_history_delete(server, keys):
    alice, bob = client(server, keys["alice"]), client(server, keys["bob"])
    r = alice.post("/v1/memories", json={"text": "My dog is called Rex."})
    assert r.status_code == 201, r.text
    mem = r.json()
    assert mem["id"] in [m["id"] for m in alice.get("/v1/memories").json()["data"]]
    assert bob.get("/v1/memories").json()["data"] == []
    for call in (lambda c: c.get(f"/v1/memories/{mem['id']}"),
                 lambda c: c.patch(f"/v1/memories/{mem['id']}", json={"text": "hacked"}),
                 lambda c: c.delete(f"/v1/memories/{mem['id']}")):
        assert call(bob).status_code == 404

    r = alice.patch(f"/v1/memories/{mem['id']}", json={"text": "My dog is called Max."})
    assert r.status_code == 200, r.text
    new = r.json()
    assert new["id"] != mem["id"] and new["text"] == "My dog is called Max."
    got = alice.get(f"/v1/memories/{new['id']}").json()
    assert [h["text"] for h in got["history"]] == ["My dog is called Max.", "My dog is called Rex."]
    assert alice.get(f"/v1/memories/{mem['id']}").status_code == 404  # an old version is history, not a memory
    r = alice.delete(f"/v1/memories/{new['id']}")
    assert r.status_code == 200 and r.json()["versions"] == 2
    assert alice.get("/v1/memories").json()["data"] == []


def test_export_with_feedback_as_json_and_markdown(server, keys):
    alice, bob = client(server, keys["alice"]), client(server, keys["bob"])
    r = alice.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Where is Lyon?"}],
                                                  "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    cid, mid = r.json()["conversation_id"], r.json()["message_id"]
    assert alice.post("/v1/feedback/thumb", json={"message_id": mid, "rating": -1, "reason": "wrong",
                                                  "comment": "Lyon is in France"}).status_code == 200
    r = alice.post("/v1/feedback/edit", json={"message_id": mid, "corrected": "Lyon is in France."})
    assert r.status_code == 200

    one = alice.get(f"/v1/export/conversations/{cid}").json()
    [conv] = one["conversations"]
    assert conv["id"] == cid and [m["role"] for m in conv["messages"]] == ["user", "assistant"]
    kinds = {f["kind"]: f for f in conv["messages"][1]["feedback"]}
    assert kinds["thumb"]["rating"] == -1 and kinds["thumb"]["comment"] == "Lyon is in France"
    assert kinds["edit"]["corrected"] == "Lyon is in France."
    every = alice.get("/v1/export/conversations").json()
    assert cid in [c["id"] for c in every["conversations"]]

    md = alice.get(f"/v1/export/conversations/{cid}", params={"format": "markdown"})
    assert md.status_code == 200 and md.headers["content-type"].startswith("text/markdown")
    assert "Where is Lyon?" in md.text and "👎 (wrong) (Lyon is in France)" in md.text
    assert "> Lyon is in France." in md.text

    assert bob.get(f"/v1/export/conversations/{cid}").status_code == 404
    assert cid not in [c["id"] for c in bob.get("/v1/export/conversations").json()["conversations"]]
    assert client(server, keys["root"]).get(f"/v1/export/conversations/{cid}").status_code == 404


def test_openapi_describes_the_routes_with_examples(server):
    schema = httpx.get(server.url + "/openapi.json").json()
    for path, method in (("/v1/documents", "post"), ("/v1/documents", "get"), ("/v1/memories/{memory_id}", "patch"),
                         ("/v1/export/conversations", "get"), ("/v1/admin/users", "post"),
                         ("/v1/admin/users/{user_id}", "delete")):
        op = schema["paths"][path][method]
        assert op.get("summary"), (path, method)
        ok = next(v for k, v in op["responses"].items() if k.startswith("2"))
        assert any("example" in c for c in ok["content"].values()), (path, method)
