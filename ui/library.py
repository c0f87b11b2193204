"""The Documents and Memory pages: handlers as plain functions, plus their thin Gradio wiring.

Every handler calls the action layer (`assistant.actions.library.Library`), as the HTTP API and the
CLI do, so the rules (who may add shared documents, what deleting a document removes) are the same.

In: `Services` holding the knowledge base (`services.knowledge`, a
`memory.knowledge.KnowledgeBase`) and long-term memory (`services.memories`, a
`memory.longterm.LongTermMemory`), the logged-in `User`, and the page's inputs (uploaded file paths,
a document or memory id, new text). Out: table rows and `UploadResult`s, or a `UiError` with the
reason. Documents: upload (with progress; one bad file does not stop the others, and the knowledge
base leaves nothing of a failed file behind), list, delete. Memory: view, add, edit (a new version
that supersedes the old), delete (with its older versions).

Who may do what: everyone sees their own documents and the team's shared ones; only admins add
shared documents (they reach every user's prompts). A user's memories are only ever read with that
user's id, and another user's document or memory reads as not found.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import gradio as gr
import pandas as pd

from assistant.actions.library import Library, Unavailable
from memory.types import User
from ui.confirm import confirm_step, hidden, shown
from ui.errors import error_text, page_user
from ui.handlers import UiError
from ui.i18n import T as label
from ui.i18n import page_language, tr
from ui.render import excerpt, safe_markdown
from ui.sentences import say
from ui.uploads import PageUploads, Received, UploadRefused

if TYPE_CHECKING:
    from assistant.services import Services
    from memory.knowledge import DocumentInfo, KnowledgeBase
    from memory.longterm import LongTermMemory, Memory

DOC_HEADERS = ["Title", "File", "Type", "Visible to", "Chunks", "Size", "Added", "Id"]
MEMORY_HEADERS = ["Id", "What I remember", "Kind", "From", "Updated"]
# The same headings in the page's language (ui/i18n.py keys).
DOC_HEADINGS = ["doc_col_title", "doc_col_file", "doc_col_type", "doc_col_visible", "doc_col_chunks", "doc_col_size",
                "doc_col_added", "doc_col_id"]
MEMORY_HEADINGS = ["mem_col_id", "mem_col_text", "mem_col_kind", "mem_col_from", "mem_col_updated"]
FILE_TYPES = [".txt", ".md", ".markdown", ".pdf", ".html", ".htm"]
PRIVATE = {"api_visibility": "private"}
T = TypeVar("T")


# ------------------------------------------------------------------------------------------ documents
def library(services: Services) -> Library:
    """The documents-and-memories actions every way in calls (assistant/actions/library.py)."""
    return Library(services.settings, services.store, services.knowledge,
                   services.memories)


def _act(fn: Callable[..., T], *args: Any) -> T:
    """Run an action; its refusal becomes a UiError with the action's own words."""
    try:
        return fn(*args)
    except (ValueError, LookupError, PermissionError, Unavailable) as e:
        raise UiError(str(e).strip("'\"")) from e


def knowledge(services: Services) -> KnowledgeBase:
    kb = services.knowledge
    if kb is None:
        raise UiError("documents are not available on this server")
    return kb


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{max(1, round(n / 1e3))} kB"


def document_rows(services: Services, user: User, lang: str | None = None) -> list[list[Any]]:
    rows = []
    for d in _act(library(services).list_documents, user):
        added = datetime.fromtimestamp(d.created_at, tz=UTC).strftime("%Y-%m-%d %H:%M")
        who = tr("doc_team_short" if d.scope == "shared" else "doc_only_me_short", lang)
        rows.append([d.title, d.filename, d.kind, who, d.chunks, _size(d.size), added, d.doc_id])
    return rows


def document_choices(services: Services, user: User) -> list[tuple[str, str]]:
    """Documents this user may delete: their own, and (admins) the shared ones."""
    out = []
    for d in _act(library(services).list_documents, user):
        if d.owner_id == user.id or (d.scope == "shared" and user.is_admin):
            out.append((f"{excerpt(d.title, 60)} ({d.filename})", d.doc_id))
    return out


