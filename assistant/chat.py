"""The chat turn: validate, route through memory and retrieval, generate, log.

In: a user, the new message, the conversation it belongs to (or the history an API client sent),
the model/adapter name and generation settings. Out: a `Reply` that streams text pieces and, once
drained, holds the stored user and assistant `Message` rows. Every entry point (HTTP API, browser,
terminal chat) goes through `ChatService.reply`, so every turn is validated and logged the same way.

Nothing is written until the answer is complete (or stopped by the user): a turn is committed whole,
and a rejected request leaves no trace.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from assistant.config import Settings
from assistant.prompt import MarkupCutter, holds_markup
from assistant.runtime import Backend, BackendBusy, GenerationError, GenerationSettings, InvalidMessages
from assistant.titles import conversation_title
from memory.store import Store
from memory.text import text_problem
from memory.types import Conversation, Message, User

if TYPE_CHECKING:
    from assistant.agent import Agent

SERVING_ALIAS = "assistant"  # model name that always means "the adapter currently serving"
# A personal adapter's version name (training/registry.py): u<user id>-vNNNN. Only its owner may be served it.
_PERSONAL_NAME = re.compile(r"^u(\d+)-v\d{4,}$")
# A seed is a signed 64-bit integer wherever it goes (torch, an OpenAI-compatible server, PostgreSQL).
SEED_RANGE = (-(2**63), 2**63 - 1)


class ChatError(Exception):
    """A request the service refuses; carries the HTTP status and an OpenAI-style error code."""

    status = 400
    code = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(ChatError):
    status = 400
    code = "invalid_request_error"


class MessageTooLong(ChatError):
    status = 413
    code = "message_too_long"


class HistoryTooLarge(ChatError):
    status = 413
    code = "history_too_large"


class NotFound(ChatError):
    status = 404
    code = "not_found"


class ModelNotFound(ChatError):
    status = 404
    code = "model_not_found"


class Busy(ChatError):
    status = 503
    code = "server_busy"


@dataclass
class TurnRequest:
    """One user turn, from any entry point."""

    user: User
    text: str
    model: str = SERVING_ALIAS
    conversation_id: int | None = None
    history: list[dict[str, str]] | None = None  # API clients send the history themselves
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    source: str = "api"


@dataclass
class Reply:
    """A streaming answer. Iterate for text pieces; afterwards the stored rows are set."""

    pieces: Iterator[str]
    adapter: str | None
    model: str
    generation: dict[str, Any]
    cancel: threading.Event
    conversation: Conversation | None = None
    user_message: Message | None = None
    assistant_message: Message | None = None
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_wait_s: float = 0.0
    first_token_s: float | None = None
    sources: list[dict] = field(default_factory=list)
    memories: list[dict] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)

    def __iter__(self) -> Iterator[str]:
        return self.pieces

    def stop(self) -> None:
        self.cancel.set()

    def drain(self) -> Reply:
        for _ in self.pieces:
            pass
        return self


class ChatService:
    """Routes a turn through the agent (memory, documents) and the model, then logs it."""

    def __init__(self, settings: Settings, store: Store, backend: Backend, agent: Agent | None = None):
        self.settings = settings
        self.store = store
        self.backend = backend
        self.agent = agent
        self._serving: str | None = None
        self._personal: dict[int, str] = {}  # user id -> their promoted personal adapter (training/personal.py)
        self._serving_lock = threading.Lock()

    # ------------------------------------------------------------------ adapters
    @property
    def serving_adapter(self) -> str | None:
        return self._serving

    def set_serving(self, adapter: str | None) -> None:
        """Point the serving alias at another adapter. Requests already running keep theirs."""
        if adapter is not None and not self.backend.has_adapter(adapter):
            raise ModelNotFound(f"adapter {adapter!r} is not loaded")
        with self._serving_lock:
            self._serving = adapter

    def set_personal(self, user_id: int, adapter: str | None) -> None:
        """Serve `user_id` their own adapter from their next request on (None: the shared one again)."""
        if adapter is not None and not self.backend.has_adapter(adapter):
            raise ModelNotFound(f"adapter {adapter!r} is not loaded")
        with self._serving_lock:
            if adapter is None:
                self._personal.pop(user_id, None)
            else:
                self._personal[user_id] = adapter

    def personal_adapter(self, user_id: int) -> str | None:
        with self._serving_lock:
            return self._personal.get(user_id)

    def personal_users(self) -> dict[int, str]:
        with self._serving_lock:
            return dict(self._personal)

    @staticmethod
    def visible_to(adapter: str, user: User | None) -> bool:
        """A personal adapter is only ever named, listed or served for its owner."""
        m = _PERSONAL_NAME.match(adapter)
        return m is None or (user is not None and int(m.group(1)) == user.id)

    def model_names(self, user: User | None = None) -> list[str]:
        """The names `user` may ask for: the alias, the base model, shared adapters and their own."""
        return [SERVING_ALIAS, self.backend.model_name,
                *(a for a in self.backend.adapters() if self.visible_to(a, user))]

    def resolve_model(self, model: str | None, user: User | None = None) -> str | None:
        """Model name -> adapter name (None = base model). Unknown names are a 404, and so is another
        user's personal adapter. The alias means `user`'s promoted personal adapter when they have one."""
        if model in (None, "", SERVING_ALIAS):
            with self._serving_lock:
                if user is not None and user.id in self._personal:
                    return self._personal[user.id]
                return self._serving
        if model == self.backend.model_name:
            return None
        if self.backend.has_adapter(model) and self.visible_to(model, user):
            return model
        raise ModelNotFound(
            f"model {model!r} does not exist; available: {', '.join(self.model_names(user))}", param="model"
        )

    # ------------------------------------------------------------------ validation
    def clean_text(self, text: Any) -> str:
        """The message as given, or ChatError: not text, nothing visible, NUL, lone surrogate, too long."""
        if not isinstance(text, str):
            raise InvalidRequest("message content must be a string", param="messages")
        if len(text) > self.settings.max_message_chars:
            raise MessageTooLong(
                f"message is {len(text)} characters; the limit is {self.settings.max_message_chars}",
                param="messages",
            )
        problem = text_problem(text)
        if problem is not None:
            raise InvalidRequest(f"message {problem}", param="messages")
        return text

    def clean_history(self, messages: list[dict] | None) -> list[dict[str, str]]:
        """History an API client sent, checked: known roles, acceptable text, and within the caps.

        Too many messages or a malformed one is a 400; too many characters together a 413. The caps
        bound what one request can make the server store (history is logged as imported messages).
        """
        messages = messages or []
        limit = self.settings.max_history_messages
        if len(messages) > limit:
            raise InvalidRequest(f"the request carries {len(messages)} earlier messages; the limit is {limit}",
                                 param="messages")
        out = []
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                role = m.get("role") if isinstance(m, dict) else None
                raise InvalidRequest(f"unsupported message role {role!r}", param="messages")
            out.append({"role": m["role"], "content": self.clean_text(m.get("content"))})
        total, cap = sum(len(m["content"]) for m in out), self.settings.max_history_chars
        if total > cap:
            raise HistoryTooLarge(f"the request's history is {total} characters; the limit is {cap}",
                                  param="messages")
        return out

    def generation_settings(self, req: TurnRequest) -> GenerationSettings:
        s = self.settings
        max_tokens = s.max_new_tokens if req.max_tokens is None else req.max_tokens
        if not 1 <= max_tokens <= s.max_tokens_limit:
            raise InvalidRequest(f"max_tokens must be between 1 and {s.max_tokens_limit}", param="max_tokens")
        temperature = s.temperature if req.temperature is None else req.temperature
        if not 0 <= temperature <= 2:
            raise InvalidRequest("temperature must be between 0 and 2", param="temperature")
        top_p = s.top_p if req.top_p is None else req.top_p
        if not 0 < top_p <= 1:
            raise InvalidRequest("top_p must be in (0, 1]", param="top_p")
        if req.seed is not None and not SEED_RANGE[0] <= req.seed <= SEED_RANGE[1]:
            raise InvalidRequest("seed must be a signed 64-bit integer", param="seed")
        return GenerationSettings(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=req.seed)

    # ------------------------------------------------------------------ the turn
    def reply(self, req: TurnRequest) -> Reply:
        """Validate everything, then start generating. Raises ChatError before any model call."""
        text = self.clean_text(req.text)
        adapter = self.resolve_model(req.model, req.user)
        gen = self.generation_settings(req)
        self._refuse_if_busy()
        conversation: Conversation | None = None
        if req.conversation_id is not None:
            conversation = self.store.get_conversation(req.conversation_id, req.user.id)
            if conversation is None:
                raise NotFound(f"conversation {req.conversation_id} not found", param="conversation_id")
            history = [
                {"role": m.role, "content": m.content}
                for m in self.store.messages(conversation.id)
                if m.role in ("user", "assistant") and m.status not in ("error", "alternative")
            ]
        else:
            history = self.clean_history(req.history)

        prompt, sources, memories, steps = self._prompt(req.user, history, text)
        generation = {**gen.as_dict(), "model": req.model or SERVING_ALIAS, "base_model": self.backend.model_name}
        client_system = [m["content"] for m in history if m["role"] == "system"]
        if client_system:
            generation["client_system"] = "\n\n".join(client_system)
        cancel = threading.Event()
        reply = Reply(pieces=iter(()), adapter=adapter, model=req.model or SERVING_ALIAS,
                      generation=generation, cancel=cancel, sources=sources, memories=memories, steps=steps)
        stream = self._start(prompt, adapter, gen, cancel)
        reply.pieces = self._run(reply, stream, log=lambda completed: self._log(
            reply, req, text, conversation, history, completed))
        return reply

    def regenerate(self, user: User, message_id: int, model: str | None = None,
                   temperature: float | None = None, seed: int | None = None) -> Reply:
        """A second answer to the same question, stored beside the first as status "alternative".

        Used by regenerate-and-choose: the user then picks one with `choose`.
        """
        original = self.store.get_message(message_id, user.id)
        if original is None or original.role != "assistant":
            raise NotFound(f"assistant message {message_id} not found", param="message_id")
        if original.imported:
            raise InvalidRequest("that message was sent by the client as history, not answered here; "
                                 "only the server's answers can be regenerated", param="message_id")
        self._refuse_if_busy()
        # The question is the answer's parent, not the last question stored before it: an answer chosen
        # in an earlier comparison is stored after later questions. The history is what reads before the
        # question (thread order), so it is the same conversation the first answer was given in.
        thread = self.store.messages(original.conversation_id)
        at = next((i for i, m in enumerate(thread) if m.id == original.parent_id and m.role == "user"), None)
        if at is None:  # no parent recorded: the last question stored before the answer
            at = next((i for i in range(len(thread) - 1, -1, -1)
                       if thread[i].id < original.id and thread[i].role == "user"), None)
        if at is None:
            raise InvalidRequest("that answer has no question to regenerate from")
        question = thread[at]
        history = [{"role": m.role, "content": m.content} for m in thread[:at]
                   if m.role in ("user", "assistant") and m.status not in ("error", "alternative")]
        adapter = self.resolve_model(model, user) if model is not None else original.adapter
        if adapter is not None and model is None and not self.backend.has_adapter(adapter):
            adapter = self.resolve_model(None, user)  # that adapter is gone (forgotten, pruned): serve today's
        temp = self.settings.temperature if temperature is None else temperature
        gen = self.generation_settings(TurnRequest(user=user, text=question.content, temperature=max(temp, 0.3),
                                                   seed=seed, max_tokens=original.generation.get("max_new_tokens")))
        prompt, sources, memories, steps = self._prompt(user, history, question.content)
        cancel = threading.Event()
        reply = Reply(pieces=iter(()), adapter=adapter, model=model or (adapter or self.backend.model_name),
                      generation={**gen.as_dict(), "model": model or "regenerate",
                                  "base_model": self.backend.model_name, "regenerated_from": original.id},
                      cancel=cancel, sources=sources, memories=memories, steps=steps)
        stream = self._start(prompt, adapter, gen, cancel)

        def log(completed: bool) -> None:
            if not completed:
                return  # a stopped alternative is not worth a pair
            reply.conversation = self.store.get_conversation(original.conversation_id, user.id)
            reply.user_message = question
            reply.assistant_message = self.store.add_message(
                original.conversation_id, "assistant", reply.text, adapter=reply.adapter,
                generation=reply.generation, sources=reply.sources, memories=reply.memories,
                steps=reply.steps, parent_id=question.id, status="alternative")

        reply.pieces = self._run(reply, stream, log=log)
        return reply

    def choose(self, user: User, message_id: int, other_message_id: int, chosen_message_id: int):
        """Store a pairwise choice; the chosen answer becomes the one the conversation continues from."""
        try:
            fb = self.store.add_pair(user.id, message_id, other_message_id, chosen_message_id)
        except (PermissionError, LookupError) as e:
            raise NotFound("message not found", param="message_id") from e
        except ValueError as e:
            raise InvalidRequest(str(e)) from e
        rejected = other_message_id if chosen_message_id == message_id else message_id
        self.store.set_message_status(chosen_message_id, "complete")
        self.store.set_message_status(rejected, "alternative")
        return fb

    # ------------------------------------------------------------------ internals
    def _prompt(self, user: User, history: list[dict], text: str):
        """The prompt for the model: the agent's (memory + documents) or a plain system prompt."""
        client_system = "\n\n".join(m["content"] for m in history if m["role"] == "system")
        history = [m for m in history if m["role"] != "system"]
        sources: list[dict] = []
        memories: list[dict] = []
        steps: list[dict] = []
        if self.agent is not None:
            prepared = self.agent.prepare(user, history, text)
            prompt = list(prepared.messages)
            sources, memories, steps = prepared.sources, prepared.memories, prepared.steps
        else:
            prompt = [{"role": "system", "content": self.settings.system_prompt}, *history,
                      {"role": "user", "content": text}]
        if client_system:
            if prompt and prompt[0]["role"] == "system":
                prompt[0] = {"role": "system", "content": client_system + "\n\n" + prompt[0]["content"]}
            else:
                prompt.insert(0, {"role": "system", "content": client_system})
        return prompt, sources, memories, steps

    def _refuse_if_busy(self) -> None:
        """Back-pressure before the turn's own work: a request the model's queue would refuse is refused
        before retrieval, memory recall and the prompt (under load most requests are refused, and that
        work would take the CPU from the ones being answered). `_start` checks again."""
        why = self.backend.busy()
        if why is not None:
            raise Busy(why)

    def _start(self, prompt: list[dict], adapter: str | None, gen: GenerationSettings, cancel):
        try:
            stream = self.backend.stream(prompt, adapter, gen, cancel=cancel)
            return _CutAtMarkup(stream) if holds_markup(prompt) else stream
        except BackendBusy as e:
            raise Busy(str(e)) from e
        except InvalidMessages as e:  # e.g. a prompt longer than the model's context: the client's to fix
            raise InvalidRequest(str(e), param="messages") from e

    def _run(self, reply: Reply, stream, log) -> Iterator[str]:
        started = time.perf_counter()
        parts: list[str] = []
        completed = False
        try:
            for piece in stream:
                if reply.first_token_s is None:
                    reply.first_token_s = time.perf_counter() - started
                parts.append(piece)
                yield piece
            # A stream stopped by the user also just ends: it is "stopped", not a complete answer.
            completed = stream.finish_reason != "cancelled" and not reply.cancel.is_set()
        except BackendBusy as e:
            raise Busy(str(e)) from e
        except GenerationError:
            raise
        finally:
            stream.close()
            reply.text = "".join(parts)
            reply.finish_reason = stream.finish_reason or ("stop" if completed else "cancelled")
            usage = stream.usage or {}
            reply.prompt_tokens = usage.get("prompt_tokens", 0)
            reply.completion_tokens = usage.get("completion_tokens", 0)
            reply.queue_wait_s = getattr(stream, "queue_wait_s", 0.0)
            # A finished answer is logged; a stopped one is logged only if it says something.
            if completed or reply.text.strip():
                log(completed)


    def _log(self, reply: Reply, req: TurnRequest, text: str, conversation: Conversation | None,
             history: list[dict], completed: bool) -> None:
        status = "complete" if completed and reply.finish_reason != "cancelled" else "stopped"
        meta = {"adapter": reply.adapter, "generation": reply.generation, "sources": reply.sources,
                    "memories": reply.memories, "steps": reply.steps, "status": status}
        if conversation is None:
            title = conversation_title(text, reply.text)  # a few words, e.g. "Reset my password"
            conversation = self.store.create_conversation(req.user.id, title=title, source=req.source)
            # The system prompt is in `generation`. The rest is the client's own writing: stored as
            # imported, so it is never rated as an answer nor trained on.
            earlier = [{**m, "imported": True} for m in history if m["role"] != "system"]
            if earlier:
                self.store.add_messages(conversation.id, earlier)
        reply.conversation = conversation
        reply.user_message, reply.assistant_message = self.store.add_turn(
            conversation.id, text, reply.text, **meta
        )
        if completed and self.agent is not None:
            reply.steps = reply.steps + self.agent.after_turn(req.user, text, reply.text)


class _CutAtMarkup:
    """A generation that ends where the answer starts reciting the prompt's markup (`MarkupCutter`): the model
    is stopped there and the answer counts as finished ("stop"), as if it had ended it itself."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.cutter = MarkupCutter()
        self.cut = False

    def __iter__(self) -> _CutAtMarkup:
        return self

    def __next__(self) -> str:
        while not self.cutter.done:
            try:
                piece = self.cutter.feed(next(self.stream))
            except StopIteration:
                piece = self.cutter.finish()
            if self.cutter.done and not self.stream.done:
                self.cut = True
                self.stream.close()  # frees the model for the next request
            if piece:
                return piece
        raise StopIteration

    @property
    def finish_reason(self) -> str | None:
        return "stop" if self.cut else self.stream.finish_reason

    def close(self) -> None:
        self.stream.close()

    def __getattr__(self, name: str) -> Any:  # usage, queue_wait_s, adapter, ... of the generation itself
        return getattr(self.stream, name)
