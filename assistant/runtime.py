"""Model runtime: one `Backend` interface over a model in this process or an inference server.

In: chat messages (``[{"role": ..., "content": ...}]``), an adapter name (``None`` or the base model's
name = no adapter) and `GenerationSettings`. Out: a `Generation`, an iterator of text pieces that,
once exhausted, holds ``usage``, ``finish_reason``, ``adapter`` and ``queue_wait_s``; or a
`GenerationResult` from `generate`, which drains one.

Two implementations:

- `TransformersBackend`: the base model plus PEFT LoRA adapters in this process. With
  `settings.serving == "batched"` (the default) requests decode together in `assistant.batching`'s
  engine, up to `settings.batch_max` at once, each on its own adapter; adapter loads and unloads run
  between two decode steps, and the weights a request started with stay until it ends. With
  "sequential", the active adapter is state of the whole PEFT model, shared by every thread, so one gate
  serializes "select adapter + generate" for a whole generation, and loads and unloads go through the
  same gate ahead of waiting requests. Either way requests wait in FIFO order, at most
  `settings.queue_max` of them and at most `settings.queue_timeout_s` seconds each, else `BackendBusy`.
- `OpenAIBackend`: any OpenAI-compatible server (vLLM with LoRA modules, or this product's own API);
  adapters are the server's model names.

Hot-swap: `load_adapter(name, path)` on a name that is already loaded replaces it only after the new
weights loaded successfully (in-process). The way to roll out a retrained adapter without a gap is to
load it under a NEW name and switch callers to that name; the old one stays loaded for rollback
until `unload_adapter`.

Every request gets a system message: SmolLM2's chat template (and Qwen's) inserts its own default
system prompt when there is none, so the runtime prepends `settings.system_prompt` where the caller
sent none, and generation never depends on a template's default.

Nothing is loaded at import; `make_backend(settings)` is the explicit start-up call.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypedDict, runtime_checkable

from assistant.batching import BatchEngine, BatchRequest, SlotSpec, clean_text
from assistant.batching import Done as _Done
from assistant.batching import Failed as _Failed
from assistant.batching import PieceStreamer as _PieceStreamer
from assistant.config import Settings
from assistant.lora_gather import GatheredLora

if TYPE_CHECKING:
    import torch

FinishReason = Literal["stop", "length", "cancelled"]
ROLES = ("system", "user", "assistant")
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+/-]{0,127}$")


# ---------------------------------------------------------------------------------------- errors
class BackendError(RuntimeError):
    """Base class of the runtime's own errors."""


class BackendBusy(BackendError):
    """Too many requests are waiting for the model, or one waited too long (HTTP 503)."""


class GenerationError(BackendError):
    """Generation failed after it started (an error in the model thread, a stalled stream)."""


class AdapterLoadError(BackendError):
    """An adapter could not be loaded; the adapters already serving are untouched."""


class UnknownAdapter(KeyError):
    """The request names an adapter that is not loaded. Raised before any model work."""

    def __str__(self) -> str:  # KeyError's str() would show the message in quotes
        return str(self.args[0]) if self.args else "unknown adapter"


class InvalidMessages(ValueError):
    """Messages that cannot be sent to the model (wrong shape, unknown role, prompt too long)."""


# ---------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class GenerationSettings:
    """Sampling settings of one request. temperature 0 means greedy decoding."""

    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not (0.0 <= self.temperature <= 100.0):  # also rejects NaN
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> GenerationSettings:
        values = {"max_new_tokens": settings.max_new_tokens, "temperature": settings.temperature,
                  "top_p": settings.top_p, "seed": None}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


class Usage(TypedDict):
    # A TypedDict, not a dataclass: it is the OpenAI "usage" object and goes to JSON as is.
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def make_usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


@dataclass
class GenerationResult:
    text: str
    finish_reason: FinishReason
    usage: Usage
    adapter: str | None
    queue_wait_s: float
    first_token_s: float | None
    duration_s: float


# ---------------------------------------------------------------------------------------- interface
@runtime_checkable
class Backend(Protocol):
    model_name: str  # public name of the base model ("no adapter")

    def adapters(self) -> list[str]: ...
    def has_adapter(self, name: str) -> bool: ...
    def load_adapter(self, name: str, path: Path) -> None: ...
    def unload_adapter(self, name: str) -> None: ...
    def stream(self, messages: list[dict], adapter: str | None, gen: GenerationSettings,
               cancel: threading.Event | None = None) -> Generation: ...
    def generate(self, messages: list[dict], adapter: str | None, gen: GenerationSettings) -> GenerationResult: ...
    def count_tokens(self, messages: list[dict]) -> int: ...
    def busy(self) -> str | None: ...


