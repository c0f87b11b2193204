"""Accounts in the page: admins add people; everyone changes their own password.

In: the server's services and the logged-in user. Out: `build_people_section` (inside the admin
console: the list of accounts and a form to add one, whose API key is shown once) and
`build_account_tab` (a tab where a user changes their password). The rules are the action layer's
(`assistant.actions.users.UserAdmin`, the same the API and the CLI use); the functions here only add
what a form needs: a password typed twice, and sentences instead of exceptions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gradio as gr
import pandas as pd

from assistant.actions.users import UserAdmin
from memory.types import User
from ui.errors import page_user
from ui.handlers import UiError
from ui.i18n import T, page_language, tr
from ui.render import safe_markdown
from ui.sentences import say

PRIVATE = {"api_visibility": "private"}
MIN_PASSWORD = 8
PEOPLE_COLUMNS = ["name", "role", "status", "since"]
PEOPLE_HEADINGS = ["pc_name", "pc_role", "pc_state", "pc_created"]  # the same in the page's language (i18n keys)


def _accounts(services: Any) -> UserAdmin:
    return UserAdmin(services.settings, services.store, getattr(services, "knowledge", None))


def _password(new: str, again: str) -> str:
    if len(new or "") < MIN_PASSWORD:
        raise UiError(f"the new password needs at least {MIN_PASSWORD} characters")
    if new != again:
        raise UiError("the two new passwords are not the same")
    return new


def change_own_password(services: Any, user: User, old: str, new: str, again: str) -> Any:
    """Check the current password, then replace it. Sessions stay logged in; the next login needs the new one."""
    if services.store.authenticate(user.username, old or "") is None:
        raise UiError("the current password is not right")
    services.store.set_password(user.id, _password(new, again))
    return T("pw_changed")


def add_person(services: Any, admin: User, username: str, password: str, again: str, is_admin: bool) -> str:
    """A new account (admins only); the answer shows its API key, which is never shown again."""
    if not admin.is_admin:
        raise UiError("this needs an admin account")
    try:
        made = _accounts(services).create_user(admin, (username or "").strip(), _password(password, again),
                                               admin=bool(is_admin))
    except (ValueError, LookupError) as e:
        raise UiError(str(e)) from e
    role = tr("role_an_admin" if is_admin else "role_a_user")
    return tr("p_added", name=safe_markdown(made["user"]["username"]), role=role, key=made["api_key"])


def people_frame(services: Any, admin: User) -> pd.DataFrame:
    if not admin.is_admin:
        raise UiError("this needs an admin account")
    rows = [[u.username, tr("role_admin" if u.role == "admin" else "role_user"),
             tr("p_disabled" if u.disabled else "p_active"), u.created_at.strftime("%Y-%m-%d")]
            for u in services.store.list_users()]
    return pd.DataFrame(rows, columns=[tr(k) for k in PEOPLE_HEADINGS])


# The account form's refusals, in the browser's language; any other refusal is shown as it is.
_REFUSALS = {f"the new password needs at least {MIN_PASSWORD} characters": "pw_short",
             "the two new passwords are not the same": "pw_differ",
             "the current password is not right": "pw_wrong"}


def _sentence(message: str, lang: str) -> Any:
    key = _REFUSALS.get(message)
    if key:
        return T(key)
    message = say(message, lang)
    return safe_markdown(message[:1].upper() + message[1:] + ("" if message.endswith(".") else "."))


def build_people_section(services: Any, guard: Callable[[Callable[..., Any]], Callable[..., Any]]) -> gr.Dataframe:
    """Inside the admin console; returns the table so the console's refresh can fill it. `guard` is the
    console's: it resolves the admin (refusing anyone else first) and turns errors into a toast."""
    gr.Markdown(T("people_heading"))
    table = gr.Dataframe(headers=PEOPLE_COLUMNS, interactive=False, elem_id="people-table")
    with gr.Row():
        name = gr.Textbox(label=T("person_name"), elem_id="person-name")
        pw = gr.Textbox(label=T("person_password"), type="password",
                        elem_id="person-password")
        again = gr.Textbox(label=T("person_again"), type="password", elem_id="person-again")
        make_admin = gr.Checkbox(False, label=T("person_admin"), elem_id="person-admin")
        add_btn = gr.Button(T("person_add"), elem_id="person-add")
    note = gr.Markdown(elem_id="person-note")

    def add(admin: User, username: str, password: str, password2: str, is_admin: bool) -> tuple:
        try:
            msg = add_person(services, admin, username, password, password2, is_admin)
        except UiError as e:
            raise ValueError(e.message) from e
        return people_frame(services, admin), "", "", "", False, msg

    add_btn.click(guard(add), [name, pw, again, make_admin], [table, name, pw, again, make_admin, note], **PRIVATE)
    return table


def build_account_tab(services: Any) -> None:
    """A tab where the logged-in user changes their own password."""
    with gr.Tab(T("tab_account"), id="account"):
        gr.Markdown(T("pw_intro"))
        old = gr.Textbox(label=T("pw_current"), type="password", elem_id="pw-old")
        new = gr.Textbox(label=T("pw_new"), type="password",
                         elem_id="pw-new")
        again = gr.Textbox(label=T("pw_again"), type="password", elem_id="pw-again")
        change = gr.Button(T("pw_change"), elem_id="pw-change")
        note = gr.Markdown(elem_id="pw-note")

    def on_change(current, password, password2, request: gr.Request):
        user = page_user(services, request)
        try:
            return "", "", "", change_own_password(services, user, current, password, password2)
        except UiError as e:
            return gr.skip(), gr.skip(), gr.skip(), _sentence(e.message, page_language(request))

    change.click(on_change, [old, new, again], [old, new, again, note], **PRIVATE)
