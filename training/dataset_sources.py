"""What becomes training data: the store's feedback (and the teacher's pairs) turned into examples.

In: a `Store` (messages, feedback, conversations, long-term memory tombstones) and accepted rows of
`synthetic_pairs` (training/synth.py). Out: `Example` records (kind, prompt, answer, rejected or label,
`Provenance`) for `training.dataset_build` to clean, split and write.

- SFT: answers rated up, edited corrections (the edit is the target), accepted teacher answers, and
  general replay rows from a JSONL file.
- DPO: edit pairs (edit chosen, original rejected), regenerate-and-choose pairs, a rated-down answer
  against a better alternative (an accepted regeneration of the same question, or an accepted teacher
  repair of it), teacher best-vs-worst candidates.
- KTO: thumbs up/down, unpaired.

Prompts are rebuilt as the chat service sent them to the model (assistant/chat.py, rendered by
`assistant.prompt.render_turn`): the serving system prompt, the `content` of the user and assistant
messages the user saw (regenerated alternatives, failed answers and history an API client imported with
its request are left out of the history; the manifest counts the imported messages left out), and
the user turn with the document passages the answer cited. Passages are re-read by chunk id from the
knowledge base at build time, from shared documents only: a user's private document never reaches an
adapter that everyone is served with, and a deleted document's passages are gone. Long-term memories,
tool results, client system messages and generation metadata stored with a message are never read, so
a training prompt differs from the served one exactly there.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from assistant.prompt import Passage, render_turn
from memory import longterm
from memory.store import Store, thread_order

# Reads stored chunks by id: {chunk_id: (title, text)} of those still there (KnowledgeBase.shared_chunks).
ChunkReader = Callable[[list[str]], dict[str, tuple[str, str]]]
# Answers that may be trained on: finished ones, including a regenerated "alternative" (memory/store.py).
ANSWER_STATUSES = ("complete", "alternative")
# What the chat service leaves out of the history it sends the model (assistant/chat.py), so a
# rebuilt prompt shows the conversation as the model saw it.
HIDDEN_FROM_HISTORY = ("error", "alternative")


# ---------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Provenance:
    source: str  # "human", "teacher", "replay"
    origin: str  # thumb_up, thumb_down, edit, pair, regen_vs_down, teacher, teacher_repair, replay
    group: str  # split unit: "conv:<id>", "synthetic:<pair id>", "replay:<n>"
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
    prompt: tuple[tuple[str, str], ...]  # (role, content) ... ending with the user turn, as the user wrote it
    completion: str  # SFT target, DPO chosen, KTO completion
    prov: Provenance
    rejected: str | None = None  # DPO only
    label: bool | None = None  # KTO only
    system: str | None = None  # the serving system prompt; None: the row has no system message
    passages: tuple[Passage, ...] = ()  # quoted into the last user turn as the agent does
    passage_ids: tuple[str, ...] = ()  # their chunk ids (a deleted document drops frozen held-out rows)

    def texts(self) -> list[str]:
        out = [c for _, c in self.prompt] + [p.text for p in self.passages] + [self.completion]
        return out + ([self.rejected] if self.rejected is not None else [])

    def messages(self) -> list[dict[str, str]]:
        """The prompt as the model is served it (system, history, data block + question)."""
        turns = [{"role": r, "content": c} for r, c in self.prompt]
        if self.system is None:
            return turns
        return render_turn(self.system, turns[:-1], turns[-1]["content"], passages=self.passages)

    def row(self) -> dict[str, Any]:
        prompt = self.messages()
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
                    adapter=p.adapter, doc_id=p.doc_id, chunk_id=p.chunk_id, synthetic_id=p.synthetic_id,
                    passage_ids=list(self.passage_ids))
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
    imported: bool = False  # the client wrote it as request history: never a target, never in a prompt
    sources: tuple[tuple[str, str], ...] = ()  # (chunk_id, scope) of the passages an answer cited


@dataclass(frozen=True)
class LogFeedback:
    id: int
    message_id: int
    kind: str
    rating: int | None
    corrected: str | None
    other_message_id: int | None
    chosen_message_id: int | None
    reason: str | None = None  # a thumb's reason tag (memory.types.REASON_TAGS): "style" marks style feedback


@dataclass
class TrainingLog:
    """What a build reads from the store: feedback and the messages of conversations that have any."""

    messages: dict[int, LogMessage]
    by_conversation: dict[int, list[LogMessage]]
    feedback: list[LogFeedback]
    max_feedback_id: int = 0
    max_message_id: int = 0
    owners: dict[int, int] = field(default_factory=dict)  # conversation id -> user id


# ---------------------------------------------------------------------------------------------- reading


def read_training_log(store: Store) -> TrainingLog:
    """Bulk, read-only: all feedback and the user/assistant messages of conversations that have feedback
    (`Store.read_feedback_log`), so 100k logged turns read in seconds. Of `sources` only chunk ids and
    scopes are kept.
    """
    log = store.read_feedback_log()
    fb = [LogFeedback(*row) for row in log.feedback]
    msgs: dict[int, LogMessage] = {}
    by_conv: dict[int, list[LogMessage]] = defaultdict(list)
    for row in log.messages:
        m = LogMessage(*row[:-2], imported=bool(row[-2]), sources=_cited(row[-1]))
        msgs[m.id] = m
        by_conv[m.conversation_id].append(m)
    # Reading order, not id order: an answer chosen later for an earlier question (regenerate-and-
    # choose) belongs right after that question in every later prompt.
    by_conv = defaultdict(list, {c: thread_order(ms) for c, ms in by_conv.items()})
    return TrainingLog(messages=msgs, by_conversation=dict(by_conv), feedback=fb,
                       max_feedback_id=fb[-1].id if fb else 0, max_message_id=log.max_message_id,
                       owners=log.owners)


def _cited(sources: Any) -> tuple[tuple[str, str], ...]:
    """(chunk_id, scope) of each cited passage; anything else stored with the sources is not read."""
    out = []
    for src in sources if isinstance(sources, list) else []:
        if isinstance(src, dict) and isinstance(src.get("chunk_id"), str):
            out.append((src["chunk_id"], str(src.get("scope") or "")))
    return tuple(out)


def with_serving_context(examples: list[Example], log: TrainingLog, system: str, shared_chunks: ChunkReader | None,
                         private_chunks: ChunkReader | None = None) -> tuple[list[Example], Counter]:
    """Give every example the serving system prompt and the shared passages its answer cited.

    `shared_chunks(chunk_ids) -> {chunk_id: (title, text)}` reads what is still stored in the shared
    documents (`memory.knowledge.KnowledgeBase.shared_chunks`); None leaves passages out. Teacher rows
    get the chunk they were written from. Returns the examples and counts for the manifest.
    `private_chunks` (the same shape) is given only for one user's personal build
    (training/personal_data.py): it reads that user's own private documents, so their cited private
    passages go into their own rows; without it private passages are always left out.
    """
    wanted: dict[int, tuple[str, ...]] = {}  # example index -> cited chunk ids, in citation order
    stats: Counter = Counter()
    for i, ex in enumerate(examples):
        if ex.prov.source == "teacher" and ex.prov.origin == "teacher" and ex.prov.chunk_id:
            wanted[i] = (ex.prov.chunk_id,)
            continue
        m = log.messages.get(ex.prov.message_id or -1)
        if m is not None and m.sources:
            usable = ("shared", "private") if private_chunks is not None else ("shared",)
            cited = tuple(cid for cid, scope in m.sources if scope in usable)
            stats["private_passages_left_out"] += len(m.sources) - len(cited)
            if cited:
                wanted[i] = cited
    found: dict[str, tuple[str, str]] = {}
    scope_of: dict[str, str] = {}
    ids_wanted = sorted({c for ids in wanted.values() for c in ids})
    if private_chunks is not None and ids_wanted:
        found.update(private_chunks(ids_wanted))
        scope_of.update(dict.fromkeys(found, "private"))
    if shared_chunks is not None and ids_wanted:
        found.update(shared_chunks(ids_wanted))
    out = []
    for i, ex in enumerate(examples):
        ids = wanted.get(i, ())
        kept = tuple(c for c in ids if c in found)
        stats["passages_missing"] += len(ids) - len(kept)
        stats["rows_with_passages"] += bool(kept)
        stats["rows_with_private_passages"] += any(c in scope_of for c in kept)
        out.append(replace(ex, system=system, passages=tuple(Passage(found[c][0], scope_of.get(c, "shared"),
                                                                     found[c][1]) for c in kept),
                           passage_ids=kept))
    return out, stats


# ---------------------------------------------------------------------------------------------- forgotten


def forgotten_digests(store: Store) -> dict[int, set[str]]:
    """Per user, the digests of phrases they told the assistant to forget (memory.longterm tombstones)."""
    return longterm.forgotten_digests(store.engine)


def mentions_forgotten(texts: Iterable[str], digests: set[str]) -> bool:
    """Whether any word n-gram of `texts` is a forgotten phrase (the same hashing as memory.longterm)."""
    for text in texts:
        words = longterm.normalise(text).split()
        for n in range(1, longterm.MAX_NGRAM + 1):
            for i in range(len(words) - n + 1):
                if longterm.digest(" ".join(words[i:i + n])) in digests:
                    return True
    return False


class _Contexts:
    """Rebuilds the conversation a rated answer was given in, as the user saw it, minus imported history.

    History an API client sent with its request (`imported`) was written by the client, not said by the
    assistant: an assistant turn of it in a training prompt would be trained on like any other (TRL's
    assistant-only loss covers every assistant turn), so a client could plant its own answers. It is
    left out of every prompt, and `left_out` collects which messages were.
    """

    def __init__(self, log: TrainingLog, max_messages: int) -> None:
        self.log = log
        self.max_messages = max_messages
        self._index: dict[int, dict[int, int]] = {}
        self.left_out: set[int] = set()  # imported messages kept out of the prompts built

    def _position(self, conversation_id: int) -> dict[int, int]:
        if conversation_id not in self._index:
            self._index[conversation_id] = {m.id: i for i, m in enumerate(self.log.by_conversation[conversation_id])}
        return self._index[conversation_id]

    def prompt_for(self, answer: LogMessage) -> tuple[tuple[str, str], ...] | None:
        conv = self.log.by_conversation.get(answer.conversation_id, [])
        pos = self._position(answer.conversation_id)
        parent = self.log.messages.get(answer.parent_id) if answer.parent_id is not None else None
        if parent is None:  # history without parent links: the nearest earlier user message
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
            if m.imported:
                self.left_out.add(m.id)
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


def human_examples(log: TrainingLog, repairs: dict[int, list[Any]], context_messages: int,
                   skipped: Counter) -> list[Example]:
    """Examples from feedback; `skipped` counts feedback that could not be used, by reason, and
    (`imported_history_messages`) the client-written messages left out of the prompts."""
    ctx = _Contexts(log, context_messages)
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
        if m.imported or (f.kind == "pair" and _pair_has_imported(log, f)):
            # Rated before the store refused it (migration 7 marked the old rows): never a target.
            skipped["imported_answer"] += 1
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
    if ctx.left_out:
        skipped["imported_history_messages"] += len(ctx.left_out)
    return out


def _pair_has_imported(log: TrainingLog, f: LogFeedback) -> bool:
    both = (log.messages.get(f.message_id), log.messages.get(f.other_message_id or -1))
    return any(m is not None and m.imported for m in both)


def teacher_examples(pairs: Iterable[Any]) -> list[Example]:
    """SFT (and DPO, with the worst candidate) examples from accepted teacher pairs of documents."""
    out: list[Example] = []
    for p in pairs:
        if p.kind != "doc":
            continue
        # Split by question, not by document: every row carries its passage, so a held-out question still
        # tests reading, and a document-level split kept whole documents (1 in 5, by their random ids) out
        # of training (the loop bench once lost every pricing pair that way; CHANGELOG.md, 2026-11-23).
        prov = Provenance(source="teacher", origin="teacher", group=f"synthetic:{p.id}", doc_id=p.doc_id,
                          chunk_id=p.chunk_id, synthetic_id=p.id, adapter=None)
        prompt = (("user", p.question),)
        out.append(Example("sft", prompt, p.answer, prov))
        if p.rejected:
            out.append(Example("dpo", prompt, p.answer, prov, rejected=p.rejected))
    return out


def replay_examples(path: Path) -> list[Example]:
    """General replay rows, `{"messages": [...]}` per line ending in a user turn and its answer."""
    out: list[Example] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            try:
                msgs = json.loads(line)["messages"]
                turns = tuple((m["role"], m["content"]) for m in msgs)
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(
                    f"{path}:{n + 1}: replay rows need {{'messages': [{{role, content}}, ...]}}: {exc}") from exc
            if len(turns) < 2 or turns[-1][0] != "assistant" or turns[-2][0] != "user":
                raise ValueError(f"{path}:{n + 1}: a replay row must end with a user turn and an assistant answer")
            out.append(Example("sft", turns[:-1], turns[-1][1],
                               Provenance(source="replay", origin="replay", group=f"replay:{n}")))
    return out

