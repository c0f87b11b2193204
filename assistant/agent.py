"""The agent loop: decide what to look up, run the tools, and build the prompt.

In: the user, the earlier turns (`{"role", "content"}` dicts), the new question, and the parts it
routes through: `KnowledgeBase` (documents), `LongTermMemory` (facts about the user), and the tools.
Out: a `Prepared` prompt for the chat model (system + history + the current user turn, with
retrieved passages, memories and tool results quoted as data) with the sources, memories and steps
that went into it; after the answer, `after_turn` extracts facts worth remembering.

Two ways to decide which tools run:
- Tool calling, when the backend says its chat template supports tools (`supports_tools()` and
  `complete_with_tools(messages, tools)`, see `ToolCallingBackend`): the model picks tools, for at
  most `max_steps` rounds; each call's result is fed back to it.
- A deterministic router otherwise (the embedded SmolLM2 cannot call tools reliably): explicit
  "remember ..."/"forget ..." requests, arithmetic the question asks to compute, questions about the
  present date or time (labelled in tests/data/retrieval/tools.jsonl), then document search when
  the user has documents and the question is not small talk, and recall of relevant memories
  (preferences always).

Prompt injection: everything retrieved goes into one `<data>` block in the user turn, every line
prefixed with "> ", with our own tag names neutralised inside it; the system prompt says that block
is data and never instructions. Only the asking user's documents and memories can be retrieved: the
user comes from the session, never from the model or the question.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from assistant.config import Settings
from assistant.prompt import Passage, quote, render_turn
from assistant.tools import Toolbox, ToolContext, ToolResult, default_tools
from memory.knowledge import Hit, KnowledgeBase
from memory.lexical import query_terms
from memory.longterm import LongTermMemory, forget_request, remember_request
from memory.store import Store
from memory.types import User

# When the router keeps a retrieved passage. Measured with `bench/retrieval.py router` on tests/data/retrieval:
# keeps 100 of the 108 labelled answers in the top 4 (17 of 25 vague ones); 1 of the 52 questions of
# off_topic.txt keeps one ("How many minutes are in a week?", coverage 0.58). A stricter rule that keeps as many
# answers and lets none through (0.33 / 0.62 / (0.22, 0.22)) was tried and not kept: in the loop bench it
# dropped a held-out answer and its candidates were refused (CHANGELOG.md, 2026-11-23).
DENSE_MIN = 0.32  # cosine similarity of question and passage
COVERAGE_MIN = 0.5  # share of the question's idf mass the passage matches word for word (names, codes)
BOTH_MIN = (0.2, 0.25)  # or moderately similar AND partly matching
# Or one sentence of the passage means what the question asks. A chunk's vector averages all its sections,
# so a one-sentence answer inside a four-section chunk scores low as a whole ("When does the whole team get
# together each month?": dense 0.14, coverage 0.40, dropped; its sentence "The whole team meets on the first
# Wednesday of every month ..." scores 0.70). On tests/data/retrieval no off-topic question's best sentence
# reaches 0.52 (bench/retrieval.py router), so 0.55 keeps the project's 0.03 margin. Only passages the rule
# above drops are split and embedded, so an on-topic question rarely pays for it.
SENTENCE_MIN = 0.55
_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+|\n+")
MAX_HISTORY_MESSAGES = 12
MAX_HISTORY_CHARS = 6000
_SMALL_TALK = re.compile(
    r"^(hi|hello|hey|thanks|thank you|thx|ok|okay|bye|goodbye|good (morning|evening|night)|yes|no|cool|great)"
    r"[\s!.,]*$", re.I)
_ARITHMETIC = re.compile(r"(?:sqrt\s*\(|\d)[\d\s.+\-*/^%×÷()]*[+\-*/^%×÷][\d\s.+\-*/^%×÷()]*\d\)*")
# The calculator runs when the question asks for a result: the expression follows "what is" / "calculate" /
# "=", or is followed by "=" / "equals", or the question is nothing but the expression and such words. An
# operator between numbers alone is not a request: "Is support available 24/7?", "the 50/50 rule", "9-5".
_COMPUTE_BEFORE = re.compile(
    r"(?:\b(?:what(?:'s| is| are)|how much (?:is|are)|calculate|compute|evaluate|solve|work out)|=)\s*$", re.I)
_COMPUTE_AFTER = re.compile(r"^\s*(?:=|equals?\b)", re.I)
_COMPUTE_WORDS = frozenset(
    "what whats s is are how much please compute calculate evaluate solve work out equals equal result of "
    "the answer to tell me can you could give".split())
# The clock runs when a date or time question is about the present: a word that says "now" ("today",
# "current", "is it", "tomorrow"), or a bare "what is the date?". "On which weekday does the monthly
# meeting happen?" and "What year was the company founded?" ask the documents, not the clock.
_CLOCK_WORD = re.compile(r"\b(?:date|time|day|weekday|year|month|hour)s?\b", re.I)
_NOW = re.compile(
    r"\b(?:today'?s?|now|right now|current(?:ly)?|tonight|tomorrow|yesterday|at the moment|is it|it is|"
    r"this (?:morning|afternoon|evening|week|month|year))\b", re.I)
_BARE_CLOCK = re.compile(
    r"^\W*(?:(?:what|which)(?:'s| is)?|tell me)\s+(?:the\s+)?(?:date|time|day|weekday|year|month|"
    r"day of the week)(?:\s+(?:please|again))?\W*$", re.I)


@dataclass
class Prepared:
    messages: list[dict]  # system + history + current user turn; retrieved text and memories quoted as data
    sources: list[dict]  # cited chunks: doc_id, title, chunk_id, scope, score, snippet
    memories: list[dict]  # memory id, text
    steps: list[dict]  # each: tool, args, result (short), ms


@runtime_checkable
class ToolCallingBackend(Protocol):
    """What a backend offers for real tool calling.

    `complete_with_tools` renders `messages` with `tools` through the model's chat template and
    returns either the raw completion text (tool calls inside `<tool_call>{json}</tool_call>`, the
    Hermes/Qwen convention, or a bare JSON object) or an OpenAI-style assistant message dict with
    `tool_calls`. `messages` may contain assistant turns with `tool_calls` and `role: "tool"` turns.
    """

    def supports_tools(self) -> bool: ...
    def complete_with_tools(self, messages: list[dict], tools: list[dict]) -> str | dict: ...


def template_supports_tools(tokenizer: Any) -> bool:
    """Whether a tokenizer's chat template renders a `tools` list (SmolLM2's does not)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return isinstance(template, str) and "tools" in template


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: Any


