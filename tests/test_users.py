"""Accounts through the real HTTP server and the CLI runner: create, disable, enable, password, keys,
the audit log, and deleting a user with everything of theirs (counted in every table and on disk)."""

from __future__ import annotations

import json

import httpx
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from assistant.cli import app as cli_app
from memory.db import utcnow, write_transaction
from memory.schema import synthetic_pairs
from memory.store import Store
from tests.helpers import ServerThread, start_server
from training.dataset_build import BuildOptions, build_datasets, list_snapshots
from training.snapshots import read_jsonl

runner = CliRunner()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir, tiny_embedder_dir):
    home = tmp_path_factory.mktemp("users-home")
    srv = start_server(home, tiny_model_dir, with_agent=True, embedder=str(tiny_embedder_dir), max_new_tokens=4)
    store = srv.services.store
    root = store.create_user("root", "pw-root-123", role="admin")
    srv.root_key = store.create_api_key(root.id)  # type: ignore[attr-defined]
    yield srv
    srv.stop()


def as_key(server: ServerThread, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def admin(server: ServerThread) -> httpx.Client:
    return as_key(server, server.root_key)  # type: ignore[attr-defined]


def audit_actions(server: ServerThread, user_id: int) -> list[str]:
    rows = admin(server).get("/v1/admin/audit", params={"user_id": user_id}).json()["data"]
    return [r["action"] for r in reversed(rows)]


def test_create_disable_enable_password_keys_and_audit(server):
    root = admin(server)
    r = root.post("/v1/admin/users", json={"username": "dana", "password": "pw-dana-123"})
    assert r.status_code == 201, r.text
    dana, key = r.json()["user"], r.json()["api_key"]
    assert as_key(server, key).get("/v1/models").status_code == 200
    assert dana["username"] in [u["username"] for u in root.get("/v1/admin/users").json()["data"]]

    assert root.post(f"/v1/admin/users/{dana['id']}/disable").json()["disabled"] is True
    assert as_key(server, key).get("/v1/models").status_code == 401
    assert server.services.store.authenticate("dana", "pw-dana-123") is None
    assert server.services.store.get_user_by_name("dana") is None  # a page session stops working too
    assert root.post(f"/v1/admin/users/{dana['id']}/enable").json()["disabled"] is False
    assert as_key(server, key).get("/v1/models").status_code == 200

    assert root.put(f"/v1/admin/users/{dana['id']}/password", json={"password": "pw-dana-new"}).status_code == 200
    assert server.services.store.authenticate("dana", "pw-dana-123") is None
    assert server.services.store.authenticate("dana", "pw-dana-new").username == "dana"

    r = root.post(f"/v1/admin/users/{dana['id']}/keys", json={"name": "laptop"})
    assert r.status_code == 201
    second = r.json()["api_key"]
    keys = root.get(f"/v1/admin/users/{dana['id']}/keys").json()["data"]
    assert [k["name"] for k in keys] == ["default", "laptop"] and all("key_hash" not in k for k in keys)
    assert second not in json.dumps(keys) and key not in json.dumps(keys)
    assert root.delete(f"/v1/admin/users/{dana['id']}/keys/{keys[1]['id']}").status_code == 200
    assert as_key(server, second).get("/v1/models").status_code == 401
    assert as_key(server, key).get("/v1/models").status_code == 200
    assert root.delete(f"/v1/admin/users/{dana['id']}/keys/{keys[1]['id']}").status_code == 404

    assert audit_actions(server, dana["id"]) == ["user_add", "user_disable", "user_enable", "user_password",
                                                 "key_add", "key_revoke"]
    assert all(r["actor"] == "root" for r in root.get("/v1/admin/audit").json()["data"])


def test_refusals_write_nothing(server):
    root = admin(server)
    store = server.services.store
    eve = store.create_user("eve", "pw-eve-123")
    eve_key = store.create_api_key(eve.id)
    root_id = store.get_user_by_name("root").id

    def state() -> tuple:
        return (store.counts()["users"], len(store.list_audit(1000)), len(store.list_api_keys(eve.id)),
                store.get_user(eve.id).disabled)

    before = state()
    eve_client = as_key(server, eve_key)
    for method, path, body in (("GET", "/v1/admin/users", None), ("POST", "/v1/admin/users",
                                                                 {"username": "mallory", "password": "x"}),
                               ("POST", f"/v1/admin/users/{root_id}/disable", None),
                               ("DELETE", f"/v1/admin/users/{root_id}", None),
                               ("POST", f"/v1/admin/users/{eve.id}/keys", {"name": "mine"}),
                               ("GET", "/v1/admin/audit", None)):
        assert eve_client.request(method, path, json=body).status_code == 403, (method, path)
        assert httpx.request(method, server.url + path, json=body).status_code == 401, (method, path)
    cases = [("POST", f"/v1/admin/users/{root_id}/disable", None, 409, "your own"),
             ("DELETE", f"/v1/admin/users/{root_id}", None, 409, "your own"),
             ("POST", "/v1/admin/users/999999/disable", None, 404, "not found"),
             ("DELETE", "/v1/admin/users/999999", None, 404, "not found"),
             ("PUT", "/v1/admin/users/999999/password", {"password": "x"}, 404, "not found"),
             ("DELETE", f"/v1/admin/users/{eve.id}/keys/999999", None, 404, "no API key"),
             ("POST", "/v1/admin/users", {"username": "eve", "password": "pw-long-enough"}, 400, "taken"),
             ("POST", "/v1/admin/users", {"username": "bad name/..", "password": "pw-long-enough"}, 400,
              "username"),
             ("POST", "/v1/admin/users", {"username": "zed"}, 400, "password"),
             ("POST", "/v1/admin/users", {"username": "zed", "password": "short"}, 400, "at least 8"),
             ("POST", "/v1/admin/users", {"username": "zed", "password": "pw", "role": "admin"}, 400, "role"),
             ("PUT", f"/v1/admin/users/{eve.id}/password", {"password": ""}, 400, "password"),
             ("POST", "/v1/admin/users/abc/disable", None, 400, "user_id")]
    for method, path, body, status, words in cases:
        r = root.request(method, path, json=body)
        assert r.status_code == status, (method, path, r.text)
        assert words in r.json()["error"]["message"], (method, path, r.text)
    assert state() == before


def _everything_of(server: ServerThread, user_id: int, conv_ids: list[int], doc_ids: list[str]) -> dict[str, int]:
    """Rows of the user in every table that names a user, plus messages, teacher pairs and chunks."""
    engine = server.services.store.engine
    out: dict[str, int] = {}
    with engine.connect() as conn:
        insp = sa.inspect(conn)
        for table in insp.get_table_names():
            cols = {c["name"] for c in insp.get_columns(table)}
            if "user_id" in cols and table != "admin_audit":
                out[table] = conn.execute(sa.text(f"SELECT count(*) FROM {table} WHERE user_id = :u"),
                                          {"u": user_id}).scalar_one()
        out["users"] = conn.execute(sa.text("SELECT count(*) FROM users WHERE id = :u"), {"u": user_id}).scalar_one()
        if conv_ids:
            ids = ",".join(str(i) for i in conv_ids)
            out["messages"] = conn.execute(sa.text(f"SELECT count(*) FROM messages WHERE conversation_id IN ({ids})")
                                           ).scalar_one()
        out["synthetic_pairs"] = conn.execute(sa.select(sa.func.count()).select_from(synthetic_pairs).where(
            synthetic_pairs.c.doc_id.in_(doc_ids))).scalar_one()
    kb = server.services.knowledge
    out["chunks"] = len(kb.collection.get(where={"owner_id": user_id}, include=[])["ids"])
    return out


def _dataset_rows_of(folder, conv_ids: list[int], doc_ids: list[str]) -> int:
    """Rows from these conversations or documents in every JSONL file under `folder`."""
    return sum(1 for f in folder.rglob("*.jsonl") for r in read_jsonl(f)
               if r.get("conversation_id") in conv_ids or r.get("doc_id") in doc_ids)


def test_deleting_a_user_leaves_none_of_their_rows_or_files(server):
    root = admin(server)
    store, settings = server.services.store, server.services.settings
    made = root.post("/v1/admin/users", json={"username": "carol", "password": "pw-carol-1", "admin": True}).json()
    carol, key = made["user"], made["api_key"]
    c = as_key(server, key)
    conv_ids = []
    for q, fix in (("How long does the Lyon warehouse take to ship a desk?", "It ships within two working days."),
                   ("Which colour is the Aria chair in the catalogue?", "The Aria chair is sold in blue only.")):
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": q}], "max_tokens": 3})
        assert r.status_code == 200, r.text
        conv_ids.append(r.json()["conversation_id"])
        assert c.post("/v1/feedback/edit", json={"message_id": r.json()["message_id"], "corrected": fix}
                      ).status_code == 200
        assert c.post("/v1/feedback/thumb", json={"message_id": r.json()["message_id"], "rating": -1}
                      ).status_code == 200
    mem = c.post("/v1/memories", json={"text": "I live in Lyon."}).json()
    assert c.delete(f"/v1/memories/{mem['id']}").status_code == 200  # leaves a tombstone
    assert c.post("/v1/memories", json={"text": "My cat is called Tom."}).status_code == 201
    private = c.post("/v1/documents", files=[("files", ("mine.md", b"# Mine\n\nCarol's own notes on desks.\n",
                                                        "text/markdown"))]).json()["data"][0]["id"]
    shared = c.post("/v1/documents", data={"scope": "shared"}, files=[(
        "files", ("team.md", b"# Team\n\nEveryone's notes on chairs.\n", "text/markdown"))]).json()["data"][0]["id"]
    with write_transaction(store.engine) as conn:
        conn.execute(synthetic_pairs.insert().values(
            kind="doc", teacher="test", doc_id=private, chunk_id=f"{private}:00000",
            question="What are Carol's notes about?", question_source="model",
            answer="Carol's own notes are about desks.", accepted=True, score=1.0, judge={}, created_at=utcnow()))
    leftover = settings.uploads_dir / str(carol["id"]) / "half-uploaded.md"
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_text("an upload cut short")
    build_datasets(store, settings, BuildOptions(replay_ratio=0.0), knowledge=server.services.knowledge)

    before = _everything_of(server, carol["id"], conv_ids, [private])
    assert all(before[t] > 0 for t in ("users", "api_keys", "conversations", "messages", "feedback", "memories",
                                       "memory_tombstones", "synthetic_pairs", "chunks")), before
    assert _dataset_rows_of(settings.datasets_dir, conv_ids, [private]) > 0

    r = root.delete(f"/v1/admin/users/{carol['id']}")
    assert r.status_code == 200, r.text
    done = r.json()["deleted"]
    assert done["conversations"] == 2 and done["documents"] == 1 and done["upload_files"] == 1
    assert done["shared_documents_kept"] == 1 and done["synthetic_pairs_from_documents"] == 1
    assert done["dataset_rows"] > 0 and done["snapshots_rewritten"]

    after = _everything_of(server, carol["id"], conv_ids, [private])
    assert after == {**dict.fromkeys(after, 0), "chunks": after["chunks"]}, after
    kb = server.services.knowledge
    remaining = kb.collection.get(where={"owner_id": carol["id"]}, include=["metadatas"])["metadatas"]
    assert {m["doc_id"] for m in remaining} == {shared}  # the team's document stays, nothing private
    assert not (settings.uploads_dir / str(carol["id"])).exists()
    assert _dataset_rows_of(settings.datasets_dir, conv_ids, [private]) == 0  # snapshots and frozen held-out set
    assert [p.name for p in list_snapshots(settings)] == done["snapshots_rewritten"]
    assert as_key(server, key).get("/v1/models").status_code == 401
    assert audit_actions(server, carol["id"])[-1] == "user_delete"
    assert root.delete(f"/v1/admin/users/{carol['id']}").status_code == 404


# ------------------------------------------------------------------------------------------ CLI
def cli(home, *args, env=None, input=None):
    return runner.invoke(cli_app, [*args], env={"ASSISTANT_HOME": str(home), **(env or {})}, input=input)


def test_cli_accounts(home):
    assert cli(home, "user", "add", "root", "--admin", "--password", "pw-root-123").exit_code == 0
    r = cli(home, "user", "add", "bob", "--password", "pw-bob-123")
    assert r.exit_code == 0, r.output
    store = Store.open(f"sqlite:///{home / 'assistant.db'}")
    bob = store.get_user_by_name("bob")
    assert cli(home, "user", "disable", "bob").exit_code == 0
    assert store.authenticate("bob", "pw-bob-123") is None
    assert "bob\tuser\tdisabled" in cli(home, "user", "list").output
    assert cli(home, "user", "enable", "bob").exit_code == 0
    assert cli(home, "user", "passwd", "bob", "--password", "pw-bob-new").exit_code == 0
    assert store.authenticate("bob", "pw-bob-new") is not None
    new_key = cli(home, "user", "key", "bob", "--name", "laptop").output.strip()
    keys = json.loads(cli(home, "user", "keys", "bob", "--json").output)
    assert [k["name"] for k in keys] == ["default", "laptop"]
    assert cli(home, "user", "revoke", "bob", str(keys[1]["id"])).exit_code == 0
    assert store.user_for_api_key(new_key) is None
    assert cli(home, "user", "revoke", "bob", "999").exit_code == 2
    assert cli(home, "user", "disable", "nobody").exit_code == 2
    r = cli(home, "user", "delete", "root", "--yes")
    assert r.exit_code == 2 and "last enabled admin" in r.output
    assert cli(home, "user", "delete", "bob", input="n\n").exit_code == 1  # asks first
    assert store.get_user(bob.id) is not None
    r = cli(home, "user", "delete", "bob", "--yes")
    assert r.exit_code == 0, r.output
    assert store.get_user(bob.id) is None
    actions = [a["action"] for a in store.list_audit(100, target_user_id=bob.id)]
    assert actions == ["user_delete", "key_revoke", "key_add", "user_password", "user_enable", "user_disable",
                       "user_add"]
    assert all(a["actor"].startswith("cli:") for a in store.list_audit(100))


def test_cli_documents_memories_and_export(home, tmp_path, tiny_embedder_dir):
    env = {"ASSISTANT_EMBEDDER": str(tiny_embedder_dir)}
    assert cli(home, "user", "add", "root", "--admin", "--password", "pw-root-123").exit_code == 0
    assert cli(home, "user", "add", "amy", "--password", "pw-amy-123").exit_code == 0
    folder = tmp_path / "team-docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.md").write_text("# Alpha\n\nThe alpha plan starts in May.\n")
    (folder / "sub" / "b.txt").write_text("The beta plan starts in June.\n")
    (folder / "empty.md").write_text("")
    (folder / "skip.exe").write_bytes(b"MZ")
    (folder / ".hidden.md").write_text("# hidden\n\nnot loaded\n")
    r = cli(home, "docs", "add", str(folder), "--shared", env=env)
    assert r.exit_code == 1, r.output  # one refused file: reported, the others went in
    assert "added 2 of 3 documents" in r.output and "empty.md" in r.output and "is empty" in r.output
    docs = json.loads(cli(home, "docs", "list", "--json", "--user", "amy", env=env).output)
    assert sorted(d["filename"] for d in docs) == ["a.md", "b.txt"] and {d["scope"] for d in docs} == {"shared"}
    r = cli(home, "docs", "add", str(folder / "a.md"), "--shared", "--user", "amy", env=env)
    assert r.exit_code == 1 and "only admins" in r.output
    r = cli(home, "docs", "add", str(folder / "sub" / "b.txt"), "--user", "amy", env=env)
    assert r.exit_code == 0, r.output
    mine = [d for d in json.loads(cli(home, "docs", "list", "--json", "--user", "amy", env=env).output)
            if d["scope"] == "private"]
    assert len(mine) == 1
    assert cli(home, "docs", "rm", mine[0]["id"], env=env).exit_code == 2  # root cannot see amy's private one
    r = cli(home, "docs", "rm", mine[0]["id"], "--user", "amy", env=env)
    assert r.exit_code == 0 and "deleted" in r.output

    r = cli(home, "memory", "add", "My bike is red.", "--user", "amy", env=env)
    assert r.exit_code == 0, r.output
    mid = int(r.output.split("\t")[0])
    r = cli(home, "memory", "edit", str(mid), "My bike is green.", "--user", "amy", env=env)
    new_id = int(r.output.split("\t")[0])
    hist = cli(home, "memory", "history", str(new_id), "--user", "amy", env=env).output
    assert "green" in hist.splitlines()[0] and "red" in hist.splitlines()[1]
    assert cli(home, "memory", "rm", str(new_id), "--user", "root", env=env).exit_code == 2  # not root's
    assert "green" in cli(home, "memory", "list", "--user", "amy", env=env).output
    assert "2 versions" in cli(home, "memory", "rm", str(new_id), "--user", "amy", env=env).output
    assert cli(home, "memory", "list", "--user", "amy", env=env).output.strip() == ""

    store = Store.open(f"sqlite:///{home / 'assistant.db'}")
    amy = store.get_user_by_name("amy")
    conv = store.create_conversation(amy.id, "Bikes", source="cli")
    _, answer = store.add_turn(conv.id, "What colour is my bike?", "Green.")
    store.add_thumb(amy.id, answer.id, 1, comment="right")
    out = tmp_path / "amy.md"
    r = cli(home, "export", "--user", "amy", "--format", "markdown", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert "What colour is my bike?" in out.read_text() and "👍 (right)" in out.read_text()
    data = json.loads(cli(home, "export", "--user", "amy", "--conversation", str(conv.id)).output)
    assert data["conversations"][0]["messages"][1]["feedback"][0]["rating"] == 1
    assert cli(home, "export", "--user", "root", "--conversation", str(conv.id)).exit_code == 2
    assert cli(home, "export", "--user", "amy", "--format", "pdf").exit_code == 2


def test_readiness_is_one_call_for_the_api_the_cli_and_the_page(server, home):
    from training.readiness import check_readiness

    services = server.services
    r = admin(server).get("/v1/admin/readiness")
    assert r.status_code == 200, r.text
    direct = check_readiness(services.store, services.settings,
                             knowledge=services.knowledge).to_dict()
    assert r.json() == direct and set(r.json()) >= {"ready", "rows", "missing", "summary"}
    store = services.store
    plain = store.create_api_key(store.create_user(f"plain{id(r)}", "pw-plain-123").id)
    assert as_key(server, plain).get("/v1/admin/readiness").status_code == 403

    assert cli(home, "user", "add", "root", "--admin", "--password", "pw-root-123").exit_code == 0
    out = cli(home, "admin", "readiness", "--json")
    assert out.exit_code == 1, out.output  # an empty install is not ready, and says why
    assert json.loads(out.output)["missing"] and not json.loads(out.output)["ready"]
    assert "Not ready" in cli(home, "admin", "readiness").output


def test_the_frozen_heldout_set_loses_a_deleted_users_rows_at_once(settings):
    """Without waiting for the next build: the rows go, the counts, hashes and removal count follow."""
    from training.forget import Deleted, purge_rows
    from training.snapshots import write_json, write_jsonl

    frozen = settings.datasets_dir / "heldout"
    frozen.mkdir(parents=True)
    rows = {"sft": [{"conversation_id": 7, "messages": []}, {"conversation_id": 8, "messages": []}],
            "dpo": [{"conversation_id": 7, "prompt": []}], "kto": [{"doc_id": "dmine", "prompt": []}]}
    hashes = {k: write_jsonl(frozen / f"{k}.jsonl", v) for k, v in rows.items()}
    write_json(frozen / "meta.json", {"counts": {k: len(v) for k, v in rows.items()}, "hashes": hashes,
                                      "removed_deleted": 1})
    report = purge_rows(settings, Deleted(conversation_ids=frozenset({7}), doc_ids=frozenset({"dmine"})))
    assert report.heldout == 3 and report.rows == 3 and report.snapshots == []
    assert read_jsonl(frozen / "sft.jsonl") == [{"conversation_id": 8, "messages": []}]
    assert read_jsonl(frozen / "dpo.jsonl") == [] and read_jsonl(frozen / "kto.jsonl") == []
    meta = json.loads((frozen / "meta.json").read_text())
    assert meta["counts"] == {"sft": 1, "dpo": 0, "kto": 0} and meta["removed_deleted"] == 4
    assert meta["hashes"]["sft"] == write_jsonl(settings.home / "check.jsonl", [{"conversation_id": 8, "messages": []}])
    assert purge_rows(settings, Deleted(conversation_ids=frozenset({7}))).rows == 0  # nothing left to take


def test_a_user_changes_their_own_password(server):
    store = server.services.store
    user = store.create_user("fay", "pw-fay-old-1")
    key = store.create_api_key(user.id)
    fay = as_key(server, key)
    audit_before = len(store.list_audit(1000))
    for body, status, words in (({"current_password": "wrong-one-1", "new_password": "pw-fay-new-1"}, 400, "not right"),
                                ({"current_password": "pw-fay-old-1", "new_password": "short"}, 400, "at least 8"),
                                ({"current_password": "pw-fay-old-1"}, 400, "new_password"),
                                ({"current_password": "pw-fay-old-1", "new_password": "pw-fay-new-1", "x": 1}, 400,
                                 "x")):
        r = fay.put("/v1/account/password", json=body)
        assert r.status_code == status and words in r.json()["error"]["message"], r.text
    assert store.authenticate("fay", "pw-fay-old-1") is not None and len(store.list_audit(1000)) == audit_before
    assert httpx.put(server.url + "/v1/account/password", json={}).status_code == 401
    r = fay.put("/v1/account/password", json={"current_password": "pw-fay-old-1", "new_password": "pw-fay-new-1"})
    assert r.status_code == 200, r.text
    assert store.authenticate("fay", "pw-fay-old-1") is None and store.authenticate("fay", "pw-fay-new-1")
    assert fay.get("/v1/models").status_code == 200  # the key still works
    assert audit_actions(server, user.id) == ["user_password"]
    assert store.list_audit(1, target_user_id=user.id)[0]["actor"] == "fay"
