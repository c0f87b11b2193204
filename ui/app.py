"""The browser page: a Gradio 6 `gr.Blocks` mounted at "/" on the same FastAPI app as the HTTP API.

In: the FastAPI app (API routes already registered) and the `Services` of the server.
Out: `mount_ui(app, services) -> app`, with the page, Gradio's login form (checked against the user
store) and `UiGuard` in front of every UI path. The wiring here stays thin: each event resolves the
logged-in user from the login session, calls a plain function in `ui.handlers`, and maps the result
(or its `UiError`) onto components.

A sidebar (conversations: new, search, rename, delete, export; a drawer on a phone), then the tabs:
Chat (streaming, stop, thumbs with a reason popup, corrections, regenerate-and-choose), Documents and
Memory, Account, and Admin (visible to admins only; filled by `ui.admin.build_admin_tab(services)`).
`build_blocks` only puts the parts together: each part is built by a small `_header` / `_sidebar` /
`_conversation_area` function and wired by a `_wire_*` function over the `ChatPage` of components.
"""

from __future__ import annotations

import functools
import html
import importlib.util
import json
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import gradio as gr
from fastapi import FastAPI

from assistant.services import Services
from memory.types import REASON_TAGS
from ui import handlers as h
from ui.auth import LoginThrottle, UiGuard, gradio_sub_app, make_login
from ui.errors import error_text, page_user
from ui.firstrun import SetupRedirect, mount_first_run
from ui.fonts import FONT_CSS, mount_fonts
from ui.i18n import I18N, LANG_COOKIE, T, page_language, tr
from ui.library import build_documents_tab, build_memory_tab
from ui.people import build_account_tab
from ui.personal import build_personal_tab
from ui.render import safe_markdown
from ui.sentences import say
from ui.uploads import PageUploads

CSS = """
#conversations label { white-space: normal; overflow-wrap: anywhere; }
#notice:empty { display: none; }
#notice { color: var(--error-text-color); }
#compare { align-items: center; gap: 6px; flex-wrap: nowrap; }
#compare #cmp-pos { min-width: 0 !important; flex: 1 1 auto; }
#compare button { flex: 0 0 auto; white-space: nowrap; }
#cmp-pos { flex: 1 1 auto !important; }
#feedback-popup { max-width: 560px; padding: 8px; border: 1px solid var(--border-color-primary);
                  border-radius: 8px; box-shadow: var(--shadow-drop-lg); }
@media (max-width: 640px) {
  /* on a phone the message box stays at the bottom of the screen: the chat takes what is left above it */
  #chatbot { height: calc(100dvh - 250px) !important; min-height: 240px; }
  #input-row { position: sticky; bottom: 0; z-index: 5; background: var(--background-fill-primary);
               flex-wrap: nowrap; padding-bottom: 4px; }
  #input-row button { min-width: 56px !important; white-space: nowrap; padding-left: 8px; padding-right: 8px; }
  #header { flex-wrap: wrap; gap: 4px; }
  #header > * { min-width: 0 !important; }
  #product { flex: 1 1 100% !important; }
  #theme-toggle, #lang-toggle, #logout { flex: 0 0 auto !important; }
}
/* the admin console: rows of fields wrap, and on a phone they stack; wide tables scroll sideways */
.admin-form { flex-wrap: wrap; }
.admin-table { overflow-x: auto; }
@media (max-width: 640px) {
  .admin-form { flex-direction: column; }
  .admin-form > * { min-width: 0 !important; width: 100% !important; flex: 1 1 auto !important; }
  .admin-table table { font-size: 12px; }
}
"""
# The typing dots on an answer bubble before its first token (ui/handlers.py TYPING).
TYPING_CSS = (Path(__file__).parent / "static" / "typing.css").read_text(encoding="utf-8")
PRODUCT = "Self-improving assistant"  # the page's title and heading
PRIVATE = {"api_visibility": "private"}  # the page is the only client of these events; the API is /v1


