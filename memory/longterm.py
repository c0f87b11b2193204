"""Long-term memory: what the assistant keeps about each user across conversations.

In: a `Settings` (embedder, `memory_k`) and the conversation `Store` (its SQL engine; tables from
migration 5), users' explicit requests ("remember that ...", edits and deletions in the Memory page)
and their chat messages, from which `extract_facts` picks facts and preferences. Out: `Memory`
records (list, history), `Recalled` memories ranked by embedding similarity to a question, and
`contains_forgotten` for training-data hygiene.

Rules:
- One user's memories are only ever read with that user's id.
- A newer fact never silently duplicates or contradicts an older one: the same text is a no-op; a
  fact for the same slot ("name", "my:dog", "location") or a near-identical one of the same kind
  (cosine >= `SUPERSEDE_SIMILARITY`, e.g. "I prefer short answers" -> "I prefer long answers")
  supersedes the old one, which is kept with `status='superseded'` and `superseded_by` = the new id.
  Edits are new versions too.
- Forgetting deletes the memory and every older version of it (hard delete). What is left is a
  tombstone per forgotten phrase: a sha256 digest of its normalised text, never the text, so that
  `contains_forgotten` can keep that fact out of training sets without storing it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from memory.db import utcnow, write_transaction
from memory.embedder import get_embedder
from memory.schema import memories, memory_tombstones
from memory.store import Store

if TYPE_CHECKING:
    from assistant.config import Settings  # type only: memory/ never imports assistant/ at runtime

Kind = Literal["fact", "preference", "note"]
Source = Literal["explicit", "extracted", "edit"]
KINDS = ("fact", "preference", "note")
SOURCES = ("explicit", "extracted", "edit")
MAX_MEMORY_CHARS = 500
SUPERSEDE_SIMILARITY = 0.8  # measured: short/long answers 0.86, German/English replies 0.86, tea/coffee 0.74
RECALL_MIN_SCORE = 0.3
FORGET_MIN_SCORE = 0.5
MAX_NGRAM = 8

@dataclass(frozen=True)
class Memory:
    id: int
    user_id: int
    text: str
    kind: Kind
    slot: str | None
    source: Source
    status: Literal["active", "superseded"]
    superseded_by: int | None
    created_at: datetime
    updated_at: datetime

    def as_prompt_item(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text}


@dataclass(frozen=True)
class Recalled:
    memory: Memory
    score: float


@dataclass(frozen=True)
class Remembered:
    """What `remember` did: 'added', 'duplicate' (already known, nothing new) or 'superseded' (replaced older ones)."""

    memory: Memory
    action: Literal["added", "duplicate", "superseded"]
    replaced: tuple[Memory, ...] = ()


@dataclass(frozen=True)
class Candidate:
    """A fact or preference found in a user's message."""

    text: str
    kind: Kind
    slot: str | None
    value: str  # the part that identifies the fact ("Bob" in "My name is Bob."), hashed when forgotten
    explicit: bool = False  # the user asked to remember it


# ---------------------------------------------------------------------------------------- extraction
# Sentence ends, and "..., and I ..." / "... and my ..." (a new statement about the user).
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+|,?\s+and\s+(?=(?:i|my)\b)", re.I)
_QUESTION_START = re.compile(
    r"^(what|who|whom|whose|where|when|why|how|which|do|does|did|is|are|was|were|can|could|would|will|should|"
    r"shall|may|am)\b", re.I)
_HYPOTHETICAL = re.compile(r"^(if|when|suppose|imagine|pretend|let's say|what if)\b", re.I)
_NEGATION = re.compile(r"\b(not|never|no longer|isn't|aren't|wasn't)\b", re.I)
_REMEMBER = re.compile(r"^(?:please\s+)?(?:can you\s+|could you\s+)?remember(?:\s+that|\s*:)?\s+(?P<x>.+)$", re.I)
_FORGET = re.compile(r"^(?:please\s+)?forget(?:\s+that|\s+about|\s*:)?\s+(?P<x>.+)$", re.I)
_LEAD_IN = re.compile(r"^(?:actually|btw|by the way|also|oh|well|so|and|fyi|just so you know|for the record|hi|hello|"
                      r"hey|hi there|ok|okay)"
                      r"[,:]?\s+", re.I)
