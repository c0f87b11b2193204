"""Build versioned SFT / DPO / KTO datasets from the conversation store and the teacher's pairs.

In: a `Store` (messages and feedback, plus the `synthetic_pairs` table), a `Settings` (for
`settings.datasets_dir`) and `BuildOptions`.
Out: a snapshot folder `<datasets_dir>/vNNNN/` and a `BuildResult`:

    vNNNN/manifest.json            counts per kind, split and source; filters and rows each removed;
                                   PII found per kind; sha256 of every JSONL file; options used
    vNNNN/{sft,dpo,kto}/           Hugging Face `datasets` DatasetDict (train/validation/test), save_to_disk
    vNNNN/jsonl/<kind>.<split>.jsonl
    vNNNN/heldout/<kind>.jsonl     copy of the frozen held-out set (+ heldout/<kind>/ as a Dataset)
    <datasets_dir>/heldout/        the frozen held-out evaluation set itself, written once and reused
    <datasets_dir>/LATEST          name of the newest complete snapshot

Formats are TRL's conversational ones: SFT `messages`; DPO `prompt`/`chosen`/`rejected`; KTO
`prompt`/`completion`/`label`. Every row also carries flat provenance columns (source human /
teacher / replay, origin, conversation, message, feedback, adapter, document, chunk, synthetic id);
trainers select the TRL columns with `TRL_COLUMNS[kind]`.

What becomes training data:
- SFT: answers rated up, edited corrections (the edit is the target), accepted teacher answers, and
  a configurable share of general replay data (train split only).
- DPO: edit pairs (edit chosen, original rejected), regenerate-and-choose pairs, a rated-down answer
  against a better alternative (an accepted regeneration of the same prompt, or an accepted teacher
  repair), teacher best-vs-worst candidates.
- KTO: thumbs up/down, unpaired.

Privacy by construction: prompts are rebuilt only from the `content` of user and assistant messages
that the user saw. System messages, retrieved sources and long-term memories stored with a message are
never read, so a memory the user deleted cannot come back through a stored prompt; and rows whose
messages mention a phrase the user told the assistant to forget (memory.longterm tombstones) are
dropped, in new builds and from the frozen held-out set alike. Every text is
PII-scrubbed, then quality-filtered, then de-duplicated (exact + MinHash near-duplicates, across all
splits, human data first) before anything is written. A deleted conversation is gone from the store
and so from every later build, and rows of it are dropped from the frozen held-out set too.

Splits are assigned by a salted hash of the group (`conv:<id>` or `doc:<doc_id>`), so they are
stable across rebuilds and a conversation or document never spans two splits. The frozen held-out set
is taken from the test split the first time there is enough data and reused afterwards; its groups
are excluded from train and validation in every later build, whatever the split ratios.

Command: `assistant data build` (training/cli.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from assistant.config import Settings
from memory.store import Store, conversations, feedback, messages
from training.hygiene import Deduplicator, QualityLimits, Scrubbed, quality_problem, scrub_pii
from training.synth import SyntheticPairs, synthetic_pairs

BUILDER_VERSION = 1
KINDS = ("sft", "dpo", "kto")
SPLITS = ("train", "validation", "test")
TRL_COLUMNS = {
    "sft": ["messages"],
    "dpo": ["prompt", "chosen", "rejected"],
    "kto": ["prompt", "completion", "label"],
}
PROVENANCE_COLUMNS = ["source", "origin", "group", "conversation_id", "message_id", "other_message_id",
                      "feedback_id", "adapter", "doc_id", "chunk_id", "synthetic_id"]
DEFAULT_REPLAY = Path(__file__).parent / "data" / "replay_general.jsonl"
HELDOUT_DIR = "heldout"
LATEST_FILE = "LATEST"
# Answers that may be trained on: finished ones, including a regenerated "alternative" (memory/store.py).
ANSWER_STATUSES = ("complete", "alternative")
# What the chat service leaves out of the history it sends the model (assistant/chat.py), so a
# rebuilt prompt shows the conversation as the model saw it.
HIDDEN_FROM_HISTORY = ("error", "alternative")

ProgressFn = Callable[[str, float], None]


class BuildError(RuntimeError):
    """The build could not complete; nothing was published (no snapshot folder, LATEST unchanged)."""


# ---------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class BuildOptions:
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    split_salt: str = "split-v1"  # changing it reshuffles every group; the held-out set stays frozen anyway
    context_messages: int = 6  # earlier user/assistant messages kept as context before the rated turn
    quality: QualityLimits = QualityLimits()
    near_dup_threshold: float = 0.85
    include_teacher: bool = True
    max_synthetic_share: float = 0.5  # of the train split, per kind
    synthetic_floor: int = 200  # teacher rows always allowed, so a fresh install can train on documents
    replay_path: Path | None = None  # None: the packaged general set (training/data/replay_general.jsonl)
    replay_ratio: float = 0.1  # replay rows per train SFT row
    heldout_min_rows: int = 20  # freeze the held-out set once the test split has this many rows
    heldout_max_per_kind: int = 500
    refreeze_heldout: bool = False  # an explicit admin decision: evaluation results stop being comparable

    def validate(self) -> None:
        r = self.split_ratios
        if len(r) != 3 or any(x < 0 for x in r) or abs(sum(r) - 1.0) > 1e-6 or r[0] <= 0:
            raise ValueError(f"split_ratios must be three non-negative numbers summing to 1 with train > 0, got {r}")
        if not 0.0 <= self.max_synthetic_share <= 1.0:
            raise ValueError(f"max_synthetic_share must be in [0, 1], got {self.max_synthetic_share}")
        if self.replay_ratio < 0:
            raise ValueError(f"replay_ratio must be >= 0, got {self.replay_ratio}")
        if self.context_messages < 0 or self.synthetic_floor < 0 or self.heldout_max_per_kind < 0:
            raise ValueError("context_messages, synthetic_floor and heldout_max_per_kind must be >= 0")
        if self.replay_ratio > 0 and self.replay_path is not None and not Path(self.replay_path).is_file():
            raise ValueError(f"replay file not found: {self.replay_path}")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["replay_path"] = str(self.replay_path or DEFAULT_REPLAY)
        d["split_ratios"] = list(self.split_ratios)
        return d


# ---------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Provenance:
    source: str  # "human", "teacher", "replay"
    origin: str  # thumb_up, thumb_down, edit, pair, regen_vs_down, teacher, teacher_repair, replay
    group: str  # split unit: "conv:<id>", "doc:<doc_id>", "replay:<n>"
    conversation_id: int | None = None
    message_id: int | None = None
    other_message_id: int | None = None  # the rejected answer of a DPO pair
    feedback_id: int | None = None
    adapter: str | None = None
    doc_id: str | None = None
    chunk_id: str | None = None
    synthetic_id: int | None = None


@dataclass(frozen=True)
class Example:
    """One training row before formatting: the context, the answer, and where it came from."""

    kind: str  # "sft", "dpo", "kto"
    prompt: tuple[tuple[str, str], ...]  # (role, content) ... ending with the user turn
    completion: str  # SFT target, DPO chosen, KTO completion
    prov: Provenance
    rejected: str | None = None  # DPO only
    label: bool | None = None  # KTO only

    def texts(self) -> list[str]:
        out = [c for _, c in self.prompt] + [self.completion]
        return out + ([self.rejected] if self.rejected is not None else [])

    def row(self) -> dict[str, Any]:
        prompt = [{"role": r, "content": c} for r, c in self.prompt]
        answer = [{"role": "assistant", "content": self.completion}]
        if self.kind == "sft":
            data: dict[str, Any] = {"messages": prompt + answer}
        elif self.kind == "dpo":
            data = {"prompt": prompt, "chosen": answer,
                    "rejected": [{"role": "assistant", "content": self.rejected or ""}]}
        else:
            data = {"prompt": prompt, "completion": answer, "label": bool(self.label)}
        p = self.prov  # field by field: dataclasses.asdict deep-copies and was a tenth of a 100k build
        data.update(source=p.source, origin=p.origin, group=p.group, conversation_id=p.conversation_id,
                    message_id=p.message_id, other_message_id=p.other_message_id, feedback_id=p.feedback_id,
                    adapter=p.adapter, doc_id=p.doc_id, chunk_id=p.chunk_id, synthetic_id=p.synthetic_id)
        return data

    def dedup_text(self) -> str:
        # The question and the answer(s) only: the earlier turns of a conversation are shared by every
        # rated answer in it and would make different answers look like near-duplicates.
        parts = [f"user: {self.prompt[-1][1]}", f"answer: {self.completion}"]
        if self.kind == "dpo":
            parts.append(f"rejected: {self.rejected}")
        if self.kind == "kto":
            parts.append(f"label: {self.label}")
        return "\n".join(parts)


@dataclass(frozen=True)
class LogMessage:
    id: int
    conversation_id: int
    role: str
    content: str
    adapter: str | None
    parent_id: int | None
    status: str


@dataclass(frozen=True)
class LogFeedback:
    id: int
    message_id: int
    kind: str
    rating: int | None
    corrected: str | None
    other_message_id: int | None
    chosen_message_id: int | None


@dataclass
class TrainingLog:
    """What a build reads from the store: feedback and the messages of conversations that have any."""

    messages: dict[int, LogMessage]
    by_conversation: dict[int, list[LogMessage]]
    feedback: list[LogFeedback]
    max_feedback_id: int = 0
    max_message_id: int = 0
    owners: dict[int, int] = field(default_factory=dict)  # conversation id -> user id


@dataclass
class FilterStats:
    removed: Counter = field(default_factory=Counter)  # filter name -> rows removed
    pii_rows: int = 0  # rows in which something was scrubbed
    pii: Counter = field(default_factory=Counter)  # PII kind -> replacements

    def as_list(self) -> list[dict[str, Any]]:
        order = ["pii_scrub"] + sorted(self.removed)
        out = []
        for name in order:
            if name == "pii_scrub":
                out.append({"name": "pii_scrub", "rows_changed": self.pii_rows, "removed": 0,
                            "by_kind": dict(sorted(self.pii.items()))})
            else:
                out.append({"name": name, "removed": self.removed[name]})
        return out


@dataclass(frozen=True)
class BuildResult:
    version: str
    path: Path
    manifest: dict[str, Any]

    def counts(self, kind: str) -> dict[str, int]:
        return self.manifest["counts"][kind]


# ---------------------------------------------------------------------------------------------- reading


def read_training_log(store: Store) -> TrainingLog:
    """Bulk, read-only: all feedback and the user/assistant messages of conversations that have feedback.

    Two queries instead of one per conversation, so 100k logged turns read in seconds. Only the
    columns a dataset may use are selected; `memories`, `sources`, `steps` are deliberately not.
    """
    fb_cols = (feedback.c.id, feedback.c.message_id, feedback.c.kind, feedback.c.rating, feedback.c.corrected,
               feedback.c.other_message_id, feedback.c.chosen_message_id)
    rated_conversations = (
        sa.select(messages.c.conversation_id)
        .join(feedback, feedback.c.message_id == messages.c.id)
        .distinct()
    )
    msg_cols = (messages.c.id, messages.c.conversation_id, messages.c.role, messages.c.content,
                messages.c.adapter, messages.c.parent_id, messages.c.status)
    with store.engine.connect() as conn:
        fb = [LogFeedback(*row) for row in conn.execute(sa.select(*fb_cols).order_by(feedback.c.id))]
        rows = conn.execute(
            sa.select(*msg_cols)
            .where(messages.c.conversation_id.in_(rated_conversations))
            .where(messages.c.role.in_(("user", "assistant")))
            .order_by(messages.c.conversation_id, messages.c.id)
        )
        msgs: dict[int, LogMessage] = {}
        by_conv: dict[int, list[LogMessage]] = defaultdict(list)
        for row in rows:
            m = LogMessage(*row)
            msgs[m.id] = m
            by_conv[m.conversation_id].append(m)
        max_msg = conn.execute(sa.select(sa.func.max(messages.c.id))).scalar() or 0
        owners = dict(conn.execute(sa.select(conversations.c.id, conversations.c.user_id)
                                   .where(conversations.c.id.in_(rated_conversations))).all())
    return TrainingLog(messages=msgs, by_conversation=dict(by_conv), feedback=fb,
                       max_feedback_id=fb[-1].id if fb else 0, max_message_id=int(max_msg), owners=owners)


# ---------------------------------------------------------------------------------------------- forgotten


def forgotten_digests(store: Store) -> dict[int, set[str]]:
    """Per user, the digests of phrases they told the assistant to forget (memory.longterm tombstones)."""
    from memory.longterm import tombstones

    out: dict[int, set[str]] = defaultdict(set)
    with store.engine.connect() as conn:
        for user_id, d in conn.execute(sa.select(tombstones.c.user_id, tombstones.c.digest)):
            out[int(user_id)].add(d)
    return dict(out)


def mentions_forgotten(texts: Iterable[str], digests: set[str]) -> bool:
    """Whether any word n-gram of `texts` is a forgotten phrase (the same hashing as memory.longterm)."""
    from memory.longterm import MAX_NGRAM, digest, normalise

    for text in texts:
        words = normalise(text).split()
        for n in range(1, MAX_NGRAM + 1):
            for i in range(len(words) - n + 1):
                if digest(" ".join(words[i:i + n])) in digests:
                    return True
    return False


class _Contexts:
    """Rebuilds the conversation a rated answer was given in, as the user saw it."""

    def __init__(self, log: TrainingLog, max_messages: int) -> None:
        self.log = log
        self.max_messages = max_messages
        self._index: dict[int, dict[int, int]] = {}

    def _position(self, conversation_id: int) -> dict[int, int]:
        if conversation_id not in self._index:
            self._index[conversation_id] = {m.id: i for i, m in enumerate(self.log.by_conversation[conversation_id])}
        return self._index[conversation_id]

    def prompt_for(self, answer: LogMessage) -> tuple[tuple[str, str], ...] | None:
        conv = self.log.by_conversation.get(answer.conversation_id, [])
        pos = self._position(answer.conversation_id)
        parent = self.log.messages.get(answer.parent_id) if answer.parent_id is not None else None
        if parent is None:  # imported history without parent links: the nearest earlier user message
            i = pos[answer.id] - 1
            while i >= 0 and conv[i].role != "user":
                i -= 1
            parent = conv[i] if i >= 0 else None
        if parent is None or parent.role != "user" or not parent.content.strip():
            return None
        # Earlier turns as shown: a regenerated answer replaces the one before it for the same question.
        history: list[LogMessage] = []
        answer_at: dict[int, int] = {}  # user message id -> index of its answer in history
        for m in conv[: pos[parent.id]]:
            if m.status in HIDDEN_FROM_HISTORY:
                continue
            if m.role == "assistant" and m.parent_id is not None:
                if m.parent_id in answer_at:
                    history[answer_at[m.parent_id]] = m
                    continue
                answer_at[m.parent_id] = len(history)
            history.append(m)
        history = history[-self.max_messages:] if self.max_messages else []
        while history and history[0].role != "user":
            history = history[1:]
        return tuple((m.role, m.content) for m in history) + (("user", parent.content),)


def _human_examples(log: TrainingLog, repairs: dict[int, list[Any]], options: BuildOptions,
                    skipped: Counter) -> list[Example]:
    ctx = _Contexts(log, options.context_messages)
    out: list[Example] = []
    edited: dict[int, LogFeedback] = {}
    for f in log.feedback:
        if f.kind == "edit" and f.corrected:
            edited[f.message_id] = f  # the latest edit of a message wins
    good_siblings: dict[int | None, list[LogMessage]] = defaultdict(list)  # parent id -> accepted answers
    rated_down: list[tuple[LogFeedback, LogMessage]] = []

    def prov(origin: str, m: LogMessage, f: LogFeedback, other: int | None = None) -> Provenance:
        return Provenance(source="human", origin=origin, group=f"conv:{m.conversation_id}",
                          conversation_id=m.conversation_id, message_id=m.id, other_message_id=other,
                          feedback_id=f.id, adapter=m.adapter)

    for f in log.feedback:
        m = log.messages.get(f.message_id)
        if m is None or m.role != "assistant" or m.status not in ANSWER_STATUSES:
            skipped["not_a_complete_answer"] += 1
            continue
        prompt = ctx.prompt_for(m)
        if prompt is None:
            skipped["no_prompt"] += 1
            continue
        if f.kind == "thumb" and f.rating == 1:
            out.append(Example("kto", prompt, m.content, prov("thumb_up", m, f), label=True))
            if m.id in edited:
                skipped["thumb_up_superseded_by_edit"] += 1
            else:
                out.append(Example("sft", prompt, m.content, prov("thumb_up", m, f)))
            good_siblings[m.parent_id].append(m)
        elif f.kind == "thumb" and f.rating == -1:
            out.append(Example("kto", prompt, m.content, prov("thumb_down", m, f), label=False))
            rated_down.append((f, m))
        elif f.kind == "edit":
            if edited.get(m.id) is not f:
                skipped["older_edit"] += 1
                continue
            out.append(Example("sft", prompt, f.corrected or "", prov("edit", m, f)))
            out.append(Example("dpo", prompt, f.corrected or "", prov("edit", m, f, other=m.id), rejected=m.content))
        elif f.kind == "pair":
            chosen_id = f.chosen_message_id
            other_id = f.other_message_id if chosen_id == f.message_id else f.message_id
            chosen, other = log.messages.get(chosen_id or -1), log.messages.get(other_id or -1)
            if (chosen is None or other is None or chosen.status not in ANSWER_STATUSES
                    or other.status not in ANSWER_STATUSES):
                skipped["pair_incomplete"] += 1
                continue
            if chosen.parent_id != other.parent_id:
                skipped["pair_different_prompts"] += 1
                continue
            prompt = ctx.prompt_for(chosen)
            if prompt is None:
                skipped["no_prompt"] += 1
                continue
            out.append(Example("dpo", prompt, chosen.content, prov("pair", chosen, f, other=other.id),
                               rejected=other.content))
            good_siblings[chosen.parent_id].append(chosen)

    # A rated-down answer against a better answer to the same question: an accepted regeneration, or an
    # accepted teacher repair of it. (Edits of it are already DPO pairs above.)
    for f, m in rated_down:
        prompt = ctx.prompt_for(m)
        if prompt is None:  # cannot happen: the thumb was only kept with a prompt
            continue
        for better in good_siblings.get(m.parent_id, []) if m.parent_id is not None else []:
            if better.id != m.id:
                out.append(Example("dpo", prompt, better.content,
                                   prov("regen_vs_down", better, f, other=m.id), rejected=m.content))
                break
        for rp in repairs.get(m.id, []):
            out.append(Example("dpo", prompt, rp.answer, Provenance(
                source="teacher", origin="teacher_repair", group=f"conv:{m.conversation_id}",
                conversation_id=m.conversation_id, message_id=m.id, other_message_id=m.id, feedback_id=f.id,
                adapter=m.adapter, doc_id=rp.doc_id, chunk_id=rp.chunk_id, synthetic_id=rp.id), rejected=m.content))
    return out


def _teacher_examples(pairs: Iterable[Any]) -> list[Example]:
    out: list[Example] = []
    for p in pairs:
        if p.kind != "doc":
            continue
        prov = Provenance(source="teacher", origin="teacher", group=f"doc:{p.doc_id}", doc_id=p.doc_id,
                          chunk_id=p.chunk_id, synthetic_id=p.id, adapter=None)
        prompt = (("user", p.question),)
        out.append(Example("sft", prompt, p.answer, prov))
        if p.rejected:
            out.append(Example("dpo", prompt, p.answer, prov, rejected=p.rejected))
    return out


def _replay_examples(path: Path) -> list[Example]:
    out: list[Example] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            try:
                msgs = json.loads(line)["messages"]
                turns = tuple((m["role"], m["content"]) for m in msgs)
            except (ValueError, KeyError, TypeError) as exc:
                raise BuildError(
                    f"{path}:{n + 1}: replay rows need {{'messages': [{{role, content}}, ...]}}: {exc}") from exc
            if len(turns) < 2 or turns[-1][0] != "assistant" or turns[-2][0] != "user":
                raise BuildError(f"{path}:{n + 1}: a replay row must end with a user turn and an assistant answer")
            out.append(Example("sft", turns[:-1], turns[-1][1],
                               Provenance(source="replay", origin="replay", group=f"replay:{n}")))
    return out


# ---------------------------------------------------------------------------------------------- hygiene


def _scrubbed(ex: Example, stats: FilterStats, cache: dict[str, Scrubbed]) -> Example:
    changed = False

    def s(text: str) -> str:
        nonlocal changed
        out = cache.get(text)
        if out is None:
            # The same message is context for every later rated answer of its conversation and
            # appears in SFT and KTO alike: scrub each distinct text once per build.
            out = cache[text] = scrub_pii(text)
        if out.changed:
            changed = True
            stats.pii.update(out.counts)
        return out.text

    new = replace(ex, prompt=tuple((r, s(c)) for r, c in ex.prompt), completion=s(ex.completion),
                  rejected=s(ex.rejected) if ex.rejected is not None else None)
    stats.pii_rows += changed
    return new


def clean(examples: list[Example], options: BuildOptions,
          cache: dict[str, Scrubbed] | None = None) -> tuple[list[Example], FilterStats]:
    """Scrub, quality-filter and de-duplicate, in that order; the first copy of a duplicate is kept."""
    stats = FilterStats()
    dedup = Deduplicator(threshold=options.near_dup_threshold)
    cache = {} if cache is None else cache
    kept: list[Example] = []
    for ex in examples:
        ex = _scrubbed(ex, stats, cache)
        problem = quality_problem(ex.completion, options.quality) or quality_problem(ex.prompt[-1][1], options.quality)
        if problem is None and ex.rejected is not None:
            problem = quality_problem(ex.rejected, options.quality)
            if problem is None and ex.rejected.strip() == ex.completion.strip():
                problem = "same_chosen_and_rejected"
        if problem is not None:
            stats.removed[f"quality:{problem}"] += 1
            continue
        dup = dedup.check(ex.dedup_text())
        if dup is not None:
            stats.removed[f"dedup:{dup}"] += 1
            continue
        kept.append(ex)
    return kept, stats


# ---------------------------------------------------------------------------------------------- splits


def group_fraction(group: str, salt: str) -> float:
    """A stable number in [0, 1) for a group: the same group always lands in the same split."""
    h = hashlib.sha256(f"{salt}\x1f{group}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def split_of(group: str, options: BuildOptions) -> str:
    x = group_fraction(group, options.split_salt)
    train, val, _ = options.split_ratios
    if x < train:
        return "train"
    if x < train + val:
        return "validation"
    return "test"


def _row_order(ex: Example, salt: str) -> float:
    p = ex.prov
    return group_fraction(f"{p.group}|{p.message_id}|{p.synthetic_id}|{p.feedback_id}|{ex.kind}", salt + "/row")


# ---------------------------------------------------------------------------------------------- held-out


def _heldout_exists(store: Store, rows: list[dict[str, Any]]) -> list[bool]:
    """Which frozen rows still have every message / synthetic pair they came from."""
    msg_ids = {r[k] for r in rows for k in ("message_id", "other_message_id") if r.get(k) is not None}
    syn_ids = {r["synthetic_id"] for r in rows if r.get("synthetic_id") is not None}
    alive_msgs: set[int] = set()
    with store.engine.connect() as conn:
        ids = sorted(msg_ids)
        for i in range(0, len(ids), 900):  # stay under SQLite's bound-parameter limit
            alive_msgs |= set(conn.execute(sa.select(messages.c.id).where(messages.c.id.in_(ids[i:i + 900])))
                              .scalars())
    alive_syn = SyntheticPairs(store).existing_ids(syn_ids)
    out = []
    for r in rows:
        ok = all(r.get(k) is None or r[k] in alive_msgs for k in ("message_id", "other_message_id"))
        ok = ok and (r.get("synthetic_id") is None or r["synthetic_id"] in alive_syn)
        out.append(ok)
    return out


def _owners(store: Store, conversation_ids: set[int]) -> dict[int, int]:
    ids = sorted(conversation_ids)
    out: dict[int, int] = {}
    with store.engine.connect() as conn:
        for i in range(0, len(ids), 900):
            out.update(conn.execute(sa.select(conversations.c.id, conversations.c.user_id)
                                    .where(conversations.c.id.in_(ids[i:i + 900]))).all())
    return out


def _row_texts(row: dict[str, Any]) -> list[str]:
    return [m["content"] for col in ("messages", "prompt", "chosen", "rejected", "completion")
            for m in row.get(col) or []]


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> str:
    """Write rows as JSONL (atomically) and return the file's sha256."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    h = hashlib.sha256()
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            line = json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n"
            f.write(line)
            h.update(line.encode("utf-8"))
    os.replace(tmp, path)
    return h.hexdigest()


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _load_heldout(root: Path, store: Store, forgotten: dict[int, set[str]]
                  ) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]] | None:
    meta_path = root / "meta.json"
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    rows = {k: _read_jsonl(root / f"{k}.jsonl") for k in KINDS}
    removed = 0
    owners = _owners(store, {r["conversation_id"] for k in KINDS for r in rows[k]} - {None}) if forgotten else {}
    for k in KINDS:
        alive = _heldout_exists(store, rows[k])
        for i, r in enumerate(rows[k]):
            owner = owners.get(r.get("conversation_id"))
            if alive[i] and owner in forgotten and mentions_forgotten(_row_texts(r), forgotten[owner]):
                alive[i] = False
        if not all(alive):
            removed += alive.count(False)
            rows[k] = [r for r, ok in zip(rows[k], alive, strict=True) if ok]
    if removed:
        # Deletion (of a conversation, or of a memory) wins over freezing: rewrite the frozen files.
        meta["removed_deleted"] = int(meta.get("removed_deleted", 0)) + removed
        meta["hashes"] = {k: _write_jsonl(root / f"{k}.jsonl", rows[k]) for k in KINDS}
        meta["counts"] = {k: len(rows[k]) for k in KINDS}
        _write_json(meta_path, meta)
    meta["removed_now"] = removed
    return rows, meta


