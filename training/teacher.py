"""Teachers: turn document chunks into judged question/answer pairs (and DPO pairs) for training.

In: plain chunk records `Chunk(doc_id, chunk_id, text)` (no dependency on the knowledge base; see
`training.synth.chunks_from_knowledge`) and a model to ask.
Out: `TeacherPair` records: the question, the best grounded answer, the judge's verdict, the worst
candidate as a rejected answer when it is clearly worse, and the chunk it came from.

Seams:
- `TeacherModel` (Protocol): something that completes chat messages, n samples at a time. Three
  implementations: `HFTeacherModel` (any local model by Hugging Face id or folder),
  `OpenAITeacherModel` (any OpenAI-compatible endpoint through the `openai` client) and
  `BackendTeacherModel` (the serving runtime backend: the embedded default).
- `Teacher` (Protocol): `pairs_for_chunk(chunk)` and `answer(question, chunk)`. `GroundedTeacher`
  implements it over any TeacherModel: it writes questions from the chunk (validated, with a
  template fallback when the model's questions are unusable), samples several answers with the
  passage in the prompt, and keeps only answers the `judge` finds grounded in the passage
  (rejection sampling as in STaR / ReST). `self_teacher(backend)` is the embedded default: the
  serving model with the passage in context, 4 samples, judged.

The judge is lexical on purpose: a 135M model cannot judge itself, and a check that an answer's
content words, numbers and names occur in the passage is cheap, deterministic and explainable.
Besides the model's samples, the passage's own sentence that best matches the question is judged as a
candidate (`extract_answer`, `TeacherOptions.extract`): kept when no sample scores higher.
A stored pair is the question and answer; the dataset builder puts the chunk back into the prompt as
a retrieved passage (training/dataset_sources.py), so the student learns to read it the way it is
served.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from training.hygiene import quality_problem

if TYPE_CHECKING:
    from assistant.runtime import Backend

# ---------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Chunk:
    """A piece of a document: the unit a teacher writes questions about."""

    doc_id: str
    chunk_id: str
    text: str
    title: str = ""

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    @property
    def passage(self) -> str:
        """What the teacher reads and the judge checks against: the title (its topic) and the text."""
        return f"{self.title}\n{self.text}" if self.title.strip() else self.text


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    score: float  # 0..1, higher is better
    support: float  # share of the answer's content words found in the passage
    relevance: float  # share of the answer's new words that come from the sentence answering the question
    reasons: tuple[str, ...] = ()  # why it was rejected (empty when accepted)


@dataclass(frozen=True)
class Candidate:
    text: str
    verdict: Verdict
    origin: str = "model"  # "model": sampled from the teacher model; "extract": the passage's own sentence


@dataclass(frozen=True)
class TeacherPair:
    doc_id: str
    chunk_id: str
    chunk_sha256: str
    question: str
    question_source: str  # "model" or "template"
    answer: str  # the best candidate
    accepted: bool  # the judge's verdict on the best candidate
    score: float
    teacher: str
    rejected: str | None = None  # the worst candidate, when clearly worse than the best
    rejected_score: float | None = None
    candidates: tuple[Candidate, ...] = field(default_factory=tuple)

    @property
    def answer_origin(self) -> str:
        """Where the kept answer came from: "model" or "extract" (see `TeacherOptions.extract`)."""
        return next((c.origin for c in self.candidates if c.text == self.answer), "model")

    def judge_record(self) -> dict[str, Any]:
        """What the judge saw, for the stored pair (audits and docs/teacher.md)."""
        return {
            "candidates": [
                {"text": c.text, "origin": c.origin, "accepted": c.verdict.accepted,
                 "score": round(c.verdict.score, 4),
                 "support": round(c.verdict.support, 4), "relevance": round(c.verdict.relevance, 4),
                 "reasons": list(c.verdict.reasons)}
                for c in self.candidates
            ]
        }


# ---------------------------------------------------------------------------------------------- judge

_STOPWORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further had has
    have having he her here hers herself him himself his how i if in into is it its itself just let me
    more most my myself no nor not now of off on once only or other our ours ourselves out over own same
    she should so some such than that the their theirs them themselves then there these they this those
    through to too under until up very was we were what when where which while who whom why will with
    would you your yours yourself yourselves yes one two may might must shall us via per within without
    use used using get gets got make makes made""".split()
)
_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)?", re.UNICODE)
_NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,:]\d+)*")
_REFUSAL = re.compile(
    r"(?i)\b(i\s+(?:do\s*n[o']?t|cannot|can't)\s+(?:know|have|find|answer)|i'?m\s+not\s+sure|"
    r"as\s+an\s+ai|no\s+information|not\s+(?:mentioned|specified|stated|provided)|"
    r"does\s+not\s+(?:say|mention|contain|specify|provide)|cannot\s+be\s+determined|unable\s+to)"
)
_MENTIONS_SOURCE = re.compile(
    r"(?i)\b(?:the|this|that|above|given)\s+(?:passage|text|article|excerpt|document|context)\b"
)
_LEADING_SOURCE_PHRASE = re.compile(
    r"(?i)^\s*(?:according\s+to|based\s+on|as\s+(?:stated|mentioned|described)\s+in|from|per)\s+the\s+"
    r"(?:passage|text|article|excerpt|document|context|information(?:\s+given)?)\s*[,:]?\s*"
)