class Generation:
    """An answer being generated: iterate for text pieces (never ""); close() to abandon it.

    After exhaustion: `usage`, `finish_reason` ("stop" | "length" | "cancelled"), `adapter`,
    `queue_wait_s`, `first_token_s`, `text`. Closing (or dropping) it before the end cancels the
    generation and frees the model for the next request. Also a context manager.
    """

    def __init__(self, adapter: str | None, queue_wait_s: float, prompt_tokens: int) -> None:
        self.adapter = adapter
        self.queue_wait_s = queue_wait_s
        self.prompt_tokens = prompt_tokens
        self.usage: Usage | None = None
        self.finish_reason: FinishReason | None = None
        self.first_token_s: float | None = None
        self.started = time.perf_counter()
        self.duration_s: float | None = None
        self._pieces: list[str] = []
        self._done = False

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    @property
    def done(self) -> bool:
        return self._done

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> str:
        if self._done:
            raise StopIteration
        try:
            piece = self._next_piece()
        except StopIteration:
            self._finish()
            raise
        except BaseException:
            self._done = True
            self._abort()
            raise
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.started
        self._pieces.append(piece)
        return piece

    def close(self) -> None:
        """Stop generating (if still running) and release the model. Safe to call more than once."""
        if self._done:
            return
        self._done = True
        self._abort()
        if self.finish_reason is None:
            self.finish_reason = "cancelled"
        if self.usage is None:
            self.usage = make_usage(self.prompt_tokens, self._tokens_so_far())
        self.duration_s = time.perf_counter() - self.started

    def __enter__(self) -> Generation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A client that disconnects may just drop the iterator: cancel so the model is freed.
        if getattr(self, "_done", True) is False:
            self.close()

    def result(self) -> GenerationResult:
        """Drain the remaining pieces and return the whole answer."""
        with self:
            for _ in self:
                pass
        assert self.finish_reason is not None and self.usage is not None
        return GenerationResult(text=self.text, finish_reason=self.finish_reason, usage=self.usage,
                                adapter=self.adapter, queue_wait_s=self.queue_wait_s,
                                first_token_s=self.first_token_s, duration_s=self.duration_s or 0.0)

    def _finish(self) -> None:
        self._done = True
        self.duration_s = time.perf_counter() - self.started

    # implemented by the backends
    def _next_piece(self) -> str:
        raise NotImplementedError

    def _abort(self) -> None:
        raise NotImplementedError

    def _tokens_so_far(self) -> int:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------- messages