def _freeze_heldout(root: Path, test_rows: dict[str, list[dict[str, Any]]], options: BuildOptions,
                    version: str) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    rows = {k: test_rows[k][: options.heldout_max_per_kind] for k in KINDS}
    tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {
        "frozen_at": datetime.now(UTC).isoformat(), "frozen_by_build": version, "split_salt": options.split_salt,
        "counts": {k: len(rows[k]) for k in KINDS},
        "hashes": {k: _write_jsonl(tmp / f"{k}.jsonl", rows[k]) for k in KINDS},
        "removed_deleted": 0,
    }
    _write_json(tmp / "meta.json", meta)
    if root.exists():  # only with refreeze_heldout
        shutil.rmtree(root)
    os.replace(tmp, root)
    meta["removed_now"] = 0
    return rows, meta


# ---------------------------------------------------------------------------------------------- writing


def _features(kind: str) -> Any:
    from datasets import Features, List, Value

    msg = List({"role": Value("string"), "content": Value("string")})
    prov = {"source": Value("string"), "origin": Value("string"), "group": Value("string"),
            "conversation_id": Value("int64"), "message_id": Value("int64"), "other_message_id": Value("int64"),
            "feedback_id": Value("int64"), "adapter": Value("string"), "doc_id": Value("string"),
            "chunk_id": Value("string"), "synthetic_id": Value("int64")}
    if kind == "sft":
        return Features({"messages": msg, **prov})
    if kind == "dpo":
        return Features({"prompt": msg, "chosen": msg, "rejected": msg, **prov})
    return Features({"prompt": msg, "completion": msg, "label": Value("bool"), **prov})