def _stem(word: str) -> str:
    """A crude suffix stripper: enough to match holds/hold, edited/edit, released/release, stores/store."""
    for suffix in ("ing", "ed", "es", "s"):
        if len(word) > len(suffix) + 2 and word.endswith(suffix) and not word.endswith("ss"):
            word = word[: -len(suffix)]
            break
    if len(word) > 3 and word.endswith("e"):
        word = word[:-1]
    return word


def content_words(text: str, keep: frozenset[str] = frozenset()) -> list[str]:
    """Lower-cased, crudely stemmed content words (stopwords dropped, except those in `keep`)."""
    return [_stem(w) for w in (m.group(0).lower() for m in _WORD.finditer(text))
            if w not in _STOPWORDS or w in keep]


def numbers(text: str) -> set[str]:
    return {n.replace(",", "") for n in _NUMBER.findall(text)}


_NAME = re.compile(r"(?<![.!?:]\s)(?<!^)\b[A-Z][\w'’\-]+")


def _unsupported_names(answer: str, passage: str) -> set[str]:
    """Capitalised words inside sentences (names, products) that the passage never mentions."""
    known = {w.lower() for w in _WORD.findall(passage)}
    # Word by word, so that "AES-256" or "Two-factor" count as known when their parts are.
    return {m.group(0) for m in _NAME.finditer(answer.strip())
            if any(w.lower() not in known for w in _WORD.findall(m.group(0)))}


def _sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+|\n+", text)
    return [p.strip() for p in parts if len(p.strip()) > 3]


def clean_answer(text: str) -> str:
    """Strip chat debris and "According to the passage," openers the student will not have."""
    out = text.strip().strip('"').strip()
    out = re.sub(r"(?i)^(?:answer|a)\s*:\s*", "", out)
    out = _LEADING_SOURCE_PHRASE.sub("", out)
    if out and out[0].islower():
        out = out[0].upper() + out[1:]
    return out.strip()


# A question asking for a year, an amount or a time is answered only by an answer that gives one. Without this the
# self-teacher answered "Which year does the Hanbit Family Clinic open?" with the clinic's opening sentence (it shares
# the question's words and holds no year), and the adapter trained on it answered any question with a document's
# first sentence ("Who is the director of the clinic?" -> "Hanbit Clinic (한빛가정의원) is a family medicine clinic").
_ASKS = r"^\W*(?:(?:in|at|on|by|from|until|for)\s+)?"
_ASKS_YEAR = re.compile(_ASKS + r"(?:what|which)\s+year\b", re.I)
_ASKS_COUNT = re.compile(
    _ASKS + r"(?:how\s+(?:much|many|far|old|big|large|fast|heavy|tall|tight|thick|high|early|late)"
    r"|(?:what|which)\s+(?:price|percentage|number|amount|size|speed|extension|torque)s?)\b", re.I)
