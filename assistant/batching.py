"""Continuous batching for the in-process backend: many requests, each with its own adapter, decoded together.

In: `BatchRequest`s (a tokenized prompt, an adapter name or None, sampling settings, stop events, an
output queue). Out: text pieces, then `Done` or `Failed`, on each request's queue.

Why hand-written: transformers' own continuous batching (`generate_batch`, paged attention) ignores
PEFT's per-row `adapter_names`, and PEFT's mixed-adapter batches only exist for a static batch
. What is written here is only the bookkeeping between the two: one decode step at
a time for every running request, with a left-padded `DynamicCache`:

- A request that arrives while others decode is prefilled alone (its own adapter, its own cache) and
  its cache is merged into the running batch before the next step (left padding, positions per row).
- Each step is one forward pass of the whole batch. Rows on one adapter run with that adapter active;
  rows on different adapters (or the base model, "__base__") go through PEFT's `adapter_names`.
- Every row samples with its own `torch.Generator`, so a seeded request draws the same random numbers
  whatever its neighbours are; greedy rows take the argmax.
- A finished or cancelled row leaves the batch at once; columns that are padding for every remaining
  row are cut off.

All model work (prefill, decode, adapter loads and deletes) runs in `BatchEngine`'s loop on the
backend's one generation thread: adapter changes run between two steps, never during one.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    import torch

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass
class Done:
    completion_tokens: int
    finish_reason: FinishReason


@dataclass
class Failed:
    error: BaseException


def clean_text(tokenizer: Any, tokens: list[int], final: bool) -> str | None:
    """The completion's text, or None while it ends in an incomplete UTF-8 sequence.

    Byte-level tokenizers split one Korean syllable or emoji over several tokens; decoding a cut
    sequence gives U+FFFD. While streaming, such text waits for the next token; at the end (an
    answer cut at max_tokens, or cancelled) the incomplete character is dropped, so no stored or
    streamed answer ends in a broken character.
    """
    text = tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    if not text.endswith("\ufffd"):
        return text
    if not final:
        return None
    # Drop whole trailing tokens until the text decodes cleanly: only bytes of the cut character go.
    for cut in range(1, min(len(tokens), 4) + 1):
        shorter = tokenizer.decode(tokens[:-cut], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if not shorter.endswith("\ufffd"):
            return shorter
    return text.rstrip("\ufffd")


class PieceStreamer:
    """Turns tokens into text pieces as soon as they decode cleanly (see `clean_text`).

    It decodes the whole completion each time and sends what is new, so the first piece leaves right
    after the first token instead of at the first word boundary. After that, text leaves at most
    every `interval_s` (what came in between goes as one piece): each piece wakes the consumer, the
    event loop and the client, and on a small CPU their work per piece takes cores and the GIL from
    the generation itself (docs/benchmarks.md, "Chat latency").

    Also a transformers streamer (`put`/`end`) for the one-at-a-time path's `generate`.
    """

    def __init__(self, tokenizer: Any, out: queue.Queue, interval_s: float = 0.0) -> None:
        self.tokenizer = tokenizer
        self.out = out
        self.interval_s = interval_s
        self.tokens: list[int] = []
        self.sent = 0
        self.last_sent = 0.0
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.add(token)

    def add(self, token: int) -> None:
        self.tokens.append(token)
        if self.sent and time.perf_counter() - self.last_sent < self.interval_s:
            return
        self._emit(final=False)

    def end(self) -> None:
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        text = clean_text(self.tokenizer, self.tokens, final)
        if text is not None and len(text) > self.sent:
            self.out.put(text[self.sent:])
            self.sent = len(text)
            self.last_sent = time.perf_counter()


@dataclass(eq=False)
class BatchRequest:
    """One request for the engine. Holds no reference to the consumer's Generation object, so a
    consumer that drops it gets it collected (and thereby cancelled through `stops`)."""

    prompt: list[int]
    adapter: str | None  # public name; resolved to PEFT's internal name when admitted
    max_new: int
    temperature: float
    top_p: float
    seed: int | None
    stops: tuple[threading.Event, ...]
    streamer: PieceStreamer
    out: queue.Queue
    submitted: float = field(default_factory=time.perf_counter)
    admitted: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None  # set instead of admission (e.g. the adapter is gone)
    queue_wait_s: float = 0.0
    # engine state
    internal: str | None = None
    length: int = 0  # tokens of this row in the cache
    last: int = 0  # the token to feed next
    generator: Any = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def stopped(self) -> bool:
        return any(e.is_set() for e in self.stops)


class ModelHost(Protocol):
    """What the engine needs from the backend (`TransformersBackend`), all called on the engine thread."""

    device: Any

    def resolve_adapter(self, name: str | None) -> str | None: ...
    def release_adapter(self, internal: str | None) -> None: ...
    def route(self, internals: list[str | None]) -> tuple[Any, dict[str, Any]]: ...
    def new_cache(self) -> Any: ...


class BatchEngine:
    """The decode loop (see the module docstring). `submit` queues a request; `call` runs a function
    between two steps; both start the loop on `worker` when it is idle. The loop ends when there is
    nothing to do, so the worker thread is free for nothing else only while requests run."""

    def __init__(self, host: ModelHost, worker: ThreadPoolExecutor, max_batch: int, eos_ids: list[int],
                 prefill_tokens: int = 1024) -> None:
        self.host = host
        self.worker = worker
        self.max_batch = max_batch
        # Prompt tokens prefilled between two decode steps (at least one request): many long prompts
        # arriving at once would otherwise stall every running stream for one long forward pass.
        self.prefill_tokens = prefill_tokens
        self.eos_ids = frozenset(eos_ids)
        self._cond = threading.Condition()
        self._pending: deque[BatchRequest] = deque()
        self._commands: deque[tuple[Callable[[], Any], Future]] = deque()
        self._running = False
        self.rows: list[BatchRequest] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self.steps = 0  # decode steps run, and rows summed over them (mean batch = row_steps / steps)
        self.row_steps = 0

    # ------------------------------------------------------------------ callers' side
    @property
    def waiting(self) -> int:
        return len(self._pending)

    def submit(self, req: BatchRequest, max_waiting: int | None) -> bool:
        """Queue `req`; False (nothing queued) when `max_waiting` requests already wait for a full batch."""
        with self._cond:
            full = len(self.rows) + len(self._pending) >= self.max_batch
            if max_waiting is not None and len(self._pending) >= max_waiting and full:
                return False
            self._pending.append(req)
            self._kick()
        return True

    def withdraw(self, req: BatchRequest) -> bool:
        """Take a waiting request back (time-out, cancel); False when the engine already took it."""
        with self._cond:
            try:
                self._pending.remove(req)
            except ValueError:
                return False
            return True

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` on the engine thread between two decode steps and return its result."""
        fut: Future = Future()
        with self._cond:
            self._commands.append((lambda: fn(*args), fut))
            self._kick()
        return fut.result()

    def _kick(self) -> None:
        if not self._running:
            self._running = True
            self.worker.submit(self._loop)

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                with self._cond:
                    if not self._pending and not self._commands and not self.rows:
                        self._running = False
                        return
                    commands = list(self._commands)
                    self._commands.clear()
                for fn, fut in commands:
                    try:
                        fut.set_result(fn())
                    except BaseException as e:  # the caller gets it
                        fut.set_exception(e)
                try:
                    self._admit()
                    if self.rows:
                        self._step()
                except BaseException as e:  # a failed forward pass fails the whole batch, never hangs it
                    for r in self.rows:
                        self._end(r, Failed(e))
                    self.rows, self._cache, self._mask = [], None, None

    def _admit(self) -> None:
        """Take waiting requests into the free places of the batch; all of them are prefilled together."""
        joining: list[BatchRequest] = []
        budget = self.prefill_tokens
        while len(self.rows) + len(joining) < self.max_batch:
            with self._cond:
                if not self._pending or (joining and len(self._pending[0].prompt) > budget):
                    break
                req = self._pending.popleft()
            budget -= len(req.prompt)
            req.queue_wait_s = time.perf_counter() - req.submitted
            try:
                req.internal = self.host.resolve_adapter(req.adapter)
            except BaseException as e:
                req.error = e
                req.admitted.set()
                continue
            req.admitted.set()
            if req.stopped:
                self._end(req, Done(0, "cancelled"))
            else:
                joining.append(req)
        if joining:
            try:
                logits = self._prefill(joining)
            except BaseException as e:  # only the joining requests fail; the running batch is untouched
                for r in joining:
                    self._end(r, Failed(e))
                return
            self._next_tokens(joining, logits)

    def _prefill(self, reqs: list[BatchRequest]) -> torch.Tensor:
        """One forward pass over the new prompts (left-padded to the longest), whose cache rows then
        join the batch's; returns each new row's last logits."""
        import torch
        import torch.nn.functional as F

        device = self.host.device
        width = max(len(r.prompt) for r in reqs)
        ids = torch.zeros((len(reqs), width), dtype=torch.long)
        mask = torch.zeros((len(reqs), width), dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, width - len(r.prompt):] = torch.tensor(r.prompt)
            mask[i, width - len(r.prompt):] = 1
            r.length = len(r.prompt)
            if not r.greedy:
                r.generator = torch.Generator(device=device)
                r.generator.manual_seed(r.seed if r.seed is not None else random.getrandbits(63))
        ids, mask = ids.to(device), mask.to(device)
        cache = self.host.new_cache()
        model, kwargs = self.host.route([r.internal for r in reqs])
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    past_key_values=cache, use_cache=True, logits_to_keep=1, **kwargs)
        if self._cache is None:
            self._cache, self._mask = cache, mask
        else:  # left-pad the narrower of (batch, new rows) and stack them
            assert self._mask is not None
            have = self._mask.shape[1]
            total = max(have, width)
            for mine, theirs in zip(self._cache.layers, cache.layers, strict=True):
                mine.keys = torch.cat([_pad_left(mine.keys, total - have), _pad_left(theirs.keys, total - width)])
                mine.values = torch.cat([_pad_left(mine.values, total - have), _pad_left(theirs.values, total - width)])
            self._mask = torch.cat([F.pad(self._mask, (total - have, 0)), F.pad(mask, (total - width, 0))])
        self.rows.extend(reqs)
        return out.logits[:, -1, :]

    def _next_tokens(self, rows: list[BatchRequest], logits: torch.Tensor) -> None:
        """Each row's next token from its logits; a row whose sampling fails leaves with the error."""
        greedy = logits.argmax(dim=-1).tolist()
        for i, r in enumerate(rows):
            try:
                r.last = self._choose(r, logits[i], greedy[i])
            except BaseException as e:  # e.g. NaN logits from a broken adapter: only this request fails
                self._remove(r, Failed(e))
                continue
            self._after_token(r)

    def _step(self) -> None:
        import torch

        for r in [r for r in self.rows if r.stopped]:
            self._remove(r, Done(len(r.streamer.tokens), "cancelled"))
        if not self.rows:
            return
        assert self._mask is not None
        device = self.host.device
        ids = torch.tensor([[r.last] for r in self.rows], device=device)
        positions = torch.tensor([[r.length] for r in self.rows], device=device)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(self.rows), 1))], dim=1)
        model, kwargs = self.host.route([r.internal for r in self.rows])
        out = model(input_ids=ids, attention_mask=self._mask, position_ids=positions, past_key_values=self._cache,
                    use_cache=True, **kwargs)
        self.steps += 1
        self.row_steps += len(self.rows)
        for r in self.rows:  # all first: `_remove` computes the padding from every row's length
            r.length += 1
        self._next_tokens(list(self.rows), out.logits[:, -1, :])

    def _choose(self, r: BatchRequest, logits: torch.Tensor, greedy: int | None) -> int:
        import torch

        if r.greedy:
            return int(logits.argmax()) if greedy is None else greedy
        scores = logits.float() / r.temperature
        if scores.device.type == "cuda":
            # NaN/Inf logits make CUDA's multinomial hit a device-side assert, which poisons the GPU
            # context of the whole server (seen on an H100); the CPU raises a clean error instead.
            scores = torch.nan_to_num(scores, nan=-float("inf"))
        if r.top_p < 1.0:  # as transformers' TopPLogitsWarper: keep the smallest set reaching top_p
            ordered, idx = torch.sort(scores)
            drop = ordered.softmax(-1).cumsum(-1) <= 1 - r.top_p
            drop[-1] = False
            scores = scores.index_fill(0, idx[drop], -float("inf"))
        return int(torch.multinomial(scores.softmax(-1), 1, generator=r.generator))

    def _after_token(self, r: BatchRequest) -> None:
        r.streamer.add(r.last)
        n = len(r.streamer.tokens)
        if r.last in self.eos_ids:
            self._remove(r, Done(n, "stop"))
        elif n >= r.max_new:
            self._remove(r, Done(n, "length"))

    def _remove(self, r: BatchRequest, outcome: Done | Failed) -> None:
        if r in self.rows:
            keep = [i for i, x in enumerate(self.rows) if x is not r]
            self.rows = [self.rows[i] for i in keep]
            if not self.rows:
                self._cache, self._mask = None, None
            else:
                assert self._mask is not None
                cut = min(self._mask.shape[1] - x.length for x in self.rows)  # all-padding columns
                sel = keep if len(keep) < self._mask.shape[0] else slice(None)
                for layer in self._cache.layers:
                    layer.keys = layer.keys[sel, :, cut:]
                    layer.values = layer.values[sel, :, cut:]
                self._mask = self._mask[sel, cut:]
        self._end(r, outcome)

    def _end(self, r: BatchRequest, outcome: Done | Failed) -> None:
        if isinstance(outcome, Done):
            r.streamer.end()
        self.host.release_adapter(r.internal)
        r.internal = None
        r.out.put(outcome)


def _pad_left(x: torch.Tensor, n: int) -> torch.Tensor:
    """`x` ([batch, heads, length, dim]) with `n` zero columns in front of its length axis."""
    import torch.nn.functional as F

    return F.pad(x, (0, 0, n, 0)) if n else x
