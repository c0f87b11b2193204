"""Rows that keep an adapter reading its passages: distractor passages and honest "not in the documents" rows.

In: the train split's SFT examples (training/dataset_sources.py `Example`, already carrying the passages their
answers cited) and every chunk of the shared documents (`memory.knowledge.KnowledgeBase.all_shared_chunks`).
Out: the same rows with other documents' passages shuffled in, and extra rows whose passages do not hold the
answer and whose target says so. Both are build options of training/dataset_build.py, off by default until a
loop run has measured them (docs/training.md).

Why. A loop run traded grounding for style (issue 26): the adapter learnt to copy a document's first sentence
whatever was asked. Training rows always showed the one passage that held the answer, so nothing in them
rewarded reading it. RAFT (Zhang et al., 2024) trains with the right passage among distractors, and with
rows where no passage holds the answer.

- Distractors: a grounded SFT row (its prompt quotes cited passages) gets `n` passages of other shared
  documents, chosen by a salted hash of the row, never a chunk of a document the row cites, and shuffled
  in with the row's own passages by the same hash. A citation "[2]" in the answer is renumbered to the cited
  passage's new place.
- Abstain rows: a grounded row's question with passages of other shared documents only (as many as a
  grounded row shows), answered `ABSTAIN_ANSWER`, a sentence `training.fact_check.abstains` counts as an
  honest "not in the documents" (the loop bench judges unanswerable questions with the same patterns).
- Title negatives: a DPO pair per grounded SFT row, its answer chosen over the title of the document it cites
  (candidates answered "Northgate Rail Depot: maintenance intervals" to a torque question: the product's name,
  the way users' edits opened, then the title). Rows whose answer holds the title are left out.

Privacy: passages come only from the shared documents' collection and are PII-scrubbed like every other
text of a row; a private chunk never reaches one (the build's privacy check runs again on the result).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from assistant.prompt import Passage
from training.dataset_sources import Example
from training.fact_check import ABSTAIN_ANSWER
from training.hygiene import Scrubbed, scrub_pii

# Every shared chunk as (chunk_id, doc_id, title, text): KnowledgeBase.all_shared_chunks.
PoolReader = Callable[[], list[tuple[str, str, str, str]]]
HashFn = Callable[[str], float]  # a stable number in [0, 1) for a key (dataset_build.group_fraction, salted)
_CITATION = re.compile(r"\[(\d+)\]")


@dataclass(frozen=True)
class PoolChunk:
    chunk_id: str
    doc_id: str
    title: str
    text: str


@dataclass
class SharedPool:
    """The shared documents' chunks, PII-scrubbed on first use (each once per build)."""

    chunks: list[PoolChunk]
    pii: Counter = field(default_factory=Counter)  # PII kind -> replacements in the passages used
    _scrubbed: dict[str, Passage] = field(default_factory=dict)
    _cache: dict[str, Scrubbed] = field(default_factory=dict)

    @classmethod
    def read(cls, reader: PoolReader | None) -> SharedPool:
        rows = reader() if reader is not None else []
        return cls(sorted((PoolChunk(*r) for r in rows if r[3] and r[3].strip()), key=lambda c: c.chunk_id))

    def doc_of(self) -> dict[str, str]:
        return {c.chunk_id: c.doc_id for c in self.chunks}

    def passage(self, chunk: PoolChunk) -> Passage:
        p = self._scrubbed.get(chunk.chunk_id)
        if p is None:
            p = self._scrubbed[chunk.chunk_id] = Passage(self._scrub(chunk.title), "shared", self._scrub(chunk.text))
        return p

    def _scrub(self, text: str) -> str:
        out = self._cache.get(text)
        if out is None:
            out = self._cache[text] = scrub_pii(text)
            self.pii.update(out.counts)
        return out.text


def row_key(ex: Example) -> str:
    """Ids that repeat when the same data is logged again (dataset_build._row_order's), never a document id."""
    p = ex.prov
    return f"{p.group}|{p.message_id}|{p.synthetic_id}|{p.feedback_id}|{ex.kind}"


def grounded(ex: Example) -> bool:
    """An SFT row whose prompt quotes passages its answer was given (teacher rows: the chunk it was written from)."""
    return ex.kind == "sft" and bool(ex.passages) and ex.prov.source in ("human", "teacher")