_ASKS_TIME = re.compile(
    _ASKS + r"(?:when|how\s+(?:long|often|soon)|(?:what|which)\s+(?:time|date|day|month|hours?)s?)\b", re.I)
_NUMBER_WORDS = (r"zero|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|fifteen|twenty|thirty|forty|"
                 r"fifty|sixty|hundred|thousand|million|half|dozen|once|twice|single|double")
_HAS_COUNT = re.compile(rf"\d|\b(?:{_NUMBER_WORDS})\b", re.I)
_HAS_TIME = re.compile(
    rf"\d|\b(?:{_NUMBER_WORDS}|january|february|march|april|may|june|july|august|september|october|november|"
    r"december|monday|tuesday|wednesday|thursday|friday|saturday|sunday|mondays|tuesdays|wednesdays|thursdays|"
    r"fridays|saturdays|sundays|weekdays?|weekends?|daily|weekly|monthly|yearly|annually|every|each|morning|"
    r"afternoon|evening|night|noon|midnight|before|after|during|until|always|never|hours?|minutes?|days?|weeks?|"
    r"months?|years?)\b", re.I)


def answers_kind(question: str, answer: str) -> bool:
    """Whether the answer gives what kind of thing the question asks for, where that can be told: a year for
    "which year", a number for "how much / how many / what price", a time or span for "when / how long / how
    often". Any other question passes."""
    if _ASKS_YEAR.search(question):
        return re.search(r"\b\d{4}\b", answer) is not None
    if _ASKS_COUNT.search(question):
        return _HAS_COUNT.search(answer) is not None
    if _ASKS_TIME.search(question):
        return _HAS_TIME.search(answer) is not None
    return True


@dataclass(frozen=True)
class JudgeLimits:
    min_support: float = 0.8
    min_relevance: float = 0.5
    min_words: int = 3
    max_chars: int = 700


def _answer_sentences(passage: str, question: str = "") -> list[str]:
    """The passage's sentences that can hold an answer: not its title line (`Chunk.passage` starts with
    the title when there is one), not Markdown headings, and (given the question) only those that give the kind
    of thing it asks for (`answers_kind`: a year, a number, a time)."""
    lines = passage.split("\n", 1)
    body = lines[1] if len(lines) == 2 and not re.search(r"[.!?]\s*$", lines[0]) else passage
    return [x for x in _sentences(body) if not x.startswith("#") and answers_kind(question, x)]


def _best_sentence(sentences: Sequence[str], q_words: set[str]) -> int:
    """Index of the sentence sharing the most content words with the question (-1 when none shares any)."""
    best_i, best_overlap = -1, 0
    for i, sentence in enumerate(sentences):
        overlap = len(set(content_words(sentence)) & q_words)
        if overlap > best_overlap:
            best_i, best_overlap = i, overlap
    return best_i


