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

On CUDA (setting `cuda_graphs`, on by default) the decode step instead runs in a `SlotCache`: a
transformers `StaticCache` of `batch_max` slots and L columns that never moves, so the step has fixed
shapes and addresses and is captured once as a CUDA graph and replayed (the eager step is bound by
kernel launches on a GPU):

- One shared write column `c`: every slot writes its next token's K/V at column c; each row has its
  own positions and its own row of an additive [slots, 1, 1, L] attention mask (the model takes a 4-D
  mask as given). A joining row is prefilled as above and its K/V copied into a free slot at columns
  [c - len, c); a finished row's slot is just closed and freed. Idle slots attend to column c only.
- With `SlotSpec.bucketed_prefill` (the backend's default on CUDA) the joining rows are prefilled
  together in a shape bucket instead (rows and width padded to powers of two, `SlotCache.prefill`):
  the step's forward uncompiled, every row on its own LoRA slot, into a small static cache, as one
  CUDA graph per bucket captured the first time a width is needed (for every row count at once), then
  copied into their slots. An eager prefill pass is bound by kernel launches (42 ms for one request
  of the bench's on an H100); a bucketed one, placing included, 6 to 14 ms there (docs/benchmarks.md,
  "On a GPU").
- Each step starts before the host has read the one before (`BatchEngine._slot_step`): a greedy row's
  input is that step's argmax, taken on the GPU, and the host reads every row's token with one copy,
  streams text and ends finished rows while the next step runs. A sampled row, a full cache, joining
  requests and adapter changes read the step in flight first.
- When c reaches L the cache rolls left by the smallest start column of the live rows, or, while that
  frees little, doubles L (from `SlotSpec.min_len` up to the model's context): a new cache and a new
  graph, the stored columns kept. A row that would pass the largest L ends with "length".
- With any adapter in the batch every row goes through the gathered LoRA path
  (`assistant/lora_gather.py`; slot 0 is the base model) with each slot's LoRA slot in a tensor
  updated in place, so one graph serves any mix of adapters (a batch of base rows only has a graph
  without LoRA work). Loading or deleting an adapter changes the host's key for the forward and the
  graphs are captured again before the next step. A mix only PEFT can serve (a LoRA variant) runs
  the same step eagerly. With `SlotSpec.compile` (the backend's default on CUDA) the captured forward
  goes through `torch.compile` first: fused kernels, about twice the single-stream speed
  (docs/benchmarks.md, "On a GPU"), at the price of compiling at the first steps after start and
  after an adapter load or unload.

All model work (prefill, decode, adapter loads and deletes) runs in `BatchEngine`'s loop on the
backend's one generation thread: adapter changes run between two steps, never during one.
"""

from __future__ import annotations

import logging
import queue
import random
import sys
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
log = logging.getLogger(__name__)


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
    decode = _decoder(tokenizer)
    text = decode(tokens)
    if not text.endswith("\ufffd"):
        return text
    if not final:
        return None
    # Drop whole trailing tokens until the text decodes cleanly: only bytes of the cut character go.
    for cut in range(1, min(len(tokens), 4) + 1):
        shorter = decode(tokens[:-cut])
        if not shorter.endswith("\ufffd"):
            return shorter
    return text.rstrip("\ufffd")


def _decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    """`tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)`; for a plain
    fast tokenizer its Rust decoder is called directly: the same string without transformers' check of
    every id (`to_py_obj`), which cost about as much as the decoding itself while streaming 32 answers."""
    fast = sys.modules.get("transformers.tokenization_utils_tokenizers")
    base = getattr(fast, "TokenizersBackend", None)
    rust = getattr(tokenizer, "_tokenizer", None)
    if (base is not None and isinstance(tokenizer, base) and type(tokenizer).decode is base.decode
            and type(tokenizer)._decode is base._decode and rust is not None):
        return lambda tokens: rust.decode(tokens, skip_special_tokens=True)
    return lambda tokens: tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)


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
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.add(token)

    def add(self, token: int) -> None:
        if self.push(token):
            self._emit(final=False)

    def push(self, token: int) -> bool:
        """Take `token` without sending anything; True when a piece is due (`flush` sends it)."""
        self.tokens.append(token)
        return not self.sent or time.perf_counter() - self.last_sent >= self.interval_s

    def flush(self) -> None:
        """Send what is new (a due piece that `push` held back), unless the answer has ended."""
        if not self.ended:
            self._emit(final=False)

    def end(self) -> None:
        self.ended = True
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
    slot: int = -1  # its slot in the `SlotCache`, when the engine has one
    launched: int = -1  # the last slot-cache step that decoded it

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
    def new_static_cache(self, batch: int, length: int) -> Any: ...
    def slot_route(self, internals: list[str | None], rows: Any, compiled: bool = False
                   ) -> tuple[Any, dict[str, Any], list[int] | None, Any]: ...


@dataclass(frozen=True)
class SlotSpec:
    """The slot cache's sizes (see the module docstring)."""

    max_len: int  # the longest row, prompt and answer: the model's context
    min_len: int = 256  # the first L; it doubles as rows need more, up to max_len
    graphs: bool = True  # capture the decode step as a CUDA graph (False: run it eagerly, e.g. on CPU)
    compile: bool = False  # the captured forward through torch.compile (fused kernels; the backend's default)
    # Prefill joining rows through the step's forward (uncompiled) in padded shape buckets, each bucket
    # captured as a CUDA graph where `graphs` holds on CUDA (eagerly elsewhere; the backend's default on CUDA).
    bucketed_prefill: bool = False
    bucket_tokens: int = 2048  # rows x width of the largest bucket; a larger group prefills eagerly as before


@dataclass
class _Bucket:
    """One prefill shape: `rows` prompts left-padded to `width` columns. `inp` [rows, width + 2]: each row's
    token ids, then its first real column (`width`: a padding row) and its LoRA slot."""

    rows: int
    width: int
    cache: Any  # a StaticCache [rows, heads, width, dim]; its tensors are views of storage all buckets share
    inp: Any


class SlotCache:
    """A `StaticCache` of `batch` slots and `length` columns, the additive attention mask and the step's
    inputs, all at fixed addresses; the decode step, captured as a CUDA graph when it can be."""

    def __init__(self, host: ModelHost, batch: int, spec: SlotSpec) -> None:
        self.host, self.batch, self.spec = host, batch, spec
        self.free = list(range(batch))
        self.c = 0  # the write column of the next step
        self.length = 0  # L: columns of the cache (0: none yet)
        self.cache: Any = None
        self.bias: Any = None  # [batch, 1, 1, L]: 0 where a slot attends, the dtype's minimum elsewhere
        self.inp: Any = None  # [3, batch]: each slot's next token, its position, its LoRA slot
        # (forward's key, L) -> (CUDAGraph, its logits, their argmax), or None where capturing failed
        self.graphs: dict[Any, tuple[Any, Any, Any] | None] = {}
        self.captures = 0  # graphs captured, and rolls to the left, so far
        self.rolls = 0
        self.logits: Any = None  # the last step's logits [batch, vocab] and each slot's argmax [batch]
        self.greedy: Any = None
        # Two sets of buffers, used by turns, so that one step can run while the host reads the last:
        # on CUDA the inputs are staged in pinned memory and the argmaxes come back into pinned memory,
        # neither blocking; `_done[k]` is recorded after that copy.
        self._k = 1
        self._out: list[Any] = [None, None]
        self._stage: list[Any] = []
        self._host_greedy: list[Any] = []
        self._done: list[Any] = []
        # `SlotSpec.bucketed_prefill`: shape buckets, their graphs ((key, rows, width) -> (CUDAGraph, logits),
        # or None where capturing failed), the K/V storage they share and the memory pool of their graphs
        self._buckets: dict[tuple[int, int], _Bucket] = {}
        self.prefill_graphs: dict[Any, tuple[Any, Any] | None] = {}
        self.prefill_captures = 0
        self.bucket_prefills = 0  # prefills that went through a bucket
        self._shared_kv: list[Any] = []
        self._pool: Any = None

    def _alloc(self, length: int) -> None:
        import torch

        cache = self.host.new_static_cache(self.batch, length)
        keys = cache.layers[0].keys
        bias = torch.full((self.batch, 1, 1, length), torch.finfo(keys.dtype).min, dtype=keys.dtype,
                          device=keys.device)
        if self.cache is not None:  # keep what is stored
            for new, old in zip(cache.layers, self.cache.layers, strict=True):
                new.keys[:, :, :self.length].copy_(old.keys)
                new.values[:, :, :self.length].copy_(old.values)
            bias[..., :self.length].copy_(self.bias)
        else:
            self.inp = torch.zeros((4, self.batch), dtype=torch.long, device=keys.device)
            if keys.device.type == "cuda":
                self._stage = [torch.zeros((4, self.batch), dtype=torch.long, pin_memory=True) for _ in range(2)]
                self._host_greedy = [torch.zeros(self.batch, dtype=torch.long, pin_memory=True) for _ in range(2)]
                self._done = [torch.cuda.Event() for _ in range(2)]
        self.cache, self.bias, self.length = cache, bias, length
        self.graphs = {}  # they read and write the old tensors
        self._set_write()

    def fit(self, need: int) -> None:
        """Make L at least `need` (at most max_len): the next doubling of min_len."""
        if need <= self.length:
            return
        length = max(self.spec.min_len, 1)
        while length < need:
            length *= 2
        self._alloc(min(length, self.spec.max_len))

    def grow(self) -> None:
        self.fit(self.length + 1)

    def _set_write(self) -> None:
        for layer in self.cache.layers:  # StaticCache writes each update at its own running count
            layer.cumulative_length.fill_(self.c)

    def shift(self, n: int) -> None:
        """Move every column n to the left (n < 0: to the right); the columns that come in are closed."""
        import torch

        for layer in self.cache.layers:
            for t in (layer.keys, layer.values):
                t.copy_(torch.roll(t, -n, dims=2))
        self.bias.copy_(torch.roll(self.bias, -n, dims=3))
        closed = self.bias[..., self.length - n:] if n > 0 else self.bias[..., :-n]
        closed.fill_(torch.finfo(self.bias.dtype).min)
        self.c -= n
        self.rolls += n > 0
        self._set_write()

    def clear(self) -> None:
        """No live rows: every slot free, the write column back at 0."""
        import torch

        self.free = list(range(self.batch))
        self.c = 0
        if self.cache is not None:
            self.bias.fill_(torch.finfo(self.bias.dtype).min)
            self._set_write()

    def place(self, reqs: list[BatchRequest], cache: Any, width: int, alone: bool, block: bool = False) -> None:
        """Copy the joining rows' prefilled K/V (`cache`, left-padded to `width`) into free slots, each
        ending at column c. `alone`: no row is running, so c starts afresh. `block`: copy each row's last
        `longest` columns whole, padding included (one copy a layer; the padding lands in columns its slot
        keeps closed, so it must be finite: the bucketed prefill's is)."""
        import torch

        if alone:
            self.clear()
        longest = max(r.length for r in reqs)
        self.fit(max(min(r.length + r.max_new, self.spec.max_len) for r in reqs))
        self.fit(longest + 1)
        if self.c < longest:
            self.shift(self.c - longest)
        c = self.c
        for r in reqs:
            r.slot = self.free.pop(0)
        device = self.bias.device
        if block:
            slots = torch.tensor([r.slot for r in reqs], device=device)
            n = len(reqs)
            for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
                mine.keys[slots, :, c - longest:c] = theirs.keys[:n, :, width - longest:width]
                mine.values[slots, :, c - longest:c] = theirs.values[:n, :, width - longest:width]
        else:
            dst_s, dst_c, src_r, src_c = [], [], [], []
            for i, r in enumerate(reqs):
                dst_s += [r.slot] * r.length
                dst_c += range(c - r.length, c)
                src_r += [i] * r.length
                src_c += range(width - r.length, width)
            dst_s_t, dst_c_t, src_r_t, src_c_t = (torch.tensor(x, device=device) for x in (dst_s, dst_c, src_r, src_c))
            for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
                mine.keys[dst_s_t, :, dst_c_t] = theirs.keys[src_r_t, :, src_c_t].to(mine.keys.dtype)
                mine.values[dst_s_t, :, dst_c_t] = theirs.values[src_r_t, :, src_c_t].to(mine.values.dtype)
        cols = torch.arange(self.length, device=device)
        start = torch.tensor([c - r.length for r in reqs], device=device)
        opened = (cols[None, :] >= start[:, None]) & (cols[None, :] < c)
        rows = torch.tensor([r.slot for r in reqs], device=device)
        self.bias[rows, 0, 0] = torch.where(opened, 0.0, torch.finfo(self.bias.dtype).min).to(self.bias.dtype)

    def prefill(self, reqs: list[BatchRequest], alone: bool) -> torch.Tensor | None:
        """`SlotSpec.bucketed_prefill`: one forward pass over the joining rows' prompts, padded to a shape
        bucket (rows and width each to a power of two), through the step's forward uncompiled (every row
        on its own LoRA slot), into the bucket's own static cache, then `place`d; the bucket's pass is a
        CUDA graph where the decode step is one. Returns each row's last logits, or None where this path
        does not serve the group (a mix only PEFT can serve; a group over `bucket_tokens` on CUDA)."""
        import torch

        n, longest = len(reqs), max(r.length for r in reqs)
        rows, width = _power_of_two(n, 1), _power_of_two(longest, 16)
        graphs = self.spec.graphs and self.host.device.type == "cuda"
        if graphs and rows * width > self.spec.bucket_tokens:
            return None
        internals = [r.internal for r in reqs] + [None] * (rows - n)
        b = self._bucket(rows, width)
        forward, kwargs, lora, key = self.host.slot_route(internals, b.inp[:, width + 1])
        if key is None:
            return None
        graph = None
        if graphs:
            if any(k[0][1:] != key[1:] for k in self.prefill_graphs):  # another model version
                self.prefill_graphs = {}
            if (key, rows, width) not in self.prefill_graphs:
                self._capture_buckets(key, internals, width)
            graph = self.prefill_graphs.get((key, rows, width))
        inp = [[0] * (width - r.length) + r.prompt + [width - r.length, s]
               for r, s in zip(reqs, lora or [0] * n, strict=False)]
        inp += [[0] * width + [width, 0]] * (rows - n)
        b.inp.copy_(torch.tensor(inp))
        if graph is not None:
            graph[0].replay()
            logits = graph[1][:n].clone()  # the graphs share a memory pool: the next replay may reuse it
        else:
            logits = self._bucket_forward(b, forward, kwargs)[:n]
        self.place(reqs, b.cache, width, alone, block=True)
        self.bucket_prefills += 1
        return logits

    def _bucket(self, rows: int, width: int) -> _Bucket:
        import torch

        b = self._buckets.get((rows, width))
        if b is None:
            cache = self.host.new_static_cache(rows, width)
            if rows * width <= self.spec.bucket_tokens:  # one prefill at a time: all buckets share K/V storage
                if not self._shared_kv:
                    self._shared_kv = [
                        (torch.empty(self.spec.bucket_tokens * layer.keys[0, :, 0].numel(), dtype=layer.keys.dtype,
                                     device=layer.keys.device),
                         torch.empty(self.spec.bucket_tokens * layer.values[0, :, 0].numel(),
                                     dtype=layer.values.dtype, device=layer.values.device))
                        for layer in cache.layers]
                for layer, (k, v) in zip(cache.layers, self._shared_kv, strict=True):
                    layer.keys = k[:layer.keys.numel()].view(layer.keys.shape)
                    layer.values = v[:layer.values.numel()].view(layer.values.shape)
            inp = torch.zeros((rows, width + 2), dtype=torch.long, device=cache.layers[0].keys.device)
            b = self._buckets[(rows, width)] = _Bucket(rows, width, cache, inp)
        return b

    def _bucket_forward(self, b: _Bucket, forward: Any, kwargs: dict[str, Any]) -> torch.Tensor:
        """The prefill pass of bucket `b` from its `inp`, all on the device (so a graph can hold it): each
        row's positions count from its first real column; its queries see its real columns up to their
        own, and a padding query sees itself (finite values in every column `place` copies)."""
        import torch

        for layer in b.cache.layers:  # StaticCache writes at its running count: here from column 0
            layer.cumulative_length.zero_()
        width, keys = b.width, b.cache.layers[0].keys
        ids, start = b.inp[:, :width], b.inp[:, width]
        cols = torch.arange(width, device=keys.device)
        seen = (cols[None, None, :] <= cols[None, :, None]) & (cols[None, None, :] >= start[:, None, None])
        seen |= torch.eye(width, dtype=torch.bool, device=keys.device)
        mask = torch.zeros(seen.shape, dtype=keys.dtype, device=keys.device)
        mask.masked_fill_(~seen, torch.finfo(keys.dtype).min)
        out = forward(input_ids=ids, attention_mask=mask.unsqueeze(1),
                      position_ids=(cols[None, :] - start[:, None]).clamp(min=0), past_key_values=b.cache,
                      use_cache=True, logits_to_keep=1, **kwargs)
        return out.logits[:, -1, :]

    def _capture_buckets(self, key: Any, internals: list[str | None], width: int) -> None:
        """Capture the prefill graph of every row bucket of this width (up to the batch, within
        `bucket_tokens`) for `key`: later groups of any size find theirs ready, so no capture lands in the
        middle of serving a wave of requests."""
        import torch

        like = next((i for i in internals if i is not None), None)  # a row that gives the same key
        rows = 1
        while rows <= _power_of_two(self.batch, 1) and rows * width <= self.spec.bucket_tokens:
            if (key, rows, width) not in self.prefill_graphs:
                b = self._bucket(rows, width)
                forward, kwargs, _, got = self.host.slot_route([like] * rows, b.inp[:, width + 1])
                graph = None
                if got == key:
                    try:
                        if self._pool is None:
                            self._pool = torch.cuda.graph_pool_handle()
                        stream = torch.cuda.Stream()
                        stream.wait_stream(torch.cuda.current_stream())
                        with torch.cuda.stream(stream):  # warm up off the capture
                            self._bucket_forward(b, forward, kwargs)
                        torch.cuda.current_stream().wait_stream(stream)
                        g = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(g, pool=self._pool, capture_error_mode="thread_local"):
                            logits = self._bucket_forward(b, forward, kwargs)
                        graph = (g, logits)
                        self.prefill_captures += 1
                    except Exception:  # prefill eagerly rather than not at all
                        log.exception("capturing the prefill of %d x %d as a CUDA graph failed", rows, width)
                self.prefill_graphs[(key, rows, width)] = graph
            rows *= 2

    def release(self, r: BatchRequest) -> None:
        import torch

        if r.slot >= 0:
            self.bias[r.slot].fill_(torch.finfo(self.bias.dtype).min)
            self.free.append(r.slot)
            r.slot = -1

    def step(self, rows: list[BatchRequest], fed: list[bool] | None = None) -> int:
        """Start one decode step of every slot and return its turn k; `tokens(k)` waits for its argmaxes.
        `fed[i]`: row i's input is the argmax of the step before, still on the GPU (its host `last` is
        not known yet), so this step can start before the host has read that one. After it `logits`
        holds the logits [batch, vocab] and `greedy` each slot's argmax (row r at r.slot).

        On CUDA the host does little per step: one pinned copy of the inputs in, the graph (the argmax
        inside it), one pinned copy of the argmaxes out, none of them waiting for the GPU."""
        import torch

        internals: list[str | None] = [None] * self.batch
        tokens, positions, from_gpu = [0] * self.batch, [0] * self.batch, [0] * self.batch
        for i, r in enumerate(rows):
            internals[r.slot], tokens[r.slot], positions[r.slot] = r.internal, r.last, r.length
            if fed is not None and fed[i]:
                from_gpu[r.slot] = 1
        graphs = self.spec.graphs and self.bias.device.type == "cuda"
        forward, kwargs, lora, key = self.host.slot_route(internals, self.inp[2], graphs and self.spec.compile)
        inputs = [tokens, positions, lora or [0] * self.batch, from_gpu]
        k = self._k = self._k ^ 1
        if self._stage:
            self._done[k].synchronize()  # the step that used these buffers two steps ago has finished
            self._stage[k].numpy()[:] = inputs
            self.inp.copy_(self._stage[k], non_blocking=True)
        else:
            self.inp.copy_(torch.tensor(inputs))
        if fed is not None and any(fed):
            self.inp[0].copy_(torch.where(self.inp[3] != 0, self.greedy, self.inp[0]))
        self.bias[..., self.c] = 0  # the column written now: every slot attends to it
        args = dict(input_ids=self.inp[0].unsqueeze(1), attention_mask=self.bias,
                    position_ids=self.inp[1].unsqueeze(1), past_key_values=self.cache, use_cache=True,
                    logits_to_keep=1, **kwargs)
        graph = None
        if graphs and key is not None:
            if any(k_[0][1:] != key[1:] for k_ in self.graphs):  # another model version: those are stale
                self.graphs = {}
            if (key, self.length) not in self.graphs:
                self.graphs[(key, self.length)] = self._capture(forward, args)
            graph = self.graphs[(key, self.length)]
        if graph is not None:
            graph[0].replay()
            self.logits, self.greedy = graph[1], graph[2]
        else:
            self.logits = forward(**args).logits[:, -1, :]
            self.greedy = self.logits.argmax(dim=-1)
        if self._done:
            self._host_greedy[k].copy_(self.greedy, non_blocking=True)
            self._done[k].record()
        else:
            self._out[k] = self.greedy
        self.c += 1
        return k

    def tokens(self, k: int) -> list[int]:
        """Each slot's argmax of the step of turn k, once the GPU has finished it (it waits without the
        GIL, so the consumers' threads run meanwhile)."""
        if not self._done:
            return self._out[k].tolist()
        self._done[k].synchronize()
        return self._host_greedy[k].tolist()

    def _capture(self, forward: Any, args: dict[str, Any]) -> tuple[Any, Any, Any] | None:
        import torch

        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm up off the capture (allocator, kernels' first launch)
                for _ in range(2):
                    forward(**args)
                    self._set_write()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # other threads may use CUDA
                logits = forward(**args).logits[:, -1, :]
                greedy = logits.argmax(dim=-1)
            self.captures += 1
            return graph, logits, greedy
        except Exception:  # serve eagerly rather than not at all
            log.exception("capturing the decode step as a CUDA graph failed; decoding eagerly")
            return None
        finally:
            self._set_write()


class BatchEngine:
    """The decode loop (see the module docstring). `submit` queues a request; `call` runs a function
    between two steps; both start the loop on `worker` when it is idle. The loop ends when there is
    nothing to do, so the worker thread is free for nothing else only while requests run."""

    def __init__(self, host: ModelHost, worker: ThreadPoolExecutor, max_batch: int, eos_ids: list[int],
                 prefill_tokens: int = 1024, slots: SlotSpec | None = None) -> None:
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
        self.slots = SlotCache(host, max_batch, slots) if slots is not None else None
        self.steps = 0  # decode steps run, and rows summed over them (mean batch = row_steps / steps)
        self.row_steps = 0
        self.wait_s = 0.0  # time the loop spent waiting for the GPU's tokens (the slot cache's steps)
        self.prefills = 0  # prefill passes (one per group of joining requests) and their time
        self.prefill_s = 0.0
        self._due: list[BatchRequest] = []  # rows with a text piece held back until the next step runs
        # The slot cache's step in flight whose tokens the host has not read yet: (its rows, its turn).
        self._inflight: tuple[list[BatchRequest], int] | None = None

    # ------------------------------------------------------------------ callers' side
    @property
    def waiting(self) -> int:
        return len(self._pending)

    def full(self, max_waiting: int | None) -> bool:
        """Whether a request submitted now would be refused: `max_waiting` already wait for a full batch."""
        with self._cond:
            return self._full(max_waiting)

    def _full(self, max_waiting: int | None) -> bool:
        busy = len(self.rows) + len(self._pending) >= self.max_batch
        return max_waiting is not None and len(self._pending) >= max_waiting and busy

    def submit(self, req: BatchRequest, max_waiting: int | None) -> bool:
        """Queue `req`; False (nothing queued) when `max_waiting` requests already wait for a full batch."""
        with self._cond:
            if self._full(max_waiting):
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
                        self._due, self._inflight = [], None  # rows that have all ended, their text sent
                        return
                    commands = list(self._commands)
                    self._commands.clear()
                try:
                    if commands:  # adapter changes see no step in flight
                        self._drain()
                except BaseException as e:
                    self._fail_all(e)
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
                    self._fail_all(e)

    def _fail_all(self, e: BaseException) -> None:
        for r in self.rows:
            self._end(r, Failed(e))
        self.rows, self._cache, self._mask, self._inflight = [], None, None, None
        if self.slots is not None:
            self.slots.clear()

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
            if self.slots is not None and len(req.prompt) >= self.slots.spec.max_len:
                self._end(req, Failed(ValueError(f"the prompt ({len(req.prompt)} tokens) leaves no room in the "
                                                 f"cache of {self.slots.spec.max_len}")))
            elif req.stopped:
                self._end(req, Done(0, "cancelled"))
            else:
                joining.append(req)
        if joining:
            try:
                self._drain()  # the cache is placed into and may grow: no step in flight
                started = time.perf_counter()
                logits = self._prefill(joining)
                self.prefills += 1
                self.prefill_s += time.perf_counter() - started
            except BaseException as e:  # only the joining requests fail; the running batch is untouched
                for r in joining:
                    if self.slots is not None and r.slot >= 0:
                        self.slots.release(r)
                    self._end(r, Failed(e))
                return
            self._next_tokens(joining, logits)

    def _prefill(self, reqs: list[BatchRequest]) -> torch.Tensor:
        """One forward pass over the new prompts (left-padded to the longest), whose cache rows then
        join the batch's; returns each new row's last logits."""
        import torch
        import torch.nn.functional as F

        device = self.host.device
        for r in reqs:
            r.length = len(r.prompt)
            if not r.greedy:
                r.generator = torch.Generator(device=device)
                r.generator.manual_seed(r.seed if r.seed is not None else random.getrandbits(63))
        if self.slots is not None and self.slots.spec.bucketed_prefill:
            logits = self.slots.prefill(reqs, alone=not self.rows)
            if logits is not None:
                self.rows.extend(reqs)
                return logits
        width = max(len(r.prompt) for r in reqs)
        ids = torch.zeros((len(reqs), width), dtype=torch.long)
        mask = torch.zeros((len(reqs), width), dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, width - len(r.prompt):] = torch.tensor(r.prompt)
            mask[i, width - len(r.prompt):] = 1
        ids, mask = ids.to(device), mask.to(device)
        cache = self.host.new_cache()
        model, kwargs = self.host.route([r.internal for r in reqs])
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    past_key_values=cache, use_cache=True, logits_to_keep=1, **kwargs)
        if self.slots is not None:
            self.slots.place(reqs, cache, width, alone=not self.rows)
        elif self._cache is None:
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

    def _next_tokens(self, rows: list[BatchRequest], logits: torch.Tensor, at: list[int] | None = None,
                     greedy: list[int] | None = None) -> None:
        """Each row's next token from its logits (row i's at `at[i]`, default i; `greedy`: every row's
        argmax, when already known); a row whose sampling fails leaves with the error."""
        if greedy is None:
            greedy = logits.argmax(dim=-1).tolist()
        for i, r in enumerate(rows):
            j = at[i] if at is not None else i
            if r.greedy:
                r.last = greedy[j]
            else:
                try:
                    r.last = self._choose(r, logits[j], greedy[j])
                except BaseException as e:  # e.g. NaN logits from a broken adapter: only this request fails
                    self._remove(r, Failed(e))
                    continue
            self._after_token(r)

    def _step(self) -> None:
        import torch

        for r in [r for r in self.rows if r.stopped]:
            self._remove(r, Done(len(r.streamer.tokens), "cancelled"))
        if self.slots is not None:
            self._slot_step()
            return
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

    def _slot_step(self) -> None:
        """One step of the slot cache, started before the host reads the step before it: greedy rows
        take their next input from that step's argmax on the GPU, and the host reads its tokens, streams
        text and ends finished rows while this step runs (a row that ended there has run one step for
        nothing, in a slot the batch computes anyway). Sampled rows, a full cache and adapter changes
        read the step in flight first."""
        slots = self.slots
        assert slots is not None
        if self._inflight is not None and (slots.c >= slots.length or not all(r.greedy for r in self.rows)):
            self._drain()
        self._make_room()
        if not self.rows:
            self._inflight = None  # all cancelled: what was in flight no longer matters
            return
        rows = list(self.rows)
        previous = self._inflight
        fed = [r.launched == self.steps for r in rows] if previous is not None else None
        k = slots.step(rows, fed)
        self.steps += 1
        self.row_steps += len(rows)
        for r in rows:
            r.length += 1
            r.launched = self.steps
        self._inflight = (rows, k)
        self._flush()  # text of the tokens read before, while the GPU runs
        if previous is not None:
            self._read(*previous)

    def _read(self, rows: list[BatchRequest], k: int) -> None:
        """The tokens of the slot-cache step of turn k, for its rows still in the batch."""
        slots = self.slots
        assert slots is not None
        t = time.perf_counter()
        greedy = slots.tokens(k)
        self.wait_s += time.perf_counter() - t
        live = [r for r in rows if r.slot >= 0]
        self._next_tokens(live, slots.logits, [r.slot for r in live], greedy)

    def _drain(self) -> None:
        """Read the slot-cache step in flight, if any."""
        if self._inflight is not None:
            rows, k = self._inflight
            self._inflight = None
            self._read(rows, k)

    def _make_room(self) -> None:
        """Before a step at column L: roll the slot cache left by the smallest start column, or double L
        while that frees less than a quarter; at the largest L rows that fill it end ("length")."""
        slots = self.slots
        assert slots is not None
        while self.rows and slots.c >= slots.length:
            start = min(slots.c - r.length for r in self.rows)
            if slots.length < slots.spec.max_len and start < slots.length // 4:
                slots.grow()
            elif start > 0:
                slots.shift(start)
            else:
                for r in [r for r in self.rows if r.length >= slots.c]:
                    self._remove(r, Done(len(r.streamer.tokens), "length"))

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
        if self.slots is None:
            r.streamer.add(r.last)
        elif r.streamer.push(r.last):  # sent by `_flush` once the next step is on its way
            self._due.append(r)
        n = len(r.streamer.tokens)
        if r.last in self.eos_ids:
            self._remove(r, Done(n, "stop"))
        elif n >= r.max_new:
            self._remove(r, Done(n, "length"))

    def _flush(self) -> None:
        """Send the text pieces held back by `_after_token` (an ended row has sent all of its text)."""
        due, self._due = self._due, []
        for r in due:
            r.streamer.flush()

    def _remove(self, r: BatchRequest, outcome: Done | Failed) -> None:
        if self.slots is not None:
            if r in self.rows:
                self.rows = [x for x in self.rows if x is not r]
                self.slots.release(r)
        elif r in self.rows:
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
        else:
            r.streamer.ended = True  # nothing more to send after the failure
        self.host.release_adapter(r.internal)
        r.internal = None
        r.out.put(outcome)


def _power_of_two(n: int, least: int) -> int:
    """The smallest power of two >= max(n, least)."""
    p = least
    while p < n:
        p *= 2
    return p


def _pad_left(x: torch.Tensor, n: int) -> torch.Tensor:
    """`x` ([batch, heads, length, dim]) with `n` zero columns in front of its length axis."""
    import torch.nn.functional as F

    return F.pad(x, (0, 0, n, 0)) if n else x