def normalize_messages(messages: list[dict], system_prompt: str) -> list[dict[str, str]]:
    """Check roles and contents; prepend `system_prompt` when the first message is not a system one."""
    if not isinstance(messages, list) or not messages:
        raise InvalidMessages("messages must be a non-empty list of {'role', 'content'} dicts")
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InvalidMessages(f"messages[{i}] must be a dict with 'role' and 'content'")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise InvalidMessages(f"messages[{i}].role must be one of {ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise InvalidMessages(f"messages[{i}].content must be a string, got {type(content).__name__}")
        if role == "system" and i > 0:
            raise InvalidMessages(f"messages[{i}]: a system message may only come first")
        out.append({"role": role, "content": content})
    if out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": system_prompt})
    if len(out) < 2:
        raise InvalidMessages("messages hold only a system message; nothing to answer")
    return out


def check_adapter_name(name: str, base_name: str) -> None:
    if not isinstance(name, str) or not ADAPTER_NAME.match(name):
        raise ValueError(f"invalid adapter name {name!r}: use 1-128 of A-Z a-z 0-9 . _ : @ + / -")
    if name == base_name:
        raise ValueError(f"adapter name {name!r} is the base model's name")


# ---------------------------------------------------------------------------------------- the gate
class _Gate:
    """A FIFO lock for the model: holders may be released from another thread (the generation
    thread ends the hold), waiting requests are bounded, and maintenance (adapter load/unload) goes
    ahead of waiting requests."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy = False
        self._queue: deque[object] = deque()
        self._priority_waiting = 0

    @property
    def waiting(self) -> int:
        return len(self._queue) - self._priority_waiting

    def full(self, max_waiting: int | None) -> bool:
        """Whether `acquire` would refuse at once now."""
        with self._cond:
            return self._refuses(max_waiting)

    def _refuses(self, max_waiting: int | None) -> bool:  # under self._cond
        free = not self._busy and not self._queue
        return not free and max_waiting is not None and self.waiting >= max_waiting

    def acquire(self, timeout: float | None, max_waiting: int | None = None,
                abort: threading.Event | None = None, priority: bool = False) -> float | None:
        """Wait for the model. Returns the seconds waited, or None when `abort` was set meanwhile."""
        start = time.perf_counter()
        with self._cond:
            if not self._busy and not self._queue:
                self._busy = True
                return 0.0
            if self._refuses(max_waiting):
                raise BackendBusy(f"{self.waiting} requests are already waiting for the model (limit {max_waiting})")
            ticket = object()
            if priority:
                self._queue.insert(self._priority_waiting, ticket)
                self._priority_waiting += 1
            else:
                self._queue.append(ticket)
            deadline = None if timeout is None else start + timeout
            try:
                while self._busy or self._queue[0] is not ticket:
                    if abort is not None and abort.is_set():
                        return None
                    remaining = None if deadline is None else deadline - time.perf_counter()
                    if remaining is not None and remaining <= 0:
                        raise BackendBusy(f"waited {timeout:.1f} s for the model; try again later")
                    # Wake up now and then to notice `abort` (a client that went away while queued).
                    self._cond.wait(0.25 if remaining is None else min(remaining, 0.25))
                self._busy = True
                return time.perf_counter() - start
            finally:
                self._queue.remove(ticket)
                if priority:
                    self._priority_waiting -= 1
                self._cond.notify_all()

    def release(self) -> None:
        with self._cond:
            if not self._busy:
                raise RuntimeError("model gate released twice")
            self._busy = False
            self._cond.notify_all()

    @contextlib.contextmanager
    def held(self, priority: bool = False) -> Iterator[None]:
        self.acquire(timeout=None, priority=priority)
        try:
            yield
        finally:
            self.release()


# ---------------------------------------------------------------------------------------- transformers
class _StopOnEvent:
    """StoppingCriteria: stop every row once any of the events is set."""

    def __init__(self, *events: threading.Event) -> None:
        self.events = events
        self.fired = False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        import torch

        stop = any(e.is_set() for e in self.events)
        self.fired = self.fired or stop
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class _TransformersGeneration(Generation):
    def __init__(self, adapter: str | None, queue_wait_s: float, prompt_tokens: int, timeout_s: float) -> None:
        super().__init__(adapter, queue_wait_s, prompt_tokens)
        self.queue: queue.Queue = queue.Queue()
        self.closed = threading.Event()
        self.streamer: _PieceStreamer | None = None
        self._timeout_s = timeout_s

    def _next_piece(self) -> str:
        try:
            item = self.queue.get(timeout=self._timeout_s)
        except queue.Empty:
            raise GenerationError(f"the model produced nothing for {self._timeout_s:.0f} s") from None
        if isinstance(item, str):
            return item
        if isinstance(item, _Done):
            self.finish_reason = item.finish_reason
            self.usage = make_usage(self.prompt_tokens, item.completion_tokens)
            raise StopIteration
        assert isinstance(item, _Failed)
        raise GenerationError(f"generation failed: {type(item.error).__name__}: {item.error}") from item.error

    def _abort(self) -> None:
        self.closed.set()

    def _tokens_so_far(self) -> int:
        return len(self.streamer.tokens) if self.streamer is not None else 0


@dataclass
class _Adapter:
    internal: str  # the PEFT adapter name: changes on every load, so a replacement never clashes
    path: Path


class TransformersBackend:
    """The base model and its LoRA adapters in this process (see the module docstring)."""

    def __init__(self, model: Any, tokenizer: Any, settings: Settings, model_name: str | None = None,
                 worker: ThreadPoolExecutor | None = None, slots: SlotSpec | None = None) -> None:
        self.model_name = model_name or settings.served_model_name
        self.settings = settings
        self.tokenizer = tokenizer
        self.device = model.device
        self._base = model
        self._peft: Any = None  # the PeftModel wrapper once an adapter is loaded
        self._adapters: dict[str, _Adapter] = {}
        self._active: str | None = None  # internal name last set with set_adapter
        self._gate = _Gate()
        # One long-lived generation thread. A new thread per request made CUDA decoding 3x slower
        # (H100, SmolLM2-135M shape: 16 tok/s vs 44 in a persistent thread, 38-50 in the main
        # thread), presumably because per-thread GPU library state starts cold in every new thread.
        # Executor threads are joined at interpreter exit, not killed: a daemon thread killed while
        # it frees tensors aborts the process ("terminate called without an active exception").
        # On CPU the same thread also does every other parallel torch op on the model (loading it,
        # adapters): each thread that runs one gets its own OpenMP team, and once there are more
        # team threads than cores libgomp stops spin-waiting between regions. On 2 cores with 2
        # threads that took decoding from 44-50 to 33 tok/s for good (bench/chat_latency.py).
        self._worker = worker or ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self._ids = itertools.count()
        self._meta_lock = threading.Lock()  # guards _adapters between the gate and readers
        self.context_length: int | None = getattr(model.config, "max_position_embeddings", None)
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)  # a chat template's end-of-turn token ends the answer
        self._eos_ids = sorted(eos_ids)
        # serving=batched: every generation goes through the batch engine on the generation thread;
        # the state below is only touched there (resolve/release/route, adapter commands).
        # On CUDA the decode step runs in a static slot cache as a CUDA graph (`cuda_graphs`), and joining
        # prompts are prefilled in shape buckets, each one captured graph (`SlotSpec.bucketed_prefill`); `slots`
        # forces that path elsewhere (tests: on CPU, eagerly, with a small cache).
        if slots is None and self.device.type == "cuda" and settings.cuda_graphs:
            slots = SlotSpec(max_len=self.context_length or 4096, compile=True, bucketed_prefill=True)
        self._engine = BatchEngine(self, self._worker, settings.batch_max, self._eos_ids, slots=slots) \
            if settings.serving == "batched" else None
        self._model_version = 0  # changes whenever the model's modules do (an adapter loaded or deleted)
        self._compiled_for: tuple[Any, Any] = (None, None)  # (model, version) and its torch.compile wrapper
        self._refs: dict[str, int] = {}  # internal adapter name -> requests in the batch using it
        self._retired: dict[str, list[threading.Event]] = {}  # unloaded/replaced, deleted at 0 refs
        self._lora_on: bool | None = None  # LoRA layers enabled (None: unknown after a load or delete)
        self._gather: GatheredLora | None = None  # mixed-adapter batches, while adapters are loaded

    @classmethod
    def from_settings(cls, settings: Settings, progress: bool = True, slots: SlotSpec | None = None
                      ) -> TransformersBackend:
        from assistant.models import load_model, prepare_model

        worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        # on the generation thread (see __init__), conversion included
        loaded = worker.submit(lambda: load_model(settings, prepare_model(settings, progress=progress))).result()
        return cls(loaded.model, loaded.tokenizer, settings, worker=worker, slots=slots)

    def close(self) -> None:
        """Stop the generation thread after the generation in flight (if any). Optional: it also
        stops at interpreter exit."""
        self._worker.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ adapters
    @property
    def queue_depth(self) -> int:
        return self._engine.waiting if self._engine is not None else self._gate.waiting

    def busy(self) -> str | None:
        """Why a request would be refused at once now (the queue is full), else None. A cheap look that
        callers take before doing a request's own work (retrieval, the prompt), so that a refusal costs
        nothing; `stream` still decides for itself."""
        limit = self.settings.queue_max
        full = self._engine.full(limit) if self._engine is not None else self._gate.full(limit)
        return f"{self.queue_depth} requests are already waiting for the model (limit {limit})" if full else None

    def adapters(self) -> list[str]:
        with self._meta_lock:
            return sorted(self._adapters)

    def has_adapter(self, name: str) -> bool:
        with self._meta_lock:
            return name in self._adapters

    def load_adapter(self, name: str, path: Path) -> None:
        """Load a PEFT LoRA folder as `name`, beside the others. A failure leaves everything as it was."""
        check_adapter_name(name, self.model_name)
        path = Path(path)
        config = self._check_adapter_files(path)
        internal = f"a{next(self._ids)}"
        if self._engine is not None:
            self._engine.call(self._inject, internal, path, config)
            self._engine.call(self._swap_in, name, internal, path)
            return
        with self._gate.held(priority=True):
            self._on_generation_thread(self._inject, internal, path, config)
            with self._meta_lock:
                old = self._adapters.get(name)
                self._adapters[name] = _Adapter(internal, path)
            if old is not None:
                self._on_generation_thread(self._delete_internal, old.internal)

    def unload_adapter(self, name: str) -> None:
        if not self.has_adapter(name):  # fail fast, without waiting for the model
            raise UnknownAdapter(f"adapter {name!r} is not loaded")
        if self._engine is not None:
            self._engine.call(self._swap_in, name, None, None).wait()  # until its last request has finished
            return
        with self._gate.held(priority=True):
            with self._meta_lock:
                entry = self._adapters.pop(name, None)
            if entry is None:
                raise UnknownAdapter(f"adapter {name!r} is not loaded")
            self._on_generation_thread(self._delete_internal, entry.internal)

    def _on_generation_thread(self, fn: Any, *args: Any) -> Any:
        """Run `fn` on the generation thread and wait: model-wide torch work stays on one thread (see __init__)."""
        if self._engine is not None:
            return self._engine.call(fn, *args)
        return self._worker.submit(fn, *args).result()

    # -------------------------------------------------- batched serving: called on the engine thread
    def _swap_in(self, name: str, internal: str | None, path: Path | None) -> threading.Event:
        """Point `name` at `internal` (None: unload it). The version it pointed at before is deleted once
        its last request in the batch has finished; the returned event is set then."""
        gone = threading.Event()
        with self._meta_lock:
            old = self._adapters.pop(name, None)
            if internal is not None:
                self._adapters[name] = _Adapter(internal, path or Path())
        if old is None:
            if internal is None:
                raise UnknownAdapter(f"adapter {name!r} is not loaded")
            gone.set()
            return gone
        self._retired.setdefault(old.internal, []).append(gone)
        self.release_adapter(old.internal, hold=False)
        return gone

    def resolve_adapter(self, name: str | None) -> str | None:
        """The internal name serving `name` now, held until `release_adapter` (the request's whole life)."""
        if name is None:
            return None
        with self._meta_lock:
            entry = self._adapters.get(name)
        if entry is None:
            raise UnknownAdapter(f"adapter {name!r} was unloaded while the request waited")
        self._refs[entry.internal] = self._refs.get(entry.internal, 0) + 1
        return entry.internal

    def release_adapter(self, internal: str | None, hold: bool = True) -> None:
        if internal is None:
            return
        if hold:
            self._refs[internal] -= 1
        if self._refs.get(internal, 0) <= 0 and internal in self._retired:
            self._refs.pop(internal, None)
            self._delete_internal(internal)
            self._lora_on, self._active = None, None
            for e in self._retired.pop(internal):
                e.set()

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self._base.config)

    def new_static_cache(self, batch: int, length: int) -> Any:
        from transformers import StaticCache

        config = self._base.config.get_text_config(decoder=True)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        cache = StaticCache(config=config, max_cache_len=length)
        cache.early_initialization(batch, config.num_key_value_heads, head_dim, self._base.dtype, self.device)
        return cache

    def slot_route(self, internals: list[str | None], rows: Any, compiled: bool = False
                   ) -> tuple[Any, dict[str, Any], list[int] | None, Any]:
        """For the slot cache's step (every slot; None: base model or idle): (forward, kwargs, each row's
        LoRA slot, key). With any adapter in the batch the forward reads the LoRA slots from `rows` at
        every call: every row goes through the gathered LoRA path (slot 0: the base model, PEFT's own
        LoRA off), so one captured graph serves any mix; a batch of base rows only runs without LoRA
        work. `key` names the forward: it changes with every adapter load or delete. `compiled`: the
        model through `torch.compile` (one per key). A mix only PEFT's `adapter_names` can serve gives
        (model, kwargs, None, None): run eagerly."""
        lora = [0] * len(internals)
        if self._peft is None:
            return self._compiled(self._base, compiled), {}, lora, ("base", self._model_version, compiled)
        if all(i is None for i in internals):
            self._set_lora(False)
            return self._compiled(self._peft, compiled), {}, lora, ("base", self._model_version, compiled)
        if self._gather is not None and self._gather.supports(internals):
            self._set_lora(False)
            lora = self._gather.slots_for(internals)
            forward = self._gather.forward_with(rows, self._compiled(self._peft, compiled))
            return forward, {}, lora, ("gathered", self._model_version, compiled)
        model, kwargs = self.route(internals)
        return model, kwargs, None, None

    def _compiled(self, model: Any, on: bool) -> Any:
        if not on:
            return model
        import torch

        key = (id(model), self._model_version)
        if self._compiled_for[0] != key:
            self._compiled_for = (key, torch.compile(model, dynamic=False))
        return self._compiled_for[1]

    def route(self, internals: list[str | None]) -> tuple[Any, dict[str, Any]]:
        """The model and forward arguments for a batch whose rows use `internals` (None: base model).
        One adapter for all rows: made active (no per-row routing cost); a mix: one gathered LoRA matmul
        per layer (`assistant/lora_gather.py`), or PEFT's `adapter_names` for adapters it can't serve."""
        if self._peft is None:
            return self._base, {}
        kinds = set(internals)
        if kinds == {None}:
            self._set_lora(False)
            return self._peft, {}
        self._set_lora(True)
        if len(kinds) == 1:
            only = internals[0]
            if self._active != only:
                self._peft.set_adapter(only, inference_mode=True)
                self._active = only
            return self._peft, {}
        if self._gather is not None and self._gather.supports(internals):
            self._set_lora(False)  # the gathered hooks add every row's own LoRA to the base layers
            return self._gather.forward_for(internals), {}
        return self._peft, {"adapter_names": [i if i is not None else "__base__" for i in internals]}

    def _set_lora(self, on: bool) -> None:
        if self._lora_on is not on:
            layers = self._peft.base_model
            layers.enable_adapter_layers() if on else layers.disable_adapter_layers()
            self._lora_on = on

    def _check_adapter_files(self, path: Path) -> Any:
        # Read and check everything before taking the model, so a bad folder fails fast and never
        # touches the model that is serving.
        from peft import PeftConfig
        from peft.utils import load_peft_weights

        if not path.is_dir():
            raise AdapterLoadError(f"adapter folder {path} does not exist")
        try:
            config = PeftConfig.from_pretrained(path)
            weights = load_peft_weights(str(path), device="cpu")
        except Exception as e:  # peft/safetensors raise ValueError, OSError, SafetensorError...
            raise AdapterLoadError(f"cannot read adapter {path}: {type(e).__name__}: {e}") from e
        if getattr(config, "peft_type", None) is None or config.is_prompt_learning:
            raise AdapterLoadError(f"adapter {path} is not a LoRA-style adapter ({config.peft_type})")
        if not weights:
            raise AdapterLoadError(f"adapter {path} holds no weights")
        def nonfinite() -> list[str]:
            return [k for k, t in weights.items() if t.is_floating_point() and not bool(t.isfinite().all())]

        bad = self._on_generation_thread(nonfinite)  # a parallel torch op
        if bad:  # a diverged training run; on CUDA it would kill the process's GPU context when sampling
            raise AdapterLoadError(f"adapter {path} has NaN/Inf weights ({len(bad)} tensors, e.g. {bad[0]})")
        config.inference_mode = True
        return config

    def _inject(self, internal: str, path: Path, config: Any) -> None:
        from peft import get_peft_model

        first = self._peft is None
        self._model_version += 1
        try:
            if first:
                self._peft = get_peft_model(self._base, config, adapter_name=internal)
                self._active = internal
                self._gather = GatheredLora(self._peft)
            self._gather.invalidate()
            result = self._peft.load_adapter(str(path), adapter_name=internal, is_trainable=False,
                                             torch_device=str(self.device))
            missing = [k for k in result.missing_keys if internal in k]
            if missing or result.unexpected_keys:
                raise AdapterLoadError(
                    f"adapter {path} does not fit this base model: {len(missing)} missing and "
                    f"{len(result.unexpected_keys)} unexpected weights (e.g. {(missing or result.unexpected_keys)[0]})")
            self._peft.eval()
            self._lora_on = None
        except Exception as e:
            self._delete_internal(internal)
            if isinstance(e, AdapterLoadError):
                raise
            raise AdapterLoadError(f"cannot load adapter {path}: {type(e).__name__}: {e}") from e

    def _delete_internal(self, internal: str) -> None:
        """Remove one PEFT adapter; the last one takes the LoRA layers with it (PEFT cannot run empty)."""
        if self._peft is None or internal not in self._peft.peft_config:
            return
        self._model_version += 1
        if self._gather is not None:
            self._gather.invalidate()
        if len(self._peft.peft_config) == 1:
            if self._gather is not None:
                self._gather.close()
                self._gather = None
            self._base = self._peft.unload()
            self._peft = None
            self._active = None
            return
        if internal in self._peft.active_adapters:
            # Switch away first; deleting the active adapter makes PEFT pick one itself, with a warning.
            other = next(n for n in self._peft.peft_config if n != internal)
            self._peft.set_adapter(other, inference_mode=True)
            self._active = other
        self._peft.delete_adapter(internal)

    # ------------------------------------------------------------------ generation
    def count_tokens(self, messages: list[dict]) -> int:
        return len(self._encode(normalize_messages(messages, self.settings.system_prompt))["input_ids"][0])

    def _encode(self, messages: list[dict[str, str]]) -> Any:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                                  return_tensors="pt")

    def _is_base(self, adapter: str | None) -> bool:
        return adapter is None or adapter == self.model_name

    def stream(self, messages: list[dict], adapter: str | None, gen: GenerationSettings,
               cancel: threading.Event | None = None) -> Generation:
        """Wait for the model (BackendBusy when the queue is full or the wait too long), then start.

        Returns once this request holds the model; pieces arrive by iterating the Generation.
        """
        if not self._is_base(adapter) and not self.has_adapter(adapter):  # type: ignore[arg-type]
            raise UnknownAdapter(f"adapter {adapter!r} is not loaded; loaded: {self.adapters()}")
        enc = self._encode(normalize_messages(messages, self.settings.system_prompt))
        prompt_tokens = int(enc["input_ids"].shape[1])
        max_new = gen.max_new_tokens
        if self.context_length is not None:
            if prompt_tokens >= self.context_length:
                raise InvalidMessages(f"the prompt has {prompt_tokens} tokens; the model's context holds "
                                      f"{self.context_length}")
            max_new = min(max_new, self.context_length - prompt_tokens)
        cancel = cancel or threading.Event()
        if self._engine is not None:
            return self._stream_batched(enc["input_ids"][0].tolist(), adapter, gen, max_new, cancel)
        wait = self._gate.acquire(self.settings.queue_timeout_s, max_waiting=self.settings.queue_max,
                                  abort=cancel)
        name = None if self._is_base(adapter) else adapter
        generation = _TransformersGeneration(name, wait or 0.0, prompt_tokens, self.settings.generation_timeout_s)
        if wait is None:  # cancelled while queued: the gate was not taken
            generation.queue.put(_Done(0, "cancelled"))
            return generation
        try:
            model, base_only = self._take(name)
            streamer = _PieceStreamer(self.tokenizer, generation.queue, self.settings.stream_interval_ms / 1000)
            generation.streamer = streamer
            stop = _StopOnEvent(cancel, generation.closed)
            kwargs = self._generate_kwargs(enc, gen, max_new, streamer, stop)
            self._worker.submit(self._run, model, base_only, kwargs, gen.seed,
                                streamer, stop, max_new, generation.queue)
        except BaseException:
            self._gate.release()
            raise
        return generation

    def _stream_batched(self, prompt: list[int], adapter: str | None, gen: GenerationSettings, max_new: int,
                        cancel: threading.Event) -> Generation:
        """Queue the request for the batch engine and wait until it joins the batch (or is refused)."""
        assert self._engine is not None
        name = None if self._is_base(adapter) else adapter
        generation = _TransformersGeneration(name, 0.0, len(prompt), self.settings.generation_timeout_s)
        streamer = _PieceStreamer(self.tokenizer, generation.queue, self.settings.stream_interval_ms / 1000)
        generation.streamer = streamer
        req = BatchRequest(prompt=prompt, adapter=name, max_new=max_new, temperature=gen.temperature,
                           top_p=gen.top_p, seed=gen.seed, stops=(cancel, generation.closed), streamer=streamer,
                           out=generation.queue)
        limit = self.settings.queue_max
        if not self._engine.submit(req, limit):
            raise BackendBusy(f"{self._engine.waiting} requests are already waiting for the model (limit {limit})")
        deadline = req.submitted + self.settings.queue_timeout_s
        while not req.admitted.wait(min(0.25, max(deadline - time.perf_counter(), 0.0))):
            # Wake up now and then to notice a client that went away while queued.
            gave_up = cancel.is_set() or time.perf_counter() >= deadline
            if gave_up and self._engine.withdraw(req):
                if cancel.is_set():
                    generation.queue.put(_Done(0, "cancelled"))
                    return generation
                raise BackendBusy(f"waited {self.settings.queue_timeout_s:.1f} s for the model; try again later")
        if req.error is not None:
            raise req.error
        generation.queue_wait_s = req.queue_wait_s
        generation.started = time.perf_counter()  # first_token_s counts from joining the batch, as when sequential
        return generation

    def generate(self, messages: list[dict], adapter: str | None, gen: GenerationSettings) -> GenerationResult:
        return self.stream(messages, adapter, gen).result()

    def generate_batch(self, conversations: list[list[dict]], adapter: str | None,
                       gen: GenerationSettings) -> list[GenerationResult]:
        """Greedy answers to several conversations in one left-padded `generate` call, for offline work
        (the anchored replay). It waits for the model like a request, holds it for the whole batch and
        streams nothing; keep batches small so that users' requests still get turns."""
        import torch

        if not gen.greedy:
            raise ValueError("generate_batch decodes greedily (temperature 0)")
        if not self._is_base(adapter) and not self.has_adapter(adapter):  # type: ignore[arg-type]
            raise UnknownAdapter(f"adapter {adapter!r} is not loaded; loaded: {self.adapters()}")
        if not conversations:
            return []
        prompts = [self._encode(normalize_messages(m, self.settings.system_prompt))["input_ids"][0].tolist()
                   for m in conversations]
        longest = max(len(p) for p in prompts)
        if self.context_length is not None and longest + gen.max_new_tokens > self.context_length:
            raise InvalidMessages(f"a prompt of {longest} tokens and {gen.max_new_tokens} new ones do not fit "
                                  f"the model's context of {self.context_length}")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self._eos_ids)
        ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every row's next token comes at the same column
            ids[i, longest - len(p):] = torch.tensor(p)
            mask[i, longest - len(p):] = 1
        if self._engine is not None:  # the conversations join the running batch like users' requests
            streams = [self.stream(m, adapter, gen) for m in conversations]
            return [g.result() for g in streams]
        started = time.perf_counter()
        wait = self._gate.acquire(self.settings.queue_timeout_s, max_waiting=self.settings.queue_max)
        try:
            model, base_only = self._take(None if self._is_base(adapter) else adapter)
            kwargs = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device),
                      "max_new_tokens": gen.max_new_tokens, "eos_token_id": self._eos_ids, "pad_token_id": pad,
                      "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
            out = self._worker.submit(self._run_batch, model, base_only, kwargs).result()
        finally:
            self._gate.release()
        duration = time.perf_counter() - started
        results = []
        for i, p in enumerate(prompts):
            new = out[i, longest:].tolist()
            end = next((j for j, t in enumerate(new) if t in self._eos_ids), None)
            tokens = new if end is None else new[:end + 1]
            results.append(GenerationResult(
                text=clean_text(self.tokenizer, tokens, final=True) or "",
                finish_reason="length" if end is None else "stop", usage=make_usage(len(p), len(tokens)),
                adapter=None if self._is_base(adapter) else adapter, queue_wait_s=wait or 0.0,
                first_token_s=None, duration_s=duration))
        return results

    @staticmethod
    def _run_batch(model: Any, base_only: bool, kwargs: dict[str, Any]) -> Any:
        import torch

        with torch.inference_mode(), model.disable_adapter() if base_only else contextlib.nullcontext():
            return model.generate(**kwargs).cpu()

    def _take(self, name: str | None) -> tuple[Any, bool]:
        """With the gate held: the model to run with adapter `name` active (None: the base model), and
        whether the loaded adapters must be switched off for it."""
        with self._meta_lock:
            entry = self._adapters.get(name) if name is not None else None
        if name is not None and entry is None:  # unloaded while this request waited
            raise UnknownAdapter(f"adapter {name!r} was unloaded while the request waited")
        return self._select(entry), entry is None and self._peft is not None

    def _select(self, entry: _Adapter | None) -> Any:
        """Make `entry` the active adapter (called with the gate held). Returns the model to run."""
        if self._peft is None:
            return self._base
        if entry is not None and self._active != entry.internal:
            # inference_mode=True: otherwise set_adapter marks the LoRA weights trainable (requires_grad)
            self._peft.set_adapter(entry.internal, inference_mode=True)
            self._active = entry.internal
        return self._peft

    def _generate_kwargs(self, enc: Any, gen: GenerationSettings, max_new: int, streamer: _PieceStreamer,
                         stop: _StopOnEvent) -> dict[str, Any]:
        from transformers import StoppingCriteriaList

        kwargs: dict[str, Any] = {
            "input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device),
            "max_new_tokens": max_new, "streamer": streamer, "stopping_criteria": StoppingCriteriaList([stop]),
            "eos_token_id": self._eos_ids, "pad_token_id": self.tokenizer.pad_token_id,
        }
        if gen.greedy:
            # Explicit None, so that sampling defaults in a model's generation_config cannot apply.
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=gen.temperature, top_p=gen.top_p, top_k=None)
            if self.device.type == "cuda":
                # NaN/Inf logits make CUDA's multinomial hit a device-side assert, which poisons the
                # GPU context of the whole server (seen on an H100). Scrubbing them turns that into
                # a bad answer for one request. The CPU raises a clean error instead (GenerationError).
                kwargs["remove_invalid_values"] = True
        return kwargs

    def _run(self, model: Any, base_only: bool, kwargs: dict[str, Any], seed: int | None,
             streamer: _PieceStreamer, stop: _StopOnEvent, max_new: int, out: queue.Queue) -> None:
        # Runs in the generation thread and owns the gate until it ends. It must not refer to the
        # Generation object, so that a consumer dropping it gets it collected (and thereby cancelled).
        import torch

        outcome: _Done | _Failed
        try:
            if seed is not None:
                torch.manual_seed(seed)  # global RNG, but only one generation runs at a time
            # inference_mode, not only generate()'s no_grad: no version counters or autograd checks
            # on every small op, 3 % faster decoding on CPU for SmolLM2-135M (CHANGELOG.md, 2026-11-22).
            with torch.inference_mode(), model.disable_adapter() if base_only else contextlib.nullcontext():
                model.generate(**kwargs)
            n = len(streamer.tokens)
            reason: FinishReason
            if stop.fired:
                reason = "cancelled"
            elif n and streamer.tokens[-1] in self._eos_ids:
                reason = "stop"
            elif n >= max_new:
                reason = "length"
            else:
                reason = "stop"
            outcome = _Done(n, reason)
        except BaseException as e:  # forwarded to the consumer, which would otherwise wait forever
            outcome = _Failed(e)
        finally:
            self._gate.release()
        out.put(outcome)