def extract_answer(question: str, passage: str) -> str | None:
    """The passage's own sentence that best matches the question: the answer any reader would quote.

    The judge looks for the answer in that same sentence, so it would pass any extract: the extract
    itself must share at least half of the question's content words (and two, when the question has
    two), or there is none. Titles and headings are not sentences worth quoting.
    """
    sentences = _answer_sentences(passage, question)
    q_words = set(content_words(question))
    i = _best_sentence(sentences, q_words)
    if i < 0:
        return None
    shared = len(set(content_words(sentences[i])) & q_words)
    return sentences[i] if shared >= max(min(2, len(q_words)), (len(q_words) + 1) // 2) else None


def judge(question: str, answer: str, passage: str, limits: JudgeLimits = JudgeLimits()) -> Verdict:
    """Is `answer` a grounded answer to `question` given `passage`? Deterministic and explainable."""
    reasons: list[str] = []
    words = answer.split()
    a_words = content_words(answer)
    p_words = set(content_words(passage))
    q_words = set(content_words(question))
    if len(words) < limits.min_words or not a_words:
        reasons.append("too_short")
    if len(answer) > limits.max_chars:
        reasons.append("too_long")
    problem = quality_problem(answer)
    if problem in ("repetitive", "non_text"):
        reasons.append(problem)
    if _REFUSAL.search(answer):
        reasons.append("refusal")
    if _MENTIONS_SOURCE.search(answer):
        reasons.append("mentions_passage")  # the student will not see the passage
    if numbers(answer) - numbers(passage):
        reasons.append("unsupported_number")
    if _unsupported_names(answer, passage):
        reasons.append("unsupported_name")  # "Lumin Desk", "Melinda": invented or misspelt names
    support = sum(1 for w in a_words if w in p_words) / len(a_words) if a_words else 0.0
    if support < limits.min_support:
        reasons.append("ungrounded")
    if a_words and set(a_words) <= q_words:
        reasons.append("echoes_question")
    if not answers_kind(question, answer):
        reasons.append("wrong_kind")  # no year, number or time where the question asks for one

    # Relevance: the passage sentence that best matches the question (and the one after it, which
    # often continues it) holds the answer. Of what the answer adds beyond the question's own words,
    # that much must come from there, or it answers something else in the passage.
    sentences = _answer_sentences(passage, question)
    best_i = _best_sentence(sentences, q_words)
    window = set(content_words(" ".join(sentences[best_i:best_i + 2]))) if best_i >= 0 else set()
    added = set(a_words) - q_words
    relevance = len(added & window) / len(added) if added else 0.0
    if relevance < limits.min_relevance:
        reasons.append("off_question")

    score = max(0.0, 0.6 * support + 0.4 * relevance - 0.2 * len(reasons))
    return Verdict(accepted=not reasons, score=round(score, 4), support=round(support, 4),
                   relevance=round(relevance, 4), reasons=tuple(reasons))


# ---------------------------------------------------------------------------------------------- questions

_QUESTION_LINE = re.compile(r"(?i)^\s*(?:\d+[.)]\s*|[-*]\s*|q(?:uestion)?\s*\d*\s*[:.)-]\s*)")


_QUESTION_WORDS = ("what", "when", "where", "who", "whom", "which", "why", "how", "does", "do", "is", "are",
                   "can", "was", "were", "will", "should")
_EMBEDDED_QUESTION = re.compile(r"[A-Z][^\"“”?\n]{3,200}\?")


def clean_question(raw: str) -> str:
    """The first question in a model reply, without numbering, quotes or a "Question:" label.

    Small models wrap their question in chatter ('The answer to the question "What is X?" is ...'), so
    a quoted question that starts with a question word is preferred to the line around it.
    """
    for m in _EMBEDDED_QUESTION.finditer(raw):
        if m.group(0).split()[0].lower().strip("'’") in _QUESTION_WORDS and m.start() > 0:
            return m.group(0).strip()
    for line in raw.strip().splitlines():
        line = _QUESTION_LINE.sub("", line).strip().strip('"').strip()
        if "?" in line:
            return line[: line.index("?") + 1].strip()
        if line:
            return line
    return ""


def question_problem(question: str, passage: str) -> str | None:
    """Why a generated question is unusable for training, or None."""
    if not question.endswith("?"):
        return "not_a_question"
    n = len(question.split())
    if n < 4 or n > 30:
        return "bad_length"
    if _MENTIONS_SOURCE.search(question) or re.search(r"(?i)\bauthor\b", question):
        return "mentions_passage"  # unanswerable without the passage the student will not have
    words = content_words(question)
    known = set(content_words(passage))
    if len(set(words) & known) < 2 or sum(w in known for w in words) < 0.6 * len(words):
        return "not_about_passage"
    if _unsupported_names(question, passage):
        return "unknown_name"
    return None


_SUBJECT = r"(?P<subj>(?:The |A |An |Each |Every )?[A-Z][\w'’\-]*(?: [A-Za-z0-9][\w.'’\-]*){0,4}?)"
_YEAR_EVENT = re.compile(_SUBJECT + r" (?P<verb>was|were) (?P<part>[a-z]+ed) in (?:[A-Z][a-z]+ )?(?P<year>\d{4})\b")
_COPULA = re.compile(_SUBJECT + r" (?P<verb>is|are|was|were) (?P<rest>.+)$")
# Verbs the fallback may turn into "What does X <verb>?". A closed list, because telling the verb in
# "The mobile apps for Android can read" from a noun needs a tagger, and a wrong guess makes a bad question.
_VERBS = frozenset(
    """accepts adds allows answers builds charges checks contains costs covers creates deletes downloads
    encrypts exports gives grants helps holds includes indexes keeps lets lists loads makes means merges
    needs offers opens protects provides receives records removes requires returns runs saves sends shows
    sells stores supports takes uses works writes""".split()
)
_THIRD_PERSON = re.compile(_SUBJECT + r" (?P<verb>has|have|[a-z]{3,}s) (?P<rest>.+)$")
_PREPOSITIONS = frozenset("on in at for to with from by about into".split())
_PARTICIPLES = frozenset("built made kept held given taken run written sent shown known done seen".split())


def _subject(subject: str, passage: str) -> str:
    """Lower-case a sentence-initial common word ("Data in transit" -> "data in transit"), keep names."""
    first, _, rest = subject.partition(" ")
    if first in ("The", "A", "An", "Each", "Every"):
        return f"{first.lower()} {rest}"
    if re.search(rf"(?<![.!?]\s)(?<!^)\b{re.escape(first.lower())}\b", passage):
        return f"{first.lower()} {rest}".strip()
    return subject


def _base_verb(verb: str) -> str:
    """supports -> support, carries -> carry, reaches -> reach, has -> have."""
    if verb == "has":
        return "have"
    if verb.endswith("ies"):
        return verb[:-3] + "y"
    if verb.endswith(("ches", "shes", "sses", "xes", "zes", "oes")):
        return verb[:-2]
    return verb[:-1]


_NOT_SUBJECT_START = frozenset(
    "After Before When If In On At For To With From By During Since Until While Because It They This These".split()
)


def _template_for(sentence: str, passage: str) -> str | None:
    s = sentence.rstrip(".!")
    if s.split(" ", 1)[0] in _NOT_SUBJECT_START:  # "After 30 days they ..." has no usable subject
        return None
    if m := _YEAR_EVENT.match(s):
        return f"When {m.group('verb')} {_subject(m.group('subj'), passage)} {m.group('part')}?"
    if m := _COPULA.match(s):
        subject = _subject(m.group("subj"), passage)
        following = m.group("rest").split()[0].lower()
        if following.endswith("ed") or following in _PARTICIPLES:  # passive: "changes are merged ..."
            return f"What happens to {subject}?"
        return f"What {m.group('verb')} {subject}?"
    if (m := _THIRD_PERSON.match(s)) and m.group("verb") in _VERBS | {"has", "have"}:
        subject = _subject(m.group("subj"), passage)
        verb = "have" if m.group("verb") in ("has", "have") else _base_verb(m.group("verb"))
        if m.group("verb") == "have":
            return f"What do {subject} have?"
        prep = m.group("rest").split()[0].lower()
        tail = f" {prep}" if prep in _PREPOSITIONS else ""
        return f"What does {subject} {verb}{tail}?"
    return None


def template_questions(chunk: Chunk, limit: int = 2) -> list[str]:
    """Questions built from the chunk's own sentences when the model's questions are unusable."""
    out: list[str] = []
    for sentence in _sentences(chunk.text):
        q = _template_for(sentence, chunk.text)
        if q and question_problem(q, chunk.passage) is None and q not in out:
            out.append(q)
        if len(out) >= limit:
            return out
    topic = chunk.title.strip() or " ".join(content_words(chunk.text)[:3])
    generic = f"What should I know about {topic}?"
    if generic not in out:
        out.append(generic)
    return out[:limit]


# ---------------------------------------------------------------------------------------------- models


@runtime_checkable
class TeacherModel(Protocol):
    """Completes chat messages; returns `n` sampled completions."""

    name: str

    def complete(self, messages: list[dict[str, str]], *, n: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int) -> list[str]: ...


class BackendTeacherModel:
    """The serving runtime backend (`assistant.runtime`), optionally with one of its adapters."""

    def __init__(self, backend: Backend, adapter: str | None = None, name: str | None = None) -> None:
        self.backend = backend
        self.adapter = adapter
        base = getattr(backend, "model_name", "serving-model")
        self.name = name or (f"self:{base}" + (f"+{adapter}" if adapter else ""))

    def complete(self, messages: list[dict[str, str]], *, n: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int) -> list[str]:
        from assistant.runtime import GenerationSettings

        out = []
        for i in range(n):
            gen = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                     seed=seed + i)
            out.append(self.backend.generate(messages, self.adapter, gen).text)
        return out


