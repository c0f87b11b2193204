"""Synthetic pairs: run a teacher over document chunks and store what it produced.

In: a `Store` (for the `synthetic_pairs` table, migration 3), a `Teacher` (training/teacher.py) and
chunks (`Chunk(doc_id, chunk_id, text)`: from a KnowledgeBase with `chunks_from_knowledge`, or from a
folder of text/markdown files with `chunks_from_folder`).
Out: rows in `synthetic_pairs` (accepted and rejected, with the judge's record and the chunk they
came from) and a `SynthReport` with counts, acceptance rate and pairs per minute.
`training.dataset_build` reads the accepted rows back through `SyntheticPairs`.

Command: `assistant data synth --docs tests/data/docs` (training/cli.py).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from memory.db import utcnow, write_transaction
from memory.schema import synthetic_pairs
from memory.store import Store
from training.teacher import Chunk, Teacher, TeacherPair

if TYPE_CHECKING:
    from memory.knowledge import KnowledgeBase
    from memory.types import User

PAIR_KINDS = ("doc", "repair")


@dataclass(frozen=True)
class StoredPair:
    id: int
    kind: str
    teacher: str
    doc_id: str | None
    chunk_id: str | None
    question: str
    question_source: str
    answer: str
    accepted: bool
    score: float
    rejected: str | None
    rejected_score: float | None
    target_message_id: int | None
    created_at: datetime
    judge: dict[str, Any]


class SyntheticPairs:
    """Reads and writes `synthetic_pairs` through the store's engine."""

    def __init__(self, store: Store) -> None:
        self.engine = store.engine

    def add(self, pair: TeacherPair, kind: str = "doc", target_message_id: int | None = None) -> int:
        if kind not in PAIR_KINDS:
            raise ValueError(f"kind must be one of {PAIR_KINDS}, got {kind!r}")
        if kind == "repair" and target_message_id is None:
            raise ValueError("a repair pair needs the id of the answer it repairs")
        if not pair.question.strip() or not pair.answer.strip():
            raise ValueError("a synthetic pair needs a question and an answer")
        values = dict(
            kind=kind, teacher=pair.teacher[:200], doc_id=pair.doc_id, chunk_id=pair.chunk_id,
            chunk_sha256=pair.chunk_sha256, question=pair.question, question_source=pair.question_source,
            answer=pair.answer, rejected=pair.rejected, accepted=pair.accepted, score=pair.score,
            rejected_score=pair.rejected_score, judge=pair.judge_record(),
            target_message_id=target_message_id, created_at=utcnow(),
        )
        with write_transaction(self.engine) as conn:
            return int(conn.execute(synthetic_pairs.insert().values(**values)
                                    .returning(synthetic_pairs.c.id)).scalar_one())

    def list(self, *, accepted_only: bool = False, kind: str | None = None, since_id: int = 0,
             limit: int | None = None) -> list[StoredPair]:
        query = sa.select(synthetic_pairs).where(synthetic_pairs.c.id > since_id).order_by(synthetic_pairs.c.id)
        if accepted_only:
            query = query.where(synthetic_pairs.c.accepted.is_(True))
        if kind is not None:
            query = query.where(synthetic_pairs.c.kind == kind)
        if limit is not None:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            return [StoredPair(
                id=r.id, kind=r.kind, teacher=r.teacher, doc_id=r.doc_id, chunk_id=r.chunk_id,
                question=r.question, question_source=r.question_source, answer=r.answer,
                accepted=bool(r.accepted), score=float(r.score), rejected=r.rejected,
                rejected_score=r.rejected_score, target_message_id=r.target_message_id,
                created_at=r.created_at, judge=r.judge or {},
            ) for r in conn.execute(query)]

    def delete_for_document(self, doc_id: str) -> int:
        """Forget everything generated from a document (call when the document is deleted)."""
        with write_transaction(self.engine) as conn:
            return conn.execute(synthetic_pairs.delete().where(synthetic_pairs.c.doc_id == doc_id)).rowcount

    def existing_ids(self, ids: Iterable[int]) -> set[int]:
        ids = list(ids)
        if not ids:
            return set()
        with self.engine.connect() as conn:
            return set(conn.execute(sa.select(synthetic_pairs.c.id)
                                    .where(synthetic_pairs.c.id.in_(ids))).scalars())

    def read_chunks(self) -> set[str]:
        """The sha256 of every chunk the teacher has already been asked about (a pair stored, accepted or not)."""
        with self.engine.connect() as conn:
            return set(conn.execute(sa.select(synthetic_pairs.c.chunk_sha256).distinct()
                                    .where(synthetic_pairs.c.chunk_sha256.is_not(None))).scalars())

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            total = conn.execute(sa.select(sa.func.count()).select_from(synthetic_pairs)).scalar_one()
            accepted = conn.execute(sa.select(sa.func.count()).select_from(synthetic_pairs)
                                    .where(synthetic_pairs.c.accepted.is_(True))).scalar_one()
        return {"total": int(total), "accepted": int(accepted)}