# ---------------------------------------------------------------------------------------- openai
class _OpenAIGeneration(Generation):
    def __init__(self, response: Any, adapter: str | None, prompt_tokens: int,
                 cancel: threading.Event) -> None:
        super().__init__(adapter, 0.0, prompt_tokens)
        self._response = response
        self._chunks = iter(response)
        self._cancel = cancel
        self._completion_tokens = 0
        self._reason: str | None = None

    def _next_piece(self) -> str:
        import openai

        while True:
            if self._cancel.is_set():
                self._response.close()
                self.finish_reason = "cancelled"
                self.usage = make_usage(self.prompt_tokens, self._completion_tokens)
                raise StopIteration
            try:
                chunk = next(self._chunks)
            except StopIteration:
                self.finish_reason = "length" if self._reason == "length" else "stop"
                if self.usage is None:
                    self.usage = make_usage(self.prompt_tokens, self._completion_tokens)
                raise
            except (openai.APIError, OSError) as e:
                raise GenerationError(f"the inference server failed mid-stream: {e}") from e
            if getattr(chunk, "usage", None):
                self.prompt_tokens = chunk.usage.prompt_tokens
                self._completion_tokens = chunk.usage.completion_tokens
                self.usage = make_usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            self._reason = choice.finish_reason or self._reason
            if choice.delta and choice.delta.content:
                if self.usage is None:
                    self._completion_tokens += 1  # estimate until the server reports usage
                return choice.delta.content

    def _abort(self) -> None:
        self._cancel.set()
        self._response.close()

    def _tokens_so_far(self) -> int:
        return self._completion_tokens


