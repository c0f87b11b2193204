"""Login for the page: Gradio's login form checked against the user store, and a guard in front
of every UI path.

In: the `Store` (users with argon2 password hashes). Out: `make_login(store)`, the async callable
Gradio's `auth=` takes (username, password -> bool), with a per-name throttle against password
guessing; `UiGuard`, an ASGI middleware answering 401 (or redirecting a page load to the login
page) for any UI request without a valid login session.

Why a guard on top of Gradio's own check: Gradio protects its config, API and file routes, but a
handful of its routes answer anyone (heartbeat, cancel, reset, startup-events, monitoring, the
run-history and vibe-editing endpoints). The guard lets through only what the login page itself
needs (the page shell, its static assets, /login, /logout) and the routes the host app registered
itself (the HTTP API, which has its own API-key auth).

For a logged-in user it also enforces what Gradio leaves to a launched app or does not do at all:
- routes the page never calls are closed (404): the dev reload, monitoring (every user's event
  statistics), the URL proxy, and the run/api/call entry points (events are private to the page);
- a file is served only to the login that uploaded it, and never fetched from a URL;
- an event may name only files that this login uploaded (`ui.uploads.PageUploads`), so no client
  value reaches the file system;
- a page session (Gradio's `session_hash`) belongs to the login that first used it: another login
  cannot join, read or cancel its events;
- the login throttle counts failures per client address and name, so a stranger cannot lock a user out.
"""

from __future__ import annotations

import contextvars
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, unquote

import anyio
from starlette.requests import Request
from starlette.routing import Match, Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from memory.store import Store
from ui.i18n import page_language, speaking
from ui.uploads import PageUploads, file_payloads

# Paths the login page needs before anyone is logged in. "/" serves the login form to strangers
# (Gradio renders the app there only for a valid session); the rest are static bundles or the
# login/logout endpoints themselves.
PUBLIC_EXACT = frozenset({"/", "/login", "/login/", "/logout", "/favicon.ico", "/manifest.json", "/robots.txt",
                          "/theme.css", "/gradio_api/theme.css"})
PUBLIC_PREFIXES = ("/assets/", "/static/", "/svelte/", "/gradio_api/assets/", "/gradio_api/static/")

# Gradio routes the page never calls. Some reach the network (proxy=), some show every user's data
# (monitoring) or restart code (dev/reload), and the run/api/call entry points answered 500 to
# logged-in users: closed for everyone.
CLOSED = re.compile(r"^(/gradio_api)?/(dev/|monitoring|proxy=|run/|api/|call/|mcp|vibe-|undo-vibe|run-history|"
                    r"runs/?$|process_recording|stream/|custom_component/)")
FILE_ROUTE = re.compile(r"^(/gradio_api)?/file[=/](?P<path>.*)$")
UPLOAD_ROUTE = re.compile(r"^(/gradio_api)?/upload/?$")
HEARTBEAT = re.compile(r"^(/gradio_api)?/heartbeat/(?P<hash>[^/]+)$")
BODY_ROUTES = re.compile(r"^(/gradio_api)?/(queue/join|cancel|reset)/?$")  # JSON bodies naming a session
MAX_EVENT_BODY = 4 * 1024 * 1024
MAX_SESSIONS = 50_000

# The client address of the login request being checked (set by the guard, read by `make_login`).
CLIENT: contextvars.ContextVar[str] = contextvars.ContextVar("login_client", default="")


class LoginThrottle:
    """After `limit` failures for one (client address, username) within `window_s`, refuse that pair
    for `window_s`. Keyed by client too, so guessing from one address does not lock the user out
    everywhere; a much larger budget per name alone still stops a guess spread over many addresses.

    In memory on purpose: it only has to slow down guessing against one server process.
    """

    def __init__(self, limit: int = 5, window_s: float = 300.0, clock: Callable[[], float] = time.monotonic):
        self.limit, self.window_s, self.clock = limit, window_s, clock
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    SPREAD_FACTOR = 20  # failures for one name from all addresses together before that name is refused

    def blocked(self, key: str, spread: bool = False) -> bool:
        now = self.clock()
        with self._lock:
            recent = [t for t in self._failures.get(key, []) if now - t < self.window_s]
            self._failures[key] = recent
            return len(recent) >= self.limit * (self.SPREAD_FACTOR if spread else 1)

    def failed(self, key: str) -> None:
        with self._lock:
            self._failures.setdefault(key, []).append(self.clock())

    def succeeded(self, key: str) -> None:
        with self._lock:
            self._failures.pop(key, None)