def _guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a handler's UiError into Gradio's error toast (nothing was changed), in the page's language.

    `functools.wraps` matters: Gradio reads the signature (through __wrapped__) to inject gr.Request.
    """
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except h.UiError as e:
            request = next((a for a in [*args, *kwargs.values()] if isinstance(a, gr.Request)), None)
            raise gr.Error(error_text(e.message, request), print_exception=False) from e
    return run


@dataclass
class ChatPage:
    """The chat tab's components, so the small wiring functions below can share them."""

    conv: gr.State  # current conversation id (None: a new chat)
    view: gr.State  # ChatView: rows and the answer id behind each row
    selected: gr.State  # answer id the feedback controls act on
    rating: gr.State  # the thumb just given (+1 / -1), which the reason popup adds to
    cmp: gr.State  # Comparison during regenerate-and-choose
    new_btn: gr.Button
    search: gr.Textbox
    conv_list: gr.Radio
    title_box: gr.Textbox
    rename_btn: gr.Button
    delete_btn: gr.Button
    confirm_row: gr.Row
    really_btn: gr.Button
    cancel_btn: gr.Button
    export_btn: gr.Button
    export_files: gr.File
    model_dd: gr.Dropdown
    chatbot: gr.Chatbot
    msg: gr.Textbox
    send_btn: gr.Button
    stop_btn: gr.Button
    notice: gr.Markdown
    target: gr.Markdown
    popup: gr.Group
    reason: gr.Dropdown
    comment: gr.Textbox
    save_reason: gr.Button
    close_popup: gr.Button
    edit_box: gr.Textbox
    save_edit: gr.Button
    regen_btn: gr.Button
    compare_row: gr.Row  # ‹ n/2 › under the chat while an answer is compared with its regenerated one
    prev_btn: gr.Button
    pos_md: gr.Markdown
    next_btn: gr.Button
    keep_btn: gr.Button

    @property
    def outputs(self) -> list[Any]:
        """What `show` fills: the chat, the conversation, its view, the list and the selected answer."""
        return [self.chatbot, self.conv, self.view, self.conv_list, self.selected, self.target, self.edit_box]


# A dark-mode switch in the page itself (Gradio follows the system setting otherwise); the choice is kept
# in the browser (localStorage) and applied again on every load.
DARK_TOGGLE_JS = """() => {
  const dark = !document.body.classList.contains('dark');
  document.body.classList.toggle('dark', dark);
  localStorage.setItem('assistant-theme', dark ? 'dark' : 'light');
}"""
# The language switch. Gradio picks the page's language from the browser's when the page starts; the
# header's button switches it in place through Gradio's own `changeLocale` (exported by its core module,
# which the page has already loaded), and the choice is kept in the browser for the next visit (and in a
# cookie, so the server writes in it too). `changeLocale` returns before the new language is in place (it
# may load Gradio's own texts for it first): this waits until the page says it (<html lang>), so the
# server's answer to the same event is drawn in the new language.
#
# Tab labels need the server's answer: Gradio 6.31 draws a tab's label from a list the Tabs component
# fills once, translated when the page is built, and translates it again only when that tab is updated
# (or drawn, which only the open tab is); `changeLocale` alone relabelled the open tab and left the
# others in the language the page started in, also after a reload. So the switch's event and the page's
# load event send every tab its label again (`tab_labels`), after the language is in place.
SET_LANGUAGE_JS = """async (lang) => {
  document.cookie = '""" + LANG_COOKIE + """=' + lang + '; path=/; max-age=31536000; SameSite=Lax';
  const speaks = () => (document.documentElement.lang || '').toLowerCase().startsWith(lang);
  if (speaks()) return;
  const url = performance.getEntriesByType('resource').map(e => e.name)
    .find(n => /\\/assets\\/core-[^/]*\\.js$/.test(n));
  if (!url) return;
  const core = await import(url);
  if (typeof core.changeLocale !== 'function') return;
  core.changeLocale(lang);
  for (let i = 0; i < 150 && !speaks(); i++) await new Promise(r => setTimeout(r, 20));
}"""
LANGUAGE_TOGGLE_JS = """async (...args) => {
  const lang = (document.documentElement.lang || '').toLowerCase().startsWith('ko') ? 'en' : 'ko';
  localStorage.setItem('assistant-lang', lang);
  try { await (""" + SET_LANGUAGE_JS + """)(lang); } catch (e) { console.error(e); }
  return args;
}"""
# Before the page's load event asks the server: the language chosen before (the server's texts and the
# tab labels it sends are drawn in it).
LOAD_LANGUAGE_JS = """async () => {
  const lang = localStorage.getItem('assistant-lang');
  if (lang === 'en' || lang === 'ko') {
    try { await (""" + SET_LANGUAGE_JS + """)(lang); } catch (e) { console.error(e); }
  }
  return [];
}"""