@dataclass
class UploadResult:
    filename: str
    ok: bool
    message: str
    document: DocumentInfo | None = None


def upload_documents(services: Services, user: User, files: Sequence[Received] | None, scope: str = "private",
                     progress: Callable[[float, str], None] | None = None,
                     lang: str | None = None) -> list[UploadResult]:
    """Ingest each received file (its name and bytes, never a path); a refused file gets its reason and
    the rest still go in."""
    lib = library(services)
    knowledge(services)
    if not files:
        raise UiError("choose one or more files first")
    if scope not in ("private", "shared"):
        raise UiError("choose who may see the documents")
    _act(lib.check_scope, user, scope)
    report = progress or (lambda _f, _m: None)
    results: list[UploadResult] = []
    for i, f in enumerate(files):
        def step(frac: float, msg: str, i: int = i, name: str = f.filename) -> None:
            report((i + frac) / len(files), f"{name}: {msg}")

        try:
            info = lib.add_document(user, f.filename, f.data, scope, step)
        except ValueError as e:  # IngestError, too large, already there
            results.append(UploadResult(f.filename, False, str(e)))
            continue
        results.append(UploadResult(f.filename, True, tr("doc_added_as", lang, title=info.title, chunks=info.chunks),
                                    info))
    report(1.0, "done")
    return results


def receive_uploads(uploads: PageUploads, user: User, paths: Sequence[str] | None) -> tuple[list[Received],
                                                                                           list[UploadResult]]:
    """The files of a page event: only those this login uploaded (each read once, then deleted)."""
    received: list[Received] = []
    refused: list[UploadResult] = []
    for raw in paths or []:
        try:
            received.append(uploads.take(user.username, str(raw)))
        except UploadRefused as e:
            refused.append(UploadResult(Path(str(raw)).name, False, str(e)))
    return received, refused


def upload_summary(results: list[UploadResult], lang: str | None = None) -> str:
    """One line a file; a refusal in the page's language."""
    lines = [f"- {'✓' if r.ok else '✗'} **{safe_markdown(r.filename)}**: "
             f"{safe_markdown(r.message if r.ok else say(r.message, lang))}" for r in results]
    return "\n".join(lines)


def delete_document(services: Services, user: User, doc_id: str | None) -> int:
    """Delete a document, its chunks and the teacher pairs made from it; returns how many chunks went."""
    if not doc_id:
        raise UiError("choose a document first")
    return _act(library(services).delete_document, user, doc_id).chunks


# ------------------------------------------------------------------------------------------ memory
def memories(services: Services) -> LongTermMemory:
    lt = services.memories
    if lt is None:
        raise UiError("memory is not available on this server")
    return lt


def memory_rows(services: Services, user: User) -> list[list[Any]]:
    return [[m.id, m.text, m.kind, m.source, m.updated_at.strftime("%Y-%m-%d %H:%M")]
            for m in _act(library(services).list_memories, user)]


def memory_choices(services: Services, user: User) -> list[tuple[str, int]]:
    return [(f"{m.id}: {excerpt(m.text, 70)}", m.id) for m in _act(library(services).list_memories, user)]


def _memory(services: Services, user: User, memory_id: int | None) -> Memory:
    if memory_id is None:
        raise UiError("choose a memory first")
    return _act(library(services).get_memory, user, int(memory_id))


def memory_text(services: Services, user: User, memory_id: int | None) -> str:
    return _memory(services, user, memory_id).text


def memory_history(services: Services, user: User, memory_id: int | None) -> list[Memory]:
    m = _memory(services, user, memory_id)
    return _act(library(services).memory_history, user, m.id)


def add_memory(services: Services, user: User, text: str) -> Memory:
    """Remember something the user typed; the same fact again is a no-op, a contradicting one replaces."""
    return _act(library(services).add_memory, user, text or "")


def edit_memory(services: Services, user: User, memory_id: int | None, text: str) -> Memory:
    m = _memory(services, user, memory_id)
    return _act(library(services).edit_memory, user, m.id, text or "")


def forget_memory(services: Services, user: User, memory_id: int | None) -> int:
    """Delete the memory and every older version of it; it never comes back in a prompt."""
    m = _memory(services, user, memory_id)
    return _act(library(services).forget_memory, user, m.id)