class HFTeacherModel:
    """Any local causal LM by Hugging Face id or folder, sampled n-at-a-time in one generate call."""

    def __init__(self, model: str | Path, *, device: str = "cpu", dtype: str = "auto", threads: int | None = 1,
                 name: str | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)  # a teacher runs beside the server on small machines
        self.name = name or f"hf:{Path(str(model)).name if Path(str(model)).exists() else model}"
        self.tokenizer = AutoTokenizer.from_pretrained(str(model))
        torch_dtype = {"auto": torch.float32 if device == "cpu" else torch.bfloat16, "float32": torch.float32,
                       "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        self.model = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch_dtype).to(device).eval()
        self.device = device

    def complete(self, messages: list[dict[str, str]], *, n: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int) -> list[str]:
        import torch

        enc = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True).to(self.device)
        torch.manual_seed(seed)
        sample = temperature > 0
        with torch.inference_mode():
            out = self.model.generate(
                **enc, do_sample=sample, num_return_sequences=n, max_new_tokens=max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                **({"temperature": temperature, "top_p": top_p} if sample else {}),
            )
        start = enc["input_ids"].shape[1]
        return [self.tokenizer.decode(row[start:], skip_special_tokens=True).strip() for row in out]


class OpenAITeacherModel:
    """Any OpenAI-compatible chat endpoint (a hosted model, vLLM, or this product's own API)."""

    def __init__(self, base_url: str, model: str, api_key: str = "not-needed", *, timeout_s: float = 120.0,
                 name: str | None = None) -> None:
        from openai import OpenAI

        self.client = OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=1)
        self.model = model
        self.name = name or f"openai:{model}"

    def complete(self, messages: list[dict[str, str]], *, n: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int) -> list[str]:
        out = []
        # One request per sample: many compatible servers ignore or reject n > 1.
        for i in range(n):
            resp = self.client.chat.completions.create(
                model=self.model, messages=messages, temperature=temperature, top_p=top_p,
                max_tokens=max_new_tokens, seed=seed + i, stream=False,
            )
            out.append(resp.choices[0].message.content or "")
        return out