def _as_dataset(rows: list[dict[str, Any]], kind: str) -> Any:
    import pyarrow as pa
    from datasets import Dataset, DatasetInfo

    features = _features(kind)
    # Straight to Arrow with the features' schema: `Dataset.from_dict` encodes row by row in Python,
    # and column-wise an empty split still gets its schema (from_list([]) would have no columns).
    table = pa.Table.from_pydict({name: [r[name] for r in rows] for name in features}, schema=features.arrow_schema)
    return Dataset(table, info=DatasetInfo(features=features))


def _save_dataset(path: Path, splits: dict[str, list[dict[str, Any]]], kind: str) -> None:
    from datasets import DatasetDict

    _save_dict(path, DatasetDict({name: _as_dataset(rows, kind) for name, rows in splits.items()}))


def _save_dict(path: Path, dd: Any) -> None:
    # One shard per split: `datasets` writes an empty split as zero shards, which it then cannot load.
    with _quiet_datasets():
        dd.save_to_disk(str(path), num_shards=dict.fromkeys(dd, 1))


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No per-split "Saving the dataset" bars: the CLI shows one bar for the whole build."""
    from datasets.utils import logging as ds_logging

    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _reserve_version(root: Path) -> tuple[str, Path]:
    """Create the next `vNNNN` folder atomically (mkdir fails if another build took the number)."""
    existing = [int(p.name[1:]) for p in root.glob("v[0-9]*") if p.name[1:].isdigit()]
    n = max(existing, default=0) + 1
    while True:
        path = root / f"v{n:04d}"
        try:
            path.mkdir()
            return path.name, path
        except FileExistsError:
            n += 1


def list_snapshots(settings: Settings) -> list[Path]:
    """Complete snapshots (those with a manifest), oldest first."""
    root = settings.datasets_dir
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("v[0-9]*") if (p / "manifest.json").is_file())


def prune_snapshots(settings: Settings, keep: int) -> list[str]:
    """Delete all but the newest `keep` snapshots (never the one LATEST names); returns the removed names.

    Old snapshots hold data as it was when they were built, including conversations deleted since;
    pruning is how that data leaves the disk. The frozen held-out set is cleaned at every build instead.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    snaps = list_snapshots(settings)
    latest = latest_snapshot(settings)
    removed = []
    for path in snaps[:-keep]:
        if latest is not None and path == latest:
            continue
        shutil.rmtree(path)
        removed.append(path.name)
    return removed