_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def parse_tool_calls(output: str | dict) -> list[ToolCall]:
    """Tool calls in a model's answer: an OpenAI message dict, `<tool_call>` JSON blocks, or a bare JSON call."""
    if isinstance(output, dict):
        calls = []
        for c in output.get("tool_calls") or []:
            fn = c.get("function", c)
            args = fn.get("arguments", {})
            if isinstance(args, str):
                try:
                    args = json.loads(args) if args.strip() else {}
                except json.JSONDecodeError:
                    args = {"raw": args}
            calls.append(ToolCall(str(fn.get("name", "")), args))
        return calls
    blocks = _TOOL_CALL.findall(output or "")
    if not blocks and (output or "").strip().startswith("{"):
        blocks = [output.strip()]
    calls = []
    for block in blocks:
        try:
            obj = json.loads(block)
        except json.JSONDecodeError:
            calls.append(ToolCall("", {"raw": block}))  # reported back to the model as a bad call
            continue
        if isinstance(obj, dict) and "name" in obj:
            calls.append(ToolCall(str(obj["name"]), obj.get("arguments", obj.get("parameters", {}))))
    return calls


def relevant(hit: Hit) -> bool:
    """The cheap half of the relevance filter: the chunk's own scores (see DENSE_MIN)."""
    dense, cover = hit.dense_score or 0.0, hit.lexical_coverage or 0.0
    return dense >= DENSE_MIN or cover >= COVERAGE_MIN or (dense >= BOTH_MIN[0] and cover >= BOTH_MIN[1])


def sentences(text: str) -> list[str]:
    """The passage's sentences and lines, without markdown bullets and heading marks."""
    return [s for s in (p.strip(" \t#*->") for p in _SENTENCE_END.split(text)) if len(s) > 3]


