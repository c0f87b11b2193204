"""BM25 over words, for the lexical half of hybrid retrieval.

In: chunks (id, document id, visibility, text) added and removed as documents come and go, and a
query with the set of visibilities the asking user may read. Out: the best chunk ids with their
BM25 scores, computed only over the chunks that user may read (so corpus statistics never depend on
another user's private documents).

Why not `rank_bm25`: it scores every chunk in Python for every query term (~10 ms per term at 100k
chunks) and must be rebuilt from scratch on every change. This index keeps postings in a few sorted
numpy segments: adding a document appends one small segment, deleting marks its chunks dead, and a
query touches only the postings of its own terms. Segments are merged (and dead chunks dropped) in
the background of writes, never per query.

Terms (`terms`): NFKC + casefold words; accents folded for Latin script (Zürich = Zurich); codes
kept whole and split (`ERR-4312` -> `err-4312`, `err`, `4312`); scripts written without spaces or with
attached particles (Hangul, CJK, kana, Thai) also as character bigrams (서울에서 -> 서울, 울에, 에서), so
names, codes and non-English text match without a language model.
"""

from __future__ import annotations

import math
import re
import threading
import unicodedata
from collections import Counter
from dataclasses import dataclass

import numpy as np

K1 = 1.2
B = 0.75
_WORD = re.compile(r"\w+(?:[-./:@+#]\w+)*")
_SEPARATORS = re.compile(r"[-./:@+#_]")
_NO_SPACE_SCRIPT = re.compile(r"[\u0e00-\u0e7f\u1100-\u11ff\u3040-\u30ff\u3130-\u318f\u3400-\u4dbf\u4e00-\u9fff"
                              r"\uac00-\ud7a3\uf900-\ufaff]")
# Only dropped from queries (documents keep them): they match nearly every English chunk, so they
# cost time on long posting lists and add almost nothing to the ranking.
QUERY_STOPWORDS = frozenset(
    "a an and are as at be by can do does for from how i in is it me my of on or our the this to was "
    "what when where which who why will with you your".split()
)


def _fold(word: str) -> str:
    if word.isascii():
        return word
    decomposed = unicodedata.normalize("NFKD", word)
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def terms(text: str) -> list[str]:
    """Index terms of `text`, in order, with repeats (term frequency matters)."""
    out: list[str] = []
    for m in _WORD.finditer(unicodedata.normalize("NFKC", text).casefold()):
        token = m.group()
        parts = [p for p in _SEPARATORS.split(token) if p]
        if len(parts) > 1:
            out.append(_fold(token))
        for part in parts:
            if _NO_SPACE_SCRIPT.search(part):
                out.append(part)
                out.extend(part[i:i + 2] for i in range(len(part) - 1))
            else:
                out.append(_fold(part))
    return out


def query_terms(text: str) -> list[str]:
    """Terms of a query without English function words; "who are you" has none and matches nothing."""
    return [t for t in terms(text) if t not in QUERY_STOPWORDS]


@dataclass
class _Segment:
    """Postings sorted by term id: term_ids[i] occurs tf[i] times in chunk number pos[i]."""

    term_ids: np.ndarray  # int32, sorted
    pos: np.ndarray  # int32
    tf: np.ndarray  # float32

    @property
    def size(self) -> int:
        return int(self.term_ids.shape[0])


def _segment(term_ids: np.ndarray, pos: np.ndarray, tf: np.ndarray) -> _Segment:
    order = np.argsort(term_ids, kind="stable")
    return _Segment(term_ids[order], pos[order], tf[order])