# On load: the theme chosen before, and on a phone (or a window made that narrow) the sidebar folds away
# into a drawer that its arrow opens over the page.
PAGE_LOAD_JS = """() => {
  const t = localStorage.getItem('assistant-theme');
  if (t) document.body.classList.toggle('dark', t === 'dark');
  const narrow = () => window.innerWidth < 700;
  const fold = () => {
    const open = document.querySelector('.sidebar.open .toggle-button');
    if (narrow() && open) open.click();
  };
  setTimeout(fold, 0);
  let was = narrow();
  window.addEventListener('resize', () => { if (narrow() && !was) fold(); was = narrow(); });
}"""


def _header() -> tuple[gr.Markdown, gr.Button]:
    """The product's name, who is logged in, the language and dark-mode switches and Log out. The
    language switch is wired in `build_blocks`: it also redraws the text the server wrote."""
    with gr.Row(equal_height=True, elem_id="header"):
        gr.Markdown(f"### {PRODUCT}", elem_id="product")
        who = gr.Markdown(elem_id="whoami")
        lang_btn = gr.Button(T("other_language"), size="sm", scale=0, min_width=80, elem_id="lang-toggle")
        gr.Button(T("dark_mode"), size="sm", scale=0, min_width=110, elem_id="theme-toggle").click(
            None, js=DARK_TOGGLE_JS, **PRIVATE)
        gr.Button(T("log_out"), link="/logout", size="sm", scale=0, min_width=80, elem_id="logout")
    return who, lang_btn


def _sidebar() -> dict[str, Any]:
    """New chat, search, the conversation list, rename / delete / export, and the model: a sidebar that
    can be folded away, and a drawer over the page on a phone (Gradio's Sidebar)."""
    with gr.Sidebar(label=T("conversations"), open=True, width=300, elem_id="sidebar"):
        new_btn = gr.Button(T("new_chat"), elem_id="new-chat")
        search = gr.Textbox(show_label=False, placeholder=T("search_placeholder"), elem_id="conv-search",
                            max_lines=1)
        conv_list = gr.Radio(label=T("conversations"), choices=[], elem_id="conversations")
        with gr.Accordion(T("rename_or_delete"), open=False, elem_id="manage"):
            title_box = gr.Textbox(label=T("new_title"), elem_id="title-box")
            with gr.Row():
                rename_btn = gr.Button(T("rename"), size="sm", elem_id="rename")
                delete_btn = gr.Button(T("delete"), size="sm", variant="stop", elem_id="delete")
            with gr.Row(visible=False) as confirm_row:
                really_btn = gr.Button(T("delete_confirm"), size="sm", variant="stop", elem_id="delete-confirm")
                cancel_btn = gr.Button(T("keep_it"), size="sm", elem_id="delete-cancel")
            export_btn = gr.Button(T("export"), size="sm", elem_id="export")
            export_files = gr.File(label=T("export_files"), file_count="multiple", interactive=False,
                                   visible=False, elem_id="export-files")
        with gr.Accordion(T("model"), open=False):
            model_dd = gr.Dropdown(label=T("model_or_adapter"), choices=["assistant"], value="assistant",
                                   elem_id="model", info=T("model_info"))
    return dict(new_btn=new_btn, search=search, conv_list=conv_list, title_box=title_box, rename_btn=rename_btn,
                delete_btn=delete_btn, confirm_row=confirm_row, really_btn=really_btn, cancel_btn=cancel_btn,
                export_btn=export_btn, export_files=export_files, model_dd=model_dd)