# ---------------------------------------------------------------------------------------------- teacher

QUESTION_SYSTEM = "You write short quiz questions about a text. Reply with one question only."
QUESTION_USER = "Text:\n{passage}\n\nWrite one short question that this text answers."
ANSWER_SYSTEM = ("Answer the question using only the passage. Answer in one or two sentences and do not "
                 "mention the passage.")
ANSWER_USER = "Passage:\n{passage}\n\nQuestion: {question}"


@runtime_checkable
class Teacher(Protocol):
    name: str

    def pairs_for_chunk(self, chunk: Chunk, questions: int = 2) -> list[TeacherPair]: ...

    def answer(self, question: str, chunk: Chunk, question_source: str = "user") -> TeacherPair: ...


@dataclass(frozen=True)
class TeacherOptions:
    candidates: int = 4  # answers sampled per question; the judge keeps the best grounded one
    question_samples: int = 3  # model questions tried per chunk before the template fallback
    temperature: float = 0.8
    top_p: float = 0.95
    question_max_tokens: int = 48
    answer_max_tokens: int = 96
    dpo_margin: float = 0.15  # best and worst must differ this much in score to form a DPO pair
    # Also judge the passage sentence that best matches the question (`extract_answer`), after the model's
    # samples. It is chosen when no model answer scores higher: a weak teacher model (the embedded
    # 135M one has about 1 answer in 5 accepted) then still yields a grounded pair, and its wrong samples
    # become the DPO pair's rejected side.
    extract: bool = True
    # On a tie between a model answer and the extract, keep the extract. The judge reads the sentence
    # after the answering one as part of the answer, so a sample can borrow a number from it and still
    # score as high ("Team plan: 10 dollars per member." where the passage says 8 and
    # 10 is the next sentence's guest limit). The extract is the passage's own words.
    extract_wins_ties: bool = True
    # Whether a model sample may be the kept answer. `self_teacher` turns it off: on the embedded 135M model the
    # samples that pass the lexical judge either restate the answering sentence (which the extract already is,
    # at the judge's top score) or stitch in words of other sentences that the judge cannot tell from facts
    # ("The Free plan allows up to 3 members ... unlimited version history, and an audit log", accepted at
    # 0.86; docs/teacher.md, "Why no sample was ever kept"). Its samples stay judged candidates and the DPO
    # pair's rejected side; without an extract the pair is not accepted.
    answers_from_samples: bool = True
    # Rank an accepted model sample above the extract whatever their scores: for a teacher stronger than the
    # student (`local_teacher`, `openai_teacher`). The extract is the best-matching sentence itself, so it gets
    # the judge's top score (1.0) and a paraphrase can only score lower: without this a stronger teacher's
    # answer was never kept where an extract existed.
    prefer_samples: bool = False
    seed: int = 1234
    limits: JudgeLimits = JudgeLimits()