class OpenAIBackend:
    """An OpenAI-compatible inference server. Adapters are the server's model names.

    Uses the official `openai` client for chat, and vLLM's extra endpoints where the server has
    them: `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter` (vLLM needs
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True) and `POST /tokenize`. The server does its own queueing,
    so `queue_depth` is 0 and a 429/503 answer becomes `BackendBusy`.
    """

    queue_depth = 0

    def busy(self) -> str | None:
        return None  # the server answers 429/503 itself

    def __init__(self, settings: Settings, client: Any = None) -> None:
        import openai

        if not settings.openai_base_url and client is None:
            raise ValueError("backend 'openai' needs openai_base_url (e.g. http://127.0.0.1:8001/v1)")
        self.settings = settings
        self.client = client or openai.OpenAI(base_url=settings.openai_base_url, api_key=settings.openai_api_key,
                                              timeout=settings.generation_timeout_s, max_retries=0)
        embedded = settings.model.startswith("embedded:")
        # vLLM serves a hub model under its full id unless --served-model-name says otherwise.
        self.model_name = settings.model_name or (settings.served_model_name if embedded else settings.model)

    def check(self) -> None:
        """Fail early, with the names the server offers, when it does not serve our base model."""
        ids = [m.id for m in self._models()]
        if self.model_name not in ids:
            raise BackendError(f"the server at {self.client.base_url} does not serve {self.model_name!r}; it "
                               f"serves {ids}. Set model_name to the server's base model name.")

    def _models(self) -> list[Any]:
        import openai

        try:
            return list(self.client.models.list())
        except openai.APIError as e:
            raise BackendError(f"cannot list models at {self.client.base_url}: {e}") from e

    def adapters(self) -> list[str]:
        out = []
        for m in self._models():
            extra = m.model_extra or {}
            if m.id == self.model_name:
                continue
            # vLLM marks LoRA modules with `parent`; this product's API with `adapter` (its alias
            # "assistant" points at another adapter's name, so it is not one itself).
            if "parent" in extra or "adapter" in extra:
                if extra.get("parent") or extra.get("adapter") == m.id:
                    out.append(m.id)
            else:
                out.append(m.id)
        return sorted(out)

    def has_adapter(self, name: str) -> bool:
        return name in self.adapters()

    def load_adapter(self, name: str, path: Path) -> None:
        import httpx
        import openai

        check_adapter_name(name, self.model_name)
        if self.has_adapter(name):
            # The server cannot swap weights under a name atomically: load under a new name instead.
            raise AdapterLoadError(f"the server already serves {name!r}; load the new version under a new name")
        try:
            self.client.post("/load_lora_adapter", body={"lora_name": name, "lora_path": str(path)},
                             cast_to=httpx.Response)
        except openai.APIError as e:
            raise AdapterLoadError(f"the server refused adapter {name!r} from {path}: {e}") from e

    def unload_adapter(self, name: str) -> None:
        import httpx
        import openai

        if not self.has_adapter(name):
            raise UnknownAdapter(f"adapter {name!r} is not served")
        try:
            self.client.post("/unload_lora_adapter", body={"lora_name": name}, cast_to=httpx.Response)
        except openai.APIError as e:
            raise BackendError(f"the server could not unload {name!r}: {e}") from e

    def count_tokens(self, messages: list[dict]) -> int:
        import httpx

        msgs = normalize_messages(messages, self.settings.system_prompt)
        root = str(self.client.base_url).rstrip("/").removesuffix("/v1")
        try:
            r = httpx.post(root + "/tokenize", json={"model": self.model_name, "messages": msgs,
                                                     "add_generation_prompt": True},
                           headers={"Authorization": f"Bearer {self.client.api_key}"}, timeout=30)
            r.raise_for_status()
            return int(r.json()["count"])
        except (httpx.HTTPError, KeyError, ValueError) as e:
            raise BackendError(f"the server at {root} cannot count tokens (vLLM's POST /tokenize): {e}") from e

    def stream(self, messages: list[dict], adapter: str | None, gen: GenerationSettings,
               cancel: threading.Event | None = None) -> Generation:
        import openai

        msgs = normalize_messages(messages, self.settings.system_prompt)
        base = adapter is None or adapter == self.model_name
        if not base and not self.has_adapter(adapter):  # type: ignore[arg-type]
            raise UnknownAdapter(f"adapter {adapter!r} is not served by {self.client.base_url}")
        kwargs: dict[str, Any] = {}
        if gen.seed is not None:
            kwargs["seed"] = gen.seed
        try:
            response = self.client.chat.completions.create(
                model=self.model_name if base else adapter, messages=msgs, stream=True,
                stream_options={"include_usage": True}, max_tokens=gen.max_new_tokens,
                temperature=gen.temperature, top_p=gen.top_p, **kwargs)
        except openai.APIStatusError as e:
            if e.status_code in (429, 503):
                raise BackendBusy(f"the inference server is busy: {e}") from e
            if e.status_code == 404:
                raise UnknownAdapter(f"the server does not serve {adapter!r}: {e}") from e
            raise GenerationError(f"the inference server refused the request: {e}") from e
        except openai.APIError as e:
            raise GenerationError(f"cannot reach the inference server: {e}") from e
        return _OpenAIGeneration(response, None if base else adapter, 0, cancel or threading.Event())

    def generate(self, messages: list[dict], adapter: str | None, gen: GenerationSettings) -> GenerationResult:
        return self.stream(messages, adapter, gen).result()