def _conversation_area() -> dict[str, Any]:
    """The chat itself, the input row, the notice, the reason popup, correction, regenerate and compare."""
    with gr.Column(scale=4, elem_id="chat-column"):
        chatbot = gr.Chatbot(label=T("tab_chat"), show_label=False, height=460, elem_id="chatbot",
                             sanitize_html=True, allow_tags=False, feedback_options=("Like", "Dislike"),
                             buttons=["copy", "copy_all"],  # no "share" to a hub
                             placeholder=T("chat_placeholder"))
        # Regenerate-and-choose: the compared answer's bubble shows one answer at a time, marked ‹ n/2 ›;
        # these arrows, right under the chat, switch it, and "keep" stores the choice.
        with gr.Row(visible=False, elem_id="compare") as compare_row:
            prev_btn = gr.Button("‹", size="sm", scale=0, min_width=44, elem_id="cmp-prev", interactive=False)
            pos_md = gr.Markdown(elem_id="cmp-pos")
            next_btn = gr.Button("›", size="sm", scale=0, min_width=44, elem_id="cmp-next", interactive=False)
            keep_btn = gr.Button(T("cmp_keep"), size="sm", scale=0, min_width=120, variant="primary",
                                 elem_id="cmp-keep", interactive=False)
        with gr.Row(elem_id="input-row"):
            # lines=1: Gradio sends on Enter, and Shift+Enter adds a line (the box grows).
            msg = gr.Textbox(label=T("message"), show_label=False, lines=1, max_lines=10, scale=8,
                             placeholder=T("message_placeholder"), elem_id="message")
            send_btn = gr.Button(T("send"), variant="primary", scale=1, min_width=80, elem_id="send")
            stop_btn = gr.Button(T("stop"), scale=1, min_width=80, elem_id="stop")
        notice = gr.Markdown(elem_id="notice")
        # A thumb opens this small popup for an optional reason and comment; the thumb itself is saved at once.
        with gr.Group(visible=False, elem_id="feedback-popup") as popup:
            gr.Markdown(T("why_rating"))
            with gr.Row():
                reason = gr.Dropdown(label=T("reason"), value="", elem_id="reason", choices=reason_choices("en"))
                comment = gr.Textbox(label=T("comment"), elem_id="comment", scale=2)
            with gr.Row():
                save_reason = gr.Button(T("save_reason"), variant="primary", size="sm", elem_id="feedback-save")
                close_popup = gr.Button(T("close"), size="sm", elem_id="feedback-close")
        with gr.Group(elem_id="feedback-panel"):
            target = gr.Markdown(elem_id="feedback-target")
            with gr.Accordion(T("edit_answer"), open=False, elem_id="edit-accordion"):
                edit_box = gr.Textbox(label=T("corrected_answer"), lines=4, elem_id="edit-box")
                save_edit = gr.Button(T("save_correction"), elem_id="save-edit")
            regen_btn = gr.Button(T("regenerate"), elem_id="regenerate")
    return dict(chatbot=chatbot, msg=msg, send_btn=send_btn, stop_btn=stop_btn, notice=notice, target=target,
                popup=popup, reason=reason, comment=comment, save_reason=save_reason, close_popup=close_popup,
                edit_box=edit_box, save_edit=save_edit, regen_btn=regen_btn, compare_row=compare_row,
                prev_btn=prev_btn, pos_md=pos_md, next_btn=next_btn, keep_btn=keep_btn)


def _chat_page() -> tuple[ChatPage, gr.Tabs]:
    """The sidebar, then the tabs with the chat tab first (the other tabs go in after it)."""
    states = dict(conv=gr.State(None), view=gr.State(None), selected=gr.State(None), rating=gr.State(None),
                  cmp=gr.State(None))
    side = _sidebar()
    with gr.Tabs() as tabs, gr.Tab(T("tab_chat"), id="chat"):
        area = _conversation_area()
    return ChatPage(**states, **side, **area), tabs


def tab_labels(tab_items: list[gr.Tab], visible: dict[gr.Tab, bool] | None = None) -> list[gr.Tab]:
    """An update for each tab giving its label again (a `T` key: the browser draws it in the page's
    language; see SET_LANGUAGE_JS for why), and for the tabs in `visible`, whether it shows."""
    visible = visible or {}
    return [gr.Tab(label=t.label, visible=visible[t]) if t in visible else gr.Tab(label=t.label) for t in tab_items]


def _admin_tab(services: Services) -> gr.Tab:
    with gr.Tab(T("tab_admin"), id="admin", visible=False) as admin_tab:
        if importlib.util.find_spec("ui.admin") is not None:
            from ui.admin import build_admin_tab

            build_admin_tab(services)
        else:
            gr.Markdown(T("admin_missing"))
    return admin_tab


# ---------------------------------------------------------------------------------------------- wiring
def reason_choices(lang: str) -> list[tuple[str, str]]:
    """The reason popup's choices: (label in the page's language, the stored tag)."""
    return [(tr("reason_none", lang), ""), *((tr(f"reason_{t}", lang), t) for t in REASON_TAGS)]


def _feedback_outputs(view: h.ChatView, answer_id: int | None) -> tuple:
    text = view.answers.get(answer_id, "") if answer_id is not None else ""
    return answer_id, h.answer_summary(view, answer_id), text


def _show(services: Services, view: h.ChatView, user, answer_id: int | None = None) -> tuple:
    """Values for `ChatPage.outputs` showing `view`, with `answer_id` (default: the last) selected."""
    answer_id = answer_id if answer_id in view.answers else view.last_answer_id
    choices = h.conversation_choices(services, user)
    return (gr.Chatbot(value=view.rows, feedback_value=view.thumbs), view.conversation_id, view,
            gr.Radio(choices=choices, value=view.conversation_id), *_feedback_outputs(view, answer_id))