def _seed(base: int, *parts: str) -> int:
    h = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return (base + int.from_bytes(h[:4], "big")) % (2**31 - 1)


class GroundedTeacher:
    """Questions from a chunk, several sampled answers with the passage in context, a grounding judge."""

    def __init__(self, model: TeacherModel, options: TeacherOptions = TeacherOptions(),
                 name: str | None = None) -> None:
        if options.candidates < 1 and not options.extract:
            raise ValueError("a teacher needs at least one candidate per question, or the extract")
        self.model = model
        self.options = options
        self.name = name or model.name
        self.stats = {"model_questions": 0, "template_questions": 0, "questions_rejected": 0}
        self.rejected_questions: list[tuple[str, str]] = []  # (question, reason), for the docs

    def questions(self, chunk: Chunk, k: int = 2) -> list[tuple[str, str]]:
        """Up to k (question, source) pairs: the model's valid questions first, then templates."""
        o = self.options
        messages = [{"role": "system", "content": QUESTION_SYSTEM},
                    {"role": "user", "content": QUESTION_USER.format(passage=chunk.passage)}]
        raw = self.model.complete(messages, n=o.question_samples, temperature=o.temperature, top_p=o.top_p,
                                  max_new_tokens=o.question_max_tokens, seed=_seed(o.seed, chunk.sha256, "q"))
        out: list[tuple[str, str]] = []
        seen: set[str] = set()
        for text in raw:
            q = clean_question(text)
            problem = question_problem(q, chunk.passage)
            key = " ".join(content_words(q))
            if problem is None and key in seen:
                problem = "duplicate"
            if problem:
                self.stats["questions_rejected"] += 1
                self.rejected_questions.append((q, problem))
                continue
            seen.add(key)
            out.append((q, "model"))
            self.stats["model_questions"] += 1
            if len(out) >= k:
                return out
        for q in template_questions(chunk, limit=k + 3):  # spares: some may repeat a model question
            key = " ".join(content_words(q))
            if key in seen:
                continue
            seen.add(key)
            out.append((q, "template"))
            self.stats["template_questions"] += 1
            if len(out) >= k:
                break
        return out

    def answer(self, question: str, chunk: Chunk, question_source: str = "user") -> TeacherPair:
        """Sample answers with the passage in context, judge them, keep the best (and the worst)."""
        o = self.options
        messages = [{"role": "system", "content": ANSWER_SYSTEM},
                    {"role": "user", "content": ANSWER_USER.format(passage=chunk.passage, question=question)}]
        raw = self.model.complete(messages, n=o.candidates, temperature=o.temperature, top_p=o.top_p,
                                  max_new_tokens=o.answer_max_tokens,
                                  seed=_seed(o.seed, chunk.sha256, question)) if o.candidates else []
        candidates = []
        for text in raw:
            cleaned = clean_answer(text)
            candidates.append(Candidate(cleaned, judge(question, cleaned, chunk.passage, o.limits)))
        if o.extract and (quoted := extract_answer(question, chunk.passage)):
            if quoted in {c.text for c in candidates}:  # a sample that is the passage's sentence word for word
                candidates = [replace(c, origin="extract") if c.text == quoted else c for c in candidates]
            else:
                candidates.append(Candidate(quoted, judge(question, quoted, chunk.passage, o.limits), "extract"))
        if not candidates:
            candidates.append(Candidate("", Verdict(False, 0.0, 0.0, 0.0, ("no_answer",)), "extract"))

        def usable(c: Candidate) -> bool:
            return c.verdict.accepted and (o.answers_from_samples or c.origin == "extract")

        # Best: usable first, then (with `prefer_samples`) a model sample, then by score, then (with
        # `extract_wins_ties`) the extract; worst: the last. Otherwise ties keep sampling order.
        ranked = sorted(candidates, key=lambda c: (usable(c), o.prefer_samples and c.origin == "model",
                                                   c.verdict.score, o.extract_wins_ties and c.origin == "extract"),
                        reverse=True)
        best = ranked[0]
        worst = sorted(candidates, key=lambda c: (c.verdict.accepted, c.verdict.score,
                                                  o.extract_wins_ties and c.origin == "extract"), reverse=True)[-1]
        accepted = usable(best)
        rejected = None
        if (accepted and worst is not best and worst.text.strip() and worst.text != best.text
                and (not worst.verdict.accepted or best.verdict.score - worst.verdict.score >= o.dpo_margin)):
            rejected = worst
        return TeacherPair(
            doc_id=chunk.doc_id, chunk_id=chunk.chunk_id, chunk_sha256=chunk.sha256, question=question,
            question_source=question_source, answer=best.text, accepted=accepted,
            score=best.verdict.score, teacher=self.name,
            rejected=rejected.text if rejected else None,
            rejected_score=rejected.verdict.score if rejected else None,
            candidates=tuple(candidates),
        )

    def pairs_for_chunk(self, chunk: Chunk, questions: int = 2) -> list[TeacherPair]:
        if not chunk.text.strip():
            raise ValueError(f"chunk {chunk.doc_id}/{chunk.chunk_id} is empty")
        return [self.answer(q, chunk, source) for q, source in self.questions(chunk, questions)]