def make_login(store: Store, throttle: LoginThrottle | None = None) -> Callable[[str, str], Awaitable[bool]]:
    """Gradio `auth=` callable. Async so the argon2 check runs in a worker thread, not the event loop."""
    throttle = throttle or LoginThrottle()

    async def login(username: str, password: str) -> bool:
        name = (username or "").strip()
        key = f"{CLIENT.get()}|{name}"
        if not name or throttle.blocked(key) or throttle.blocked(name, spread=True):
            return False
        user = await anyio.to_thread.run_sync(store.authenticate, name, password)
        if user is None:
            throttle.failed(key)
            throttle.failed(name)
            return False
        throttle.succeeded(key)
        return True

    return login


def gradio_sub_app(app: Any) -> Any:
    """The Gradio app `gr.mount_gradio_app` mounted on `app` (it holds the login sessions)."""
    for route in reversed(app.router.routes):
        if isinstance(route, Mount) and hasattr(route.app, "tokens") and hasattr(route.app, "cookie_id"):
            return route.app
    raise RuntimeError("no Gradio app is mounted on this FastAPI app")


def session_user(gradio_app: Any, cookies: dict[str, str]) -> str | None:
    """The username of a valid Gradio login session in these cookies, else None."""
    cid = gradio_app.cookie_id
    token = cookies.get(f"access-token-{cid}") or cookies.get(f"access-token-unsecure-{cid}")
    return gradio_app.tokens.get(token) if token else None


def _cookies(scope: Scope) -> dict[str, str]:
    from starlette.requests import cookie_parser

    for name, value in scope.get("headers", []):
        if name == b"cookie":
            return cookie_parser(value.decode("latin-1"))
    return {}


def _json_error(status: int, message: str, code: str) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "code": code}}, status_code=status)