def _wire_conversations(services: Services, p: ChatPage, tabs: gr.Tabs) -> None:
    """Switch, new, search, rename, delete (asked first) and export. The sidebar shows on every tab:
    opening a conversation goes to the chat tab."""
    hide = gr.Row(visible=False)
    fresh = [*p.outputs, p.notice, p.compare_row, p.popup, tabs]

    @_guarded
    def on_switch(cid, request: gr.Request):
        user = page_user(services, request)
        view = h.conversation_view(services, user, cid, page_language(request))
        return (*_show(services, view, user), "", hide, gr.Group(visible=False),
                gr.Tabs(selected="chat"))

    p.conv_list.input(on_switch, [p.conv_list], fresh, **PRIVATE)

    def on_new(request: gr.Request):
        user = page_user(services, request)
        return (*_show(services, h.ChatView(None, lang=page_language(request)), user), "", hide,
                gr.Group(visible=False), gr.Tabs(selected="chat"))

    p.new_btn.click(on_new, None, fresh, **PRIVATE)
    # The Chatbot's own trash icon clears the view only: treat it as "new conversation" (nothing deleted).
    p.chatbot.clear(on_new, None, fresh, **PRIVATE)

    def on_search(query, cid, request: gr.Request):
        user = page_user(services, request)
        return gr.Radio(choices=h.search_conversations(services, user, query), value=cid)

    p.search.change(on_search, [p.search, p.conv], [p.conv_list], show_progress="hidden", **PRIVATE)

    @_guarded
    def on_rename(cid, title, request: gr.Request):
        user = page_user(services, request)
        h.rename_conversation(services, user, cid, title)
        return gr.Radio(choices=h.conversation_choices(services, user), value=cid), ""

    p.rename_btn.click(on_rename, [p.conv, p.title_box], [p.conv_list, p.title_box], **PRIVATE)
    # Deleting takes two clicks: the first only reveals the confirmation.
    p.delete_btn.click(lambda: gr.Row(visible=True), None, [p.confirm_row], **PRIVATE)
    p.cancel_btn.click(lambda: gr.Row(visible=False), None, [p.confirm_row], **PRIVATE)

    @_guarded
    def on_delete(cid, request: gr.Request):
        user = page_user(services, request)
        h.delete_conversation(services, user, cid)
        return (*_show(services, h.ChatView(None, lang=page_language(request)), user), T("note_deleted"), hide)

    p.really_btn.click(on_delete, [p.conv], [*p.outputs, p.notice, p.confirm_row], **PRIVATE)

    @_guarded
    def on_export(cid, request: gr.Request):
        user = page_user(services, request)
        md, data = h.export_markdown(services, user, cid), h.export_json(services, user, cid)
        folder = Path(tempfile.mkdtemp(prefix="export-"))
        name = f"conversation-{int(cid)}"
        (folder / f"{name}.md").write_text(md, encoding="utf-8")
        (folder / f"{name}.json").write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
        return gr.File(value=[str(folder / f"{name}.md"), str(folder / f"{name}.json")], visible=True)

    p.export_btn.click(on_export, [p.conv], [p.export_files], **PRIVATE)


def _wire_turn(services: Services, p: ChatPage, active: h.ActiveReplies) -> None:
    """Send (Enter or the button), streaming into the chat, and Stop."""
    skip = gr.skip

    def on_send(text, cid, model, request: gr.Request) -> Iterator[tuple]:
        user = page_user(services, request)
        n = len(p.outputs)
        ready, busy = gr.Button(interactive=True), gr.Button(interactive=False)
        try:
            reply = h.start_turn(services, user, cid, text, model)
        except h.EmptyMessage:
            yield (*(skip(),) * n, skip(), "", ready)
            return
        except h.UiError as e:
            # The text stays in the box: a refused message loses nothing.
            yield (*(skip(),) * n, skip(), safe_markdown(error_text(e.message, request)), ready)
            return
        try:
            for view in h.stream_turn(services, user, cid, text, reply, active, request.session_hash or "",
                                      page_language(request)):
                if view.row_ids and view.row_ids[-1] is None:  # still streaming
                    yield (view.rows, *(skip(),) * (n - 1), "", "", busy)
                else:
                    yield (*_show(services, view, user), "", "", ready)
        except h.UiError as e:  # failed mid-answer: put the question back so nothing is lost
            yield (*(skip(),) * n, text, safe_markdown(error_text(e.message, request)), ready)

    # One event for Enter and the button: while an answer streams, neither starts another
    # (trigger_mode "once"), and the button shows it is locked.
    gr.on([p.msg.submit, p.send_btn.click], fn=on_send, inputs=[p.msg, p.conv, p.model_dd],
          outputs=[*p.outputs, p.msg, p.notice, p.send_btn], trigger_mode="once",
          concurrency_limit=services.settings.queue_max, show_progress="hidden", **PRIVATE)

    def on_stop(request: gr.Request):
        user = page_user(services, request)
        active.stop(user, request.session_hash or "")

    p.stop_btn.click(on_stop, None, None, concurrency_limit=None, **PRIVATE)