def best_sentence_scores(embedder: Any, question: str, hits: list[Hit]) -> list[float]:
    """For each hit, the cosine similarity of the question and the passage's closest sentence (one batch)."""
    parts = [sentences(h.text) for h in hits]
    flat = [s for p in parts for s in p]
    if not flat:
        return [0.0] * len(hits)
    vecs = embedder.encode([question, *flat])
    sims = vecs[1:] @ vecs[0]
    out, at = [], 0
    for p in parts:
        out.append(float(sims[at:at + len(p)].max()) if p else 0.0)
        at += len(p)
    return out


def keep_relevant(embedder: Any, question: str, hits: list[Hit]) -> list[Hit]:
    """The relevance filter: a hit stays when its chunk scores pass `relevant` or, failing that, when one of
    its sentences is close in meaning to the question (SENTENCE_MIN)."""
    doubtful = [h for h in hits if not relevant(h)]
    rescued = {h.chunk_id for h, s in zip(doubtful, best_sentence_scores(embedder, question, doubtful),
                                          strict=True) if s >= SENTENCE_MIN} if doubtful else set()
    return [h for h in hits if relevant(h) or h.chunk_id in rescued]


def find_arithmetic(question: str) -> str | None:
    """The expression the question asks to compute, or None when it asks for no result (see _COMPUTE_*)."""
    m = _ARITHMETIC.search(question)
    if not m:
        return None
    expr = m.group().strip()
    if re.fullmatch(r"\d+(?:-\d+){2,}", expr):
        return None  # a date or a phone/part number (2026-11-22), not a subtraction
    if not re.search(r"\d", expr) or len(expr) < 3:
        return None
    before, after = question[:m.start()], question[m.end():]
    rest = set(re.findall(r"[a-z]+", (before + " " + after).lower()))
    if _COMPUTE_BEFORE.search(before) or _COMPUTE_AFTER.match(after) or rest <= _COMPUTE_WORDS:
        return expr
    return None


def wants_datetime(question: str) -> bool:
    """Whether the question asks for the present date or time (see _NOW), not a date the documents hold."""
    if not _CLOCK_WORD.search(question):
        return False
    return bool(_NOW.search(question) or _BARE_CLOCK.match(question))


@dataclass
class _Gathered:
    hits: list[Hit] = field(default_factory=list)
    memories: dict[int, dict] = field(default_factory=dict)
    tool_lines: list[str] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)

    def add(self, name: str, result: ToolResult, step: dict) -> None:
        self.steps.append(step)
        for m in result.memories:
            self.memories.setdefault(m["id"], m)
        if name not in ("search_documents", "recall"):
            self.tool_lines.append(f"{name}: {result.text}")


