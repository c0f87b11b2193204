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
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from starlette.routing import Match, Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from memory.store import Store

# Paths the login page needs before anyone is logged in. "/" serves the login form to strangers
# (Gradio renders the app there only for a valid session); the rest are static bundles or the
# login/logout endpoints themselves.
PUBLIC_EXACT = frozenset({"/", "/login", "/login/", "/logout", "/favicon.ico", "/manifest.json", "/robots.txt",
                          "/theme.css", "/gradio_api/theme.css"})
PUBLIC_PREFIXES = ("/assets/", "/static/", "/svelte/", "/gradio_api/assets/", "/gradio_api/static/")


class LoginThrottle:
    """After `limit` failures for one username within `window_s`, refuse that name for `window_s`.

    In memory on purpose: it only has to slow down guessing against one server process.
    """

    def __init__(self, limit: int = 5, window_s: float = 300.0, clock: Callable[[], float] = time.monotonic):
        self.limit, self.window_s, self.clock = limit, window_s, clock
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def blocked(self, username: str) -> bool:
        now = self.clock()
        with self._lock:
            recent = [t for t in self._failures.get(username, []) if now - t < self.window_s]
            self._failures[username] = recent
            return len(recent) >= self.limit

    def failed(self, username: str) -> None:
        with self._lock:
            self._failures.setdefault(username, []).append(self.clock())

    def succeeded(self, username: str) -> None:
        with self._lock:
            self._failures.pop(username, None)


def make_login(store: Store, throttle: LoginThrottle | None = None) -> Callable[[str, str], Awaitable[bool]]:
    """Gradio `auth=` callable. Async so the argon2 check runs in a worker thread, not the event loop."""
    throttle = throttle or LoginThrottle()

    async def login(username: str, password: str) -> bool:
        name = (username or "").strip()
        if not name or throttle.blocked(name):
            return False
        user = await anyio.to_thread.run_sync(store.authenticate, name, password)
        if user is None:
            throttle.failed(name)
            return False
        throttle.succeeded(name)
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


class UiGuard:
    """ASGI middleware: UI paths need a login session; the host app's own routes pass untouched."""

    def __init__(self, app: ASGIApp, host_app: Any, host_routes: list[Any]) -> None:
        self.app = app
        self.host_app = host_app  # the FastAPI app, to find the mounted Gradio app lazily
        self.host_routes = host_routes  # routes registered before the UI was mounted (the API)

    def _is_host_route(self, scope: Scope) -> bool:
        return any(r.matches(scope)[0] != Match.NONE for r in self.host_routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if (path in PUBLIC_EXACT or path.startswith(PUBLIC_PREFIXES) or self._is_host_route(scope)
                or session_user(gradio_sub_app(self.host_app), _cookies(scope)) is not None):
            await self.app(scope, receive, send)
            return
        await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        from starlette.responses import JSONResponse, RedirectResponse

        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        accept = dict(scope.get("headers", [])).get(b"accept", b"").decode("latin-1")
        if scope.get("method") == "GET" and "text/html" in accept:
            response: Any = RedirectResponse("/", status_code=302)  # a page load: show the login form
        else:
            response = JSONResponse({"error": {"message": "login required", "code": "not_authenticated"}},
                                    status_code=401)
        await response(scope, receive, send)