# ------------------------------------------------------------------------------------------ wiring
def build_documents_tab(services: Services, demo: gr.Blocks, uploads: PageUploads) -> None:
    with gr.Tab(label("tab_documents"), id="documents") as tab:
        if services.knowledge is None:
            gr.Markdown(label("doc_unavailable"))
            return
        limit = services.settings.upload_max_bytes
        gr.Markdown(label("doc_intro") + f" {_size(limit)}.")
        files = gr.File(label=label("doc_files"), file_count="multiple", file_types=FILE_TYPES, elem_id="doc-files")
        with gr.Row():
            scope = gr.Radio([(label("doc_only_me"), "private"), (label("doc_team"), "shared")], value="private",
                             label=label("doc_who"), visible=False, elem_id="doc-scope")
            upload_btn = gr.Button(label("doc_add"), variant="primary", elem_id="doc-upload")
        status = gr.Markdown(elem_id="doc-status")
        table = gr.Dataframe(headers=DOC_HEADERS, datatype="str", interactive=False, elem_id="doc-table",
                             wrap=True)
        with gr.Row():
            pick = gr.Dropdown(label=label("doc_pick"), choices=[], elem_id="doc-pick", scale=3)
            delete_btn = gr.Button(label("doc_delete"), variant="stop", elem_id="doc-delete", scale=1)
        ask_row, yes_btn, no_btn = confirm_step(label("doc_delete_q"), label("yes_delete"), label("keep_it"),
                                                "doc-delete")

    def refresh(user: User, lang: str, chosen: str | None = None) -> tuple:
        choices = document_choices(services, user)
        keep = chosen if chosen in [c for _, c in choices] else None
        rows = pd.DataFrame(document_rows(services, user, lang), columns=[tr(k, lang) for k in DOC_HEADINGS])
        return rows, gr.Dropdown(choices=choices, value=keep)

    def on_load(request: gr.Request):
        user = page_user(services, request)
        return (*refresh(user, page_language(request)), gr.Radio(visible=user.is_admin))

    demo.load(on_load, None, [table, pick, scope], **PRIVATE)
    tab.select(on_load, None, [table, pick, scope], **PRIVATE)  # opened again: the list as it is now

    def on_upload(paths, where, request: gr.Request, progress=gr.Progress()):
        user = page_user(services, request)
        lang = page_language(request)
        received, refused = receive_uploads(uploads, user, paths)
        if not received:
            return gr.skip(), gr.skip(), safe_markdown(
                upload_summary(refused, lang) if refused else say("choose one or more files first", lang)), None
        try:
            results = upload_documents(services, user, received, where or "private",
                                       lambda f, m: progress(f, desc=m), lang)
        except UiError as e:
            return gr.skip(), gr.skip(), safe_markdown(say(e.message, lang)), None
        return (*refresh(user, lang), upload_summary(refused + results, lang), None)

    upload_btn.click(on_upload, [files, scope], [table, pick, status, files], **PRIVATE)

    def on_delete(doc_id, request: gr.Request):
        user = page_user(services, request)
        try:
            n = delete_document(services, user, doc_id)
        except UiError as e:
            return gr.skip(), gr.skip(), safe_markdown(error_text(e.message, request)), hidden()
        return (*refresh(user, page_language(request)), label("doc_deleted") + f" {n}.", hidden())

    delete_btn.click(shown, None, [ask_row], **PRIVATE)  # the first click only asks
    no_btn.click(hidden, None, [ask_row], **PRIVATE)
    yes_btn.click(on_delete, [pick], [table, pick, status, ask_row], **PRIVATE)

    def on_row(evt: gr.SelectData):  # clicking a row picks that document for Delete
        row = evt.row_value or []
        return gr.Dropdown(value=row[-1]) if row else gr.skip()

    table.select(on_row, None, [pick], **PRIVATE)