_TRAILING_TIME = re.compile(r"\s+(?:now|nowadays|these days|at the moment|currently)$", re.I)
_VALUE_END = re.compile(r"\s*(?:,|;|\s+(?:and|but|so|because|which)\s+|\s+-\s+).*$", re.I)
_SLOTS: list[tuple[re.Pattern[str], str | None, str]] = [
    # (pattern, slot or None for "use group 'slot'", canonical text template)
    (re.compile(r"^(?:my name is|my name's|call me|i am called|i'm called)\s+(?P<v>.+)$", re.I), "name",
     "My name is {v}."),
    (re.compile(r"^(?:i live in|i'm living in|i am living in|i'm based in|i am based in)\s+(?P<v>.+)$", re.I),
     "location", "I live in {v}."),
    (re.compile(r"^(?:i work as|i'm working as|i am working as)\s+(?P<v>.+)$", re.I), "job", "I work as {v}."),
    (re.compile(r"^(?:i work at|i work for|i'm working at|i am working at)\s+(?P<v>.+)$", re.I), "employer",
     "I work at {v}."),
    (re.compile(r"^my (?:favou?rite) (?P<slot>[\w' -]{1,30}?) is\s+(?P<v>.+)$", re.I), None,
     "My favourite {slot} is {v}."),
    (re.compile(r"^my (?P<slot>[\w'-]+(?: [\w'-]+){0,2}?) (?:is|are)\s+(?P<v>.+)$", re.I), None, "My {slot} is {v}."),
]
# "my question is ...", "my problem is ..." describe the conversation, not the person.
_NOT_FACTS = frozenset("question problem issue point guess answer request bad pleasure concern understanding code "
                       "error output result message turn mistake apologies bet fault".split())
# "I like this answer", "never mind": about the moment, not a lasting preference.
_DEICTIC = re.compile(r"^(this|that|these|those|it|you|your|mind)\b(?! when)", re.I)
_PREFERENCE = re.compile(
    r"^(?:i(?:'d| would)? (?:really )?(?:prefer|like|love|enjoy|hate|dislike|don't like|do not like)|"
    r"i'd rather|i would rather|please always|please never|always|never)\s+(?P<v>.+)$", re.I)


def _tidy(text: str) -> str:
    return " ".join(text.split()).strip(" \"'").rstrip(".!")


def _value(text: str) -> str:
    return _TRAILING_TIME.sub("", _VALUE_END.sub("", _tidy(text))).strip()


def _core(value: str) -> str:
    """"called Rex" -> "Rex": the identifying part, hashed into the tombstone when forgotten."""
    return re.sub(r"^(?:called|named)\s+", "", value, flags=re.I)


def _classify(sentence: str, explicit: bool) -> Candidate | None:
    s = _LEAD_IN.sub("", _tidy(sentence))
    if not s or s.endswith("?") or _QUESTION_START.match(s) or _HYPOTHETICAL.match(s):
        return None
    for pattern, slot, template in _SLOTS:
        m = pattern.match(s)
        if not m or _NEGATION.search(m.group("v")):
            continue
        v = _value(m.group("v"))
        if not v or len(v) > 80:
            continue
        noun = m.group("slot").lower() if slot is None else ""
        if slot is None and "favourite" not in template and noun in _NOT_FACTS:
            continue
        slot_name = slot or ("favourite:" if "favourite" in template else "my:") + noun
        text = template.format(v=v, slot=noun)
        return Candidate(text=text, kind="fact", slot=slot_name, value=_core(v), explicit=explicit)
    m = _PREFERENCE.match(s)
    if m and len(s) <= 200 and not _DEICTIC.match(m.group("v")):
        return Candidate(text=s[0].upper() + s[1:] + ".", kind="preference", slot=None, value=_tidy(m.group("v")),
                         explicit=explicit)
    if explicit and len(s) <= MAX_MEMORY_CHARS:
        return Candidate(text=s[0].upper() + s[1:] + ".", kind="note", slot=None, value=s, explicit=True)
    return None