def _wire_feedback(services: Services, p: ChatPage) -> None:
    """Thumbs (with the reason popup), selecting an answer, and corrections."""
    skip = gr.skip

    def on_like(view, data: gr.LikeData, request: gr.Request):
        user = page_user(services, request)
        if view is None or not isinstance(data.index, int) or data.index >= len(view.row_ids) \
                or view.row_ids[data.index] is None:
            return skip(), skip(), skip(), skip(), skip(), T("note_wait_to_rate")
        answer_id = view.row_ids[data.index]
        try:
            if data.liked is True or data.liked is False:
                rating = 1 if data.liked is True else -1
                h.rate(services, user, answer_id, rating)
                note = T("note_thumb_up" if rating > 0 else "note_thumb_down")
                return (*_feedback_outputs(view, answer_id), rating, gr.Group(visible=True), note)
            h.clear_rating(services, user, answer_id)
        except h.UiError as e:
            return skip(), skip(), skip(), skip(), skip(), safe_markdown(error_text(e.message, request))
        return (*_feedback_outputs(view, answer_id), None, gr.Group(visible=False), T("note_withdrawn"))

    p.chatbot.like(on_like, [p.view], [p.selected, p.target, p.edit_box, p.rating, p.popup, p.notice], **PRIVATE)

    def on_select(view, data: gr.SelectData):
        if view is None or not isinstance(data.index, int) or data.index >= len(view.row_ids) \
                or view.row_ids[data.index] is None:
            return skip(), skip(), skip()
        return _feedback_outputs(view, view.row_ids[data.index])

    p.chatbot.select(on_select, [p.view], [p.selected, p.target, p.edit_box], **PRIVATE)

    @_guarded
    def on_reason(answer_id, rating, why, note, request: gr.Request):
        user = page_user(services, request)
        if rating not in (1, -1):
            raise h.UiError(tr("rate_first", page_language(request)))
        h.rate(services, user, answer_id, rating, why or None, note)
        return T("note_reason_saved" if why or note else "note_thumb_up" if rating > 0 else "note_thumb_down"), \
            "", "", gr.Group(visible=False)

    p.save_reason.click(on_reason, [p.selected, p.rating, p.reason, p.comment],
                        [p.notice, p.comment, p.reason, p.popup], **PRIVATE)
    p.close_popup.click(lambda: gr.Group(visible=False), None, [p.popup], **PRIVATE)

    @_guarded
    def on_edit(answer_id, corrected, cid, request: gr.Request):
        user = page_user(services, request)
        h.edit_answer(services, user, answer_id, corrected)
        view = h.conversation_view(services, user, cid, page_language(request))
        return gr.Chatbot(value=view.rows, feedback_value=view.thumbs), view, T("note_corrected")

    p.save_edit.click(on_edit, [p.selected, p.edit_box, p.conv], [p.chatbot, p.view, p.notice], **PRIVATE)


def _compared(view: h.ChatView, c: h.Comparison, lang: str) -> tuple:
    """The chat with the compared bubble showing answer `c.showing` of 2, and the line between the arrows."""
    where = tr("cmp_new" if c.showing == 2 else "cmp_original", lang)
    return (gr.Chatbot(value=h.compared_rows(view, c), feedback_value=view.thumbs),
            f"**{c.showing}/2** · {where}")


