"""The browser page: a Gradio 6 `gr.Blocks` mounted at "/" on the same FastAPI app as the HTTP API.

In: the FastAPI app (API routes already registered) and the `Services` of the server.
Out: `mount_ui(app, services) -> app`, with the page, Gradio's login form (checked against the user
store) and `UiGuard` in front of every UI path. The wiring here stays thin: each event resolves the
logged-in user from the login session, calls a plain function in `ui.handlers`, and maps the result
(or its `UiError`) onto components.

Tabs: Chat (conversations, streaming, stop, feedback, regenerate-and-choose), Documents and Memory
(when the knowledge base and long-term memory are attached to the services), and Admin (visible to
admins only; filled by `ui.admin.build_admin_tab(services)` when that module exists).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr
from fastapi import FastAPI

from assistant.services import Services
from memory.types import REASON_TAGS
from ui import handlers as h
from ui.auth import LoginThrottle, UiGuard, gradio_sub_app, make_login
from ui.firstrun import SetupRedirect, mount_first_run
from ui.fonts import FONT_CSS, mount_fonts
from ui.i18n import I18N, T
from ui.library import build_documents_tab, build_memory_tab
from ui.people import build_account_tab
from ui.render import safe_markdown
from ui.uploads import PageUploads

CSS = """
#conversations label { white-space: normal; overflow-wrap: anywhere; }
#notice:empty { display: none; }
#notice { color: var(--error-text-color); }
.compare-answer { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 8px;
                  min-height: 80px; }
"""
PRODUCT = "Self-improving assistant"  # the page's title and heading
PRIVATE = {"api_visibility": "private"}  # the page is the only client of these events; the API is /v1


def _user(services: Services, request: gr.Request):
    try:
        return h.resolve_user(services, request.username)
    except h.NotLoggedIn as e:
        raise gr.Error(e.message) from e


def _guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a handler's UiError into Gradio's error toast (nothing was changed).

    `functools.wraps` matters: Gradio reads the signature (through __wrapped__) to inject gr.Request.
    """
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except h.UiError as e:
            raise gr.Error(e.message, print_exception=False) from e
    return run