def latest_snapshot(settings: Settings) -> Path | None:
    pointer = settings.datasets_dir / LATEST_FILE
    if pointer.is_file():
        path = settings.datasets_dir / pointer.read_text(encoding="utf-8").strip()
        if (path / "manifest.json").is_file():
            return path
    snaps = list_snapshots(settings)
    return snaps[-1] if snaps else None


def read_manifest(snapshot: Path) -> dict[str, Any]:
    return json.loads((Path(snapshot) / "manifest.json").read_text(encoding="utf-8"))


def load_split(snapshot: Path, kind: str, split: str = "train", *, trl_only: bool = True) -> Any:
    """One split as a `datasets.Dataset`; with `trl_only`, only the columns TRL trains on."""
    from datasets import load_from_disk

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    name = HELDOUT_DIR if split == "heldout" else kind
    ds = load_from_disk(str(Path(snapshot) / name))
    ds = ds[kind] if split == "heldout" else ds[split]
    return ds.select_columns(TRL_COLUMNS[kind]) if trl_only else ds


# ---------------------------------------------------------------------------------------------- build


def build_datasets(store: Store, settings: Settings, options: BuildOptions = BuildOptions(),
                   progress: ProgressFn | None = None) -> BuildResult:
    """Read, clean, split and write one snapshot; see the module docstring for what goes where."""
    options.validate()
    report = progress or (lambda _stage, _frac: None)
    started = time.perf_counter()
    root = settings.datasets_dir
    root.mkdir(parents=True, exist_ok=True)

    report("reading the store", 0.0)
    log = read_training_log(store)
    syn = SyntheticPairs(store).list(accepted_only=True) if options.include_teacher else []
    repairs: dict[int, list[Any]] = defaultdict(list)
    for p in syn:
        if p.kind == "repair" and p.target_message_id is not None:
            repairs[p.target_message_id].append(p)
    skipped: Counter = Counter()
    examples = _human_examples(log, repairs, options, skipped) + _teacher_examples(syn)
    # A memory the user deleted must not come back through the messages it was learnt from: rows of
    # that user that mention a forgotten phrase are dropped (before scrubbing, on the text as said).
    forgotten = forgotten_digests(store)
    dropped_forgotten: Counter = Counter()
    if forgotten:
        kept = []
        for ex in examples:
            owner = log.owners.get(ex.prov.conversation_id or -1)
            if owner in forgotten and mentions_forgotten(ex.texts(), forgotten[owner]):
                dropped_forgotten[ex.kind] += 1
                continue
            kept.append(ex)
        examples = kept
    report("cleaning", 0.3)

    by_kind: dict[str, list[Example]] = {k: [] for k in KINDS}
    for ex in examples:  # human rows come first, so a duplicate keeps its human copy
        by_kind[ex.kind].append(ex)
    filters: dict[str, FilterStats] = {}
    scrub_cache: dict[str, Scrubbed] = {}
    for kind in KINDS:
        by_kind[kind], filters[kind] = clean(by_kind[kind], options, scrub_cache)
        if dropped_forgotten[kind]:
            filters[kind].removed["forgotten_memory"] = dropped_forgotten[kind]

    report("splitting", 0.5)
    split_rows: dict[str, dict[str, list[Example]]] = {k: {s: [] for s in SPLITS} for k in KINDS}
    for kind in KINDS:
        for ex in by_kind[kind]:
            split_rows[kind][split_of(ex.prov.group, options)].append(ex)
        for s in SPLITS:
            split_rows[kind][s].sort(key=lambda e: _row_order(e, options.split_salt))

    version, final = _reserve_version(root)
    tmp = root / f".{version}.tmp-{os.getpid()}"
    try:
        # Held-out: reuse the frozen set (minus deleted rows) or freeze it from this test split.
        heldout_root = root / HELDOUT_DIR
        loaded = None if options.refreeze_heldout else _load_heldout(heldout_root, store, forgotten)
        test_total = sum(len(split_rows[k]["test"]) for k in KINDS)
        if loaded is None and (test_total >= options.heldout_min_rows or options.refreeze_heldout) and test_total:
            loaded = _freeze_heldout(heldout_root, {k: [e.row() for e in split_rows[k]["test"]] for k in KINDS},
                                     options, version)
        heldout_rows, heldout_meta = loaded if loaded else ({k: [] for k in KINDS}, None)
        heldout_groups = {r["group"] for k in KINDS for r in heldout_rows[k]}
        for kind in KINDS:
            for s in ("train", "validation"):
                before = len(split_rows[kind][s])
                split_rows[kind][s] = [e for e in split_rows[kind][s] if e.prov.group not in heldout_groups]
                if before - len(split_rows[kind][s]):
                    filters[kind].removed["heldout_group_excluded"] += before - len(split_rows[kind][s])

        caps = {k: _cap_synthetic(split_rows[k], options, filters[k]) for k in KINDS}
        replay_info = _add_replay(split_rows["sft"], options, filters["sft"])

        report("writing", 0.7)
        tmp.mkdir()
        (tmp / "jsonl").mkdir()
        hashes: dict[str, str] = {}
        rows_out: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for kind in KINDS:
            rows_out[kind] = {s: [e.row() for e in split_rows[kind][s]] for s in SPLITS}
            for s in SPLITS:
                hashes[f"jsonl/{kind}.{s}.jsonl"] = _write_jsonl(tmp / "jsonl" / f"{kind}.{s}.jsonl",
                                                                  rows_out[kind][s])
            _save_dataset(tmp / kind, rows_out[kind], kind)
        (tmp / HELDOUT_DIR).mkdir()
        for kind in KINDS:
            hashes[f"{HELDOUT_DIR}/{kind}.jsonl"] = _write_jsonl(tmp / HELDOUT_DIR / f"{kind}.jsonl",
                                                                 heldout_rows[kind])
        _save_heldout(tmp / HELDOUT_DIR, heldout_rows)
        report("manifest", 0.95)
        manifest = _manifest(version, options, log, syn, rows_out, heldout_rows, heldout_meta, filters, skipped,
                             caps, replay_info, hashes, time.perf_counter() - started)
        _write_json(tmp / "manifest.json", manifest)
        os.replace(tmp, final)  # final is the empty reserved folder: the snapshot appears whole
        _write_pointer(root, version)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if final.exists() and not any(final.iterdir()):
            final.rmdir()
        if isinstance(exc, (KeyboardInterrupt, SystemExit, BuildError)):
            raise
        raise BuildError(f"dataset build {version} failed; nothing was published: {exc}") from exc
    report("done", 1.0)
    return BuildResult(version=version, path=final, manifest=manifest)


