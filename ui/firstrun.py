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

The form speaks the browser's language like the page (`ui.i18n.page_language`: the header switch's
cookie, else the browser's first language), its texts in `ui/i18n.py`.
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

from ui.i18n import page_language, tr
from ui.sentences import say

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


class SetupRefused(ValueError):
    """A sentence for the form: a ui/i18n.py key and its values (English as the exception's text)."""

    def __init__(self, key: str, **values: Any) -> None:
        super().__init__(tr(key, "en", **values))
        self.key, self.values = key, values

    def say(self, lang: str) -> str:
        return tr(self.key, lang, **self.values)


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
        """The first admin; SetupRefused (a ValueError) with a sentence for the form when something is wrong."""
        with self._lock:
            if self._nonces.pop(nonce or "", 0.0) < time.monotonic():
                raise SetupRefused("fr_expired")
            if not self.needed():
                raise PermissionError("an account exists already")
            if len(password or "") < MIN_PASSWORD:
                raise SetupRefused("fr_short", n=MIN_PASSWORD)
            if password != again:
                raise SetupRefused("fr_differ")
            try:
                user = self.store.create_user((username or "").strip(), password, role="admin")
            except ValueError as e:
                raise SetupRefused("fr_bad_name", why=str(e).rstrip(".")) from e
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


def _page(body: str, lang: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(status_code=status, content=f"""<!doctype html>
<html lang="{lang}"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{tr("fr_title", lang)} · {PRODUCT}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 28rem; margin: 3rem auto; padding: 0 1rem; color: #1f2937; }}
h1 {{ font-size: 1.4rem; }} label {{ display: block; margin-top: 1rem; font-weight: 600; }}
input {{ width: 100%; padding: .5rem; font-size: 1rem; box-sizing: border-box; margin-top: .25rem; }}
button {{ margin-top: 1.5rem; padding: .6rem 1.2rem; font-size: 1rem; background: #ea580c; color: white;
          border: 0; border-radius: 6px; }}
.error {{ color: #b91c1c; margin-top: 1rem; }} .note {{ color: #4b5563; font-size: .9rem; }}
</style></head><body>{body}</body></html>""")


def _form(fr: FirstRun, token: str, lang: str, error: str = "", username: str = "") -> HTMLResponse:
    err = f'<p class="error" id="setup-error">{html.escape(error)}</p>' if error else ""
    return _page(f"""<h1>{PRODUCT}</h1>
<p>{tr("fr_intro", lang)}</p>
{err}
<form method="post" action="/setup" id="setup-form">
<input type="hidden" name="nonce" value="{fr.nonce()}"><input type="hidden" name="token" value="{html.escape(token)}">
<label for="username">{tr("fr_username", lang)}</label>
<input id="username" name="username" autocomplete="username" required value="{html.escape(username)}">
<label for="password">{tr("fr_password", lang, n=MIN_PASSWORD)}</label>
<input id="password" name="password" type="password" autocomplete="new-password" required>
<label for="again">{tr("fr_again", lang)}</label>
<input id="again" name="again" type="password" autocomplete="new-password" required>
<button type="submit" id="setup-submit">{tr("fr_submit", lang)}</button>
</form>
<p class="note">{tr("fr_note", lang)}</p>""", lang)


def mount_first_run(app: FastAPI, services: Any) -> FirstRun:
    """Register `/setup` on `app` (call before the page is mounted, so the page's guard lets it through)."""
    fr = FirstRun(services.store, services.settings)

    @app.get("/setup", include_in_schema=False)
    def setup_form(request: Request, token: str = "") -> Response:
        lang = page_language(request)
        if not fr.needed():
            return _page(f"<h1>{tr('fr_not_found', lang)}</h1>", lang, 404)
        if not fr.allowed(request.client.host if request.client else None, token):
            return _page(f"<h1>{tr('fr_link_needed', lang)}</h1><p>{tr('fr_link_help', lang)}</p>", lang, 403)
        return _form(fr, token, lang)

    @app.post("/setup", include_in_schema=False)
    async def setup_submit(request: Request) -> Response:
        form = await request.form()
        lang = page_language(request)
        token = str(form.get("token") or "")
        if not fr.needed():
            return _page(f"<h1>{tr('fr_not_found', lang)}</h1>", lang, 404)
        if not fr.allowed(request.client.host if request.client else None, token):
            return _page(f"<h1>{tr('fr_link_needed', lang)}</h1>", lang, 403)
        username = str(form.get("username") or "")
        try:
            user = fr.create_admin(str(form.get("nonce") or ""), username, str(form.get("password") or ""),
                                   str(form.get("again") or ""))
        except PermissionError:
            return _page(f"<h1>{tr('fr_not_found', lang)}</h1>", lang, 404)
        except SetupRefused as e:
            if e.key == "fr_bad_name":  # the store's reason, in the page's language where it is a known one
                return _form(fr, token, lang, tr("fr_bad_name", lang, why=say(e.values["why"], lang).rstrip(".")),
                             username)
            return _form(fr, token, lang, e.say(lang), username)
        done = tr("fr_done", lang, name=html.escape(user.username))
        return _page(f"""<h1>{PRODUCT}</h1><p id="setup-done">{done}</p>
<p><a href="/" id="setup-login">{tr("fr_log_in", lang)}</a></p>""", lang)

    if fr.needed():
        print(f"No account exists yet. Create the first administrator in the browser: {fr.link()}",
              file=sys.stderr, flush=True)
    return fr
