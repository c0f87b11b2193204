"""HTTP API: OpenAI-compatible chat completions plus the product's own feedback endpoints.

Served by FastAPI in the same process as the Gradio UI (see `assistant.server`). Authentication is a
per-user API key in `Authorization: Bearer ...`; a bad key is refused before anything is read or
logged. Errors use the OpenAI error shape `{"error": {"message", "type", "param", "code"}}` so the
official `openai` client raises its usual exceptions.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from assistant.chat import SERVING_ALIAS, ChatError, ChatService, InvalidRequest, TurnRequest
from assistant.runtime import GenerationError
from memory.store import MAX_COMMENT, MAX_CORRECTED_CHARS, MAX_TITLE, Store
from memory.types import REASON_TAGS, User


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def error_body(message: str, code: str, param: str | None = None, type_: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_ or code, "param": param, "code": code}}


# -------------------------------------------------------------------------------------- streaming
class _Raised:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()


async def relay(items: Iterator[str], stop: Callable[[], None]) -> AsyncIterator[str]:
    """Iterate a blocking iterator on a thread of its own and hand its items to the event loop.

    Starlette iterates a plain iterator with one thread-pool call per item: per token a worker
    wake-up, an event-loop wake-up and anyio's bookkeeping, all holding the GIL that the generation
    thread needs between torch ops. Here the thread waits on the model itself and each item costs
    one `call_soon_threadsafe`; items that pile up while the loop is busy leave in one write.
    If the response is abandoned (the client went away), `stop` is called; the thread then runs the
    iterator to its end, so the turn is finished and logged as the stop button would.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def put(item: object) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass

    def pump() -> None:
        try:
            for item in items:
                put(item)
        except BaseException as e:  # noqa: BLE001 - re-raised on the event loop
            put(_Raised(e))
        else:
            put(_END)

    threading.Thread(target=pump, name="relay", daemon=True).start()
    ended = False
    try:
        while True:
            got = [await queue.get()]
            while not queue.empty():
                got.append(queue.get_nowait())
            text = "".join(x for x in got if isinstance(x, str))
            if text:
                yield text
            for x in got:
                if x is _END:
                    ended = True
                    return
                if isinstance(x, _Raised):
                    ended = True
                    raise x.error
    finally:
        if not ended:
            stop()


# ---------------------------------------------------------------------------------------- schemas
def example(body: Any, status: int = 200, media: str = "application/json") -> dict[int | str, dict[str, Any]]:
    """An OpenAPI response example for a route (`responses=example({...})`)."""
    return {status: {"content": {media: {"example": body}}}}


def examples(*bodies: dict[str, Any]) -> ConfigDict:
    """Request examples for a body model's schema."""
    return ConfigDict(json_schema_extra={"examples": list(bodies)})


CHAT_EXAMPLE = {
    "id": "chatcmpl-42", "object": "chat.completion", "created": 1796558400, "model": "assistant",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "The Team plan costs 8 dollars a month."},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 212, "completion_tokens": 11, "total_tokens": 223},
    "conversation_id": 7, "message_id": 42, "adapter": "v0002",
    "sources": [{"n": 1, "title": "Pricing", "snippet": "The Team plan costs 8 dollars a month per seat."}],
    "memories": [], "queue_wait_s": 0.0}