# ---------------------------------------------------------------------------------------------- chunks

_HEADING = re.compile(r"^\s*#+\s*(.+?)\s*$", re.M)


def chunk_text(doc_id: str, text: str, *, title: str = "", max_chars: int = 900) -> list[Chunk]:
    """Paragraph-packed chunks of at most ~max_chars (a paragraph longer than that is one chunk)."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip() and not _HEADING.fullmatch(p.strip())]
    chunks: list[Chunk] = []
    current: list[str] = []
    for p in paragraphs:
        if current and len("\n\n".join([*current, p])) > max_chars:
            chunks.append(Chunk(doc_id, str(len(chunks)), "\n\n".join(current), title))
            current = []
        current.append(p)
    if current:
        chunks.append(Chunk(doc_id, str(len(chunks)), "\n\n".join(current), title))
    return chunks


def pick_chunks(chunks: list[Chunk], n: int, read: set[str] | None = None) -> list[Chunk]:
    """At most `n` of `chunks` for the teacher: the ones it has not read yet (`read`: their sha256) first, spread
    over the documents (each document in turn) and over each document's length (evenly spaced chunks), in the
    documents' order. Taking the first `n` instead read the first document or two every cycle, so questions
    about the others never got a teacher row (issue 26)."""
    if n < 1:
        return []
    read = read or set()
    pool = [i for i, c in enumerate(chunks) if c.sha256 not in read] or list(range(len(chunks)))
    if len(pool) <= n:  # every unread chunk, topped up with read ones in order
        taken = set(pool)
        taken |= set([i for i in range(len(chunks)) if i not in taken][:n - len(pool)])
        return [chunks[i] for i in sorted(taken)]
    by_doc: dict[str, list[int]] = {}
    for i in pool:
        by_doc.setdefault(chunks[i].doc_id, []).append(i)
    quota, left = dict.fromkeys(by_doc, 0), n
    while left:  # one slot per document in turn, while it has chunks left (pool > n, so this ends)
        for doc_id, idx in by_doc.items():
            if left and quota[doc_id] < len(idx):
                quota[doc_id] += 1
                left -= 1
    picked = [idx[round(j * (len(idx) - 1) / (k - 1))] if k > 1 else idx[0]
              for doc_id, idx in by_doc.items() if (k := quota[doc_id]) for j in range(k)]
    return [chunks[i] for i in sorted(picked)]


class FolderNotAllowed(PermissionError):
    """A server folder that admin synth may not read (outside `synth_docs_dir`, or none configured)."""


def allowed_docs_folder(root: Path | None, docs: str | Path) -> Path:
    """The folder that `docs` names, if it is `root` (settings.synth_docs_dir) or a folder under it.

    Admin synth used to read .md/.txt files from any folder the server can read (issue 21). A relative
    `docs` is taken inside `root`; links are resolved before the check, so no `..` or symlink leads out.
    Outside `root` the answer is the same whether the folder exists or not (FolderNotAllowed), so the
    check reveals nothing about the rest of the disk; a missing folder inside `root` is a LookupError.
    """
    if root is None:
        raise FolderNotAllowed("reading a server folder is turned off: synth reads the knowledge base, or set "
                               "synth_docs_dir to the one folder it may read")
    base = Path(root).expanduser().resolve()
    wanted = Path(docs).expanduser()
    target = (wanted if wanted.is_absolute() else base / wanted).resolve()
    if target != base and base not in target.parents:
        raise FolderNotAllowed(f"{str(docs)!r} is not inside the synth documents folder (synth_docs_dir)")
    if not target.is_dir():
        raise LookupError(f"there is no folder {str(docs)!r} in the synth documents folder")
    return target


def allowed_docs_file(root: Path | None, name: Any) -> Path:
    """A file named by an admin's option (a replay set, curated document questions): like
    `allowed_docs_folder`, it must lie inside `root`, and exist there."""
    if not isinstance(name, str | Path):
        raise ValueError(f"a file name was expected, got {name!r}")
    if root is None:
        raise FolderNotAllowed("naming a server file is turned off: set synth_docs_dir to the one folder "
                               "whose files admin options may name")
    base = Path(root).expanduser().resolve()
    wanted = Path(name).expanduser()
    target = (wanted if wanted.is_absolute() else base / wanted).resolve()
    if base not in target.parents:
        raise FolderNotAllowed(f"{str(name)!r} is not inside the synth documents folder (synth_docs_dir)")
    if not target.is_file():
        raise LookupError(f"there is no file {str(name)!r} in the synth documents folder")
    return target


def chunks_from_folder(folder: Path, *, max_chars: int = 900, root: Path | None = None) -> list[Chunk]:
    """Chunks of every .md/.txt file in `folder` (doc_id = file stem, title = first heading).

    With `root`, a file whose real path (links resolved) lies outside it is not read.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: {folder}")
    inside = Path(root).resolve() if root is not None else None
    out: list[Chunk] = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in (".md", ".txt")):
        real = path.resolve()
        if not real.is_file() or (inside is not None and inside not in real.parents):
            continue
        text = path.read_text(encoding="utf-8")
        heading = _HEADING.search(text)
        title = heading.group(1) if heading else path.stem.replace("_", " ")
        out.extend(chunk_text(path.stem, text, title=title, max_chars=max_chars))
    if not out:
        raise ValueError(f"no .md or .txt documents with text in {folder}")
    return out


