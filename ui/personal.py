"""Personal adapters in the page: a user's own (a tab) and every user's, with disk use (a section of the console).

In: the server's services and the logged-in user. Out: `build_personal_tab` (opt in or out, the state and
version of your own adapter, its evaluation report, and "Forget what you learned from me") and
`build_personal_section` (inside the admin console: one line per user with their serving version, versions
kept and disk use). The rules are the action layer's (`assistant.actions.personal.PersonalActions`, the same
the API and the CLI use); the functions here turn its answers into Markdown and tables.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gradio as gr
import pandas as pd

from assistant.actions.base import Conflict, NotFound
from assistant.actions.personal import PersonalActions
from memory.types import User
from ui import sentences
from ui.errors import page_user
from ui.i18n import T, page_language, speaking, tr
from ui.render import safe_markdown
from ui.sentences import gate_reason, say

PRIVATE = {"api_visibility": "private"}
ADMIN_COLUMNS = ["name", "opted in", "serving", "versions", "newest", "gate", "disk"]
ADMIN_HEADINGS = ["pa_name", "pa_opted", "pa_serving", "pa_versions", "pa_newest", "pa_gate", "pa_disk"]  # i18n keys
STATE_WORDS = {  # the action layer's state -> its sentence (a ui/i18n.py key)
    "off": "my_off",
    "not opted in": "my_not_opted",
    "training": "my_training",
    "serving": "my_serving",
    "not served: did not beat the shared adapter": "my_not_served",
    "waiting for feedback": "my_waiting_feedback",
    "waiting for its turn": "my_waiting_turn",
}


def _actions(services: Any) -> PersonalActions:
    return PersonalActions(services)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def status_markdown(services: Any, user: User) -> tuple[bool, str]:
    """(opted in, what to show) for the user's own personal adapter."""
    st = _actions(services).status(user)
    state = st["state"]
    lines = [f"**{tr(STATE_WORDS[state]) if state in STATE_WORDS else state}**"]
    if st["serving"]:
        lines.append(tr("my_serving_you", serving=st["serving"], shared=st["shared_serving"] or "base"))
    latest = st["latest"]
    if latest is not None and latest["name"] != st["serving"]:
        lines.append(tr("my_newest", name=latest["name"], gate=latest["gate"],
                        reason=safe_markdown(gate_reason(latest["reason"]))))
    ready = st["readiness"]
    if st["opted_in"]:
        lines.append(tr("my_feedback", feedback=ready["feedback"], needs=ready["needs"],
                        used=_mib(ready["disk_bytes"]), limit=_mib(ready["disk_limit_bytes"])))
        lines += [f"- {safe_markdown(m)}" for m in ready["missing"] if "not asked" not in m]
    return st["opted_in"], "\n\n".join(lines)


def report_markdown(services: Any, user: User) -> str:
    try:
        rep = _actions(services).report(user)
    except NotFound:
        return tr("my_no_report")
    head = tr("my_report_head", version=rep["version"], gate=rep["gate"],
              reason=safe_markdown(gate_reason(rep["reason"])))
    head += "\n\n"
    return head + safe_markdown(sentences.report_markdown(rep["markdown"]))


def set_opt_in(services: Any, user: User, on: bool) -> str:
    try:
        _actions(services).set_opt_in(user, bool(on))
    except Conflict as e:
        return safe_markdown(say(str(e)))
    return tr("my_opted_in" if on else "my_opted_out")


def forget(services: Any, user: User, sure: bool) -> str:
    if not sure:
        return tr("my_tick_first")
    try:
        done = _actions(services).forget(user)["deleted"]
    except Conflict as e:
        return safe_markdown(say(str(e)))
    return tr("my_forgotten", versions=done["versions"])


def personal_frame(services: Any, admin: User) -> pd.DataFrame:
    rows = [[r["username"], tr("yes" if r["opted_in"] else "no"), r["serving"] or "-", r["versions"],
             r["latest"] or "-", r["latest_gate"] or "-", f"{_mib(r['disk_bytes'])} / {_mib(r['disk_limit_bytes'])}"]
            for r in _actions(services).overview(admin)]
    return pd.DataFrame(rows, columns=[tr(k) for k in ADMIN_HEADINGS])


def build_personal_tab(services: Any) -> None:
    """A tab where the logged-in user manages their own personal adapter."""
    with gr.Tab(T("tab_personal"), id="personal") as tab:
        gr.Markdown(T("my_intro"))
        opted = gr.Checkbox(False, label=T("my_opt"), elem_id="personal-opt")
        note = gr.Markdown(elem_id="personal-note")
        state = gr.Markdown(elem_id="personal-status")
        with gr.Accordion(T("my_report"), open=False):
            report = gr.Markdown(elem_id="personal-report")
        with gr.Row():
            sure = gr.Checkbox(False, label=T("my_sure"), elem_id="personal-sure")
            forget_btn = gr.Button(T("my_forget"), variant="stop", elem_id="personal-forget")

    def load(request: gr.Request):
        user = page_user(services, request)
        with speaking(page_language(request)):
            on, text = status_markdown(services, user)
            return on, text, report_markdown(services, user)

    def on_opt(on: bool, request: gr.Request):
        user = page_user(services, request)
        with speaking(page_language(request)):
            msg = set_opt_in(services, user, on)
            now_on, text = status_markdown(services, user)
            return now_on, msg, text

    def on_forget(ok: bool, request: gr.Request):
        user = page_user(services, request)
        with speaking(page_language(request)):
            msg = forget(services, user, ok)
            _, text = status_markdown(services, user)
            return False, msg, text, report_markdown(services, user)

    tab.select(load, None, [opted, state, report], **PRIVATE)
    opted.input(on_opt, [opted], [opted, note, state], **PRIVATE)
    forget_btn.click(on_forget, [sure], [sure, note, state, report], **PRIVATE)


def build_personal_section(services: Any, guard: Callable[[Callable[..., Any]], Callable[..., Any]]) -> gr.Dataframe:
    """Inside the admin console: every user's personal adapter with its disk use. `guard` is the console's."""
    gr.Markdown(T("pa_heading"))
    show = gr.Button(T("pa_show"), size="sm", elem_id="personal-admin-refresh")
    table = gr.Dataframe(headers=ADMIN_COLUMNS, interactive=False, elem_id="personal-admin-table")
    def personal_adapters(admin: User) -> pd.DataFrame:
        return personal_frame(services, admin)

    show.click(guard(personal_adapters), None, [table], **PRIVATE)
    return table
