"""Security: who may do what, fuzzing, privacy of training data, bind address, no outbound traffic.

- Authorization matrix over HTTP: every route of the app (walked from the OpenAPI schema and the
  router, so a new route without a row here fails the test) x anonymous / owner / other user / admin,
  with the expected status per cell. Refused calls must change nothing (row counts) and leak nothing
  (a marker planted in the owner's conversation never appears in a refused response).
- The browser UI: every path of the mounted Gradio app and every page event refuse an anonymous
  caller; every handler in `ui.handlers` and every action of `assistant.admin_api.AdminActions` (the
  admin console calls the same ones) x owner / other user / admin.
- schemathesis fuzzing of the OpenAPI schema, bounded, with no 5xx.
- Planted personal data sent through the real API never reaches a dataset file or the files of an
  adapter trained on it.
- `assistant serve` binds 127.0.0.1 by default, and with outbound connections blocked it makes zero
  attempts to reach a non-loopback address while it starts, chats and ingests a document.

Real parts throughout: a real server built by `build_services`/`create_app` (tiny random model, real
SQLite store), the real dataset builder and the real training entry point.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from starlette.routing import Mount

from assistant.admin_api import AdminActions, AdminRequired, LoginRequired
from assistant.config import Settings
from assistant.server import Services, build_services, create_app
from tests.helpers import free_port
from ui import admin as adm
from ui import handlers as h
from ui.auth import gradio_sub_app
from ui.uploads import Received

ROOT = Path(__file__).resolve().parents[1]
MARKER = "zebra-marker-4471"  # planted in the owner's conversation; must never show up for anyone else
PASSWORDS = {"alice": "alice-password-1", "bob": "bob-password-1", "root": "root-password-1"}
ROLES = ("anonymous", "other", "admin", "owner")  # run order: the owner's destructive call comes last


# ------------------------------------------------------------------------------------------ the world
@dataclass
class World:
    services: Services
    client: TestClient
    users: dict[str, Any]  # owner / other / admin -> User
    keys: dict[str, str]  # owner / other / admin -> API key

    @property
    def store(self):
        return self.services.store

    def headers(self, role: str) -> dict[str, str]:
        return {} if role == "anonymous" else {"Authorization": f"Bearer {self.keys[role]}"}

    def owner_turn(self, text: str = f"Remember the word {MARKER}, please.") -> tuple[int, int]:
        """A fresh conversation of the owner through the API: (conversation id, answer id)."""
        r = self.client.post("/v1/chat/completions", headers=self.headers("owner"),
                             json={"messages": [{"role": "user", "content": text}], "max_tokens": 3,
                                   "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["conversation_id"], r.json()["message_id"]

    def owner_alternative(self, answer_id: int) -> int:
        """A second (regenerated) answer to the same question, for pairs."""
        reply = self.services.chat.regenerate(self.users["owner"], answer_id).drain()
        return reply.assistant_message.id


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir, tiny_adapters, tiny_embedder_dir) -> World:
    home = tmp_path_factory.mktemp("security-home")
    settings = Settings.load(env={}, home=home, model=str(tiny_model_dir), torch_threads=1,
                             embedder=str(tiny_embedder_dir), max_new_tokens=4, max_tokens_limit=16,
                             max_message_chars=2000)
    services = build_services(settings, with_agent=True)  # knowledge base + memory: the Documents/Memory pages
    services.backend.load_adapter("alpha", tiny_adapters["alpha"])
    store = services.store
    users = {"owner": store.create_user("alice", PASSWORDS["alice"]),
             "other": store.create_user("bob", PASSWORDS["bob"]),
             "admin": store.create_user("root", PASSWORDS["root"], role="admin")}
    keys = {role: store.create_api_key(u.id) for role, u in users.items()}
    app = create_app(services, with_ui=True)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield World(services, client, users, keys)
    services.close()


# ------------------------------------------------------------------------------------------ HTTP matrix
@dataclass
class Call:
    path: str  # concrete path
    body: Any = None
    params: dict | None = None
    files: list | None = None  # multipart uploads


@dataclass
class Row:
    """Expected status per role, and how to build the request (fresh owner resources per row)."""

    anonymous: int
    owner: int
    other: int
    admin: int
    make: Callable[[World], Call]
    public: bool = False  # answers everyone by design (health, API docs)

    def expect(self, role: str) -> int:
        return getattr(self, role)


def _const(path: str, body: Any = None, params: dict | None = None) -> Callable[[World], Call]:
    return lambda w: Call(path, body, params)


def _conv(method_body: Any = None) -> Callable[[World], Call]:
    def make(w: World) -> Call:
        cid, _ = w.owner_turn()
        return Call(f"/v1/conversations/{cid}", method_body)
    return make


def _chat_in_owner_conversation(w: World) -> Call:
    cid, _ = w.owner_turn()
    return Call("/v1/chat/completions", {"messages": [{"role": "user", "content": "and then?"}],
                                         "max_tokens": 2, "conversation_id": cid})


def _thumb(w: World) -> Call:
    _, mid = w.owner_turn()
    return Call("/v1/feedback/thumb", {"message_id": mid, "rating": -1, "reason": "wrong"})


def _edit(w: World) -> Call:
    _, mid = w.owner_turn()
    return Call("/v1/feedback/edit", {"message_id": mid, "corrected": "A corrected answer."})


def _pair(w: World) -> Call:
    _, mid = w.owner_turn()
    alt = w.owner_alternative(mid)
    return Call("/v1/feedback/pair", {"message_id": mid, "other_message_id": alt, "chosen_message_id": alt})


def _upload(w: World) -> Call:
    text = f"# Notes {time.time_ns()}\n\nEveryone may keep notes of their own.\n".encode()
    return Call("/v1/documents", files=[("files", (f"notes-{time.time_ns()}.md", text, "text/markdown"))])


def _owner_doc(suffix: str = "") -> Callable[[World], Call]:
    def make(w: World) -> Call:
        text = f"# Owner notes\n\nThe code word is {MARKER} ({time.time_ns()}).\n".encode()
        r = w.client.post("/v1/documents", headers=w.headers("owner"),
                          files=[("files", (f"owner-{time.time_ns()}.md", text, "text/markdown"))])
        assert r.status_code == 201, r.text
        return Call(f"/v1/documents/{r.json()['data'][0]['id']}{suffix}")
    return make


def _owner_memory(body: Any = None) -> Callable[[World], Call]:
    def make(w: World) -> Call:
        r = w.client.post("/v1/memories", headers=w.headers("owner"),
                          json={"text": f"My code word is {MARKER}-{time.time_ns()}"})
        assert r.status_code == 201, r.text
        return Call(f"/v1/memories/{r.json()['id']}", body)
    return make


def _owner_export(w: World) -> Call:
    cid, _ = w.owner_turn()
    return Call(f"/v1/export/conversations/{cid}", params={"format": "markdown"})


def _throwaway(suffix: str = "", body: Any = None, with_key: bool = False) -> Callable[[World], Call]:
    """A fresh account for an admin route to act on (never one of the world's users)."""
    def make(w: World) -> Call:
        u = w.store.create_user(f"tmp{time.time_ns()}", "pw-throwaway-1")
        key_part = ""
        if with_key:
            w.store.create_api_key(u.id)
            key_part = f"/{w.store.list_api_keys(u.id)[0]['id']}"
        return Call(f"/v1/admin/users/{u.id}{suffix}{key_part}", body)
    return make


def _owner_personal_report(w: World) -> Call:
    """A personal version of the owner's, with its report: only the owner reads it (everyone else: 404)."""
    from tests.conftest import make_random_adapter
    from training.registry import Registry

    owner = w.users["owner"]
    folder = w.services.settings.home / f"matrix-personal-{time.time_ns()}"
    make_random_adapter(Path(w.services.settings.model), folder / "adapter", seed=61)
    (folder / "eval").mkdir()
    (folder / "eval" / "report.json").write_text("{}")
    name = Registry(w.services.settings, w.store, owner_id=owner.id).register(
        folder / "adapter", gate="failed", report_dir=folder / "eval").name
    return Call("/v1/personal/report", params={"version": name})


def _admin(admin_status: int, make: Callable[[World], Call]) -> Row:
    # Every admin route: anonymous 401, any non-admin 403 (before the body is read), admin gets through.
    return Row(401, 403, 403, admin_status, make)


# Admin calls are chosen to pass authorization and then stop cheaply (a missing name, a refused
# option), so the matrix never starts a retrain; what they do when valid is tested in their own files.
MATRIX: dict[tuple[str, str], Row] = {
    ("GET", "/health"): Row(200, 200, 200, 200, _const("/health"), public=True),
    ("GET", "/openapi.json"): Row(200, 200, 200, 200, _const("/openapi.json"), public=True),
    ("GET", "/fonts/{name}"): Row(200, 200, 200, 200, _const("/fonts/hangul-fallback.woff2"), public=True),
    # The first-run form exists only while there is no account; here there are some.
    ("GET", "/setup"): Row(404, 404, 404, 404, _const("/setup"), public=True),
    ("POST", "/setup"): Row(404, 404, 404, 404, _const("/setup", {"username": "x", "password": "p" * 12}),
                            public=True),
    ("POST", "/v1/load_lora_adapter"): _admin(409, lambda w: Call("/v1/load_lora_adapter", {
        "lora_name": f"matrix{time.time_ns()}", "lora_path": str(w.services.settings.adapters_dir / "missing")})),
    ("POST", "/v1/unload_lora_adapter"): _admin(404, _const("/v1/unload_lora_adapter", {"lora_name": "no-such"})),
    ("GET", "/v1/models"): Row(401, 200, 200, 200, _const("/v1/models")),
    ("POST", "/v1/chat/completions"): Row(401, 200, 404, 404, _chat_in_owner_conversation),
    ("GET", "/v1/conversations"): Row(401, 200, 200, 200, _const("/v1/conversations")),
    ("GET", "/v1/conversations/{conversation_id}"): Row(401, 200, 404, 404, _conv()),
    ("PATCH", "/v1/conversations/{conversation_id}"): Row(401, 200, 404, 404, _conv({"title": "renamed"})),
    ("DELETE", "/v1/conversations/{conversation_id}"): Row(401, 200, 404, 404, _conv()),
    ("POST", "/v1/feedback/thumb"): Row(401, 200, 404, 404, _thumb),
    ("POST", "/v1/feedback/edit"): Row(401, 200, 404, 404, _edit),
    ("POST", "/v1/feedback/pair"): Row(401, 200, 404, 404, _pair),
    ("GET", "/v1/admin/counts"): _admin(200, _const("/v1/admin/counts")),
    ("GET", "/v1/admin/datasets"): _admin(200, _const("/v1/admin/datasets")),
    ("POST", "/v1/admin/datasets"): _admin(400, _const("/v1/admin/datasets",
                                                       {"options": {"split_ratios": [0.5, 0.5, 0.5]}})),
    ("GET", "/v1/admin/datasets/{name}/preview"): _admin(404, _const("/v1/admin/datasets/v0999/preview")),
    ("POST", "/v1/admin/synth"): _admin(400, _const("/v1/admin/synth", {"max_chunks": 0})),
    ("POST", "/v1/admin/jobs"): _admin(400, _const("/v1/admin/jobs", {"no_such_option": 1})),
    ("GET", "/v1/admin/jobs"): _admin(200, _const("/v1/admin/jobs")),
    ("GET", "/v1/admin/jobs/{job_id}"): _admin(404, _const("/v1/admin/jobs/999")),
    ("POST", "/v1/admin/jobs/{job_id}/cancel"): _admin(404, _const("/v1/admin/jobs/999/cancel")),
    ("GET", "/v1/admin/adapters"): _admin(200, _const("/v1/admin/adapters")),
    ("GET", "/v1/admin/adapters/{name}/report"): _admin(404, _const("/v1/admin/adapters/v0999/report")),
    ("GET", "/v1/admin/adapters/{name}/report.png"): _admin(404, _const("/v1/admin/adapters/v0999/report.png")),
    ("POST", "/v1/admin/adapters/{name}/promote"): _admin(404, _const("/v1/admin/adapters/v0999/promote", {})),
    ("POST", "/v1/admin/rollback"): _admin(400, _const("/v1/admin/rollback", {})),
    ("GET", "/v1/admin/schedule"): _admin(200, _const("/v1/admin/schedule")),
    ("PUT", "/v1/admin/schedule"): _admin(400, _const("/v1/admin/schedule", {"no_such_setting": 1})),
    # Documents, memories and exports: each user acts on their own; another's reads as missing.
    ("POST", "/v1/documents"): Row(401, 201, 201, 201, _upload),
    ("GET", "/v1/documents"): Row(401, 200, 200, 200, _const("/v1/documents")),
    ("GET", "/v1/documents/{doc_id}"): Row(401, 200, 404, 404, _owner_doc()),
    ("DELETE", "/v1/documents/{doc_id}"): Row(401, 200, 404, 404, _owner_doc()),
    ("GET", "/v1/memories"): Row(401, 200, 200, 200, _const("/v1/memories")),
    ("POST", "/v1/memories"): Row(401, 201, 201, 201, _const("/v1/memories", {"text": "I like green tea."})),
    ("GET", "/v1/memories/{memory_id}"): Row(401, 200, 404, 404, _owner_memory()),
    ("PATCH", "/v1/memories/{memory_id}"): Row(401, 200, 404, 404, _owner_memory({"text": "I like black tea."})),
    ("DELETE", "/v1/memories/{memory_id}"): Row(401, 200, 404, 404, _owner_memory()),
    ("GET", "/v1/export/conversations"): Row(401, 200, 200, 200, _const("/v1/export/conversations")),
    ("GET", "/v1/export/conversations/{conversation_id}"): Row(401, 200, 404, 404, _owner_export),
    # Accounts: admins only, always on a throwaway account.
    ("GET", "/v1/admin/users"): _admin(200, _const("/v1/admin/users")),
    ("POST", "/v1/admin/users"): _admin(201, lambda w: Call("/v1/admin/users", {
        "username": f"new{time.time_ns()}", "password": "pw-new-user-1"})),
    ("POST", "/v1/admin/users/{user_id}/disable"): _admin(200, _throwaway("/disable")),
    ("POST", "/v1/admin/users/{user_id}/enable"): _admin(200, _throwaway("/enable")),
    ("DELETE", "/v1/admin/users/{user_id}"): _admin(200, _throwaway()),
    ("PUT", "/v1/admin/users/{user_id}/password"): _admin(200, _throwaway("/password", {"password": "pw-throwaway-2"})),
    ("GET", "/v1/admin/users/{user_id}/keys"): _admin(200, _throwaway("/keys")),
    ("POST", "/v1/admin/users/{user_id}/keys"): _admin(201, _throwaway("/keys", {"name": "laptop"})),
    ("DELETE", "/v1/admin/users/{user_id}/keys/{key_id}"): _admin(200, _throwaway("/keys", with_key=True)),
    ("GET", "/v1/admin/audit"): _admin(200, _const("/v1/admin/audit")),
    ("GET", "/v1/admin/readiness"): _admin(200, _const("/v1/admin/readiness")),
    # Personal adapters: each user's own (another's version reads as missing); the list and training: admins.
    ("GET", "/v1/personal"): Row(401, 200, 200, 200, _const("/v1/personal")),
    ("PUT", "/v1/personal"): Row(401, 200, 200, 200, _const("/v1/personal", {"opted_in": False})),
    ("GET", "/v1/personal/report"): Row(401, 200, 404, 404, _owner_personal_report),
    ("DELETE", "/v1/personal"): Row(401, 200, 200, 200, _const("/v1/personal")),
    ("GET", "/v1/admin/personal"): _admin(200, _const("/v1/admin/personal")),
    ("GET", "/v1/admin/personal/{user_id}"): _admin(404, _const("/v1/admin/personal/999999")),
    ("POST", "/v1/admin/personal/{user_id}/train"): _admin(404, _const("/v1/admin/personal/999999/train", {})),
    # One's own password: the owner's current one is right (and kept), everyone else's is not.
    ("PUT", "/v1/account/password"): Row(401, 200, 400, 400, _const("/v1/account/password", {
        "current_password": PASSWORDS["alice"], "new_password": PASSWORDS["alice"]})),
}


def _flatten(routes: list[Any], prefix: str = "") -> list[tuple[str, set[str], Any]]:
    """(path, methods, route) for every route, descending into included routers and mounts."""
    out = []
    for r in routes:
        inner = getattr(r, "original_router", None)  # FastAPI's lazily included router
        if inner is not None:
            out += _flatten(inner.routes, prefix + getattr(getattr(r, "include_context", None), "prefix", ""))
        elif isinstance(r, Mount):
            out += _flatten(r.routes, prefix + r.path.rstrip("/"))
        else:
            out.append((prefix + r.path, set(getattr(r, "methods", None) or {"WEBSOCKET"}) - {"HEAD"}, r))
    return out


def host_routes(app) -> set[tuple[str, str]]:
    """Every (method, path) the host app itself answers: the API, its docs, the admin routes."""
    out = set()
    for path, methods, _ in _flatten([r for r in app.router.routes if not isinstance(r, Mount)]):
        out |= {(m, path) for m in methods}
    return out


def test_matrix_covers_every_route(world: World):
    app = world.client.app
    schema_ops = {(m.upper(), p) for p, item in app.openapi()["paths"].items() for m in item}
    routes = host_routes(app)
    assert schema_ops <= routes, "the OpenAPI schema names routes the router does not have"
    missing = routes - set(MATRIX)
    assert not missing, f"routes without an authorization row in MATRIX: {sorted(missing)}"
    stale = set(MATRIX) - routes
    assert not stale, f"MATRIX rows for routes that no longer exist: {sorted(stale)}"


@pytest.mark.parametrize("route", sorted(MATRIX), ids=lambda r: f"{r[0]} {r[1]}")
def test_authorization_matrix(world: World, route: tuple[str, str]):
    method, _ = route
    row = MATRIX[route]
    call = row.make(world)
    for role in ROLES:
        before = world.store.counts()
        r = world.client.request(method, call.path, headers=world.headers(role), params=call.params,
                                 json=call.body if call.body is not None else None, files=call.files)
        want = row.expect(role)
        assert r.status_code == want, f"{method} {call.path} as {role}: {r.status_code} {r.text[:300]}"
        if r.status_code >= 400:
            assert world.store.counts() == before, f"refused {method} {call.path} as {role} changed rows"
            if r.headers.get("content-type", "").startswith("application/json"):
                assert "error" in r.json(), f"error responses use the OpenAI error shape: {r.text[:200]}"
        if r.status_code == 401:
            assert r.headers.get("www-authenticate") == "Bearer"
        if role != "owner" and not row.public:
            assert MARKER not in r.text, f"{method} {call.path} leaked the owner's text to {role}"


def test_listings_show_only_ones_own(world: World):
    cid, _ = world.owner_turn()
    for role in ("other", "admin"):
        ids = [c["id"] for c in world.client.get("/v1/conversations", headers=world.headers(role)).json()["data"]]
        assert cid not in ids
    ids = [c["id"] for c in world.client.get("/v1/conversations", headers=world.headers("owner")).json()["data"]]
    assert cid in ids


def test_bad_keys_are_refused(world: World):
    for header in ("Bearer", "Bearer ", "Bearer not-a-key", "Basic " + world.keys["owner"], world.keys["owner"],
                   "Bearer " + world.keys["owner"] + "x"):
        r = world.client.get("/v1/models", headers={"Authorization": header})
        assert r.status_code == 401, header
    revoked = world.store.create_api_key(world.users["other"].id, name="to-revoke")
    assert world.client.get("/v1/models", headers={"Authorization": f"Bearer {revoked}"}).status_code == 200
    key_id = max(k["id"] for k in world.store.list_api_keys(world.users["other"].id))
    assert world.store.revoke_api_key(world.users["other"].id, key_id)
    assert world.client.get("/v1/models", headers={"Authorization": f"Bearer {revoked}"}).status_code == 401


# ------------------------------------------------------------------------------------------ the UI over HTTP
# Paths the login page needs before anyone is logged in (ui/auth.py PUBLIC_*); everything else of the
# mounted Gradio app must refuse an anonymous caller.
UI_PUBLIC = re.compile(r"^/(|login/?|logout|favicon\.ico|manifest\.json|robots\.txt|theme\.css|"
                       r"gradio_api/theme\.css|(assets|static|svelte|gradio_api/assets|gradio_api/static)/.*)$")


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x1", path)


def ui_routes(app) -> list[tuple[str, set[str]]]:
    mounts = [r for r in app.router.routes if isinstance(r, Mount)]
    assert mounts, "the UI is not mounted"
    return [(p, m) for p, m, _ in _flatten(mounts)]


def test_every_ui_path_refuses_anonymous(world: World):
    routes = ui_routes(world.client.app)
    assert len(routes) > 20, "walking the Gradio app found suspiciously few routes"
    host_paths = {p for _, p in host_routes(world.client.app)}
    checked = 0
    for path, methods in routes:
        concrete = _concrete(path) or "/"
        if path in host_paths:
            continue  # shadowed by the host app's own route (e.g. /openapi.json): covered by MATRIX
        for method in methods:
            if method == "WEBSOCKET":
                continue
            r = world.client.request(method, concrete, headers={"Accept": "application/json"},
                                     follow_redirects=False)
            if UI_PUBLIC.match(concrete):
                assert r.status_code < 500, f"{method} {concrete}: {r.status_code}"
                assert MARKER not in r.text
            else:
                assert r.status_code == 401, f"{method} {concrete} answered an anonymous caller: {r.status_code}"
                checked += 1
    assert checked > 10


def _login(world: World, username: str, password: str | None = None) -> httpx.Response:
    """Log in through Gradio's login form; the test client keeps the session cookie it sets."""
    world.client.cookies.clear()
    return world.client.post("/login", data={"username": username, "password": password or PASSWORDS[username]},
                             follow_redirects=False)


def test_every_page_event_refuses_anonymous_but_not_a_logged_in_user(world: World):
    blocks = gradio_sub_app(world.client.app).get_blocks()
    fns = list(blocks.fns.values()) if isinstance(blocks.fns, dict) else list(blocks.fns)
    assert len(fns) >= 15, "the page has fewer events than the chat page alone wires up"
    world.client.cookies.clear()
    try:
        for fn in fns:
            r = world.client.post("/gradio_api/queue/join",
                                  json={"fn_index": fn._id, "data": [], "event_data": None,
                                        "session_hash": "anon-probe", "trigger_id": None})
            assert r.status_code == 401, f"event {fn.name} ({fn._id}) answered an anonymous caller: {r.status_code}"
        assert world.client.get("/config", headers={"Accept": "application/json"}).status_code == 401
        bad = _login(world, "bob", "wrong-password")
        assert bad.status_code >= 400
        assert world.client.get("/config", headers={"Accept": "application/json"}).status_code == 401
        ok = _login(world, "bob")
        assert ok.status_code in (200, 302, 303), ok.text
        r = world.client.get("/config")
        assert r.status_code == 200 and "components" in r.json()
        assert MARKER not in r.text  # bob's page carries nothing of alice's
    finally:
        world.client.cookies.clear()


# ------------------------------------------------------------------------------------------ UI handler matrix
@dataclass
class HRow:
    """A handler call; `owner_ok` the owner's result check; others must get UiError (not found) unless
    `shared` (a listing that must simply not contain the owner's items)."""

    call: Callable[[World, Any, dict], Any]
    shared: bool = False
    check_other: Callable[[Any, dict], bool] | None = None


def _drain(gen) -> list:
    return list(gen)


def _own(world: World) -> dict:
    cid, mid = world.owner_turn()
    h.rate(world.services, world.users["owner"], mid, 1)
    return {"cid": cid, "mid": mid, "alt": world.owner_alternative(mid)}


def _regen_and_stream(w: World, u: Any, r: dict):
    reply = h.start_regenerate(w.services, u, r["mid"])
    return _drain(h.stream_regenerate(w.services, u, r["mid"], reply))


def _stream_own_reply(w: World, u: Any, r: dict):
    # The caller starts a reply of their own, then names the owner's conversation: it must be refused.
    reply = h.start_turn(w.services, u, None, "hi")
    try:
        return _drain(h.stream_turn(w.services, u, r["cid"], "hi", reply))
    finally:
        reply.stop()
        reply.drain()


def _stream_own_regen(w: World, u: Any, r: dict):
    own_cid, own_mid = (r["cid"], r["mid"]) if u.id == w.users["owner"].id else _own_turn_of(w, u)
    reply = h.start_regenerate(w.services, u, own_mid)
    try:
        return _drain(h.stream_regenerate(w.services, u, r["mid"], reply))
    finally:
        reply.stop()
        reply.drain()


def _own_turn_of(w: World, u: Any) -> tuple[int, int]:
    view = h.send(w.services, u, None, "my own question")
    return view.conversation_id, view.last_answer_id


def _choose(w: World, u: Any, r: dict):
    return h.choose(w.services, u, r["mid"], r["alt"], r["alt"])


HANDLERS: dict[str, HRow] = {
    "whoami": HRow(lambda w, u, r: h.whoami(u), shared=True, check_other=lambda out, r: "alice" not in out),
    "conversation_choices": HRow(lambda w, u, r: h.conversation_choices(w.services, u), shared=True,
                                 check_other=lambda out, r: r["cid"] not in [c for _, c in out]),
    "conversation_view": HRow(lambda w, u, r: h.conversation_view(w.services, u, r["cid"])),
    "search_conversations": HRow(lambda w, u, r: h.search_conversations(w.services, u, MARKER), shared=True,
                                 check_other=lambda out, r: r["cid"] not in [c for _, c in out]),
    "export_markdown": HRow(lambda w, u, r: h.export_markdown(w.services, u, r["cid"])),
    "export_json": HRow(lambda w, u, r: h.export_json(w.services, u, r["cid"])),
    "rename_conversation": HRow(lambda w, u, r: h.rename_conversation(w.services, u, r["cid"], "new title")),
    "delete_conversation": HRow(lambda w, u, r: h.delete_conversation(w.services, u, r["cid"])),
    "start_turn": HRow(lambda w, u, r: h.start_turn(w.services, u, r["cid"], "next question").drain()),
    "stream_turn": HRow(_stream_own_reply),
    "send": HRow(lambda w, u, r: h.send(w.services, u, r["cid"], "next question")),
    "rate": HRow(lambda w, u, r: h.rate(w.services, u, r["mid"], -1, "wrong", "nope")),
    "clear_rating": HRow(lambda w, u, r: h.clear_rating(w.services, u, r["mid"])),
    "current_rating": HRow(lambda w, u, r: h.current_rating(w.services, u, r["mid"]), shared=True,
                           check_other=lambda out, r: out is None),
    "edit_answer": HRow(lambda w, u, r: h.edit_answer(w.services, u, r["mid"], "the right answer")),
    "start_regenerate": HRow(lambda w, u, r: h.start_regenerate(w.services, u, r["mid"]).drain()),
    "stream_regenerate": HRow(_stream_own_regen),
    "choose": HRow(_choose),
}


def handler_functions() -> set[str]:
    """Public functions of ui.handlers that act for a logged-in user (take a `user` parameter)."""
    return {name for name, fn in inspect.getmembers(h, inspect.isfunction)
            if fn.__module__ == h.__name__ and not name.startswith("_")
            and "user" in inspect.signature(fn).parameters}


def test_handler_matrix_covers_every_handler():
    missing = handler_functions() - set(HANDLERS)
    assert not missing, f"ui.handlers functions without a row in HANDLERS: {sorted(missing)}"
    assert not set(HANDLERS) - handler_functions()


def test_anonymous_page_sessions_resolve_to_no_user(world: World):
    for name in (None, "", "ghost"):
        with pytest.raises(h.NotLoggedIn):
            h.resolve_user(world.services, name)
    with pytest.raises(h.UiError):
        h.require_admin(world.services, "bob")
    assert h.require_admin(world.services, "root").is_admin


@pytest.mark.parametrize("name", sorted(HANDLERS))
def test_ui_handler_matrix(world: World, name: str):
    row = HANDLERS[name]
    res = _own(world)
    for role in ("other", "admin"):
        before = world.store.counts()
        actor = world.users[role]
        if row.shared:
            out = row.call(world, actor, res)
            assert row.check_other(out, res), f"{name} as {role} showed the owner's data: {out!r}"
        else:
            with pytest.raises(h.UiError, match="not found"):
                row.call(world, actor, res)
            after = world.store.counts()
            # A refused call changes nothing of the owner's; `stream_*` rows start a turn of their own first.
            if name not in ("stream_turn", "stream_regenerate"):
                assert after == before, f"refused {name} as {role} changed rows"
    out = row.call(world, world.users["owner"], res)
    if name == "current_rating":
        assert out is not None and out.rating == 1
    if name == "conversation_view":
        assert MARKER in json.dumps(out.rows)
    if name in ("export_markdown", "export_json"):
        assert MARKER in json.dumps(out, ensure_ascii=False)
    if name == "search_conversations":
        assert res["cid"] in [c for _, c in out]


# ------------------------------------------------------------------------------------------ Documents and Memory pages
def _own_library(world: World) -> dict:
    from ui import library as lib

    owner = world.users["owner"]
    stamp = time.time_ns()
    path = world.services.settings.home / f"notes-{stamp}.md"
    path.write_text(f"# Private notes\n\nThe vault code word is {MARKER} ({stamp}). Lumen Desk costs 8 dollars.\n")
    [res] = lib.upload_documents(world.services, owner, [Received(path.name, path.read_bytes())])
    assert res.ok, res.message
    mem = lib.add_memory(world.services, owner, f"My favourite code word is {MARKER}-{time.time_ns()}")
    return {"doc": res.document.doc_id, "mem": mem.id}


def _not_in(field: str) -> Callable[[Any, dict], bool]:
    return lambda out, r: r[field] not in json.dumps(out, default=str) and MARKER not in json.dumps(out, default=str)


def _upload_own(w: World, u: Any, r: dict):
    from ui import library as lib

    path = w.services.settings.home / f"own-{u.id}-{time.time_ns()}.md"
    path.write_text(f"# Notes of user {u.id}\n\nNothing secret here, {time.time_ns()}.\n")
    return lib.upload_documents(w.services, u, [Received(path.name, path.read_bytes())])


def _receive_owner_upload(w: World, u: Any, r: dict):
    """A file the owner uploaded through the page, named by someone else, is refused and stays."""
    from ui import library as lib
    from ui.uploads import PageUploads

    uploads = PageUploads(w.services.settings.uploads_dir / "matrix")
    uploads.start()
    path = uploads.folder / "x" / "owner-notes.md"
    path.parent.mkdir()
    path.write_text(f"secret {MARKER}")
    uploads.received(w.users["owner"].username, [str(path)])
    out = lib.receive_uploads(uploads, u, [str(path)])
    assert path.exists() == (u.id != w.users["owner"].id)  # taken (read and deleted) only by its uploader
    return out


def _library_rows() -> dict[str, HRow]:
    from ui import library as lib

    return {
        "document_rows": HRow(lambda w, u, r: lib.document_rows(w.services, u), shared=True,
                              check_other=_not_in("doc")),
        "document_choices": HRow(lambda w, u, r: lib.document_choices(w.services, u), shared=True,
                                 check_other=_not_in("doc")),
        "upload_documents": HRow(_upload_own, shared=True,
                                 check_other=lambda out, r: all(x.ok and x.document.doc_id != r["doc"] for x in out)),
        "delete_document": HRow(lambda w, u, r: lib.delete_document(w.services, u, r["doc"])),
        "receive_uploads": HRow(_receive_owner_upload, shared=True,
                                check_other=lambda out, r: out[0] == [] and len(out[1]) == 1 and not out[1][0].ok),
        "memory_rows": HRow(lambda w, u, r: lib.memory_rows(w.services, u), shared=True,
                            check_other=lambda out, r: all(row[0] != r["mem"] for row in out)
                            and MARKER not in json.dumps(out, default=str)),
        "memory_choices": HRow(lambda w, u, r: lib.memory_choices(w.services, u), shared=True,
                               check_other=lambda out, r: r["mem"] not in [c for _, c in out]),
        "memory_text": HRow(lambda w, u, r: lib.memory_text(w.services, u, r["mem"])),
        "memory_history": HRow(lambda w, u, r: lib.memory_history(w.services, u, r["mem"])),
        "add_memory": HRow(lambda w, u, r: lib.add_memory(w.services, u, f"I drink tea, says {u.id}"), shared=True,
                           check_other=lambda out, r: out.id != r["mem"] and MARKER not in out.text),
        "edit_memory": HRow(lambda w, u, r: lib.edit_memory(w.services, u, r["mem"], "changed by someone")),
        "forget_memory": HRow(lambda w, u, r: lib.forget_memory(w.services, u, r["mem"])),
    }


def test_library_matrix_covers_every_handler():
    from ui import library as lib

    names = {n for n, f in inspect.getmembers(lib, inspect.isfunction)
             if f.__module__ == lib.__name__ and not n.startswith("_") and "user" in inspect.signature(f).parameters}
    missing = names - set(_library_rows())
    assert not missing, f"ui.library functions without a row: {sorted(missing)}"


@pytest.mark.parametrize("name", sorted(_library_rows()))
def test_library_handler_matrix(world: World, name: str):
    row = _library_rows()[name]
    res = _own_library(world)
    for role in ("other", "admin"):
        actor = world.users[role]
        if row.shared:
            out = row.call(world, actor, res)
            assert row.check_other(out, res), f"{name} as {role} showed the owner's data: {out!r}"
        else:
            with pytest.raises(h.UiError, match="not found"):
                row.call(world, actor, res)
    out = row.call(world, world.users["owner"], res)  # the owner may; afterwards their data is still theirs
    if name == "memory_text":
        assert MARKER in out


def test_only_admins_add_team_documents(world: World):
    from ui import library as lib

    path = world.services.settings.home / "team.md"
    path.write_text("# Team notes\n\nShared with everyone.\n")
    for role in ("owner", "other"):
        with pytest.raises(h.UiError, match="only admins"):
            lib.upload_documents(world.services, world.users[role], [Received(path.name, path.read_bytes())],
                                 scope="shared")
    [res] = lib.upload_documents(world.services, world.users["admin"], [Received(path.name, path.read_bytes())],
                                 scope="shared")
    assert res.ok
    # Everyone reads a team document; only its uploader or an admin deletes it.
    assert res.document.doc_id in json.dumps(lib.document_rows(world.services, world.users["other"]))
    with pytest.raises(h.UiError):
        lib.delete_document(world.services, world.users["other"], res.document.doc_id)
    assert lib.delete_document(world.services, world.users["admin"], res.document.doc_id) > 0


# ------------------------------------------------------------------------------------------ admin console views
ADMIN_VIEWS: dict[str, Callable[[AdminActions, Any], Any]] = {
    "counts_markdown": lambda a, u: adm.counts_markdown(a, u),
    "dataset_choices": lambda a, u: adm.dataset_choices(a, u),
    "preview_frame": lambda a, u: adm.preview_frame(a, u, None, "sft", "train"),
    "jobs_rows": lambda a, u: adm.jobs_rows(a, u),
    "job_view": lambda a, u: adm.job_view(a, u, None),
    "adapters_view": lambda a, u: adm.adapters_view(a, u),
    "report_view": lambda a, u: adm.report_view(a, u, None),
    "schedule_values": lambda a, u: adm.schedule_values(a, u),
    "save_schedule": lambda a, u: adm.save_schedule(a, u, False, "feedback", 50, 24.0, "03:00", 24.0, True, 5, False),
    "start_job": lambda a, u: adm.start_job(a, u, "sft,dpo", 0, None, None, None, None, None, True, False,
                                           '{"no_such_option": 1}'),
    "readiness_markdown": lambda a, u: adm.readiness_markdown(a, u),
    "watch": lambda a, u: adm.watch(a, u, None),
}


def _refused_to_everyone_but_admins(world: World, actions: AdminActions, name: str, call: Callable) -> None:
    """Anonymous: LoginRequired; a user, owner or not: AdminRequired; and no row changed by any of them."""
    before = world.store.counts()
    with pytest.raises(LoginRequired):
        call(actions, None)
    for role in ("owner", "other"):
        with pytest.raises(AdminRequired):
            call(actions, world.users[role])
    assert world.store.counts() == before, f"refused admin action {name} changed rows"


def test_admin_console_matrix(world: World):
    names = {n for n, f in inspect.getmembers(adm, inspect.isfunction)
             if f.__module__ == adm.__name__ and not n.startswith("_") and "user" in inspect.signature(f).parameters}
    missing = names - set(ADMIN_VIEWS)
    assert not missing, f"ui.admin view functions without a row in ADMIN_VIEWS: {sorted(missing)}"
    actions: AdminActions = world.services.admin
    for name, call in sorted(ADMIN_VIEWS.items()):
        _refused_to_everyone_but_admins(world, actions, name, call)
        try:
            out = call(actions, world.users["admin"])
        except PermissionError as e:
            pytest.fail(f"admin was refused {name}: {e}")
        except ValueError:
            assert name == "start_job"  # the deliberately refused option, after authorization
        else:
            assert out is not None


# ------------------------------------------------------------------------------------------ admin actions
ADMIN_CALLS: dict[str, Callable[[AdminActions, Any], Any]] = {
    "counts": lambda a, u: a.counts(u),
    "list_datasets": lambda a, u: a.list_datasets(u),
    "build_dataset": lambda a, u: a.build_dataset(u, {"split_ratios": [0.5, 0.5, 0.5]}),
    "preview_dataset": lambda a, u: a.preview_dataset(u, "v0999"),
    "synth": lambda a, u: a.synth(u, max_chunks=0),
    "start_retrain": lambda a, u: a.start_retrain(u, {"no_such_option": 1}),
    "cancel_job": lambda a, u: a.cancel_job(u, 999),
    "list_jobs": lambda a, u: a.list_jobs(u),
    "job_detail": lambda a, u: a.job_detail(u, 999),
    "list_adapters": lambda a, u: a.list_adapters(u),
    "report": lambda a, u: a.report(u, "v0999"),
    "report_plot": lambda a, u: a.report_plot(u, "v0999"),
    "promote": lambda a, u: a.promote(u, "v0999"),
    "rollback": lambda a, u: a.rollback(u),
    "get_schedule": lambda a, u: a.get_schedule(u),
    "set_schedule": lambda a, u: a.set_schedule(u, {"no_such_setting": 1}),
    "load_lora_adapter": lambda a, u: a.load_lora_adapter(u, "bad name!", str(a.settings.adapters_dir / "no")),
    "unload_lora_adapter": lambda a, u: a.unload_lora_adapter(u, "no-such-adapter"),
}


def admin_methods() -> set[str]:
    return {n for n, f in inspect.getmembers(AdminActions, inspect.isfunction)
            if not n.startswith("_") and "user" in inspect.signature(f).parameters}


def test_admin_action_matrix(world: World):
    missing = admin_methods() - set(ADMIN_CALLS)
    assert not missing, f"AdminActions methods without a row in ADMIN_CALLS: {sorted(missing)}"
    actions: AdminActions = world.services.admin
    for name, call in sorted(ADMIN_CALLS.items()):
        _refused_to_everyone_but_admins(world, actions, name, call)
        try:
            call(actions, world.users["admin"])
        except PermissionError as e:  # the one outcome an admin must never get
            pytest.fail(f"admin was refused {name}: {e}")
        except (LookupError, ValueError):
            pass  # the deliberately cheap arguments stop here, after authorization


# ------------------------------------------------------------------------------------------ fuzzing
def test_openapi_fuzzing_finds_no_server_errors(world: World):
    """schemathesis generates requests from the OpenAPI schema (valid and invalid); none may 5xx.

    Bounded: a few examples per operation, as an admin (which reaches every route's body handling).
    The retrain/synth starters run as a plain user: as an admin a valid body starts real work.
    """
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_asgi("/openapi.json", world.client.app)
    failures: list[str] = []
    calls = {"n": 0}

    def fuzz(op: Any, role: str) -> None:
        @settings(max_examples=25, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def run(case: Any) -> None:
            calls["n"] += 1
            try:
                r = case.call(headers=world.headers(role))
            except Exception as e:  # noqa: BLE001 - the ASGI client re-raises what a real server answers with 500
                failures.append(f"{op.method.upper()} {case.formatted_path} raised {type(e).__name__}: {e!s:.200} "
                                f"(body {case.body!r:.200}, query {case.query!r:.100})")
                return
            if r.status_code >= 500:
                failures.append(f"{op.method.upper()} {case.formatted_path} -> {r.status_code}: "
                                f"{case.body!r:.200} {r.text[:200]}")
        run()

    ops = [result.ok() for result in schema.get_all_operations()]
    for op in ops:
        starts_work = op.method.upper() == "POST" and op.path in ("/v1/admin/jobs", "/v1/admin/synth")
        # Random ids must not disable, re-password or delete the world's own users.
        starts_work = starts_work or (op.path.startswith("/v1/admin/users/") and op.method.upper() != "GET")
        fuzz(op, "owner" if starts_work else "admin")
    assert len(ops) >= 20 and calls["n"] >= 5 * len(ops)
    assert not failures, "server errors:\n" + "\n".join(failures[:20])


# ------------------------------------------------------------------------------------------ privacy of training data
CATALOGUE = json.loads((ROOT / "tests" / "data" / "pii_catalogue.json").read_text(encoding="utf-8"))


def _files_containing(root: Path, needles: list[str]) -> dict[str, list[str]]:
    """needle -> files under root whose bytes contain it (JSONL, Arrow, JSON, tokenizer files alike)."""
    hits: dict[str, list[str]] = {}
    blobs = [(p, p.read_bytes()) for p in root.rglob("*") if p.is_file()]
    for n in needles:
        raw = n.encode("utf-8")
        found = [str(p.relative_to(root)) for p, b in blobs if raw in b]
        if found:
            hits[n] = found
    return hits


def test_planted_personal_data_never_reaches_datasets_or_adapter(tmp_path, tiny_model_dir):
    """Every catalogue case goes in as a question, a client system note and an edited answer (the
    edit is a training target), and is rated; the built snapshot and the adapter trained on it by the
    real training entry point hold none of the forbidden strings, while ordinary numbers survive."""
    from training.dataset_build import BuildOptions, build_datasets

    settings = Settings.load(env={}, home=tmp_path / "home", model=str(tiny_model_dir), torch_threads=1,
                             max_new_tokens=12, max_message_chars=4000)
    services = build_services(settings, with_agent=False)
    try:
        user = services.store.create_user("carol", "carol-password-1")
        auth = {"Authorization": f"Bearer {services.store.create_api_key(user.id)}"}
        cases = CATALOGUE["pii"] + CATALOGUE["keep"]
        answer_of: dict[str, int] = {}
        with TestClient(create_app(services, with_ui=False)) as client:
            for case in cases:
                r = client.post("/v1/chat/completions", headers=auth, json={
                    "messages": [{"role": "system", "content": f"Customer note: {case['text']}"},
                                 {"role": "user", "content": f"Please help with this: {case['text']}"}],
                    "max_tokens": 12, "temperature": 1.0, "seed": 7})
                assert r.status_code == 200, r.text
                mid = answer_of[case["id"]] = r.json()["message_id"]
                r = client.post("/v1/feedback/edit", headers=auth, json={
                    "message_id": mid, "corrected": f"Here is what you sent, tidied up: {case['text']}"})
                assert r.status_code == 200, r.text
                r = client.post("/v1/feedback/thumb", headers=auth, json={"message_id": mid, "rating": 1})
                assert r.status_code == 200, r.text
        stored = json.dumps([m.content for c in services.store.list_conversations(user.id)
                             for m in services.store.messages(c.id)])
        assert CATALOGUE["pii"][0]["forbidden"][0] in stored  # the log keeps what the user said; training must not

        result = build_datasets(services.store, settings, BuildOptions(heldout_min_rows=10_000, replay_ratio=0.0))
    finally:
        services.close()
    snapshot = settings.datasets_dir / result.version
    counts = result.manifest["counts"]
    assert sum(counts["sft"].values()) > 0 and sum(counts["dpo"].values()) > 0, counts

    # The cases really flowed into the data (scrubbed), so "absent" below is not vacuous.
    rows = [json.loads(line) for f in (snapshot / "jsonl").glob("*.jsonl")
            for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    reached = {r.get("message_id") for r in rows}
    pii_reached = [c["id"] for c in CATALOGUE["pii"] if answer_of[c["id"]] in reached]
    assert len(pii_reached) >= 0.8 * len(CATALOGUE["pii"]), f"only {len(pii_reached)} PII cases reached a dataset"
    text = json.dumps(rows, ensure_ascii=False)
    kept = [k for c in CATALOGUE["keep"] if answer_of[c["id"]] in reached for k in c["keep"]]
    assert kept and all(k in text for k in kept), "ordinary numbers and words must survive scrubbing"

    forbidden = sorted({f for c in CATALOGUE["pii"] for f in c["forbidden"]})
    leaks = _files_containing(settings.datasets_dir, forbidden)
    assert not leaks, f"personal data in dataset files: {leaks}"

    # Train on the snapshot with the real training entry point (its own process), then search its output.
    cfg = tmp_path / "train.json"
    cfg.write_text(json.dumps({"base_model": str(tiny_model_dir), "stages": ["sft", "dpo"], "max_steps": 2,
                               "batch_size": 2, "evals_per_epoch": 0, "max_length": 256, "threads": 1,
                               "device": "cpu"}))
    out = tmp_path / "train-out"
    proc = subprocess.run([sys.executable, "-m", "training.train", "--config", str(cfg), "--data", str(snapshot),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapter = out / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert (adapter / "dataset_manifest.json").is_file()
    leaks = _files_containing(out, forbidden)
    assert not leaks, f"personal data in the adapter's training files: {leaks}"


# ------------------------------------------------------------------------------------------ the real server process
GUARD = '''
"""Loaded by every Python process of the server (PYTHONPATH): records and refuses any attempt to
reach a non-loopback address (connect, sendto, name lookups), so a test can assert there were none."""
import ipaddress, json, os, socket, threading, traceback

_LOG = os.environ["NET_GUARD_LOG"]
_lock = threading.Lock()
_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", ""}


def _is_local(host):
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode()
    host = str(host).strip("[]").split("%")[0]
    if host.lower() in _LOCAL_NAMES:
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_unspecified


def _record(kind, target):
    with _lock, open(_LOG, "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "kind": kind, "target": repr(target),
                            "stack": traceback.format_stack(limit=12)}) + "\\n")


def _inet(sock):
    return sock.family in (socket.AF_INET, socket.AF_INET6)


_connect, _connect_ex, _sendto = socket.socket.connect, socket.socket.connect_ex, socket.socket.sendto


def connect(self, address):
    if _inet(self) and not _is_local(address[0]):
        _record("connect", address)
        raise ConnectionRefusedError(f"outbound connection to {address!r} blocked by the test guard")
    return _connect(self, address)


def connect_ex(self, address):
    if _inet(self) and not _is_local(address[0]):
        _record("connect_ex", address)
        return 111
    return _connect_ex(self, address)


def sendto(self, data, *args):
    address = args[-1]
    if _inet(self) and not _is_local(address[0]):
        _record("sendto", address)
        raise ConnectionRefusedError(f"datagram to {address!r} blocked by the test guard")
    return _sendto(self, data, *args)


_getaddrinfo = socket.getaddrinfo


def getaddrinfo(host, *args, **kwargs):
    if not _is_local(host):
        _record("getaddrinfo", host)
        raise socket.gaierror(socket.EAI_NONAME, f"name lookup of {host!r} blocked by the test guard")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect, socket.socket.connect_ex, socket.socket.sendto = connect, connect_ex, sendto
socket.getaddrinfo = getaddrinfo
'''


def product_env(tmp: Path, guard_log: Path | None = None, **extra: str) -> dict[str, str]:
    """The caller's environment without the offline switches the test suite sets for itself, so the
    product has to set them on its own; plus the socket guard when a log is given."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "GRADIO_", "ASSISTANT_", "TRANSFORMERS_", "ANONYMIZED_", "DO_NOT_TRACK"))}
    if guard_log is not None:
        guard_dir = tmp / "guard"
        guard_dir.mkdir(exist_ok=True)
        (guard_dir / "sitecustomize.py").write_text(GUARD, encoding="utf-8")
        env["PYTHONPATH"] = os.pathsep.join([str(guard_dir), str(ROOT)])
        env["NET_GUARD_LOG"] = str(guard_log)
    env.update({"OMP_NUM_THREADS": "1", "ASSISTANT_TORCH_THREADS": "1", **extra})
    return env


@contextlib.contextmanager
def serve_process(home: Path, env: dict[str, str], *args: str, port: int | None = None):
    """`assistant serve` as its own process; yields (process, base URL) once /health answers."""
    port = port or free_port()
    log = (home.parent / f"serve-{port}.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "assistant.cli", "serve", "--home", str(home),
                             "--port", str(port), *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode}:\n"
                                     + Path(log.name).read_text(errors="replace")[-4000:])
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            if time.time() > deadline:
                raise AssertionError("server did not answer /health in 240 s:\n"
                                     + Path(log.name).read_text(errors="replace")[-4000:])
            time.sleep(0.5)
        yield proc, url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def listening(pid: int) -> set[str]:
    import psutil

    return {c.laddr.ip for c in psutil.Process(pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}


def make_user(home: Path, env: dict[str, str], name: str, password: str, admin: bool = False) -> str:
    """Create a user with the real CLI; returns the API key it prints."""
    cmd = [sys.executable, "-m", "assistant.cli", "user", "add", name, "--password", password, "--home", str(home)]
    out = subprocess.run(cmd + (["--admin"] if admin else []), cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return re.search(r"API key \(shown once\): (\S+)", out.stdout).group(1)


def gradio_event(client: httpx.Client, url: str, elem_id: str, data: list[Any], timeout: float = 300,
                 on_message: Callable[[dict], None] | None = None) -> dict:
    """Fire the click event of the page button `elem_id` the way the page does (queue/join + SSE);
    `on_message` sees every server message (progress updates...) before completion."""
    cfg = client.get(url + "/config").json()
    button = next(c["id"] for c in cfg["components"] if c.get("props", {}).get("elem_id") == elem_id)
    dep = next(i for i, d in enumerate(cfg["dependencies"])
               if [button, "click"] in [list(t) for t in d["targets"]])
    fn_index = cfg["dependencies"][dep].get("id", dep)
    session = f"probe{time.time_ns()}"
    r = client.post(url + "/gradio_api/queue/join", json={"data": data, "event_data": None, "fn_index": fn_index,
                                                          "trigger_id": button, "session_hash": session})
    assert r.status_code == 200, r.text
    with client.stream("GET", url + f"/gradio_api/queue/data?session_hash={session}", timeout=timeout) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                msg = json.loads(line[5:])
                if on_message is not None:
                    on_message(msg)
                if msg.get("msg") == "process_completed":
                    return msg
    raise AssertionError("the event never completed")


def gradio_upload(client: httpx.Client, url: str, name: str, content: bytes) -> dict:
    r = client.post(url + "/gradio_api/upload", files=[("files", (name, content, "text/markdown"))])
    assert r.status_code == 200, r.text
    path = r.json()[0]
    file_data = {"path": path, "orig_name": name, "size": len(content), "mime_type": "text/markdown",
                 "meta": {"_type": "gradio.FileData"}}
    return gradio_event(client, url, "doc-upload", [[file_data], "private"])


@pytest.mark.slow
def test_server_binds_loopback_and_reaches_nothing_outside(tmp_path, tiny_model_dir):
    """`assistant serve` with defaults (real embedded embedder, the knowledge base and memory attached)
    under a guard that records every attempt to reach a non-loopback address: start, log in, chat
    (plain and streaming, about an uploaded document), rate, upload through the page. Zero attempts."""
    guard_log = tmp_path / "net.jsonl"
    env = product_env(tmp_path, guard_log)
    # The guard itself works: a deliberate request from a guarded process is recorded and refused.
    probe = subprocess.run([sys.executable, "-c", "import urllib.request as u; u.urlopen('http://example.com', "
                                                  "timeout=5)"], env=env, capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "blocked by the test guard" in probe.stderr
    assert "example.com" in guard_log.read_text()
    guard_log.unlink()

    home = tmp_path / "home"
    key = make_user(home, env, "dora", "dora-password-1")
    with serve_process(home, env, "--model", str(tiny_model_dir)) as (proc, url):
        assert listening(proc.pid) == {"127.0.0.1"}, "the server must bind 127.0.0.1 unless told otherwise"
        auth = {"Authorization": f"Bearer {key}"}
        with httpx.Client(timeout=300) as client:
            assert client.get(url + "/").status_code == 200  # the login page with its assets
            r = client.post(url + "/login", data={"username": "dora", "password": "dora-password-1"})
            assert r.status_code < 400, r.text
            doc = (ROOT / "tests" / "data" / "docs" / "pricing.md").read_bytes()
            done = gradio_upload(client, url, "pricing.md", doc)
            assert done.get("success") is True, done
            assert "pricing" in json.dumps(done["output"]).lower()
            body = {"messages": [{"role": "user", "content": "How much does the team plan cost?"}],
                    "max_tokens": 8}
            r = client.post(url + "/v1/chat/completions", headers=auth, json=body)
            assert r.status_code == 200, r.text
            answer = r.json()
            assert answer["sources"], "the answer should have used the uploaded document"
            r = client.post(url + "/v1/feedback/thumb", headers=auth,
                            json={"message_id": answer["message_id"], "rating": 1})
            assert r.status_code == 200
            with client.stream("POST", url + "/v1/chat/completions", headers=auth, json={**body, "stream": True}) as s:
                assert s.status_code == 200
                assert any("[DONE]" in line for line in s.iter_lines())
    attempts = guard_log.read_text().splitlines() if guard_log.exists() else []
    assert not attempts, "outbound attempts:\n" + "\n".join(
        f"{json.loads(a)['kind']} {json.loads(a)['target']}\n{''.join(json.loads(a)['stack'][-6:])}"
        for a in attempts[:5])


def test_server_binds_where_told(tmp_path, tiny_model_dir, tiny_embedder_dir):
    env = product_env(tmp_path, None, ASSISTANT_EMBEDDER=str(tiny_embedder_dir))
    with serve_process(tmp_path / "home", env, "--model", str(tiny_model_dir), "--host", "0.0.0.0") as (proc, _):
        assert listening(proc.pid) == {"0.0.0.0"}


def test_load_lora_adapter_reads_only_the_adapters_folder(world: World):
    """An admin key is not a shell: a folder outside `<home>/adapters` is refused before it is opened."""
    adapters = world.services.settings.adapters_dir
    for path in ("/etc", str(ROOT), str(adapters / ".." / "chroma"), str(world.services.settings.home)):
        r = world.client.post("/v1/load_lora_adapter", headers=world.headers("admin"),
                              json={"lora_name": f"outside{time.time_ns()}", "lora_path": path})
        assert r.status_code == 403, (path, r.status_code, r.text)
        assert "adapters folder" in r.text
    assert not any(n.startswith("outside") for n in world.services.backend.adapters())