def build_blocks(services: Services, uploads: PageUploads | None = None) -> gr.Blocks:
    """The page. Separate from `mount_ui` so it can be inspected without serving it."""
    uploads = uploads or PageUploads(page_upload_dir(services))
    active = h.ActiveReplies()
    skip = gr.skip

    with gr.Blocks(title=PRODUCT) as demo:
        conv_state = gr.State(None)  # current conversation id (None: a new chat)
        view_state = gr.State(None)  # ChatView: rows and the answer id behind each row
        selected = gr.State(None)  # answer id the feedback controls act on
        cmp_state = gr.State(None)  # Comparison during regenerate-and-choose

        with gr.Row(equal_height=True):
            gr.Markdown(f"### {PRODUCT}", elem_id="product")
            who = gr.Markdown(elem_id="whoami")
            gr.Button(T("log_out"), link="/logout", size="sm", scale=0, elem_id="logout")

        with gr.Tabs():
            with gr.Tab(T("tab_chat"), id="chat"):
                with gr.Row():
                    with gr.Column(scale=1, min_width=220):
                        new_btn = gr.Button(T("new_chat"), elem_id="new-chat")
                        conv_list = gr.Radio(label=T("conversations"), choices=[], elem_id="conversations")
                        with gr.Accordion(T("rename_or_delete"), open=False, elem_id="manage"):
                            title_box = gr.Textbox(label=T("new_title"), elem_id="title-box")
                            with gr.Row():
                                rename_btn = gr.Button(T("rename"), size="sm", elem_id="rename")
                                delete_btn = gr.Button(T("delete"), size="sm", variant="stop", elem_id="delete")
                            with gr.Row(visible=False) as confirm_row:
                                really_btn = gr.Button(T("delete_confirm"), size="sm",
                                                       variant="stop", elem_id="delete-confirm")
                                cancel_btn = gr.Button(T("keep_it"), size="sm", elem_id="delete-cancel")
                        with gr.Accordion(T("model"), open=False):
                            model_dd = gr.Dropdown(label=T("model_or_adapter"), choices=["assistant"],
                                                   value="assistant", elem_id="model",
                                                   info=T("model_info"))
                    with gr.Column(scale=4):
                        chatbot = gr.Chatbot(label="Chat", show_label=False, height=460, elem_id="chatbot",
                                             sanitize_html=True, allow_tags=False, feedback_options=("Like", "Dislike"),
                                             buttons=["copy", "copy_all"],  # no "share" to a hub
                                             placeholder=T("chat_placeholder"))
                        with gr.Row():
                            # lines=1: Gradio sends on Enter, and Shift+Enter adds a line (the box grows).
                            msg = gr.Textbox(label="Message", show_label=False, lines=1, max_lines=10, scale=8,
                                             placeholder=T("message_placeholder"),
                                             elem_id="message")
                            send_btn = gr.Button(T("send"), variant="primary", scale=1, elem_id="send")
                            stop_btn = gr.Button(T("stop"), scale=1, elem_id="stop")
                        notice = gr.Markdown(elem_id="notice")
                        with gr.Group(elem_id="feedback-panel"):
                            target = gr.Markdown(elem_id="feedback-target")
                            with gr.Row():
                                reason = gr.Dropdown(label=T("reason"), value="", elem_id="reason",
                                                     choices=[("(none)", ""), *((t, t) for t in REASON_TAGS)])
                                comment = gr.Textbox(label=T("comment"), elem_id="comment", scale=2)
                                up_btn = gr.Button(T("good_answer"), elem_id="thumb-up", scale=0)
                                down_btn = gr.Button(T("bad_answer"), elem_id="thumb-down", scale=0)
                            with gr.Accordion(T("edit_answer"), open=False,
                                              elem_id="edit-accordion"):
                                edit_box = gr.Textbox(label=T("corrected_answer"), lines=4, elem_id="edit-box")
                                save_edit = gr.Button(T("save_correction"), elem_id="save-edit")
                            regen_btn = gr.Button(T("regenerate"), elem_id="regenerate")
                        with gr.Row(visible=False, elem_id="compare") as compare_row:
                            with gr.Column():
                                a_md = gr.Markdown(elem_id="answer-a", elem_classes="compare-answer")
                                pick_a = gr.Button(T("a_better"), elem_id="pick-a", interactive=False)
                            with gr.Column():
                                b_md = gr.Markdown(elem_id="answer-b", elem_classes="compare-answer")
                                pick_b = gr.Button(T("b_better"), elem_id="pick-b", interactive=False)
            build_documents_tab(services, demo, uploads)
            build_memory_tab(services, demo)
            build_account_tab(services)
            with gr.Tab(T("tab_admin"), id="admin", visible=False) as admin_tab:
                if importlib.util.find_spec("ui.admin") is not None:
                    from ui.admin import build_admin_tab

                    build_admin_tab(services)
                else:
                    gr.Markdown("The admin console is not installed in this build.")

        # ---------------------------------------------------------------- helpers
        def feedback_outputs(view: h.ChatView, answer_id: int | None) -> tuple:
            text = view.answers.get(answer_id, "") if answer_id is not None else ""
            return answer_id, h.answer_summary(view, answer_id), text

        def show(view: h.ChatView, user, answer_id: int | None = None) -> tuple:
            answer_id = answer_id if answer_id in view.answers else view.last_answer_id
            choices = h.conversation_choices(services, user)
            return (gr.Chatbot(value=view.rows, feedback_value=view.thumbs), view.conversation_id, view,
                    gr.Radio(choices=choices, value=view.conversation_id), *feedback_outputs(view, answer_id))

        chat_outputs = [chatbot, conv_state, view_state, conv_list, selected, target, edit_box]

        # ---------------------------------------------------------------- load, conversations
        def on_load(request: gr.Request):
            user = _user(services, request)
            choices = h.conversation_choices(services, user)
            view = h.conversation_view(services, user, choices[0][1] if choices else None)
            models = h.model_choices(services)
            return (h.whoami(user), *show(view, user), gr.Dropdown(choices=models, value=models[0]),
                    gr.Tab(visible=user.is_admin))

        demo.load(on_load, None, [who, *chat_outputs, model_dd, admin_tab], **PRIVATE)

        @_guarded
        def on_switch(cid, request: gr.Request):
            user = _user(services, request)
            return (*show(h.conversation_view(services, user, cid), user), "", gr.Row(visible=False))

        conv_list.input(on_switch, [conv_list], [*chat_outputs, notice, compare_row], **PRIVATE)

        def on_new(request: gr.Request):
            user = _user(services, request)
            return (*show(h.ChatView(None), user), "", gr.Row(visible=False))

        new_btn.click(on_new, None, [*chat_outputs, notice, compare_row], **PRIVATE)
        # The Chatbot's own trash icon clears the view only: treat it as "new conversation" (nothing deleted).
        chatbot.clear(on_new, None, [*chat_outputs, notice, compare_row], **PRIVATE)

        @_guarded
        def on_rename(cid, title, request: gr.Request):
            user = _user(services, request)
            h.rename_conversation(services, user, cid, title)
            return gr.Radio(choices=h.conversation_choices(services, user), value=cid), ""

        rename_btn.click(on_rename, [conv_state, title_box], [conv_list, title_box], **PRIVATE)

        # Deleting takes two clicks: the first only reveals the confirmation.
        delete_btn.click(lambda: gr.Row(visible=True), None, [confirm_row], **PRIVATE)
        cancel_btn.click(lambda: gr.Row(visible=False), None, [confirm_row], **PRIVATE)

        @_guarded
        def on_delete(cid, request: gr.Request):
            user = _user(services, request)
            h.delete_conversation(services, user, cid)
            return (*show(h.ChatView(None), user), "Conversation deleted.", gr.Row(visible=False))

        really_btn.click(on_delete, [conv_state], [*chat_outputs, notice, confirm_row], **PRIVATE)

        # ---------------------------------------------------------------- the turn
        def on_send(text, cid, model, request: gr.Request) -> Iterator[tuple]:
            user = _user(services, request)
            n = len(chat_outputs)
            ready, busy = gr.Button(interactive=True), gr.Button(interactive=False)
            try:
                reply = h.start_turn(services, user, cid, text, model)
            except h.EmptyMessage:
                yield (*(skip(),) * n, skip(), "", ready)
                return
            except h.UiError as e:
                # The text stays in the box: a refused message loses nothing.
                yield (*(skip(),) * n, skip(), safe_markdown(e.message), ready)
                return
            try:
                for view in h.stream_turn(services, user, cid, text, reply, active, request.session_hash or ""):
                    if view.row_ids and view.row_ids[-1] is None:  # still streaming
                        yield (view.rows, *(skip(),) * (n - 1), "", "", busy)
                    else:
                        yield (*show(view, user), "", "", ready)
            except h.UiError as e:  # failed mid-answer: put the question back so nothing is lost
                yield (*(skip(),) * n, text, safe_markdown(e.message), ready)

        # One event for Enter and the button: while an answer streams, neither starts another
        # (trigger_mode "once"), and the button shows it is locked.
        gr.on([msg.submit, send_btn.click], fn=on_send, inputs=[msg, conv_state, model_dd],
              outputs=[*chat_outputs, msg, notice, send_btn], trigger_mode="once",
              concurrency_limit=services.settings.queue_max, show_progress="hidden", **PRIVATE)

        def on_stop(request: gr.Request):
            user = _user(services, request)
            active.stop(user, request.session_hash or "")

        stop_btn.click(on_stop, None, None, concurrency_limit=None, **PRIVATE)

        # ---------------------------------------------------------------- feedback
        def on_like(view, data: gr.LikeData, request: gr.Request):
            user = _user(services, request)
            if view is None or not isinstance(data.index, int) or data.index >= len(view.row_ids) \
                    or view.row_ids[data.index] is None:
                return skip(), skip(), skip(), "Wait until the answer is complete, then rate it."
            answer_id = view.row_ids[data.index]
            try:
                if data.liked is True:
                    h.rate(services, user, answer_id, 1)
                    note = "Thumbs up saved. Add a reason or comment below if you like."
                elif data.liked is False:
                    h.rate(services, user, answer_id, -1)
                    note = "Thumbs down saved. Pick a reason and press Bad answer to add it."
                else:
                    h.clear_rating(services, user, answer_id)
                    note = "Rating withdrawn."
            except h.UiError as e:
                return skip(), skip(), skip(), safe_markdown(e.message)
            return (*feedback_outputs(view, answer_id), note)

        chatbot.like(on_like, [view_state], [selected, target, edit_box, notice], **PRIVATE)

        def on_select(view, data: gr.SelectData):
            if view is None or not isinstance(data.index, int) or data.index >= len(view.row_ids) \
                    or view.row_ids[data.index] is None:
                return skip(), skip(), skip()
            return feedback_outputs(view, view.row_ids[data.index])

        chatbot.select(on_select, [view_state], [selected, target, edit_box], **PRIVATE)

        def rater(rating: int):
            @_guarded
            def on_rate(answer_id, why, note, request: gr.Request):
                user = _user(services, request)
                h.rate(services, user, answer_id, rating, why or None, note)
                mark = "Thumbs up" if rating > 0 else "Thumbs down"
                suffix = f" (reason: {why})" if why else ""
                return f"{mark} saved for answer {answer_id}{suffix}.", ""
            return on_rate

        up_btn.click(rater(1), [selected, reason, comment], [notice, comment], **PRIVATE)
        down_btn.click(rater(-1), [selected, reason, comment], [notice, comment], **PRIVATE)

        @_guarded
        def on_edit(answer_id, corrected, cid, request: gr.Request):
            user = _user(services, request)
            h.edit_answer(services, user, answer_id, corrected)
            view = h.conversation_view(services, user, cid)
            return (gr.Chatbot(value=view.rows, feedback_value=view.thumbs), view,
                    f"Correction saved for answer {answer_id}.")

        save_edit.click(on_edit, [selected, edit_box, conv_state], [chatbot, view_state, notice], **PRIVATE)

        # ---------------------------------------------------------------- regenerate and choose
        def on_regenerate(answer_id, model, request: gr.Request) -> Iterator[tuple]:
            user = _user(services, request)
            try:
                reply = h.start_regenerate(services, user, answer_id, model)
            except h.UiError as e:
                yield skip(), skip(), skip(), skip(), skip(), skip(), safe_markdown(e.message)
                return
            locked = gr.Button(interactive=False)
            try:
                for c in h.stream_regenerate(services, user, answer_id, reply, active,
                                             request.session_hash or ""):
                    ready = gr.Button(interactive=c.done and c.alternative_id is not None)
                    note = "" if not c.done else (
                        "Which answer is better?" if c.alternative_id else "Stopped: nothing to compare.")
                    yield (gr.Row(visible=True), "**A** (current)\n\n" + safe_markdown(c.original_text),
                           "**B** (new)\n\n" + safe_markdown(c.alternative_text + ("" if c.done else " ▌")),
                           c, ready if c.done else locked, ready if c.done else locked, note)
            except h.UiError as e:
                yield skip(), skip(), skip(), skip(), locked, locked, safe_markdown(e.message)

        regen_btn.click(on_regenerate, [selected, model_dd],
                        [compare_row, a_md, b_md, cmp_state, pick_a, pick_b, notice],
                        concurrency_limit=services.settings.queue_max, show_progress="hidden", **PRIVATE)

        def chooser(pick_original: bool):
            @_guarded
            def on_choose(c, cid, request: gr.Request):
                user = _user(services, request)
                if c is None:
                    raise h.UiError("there is nothing to choose between yet")
                chosen = c.original_id if pick_original else c.alternative_id
                h.choose(services, user, c.original_id, c.alternative_id, chosen)
                view = h.conversation_view(services, user, cid)
                label = "A" if pick_original else "B"
                return (*show(view, user, chosen), gr.Row(visible=False), None,
                        f"Saved: you preferred {label} (answer {chosen}).")
            return on_choose

        pick_a.click(chooser(True), [cmp_state, conv_state], [*chat_outputs, compare_row, cmp_state, notice],
                     **PRIVATE)
        pick_b.click(chooser(False), [cmp_state, conv_state], [*chat_outputs, compare_row, cmp_state, notice],
                     **PRIVATE)
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
        auth_message="Log in with your account. An admin creates accounts in the page (Admin tab) or with "
                     "assistant user add.",
        footer_links=[],  # no links out to gradio.app / API docs / settings
        run_history=False,  # its page offers connecting a hub bucket; nothing of ours goes there
        ssr_mode=False, pwa=False, mcp_server=False, show_error=True,
        max_file_size=services.settings.upload_max_bytes,  # refused before it is written to disk
        css=CSS + FONT_CSS,
        i18n=I18N,  # labels in the browser's language (English or Korean)
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