def chunks_from_knowledge(kb: KnowledgeBase, user: User, doc_ids: Iterable[str] | None = None) -> list[Chunk]:
    """Chunks of the documents `user` can read in a `memory.knowledge.KnowledgeBase`.

    Reads the chunk texts straight from the knowledge base's chroma collection (documents and their
    `doc_id`/`chunk_index` metadata), so the teacher sees exactly what retrieval serves.
    """
    wanted = set(doc_ids) if doc_ids is not None else None
    docs = kb.list_documents(user)
    titles = {d.doc_id: d.title for d in docs}
    out: list[Chunk] = []
    for doc_id in titles:
        if wanted is not None and doc_id not in wanted:
            continue
        got = kb.collection.get(where={"doc_id": doc_id}, include=["documents", "metadatas"])
        rows = sorted(zip(got["ids"], got["documents"], got["metadatas"], strict=True),
                      key=lambda r: int((r[2] or {}).get("chunk_index", 0)))
        for chunk_id, text, _meta in rows:
            if text and text.strip():
                out.append(Chunk(doc_id=doc_id, chunk_id=str(chunk_id), text=text, title=titles[doc_id] or ""))
    return out


# ---------------------------------------------------------------------------------------------- running


@dataclass(frozen=True)
class SynthReport:
    chunks: int
    pairs: int
    accepted: int
    dpo_pairs: int
    template_questions: int
    accepted_extracts: int  # accepted pairs whose answer is the passage's own sentence, not the model's
    seconds: float
    pair_ids: tuple[int, ...]

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.pairs if self.pairs else 0.0

    @property
    def accepted_per_minute(self) -> float:
        return 60.0 * self.accepted / self.seconds if self.seconds > 0 else 0.0

    @property
    def pairs_per_minute(self) -> float:
        return 60.0 * self.pairs / self.seconds if self.seconds > 0 else 0.0


ProgressFn = Callable[[int, int, list[TeacherPair]], None]


def run_synth(store: Store, teacher: Teacher, chunks: list[Chunk], *, questions_per_chunk: int = 2,
              progress: ProgressFn | None = None) -> SynthReport:
    """Ask `teacher` for pairs from every chunk and store them; `progress(done, total, new_pairs)`."""
    if questions_per_chunk < 1:
        raise ValueError("questions_per_chunk must be at least 1")
    table = SyntheticPairs(store)
    start = time.perf_counter()
    ids: list[int] = []
    pairs = accepted = dpo = templates = extracts = 0
    for i, chunk in enumerate(chunks):
        made = teacher.pairs_for_chunk(chunk, questions_per_chunk)
        for pair in made:
            ids.append(table.add(pair, "doc"))
            pairs += 1
            accepted += pair.accepted
            dpo += pair.accepted and pair.rejected is not None
            templates += pair.question_source == "template"
            extracts += pair.accepted and pair.answer_origin == "extract"
        if progress is not None:
            progress(i + 1, len(chunks), made)
    return SynthReport(chunks=len(chunks), pairs=pairs, accepted=accepted, dpo_pairs=dpo,
                       template_questions=templates, accepted_extracts=extracts,
                       seconds=time.perf_counter() - start, pair_ids=tuple(ids))
