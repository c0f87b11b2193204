"""HTTP routes for a user's documents, memories, conversation exports and own password (`/v1/documents`,
`/v1/memories`, `/v1/export/conversations`, `/v1/account/password`).

In: requests with a user's API key (`Authorization: Bearer sk-...`); the key acts for its user.
Out: JSON in the shape the OpenAI client expects for errors (`{"error": {...}}`); an export can also
be Markdown. Every route calls one action of `assistant.actions` and maps its errors to status
codes (`call_action`): 401 no key, 403 not allowed, 404 not found (another user's thing looks exactly
like a missing one), 409 conflict (a duplicate document), 413 over a limit, 400 anything else the
client sent wrong, 503 a server without documents or memory. A refused request writes nothing.

`install_library(app, library, store)` adds the routes; `assistant.server.create_app` calls it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from assistant.actions import conversations as export_actions
from assistant.actions.account import change_password
from assistant.actions.base import Conflict, LoginRequired, TooLarge
from assistant.actions.library import Library, Unavailable
from assistant.api import ApiError, example, user_from_key
from memory.store import Store
from memory.types import User
from training.jobs import JobBusy
from training.registry import CorruptAdapter

T = TypeVar("T")
CurrentUser = Annotated[User, Depends(user_from_key)]


def call_action(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run an action and turn its exceptions into API errors (nothing was changed when it raises).

    The one mapping from an action's exceptions to HTTP answers, for every router (documents and
    memories, account, users, admin, personal adapters). Order matters: the specific classes come
    before the built-in ones they subclass.
    """
    try:
        return fn(*args, **kwargs)
    except LoginRequired as e:
        raise ApiError(401, str(e), "invalid_api_key") from e
    except PermissionError as e:
        raise ApiError(403, str(e), "forbidden") from e
    except JobBusy as e:
        raise ApiError(409, str(e), "job_running") from e
    except CorruptAdapter as e:
        raise ApiError(409, str(e), "adapter_corrupt") from e
    except LookupError as e:  # NotFound, unknown jobs and versions, and the store's own LookupErrors
        raise ApiError(404, str(e).strip("'\""), "not_found") from e
    except Conflict as e:
        raise ApiError(409, str(e), "conflict") from e
    except TooLarge as e:
        raise ApiError(413, str(e), "too_large") from e
    except Unavailable as e:
        raise ApiError(503, str(e), "unavailable") from e
    except ValueError as e:
        raise ApiError(400, str(e), "invalid_request_error") from e
    except RuntimeError as e:  # a backend that cannot load an adapter, a build that failed
        raise ApiError(409, f"{type(e).__name__}: {e}", "conflict") from e


class PasswordChangeIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"current_password": "the old passphrase", "new_password": "a new passphrase"}]})
    current_password: str = Field(min_length=1, max_length=1000)
    new_password: str = Field(min_length=1, max_length=1000)


class TextIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"text": "I prefer short answers."}]})
    text: str = Field(min_length=1, max_length=2000)


DOC_EXAMPLE = {"id": "d3f9a1c07b2e4d5", "title": "Travel policy", "filename": "travel.md", "kind": "markdown",
               "scope": "shared", "owner_id": 1, "chunks": 12, "size": 18342,
               "sha256": "9b1c…", "created_at": "2026-12-06T10:15:00+00:00"}
MEMORY_EXAMPLE = {"id": 7, "text": "I prefer short answers.", "kind": "preference", "slot": None,
                  "source": "explicit", "status": "active", "superseded_by": None,
                  "created_at": "2026-12-06T10:15:00+00:00", "updated_at": "2026-12-06T10:15:00+00:00"}


def doc_dict(d: Any) -> dict[str, Any]:
    return {"id": d.doc_id, "title": d.title, "filename": d.filename, "kind": d.kind, "scope": d.scope,
            "owner_id": d.owner_id, "chunks": d.chunks, "size": d.size, "sha256": d.sha256,
            "created_at": datetime.fromtimestamp(d.created_at, tz=UTC).isoformat()}


def memory_dict(m: Any) -> dict[str, Any]:
    return {"id": m.id, "text": m.text, "kind": m.kind, "slot": m.slot, "source": m.source, "status": m.status,
            "superseded_by": m.superseded_by, "created_at": m.created_at.isoformat(),
            "updated_at": m.updated_at.isoformat()}


def _library(request: Request) -> Library:
    return request.app.state.library


Lib = Annotated[Library, Depends(_library)]


def _read_upload(lib: Library, user: User, f: UploadFile, scope: str) -> tuple[str, bytes]:
    """The upload's name and bytes, refusing a bad name or size before reading more than the limit."""
    name = f.filename or ""
    limit = lib.settings.upload_max_bytes
    call_action(lib.check_upload, user, name, f.size if f.size is not None else 1, scope)
    data = f.file.read(limit + 1)
    call_action(lib.check_upload, user, name, len(data), scope)
    return name, data