class LexicalIndex:
    """Incremental BM25 index. Thread-safe; one instance lives in the process that owns the documents."""

    MAX_SEGMENTS = 12

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._vocab: dict[str, int] = {}
        self._segments: list[_Segment] = []
        self.chunk_ids: list[str] = []
        self._chunk_doc: list[str] = []
        self._pos_of: dict[str, int] = {}
        self._docs: dict[str, list[int]] = {}
        self._vis_code: dict[str, int] = {}
        self._vis_names: list[str] = []
        self._alive = np.zeros(0, dtype=bool)
        self._dl = np.zeros(0, dtype=np.float32)
        self._vis = np.zeros(0, dtype=np.int32)
        self._dead = 0

    # ------------------------------------------------------------------ state
    def __len__(self) -> int:
        return len(self.chunk_ids) - self._dead

    def has_doc(self, doc_id: str) -> bool:
        return doc_id in self._docs

    def visibility_of(self, chunk_id: str) -> str | None:
        with self._lock:
            pos = self._pos_of.get(chunk_id)
            if pos is None:
                return None
            return self._vis_names[int(self._vis[pos])]

    def count_visible(self, visibilities: list[str]) -> int:
        """Live chunks with one of these visibilities."""
        with self._lock:
            codes = [self._vis_code[v] for v in visibilities if v in self._vis_code]
            size = len(self.chunk_ids)
            return int((self._alive[:size] & np.isin(self._vis[:size], codes)).sum()) if codes else 0

    @property
    def doc_ids(self) -> set[str]:
        return set(self._docs)

    def _grow(self, n: int) -> None:
        need = len(self.chunk_ids) + n
        if need <= self._alive.shape[0]:
            return
        cap = max(need, 2 * self._alive.shape[0], 1024)
        for name in ("_alive", "_dl", "_vis"):
            old = getattr(self, name)
            new = np.zeros(cap, dtype=old.dtype)
            new[: old.shape[0]] = old
            setattr(self, name, new)

    # ------------------------------------------------------------------ writes
    def add(self, chunks: list[tuple[str, str, str, str]]) -> None:
        """Add (chunk_id, doc_id, visibility, text) rows; a chunk id already present is replaced."""
        if not chunks:
            return
        # Tokenise outside the lock: it is the slow part and touches no shared state.
        counted = [(cid, doc, vis, Counter(terms(text))) for cid, doc, vis, text in chunks]
        with self._lock:
            self._remove_chunks([self._pos_of[c[0]] for c in counted if c[0] in self._pos_of])
            self._grow(len(counted))
            t_ids: list[int] = []
            p_ids: list[int] = []
            tfs: list[int] = []
            for cid, doc, vis, counts in counted:
                p = len(self.chunk_ids)
                self.chunk_ids.append(cid)
                self._chunk_doc.append(doc)
                self._pos_of[cid] = p
                self._docs.setdefault(doc, []).append(p)
                self._alive[p] = True
                self._dl[p] = sum(counts.values())
                if vis not in self._vis_code:
                    self._vis_code[vis] = len(self._vis_names)
                    self._vis_names.append(vis)
                self._vis[p] = self._vis_code[vis]
                for term, n in counts.items():
                    t_ids.append(self._vocab.setdefault(term, len(self._vocab)))
                    p_ids.append(p)
                    tfs.append(n)
            self._segments.append(_segment(np.asarray(t_ids, dtype=np.int32), np.asarray(p_ids, dtype=np.int32),
                                           np.asarray(tfs, dtype=np.float32)))
            self._maybe_merge()

    def remove_doc(self, doc_id: str) -> int:
        """Forget every chunk of a document; returns how many there were."""
        with self._lock:
            positions = self._docs.get(doc_id, [])
            n = len(positions)
            self._remove_chunks(list(positions))
            self._maybe_merge()
            return n

    def _remove_chunks(self, positions: list[int]) -> None:
        gone: dict[str, set[int]] = {}
        for p in positions:
            if not self._alive[p]:
                continue
            self._alive[p] = False
            self._dead += 1
            self._pos_of.pop(self.chunk_ids[p], None)
            gone.setdefault(self._chunk_doc[p], set()).add(p)
        for doc, ps in gone.items():
            rest = [q for q in self._docs.get(doc, []) if q not in ps]
            if rest:
                self._docs[doc] = rest
            else:
                self._docs.pop(doc, None)

    def _maybe_merge(self) -> None:
        total = len(self.chunk_ids)
        if self._dead and self._dead > 0.25 * total:
            self._compact()
        elif len(self._segments) > self.MAX_SEGMENTS:
            # Size-tiered: fold every segment but the largest into one, so a stream of small uploads
            # never re-sorts the big base segment.
            big = max(range(len(self._segments)), key=lambda i: self._segments[i].size)
            rest = [s for i, s in enumerate(self._segments) if i != big]
            merged = _segment(np.concatenate([s.term_ids for s in rest]), np.concatenate([s.pos for s in rest]),
                              np.concatenate([s.tf for s in rest]))
            self._segments = [self._segments[big], merged]

    def _compact(self) -> None:
        """Drop dead chunks and renumber the live ones into one segment."""
        n = len(self.chunk_ids)
        keep = np.flatnonzero(self._alive[:n])
        remap = np.full(n, -1, dtype=np.int32)
        remap[keep] = np.arange(keep.shape[0], dtype=np.int32)
        t = np.concatenate([s.term_ids for s in self._segments]) if self._segments else np.zeros(0, np.int32)
        p = np.concatenate([s.pos for s in self._segments]) if self._segments else np.zeros(0, np.int32)
        f = np.concatenate([s.tf for s in self._segments]) if self._segments else np.zeros(0, np.float32)
        live = self._alive[p]
        self._segments = [_segment(t[live], remap[p[live]], f[live])] if live.any() else []
        self.chunk_ids = [self.chunk_ids[i] for i in keep]
        self._chunk_doc = [self._chunk_doc[i] for i in keep]
        self._pos_of = {cid: i for i, cid in enumerate(self.chunk_ids)}
        self._docs = {}
        for i, doc in enumerate(self._chunk_doc):
            self._docs.setdefault(doc, []).append(i)
        m = keep.shape[0]
        alive, dl, vis = self._alive[keep], self._dl[keep], self._vis[keep]
        self._alive = np.zeros(max(m, 1024), dtype=bool)
        self._dl = np.zeros_like(self._alive, dtype=np.float32)
        self._vis = np.zeros_like(self._alive, dtype=np.int32)
        self._alive[:m], self._dl[:m], self._vis[:m] = alive, dl, vis
        self._dead = 0

    # ------------------------------------------------------------------ reads
    def _postings(self, tid: int) -> tuple[np.ndarray, np.ndarray]:
        pos_parts, tf_parts = [], []
        key = np.int32(tid)  # a Python int would make numpy cast the whole int32 array on every lookup
        for seg in self._segments:
            lo = int(seg.term_ids.searchsorted(key, side="left"))
            hi = int(seg.term_ids.searchsorted(key, side="right"))
            if hi > lo:
                pos_parts.append(seg.pos[lo:hi])
                tf_parts.append(seg.tf[lo:hi])
        if not pos_parts:
            return np.zeros(0, np.int32), np.zeros(0, np.float32)
        if len(pos_parts) == 1:
            return pos_parts[0], tf_parts[0]
        return np.concatenate(pos_parts), np.concatenate(tf_parts)

    def search(self, query: str, visibilities: list[str], n: int = 20) -> list[tuple[str, float, float]]:
        """Top `n` (chunk id, BM25 score, coverage) among chunks whose visibility is in `visibilities`.

        Coverage is the share of the query's idf mass that the chunk matches (0..1): a chunk that
        contains the rare words of the question scores near 1, one that only shares a common word
        ("what is 2+2" vs a chunk with "2") stays low. Query words the index has never seen count as
        rarest, so "tell me a joke" is not covered by a chunk that merely contains "tell".
        """
        qts = Counter(query_terms(query))
        with self._lock:
            codes = [self._vis_code[v] for v in visibilities if v in self._vis_code]
            size = len(self.chunk_ids)
            if not codes or not qts or size == 0:
                return []
            allowed = self._alive[:size] & np.isin(self._vis[:size], codes)
            n_docs = int(allowed.sum())
            if n_docs == 0:
                return []
            dl = self._dl[:size]
            avgdl = float(dl[allowed].mean()) or 1.0
            scores = np.zeros(size, dtype=np.float32)
            cover = np.zeros(size, dtype=np.float32)
            total_idf = 0.0
            for term, qtf in qts.items():
                tid = self._vocab.get(term)
                pos, tf = self._postings(tid) if tid is not None else (np.zeros(0, np.int32), None)
                ok = allowed[pos]
                pos = pos[ok]
                df = pos.shape[0]
                idf = math.log(1.0 + (n_docs - df + 0.5) / (df + 0.5))
                total_idf += qtf * idf
                if df == 0:
                    continue
                tf = tf[ok]
                norm = K1 * (1.0 - B + B * dl[pos] / avgdl)
                scores[pos] += qtf * idf * tf * (K1 + 1.0) / (tf + norm)
                cover[pos] += qtf * idf
            hit = np.flatnonzero(scores)
            if hit.shape[0] > n:
                hit = hit[np.argpartition(-scores[hit], n - 1)[:n]]
            hit = hit[np.argsort(-scores[hit], kind="stable")]
            total_idf = total_idf or 1.0
            return [(self.chunk_ids[i], float(scores[i]), float(cover[i]) / total_idf) for i in hit]
