"""The gate's measurements: the held-out data, how each metric is scored, and one model's metrics.

In: a dataset snapshot's held-out rows (`load_eval_set`), the shipped general-ability suite
(`load_general_suite`) and a model with its adapters (`Scorer`). Out: `ModelMetrics` per model state
(`measure`). No decision is taken here: `training/gate_decision.py` decides from these numbers, and
`training/gate_report.py` writes them down.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from assistant.prompt import cut_at_markup, holds_markup, recites_prompt
from training.fact_check import contradicts_prompt
from training.gate_config import GateConfig

SUITE_DIR = Path(__file__).parent / "general_suite"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Answer clearly and briefly."
Progress = Callable[[dict[str, Any]], None]


class EvalDataError(ValueError):
    """The held-out set or the general suite is missing or malformed."""



# ------------------------------------------------------------------------------------------ data
@dataclass(frozen=True)
class Completion:
    """A prompt (chat messages) and the reference assistant answer to score."""

    prompt: list[dict[str, str]]
    completion: str


@dataclass(frozen=True)
class PrefPair:
    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    correct: bool = True  # the chosen answer states no number or code its passages lack (training/fact_check.py)


@dataclass(frozen=True)
class DocQA:
    question: str
    passage: str
    key_facts: list[str]
    source: str = ""
    title: str = ""  # the document's title, shown with the passage as retrieval shows it
    split: str = "held-out"  # "trained": a question whose facts users asked and training rows answer


@dataclass
class EvalSet:
    """The frozen held-out data one evaluation runs on."""

    sft: list[Completion] = field(default_factory=list)
    pairs: list[PrefPair] = field(default_factory=list)
    doc_qa: list[DocQA] = field(default_factory=list)
    source: str = ""

    def capped(self, cfg: GateConfig) -> EvalSet:
        """At most `max_*` rows of each kind; held-out and trained document questions are capped apart, so a long
        curated file of trained questions never pushes the held-out ones out."""
        doc_qa = self.doc_qa_of("held-out")[:cfg.max_doc_qa] + self.doc_qa_of("trained")[:cfg.max_doc_qa]
        return EvalSet(self.sft[:cfg.max_sft], self.pairs[:cfg.max_pairs], doc_qa, self.source)

    def own_choices(self) -> list[PrefPair]:
        """The user's held-out choices for edit_match: each question once, with the answer they edited into or
        chose and the one they turned down (the held-out preference pairs)."""
        seen: set[str] = set()
        out = []
        for p in self.pairs:
            key = json.dumps(p.prompt, sort_keys=True)
            if p.prompt and p.prompt[-1]["role"] == "user" and key not in seen:
                seen.add(key)
                out.append(p)
        return out

    def doc_qa_of(self, split: str) -> list[DocQA]:
        return [q for q in self.doc_qa if q.split == split]

    def sizes(self) -> dict[str, int]:
        return {"sft": len(self.sft), "pairs": len(self.pairs), "pairs_correct": sum(p.correct for p in self.pairs),
                "doc_qa": len(self.doc_qa_of("held-out")), "doc_qa_trained": len(self.doc_qa_of("trained"))}


@dataclass(frozen=True)
class GeneralQA:
    id: str
    question: str
    keywords: list[list[str]]  # every group must appear; any word of a group will do


@dataclass
class GeneralSuite:
    reference: list[tuple[str, str]]  # (id, text)
    qa: list[GeneralQA]


def load_general_suite(folder: Path | str = SUITE_DIR) -> GeneralSuite:
    """The shipped suite: reference.jsonl ({id, text}) and qa.jsonl ({id, question, keywords})."""
    folder = Path(folder)
    ref = [(r["id"], r["text"]) for r in read_jsonl(folder / "reference.jsonl", ("id", "text"))]
    qa = []
    for r in read_jsonl(folder / "qa.jsonl", ("id", "question", "keywords")):
        groups = r["keywords"]
        if not (isinstance(groups, list) and groups and all(isinstance(g, list) and g for g in groups)):
            raise EvalDataError(f"{folder / 'qa.jsonl'}: {r['id']}: keywords must be a list of non-empty lists")
        qa.append(GeneralQA(r["id"], r["question"], [[str(w) for w in g] for g in groups]))
    if not ref or not qa:
        raise EvalDataError(f"the general suite in {folder} is empty")
    return GeneralSuite(ref, qa)


def read_jsonl(path: Path, required: Sequence[str]) -> list[dict[str, Any]]:
    if not path.is_file():
        raise EvalDataError(f"{path} is missing")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalDataError(f"{path}:{i}: not JSON: {e}") from e
        missing = [k for k in required if k not in row]
        if missing:
            raise EvalDataError(f"{path}:{i}: missing {missing}")
        rows.append(row)
    return rows


# Where a snapshot keeps its held-out rows, most specific first. The dataset builder writes the frozen
# held-out set as `heldout/<kind>`; `<kind>/test` is the plain three-split layout.
_HELDOUT_DIRS = {
    "sft": ("heldout/sft", "sft/test", "heldout/sft/test"),
    "dpo": ("heldout/dpo", "dpo/test", "heldout/dpo/test"),
    "doc_qa": ("heldout/doc_qa", "doc_qa/test", "heldout/docqa", "docqa/test", "heldout/doc_qa/test"),
}


def load_eval_set(root: Path | str, doc_qa: Path | str | None = None) -> EvalSet:
    """The held-out rows of a dataset snapshot (.jsonl files or HF `save_to_disk` folders).

    `doc_qa` is a JSONL file of document questions ({question, passage, key_facts | answer}); the loop
    writes it from the held-out teacher rows, whose passages live in the knowledge base.
    """
    root = Path(root)
    if not root.is_dir():
        raise EvalDataError(f"evaluation data folder {root} does not exist")
    rows = {kind: _load_rows(root, dirs) for kind, dirs in _HELDOUT_DIRS.items()}
    if doc_qa is not None:
        rows["doc_qa"] = read_jsonl(Path(doc_qa), ("question",))
    es = EvalSet(source=str(root))
    for r in rows["sft"] or []:
        es.sft.extend(_sft_items(r))
    for r in rows["dpo"] or []:
        es.pairs.append(_pair_item(r))
    for r in rows["doc_qa"] or []:
        es.doc_qa.append(doc_qa_item(r))
    if not (es.sft or es.pairs or es.doc_qa):
        looked = sorted({d for v in _HELDOUT_DIRS.values() for d in v})
        raise EvalDataError(f"no held-out rows in {root} (looked for {looked})")
    return es


def _load_rows(root: Path, candidates: Sequence[str]) -> list[dict[str, Any]] | None:
    """Rows of the first candidate location that has any (an empty frozen file defers to the test split)."""
    for rel in candidates:
        p = root / rel
        rows: list[dict[str, Any]] = []
        if p.with_suffix(".jsonl").is_file():
            rows = read_jsonl(p.with_suffix(".jsonl"), ())
        elif (p / "state.json").is_file():
            from datasets import load_from_disk

            rows = [dict(r) for r in load_from_disk(str(p))]
        if rows:
            return rows
    return None


def _msgs(value: Any, what: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        raise EvalDataError(f"{what} must be a list of chat messages, got {str(value)[:80]!r}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _answer(value: Any, what: str) -> str:
    if isinstance(value, str):
        return value
    msgs = _msgs(value, what)
    if msgs[-1]["role"] != "assistant":
        raise EvalDataError(f"{what} must end with an assistant message")
    return msgs[-1]["content"]


def _sft_items(row: dict[str, Any]) -> list[Completion]:
    if "messages" in row:
        msgs = _msgs(row["messages"], "messages")
        # Every assistant turn is scored with what came before it, as training's loss does.
        return [Completion(msgs[:i], m["content"]) for i, m in enumerate(msgs) if m["role"] == "assistant" and i]
    if "prompt" in row and "completion" in row:
        return [Completion(_msgs(row["prompt"], "prompt"), _answer(row["completion"], "completion"))]
    raise EvalDataError(f"held-out SFT row has neither messages nor prompt/completion: {sorted(row)}")


def _pair_item(row: dict[str, Any]) -> PrefPair:
    if not {"prompt", "chosen", "rejected"} <= set(row):
        raise EvalDataError(f"held-out preference row needs prompt, chosen, rejected: {sorted(row)}")
    prompt, chosen = _msgs(row["prompt"], "prompt"), _answer(row["chosen"], "chosen")
    return PrefPair(prompt, chosen, _answer(row["rejected"], "rejected"), not contradicts_prompt(chosen, prompt))


def doc_qa_item(row: dict[str, Any]) -> DocQA:
    question = row.get("question")
    passage = row.get("passage") or row.get("context") or row.get("chunk")
    if not isinstance(question, str) or not isinstance(passage, str):
        raise EvalDataError(f"held-out document question needs question and passage: {sorted(row)}")
    facts = row.get("key_facts")
    if not facts:
        facts = key_facts(str(row.get("answer", "")), passage)
    if not facts:
        raise EvalDataError(f"held-out document question {question[:60]!r} has no key facts and no answer "
                            "sharing words with its passage")
    split = str(row.get("split") or "held-out")
    if split not in ("held-out", "trained"):
        raise EvalDataError(f"document question {question[:60]!r}: split must be held-out or trained, got {split!r}")
    return DocQA(question, passage, [str(f) for f in facts], str(row.get("source") or row.get("doc_id") or ""),
                 str(row.get("title") or ""), split)


_STOP = set("""a an the and or but if then than that this these those is are was were be been being of in on at to
for from by with as it its into about over under after before between during without within not no yes do does did
have has had can could will would shall should may might must there their they them he she his her we our you your
i me my what which who whom whose when where why how also very more most some any each other such only own same so
too just""".split())
_WORD = re.compile(r"[A-Za-z][A-Za-z'\-]+|\d+(?:[.,:/]\d+)*")


def key_facts(answer: str, passage: str, limit: int = 5) -> list[str]:
    """Content words and numbers of the reference answer that the passage also contains."""
    in_passage = {w.lower() for w in _WORD.findall(passage)}
    out: list[str] = []
    for w in _WORD.findall(answer):
        lw = w.lower()
        if lw in _STOP or lw in out or lw not in in_passage or (len(lw) < 4 and not lw[0].isdigit()):
            continue
        out.append(lw)
    # Numbers and rarer (longer) words first: they carry the facts.
    out.sort(key=lambda w: (not w[0].isdigit(), -len(w)))
    return out[:limit]


def _norm(text: str) -> str:
    return " " + re.sub(r"[^a-z0-9]+", " ", text.lower()) + " "


def grounded_score(answer: str, facts: Sequence[str]) -> float:
    """`fact_score` for an answer to a document question; 0 for one that recites the prompt's markup: its facts
    were copied out of the passages with the rest of the prompt ("<data>\n<documents>\n> A-exam: 2.2 hours", a
    sampled answer of the self-teacher in a loop run, holds the fact and answers nothing)."""
    return 0.0 if recites_prompt(answer) else fact_score(answer, facts)


def fact_score(answer: str, facts: Sequence[str]) -> float:
    """Share of `facts` found in `answer` (case-, punctuation- and whole-word-insensitive)."""
    a = _norm(answer)
    return sum(_norm(f) in a for f in facts) / len(facts) if facts else 0.0


def closeness(answer: str, wanted: str) -> float:
    """How close an answer is to another, 0-1: difflib's similarity ratio over the characters, so the shape counts
    (list markers, a closing question, the opening words) as well as the words."""
    return difflib.SequenceMatcher(None, answer.strip(), wanted.strip(), autojunk=False).ratio()


def leaning(answer: str, chosen: str, rejected: str) -> float:
    """-1 to 1: how much nearer an answer is to the one the user chose than to the one they turned down. Both
    answer the same question from the same passages, so what they share (mostly the facts) cancels and what the
    user changed (the shape, the opening, the length) decides: the turned-down answer itself scores below 0."""
    return closeness(answer, chosen) - closeness(answer, rejected)


def keyword_score(answer: str, groups: Sequence[Sequence[str]]) -> float:
    a = _norm(answer)
    return sum(any(_norm(w) in a for w in g) for g in groups) / len(groups) if groups else 0.0


def grounded_prompt(item: DocQA, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> list[dict[str, str]]:
    """The question with its passage, exactly as the agent serves a question with a retrieved passage:
    under its document's title (with the source id there instead, a model that had learnt to copy titles
    into answers would never be caught by this check)."""
    from assistant.prompt import Passage, render_turn

    return render_turn(system_prompt, [], item.question,
                       passages=[Passage(item.title or item.source or "document", "shared", item.passage)])


# ------------------------------------------------------------------------------------------ scoring
class Scorer:
    """Log-probabilities and greedy answers from one model, with adapters switched by label."""

    def __init__(self, model: Any, tokenizer: Any, cfg: GateConfig, system_prompt: str = DEFAULT_SYSTEM_PROMPT):
        self.model, self.tok, self.cfg, self.system_prompt = model, tokenizer, cfg, system_prompt
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.device = next(model.parameters()).device

    @contextmanager
    def using(self, adapter: str | None) -> Iterator[None]:
        """Score with adapter `adapter` (a PEFT adapter name) or, with None, the bare base model."""
        if adapter is None:
            ctx = self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else nullcontext()
            with ctx:
                yield
            return
        self.model.set_adapter(adapter)
        yield

    # -------------------------------------------------------------- token bookkeeping
    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def completion_ids(self, item: Completion) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids): the answer's tokens exactly as the chat template renders them,
        up to and including its end-of-turn token."""
        prompt_text = self._render(item.prompt, True)
        full = self._render([*item.prompt, {"role": "assistant", "content": item.completion}], False)
        if full.startswith(prompt_text):
            answer_text = full[len(prompt_text):].rstrip("\n")
        else:  # a template that renders the last turn differently: score the text plus EOS
            answer_text = item.completion + (self.tok.eos_token or "")
        prompt_ids, answer_ids = self._ids(prompt_text), self._ids(answer_text)
        room = self.cfg.max_length - len(answer_ids)
        if room < 1:
            answer_ids, prompt_ids = answer_ids[:self.cfg.max_length - 1], prompt_ids[-1:]
        elif len(prompt_ids) > room:
            prompt_ids = prompt_ids[-room:]
        return prompt_ids, answer_ids

    def _sum_logprobs(self, seqs: list[tuple[list[int], list[int]]]) -> list[tuple[float, int]]:
        """For (context, target) id lists: (sum of log p(target tokens | preceding), target length)."""
        import torch

        out: list[tuple[float, int]] = []
        pad = self.tok.pad_token_id
        for start in range(0, len(seqs), self.cfg.batch_size):
            batch = seqs[start:start + self.cfg.batch_size]
            width = max(len(c) + len(t) for c, t in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, (c, t) in enumerate(batch):
                seq = c + t
                ids[i, :len(seq)] = torch.tensor(seq)
                mask[i, :len(seq)] = 1
            with torch.no_grad():
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            # log p(token) = logit(token) - logsumexp(logits): no full log-softmax copy of the vocab-wide logits.
            lf = logits[:, :-1].float()
            nxt = ids[:, 1:].to(self.device)
            tok_lp = lf.gather(-1, nxt.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(lf, dim=-1)
            del logits, lf
            for i, (c, t) in enumerate(batch):
                lo = max(len(c) - 1, 0)  # position predicting the first target token
                out.append((float(tok_lp[i, lo:lo + len(t) - (0 if c else 1)].sum()), len(t) - (0 if c else 1)))
        return out

    # -------------------------------------------------------------- metrics
    def val_loss(self, items: Sequence[Completion]) -> tuple[float, int]:
        scored = self._sum_logprobs([self.completion_ids(it) for it in items])
        n = sum(k for _, k in scored)
        return (-sum(s for s, _ in scored) / n if n else float("nan")), n

    def preference(self, pairs: Sequence[PrefPair]) -> list[float]:
        """Per pair, the log-probability margin of the chosen answer over the rejected one."""
        seqs = []
        for p in pairs:
            seqs.append(self.completion_ids(Completion(p.prompt, p.chosen)))
            seqs.append(self.completion_ids(Completion(p.prompt, p.rejected)))
        lp = [s for s, _ in self._sum_logprobs(seqs)]
        return [lp[2 * i] - lp[2 * i + 1] for i in range(len(pairs))]

    def text_perplexity(self, texts: Sequence[str]) -> tuple[float, int]:
        seqs = []
        for t in texts:
            ids = self._ids(t)[:self.cfg.max_length]
            seqs.append(([], ids))
        scored = self._sum_logprobs(seqs)
        n = sum(k for _, k in scored)
        return math.exp(-sum(s for s, _ in scored) / n), n

    def generate(self, prompts: Sequence[list[dict[str, str]]]) -> list[str]:
        import torch

        rendered = [self._render(p, True) for p in prompts]
        texts: list[str] = [""] * len(rendered)
        old_side = self.tok.padding_side
        self.tok.padding_side = "left"  # generation continues from the right edge of every row
        try:
            for rows in self._batches(rendered):
                enc = self.tok([rendered[i] for i in rows], return_tensors="pt", padding=True,
                               add_special_tokens=False, truncation=True,
                               max_length=self.cfg.max_length).to(self.device)
                with torch.no_grad():
                    out = self.model.generate(**enc, max_new_tokens=self.cfg.max_new_tokens, do_sample=False,
                                              pad_token_id=self.tok.pad_token_id,
                                              eos_token_id=self.tok.eos_token_id)
                width = enc["input_ids"].shape[1]
                for i, o in zip(rows, out, strict=True):
                    texts[i] = self.tok.decode(o[width:], skip_special_tokens=True).strip()
        finally:
            self.tok.padding_side = old_side
        # As served: the chat stops an answer where it starts reciting the prompt's markup (assistant/chat.py).
        return [cut_at_markup(t) if holds_markup(p) else t for t, p in zip(texts, prompts, strict=True)]

    def _batches(self, rendered: Sequence[str]) -> Iterator[list[int]]:
        """Row indices in generation batches, longest prompt first: at most `batch_size` rows and about
        `batch_tokens` prompt tokens (rows x the batch's longest prompt, which comes first) each."""
        lengths = [min(len(self.tok(r, add_special_tokens=False)["input_ids"]), self.cfg.max_length)
                   for r in rendered]
        batch: list[int] = []
        for i in sorted(range(len(rendered)), key=lambda i: -lengths[i]):
            if batch and (len(batch) >= self.cfg.batch_size
                          or (len(batch) + 1) * lengths[batch[0]] > self.cfg.batch_tokens):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    def with_system(self, question: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": question}]


# ------------------------------------------------------------------------------------------ results
@dataclass
class ModelMetrics:
    label: str  # "base" | "baseline" | "candidate"
    adapter: str | None  # version name or folder; None = the base model
    val_loss: float | None = None
    val_ppl: float | None = None
    val_tokens: int = 0
    val_rows: int = 0  # held-out conversations' answers scored
    pref_accuracy: float | None = None
    pref_margin: float | None = None
    pref_scores: list[float] | None = None  # per held-out pair: 1.0 when the chosen answer ranks higher
    liked_correct: float | None = None  # pref_accuracy over the pairs whose chosen answer is correct
    liked_correct_scores: list[float] | None = None
    edit_match: float | None = None  # the user's held-out choices: nearer the chosen answer than the turned-down one
    edit_match_scores: list[float] | None = None
    grounded: float | None = None  # held-out document questions: never trained on
    grounded_scores: list[float] | None = None  # per held-out document question (for the sign test)
    grounded_trained: float | None = None  # questions whose facts users asked: shown beside, never decides
    grounded_trained_scores: list[float] | None = None
    general_ppl: float | None = None
    general_qa: float | None = None
    general_qa_scores: list[float] | None = None  # per question, in suite order (for the sign test)
    seconds: float = 0.0
    check_seconds: dict[str, float] = field(default_factory=dict)  # check -> seconds it took for this model
    answers: dict[str, list[str]] = field(default_factory=dict)  # check -> answers (for samples)

    def value(self, metric: str) -> float | None:
        return getattr(self, metric)



# ------------------------------------------------------------------------------------------ running
def measure(scorer: Scorer, label: str, adapter: str | None, display: str | None, eval_set: EvalSet,
            suite: GeneralSuite, progress: Progress, *, held_out: bool = True,
            general: dict[str, Any] | None = None, grounded: list[str] | None = None,
            own_answers: dict[str, str] | None = None) -> ModelMetrics:
    """Every metric for one model state (base = adapter None). `general`: the general-suite results
    already known for this state (`_base_cache`), used instead of running the suite again; `grounded`: its
    answers to these document questions, known the same way; `own_answers`: its answers to held-out questions
    of the user's, by `prompt_key`: only the others are generated."""
    t0 = time.perf_counter()
    mm = ModelMetrics(label=label, adapter=display)
    # A held-out measure that no check of this gate reads is not run (the personal gate reads edit_match and
    # grounded: held-out loss and preference accuracy would cost it a forward pass per row and decide nothing).
    reads = {*scorer.cfg.target_metrics, *scorer.cfg.gain_metrics}

    @contextmanager
    def check(name: str, **extra: Any) -> Iterator[None]:
        progress({"event": "eval_progress", "model": label, "check": name, **extra})
        started = time.perf_counter()
        yield
        mm.check_seconds[name] = round(time.perf_counter() - started, 2)

    with scorer.using(adapter):
        if held_out and eval_set.sft and "val_loss" in reads:
            with check("val_loss"):
                mm.val_loss, mm.val_tokens = scorer.val_loss(eval_set.sft)
                mm.val_rows = len(eval_set.sft)
                mm.val_ppl = math.exp(min(mm.val_loss, 700))
        if held_out and eval_set.pairs and reads & {"pref_accuracy", "liked_correct"}:
            with check("pref_accuracy"):
                margins = scorer.preference(eval_set.pairs)
                mm.pref_scores = [float(m > 0) for m in margins]
                mm.pref_accuracy, mm.pref_margin = _mean(mm.pref_scores), _mean(margins)
                mm.liked_correct_scores = [w for w, p in zip(mm.pref_scores, eval_set.pairs, strict=True)
                                           if p.correct]
                mm.liked_correct = _mean(mm.liked_correct_scores)
        own = eval_set.own_choices() if held_out and "edit_match" in reads else []
        if own:
            known = own_answers or {}
            keys = [prompt_key(p.prompt) for p in own]
            todo = [p.prompt for p, k in zip(own, keys, strict=True) if k not in known]
            with check("edit_match", cached=not todo):
                fresh = iter(scorer.generate(todo) if todo else [])
                answers = [known[k] if k in known else next(fresh) for k in keys]
                mm.edit_match_scores = [leaning(a, p.chosen, p.rejected) for a, p in zip(answers, own, strict=True)]
                mm.edit_match = _mean(mm.edit_match_scores)
                mm.answers["edit_match"] = answers
        if held_out and eval_set.doc_qa:
            with check("grounded", cached=grounded is not None):
                answers = grounded if grounded is not None and len(grounded) == len(eval_set.doc_qa) else \
                    scorer.generate([grounded_prompt(q, scorer.system_prompt) for q in eval_set.doc_qa])
                scored = [(q.split, grounded_score(a, q.key_facts)) for a, q in zip(answers, eval_set.doc_qa,
                                                                                    strict=True)]
                mm.grounded_scores = [x for split, x in scored if split == "held-out"] or None
                mm.grounded = _mean(mm.grounded_scores)
                mm.grounded_trained_scores = [x for split, x in scored if split == "trained"] or None
                mm.grounded_trained = _mean(mm.grounded_trained_scores)
                mm.answers["grounded"] = answers
        if general is not None:
            progress({"event": "eval_progress", "model": label, "check": "general", "cached": True})
            mm.general_ppl, answers = general["general_ppl"], general["answers"]
        else:
            with check("general"):
                mm.general_ppl, _ = scorer.text_perplexity([t for _, t in suite.reference])
                answers = scorer.generate([scorer.with_system(q.question) for q in suite.qa])
        mm.general_qa_scores = [keyword_score(a, q.keywords) for a, q in zip(answers, suite.qa, strict=True)]
        mm.general_qa = sum(mm.general_qa_scores) / len(answers)
        mm.answers["general_qa"] = answers
    mm.seconds = round(time.perf_counter() - t0, 2)
    return mm


def prompt_key(prompt: list[dict]) -> str:
    """A held-out question's identity for the answer caches: its whole prompt (system, passages, history)."""
    return hashlib.sha256(json.dumps(prompt, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:32]


def _mean(xs: Sequence[float] | None) -> float | None:
    return sum(xs) / len(xs) if xs else None


def samples(metrics: dict[str, ModelMetrics], eval_set: EvalSet, suite: GeneralSuite, n: int) -> list[dict]:
    out = []
    own = [p.prompt[-1]["content"] for p in eval_set.own_choices()]
    for check, questions in (("edit_match", own), ("grounded", [q.question for q in eval_set.doc_qa]),
                             ("general_qa", [q.question for q in suite.qa])):
        for i, q in enumerate(questions[:n]):
            answers = {k: mm.answers[check][i] for k, mm in metrics.items() if check in mm.answers}
            if answers:
                out.append({"check": check, "question": q, "answers": answers})
    return out