def extract_facts(message: str) -> list[Candidate]:
    """Facts and preferences a user states about themselves, plus anything they ask to be remembered."""
    found: list[Candidate] = []
    for sentence in _SENTENCE.split(message or ""):
        s = _tidy(sentence)
        if not s:
            continue
        m = _REMEMBER.match(s)
        cand = _classify(m.group("x"), explicit=True) if m else _classify(s, explicit=False)
        if cand and all(c.text != cand.text for c in found):
            found.append(cand)
    return found


def forget_request(message: str) -> str | None:
    """The thing to forget in "forget that ..." / "please forget my name", else None."""
    m = _FORGET.match(_tidy(message))
    return _tidy(m.group("x")) if m else None


def remember_request(message: str) -> str | None:
    """The thing to remember in "remember that ..." / "please remember: ...", else None."""
    m = _REMEMBER.match(_tidy(message))
    return _tidy(m.group("x")) if m else None


# ---------------------------------------------------------------------------------------- hashing
def normalise(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.casefold()))


def digest(phrase: str) -> str:
    return hashlib.sha256(normalise(phrase).encode()).hexdigest()


def _ngram_digests(text: str) -> set[str]:
    words = normalise(text).split()
    out = set()
    for n in range(1, MAX_NGRAM + 1):
        for i in range(len(words) - n + 1):
            out.add(hashlib.sha256(" ".join(words[i:i + n]).encode()).hexdigest())
    return out


# ---------------------------------------------------------------------------------------- the store
def _row(r: Any) -> Memory:
    return Memory(id=r.id, user_id=r.user_id, text=r.text, kind=r.kind, slot=r.slot, source=r.source,
                  status=r.status, superseded_by=r.superseded_by, created_at=r.created_at, updated_at=r.updated_at)


def _tombstone_digests(conn: Connection, user_id: int) -> set[str]:
    q = sa.select(memory_tombstones.c.digest).where(memory_tombstones.c.user_id == user_id)
    return set(conn.execute(q).scalars())


def forgotten_digests(engine: Engine) -> dict[int, set[str]]:
    """Per user, the digests of every phrase they told the assistant to forget (training-data hygiene)."""
    out: dict[int, set[str]] = {}
    with engine.connect() as conn:
        for user_id, d in conn.execute(sa.select(memory_tombstones.c.user_id, memory_tombstones.c.digest)):
            out.setdefault(int(user_id), set()).add(d)
    return out


def _check_text(text: Any) -> str:
    if not isinstance(text, str):
        raise ValueError(f"a memory must be text, got {type(text).__name__}")
    clean = " ".join(text.split())
    if not clean:
        raise ValueError("a memory cannot be empty")
    if "\x00" in clean:
        raise ValueError("a memory cannot contain NUL bytes")
    if len(clean) > MAX_MEMORY_CHARS:
        raise ValueError(f"a memory is at most {MAX_MEMORY_CHARS} characters, got {len(clean)}")
    return clean