def _wire_regenerate(services: Services, p: ChatPage, active: h.ActiveReplies) -> None:
    """A second answer to the selected answer's question, streamed into that answer's bubble; the arrows
    ‹ › under the chat switch the bubble between the two (1/2 the one before, 2/2 the new one), and "keep"
    stores the pair with the one on show as the chosen answer."""
    skip = gr.skip

    def on_regenerate(answer_id, model, view, request: gr.Request) -> Iterator[tuple]:
        user = page_user(services, request)
        lang = page_language(request)
        view = view or h.ChatView(None, lang=lang)
        try:
            reply = h.start_regenerate(services, user, answer_id, model)
        except h.UiError as e:
            yield skip(), skip(), skip(), skip(), skip(), skip(), skip(), safe_markdown(say(e.message, lang))
            return
        locked = gr.Button(interactive=False)
        try:
            for c in h.stream_regenerate(services, user, answer_id, reply, active, request.session_hash or ""):
                ok = c.done and c.alternative_id is not None
                note = "" if not c.done else (T("note_which_better") if ok else T("note_nothing_to_compare"))
                yield (*_compared(view, c, lang), gr.Row(visible=True), c,
                       gr.Button(interactive=ok), locked, gr.Button(interactive=ok), note)
        except h.UiError as e:
            yield (gr.Chatbot(value=view.rows, feedback_value=view.thumbs), skip(), gr.Row(visible=False), None,
                   locked, locked, locked, safe_markdown(say(e.message, lang)))

    arrows = [p.prev_btn, p.next_btn, p.keep_btn]
    p.regen_btn.click(on_regenerate, [p.selected, p.model_dd, p.view],
                      [p.chatbot, p.pos_md, p.compare_row, p.cmp, *arrows, p.notice],
                      concurrency_limit=services.settings.queue_max, show_progress="hidden", **PRIVATE)

    def switcher(showing: int):
        def on_arrow(c, view, request: gr.Request):
            if c is None or view is None or not c.done or c.alternative_id is None:
                return skip(), skip(), skip(), skip(), skip()
            c = replace(c, showing=showing)
            return (*_compared(view, c, page_language(request)), c, gr.Button(interactive=showing == 2),
                    gr.Button(interactive=showing == 1))
        return on_arrow

    p.prev_btn.click(switcher(1), [p.cmp, p.view], [p.chatbot, p.pos_md, p.cmp, p.prev_btn, p.next_btn],
                     show_progress="hidden", **PRIVATE)
    p.next_btn.click(switcher(2), [p.cmp, p.view], [p.chatbot, p.pos_md, p.cmp, p.prev_btn, p.next_btn],
                     show_progress="hidden", **PRIVATE)

    @_guarded
    def on_keep(c, cid, request: gr.Request):
        user = page_user(services, request)
        lang = page_language(request)
        if c is None or c.alternative_id is None:
            raise h.UiError(tr("nothing_to_choose", lang))
        h.choose(services, user, c.original_id, c.alternative_id, c.shown_id)
        view = h.conversation_view(services, user, cid, lang)
        return (*_show(services, view, user, c.shown_id), gr.Row(visible=False), None,
                T("note_kept_new" if c.showing == 2 else "note_kept_original"))

    p.keep_btn.click(on_keep, [p.cmp, p.conv], [*p.outputs, p.compare_row, p.cmp, p.notice], **PRIVATE)


class Page(gr.Blocks):
    """The page's Blocks. Its login note (Gradio's `auth_message`, which Gradio reads for every logged-out
    page load) is given as a ui/i18n.py key and comes out in the language of the request being answered
    (`ui.auth.UiGuard` sets it for the login form's requests)."""

    @property
    def auth_message(self) -> str | None:  # type: ignore[override]
        # The login form is drawn without the page's css, so the note (shown as HTML) carries the bundled Hangul
        # font's declaration: without it the form's Korean shows as empty boxes on a machine with no Korean font.
        key = getattr(self, "_auth_message_key", None)
        return f"{html.escape(tr(key))}<style>{FONT_CSS}</style>" if key else None

    @auth_message.setter
    def auth_message(self, key: str | None) -> None:
        self._auth_message_key = key