def _others(ex: Example, pool: SharedPool, doc_of: dict[str, str], n: int, fraction: HashFn,
            salt: str) -> list[PoolChunk]:
    """Up to `n` pool chunks of documents the row does not cite, in a stable order of the row and the chunk."""
    cited = set(ex.passage_ids)
    own_docs = {doc_of[c] for c in cited if c in doc_of} | ({ex.prov.doc_id} if ex.prov.doc_id else set())
    candidates = [c for c in pool.chunks if c.doc_id not in own_docs and c.chunk_id not in cited]
    key = row_key(ex)
    candidates.sort(key=lambda c: fraction(f"{salt}|{key}|{c.chunk_id}"))
    return candidates[:n]


def _renumber(answer: str, moves: dict[int, int]) -> str:
    return _CITATION.sub(lambda m: f"[{moves.get(int(m.group(1)), int(m.group(1)))}]", answer)


def with_distractors(rows: list[Example], pool: SharedPool, n: int, fraction: HashFn) -> tuple[list[Example], dict]:
    """Each grounded SFT row with `n` other documents' passages shuffled in; others unchanged."""
    info: dict[str, Any] = {"per_row": n, "pool_chunks": len(pool.chunks), "rows": 0, "passages_added": 0,
                            "rows_short": 0}
    if n <= 0:
        return rows, info
    doc_of = pool.doc_of()
    out = []
    for ex in rows:
        if not grounded(ex):
            out.append(ex)
            continue
        extra = _others(ex, pool, doc_of, n, fraction, "distract")
        if not extra:
            info["rows_short"] += 1
            out.append(ex)
            continue
        info["rows_short"] += len(extra) < n
        key = row_key(ex)
        shown = [(cid, p, i) for i, (cid, p) in enumerate(zip(ex.passage_ids, ex.passages, strict=True), 1)]
        shown += [(c.chunk_id, pool.passage(c), None) for c in extra]
        shown.sort(key=lambda t: fraction(f"place|{key}|{t[0]}"))
        moves = {old: new for new, (_, _, old) in enumerate(shown, 1) if old is not None}
        out.append(replace(ex, passages=tuple(p for _, p, _ in shown), passage_ids=tuple(c for c, _, _ in shown),
                           completion=_renumber(ex.completion, moves)))
        info["rows"] += 1
        info["passages_added"] += len(extra)
    return out, info



def abstain_examples(rows: list[Example], pool: SharedPool, share: float, distractors: int,
                     fraction: HashFn) -> tuple[list[Example], dict]:
    """New rows for `share` of the grounded SFT rows: the same question, other documents' passages only (as many
    as the row shows with its `distractors`), answered `ABSTAIN_ANSWER`. The rows are chosen by a stable hash."""
    base = [ex for ex in rows if grounded(ex)]
    wanted = int(round(share * len(base)))
    info: dict[str, Any] = {"share": share, "grounded_rows": len(base), "requested": wanted, "added": 0,
                            "no_other_document": 0, "answer": ABSTAIN_ANSWER}
    if wanted == 0:
        return [], info
    doc_of = pool.doc_of()
    out = []
    for ex in sorted(base, key=lambda e: fraction(f"abstain|{row_key(e)}")):
        if len(out) == wanted:
            break
        others = _others(ex, pool, doc_of, len(ex.passages) + distractors, fraction, "abstain")
        if not others:
            info["no_other_document"] += 1
            continue
        out.append(replace(ex, completion=ABSTAIN_ANSWER, passages=tuple(pool.passage(c) for c in others),
                           passage_ids=tuple(c.chunk_id for c in others),
                           prov=replace(ex.prov, origin="abstain")))
    info["added"] = len(out)
    return out, info


def title_negatives(rows: list[Example]) -> tuple[list[Example], dict]:
    """A DPO example per grounded SFT row: its prompt and answer, with its first passage's title as the rejected
    answer. The answer already preferred is kept whole; only the title is new."""
    out = []
    info: dict[str, Any] = {"grounded_rows": 0, "added": 0, "answer_holds_title": 0}
    for ex in rows:
        if not grounded(ex):
            continue
        info["grounded_rows"] += 1
        title = ex.passages[0].title.strip()
        if not title or title.lower() in ex.completion.lower():
            info["answer_holds_title"] += bool(title)
            continue
        out.append(replace(ex, kind="dpo", rejected=title, prov=replace(ex.prov, origin="title_negative")))
    info["added"] = len(out)
    return out, info