class Agent:
    """Routes a turn through memory, documents and tools, and builds the prompt."""

    def __init__(self, settings: Settings, store: Store, knowledge: KnowledgeBase, memories: LongTermMemory,
                 backend: Any = None, *, max_steps: int = 4, clock: Callable[[], datetime] | None = None) -> None:
        if max_steps < 1:
            raise ValueError("max_steps must be at least 1")
        self.settings = settings
        self.store = store
        self.knowledge = knowledge
        self.memories = memories
        self.backend = backend
        self.max_steps = max_steps
        self.tools: Toolbox = default_tools(knowledge, memories, settings.retrieval_k, settings.memory_k, clock)

    @property
    def uses_tool_calling(self) -> bool:
        b = self.backend
        return isinstance(b, ToolCallingBackend) and bool(b.supports_tools())

    # ------------------------------------------------------------------ the turn
    def prepare(self, user: User, history: list[dict], question: str) -> Prepared:
        ctx = ToolContext(user)
        got = _Gathered()
        if self.uses_tool_calling:
            self._tool_loop(ctx, history, question, got)
        else:
            self._route(ctx, question, got)
        # Preferences shape every answer, whatever was asked or called.
        for m in self.memories.preferences(user.id):
            got.memories.setdefault(m.id, m.as_prompt_item())
        messages = self._messages(history, question, got)
        sources = [h.as_source() for h in got.hits]
        return Prepared(messages=messages, sources=sources, memories=list(got.memories.values()), steps=got.steps)

    def after_turn(self, user: User, question: str, answer: str) -> list[dict]:
        """Remember facts and preferences the user stated (never from the model's answer)."""
        if remember_request(question) is not None or forget_request(question) is not None:
            return []  # handled as a tool step in `prepare`
        steps = []
        started = time.perf_counter()
        for done in self.memories.learn_from(user.id, question):
            if done.action == "duplicate":
                continue
            note = "updated" if done.action == "superseded" else "remembered"
            steps.append({"tool": "remember", "args": {"text": done.memory.text, "source": "extracted"},
                          "result": f"{note}: {done.memory.text}",
                          "ms": round((time.perf_counter() - started) * 1000, 1)})
            started = time.perf_counter()
        return steps

    # ------------------------------------------------------------------ deciding
    def _run(self, ctx: ToolContext, got: _Gathered, name: str, args: dict) -> ToolResult:
        result, step = self.tools.run(ctx, name, args)
        got.add(name, result, step)
        return result

    def _route(self, ctx: ToolContext, question: str, got: _Gathered) -> None:
        """The deterministic router: at most `max_steps` tools, most specific first."""
        plan: list[tuple[str, dict]] = []
        forget = forget_request(question)
        if forget is not None:
            plan.append(("forget", {"what": forget}))
        remember = remember_request(question)
        if forget is None and remember is not None:
            plan.append(("remember", {"text": remember}))
        expr = find_arithmetic(question)
        if expr:
            plan.append(("calculator", {"expression": expr}))
        if wants_datetime(question):
            plan.append(("current_datetime", {}))
        command = forget is not None or remember is not None
        # "what is 12*7?" is for the calculator; only words beyond the expression are worth a search.
        words = query_terms(question.replace(expr, " ") if expr else question)
        if not command and words and not _SMALL_TALK.match(question.strip()) and self.knowledge.has_documents(ctx.user):
            plan.append(("search_documents", {"query": question}))
        if forget is None:
            plan.append(("recall", {"query": question}))
        for name, args in plan[: self.max_steps]:
            result = self._run(ctx, got, name, args)
            if name == "search_documents":
                # Only passages plausibly on topic: a vague question must not drag random passages in.
                got.hits = keep_relevant(self.knowledge.embedder, question, result.hits)

    def _tool_loop(self, ctx: ToolContext, history: list[dict], question: str, got: _Gathered) -> None:
        """Real tool calling: the model asks for tools until it answers or the step limit is reached."""
        convo = [{"role": "system", "content": self.settings.system_prompt + "\n\nUse the tools when they help."},
                 *self._history(history), {"role": "user", "content": question}]
        schemas = self.tools.schemas()
        for _round in range(self.max_steps):
            out = self.backend.complete_with_tools(convo, schemas)
            calls = parse_tool_calls(out)
            if not calls:
                return
            convo.append({"role": "assistant", "content": "",
                          "tool_calls": [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                         for c in calls]})
            for call in calls:
                result = self._run(ctx, got, call.name, call.arguments)
                seen = {h.chunk_id for h in got.hits}
                got.hits.extend(h for h in result.hits if h.chunk_id not in seen)
                convo.append({"role": "tool", "name": call.name, "content": self._tool_feedback(result)})
        got.steps.append({"tool": "agent", "args": {}, "result": f"step limit {self.max_steps} reached", "ms": 0.0})

    @staticmethod
    def _tool_feedback(result: ToolResult) -> str:
        """What the model sees of a tool call while it is still deciding (quoted like the final data)."""
        lines = [result.text]
        lines += [f"[{h.chunk_id}] {h.title}:\n{quote(h.text)}" for h in result.hits]
        lines += [f"memory: {m['text']}" for m in result.memories]
        return "\n".join(lines)

    # ------------------------------------------------------------------ the prompt
    @staticmethod
    def _history(history: list[dict]) -> list[dict]:
        turns = [{"role": m["role"], "content": str(m["content"])} for m in history
                 if m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)]
        turns = turns[-MAX_HISTORY_MESSAGES:]
        while turns and sum(len(m["content"]) for m in turns) > MAX_HISTORY_CHARS:
            turns = turns[1:]
        while turns and turns[0]["role"] != "user":
            turns = turns[1:]  # chat templates want the history to open with a user turn
        return turns

    def _messages(self, history: list[dict], question: str, got: _Gathered) -> list[dict]:
        return render_turn(self.settings.system_prompt, self._history(history), question,
                           memories=[m["text"] for m in got.memories.values()],
                           passages=[Passage(h.title, h.scope, h.text) for h in got.hits], tool_lines=got.tool_lines)