class LongTermMemory:
    """Per-user memories in SQL; embeddings stored with each row for recall."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.engine = store.engine

    # ------------------------------------------------------------------ embeddings
    def _embed(self, texts: list[str]) -> np.ndarray:
        return get_embedder(self.settings.embedder, self.settings.models_dir / "embedders").encode(texts)

    def _vectors(self, rows: list[Any]) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """Vectors of `rows`, and the ones that had to be computed (never embedded, or by another model)."""
        stale = [r for r in rows if r.embedding is None or r.embedder != self.settings.embedder]
        fresh = dict(zip([r.id for r in stale], self._embed([r.text for r in stale]), strict=True)) if stale else {}
        if not rows:
            return np.zeros((0, 1), np.float32), fresh
        return np.stack([fresh[r.id] if r.id in fresh else np.frombuffer(r.embedding, dtype=np.float32)
                         for r in rows]), fresh

    def _save_vectors(self, fresh: dict[int, np.ndarray]) -> None:
        if not fresh:
            return
        with write_transaction(self.engine) as conn:
            for mid, vec in fresh.items():
                conn.execute(memories.update().where(memories.c.id == mid)
                             .values(embedding=vec.astype(np.float32).tobytes(), embedder=self.settings.embedder))

    # ------------------------------------------------------------------ reads
    def list_memories(self, user_id: int, include_history: bool = False) -> list[Memory]:
        """The user's memories, newest first; superseded versions only with `include_history`."""
        q = sa.select(memories).where(memories.c.user_id == user_id)
        if not include_history:
            q = q.where(memories.c.status == "active")
        with self.engine.connect() as conn:
            return [_row(r) for r in conn.execute(q.order_by(memories.c.updated_at.desc(), memories.c.id.desc()))]

    def get(self, user_id: int, memory_id: int) -> Memory | None:
        with self.engine.connect() as conn:
            r = conn.execute(sa.select(memories).where(memories.c.id == memory_id,
                                                       memories.c.user_id == user_id)).first()
        return _row(r) if r else None

    def history(self, user_id: int, memory_id: int) -> list[Memory]:
        """A memory and every older version it superseded, newest first."""
        with self.engine.connect() as conn:
            return [_row(r) for r in self._lineage(conn, user_id, memory_id)]

    def _lineage(self, conn: Connection, user_id: int, memory_id: int) -> list[Any]:
        out, frontier = [], [memory_id]
        while frontier:
            rows = list(conn.execute(sa.select(memories).where(memories.c.user_id == user_id,
                                                               memories.c.id.in_(frontier))))
            out.extend(rows)
            frontier = [r.id for r in conn.execute(sa.select(memories.c.id).where(
                memories.c.user_id == user_id, memories.c.superseded_by.in_([r.id for r in rows])))]
        return out

    def recall(self, user_id: int, query: str, k: int | None = None,
               min_score: float = RECALL_MIN_SCORE) -> list[Recalled]:
        """The user's active memories most similar to `query` (cosine >= `min_score`), best first."""
        k = self.settings.memory_k if k is None else k
        if not isinstance(query, str) or not query.strip():
            return []
        with self.engine.connect() as conn:
            rows = list(conn.execute(sa.select(memories).where(memories.c.user_id == user_id,
                                                               memories.c.status == "active")))
        if not rows:
            return []
        vecs, fresh = self._vectors(rows)
        self._save_vectors(fresh)
        scores = vecs @ self._embed([query])[0]
        order = np.argsort(-scores, kind="stable")[:k]
        return [Recalled(_row(rows[i]), float(scores[i])) for i in order if scores[i] >= min_score]

    def preferences(self, user_id: int, limit: int = 3) -> list[Memory]:
        """Active preferences, newest first: they shape every answer, whatever the question."""
        return [m for m in self.list_memories(user_id) if m.kind == "preference"][:limit]

    # ------------------------------------------------------------------ writes
    def remember(self, user_id: int, text: str, kind: Kind = "fact", source: Source = "explicit",
                 slot: str | None = None) -> Remembered:
        """Store a memory; an identical one is a no-op, a contradicting one is superseded (see module doc)."""
        clean = _check_text(text)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        if self.store.get_user(user_id) is None:
            raise LookupError(f"user {user_id} does not exist")
        vec = self._embed([clean])[0]
        with write_transaction(self.engine) as conn:
            rows = list(conn.execute(sa.select(memories).where(memories.c.user_id == user_id,
                                                               memories.c.status == "active")))
            same = [r for r in rows if normalise(r.text) == normalise(clean)]
            if same:
                conn.execute(memories.update().where(memories.c.id == same[0].id).values(updated_at=utcnow()))
                return Remembered(_row(same[0]), "duplicate")
            if slot is not None:
                replaced = [r for r in rows if r.slot == slot]
            else:
                candidates = [r for r in rows if r.kind == kind and r.slot is None]
                sims = self._vectors(candidates)[0] @ vec if candidates else np.zeros(0)
                replaced = [r for r, s in zip(candidates, sims, strict=True) if s >= SUPERSEDE_SIMILARITY]
            now = utcnow()
            new_id = conn.execute(memories.insert().values(
                user_id=user_id, text=clean, kind=kind, slot=slot, source=source, status="active",
                embedding=vec.astype(np.float32).tobytes(), embedder=self.settings.embedder,
                created_at=now, updated_at=now)).inserted_primary_key[0]
            if replaced:
                conn.execute(memories.update().where(memories.c.id.in_([r.id for r in replaced]))
                             .values(status="superseded", superseded_by=new_id, updated_at=now))
            new = _row(conn.execute(sa.select(memories).where(memories.c.id == new_id)).one())
        return Remembered(new, "superseded" if replaced else "added", tuple(_row(r) for r in replaced))

    def remember_candidate(self, user_id: int, cand: Candidate) -> Remembered:
        return self.remember(user_id, cand.text, kind=cand.kind, slot=cand.slot,
                             source="explicit" if cand.explicit else "extracted")

    def learn_from(self, user_id: int, message: str) -> list[Remembered]:
        """Extract facts/preferences from a user's message and remember them (duplicates are no-ops)."""
        if forget_request(message) is not None:
            return []  # "forget that my name is Bob" must not teach "my name is Bob"
        return [self.remember_candidate(user_id, c) for c in extract_facts(message)]

    def edit(self, user_id: int, memory_id: int, text: str) -> Memory:
        """Replace a memory's text: a new version that supersedes the old one (lineage kept)."""
        clean = _check_text(text)
        vec = self._embed([clean])[0]
        with write_transaction(self.engine) as conn:
            old = conn.execute(sa.select(memories).where(memories.c.id == memory_id, memories.c.user_id == user_id,
                                                         memories.c.status == "active")).first()
            if old is None:
                raise LookupError(f"memory {memory_id} not found")
            now = utcnow()
            new_id = conn.execute(memories.insert().values(
                user_id=user_id, text=clean, kind=old.kind, slot=old.slot, source="edit", status="active",
                embedding=vec.astype(np.float32).tobytes(), embedder=self.settings.embedder,
                created_at=now, updated_at=now)).inserted_primary_key[0]
            conn.execute(memories.update().where(memories.c.id == memory_id)
                         .values(status="superseded", superseded_by=new_id, updated_at=now))
            return _row(conn.execute(sa.select(memories).where(memories.c.id == new_id)).one())

    def forget(self, user_id: int, memory_id: int) -> int:
        """Delete a memory with all its older versions; returns how many rows went. Tombstones keep digests only."""
        with write_transaction(self.engine) as conn:
            rows = self._lineage(conn, user_id, memory_id)
            if not rows:
                raise LookupError(f"memory {memory_id} not found")
            self._tombstone(conn, user_id, rows)
            ids = [r.id for r in rows]
            conn.execute(memories.delete().where(memories.c.id.in_(ids)))
            return len(ids)

    def forget_matching(self, user_id: int, description: str, min_score: float = FORGET_MIN_SCORE) -> list[Memory]:
        """Forget the active memory that best matches a description ("my name", "that I like tea")."""
        desc = _tidy(description)
        if not desc:
            return []
        if desc.lower() in ("everything", "everything about me", "all", "all about me", "everything you know"):
            targets = self.list_memories(user_id)
        else:
            cand = _classify(desc, explicit=True)
            by_slot = [m for m in self.list_memories(user_id) if cand and cand.slot and m.slot == cand.slot]
            slot_word = re.match(r"^my (\w+(?: \w+)?)$", desc, re.I)
            by_slot += [m for m in self.list_memories(user_id)
                        if slot_word and m.slot in (slot_word.group(1).lower(), "my:" + slot_word.group(1).lower())]
            if by_slot:
                targets = by_slot[:1]
            else:
                best = self.recall(user_id, desc, k=1, min_score=min_score)
                targets = [best[0].memory] if best else []
        for m in targets:
            self.forget(user_id, m.id)
        return targets

    def _tombstone(self, conn: Connection, user_id: int, rows: list[Any]) -> None:
        phrases = set()
        for r in rows:
            phrases.add(r.text)
            cand = _classify(r.text, explicit=True)
            if cand:
                phrases.add(cand.value)
        now = utcnow()
        have = _tombstone_digests(conn, user_id)
        new = {digest(p) for p in phrases if normalise(p)} - have
        if new:
            conn.execute(memory_tombstones.insert(),
                         [{"user_id": user_id, "digest": d, "forgotten_at": now} for d in new])

    def contains_forgotten(self, user_id: int, text: str) -> bool:
        """Whether `text` mentions something this user told us to forget (for training-data hygiene)."""
        with self.engine.connect() as conn:
            digests = _tombstone_digests(conn, user_id)
        return bool(digests and digests & _ngram_digests(text))

    list = list_memories  # the name the Memory page and the brief use