def _save_heldout(path: Path, rows: dict[str, list[dict[str, Any]]]) -> None:
    from datasets import DatasetDict

    _save_dict(path, DatasetDict({k: _as_dataset(rows[k], k) for k in KINDS}))


def _write_pointer(root: Path, version: str) -> None:
    tmp = root / f".{LATEST_FILE}.tmp-{os.getpid()}"
    tmp.write_text(version + "\n", encoding="utf-8")
    os.replace(tmp, root / LATEST_FILE)


def _cap_synthetic(splits: dict[str, list[Example]], options: BuildOptions, stats: FilterStats) -> dict[str, Any]:
    """Keep teacher rows in train to at most `max_synthetic_share` (but always `synthetic_floor`)."""
    train = splits["train"]
    human = sum(1 for e in train if e.prov.source == "human")
    teacher = [e for e in train if e.prov.source == "teacher"]
    share = options.max_synthetic_share
    allowed = len(teacher) if share >= 1.0 else max(options.synthetic_floor, int(share / (1 - share) * human))
    info = {"share": share, "floor": options.synthetic_floor, "human_rows": human, "teacher_rows": len(teacher),
            "allowed": min(allowed, len(teacher)), "removed": 0}
    if len(teacher) > allowed:
        keep = {id(e) for e in sorted(teacher, key=lambda e: _row_order(e, options.split_salt + "/cap"))[:allowed]}
        splits["train"] = [e for e in train if e.prov.source != "teacher" or id(e) in keep]
        info["removed"] = len(teacher) - allowed
        stats.removed["synthetic_cap"] += info["removed"]
    return info