def generate_many(backend: Backend, conversations: list[list[dict]], adapter: str | None, gen: GenerationSettings,
                  *, batch_size: int = 8, progress: Callable[[int, int], None] | None = None) -> list[GenerationResult]:
    """Greedy answers to many conversations: `batch_size` at a time where the backend batches
    (`TransformersBackend.generate_batch`), else one request each. Batches go shortest prompt first, so
    that little of each batch is padding (a remote server is asked in the given order, without counting
    tokens: not every server has a tokenize endpoint); the answers come back in the order asked."""
    batched = getattr(backend, "generate_batch", None)
    order = list(range(len(conversations)))
    if batched is not None:
        order.sort(key=lambda i: backend.count_tokens(conversations[i]))
    out: list[GenerationResult | None] = [None] * len(conversations)
    step = batch_size if batched is not None else 1
    for start in range(0, len(order), step):
        idx = order[start:start + step]
        got = batched([conversations[i] for i in idx], adapter, gen) if batched is not None \
            else [backend.generate(conversations[idx[0]], adapter, gen)]
        for i, r in zip(idx, got, strict=True):
            out[i] = r
        if progress:
            progress(min(start + step, len(order)), len(order))
    return [r for r in out if r is not None]


# ---------------------------------------------------------------------------------------- factory
def apply_threads(settings: Settings) -> None:
    if settings.torch_threads is not None:
        import torch

        torch.set_num_threads(settings.torch_threads)


def make_backend(settings: Settings, progress: bool = True) -> Backend:
    """Start-up: prepare and load the model (transformers) or connect to the server (openai)."""
    if settings.backend == "openai":
        backend = OpenAIBackend(settings)
        backend.check()
        return backend
    apply_threads(settings)
    return TransformersBackend.from_settings(settings, progress=progress)


__all__ = [
    "AdapterLoadError", "Backend", "BackendBusy", "BackendError", "Generation", "GenerationError",
    "GenerationResult", "GenerationSettings", "InvalidMessages", "OpenAIBackend", "TransformersBackend",
    "UnknownAdapter", "Usage", "make_backend", "make_usage", "normalize_messages",
]