class UiGuard:
    """ASGI middleware: UI paths need a login session; the host app's own routes pass untouched.
    For a logged-in user, the rules in this module's docstring."""

    def __init__(self, app: ASGIApp, host_app: Any, host_routes: list[Any],
                 uploads: PageUploads | None = None) -> None:
        self.app = app
        self.host_app = host_app  # the FastAPI app, to find the mounted Gradio app lazily
        self.host_routes = host_routes  # routes registered before the UI was mounted (the API)
        self.uploads = uploads
        self._sessions: OrderedDict[str, str] = OrderedDict()  # session_hash -> username
        self._lock = threading.Lock()

    def _is_host_route(self, scope: Scope) -> bool:
        return any(r.matches(scope)[0] != Match.NONE for r in self.host_routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if self._is_host_route(scope):
            await self.app(scope, receive, send)
            return
        if path in PUBLIC_EXACT or path.startswith(PUBLIC_PREFIXES):
            token = CLIENT.set((scope.get("client") or ("",))[0]) if path.rstrip("/").endswith("/login") else None
            try:
                # the login form's note is in the browser's language (ui.app.Page.auth_message)
                with speaking(page_language(Request(scope))):
                    await self.app(scope, receive, send)
            finally:
                if token is not None:
                    CLIENT.reset(token)
            return
        user = session_user(gradio_sub_app(self.host_app), _cookies(scope))
        if user is None:
            await self._refuse(scope, receive, send)
            return
        await self._logged_in(user, path, scope, receive, send)

    async def _logged_in(self, user: str, path: str, scope: Scope, receive: Receive, send: Send) -> None:
        if CLOSED.match(path):
            await _json_error(404, "not found", "not_found")(scope, receive, send)
            return
        if (m := FILE_ROUTE.match(path)) and not self._may_read(user, unquote(m.group("path"))):
            await _json_error(404, "not found", "not_found")(scope, receive, send)
            return
        if (m := HEARTBEAT.match(path)) and not self._bind(m.group("hash"), user):
            await _json_error(403, "this page session belongs to another login", "forbidden")(scope, receive, send)
            return
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if any(not self._bind(h, user) for h in query.get("session_hash", [])):
            await _json_error(403, "this page session belongs to another login", "forbidden")(scope, receive, send)
            return
        if scope["type"] == "http" and scope.get("method") == "POST" and BODY_ROUTES.match(path):
            await self._event(user, scope, receive, send)
            return
        if scope["type"] == "http" and UPLOAD_ROUTE.match(path) and self.uploads is not None:
            await self.app(scope, receive, self._recording_upload(user, send))
            return
        await self.app(scope, receive, send)

    def _may_read(self, user: str, target: str) -> bool:
        """Only files this login uploaded, or that the page made in its own folder; never a URL."""
        if self.uploads is None or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):
            return False
        if not self.uploads.inside(target):
            from gradio.data_classes import _StaticFiles  # files the page itself declares static

            return any(target == p or target.startswith(str(p).rstrip("/") + "/") for p in _StaticFiles.all_paths)
        owners = self.uploads.owners(target)
        return not owners or user in owners  # unowned: an output Gradio wrote (content-addressed)

    def _bind(self, session_hash: str, user: str) -> bool:
        """Tie a page session to the first login that used it; False if another login owns it."""
        with self._lock:
            owner = self._sessions.get(session_hash)
            if owner is None:
                self._sessions[session_hash] = user
                if len(self._sessions) > MAX_SESSIONS:
                    self._sessions.popitem(last=False)
                return True
            self._sessions.move_to_end(session_hash)
            return owner == user

    async def _event(self, user: str, scope: Scope, receive: Receive, send: Send) -> None:
        """An event body: its session must be this login's, and every file it names this login's upload."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > MAX_EVENT_BODY:
                await _json_error(413, "event too large", "too_large")(scope, receive, send)
                return
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        try:
            payload = json.loads(body) if body else {}
        except (ValueError, UnicodeDecodeError):
            payload = None
        if not isinstance(payload, dict):
            await _json_error(400, "the event body must be a JSON object", "bad_request")(scope, receive, send)
            return
        session_hash = payload.get("session_hash")
        if session_hash is not None and not (isinstance(session_hash, str) and self._bind(session_hash, user)):
            await _json_error(403, "this page session belongs to another login", "forbidden")(scope, receive, send)
            return
        for f in file_payloads(payload.get("data")):
            if not (isinstance(f.get("path"), str) and self.uploads is not None
                    and self.uploads.owns(user, f["path"])):
                await _json_error(400, "that file was not uploaded here in this session; upload it again",
                                  "bad_file")(scope, receive, send)
                return
        sent = False

        async def replay() -> Any:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _recording_upload(self, user: str, send: Send) -> Send:
        """Wrap `send` to note which paths the upload route wrote for this login."""
        status = 0
        chunks: list[bytes] = []
        uploads = self.uploads
        assert uploads is not None

        async def recording(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and status == 200:
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    try:
                        paths = json.loads(b"".join(chunks))
                    except ValueError:
                        paths = []
                    if isinstance(paths, list):
                        uploads.received(user, [p for p in paths if isinstance(p, str)])
            await send(message)

        return recording

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        from starlette.responses import RedirectResponse

        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        accept = dict(scope.get("headers", [])).get(b"accept", b"").decode("latin-1")
        if scope.get("method") == "GET" and "text/html" in accept:
            response: Any = RedirectResponse("/", status_code=302)  # a page load: show the login form
        else:
            response = _json_error(401, "login required", "not_authenticated")
        await response(scope, receive, send)