def build_blocks(services: Services, uploads: PageUploads | None = None) -> gr.Blocks:
    """The page. Separate from `mount_ui` so it can be inspected without serving it."""
    uploads = uploads or PageUploads(page_upload_dir(services))
    active = h.ActiveReplies()
    with Page(title=PRODUCT) as demo:
        who, lang_btn = _header()
        page, tabs = _chat_page()
        with tabs:
            build_documents_tab(services, demo, uploads)
            build_memory_tab(services, demo)
            build_account_tab(services)
            build_personal_tab(services)  # ui/personal.py: the user's own adapter
            admin_tab = _admin_tab(services)
        tab_items = [c for c in tabs.children if isinstance(c, gr.Tab)]

        def on_load(request: gr.Request):
            user = page_user(services, request)
            lang = page_language(request)
            choices = h.conversation_choices(services, user)
            view = h.conversation_view(services, user, choices[0][1] if choices else None, lang)
            models = h.model_choices(services)
            labels = tab_labels(tab_items, {admin_tab: user.is_admin})
            return (h.whoami(user), *_show(services, view, user), gr.Dropdown(choices=models, value=models[0]),
                    *labels, gr.Dropdown(choices=reason_choices(lang)))

        demo.load(on_load, None, [who, *page.outputs, page.model_dd, *tab_items, page.reason],
                  js=LOAD_LANGUAGE_JS, **PRIVATE)

        # The switch sets the language (and its cookie) in the browser first, then the text the server
        # wrote (the bubbles' notes and details, the reasons) and the tabs' labels are drawn again in it.
        @_guarded
        def on_language(cid, selected, request: gr.Request):
            user = page_user(services, request)
            lang = page_language(request)
            view = h.conversation_view(services, user, cid, lang)
            return (*_show(services, view, user, selected), gr.Dropdown(choices=reason_choices(lang)),
                    *tab_labels(tab_items))

        lang_btn.click(on_language, [page.conv, page.selected], [*page.outputs, page.reason, *tab_items],
                       js=LANGUAGE_TOGGLE_JS, **PRIVATE)
        demo.load(None, js=PAGE_LOAD_JS, **PRIVATE)
        _wire_conversations(services, page, tabs)
        _wire_turn(services, page, active)
        _wire_feedback(services, page)
        _wire_regenerate(services, page, active)
    return demo


def mount_ui(app: FastAPI, services: Services) -> FastAPI:
    """Mount the page at "/" behind a login checked against the user store."""
    first_run = mount_first_run(app, services)  # /setup passes the guard as a route of the host app
    mount_fonts(app)  # so does /fonts: the login form shows Korean too
    host_routes = list(app.router.routes)  # the API, registered before the UI
    uploads = PageUploads(page_upload_dir(services))
    uploads.start()
    demo = build_blocks(services, uploads)
    # Uploads and Gradio's cache live under the home folder, in one place the guard watches. Each
    # component keeps its own cache folder (Gradio's temp folder by default).
    for block in [demo, *demo.blocks.values()]:
        block.GRADIO_CACHE = str(uploads.folder)
    app = gr.mount_gradio_app(
        app, demo, path="/",
        auth=make_login(services.store, LoginThrottle()),
        auth_message="login_note",  # a key: Page.auth_message says it in the login form's language
        footer_links=[],  # no links out to gradio.app / API docs / settings
        run_history=False,  # its page offers connecting a hub bucket; nothing of ours goes there
        ssr_mode=False, pwa=False, mcp_server=False, show_error=True,
        max_file_size=services.settings.upload_max_bytes,  # refused before it is written to disk
        css=CSS + TYPING_CSS + FONT_CSS,
        i18n=I18N,  # labels in the browser's language (English or Korean), or the one the switch chose
    )
    gradio_sub_app(app).uploaded_file_dir = str(uploads.folder)
    quiet_queue(demo)
    app.add_middleware(UiGuard, host_app=app, host_routes=host_routes, uploads=uploads)
    app.add_middleware(SetupRedirect, first_run=first_run)  # outermost: before the guard sends to the login
    return app


def page_upload_dir(services: Services) -> Path:
    return services.settings.uploads_dir / "page"


# Gradio's queue polls for new events every 1 ms (10 ms for progress) on the server's event loop,
# busy or idle: an idle server woke 923 times a second and used 2.1 % of a core (32 and 0.5 % with
# these), and while streaming the event loop spent 1.0 ms of CPU per generated token instead of 0.35,
# taking the GIL the generation thread needs between any two torch operations (CHANGELOG.md, 2026-11-22).
# Gradio uses these slower polls on Windows; a UI event waits at most this long to start.
QUEUE_POLL_S = 0.05
PROGRESS_POLL_S = 0.1


def quiet_queue(demo: gr.Blocks) -> None:
    """Make Gradio's queue poll every `QUEUE_POLL_S` instead of every millisecond."""
    q = demo._queue
    if not hasattr(q, "sleep_when_free") or not hasattr(q, "progress_update_sleep_when_free"):
        raise RuntimeError("this Gradio version's queue has no poll interval to set; check ui.app.quiet_queue")
    q.sleep_when_free = max(q.sleep_when_free, QUEUE_POLL_S)
    q.progress_update_sleep_when_free = max(q.progress_update_sleep_when_free, PROGRESS_POLL_S)