def build_memory_tab(services: Services, demo: gr.Blocks) -> None:
    with gr.Tab(label("tab_memory"), id="memory") as tab:
        if services.memories is None:
            gr.Markdown(label("mem_unavailable"))
            return
        gr.Markdown(label("mem_intro"))
        table = gr.Dataframe(headers=MEMORY_HEADERS, datatype="str", interactive=False, elem_id="memory-table",
                             wrap=True)
        with gr.Row():
            new_text = gr.Textbox(label=label("mem_new"), elem_id="memory-new", scale=4)
            add_btn = gr.Button(label("mem_add"), elem_id="memory-add", scale=1)
        pick = gr.Dropdown(label=label("mem_pick"), choices=[], elem_id="memory-pick")
        edit_box = gr.Textbox(label=label("mem_text"), elem_id="memory-text")
        with gr.Row():
            save_btn = gr.Button(label("mem_save"), elem_id="memory-save")
            forget_btn = gr.Button(label("mem_delete"), variant="stop", elem_id="memory-delete")
        ask_row, yes_btn, no_btn = confirm_step(label("mem_delete_q"), label("yes_delete"), label("keep_it"),
                                                "memory-delete")
        status = gr.Markdown(elem_id="memory-status")

    def refresh(user: User, lang: str, chosen: int | None = None) -> tuple:
        choices = memory_choices(services, user)
        keep = chosen if chosen in [c for _, c in choices] else None
        rows = pd.DataFrame(memory_rows(services, user), columns=[tr(k, lang) for k in MEMORY_HEADINGS])
        return rows, gr.Dropdown(choices=choices, value=keep)

    def on_load(request: gr.Request):
        return refresh(page_user(services, request), page_language(request))

    demo.load(on_load, None, [table, pick], **PRIVATE)
    # Memories learnt in chat ("remember that...") appear when the tab is opened, without a reload.
    tab.select(on_load, None, [table, pick], **PRIVATE)

    def on_pick(memory_id, request: gr.Request):
        user = page_user(services, request)
        try:
            return memory_text(services, user, memory_id), ""
        except UiError as e:
            return "", safe_markdown(error_text(e.message, request))

    pick.input(on_pick, [pick], [edit_box, status], **PRIVATE)

    def on_row(evt: gr.SelectData, request: gr.Request):  # clicking a row picks that memory
        row = evt.row_value or []
        if not row:
            return gr.skip(), gr.skip(), gr.skip()
        memory_id = int(row[0])
        return (gr.Dropdown(value=memory_id), *on_pick(memory_id, request))

    table.select(on_row, None, [pick, edit_box, status], **PRIVATE)

    def act(action: Callable[[User, Any, Any], tuple[str, int | None]]):
        def run(memory_id, text, request: gr.Request):
            user = page_user(services, request)
            try:
                note, chosen = action(user, memory_id, text)
            except UiError as e:
                return gr.skip(), gr.skip(), gr.skip(), gr.skip(), safe_markdown(error_text(e.message, request))
            shown = memory_text(services, user, chosen) if chosen is not None else ""
            return (*refresh(user, page_language(request), chosen), "", shown, note)
        return run

    def do_add(user: User, _memory_id: Any, text: str):
        m = add_memory(services, user, text)
        return label("mem_remembered") + f" “{safe_markdown(excerpt(m.text, 120))}”", None

    def do_save(user: User, memory_id: Any, text: str):
        m = edit_memory(services, user, memory_id, text)
        return label("mem_saved"), m.id

    def do_forget(user: User, memory_id: Any, _text: str):
        n = forget_memory(services, user, memory_id)
        return label("mem_deleted") + f" {n}.", None

    outputs = [table, pick, new_text, edit_box, status]
    add_btn.click(act(do_add), [pick, new_text], outputs, **PRIVATE)
    new_text.submit(act(do_add), [pick, new_text], outputs, **PRIVATE)
    save_btn.click(act(do_save), [pick, edit_box], outputs, **PRIVATE)
    forget_btn.click(shown, None, [ask_row], **PRIVATE)  # the first click only asks
    no_btn.click(hidden, None, [ask_row], **PRIVATE)
    forget = act(do_forget)

    def on_forget(memory_id, text, request: gr.Request):
        return (*forget(memory_id, text, request), hidden())

    yes_btn.click(on_forget, [pick, edit_box], [*outputs, ask_row], **PRIVATE)