def document_routes(r: APIRouter) -> None:
    @r.post("/v1/documents", status_code=201, responses=example({"data": [DOC_EXAMPLE]}, 201),
            summary="Upload documents (multipart; one or many files, all or none)")
    def upload(user: CurrentUser, lib: Lib, files: Annotated[list[UploadFile], File(description=(
               ".txt, .md, .pdf or .html files, each within the upload limit"))],
               scope: Annotated[Literal["private", "shared"], Form(description=(
                   "private: only you; shared: the whole team (admins only)"))] = "private") -> dict:
        got = [_read_upload(lib, user, f, scope) for f in files]
        return {"data": [doc_dict(d) for d in call_action(lib.add_documents, user, got, scope)]}

    @r.get("/v1/documents", responses=example({"data": [DOC_EXAMPLE]}),
           summary="Your documents and the team's shared ones")
    def list_documents(user: CurrentUser, lib: Lib, scope: Literal["private", "shared"] | None = None) -> dict:
        return {"data": [doc_dict(d) for d in call_action(lib.list_documents, user, scope)]}

    @r.get("/v1/documents/{doc_id}", responses=example(DOC_EXAMPLE), summary="One document with its chunk count")
    def get_document(doc_id: str, user: CurrentUser, lib: Lib) -> dict:
        return doc_dict(call_action(lib.get_document, user, doc_id))

    @r.delete("/v1/documents/{doc_id}", summary="Delete a document, its chunks and the teacher pairs made from it",
              responses=example({"id": DOC_EXAMPLE["id"], "deleted": True, "chunks": 12, "synthetic_pairs": 4}))
    def delete_document(doc_id: str, user: CurrentUser, lib: Lib) -> dict:
        d = call_action(lib.delete_document, user, doc_id)
        return {"id": d.doc_id, "deleted": True, "chunks": d.chunks, "synthetic_pairs": d.synthetic_pairs}


def memory_routes(r: APIRouter) -> None:
    @r.get("/v1/memories", responses=example({"data": [MEMORY_EXAMPLE]}),
           summary="What the assistant remembers about you")
    def list_memories(user: CurrentUser, lib: Lib) -> dict:
        return {"data": [memory_dict(m) for m in call_action(lib.list_memories, user)]}

    @r.post("/v1/memories", status_code=201, responses=example(MEMORY_EXAMPLE, 201),
            summary="Remember something (the same fact again changes nothing; a contradicting one replaces)")
    def add_memory(body: TextIn, user: CurrentUser, lib: Lib) -> dict:
        return memory_dict(call_action(lib.add_memory, user, body.text))

    @r.get("/v1/memories/{memory_id}", summary="One memory with the older versions it replaced",
           responses=example({**MEMORY_EXAMPLE, "history": [MEMORY_EXAMPLE]}))
    def get_memory(memory_id: int, user: CurrentUser, lib: Lib) -> dict:
        m = call_action(lib.get_memory, user, memory_id)
        return {**memory_dict(m), "history": [memory_dict(h) for h in call_action(lib.memory_history, user, m.id)]}

    @r.patch("/v1/memories/{memory_id}", responses=example(MEMORY_EXAMPLE),
             summary="Edit a memory: a new version; the old one is kept as history and no longer used")
    def edit_memory(memory_id: int, body: TextIn, user: CurrentUser, lib: Lib) -> dict:
        return memory_dict(call_action(lib.edit_memory, user, memory_id, body.text))

    @r.delete("/v1/memories/{memory_id}", responses=example({"id": 7, "deleted": True, "versions": 2}),
              summary="Delete a memory and every older version of it")
    def forget_memory(memory_id: int, user: CurrentUser, lib: Lib) -> dict:
        return {"id": memory_id, "deleted": True, "versions": call_action(lib.forget_memory, user, memory_id)}


EXPORT_EXAMPLE = {"user": "alice", "conversations": [{
    "id": 3, "title": "Travel", "source": "api", "created_at": "2026-12-06T10:15:00+00:00",
    "updated_at": "2026-12-06T10:16:00+00:00", "messages": [
        {"id": 5, "role": "user", "content": "How do I book a train?", "status": "complete",
         "created_at": "2026-12-06T10:15:00+00:00"},
        {"id": 6, "role": "assistant", "content": "Through the travel portal.", "status": "complete",
         "created_at": "2026-12-06T10:15:02+00:00", "adapter": "v0003", "generation": {"temperature": 0.7},
         "sources": [], "parent_id": 5,
         "feedback": [{"id": 1, "kind": "thumb", "rating": 1, "reason": None, "comment": None,
                       "created_at": "2026-12-06T10:16:00+00:00"}]}]}]}
ExportFormat = Literal["json", "markdown"]


def _export(store: Store, user: User, conversation_id: int | None, fmt: str) -> Any:
    data = call_action(export_actions.export, store, user, conversation_id)
    if fmt == "markdown":
        return PlainTextResponse(export_actions.to_markdown(data), media_type="text/markdown; charset=utf-8")
    return data


def export_routes(r: APIRouter) -> None:
    responses: dict[int | str, dict[str, Any]] = {200: {"content": {
        "application/json": {"example": EXPORT_EXAMPLE},
        "text/markdown": {"example": "# Conversations of alice\n\n## Travel\n..."}}}}

    @r.get("/v1/export/conversations", responses=responses,
           summary="Export all your conversations with their feedback (JSON or Markdown)")
    def export_all(user: CurrentUser, request: Request, format: ExportFormat = "json") -> Any:
        return _export(request.app.state.store, user, None, format)

    @r.get("/v1/export/conversations/{conversation_id}", responses=responses,
           summary="Export one of your conversations with its feedback (JSON or Markdown)")
    def export_one(conversation_id: int, user: CurrentUser, request: Request, format: ExportFormat = "json") -> Any:
        return _export(request.app.state.store, user, conversation_id, format)


def account_routes(r: APIRouter) -> None:
    @r.put("/v1/account/password", responses=example({"changed": True}),
           summary="Change your own password (the current one is asked for); API keys stay valid")
    def password(body: PasswordChangeIn, user: CurrentUser, request: Request) -> dict:
        call_action(change_password, request.app.state.store, user, body.current_password, body.new_password)
        return {"changed": True}


def build_library_router() -> APIRouter:
    r = APIRouter()
    document_routes(r)
    memory_routes(r)
    export_routes(r)
    account_routes(r)
    return r


def install_library(app: FastAPI, library: Library) -> None:
    app.state.library = library
    app.include_router(build_library_router())


__all__ = ["call_action", "example", "install_library"]
