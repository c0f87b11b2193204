"""First run: create the first admin in the browser, instead of on the command line.

In: the FastAPI app (before the page is mounted) and the server's services. Out: `/setup` (a plain
HTML form, GET and POST) while the user store is empty, a redirect from the page and the login form to
it, and a one-time setup link printed at start-up.

Who may create the first admin: a browser on this machine when the server listens on loopback only
(the default, so nobody else can reach the form), or anyone holding the setup link printed at
start-up (its token is random and lives only in this process). Each form carries a one-time nonce,
so another web site cannot post it from a visitor's browser. Once any user exists the form answers
404 and the link is dead; later accounts are created by an admin in the page or with
`assistant user add`.
"""

from __future__ import annotations

import hmac
import html
import ipaddress
import secrets
import sys
import threading
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

PRODUCT = "Self-improving assistant"
MIN_PASSWORD = 8
NONCE_TTL_S = 3600.0
PAGE_PATHS = ("/", "/login", "/login/")


def _loopback(host: str | None) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


class FirstRun:
    """Whether the first admin is still to be made, and who may make it."""

    def __init__(self, store: Any, settings: Any) -> None:
        self.store = store
        self.settings = settings
        self.token = secrets.token_urlsafe(24)
        self._done = False
        self._nonces: dict[str, float] = {}
        self._lock = threading.Lock()

    def needed(self) -> bool:
        """True while the store has no user (a user, once there, is not looked for again)."""
        if not self._done and self.store.list_users():
            self._done = True
        return not self._done

    def link(self) -> str:
        host = self.settings.host if self.settings.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        return f"http://{host}:{self.settings.port}/setup?token={self.token}"

    def allowed(self, client: str | None, token: str | None) -> bool:
        """A loopback browser of a loopback-only server, or the holder of the setup link's token."""
        if _loopback(self.settings.host) and _loopback(client):
            return True
        return bool(token) and hmac.compare_digest(str(token), self.token)

    def nonce(self) -> str:
        n = secrets.token_urlsafe(16)
        now = time.monotonic()
        with self._lock:
            self._nonces = {k: t for k, t in self._nonces.items() if t > now}
            self._nonces[n] = now + NONCE_TTL_S
        return n

    def create_admin(self, nonce: str, username: str, password: str, again: str) -> Any:
        """The first admin; ValueError with a sentence for the form when something is wrong."""
        with self._lock:
            if self._nonces.pop(nonce or "", 0.0) < time.monotonic():
                raise ValueError("This form has expired. Load the page again.")
            if not self.needed():
                raise PermissionError("an account exists already")
            if len(password or "") < MIN_PASSWORD:
                raise ValueError(f"The password needs at least {MIN_PASSWORD} characters.")
            if password != again:
                raise ValueError("The two passwords are not the same.")
            try:
                user = self.store.create_user((username or "").strip(), password, role="admin")
            except ValueError as e:
                raise ValueError(f"That name can't be used: {e}.") from e
            self._done = True
            return user


class SetupRedirect:
    """ASGI middleware: while nobody has an account, the page and the login form send to /setup."""

    def __init__(self, app: ASGIApp, first_run: FirstRun) -> None:
        self.app = app
        self.first_run = first_run

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and scope.get("method") == "GET" and scope.get("path") in PAGE_PATHS
                and self.first_run.needed()):
            await RedirectResponse("/setup", status_code=303)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _page(body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(status_code=status, content=f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Set up · {PRODUCT}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 28rem; margin: 3rem auto; padding: 0 1rem; color: #1f2937; }}
h1 {{ font-size: 1.4rem; }} label {{ display: block; margin-top: 1rem; font-weight: 600; }}
input {{ width: 100%; padding: .5rem; font-size: 1rem; box-sizing: border-box; margin-top: .25rem; }}
button {{ margin-top: 1.5rem; padding: .6rem 1.2rem; font-size: 1rem; background: #ea580c; color: white;
          border: 0; border-radius: 6px; }}
.error {{ color: #b91c1c; margin-top: 1rem; }} .note {{ color: #4b5563; font-size: .9rem; }}
</style></head><body>{body}</body></html>""")


def _form(fr: FirstRun, token: str, error: str = "", username: str = "") -> HTMLResponse:
    err = f'<p class="error" id="setup-error">{html.escape(error)}</p>' if error else ""
    return _page(f"""<h1>{PRODUCT}</h1>
<p>Nobody has an account yet. Create the first administrator: it can then add other people in the page.</p>
{err}
<form method="post" action="/setup" id="setup-form">
<input type="hidden" name="nonce" value="{fr.nonce()}"><input type="hidden" name="token" value="{html.escape(token)}">
<label for="username">Your user name</label>
<input id="username" name="username" autocomplete="username" required value="{html.escape(username)}">
<label for="password">Password (at least {MIN_PASSWORD} characters)</label>
<input id="password" name="password" type="password" autocomplete="new-password" required>
<label for="again">The same password again</label>
<input id="again" name="again" type="password" autocomplete="new-password" required>
<button type="submit" id="setup-submit">Create the administrator</button>
</form>
<p class="note">This page disappears once the first account exists.</p>""")


def mount_first_run(app: FastAPI, services: Any) -> FirstRun:
    """Register `/setup` on `app` (call before the page is mounted, so the page's guard lets it through)."""
    fr = FirstRun(services.store, services.settings)

    @app.get("/setup", include_in_schema=False)
    def setup_form(request: Request, token: str = "") -> Response:
        if not fr.needed():
            return _page("<h1>Not found</h1>", 404)
        if not fr.allowed(request.client.host if request.client else None, token):
            return _page("<h1>Setup link needed</h1><p>Open the setup link the server printed when it "
                         "started, or open this page on the server's own machine.</p>", 403)
        return _form(fr, token)

    @app.post("/setup", include_in_schema=False)
    async def setup_submit(request: Request) -> Response:
        form = await request.form()
        token = str(form.get("token") or "")
        if not fr.needed():
            return _page("<h1>Not found</h1>", 404)
        if not fr.allowed(request.client.host if request.client else None, token):
            return _page("<h1>Setup link needed</h1>", 403)
        username = str(form.get("username") or "")
        try:
            user = fr.create_admin(str(form.get("nonce") or ""), username, str(form.get("password") or ""),
                                   str(form.get("again") or ""))
        except PermissionError:
            return _page("<h1>Not found</h1>", 404)
        except ValueError as e:
            return _form(fr, token, str(e), username)
        return _page(f"""<h1>{PRODUCT}</h1><p id="setup-done">The administrator <b>{html.escape(user.username)}</b>
exists. Log in with that name and password.</p><p><a href="/" id="setup-login">Log in</a></p>""")

    if fr.needed():
        print(f"No account exists yet. Create the first administrator in the browser: {fr.link()}",
              file=sys.stderr, flush=True)
    return fr