def _add_replay(splits: dict[str, list[Example]], options: BuildOptions, stats: FilterStats) -> dict[str, Any]:
    path = Path(options.replay_path or DEFAULT_REPLAY)
    wanted = int(round(options.replay_ratio * len(splits["train"])))
    info = {"path": str(path), "ratio": options.replay_ratio, "requested": wanted, "used": 0}
    if wanted == 0:
        return info
    rows = _replay_examples(path)
    rows.sort(key=lambda e: _row_order(e, options.split_salt + "/replay"))
    replay_stats = FilterStats()
    cleaned, replay_stats = clean(rows, options)
    stats.pii.update(replay_stats.pii)
    stats.pii_rows += replay_stats.pii_rows
    for name, n in replay_stats.removed.items():
        stats.removed[f"replay_{name}"] += n
    chosen = cleaned[:wanted]
    splits["train"] = sorted(splits["train"] + chosen, key=lambda e: _row_order(e, options.split_salt))
    info["used"] = len(chosen)
    return info


def _manifest(version: str, options: BuildOptions, log: TrainingLog, syn: list[Any],
              rows: dict[str, dict[str, list[dict[str, Any]]]], heldout: dict[str, list[dict[str, Any]]],
              heldout_meta: dict[str, Any] | None, filters: dict[str, FilterStats], skipped: Counter,
              caps: dict[str, Any], replay: dict[str, Any], hashes: dict[str, str], seconds: float) -> dict[str, Any]:
    counts = {k: {s: len(rows[k][s]) for s in SPLITS} for k in KINDS}
    by_source = {k: {s: dict(sorted(Counter(f"{r['source']}:{r['origin']}" for r in rows[k][s]).items()))
                     for s in SPLITS} for k in KINDS}
    groups = {s: len({r["group"] for k in KINDS for r in rows[k][s]}) for s in SPLITS}
    content = hashlib.sha256("".join(f"{n}={h}\n" for n, h in sorted(hashes.items())).encode()).hexdigest()
    return {
        "version": version,
        "builder_version": BUILDER_VERSION,
        "created_at": datetime.now(UTC).isoformat(),
        "duration_s": round(seconds, 3),
        "formats": {"sft": "conversational messages", "dpo": "conversational prompt/chosen/rejected",
                    "kto": "conversational prompt/completion/label"},
        "trl_columns": TRL_COLUMNS,
        "options": options.as_dict(),
        "inputs": {"feedback_rows": len(log.feedback), "max_feedback_id": log.max_feedback_id,
                   "max_message_id": log.max_message_id,
                   "conversations_with_feedback": len(log.by_conversation),
                   "teacher_pairs_accepted": len(syn), "skipped": dict(sorted(skipped.items()))},
        "counts": counts,
        "by_source": by_source,
        "groups": groups,
        "filters": {k: filters[k].as_list() for k in KINDS},
        "synthetic_cap": caps,
        "replay": replay,
        "heldout": {
            "frozen": heldout_meta is not None,
            "counts": {k: len(heldout[k]) for k in KINDS},
            "frozen_at": heldout_meta.get("frozen_at") if heldout_meta else None,
            "frozen_by_build": heldout_meta.get("frozen_by_build") if heldout_meta else None,
            "removed_deleted_total": heldout_meta.get("removed_deleted", 0) if heldout_meta else 0,
            "removed_deleted_now": heldout_meta.get("removed_now", 0) if heldout_meta else 0,
            "hashes": heldout_meta.get("hashes") if heldout_meta else None,
        },
        "hashes": hashes,
        "content_sha256": content,
    }


def store_summary(store: Store) -> dict[str, int]:
    """Small summary for CLIs and the admin view: conversations, feedback and teacher pairs."""
    with store.engine.connect() as conn:
        n_conv = conn.execute(sa.select(sa.func.count()).select_from(conversations)).scalar_one()
        n_fb = conn.execute(sa.select(sa.func.count()).select_from(feedback)).scalar_one()
        n_syn = conn.execute(sa.select(sa.func.count()).select_from(synthetic_pairs)).scalar_one()
    return {"conversations": int(n_conv), "feedback": int(n_fb), "synthetic_pairs": int(n_syn)}