CONV_EXAMPLE = {"id": 7, "title": "Pricing question", "source": "api", "created_at": "2026-12-06T10:15:00+00:00",
                "updated_at": "2026-12-06T10:16:00+00:00"}


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequest("only text content parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionIn(BaseModel):
    model_config = ConfigDict(extra="ignore",  # unknown OpenAI options (logprobs...) are ignored
                              **examples({"model": "assistant", "stream": False, "max_tokens": 64,
                                          "messages": [{"role": "user", "content": "How much is the Team plan?"}]}))
    model: str = SERVING_ALIAS
    messages: list[ChatMessageIn] = Field(min_length=1)
    n: int | None = None  # one choice per request: anything else is refused, not silently ignored
    stream: bool = False
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    seed: int | None = None
    # product extensions (send with the openai client's extra_body=)
    conversation_id: int | None = None


class ThumbIn(BaseModel):
    model_config = examples({"message_id": 42, "rating": -1, "reason": "wrong", "comment": "It is 8, not 9."})
    message_id: int
    rating: StrictInt  # strict: JSON `true` is not the number 1
    reason: str | None = None
    comment: str | None = Field(None, max_length=MAX_COMMENT)

    @field_validator("rating")
    @classmethod
    def _plus_or_minus_one(cls, v: int) -> int:
        if v not in (1, -1):
            raise ValueError("rating must be 1 or -1")
        return v


class EditIn(BaseModel):
    model_config = examples({"message_id": 42, "corrected": "The Team plan costs 8 dollars a month per seat."})
    message_id: int
    # The store's limit, the same one the page uses (memory.store.MAX_CORRECTED_CHARS).
    corrected: str = Field(min_length=1, max_length=MAX_CORRECTED_CHARS)


class PairIn(BaseModel):
    model_config = examples({"message_id": 42, "other_message_id": 45, "chosen_message_id": 45})
    message_id: int
    other_message_id: int
    chosen_message_id: int


class RenameIn(BaseModel):
    model_config = examples({"title": "Pricing questions"})
    title: str = Field(min_length=1, max_length=MAX_TITLE)


# ---------------------------------------------------------------------------------------- app
def user_from_key(request: Request) -> User:
    store: Store = request.app.state.store
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    user = store.user_for_api_key(key.strip()) if scheme.lower() == "bearer" and key.strip() else None
    if user is None:
        raise ApiError(401, "invalid or missing API key", "invalid_api_key")
    return user


CurrentUser = Annotated[User, Depends(user_from_key)]


def chat_service(request: Request) -> ChatService:
    return request.app.state.chat


Chat = Annotated[ChatService, Depends(chat_service)]


def _chunk(cid: str, created: int, model: str, delta: dict, finish: str | None = None, **extra) -> str:
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
    return f"data: {json.dumps(body)}\n\n"


def build_router() -> APIRouter:
    r = APIRouter()

    @r.get("/health", summary="Liveness and warm-up",
           responses=example({"status": "ok", "model": "smollm2-135m-instruct", "serving_adapter": "v0002",
                              "queue_depth": 0, "warm": True}))
    def health(request: Request) -> dict:
        chat: ChatService = request.app.state.chat
        services = getattr(request.app.state, "services", None)
        return {"status": "ok", "model": chat.backend.model_name, "serving_adapter": chat.serving_adapter,
                "queue_depth": getattr(chat.backend, "queue_depth", 0),
                # answering already; false while the first answer would still wait for the warm-up
                "warm": bool(services is None or services.warm.is_set())}

    @r.get("/v1/models", summary="The models a request may name",
           responses=example({"object": "list", "data": [{"id": "assistant", "object": "model",
                                                          "created": 1796558400, "owned_by": "assistant",
                                                          "adapter": "v0002"}]}))
    def models(user: CurrentUser, chat: Chat) -> dict:
        now = int(time.time())
        data = [{"id": name, "object": "model", "created": now, "owned_by": "assistant",
                 "adapter": chat.resolve_model(name, user)} for name in chat.model_names(user)]
        return {"object": "list", "data": data}

    @r.post("/v1/chat/completions", summary="Chat (OpenAI-compatible, streamed with stream=true)",
            responses=example(CHAT_EXAMPLE))
    def chat_completions(body: ChatCompletionIn, user: CurrentUser, chat: Chat):
        *history, last = body.messages
        if last.role != "user":
            raise InvalidRequest("the last message must come from the user", param="messages")
        if body.n not in (None, 1):
            raise InvalidRequest("only n=1 is supported: one answer per request", param="n")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        req = TurnRequest(
            user=user, text=last.text(), model=body.model, conversation_id=body.conversation_id,
            history=[{"role": m.role, "content": m.text()} for m in history],
            temperature=body.temperature, top_p=body.top_p,
            max_tokens=max_tokens, seed=body.seed, source="api",
        )
        reply = chat.reply(req)  # raises ChatError before any model work
        created = int(time.time())
        if not body.stream:
            try:
                reply.drain()
            except GenerationError as e:
                raise ApiError(500, f"generation failed: {e}", "generation_error") from e
            msg = reply.assistant_message
            return {
                "id": f"chatcmpl-{msg.id if msg else 'x'}", "object": "chat.completion", "created": created,
                "model": reply.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                             "finish_reason": reply.finish_reason or "stop"}],
                "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                          "total_tokens": reply.prompt_tokens + reply.completion_tokens},
                "conversation_id": reply.conversation.id if reply.conversation else None,
                "message_id": msg.id if msg else None,
                "adapter": reply.adapter, "sources": reply.sources, "memories": reply.memories,
                "queue_wait_s": round(reply.queue_wait_s, 3),  # seconds waited for the model (back-pressure)
            }

        def events() -> Iterator[str]:
            cid = f"chatcmpl-{created}-{id(reply)}"
            yield _chunk(cid, created, reply.model, {"role": "assistant", "content": ""})
            try:
                for piece in reply:
                    yield _chunk(cid, created, reply.model, {"content": piece})
            except GenerationError as e:
                yield f"data: {json.dumps(error_body(f'generation failed: {e}', 'generation_error'))}\n\n"
                return
            except ChatError as e:
                yield f"data: {json.dumps(error_body(e.message, e.code, e.param))}\n\n"
                return
            except OperationalError as e:  # the turn is written when the answer ends: a full disk shows here
                if not disk_full(e):
                    raise
                yield f"data: {json.dumps(error_body(STORAGE_FULL, 'storage_full'))}\n\n"
                return
            msg = reply.assistant_message
            yield _chunk(cid, created, reply.model, {}, reply.finish_reason or "stop",
                         usage={"prompt_tokens": reply.prompt_tokens,
                                "completion_tokens": reply.completion_tokens,
                                "total_tokens": reply.prompt_tokens + reply.completion_tokens},
                         conversation_id=reply.conversation.id if reply.conversation else None,
                         message_id=msg.id if msg else None, adapter=reply.adapter,
                         queue_wait_s=round(reply.queue_wait_s, 3))
            yield "data: [DONE]\n\n"

        return StreamingResponse(relay(events(), reply.stop), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -------------------------------------------------------------- conversations and feedback
    @r.get("/v1/conversations", summary="Your conversations", responses=example({"data": [CONV_EXAMPLE]}))
    def list_conversations(user: CurrentUser, request: Request) -> dict:
        store: Store = request.app.state.store
        return {"data": [_conv(c) for c in store.list_conversations(user.id)]}

    @r.get("/v1/conversations/{conversation_id}", summary="One of your conversations with its messages",
           responses=example({**CONV_EXAMPLE, "messages": [
               {"id": 41, "role": "user", "content": "How much is the Team plan?"},
               {"id": 42, "role": "assistant", "content": "8 dollars a month."}]}))
    def get_conversation(conversation_id: int, user: CurrentUser, request: Request) -> dict:
        store: Store = request.app.state.store
        conv = store.get_conversation(conversation_id, user.id)
        if conv is None:
            raise ApiError(404, f"conversation {conversation_id} not found", "not_found")
        return {**_conv(conv), "messages": [_msg(m) for m in store.messages(conv.id)]}

    @r.patch("/v1/conversations/{conversation_id}", summary="Rename a conversation",
             responses=example({"id": 7, "title": "Pricing questions"}))
    def rename_conversation(conversation_id: int, body: RenameIn, user: CurrentUser, request: Request) -> dict:
        try:  # the store checks the text (memory.text): blank, NUL, lone surrogates are a 400
            renamed = request.app.state.store.rename_conversation(conversation_id, user.id, body.title)
        except ValueError as e:
            raise ApiError(400, str(e), "invalid_request_error", "title") from e
        if not renamed:
            raise ApiError(404, f"conversation {conversation_id} not found", "not_found")
        return {"id": conversation_id, "title": body.title.strip()}

    @r.delete("/v1/conversations/{conversation_id}", summary="Delete a conversation",
              responses=example({"id": 7, "deleted": True}))
    def delete_conversation(conversation_id: int, user: CurrentUser, request: Request) -> dict:
        if not request.app.state.store.delete_conversation(conversation_id, user.id):
            raise ApiError(404, f"conversation {conversation_id} not found", "not_found")
        return {"id": conversation_id, "deleted": True}

    @r.post("/v1/feedback/thumb", summary="Thumbs up or down on an answer",
            responses=example({"id": 3, "kind": "thumb"}))
    def thumb(body: ThumbIn, user: CurrentUser, request: Request) -> dict:
        if body.reason is not None and body.reason not in REASON_TAGS:
            raise ApiError(400, f"reason must be one of {', '.join(REASON_TAGS)}", "invalid_request_error",
                           "reason")
        fb = _feedback(lambda s: s.add_thumb(user.id, body.message_id, body.rating, body.reason, body.comment),
                       request)
        return {"id": fb.id, "kind": fb.kind}

    @r.post("/v1/feedback/edit", summary="Correct an answer", responses=example({"id": 4, "kind": "edit"}))
    def edit(body: EditIn, user: CurrentUser, request: Request) -> dict:
        fb = _feedback(lambda s: s.add_edit(user.id, body.message_id, body.corrected), request)
        return {"id": fb.id, "kind": fb.kind}

    @r.post("/v1/feedback/pair", summary="Choose the better of two answers",
            responses=example({"id": 5, "kind": "pair"}))
    def pair(body: PairIn, user: CurrentUser, chat: Chat) -> dict:
        # The same action as the page's "choose": the pair is stored and the chosen answer becomes the one
        # the conversation continues from.
        fb = chat.choose(user, body.message_id, body.other_message_id, body.chosen_message_id)
        return {"id": fb.id, "kind": fb.kind}

    return r


def _feedback(action, request: Request):
    store: Store = request.app.state.store
    try:
        return action(store)
    except (PermissionError, LookupError) as e:
        # Another user's message looks exactly like a missing one: no existence leak.
        raise ApiError(404, "message not found", "not_found", "message_id") from e
    except ValueError as e:
        raise ApiError(400, str(e), "invalid_request_error") from e


def _conv(c) -> dict:
    return {"id": c.id, "title": c.title, "source": c.source,
            "created_at": c.created_at.isoformat(), "updated_at": c.updated_at.isoformat()}


def _msg(m) -> dict:
    return {"id": m.id, "role": m.role, "content": m.content, "adapter": m.adapter,
            "generation": m.generation, "sources": m.sources, "memories": m.memories, "steps": m.steps,
            "status": m.status, "created_at": m.created_at.isoformat()}


STORAGE_FULL = "the server's disk is full; nothing was saved. Try again later."


def disk_full(exc: OperationalError) -> bool:
    message = str(exc.orig).lower()
    return "disk is full" in message or "no space left" in message  # SQLite / PostgreSQL wording


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(error_body(exc.message, exc.code, exc.param), exc.status, headers=headers)

    @app.exception_handler(ChatError)
    async def _chat_error(request: Request, exc: ChatError):
        headers = {"Retry-After": "5"} if exc.status == 503 else None
        return JSONResponse(error_body(exc.message, exc.code, exc.param), exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse(error_body("request body is not valid JSON", "invalid_json"), 400)
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse(
            error_body(f"invalid request: {where or 'body'}: {first.get('msg', 'invalid')}",
                       "invalid_request_error", where or None), 400)

    @app.exception_handler(OverflowError)
    async def _too_big(request: Request, exc: OverflowError):
        # An id or number beyond 64 bits passes the schema (int) but cannot reach the database;
        # found by the schemathesis fuzz in tests/test_security.py. Nothing was read or written.
        return JSONResponse(error_body(f"a number in the request is out of range: {exc}",
                                       "invalid_request_error"), 400)

    @app.exception_handler(OperationalError)
    async def _storage(request: Request, exc: OperationalError):
        # A full disk (found by tests/test_faults.py) surfaced as a bare 500: say what happened.
        # The write was rolled back, so nothing half-saved remains; other errors stay 500s.
        if not disk_full(exc):
            raise exc
        return JSONResponse(error_body(STORAGE_FULL, "storage_full"), 507, headers={"Retry-After": "60"})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail), f"http_{exc.status_code}"), exc.status_code)


def create_api(app: FastAPI, store: Store, chat: ChatService) -> FastAPI:
    """Attach the API routes and their state to `app` (which may also host the UI)."""
    app.state.store = store
    app.state.chat = chat
    install_error_handlers(app)
    app.include_router(build_router())
    return app