def self_teacher(backend: Backend, adapter: str | None = None,
                 options: TeacherOptions = TeacherOptions()) -> GroundedTeacher:
    """The embedded default: the serving model with the passage in context. The kept answer is the passage's
    own sentence (the extract); the model's judged samples are only the DPO pairs' rejected side
    (`TeacherOptions.answers_from_samples`, docs/teacher.md)."""
    return GroundedTeacher(BackendTeacherModel(backend, adapter), replace(options, answers_from_samples=False))


def local_teacher(model: str | Path, options: TeacherOptions = TeacherOptions(), **kwargs: Any) -> GroundedTeacher:
    """A stronger local model (hub id or folder) as teacher: its accepted answers come before the extract."""
    return GroundedTeacher(HFTeacherModel(model, **kwargs), replace(options, prefer_samples=True))


def openai_teacher(base_url: str, model: str, api_key: str = "not-needed",
                   options: TeacherOptions = TeacherOptions(candidates=2)) -> GroundedTeacher:
    """A model behind an OpenAI-compatible endpoint as teacher (fewer samples: each one is a request); its
    accepted answers come before the extract. The documented way to a teacher stronger than the student."""
    return GroundedTeacher(OpenAITeacherModel(base_url, model, api_key), replace(options, prefer_samples=True))


def summarize(pairs: Sequence[TeacherPair]) -> dict[str, Any]:
    """Counts for reports: pairs, accepted, DPO pairs, candidate-level acceptance rate."""
    cands = [c for p in pairs for c in p.candidates]
    accepted = sum(p.accepted for p in pairs)
    return {
        "pairs": len(pairs),
        "accepted": accepted,
        "acceptance_rate": round(accepted / len(pairs), 4) if pairs else 0.0,
        "dpo_pairs": sum(p.rejected is not None for p in pairs),
        "accepted_extracts": sum(p.accepted and p.answer_origin == "extract" for p in pairs),
        "candidates": len(cands),
        "candidate_acceptance_rate": round(sum(c.verdict.accepted for c in cands) / len(cands), 4) if cands else 0.0,
    }
