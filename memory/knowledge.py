"""The document knowledge base: ingest, list, delete, and hybrid (dense + BM25) retrieval.

In: a `Settings` (embedder, chunk sizes, upload limit, `chroma_dir` or `chroma_url`), users'
uploads (file name + bytes), and questions. Out: `DocumentInfo` rows for listings and `Hit`s for
prompts: the best chunks the asking user may read, ranked by reciprocal rank fusion of the dense
(sentence-transformers, cosine in chromadb) and lexical (BM25, `memory.lexical`) rankings. Lexical
ranking is there because the embedded embedder is English-only: names, codes and other languages
need exact matching.

Scopes: a document is either private to its uploader (`visibility = "user:<id>"`) or shared with the
team (`visibility = "shared"`). Each visibility has its own chromadb collection (`docs-shared`,
`docs-user-<id>`), and a user's search opens only the shared one and their own: another user's
private chunks are never even candidates. (One collection with a `where` filter on visibility was
measured first: a filter that matches most chunks made chromadb take 125 ms per query at 20k chunks,
against 2 ms for an unfiltered query on a collection of its own.) The lexical index filters the same way.

One writer: chromadb's embedded client loses vectors when two processes write one folder.
The server process owns the `KnowledgeBase`; other processes go through its API, or everyone uses a
`chroma run` server (`settings.chroma_url`). Writes in this process are serialised by a lock.

Atomicity: a document's chunks are written with chunk 0 last; chunk 0 is the record that the
document exists (listings read only chunk 0). If any step fails, every chunk written so far is
deleted before the error is raised, and a crash half-way leaves chunks without a chunk 0, which the
next index build removes.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

from chromadb import Documents, EmbeddingFunction, Embeddings
from chromadb.utils.embedding_functions import register_embedding_function

from memory.documents import (
    Chunk,
    DocumentTooLarge,
    Extracted,
    IngestError,
    check_size,
    chunk_document,
    extract,
)
from memory.embedder import Embedder, get_embedder
from memory.lexical import LexicalIndex
from memory.types import User

if TYPE_CHECKING:
    from assistant.config import Settings  # type only: memory/ never imports assistant/ at runtime

__all__ = ["DocumentInfo", "DocumentNotFound", "DocumentTooLarge", "Hit", "IngestError", "KnowledgeBase",
           "KnowledgeError", "StoredChunk"]

log = logging.getLogger(__name__)

COLLECTION_PREFIX = "docs-"
RRF_K = 60  # the constant from Cormack et al. (2009); it damps the weight of the very top ranks
Scope = Literal["private", "shared"]
Mode = Literal["hybrid", "dense", "lexical"]
ProgressFn = Callable[[float, str], None]


class KnowledgeError(RuntimeError):
    """The knowledge base cannot work as configured (wrong embedder for the stored index, bad settings)."""


class DocumentNotFound(LookupError):
    """No such document among those the user may see."""


@dataclass(frozen=True)
class Hit:
    """One retrieved chunk. `score` is the fused RRF score (or the single ranking's score)."""

    doc_id: str
    title: str
    chunk_id: str
    text: str
    score: float
    scope: Scope
    dense_score: float | None = None  # cosine similarity, when the dense ranking found it
    lexical_score: float | None = None  # BM25, when the lexical ranking found it
    lexical_coverage: float | None = None  # share of the query's idf mass this chunk matches (0..1)

    def as_source(self, snippet_chars: int = 300) -> dict[str, Any]:
        snippet = " ".join(self.text.split())
        if len(snippet) > snippet_chars:
            snippet = snippet[: snippet_chars - 1].rstrip() + "…"
        return {"doc_id": self.doc_id, "title": self.title, "chunk_id": self.chunk_id, "scope": self.scope,
                "score": round(self.score, 6), "snippet": snippet}


@dataclass(frozen=True)
class StoredChunk:
    doc_id: str
    chunk_id: str
    index: int
    text: str


@dataclass(frozen=True)
class DocumentInfo:
    doc_id: str
    title: str
    filename: str
    kind: str
    scope: Scope
    owner_id: int
    chunks: int
    size: int
    sha256: str
    created_at: float  # unix seconds


@register_embedding_function
class AssistantEmbeddingFunction(EmbeddingFunction[Documents]):
    """chromadb's handle on our embedder; registered so a collection re-opened later finds it.

    Without the registration, a process that opens a collection fails at query time (chromadb looks the
    function up by the name it stored); without passing it, chromadb falls back to a default model it
    downloads.
    """

    def __init__(self, model: str) -> None:
        self.model = model

    def __call__(self, input: Documents) -> Embeddings:
        return list(get_embedder(self.model).encode(list(input)))

    @staticmethod
    def name() -> str:
        return "assistant-sentence-transformers"

    def default_space(self) -> str:  # type: ignore[override]
        return "cosine"

    def supported_spaces(self) -> list[str]:  # type: ignore[override]
        return ["cosine"]

    def get_config(self) -> dict[str, Any]:
        return {"model": self.model}

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> AssistantEmbeddingFunction:
        return AssistantEmbeddingFunction(config["model"])


def embedder_cache(settings: Settings) -> Path:
    """Where the embedder's ONNX export is kept (see memory.embedder)."""
    return settings.models_dir / "embedders"


def visibility(scope: Scope, owner_id: int) -> str:
    return "shared" if scope == "shared" else f"user:{owner_id}"


def readable_by(user: User) -> list[str]:
    return ["shared", f"user:{user.id}"]


def collection_name(vis: str) -> str:
    """Visibility -> chromadb collection name ("shared" -> "docs-shared", "user:7" -> "docs-user-7")."""
    return COLLECTION_PREFIX + vis.replace(":", "-")


def document_metadata(doc_id: str, title: str, filename: str, kind: str, scope: Scope, owner_id: int,
                      n_chunks: int, size: int, sha256: str, created_at: float) -> dict[str, Any]:
    """Metadata every chunk of a document carries (chunk 0's copy is the document's record)."""
    return {"doc_id": doc_id, "title": title, "filename": filename, "kind": kind, "scope": scope,
            "owner_id": owner_id, "visibility": visibility(scope, owner_id), "n_chunks": n_chunks,
            "doc_bytes": size, "doc_sha256": sha256, "created_at": created_at}


def chunk_metadata(doc: dict[str, Any], chunk: Chunk) -> dict[str, Any]:
    return {**doc, "chunk_index": chunk.index, "start": chunk.start, "end": chunk.end}


def _open_client(settings: Settings) -> Any:
    import chromadb
    from chromadb.config import Settings as ChromaSettings

    chroma_settings = ChromaSettings(anonymized_telemetry=False)
    if settings.chroma_url:
        url = urlparse(settings.chroma_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise KnowledgeError(f"chroma_url must look like http://host:port, got {settings.chroma_url!r}")
        return chromadb.HttpClient(host=url.hostname, port=url.port or (443 if url.scheme == "https" else 8000),
                                   ssl=url.scheme == "https", settings=chroma_settings)
    Path(settings.chroma_dir).mkdir(parents=True, exist_ok=True)
    return chromadb.PersistentClient(path=str(settings.chroma_dir), settings=chroma_settings)


class KnowledgeBase:
    """Documents of all users in chromadb (a collection per visibility) plus an in-process BM25 index over them."""

    def __init__(self, settings: Settings, *, batch_size: int = 256) -> None:
        self.settings = settings
        self.batch_size = batch_size
        self._write_lock = threading.Lock()
        self._open_lock = threading.RLock()
        self._client: Any = None
        self._collections: dict[str, Any] = {}
        self._lexical: LexicalIndex | None = None

    # ------------------------------------------------------------------ lazy parts
    @property
    def embedder(self) -> Embedder:
        return get_embedder(self.settings.embedder, embedder_cache(self.settings))

    @property
    def client(self) -> Any:
        with self._open_lock:
            if self._client is None:
                emb = self.embedder
                if self.settings.chunk_tokens > emb.max_tokens:
                    raise KnowledgeError(f"chunk_tokens={self.settings.chunk_tokens} exceeds the {emb.max_tokens} "
                                         f"tokens that {self.settings.embedder} reads; the rest would be ignored")
                self._client = _open_client(self.settings)
            return self._client

    def collection_for(self, vis: str, create: bool = False) -> Any | None:
        """The collection holding one visibility's chunks (None when it does not exist and `create` is False)."""
        with self._open_lock:
            col = self._collections.get(vis)
            if col is not None:
                return col
            name = collection_name(vis)
            if not create and name not in self._existing():
                return None
            col = self.client.get_or_create_collection(
                name, embedding_function=AssistantEmbeddingFunction(self.settings.embedder),
                configuration={"hnsw": {"space": "cosine"}},
            )
            stored = col.configuration.get("embedding_function")
            stored_model = stored.get_config().get("model") if stored is not None else None
            if stored_model != self.settings.embedder:
                raise KnowledgeError(
                    f"the document index was built with embedder {stored_model!r} but settings.embedder is "
                    f"{self.settings.embedder!r}; vectors from different models can't be compared. Use the "
                    "original embedder, or a new chroma_dir / chroma server and re-upload the documents"
                )
            self._collections[vis] = col
            return col

    def _existing(self) -> set[str]:
        return {c.name if hasattr(c, "name") else str(c) for c in self.client.list_collections()}

    def _all_collections(self) -> dict[str, Any]:
        """Every document collection in the store, by visibility."""
        out = {}
        for name in sorted(self._existing()):
            if name.startswith(COLLECTION_PREFIX):
                rest = name[len(COLLECTION_PREFIX):]
                vis = "shared" if rest == "shared" else rest.replace("-", ":", 1)
                out[vis] = self.collection_for(vis)
        return out

    @property
    def lexical(self) -> LexicalIndex:
        """The BM25 index, built from the collections on first use (and cleaned of half-written documents)."""
        with self._open_lock:
            if self._lexical is None:
                self._lexical = self._build_lexical()
            return self._lexical

    def _build_lexical(self) -> LexicalIndex:
        started = time.perf_counter()
        index = LexicalIndex()
        for vis, col in self._all_collections().items():
            rows: list[tuple[str, str, str, str]] = []
            heads: set[str] = set()
            page, offset = 5000, 0
            while True:
                got = col.get(include=["documents", "metadatas"], limit=page, offset=offset)
                for cid, text, meta in zip(got["ids"], got["documents"], got["metadatas"], strict=True):
                    rows.append((cid, meta["doc_id"], vis, text))
                    if meta["chunk_index"] == 0:
                        heads.add(meta["doc_id"])
                if len(got["ids"]) < page:
                    break
                offset += page
            orphans = {doc for _, doc, _, _ in rows if doc not in heads}
            for doc in orphans:
                # Chunks without chunk 0: a write that crashed half-way (see module docstring).
                log.warning("removing half-written document %s from the knowledge base", doc)
                col.delete(where={"doc_id": doc})
            index.add([r for r in rows if r[1] not in orphans])
        log.info("lexical index: %d chunks in %.1f s", len(index), time.perf_counter() - started)
        return index

    def warm(self) -> None:
        """Load the embedder, open the collections and build the lexical index now, not on the first request."""
        _ = self.lexical

    def close(self) -> None:
        with self._open_lock:
            self._collections = {}
            self._client = None
            self._lexical = None

    # ------------------------------------------------------------------ writes
    def ingest(self, user: User, filename: str, data: bytes, scope: Scope = "private", title: str | None = None,
               progress: ProgressFn | None = None) -> DocumentInfo:
        """Check, chunk, embed and store one upload. Raises `IngestError` (`DocumentTooLarge` past the
        per-document caps on text and chunks); on any failure nothing stays stored."""
        if scope not in ("private", "shared"):
            raise IngestError(f"scope must be 'private' or 'shared', got {scope!r}")
        doc = extract(filename, data, self.settings.upload_max_bytes, title,
                      max_chars=self.settings.max_document_chars)
        return self._store(user, doc, scope, progress)

    def ingest_path(self, user: User, path: str | Path, scope: Scope = "private",
                    progress: ProgressFn | None = None) -> DocumentInfo:
        """Same as `ingest` for a file on disk (the size is checked before reading it)."""
        p = Path(path)
        if not p.is_file():
            raise IngestError(f"{p} is not a file")
        check_size(p.stat().st_size, self.settings.upload_max_bytes, p.name)  # before reading it into memory
        return self.ingest(user, p.name, p.read_bytes(), scope=scope, progress=progress)

    def _store(self, user: User, doc: Extracted, scope: Scope, progress: ProgressFn | None) -> DocumentInfo:
        report = progress or (lambda _f, _m: None)
        vis = visibility(scope, user.id)
        index = self.lexical
        with self._write_lock:
            col = self.collection_for(vis, create=True)
            same = col.get(where={"$and": [{"doc_sha256": doc.sha256}, {"chunk_index": 0}]}, include=["metadatas"])
            if same["ids"]:
                title = same["metadatas"][0]["title"]
                raise IngestError(f"'{doc.filename}' is already in the {scope} documents as '{title}'")
            report(0.0, "chunking")
            chunks = chunk_document(doc.text, self.embedder.token_offsets, self.settings.chunk_tokens,
                                    self.settings.chunk_overlap)
            if len(chunks) > self.settings.max_document_chunks:  # checked before anything is written
                raise DocumentTooLarge(
                    f"'{doc.filename}' makes {len(chunks)} chunks; the limit per document is "
                    f"{self.settings.max_document_chunks}. Split it into smaller documents.")
            doc_id = "d" + uuid.uuid4().hex[:15]
            base = document_metadata(doc_id, doc.title, doc.filename, doc.kind, scope, user.id, len(chunks),
                                     doc.size, doc.sha256, time.time())
            ids = [f"{doc_id}:{c.index:05d}" for c in chunks]
            # Chunk 0 goes last: until it is stored the document does not exist for listings or rebuilds.
            order = list(range(1, len(chunks))) + [0]
            try:
                for b in range(0, len(order), self.batch_size):
                    batch = order[b:b + self.batch_size]
                    vecs = self.embedder.encode([chunks[i].text for i in batch])
                    col.add(ids=[ids[i] for i in batch], embeddings=vecs,
                            documents=[chunks[i].text for i in batch],
                            metadatas=[chunk_metadata(base, chunks[i]) for i in batch])
                    report(min(b + len(batch), len(order)) / len(order), f"embedded {b + len(batch)}/{len(order)}")
                index.add([(ids[i], doc_id, vis, chunks[i].text) for i in range(len(chunks))])
            except BaseException:
                # Roll back whatever got written (also on KeyboardInterrupt), then let the error surface.
                col.delete(where={"doc_id": doc_id})
                index.remove_doc(doc_id)
                raise
        return self._info(base)

    @staticmethod
    def _info(meta: dict[str, Any]) -> DocumentInfo:
        return DocumentInfo(doc_id=meta["doc_id"], title=meta["title"], filename=meta["filename"],
                            kind=meta["kind"], scope=meta["scope"], owner_id=int(meta["owner_id"]),
                            chunks=int(meta["n_chunks"]), size=int(meta["doc_bytes"]), sha256=meta["doc_sha256"],
                            created_at=float(meta["created_at"]))

    def delete_document(self, user: User, doc_id: str) -> int:
        """Delete a document and every chunk of it; returns the number of chunks removed.

        The uploader may delete their documents; an admin may also delete shared ones. Another user's
        private document is reported as not found (its existence is not revealed).
        """
        info = self.get_document(user, doc_id)
        if info.owner_id != user.id and not (info.scope == "shared" and user.is_admin):
            raise PermissionError(f"only the uploader or an admin may delete '{info.title}'")
        col = self.collection_for(visibility(info.scope, info.owner_id))
        with self._write_lock:
            before = len(col.get(where={"doc_id": doc_id}, include=[])["ids"])
            col.delete(where={"doc_id": doc_id})
            self.lexical.remove_doc(doc_id)
            left = col.get(where={"doc_id": doc_id}, include=[])["ids"]
            if left:
                raise KnowledgeError(f"{len(left)} chunks of {doc_id} are still stored after delete")
        return before

    # ------------------------------------------------------------------ reads
    def _readable_collections(self, user: User, scope: Scope | None = None) -> list[Any]:
        vis = readable_by(user) if scope is None else [visibility(scope, user.id)]
        return [c for c in (self.collection_for(v) for v in vis) if c is not None]

    def get_document(self, user: User, doc_id: str) -> DocumentInfo:
        for col in self._readable_collections(user):
            got = col.get(where={"$and": [{"doc_id": doc_id}, {"chunk_index": 0}]}, include=["metadatas"])
            if got["ids"]:
                return self._info(got["metadatas"][0])
        raise DocumentNotFound(f"document {doc_id!r} not found")

    def list_documents(self, user: User, scope: Scope | None = None) -> list[DocumentInfo]:
        """Documents `user` may read (their private ones and the shared ones), newest first."""
        docs = []
        for col in self._readable_collections(user, scope):
            docs += [self._info(m) for m in col.get(where={"chunk_index": 0}, include=["metadatas"])["metadatas"]]
        return sorted(docs, key=lambda d: d.created_at, reverse=True)

    def document_chunks(self, user: User, doc_id: str) -> list[StoredChunk]:
        """Every chunk of a document `user` may read, in order (for the teacher and the UI)."""
        info = self.get_document(user, doc_id)
        col = self.collection_for(visibility(info.scope, info.owner_id))
        got = col.get(where={"doc_id": doc_id}, include=["documents", "metadatas"])
        rows = [StoredChunk(doc_id, cid, int(meta["chunk_index"]), text)
                for cid, text, meta in zip(got["ids"], got["documents"], got["metadatas"], strict=True)]
        return sorted(rows, key=lambda c: c.index)

    def chunk_texts(self, chunk_ids: list[str]) -> dict[str, str]:
        """Texts of chunks by id, whoever owns them: for system jobs (evaluation), never for a user's prompt."""
        out: dict[str, str] = {}
        for col in self._all_collections().values():
            todo = [c for c in chunk_ids if c not in out]
            if not todo:
                break
            got = col.get(ids=todo, include=["documents"])
            out.update(zip(got["ids"], got["documents"], strict=True))
        return out

    def shared_chunks(self, chunk_ids: list[str]) -> dict[str, tuple[str, str]]:
        """(title, text) of the chunks among `chunk_ids` that are still stored in the shared documents.

        For the dataset builder: passages a served answer cited go back into its training prompt, but
        only from shared documents (a user's private document must not reach an adapter everyone is
        served with), and only while the document exists (deleting it drops its passages).
        """
        return self._chunks_in(visibility("shared", 0), chunk_ids)

    def all_shared_chunks(self) -> list[tuple[str, str, str, str]]:
        """(chunk_id, doc_id, title, text) of every chunk of the shared documents, by chunk id.

        For the dataset builder's distractor passages and "not in the documents" rows
        (training/passage_rows.py): it reads the shared collection only, so no private chunk is ever among them.
        """
        col = self.collection_for(visibility("shared", 0))
        if col is None:
            return []
        got = col.get(include=["documents", "metadatas"])
        rows = [(str(cid), str((meta or {}).get("doc_id") or ""), str((meta or {}).get("title") or ""), text or "")
                for cid, text, meta in zip(got["ids"], got["documents"], got["metadatas"], strict=True)]
        return sorted(rows)

    def private_chunks(self, owner_id: int, chunk_ids: list[str]) -> dict[str, tuple[str, str]]:
        """(title, text) of the chunks among `chunk_ids` stored in `owner_id`'s own private documents.

        For that user's personal adapter only (training/personal.py): it reads one collection, the owner's,
        so another user's chunk id finds nothing here whatever the caller asks."""
        return self._chunks_in(visibility("private", owner_id), chunk_ids)

    def _chunks_in(self, vis: str, chunk_ids: list[str]) -> dict[str, tuple[str, str]]:
        col = self.collection_for(vis)
        if col is None or not chunk_ids:
            return {}
        got = col.get(ids=sorted(set(chunk_ids)), include=["documents", "metadatas"])
        return {cid: (str(meta.get("title") or ""), text)
                for cid, text, meta in zip(got["ids"], got["documents"], got["metadatas"], strict=True)}

    @property
    def collection(self) -> _AllCollections:
        """Read-only view over all document collections, for code written when there was one collection.

        Prefer `document_chunks` and `chunk_texts`.
        """
        return _AllCollections(self)

    def count_chunks(self) -> int:
        return sum(int(c.count()) for c in self._all_collections().values())

    def has_documents(self, user: User) -> bool:
        """Whether `user` can read any chunk at all (cheap: answered by the in-memory index)."""
        return self.lexical.count_visible(readable_by(user)) > 0

    def search(self, user: User, query: str, k: int | None = None, mode: Mode = "hybrid",
               candidates: int = 30) -> list[Hit]:
        """The `k` best chunks for `query` among those `user` may read."""
        k = k or self.settings.retrieval_k
        if not isinstance(query, str) or not query.strip():
            return []
        vis = readable_by(user)
        index = self.lexical
        dense: list[tuple[str, float]] = []
        sources = [(v, n) for v in vis if (n := index.count_visible([v])) > 0]
        if mode in ("hybrid", "dense") and sources:
            qvec = self.embedder.encode([query])
            for v, n in sources:
                # Ids and distances only: texts and metadata are fetched for the final k, not 2 x 30 candidates.
                res = self.collection_for(v).query(query_embeddings=qvec, n_results=min(candidates, n),
                                                   include=["distances"])
                for cid, dist in zip(res["ids"][0], res["distances"][0], strict=True):
                    if index.has_doc(cid.rsplit(":", 1)[0]):  # else still being written, or half-written by a crash
                        dense.append((cid, 1.0 - float(dist)))
            dense = sorted(dense, key=lambda x: x[1], reverse=True)[:candidates]
        lexical = index.search(query, vis, candidates) if mode in ("hybrid", "lexical") else []
        weight = latin_share(query) if self.settings.embedder.startswith("embedded:") else 1.0
        fused = self._fuse(dense, [(cid, score) for cid, score, _ in lexical], mode, weight)[:k]
        by_vis: dict[str, list[str]] = {}
        for cid, _ in fused:
            v = index.visibility_of(cid)
            if v is None or v not in vis:
                raise KnowledgeError(f"retrieval returned chunk {cid} outside the user's scope")
            by_vis.setdefault(v, []).append(cid)
        texts: dict[str, str] = {}
        metas: dict[str, dict[str, Any]] = {}
        for v, ids in by_vis.items():
            got = self.collection_for(v).get(ids=ids, include=["documents", "metadatas"])
            for cid, text, meta in zip(got["ids"], got["documents"], got["metadatas"], strict=True):
                texts[cid], metas[cid] = text, meta
        fused = [(cid, score) for cid, score in fused if cid in texts]  # deleted between ranking and fetching
        dense_of = dict(dense)
        lex_of = {cid: (score, cov) for cid, score, cov in lexical}
        hits = []
        for cid, score in fused:
            meta = metas[cid]
            if meta["visibility"] not in vis:  # belt and braces: only readable collections were opened
                raise KnowledgeError(f"retrieval returned chunk {cid} outside the user's scope")
            lex = lex_of.get(cid)
            hits.append(Hit(doc_id=meta["doc_id"], title=meta["title"], chunk_id=cid, text=texts[cid], score=score,
                            scope=meta["scope"], dense_score=dense_of.get(cid), lexical_score=lex[0] if lex else None,
                            lexical_coverage=lex[1] if lex else None))
        return hits

    @staticmethod
    def _fuse(dense: list[tuple[str, float]], lexical: list[tuple[str, float]], mode: Mode,
              dense_weight: float = 1.0) -> list[tuple[str, float]]:
        if mode == "dense":
            return dense
        if mode == "lexical":
            return lexical
        scores: dict[str, float] = {}
        for ranking, weight in ((dense, dense_weight), (lexical, 1.0)):
            for rank, (cid, _) in enumerate(ranking):
                scores[cid] = scores.get(cid, 0.0) + weight / (RRF_K + rank + 1)
        return sorted(scores.items(), key=lambda kv: kv[1], reverse=True)


_LETTER = re.compile(r"[^\W\d_]")


def latin_share(text: str) -> float:
    """The share of the letters of `text` in Latin script (1.0 when it has none).

    The embedded embedder learnt English only: for a Korean question its ranking is noise (0.43 recall@5
    on the labelled Korean questions against 1.00 for BM25, docs/benchmarks.md), so hybrid search weighs
    the dense ranking by how much of the question it can read. A configured multilingual model keeps
    its full weight.
    """
    letters = _LETTER.findall(text)
    if not letters:
        return 1.0
    return sum(1 for c in letters if c < "\u0250") / len(letters)


class _AllCollections:
    """`get`/`count` across every document collection (ids, where and include only; no paging)."""

    def __init__(self, kb: KnowledgeBase) -> None:
        self._kb = kb

    def get(self, ids: list[str] | None = None, where: dict[str, Any] | None = None,
            include: list[str] | None = None) -> dict[str, list[Any]]:
        include = ["documents", "metadatas"] if include is None else list(include)
        out: dict[str, list[Any]] = {"ids": [], **{k: [] for k in include}}
        for col in self._kb._all_collections().values():
            got = col.get(ids=ids, where=where, include=include)
            out["ids"] += got["ids"]
            for k in include:
                out[k] += list(got[k])
        return out

    def count(self) -> int:
        return self._kb.count_chunks()
