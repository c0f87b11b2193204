"""The self-improvement benchmark: does the loop make the assistant measurably better for its users?

    .venv/bin/python -m bench.loop [--docs DIR --questions FILE] [--cycles 2] [--model DIR] [--gpu] [--out docs]
        [--json FILE]

Document sets (each a folder of documents and a question file; the default is the first):
    --docs tests/data/docs --questions bench/loop_qa.json                    a software product (Lumen Desk)
    --docs bench/docsets/hanbit --questions bench/docsets/hanbit.json        a clinic, partly in Korean
    --docs bench/docsets/railyard --questions bench/docsets/railyard.json    a rail depot: numbers and codes

What happens, all through the product's real entry points:

1. A fresh home. Simulated users, an admin and an examiner are created, and `assistant serve` starts as
   its own process. The admin uploads the documents of `--docs` through the API (`POST /v1/documents`),
   once, as the team's SHARED documents, so every account (the users, the examiner, the teacher reading
   as the admin) retrieves from them. Shared, not private copies: the dataset builder puts retrieved
   passages into training prompts from shared documents only (a user's private document never reaches
   the shared adapter), so only shared documents exercise that path.
2. Cycle 0 measures the base model: the users chat through the OpenAI-compatible API (questions from
   `--questions`, default sampling with a fixed seed per request) and rate every answer by a
   HIDDEN preference: they like answers that are short (at most `--like-words` words, and not cut off
   by the token limit) and name the product (the question file's `product`, "Lumen Desk" by default), and
   dislike the rest. A disliked answer
   gets a thumbs down and is edited into the answer they wanted; a liked one gets a thumbs up. The
   "open-book" examiner asks held-out questions (paraphrases no user ever sent, plus facts no user asked
   about) greedily through the API, with retrieval from the shared documents. The same questions are then
   asked closed-book, IN-PROCESS: every account sees the shared documents, so through the API the router
   would retrieve for any asker. Once the API measurements of the cycle are done (the server is idle),
   the bench loads the model the server uses plus the adapter serving now (serving weights), and
   generates greedily with the plain system prompt and the question alone: the prompt the server sends
   when nothing is retrieved.
3. The admin starts a retrain through the admin API (`POST /v1/admin/jobs`, the same job runner the
   console and the scheduler use: `training.loop.run_cycle`): teacher pairs from the documents (first
   cycle), a dataset snapshot, TRL SFT + DPO in a child process, the evaluation gate, registration,
   promotion with a hot swap if the gate passes.
4. The same users chat again (cycle 1, 2...), the held-out questions are asked again (open-book through
   the API, closed-book in-process).

Unanswerable questions (the question file's `unanswerable`: the documents do not hold the answer) are asked
with the held-out ones; an answer that does not say so is an invented answer, and the report gives their rate.
An answer to any other question that states a number or code no document holds is wrong, whatever else it
got right (training/fact_check.py). The question file's `gate` questions go to the gate only, as its frozen
held-out grounded check; the users' own questions go with them, marked as trained.

Reported per cycle: the users' like rate and their liked-and-correct rate, the like rate on the held-out
questions, the invented-answer rate on unanswerable questions, grounded-answer
accuracy on held-out questions with retrieval and closed-book (a question counts when the answer holds
one alternative of every key-fact group; closed-book is measured in-process on the serving weights with
the plain system prompt, see 2.), the general-ability suite of the gate (general_qa keyword
score and general_ppl, candidate against base), the gate's decision and the cycle time. A markdown
table goes to stdout, a plot to `<out>/loop.png`, every number to `--json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from assistant.prompt import recites_prompt
from bench.server_process import free_port, prepare_model, start_server
from training.fact_check import abstains, unsupported_facts

ROOT = Path(__file__).resolve().parent.parent

QA_FILE = Path(__file__).with_name("loop_qa.json")
DOCS = ROOT / "tests" / "data" / "docs"
DOC_SUFFIXES = (".md", ".txt", ".html", ".pdf")
PRODUCT = "lumen desk"  # the hidden preference's name when the question file names none ("product")
PHRASINGS = ["{q}", "Quick question: {q}", "{q} Thanks!", "Hi! {q}"]


# ------------------------------------------------------------------------------------------ the hidden preference
def words(text: str) -> int:
    return len(re.findall(r"\w+", text))


def liked(answer: str, max_words: int, finish_reason: str | None = "stop", product: str = PRODUCT) -> bool:
    """What the simulated users like: short, names the product, and finished (an answer cut off by the
    token limit is rambling however few words made it out). The loop never sees this rule, only their
    thumbs and edits."""
    return product in answer.lower() and 0 < words(answer) <= max_words and finish_reason != "length"


def grounded(answer: str, keys: list[list[str]], documents: str = "", question: str = "") -> bool:
    """The answer holds one alternative of every key group, and states no number or code that neither the
    documents nor the question hold: an invented fact beside the right one counts as wrong. An answer that
    recites the prompt's markup (`assistant.prompt.recites_prompt`) copied its facts and counts as wrong."""
    if recites_prompt(answer):
        return False
    text = answer.lower()
    if not all(any(alt.lower() in text for alt in group) for group in keys):
        return False
    return not (documents and unsupported_facts(answer, documents, question))


def judge(group: str, fact: dict, answer: str, documents: str) -> bool:
    """Correct: for an unanswerable question an answer that abstains, else a grounded one."""
    if group == "unanswerable":
        return abstains(answer)
    return grounded(answer, fact["keys"], documents, fact["heldout"])


def document_paths(docs: Path) -> list[Path]:
    return sorted(p for p in docs.iterdir() if p.is_file() and p.suffix.lower() in DOC_SUFFIXES)


def documents_text(docs: Path) -> str:
    """The documents as plain text, for the invented-fact check (`grounded`)."""
    from memory.documents import extract

    return "\n\n".join(extract(p.name, p.read_bytes(), 1 << 22).text for p in document_paths(docs))


def load_questions(path: Path) -> dict:
    """The question file: `trained`, `unseen`, and optionally `unanswerable`, `gate` and `product`."""
    qa = json.loads(path.read_text(encoding="utf-8"))
    qa.setdefault("unanswerable", [])
    qa.setdefault("gate", [])
    qa["product"] = str(qa.get("product") or PRODUCT).lower()
    for group in ("trained", "unseen", "unanswerable"):
        for fact in qa.get(group, []):
            missing = [k for k in ("id", "heldout", *(("keys",) if group != "unanswerable" else ()),
                                   *(("ask", "ideal") if group == "trained" else ())) if k not in fact]
            if missing:
                raise SystemExit(f"{path}: {group} {fact.get('id', '?')} lacks {missing}")
    return qa


# ------------------------------------------------------------------------------------------ records
@dataclass
class Turn:
    who: str
    question: str
    answer: str
    liked: bool
    correct: bool | None = None
    tokens: int = 0
    seconds: float = 0.0


@dataclass
class CycleRow:
    cycle: int
    adapter: str | None
    like_rate_users: float
    like_rate_heldout: float
    grounded_rag: float
    grounded_closed: float
    grounded_rag_paraphrase: float
    grounded_rag_unseen: float
    grounded_closed_paraphrase: float
    grounded_closed_unseen: float
    mean_words: float
    liked_correct_users: float = 0.0  # liked by the users AND grounded-correct (issue 26: liked-but-wrong rose)
    invented_rag: float | None = None  # unanswerable questions answered with something instead of "not in them"
    invented_closed: float | None = None
    general_qa: float | None = None  # the serving model (base at cycle 0), from the gate's report
    general_qa_base: float | None = None
    general_ppl: float | None = None
    general_ppl_base: float | None = None
    gate: str | None = None
    cycle_s: float | None = None
    train_s: float | None = None
    eval_s: float | None = None
    synth_s: float | None = None
    synth: dict | None = None  # the teacher's counts (pairs, accepted, accepted_extracts, dpo_pairs), cycle 1
    chat_s: float = 0.0
    turns: list[dict] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ HTTP
class Api:
    def __init__(self, url: str, key: str) -> None:
        import httpx

        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=900)

    def chat(self, text: str, max_tokens: int, **gen: Any) -> dict:
        for _ in range(20):  # the server's back-pressure (503 + Retry-After) is honoured, never an error
            r = self.http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, **gen})
            if r.status_code == 503:
                time.sleep(float(r.headers.get("retry-after", 5)))
                continue
            r.raise_for_status()
            return r.json()
        raise RuntimeError("the server stayed busy")

    def post(self, path: str, body: dict) -> dict:
        r = self.http.post(path, json=body)
        if r.status_code >= 400:
            raise RuntimeError(f"POST {path}: {r.status_code} {r.text[:300]}")
        return r.json()

    def get(self, path: str) -> dict:
        r = self.http.get(path)
        r.raise_for_status()
        return r.json()

    def upload(self, paths: list[Path], scope: str) -> list[dict]:
        """`POST /v1/documents` (multipart), all files in one request: all go in or none."""
        files = [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]
        r = self.http.post("/v1/documents", files=files, data={"scope": scope})
        if r.status_code >= 400:
            raise RuntimeError(f"POST /v1/documents: {r.status_code} {r.text[:300]}")
        return r.json()["data"]


# ------------------------------------------------------------------------------------------ set-up


def setup_home(home: Path, users: int) -> dict[str, str]:
    """Accounts: API keys by role (the documents go in through the API once the server runs)."""
    from argon2 import PasswordHasher

    from assistant.config import Settings
    from memory.store import Store

    settings = Settings.load(env={}, home=home)
    settings.ensure_dirs()
    # Cheap hashes: the bench talks with API keys only.
    store = Store.open(settings.db_url, password_hasher=PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
    keys: dict[str, str] = {}
    # No closed-book account: every account sees the shared documents (see `closed_book`).
    for name, role in [("admin", "admin"), ("open-book", "user")] + [(f"user{i}", "user") for i in range(users)]:
        u = store.create_user(f"loop-{name}", f"loop-password-{name}", role=role)
        keys[name] = store.create_api_key(u.id)
    store.close()
    return keys


def ingest_documents(admin: Api, docs: Path) -> int:
    """The team's documents, uploaded by the admin as an operator would (`POST /v1/documents`).

    Shared because the dataset builder puts retrieved passages into training prompts from shared documents
    only (a private document never reaches the shared adapter); every account retrieves from them.
    """
    return sum(d["chunks"] for d in admin.upload(document_paths(docs), scope="shared"))


# ------------------------------------------------------------------------------------------ sessions
def user_session(apis: dict[str, Api], qa: dict, cycle: int, args: argparse.Namespace) -> list[Turn]:
    """Each simulated user asks their share of the trained questions, rates every answer, edits the
    ones they dislike into the answer they wanted."""
    facts = qa["trained"]
    users = [k for k in apis if k.startswith("user")]
    turns = []
    for ui, name in enumerate(users):
        api = apis[name]
        share = [facts[(ui * args.per_user + j) % len(facts)] for j in range(args.per_user)]
        for j, fact in enumerate(share):
            question = PHRASINGS[(ui + j) % len(PHRASINGS)].format(q=fact["ask"])
            started = time.perf_counter()
            # The same seed every cycle: a change in what users see comes from the model, not the dice.
            out = api.chat(question, args.max_tokens, seed=10 * ui + j)
            answer = out["choices"][0]["message"]["content"]
            ok = liked(answer, args.like_words, out["choices"][0].get("finish_reason"), qa["product"])
            turns.append(Turn(name, question, answer, ok, grounded(answer, fact["keys"], qa["_documents"], question),
                              out["usage"]["completion_tokens"], time.perf_counter() - started))
            mid = out["message_id"]
            if ok:
                api.post("/v1/feedback/thumb", {"message_id": mid, "rating": 1})
            else:
                api.post("/v1/feedback/thumb", {"message_id": mid, "rating": -1, "reason": "style"})
                api.post("/v1/feedback/edit", {"message_id": mid, "corrected": fact["ideal"]})
        print(f"  cycle {cycle}: {name} done ({sum(t.liked for t in turns if t.who == name)}/{len(share)} liked)",
              file=sys.stderr)
    return turns


def heldout_items(qa: dict) -> list[tuple[str, dict]]:
    return ([("paraphrase", f) for f in qa["trained"]] + [("unseen", f) for f in qa["unseen"]]
            + [("unanswerable", f) for f in qa["unanswerable"]])


def examine(api: Api, who: str, qa: dict, args: argparse.Namespace) -> list[tuple[str, Turn]]:
    """Held-out questions, greedy: (group, turn) with group "paraphrase", "unseen" or "unanswerable"."""
    out = []
    for group, fact in heldout_items(qa):
        started = time.perf_counter()
        r = api.chat(fact["heldout"], args.max_tokens, temperature=0)
        answer = r["choices"][0]["message"]["content"]
        out.append((group, Turn(who, fact["heldout"], answer,
                                liked(answer, args.like_words, r["choices"][0].get("finish_reason"), qa["product"]),
                                judge(group, fact, answer, qa["_documents"]), r["usage"]["completion_tokens"],
                                time.perf_counter() - started)))
    return out


def closed_book(home: Path, model: str, serving: str | None, qa: dict,
                args: argparse.Namespace) -> list[tuple[str, Turn]]:
    """The held-out questions closed-book, in this process, on the serving weights.

    Not through the API: the documents are shared, so the router would retrieve for any account. Called
    after the cycle's API measurements, while the server is idle. The prompt is the one the server sends
    when nothing is retrieved: the plain system prompt, then the question. The model is loaded for this
    call and released after it, so nothing stays in memory while the next cycle trains.
    """
    import torch

    from assistant.config import Settings
    from assistant.runtime import GenerationSettings, TransformersBackend

    settings = Settings.load(env={}, home=home, model=model, torch_threads=args.threads,
                             device="cuda" if args.gpu else None)
    if args.threads:
        torch.set_num_threads(args.threads)
    adapter_dir = None
    if serving is not None:
        from memory.store import Store
        from training.registry import Registry

        store = Store.open(settings.db_url)
        try:
            adapter_dir = Registry(settings, store).get(serving).adapter_dir
        finally:
            store.close()
    backend = TransformersBackend.from_settings(settings, progress=False)
    out = []
    try:
        if adapter_dir is not None:
            backend.load_adapter(serving, adapter_dir)
        gen = GenerationSettings.from_settings(settings, temperature=0, max_new_tokens=args.max_tokens)
        for group, fact in heldout_items(qa):
            started = time.perf_counter()
            messages = [{"role": "system", "content": settings.system_prompt},
                        {"role": "user", "content": fact["heldout"]}]
            r = backend.generate(messages, serving, gen)
            out.append((group, Turn("closed-book", fact["heldout"], r.text,
                                    liked(r.text, args.like_words, r.finish_reason, qa["product"]),
                                    judge(group, fact, r.text, qa["_documents"]),
                                    r.usage["completion_tokens"], time.perf_counter() - started)))
    finally:
        backend.close()
        del backend
        if args.gpu:
            torch.cuda.empty_cache()
    return out


def share(xs: list[bool]) -> float:
    return round(100.0 * sum(xs) / len(xs), 1) if xs else 0.0


def measure(cycle: int, apis: dict[str, Api], qa: dict, args: argparse.Namespace, adapter: str | None,
            home: Path, model: str) -> CycleRow:
    t0 = time.perf_counter()
    session = user_session(apis, qa, cycle, args)
    rag = examine(apis["open-book"], "open-book", qa, args)
    # After the API measurements, so the server is idle while this process runs the model.
    closed = closed_book(home, model, adapter, qa, args)
    held = [t for _, t in rag + closed]

    def acc(rows: list[tuple[str, Turn]], group: str | None = None) -> float:
        """Grounded-correct share; over the answerable questions unless a group is named."""
        return share([t.correct for g, t in rows if (g == group if group else g != "unanswerable")])

    def invented(rows: list[tuple[str, Turn]]) -> float | None:
        """Unanswerable questions answered with something other than "the documents do not say"."""
        honest = [t.correct for g, t in rows if g == "unanswerable"]
        return round(100.0 - share(honest), 1) if honest else None

    row = CycleRow(cycle=cycle, adapter=adapter,
                   like_rate_users=share([t.liked for t in session]),
                   like_rate_heldout=share([t.liked for t in held]),
                   grounded_rag=acc(rag), grounded_closed=acc(closed),
                   grounded_rag_paraphrase=acc(rag, "paraphrase"), grounded_rag_unseen=acc(rag, "unseen"),
                   grounded_closed_paraphrase=acc(closed, "paraphrase"), grounded_closed_unseen=acc(closed, "unseen"),
                   mean_words=round(sum(words(t.answer) for t in session) / max(len(session), 1), 1),
                   liked_correct_users=share([t.liked and bool(t.correct) for t in session]),
                   invented_rag=invented(rag), invented_closed=invented(closed),
                   chat_s=round(time.perf_counter() - t0, 1),
                   turns=[asdict(t) for t in session] + [{**asdict(t), "group": g} for g, t in rag + closed])
    return row


# ------------------------------------------------------------------------------------------ the loop
def run_job(admin: Api, options: dict) -> dict:
    job = admin.post("/v1/admin/jobs", options)
    last = None
    while True:
        detail = admin.get(f"/v1/admin/jobs/{job['id']}")["job"]
        p = detail["progress"]
        now = (p.get("phase"), p.get("stage"), p.get("step"))
        if now != last:
            print(f"  job {job['id']}: {detail['status']} {p.get('phase')} {p.get('stage') or ''} "
                  f"step {p.get('step')}/{p.get('max_steps')} loss {p.get('loss')}", file=sys.stderr)
            last = now
        if detail["status"] not in ("queued", "running"):
            return detail
        time.sleep(3)


def write_gate_questions(qa: dict, path: Path, docs_dir: Path = DOCS) -> Path:
    """The gate's grounded check, each question with the document that answers it: the questions users asked
    (split "trained": their facts are trained on, shown beside) and the question file's frozen `gate` questions
    (split "held-out": no user or examiner asks them and no training row is built from them; they decide).

    The held-out paraphrases, unseen facts and unanswerable questions this bench reports are never shown to the
    trainer or the gate.
    """
    from memory.documents import extract

    docs = [extract(p.name, p.read_bytes(), 1 << 22) for p in document_paths(docs_dir)]
    rows = []
    for split, facts, ask in (("trained", qa["trained"], "ask"), ("held-out", qa["gate"], "question")):
        for fact in facts:
            doc = next((d for d in docs if all(any(a.lower() in d.text.lower() for a in g) for g in fact["keys"])),
                       None)
            if doc is None:
                raise SystemExit(f"no document holds the facts of {fact['id']}")
            # The title is the one ingest gives the document, so the gate asks as retrieval serves.
            rows.append({"question": fact[ask], "passage": doc.text, "title": doc.title,
                         "key_facts": [g[0] for g in fact["keys"]], "source": fact["id"], "split": split})
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def server_inputs(qa: dict, home: Path, args: argparse.Namespace) -> tuple[Path, dict[str, str]]:
    """Write the gate's questions and return them with the server's environment.

    The job options name the questions file, a server file, so the server is told that its folder is the one
    folder an admin's options may read (`synth_docs_dir`; the admin API refuses any other path with 403)."""
    inputs = home.parent / "bench-inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    gate_questions = write_gate_questions(qa, inputs / "gate_questions.jsonl", args.docs)
    env = {**os.environ, "ASSISTANT_TRAIN_THREADS": str(args.train_threads), "HF_HUB_OFFLINE": "1",
           "GRADIO_ANALYTICS_ENABLED": "False", "ASSISTANT_SYNTH_DOCS_DIR": str(inputs)}
    if args.threads:
        env.update(ASSISTANT_TORCH_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    if args.gpu:
        env["ASSISTANT_DEVICE"] = "cuda"
    return gate_questions, env


def cycle_options(cycle: int, args: argparse.Namespace, gate_questions: Path) -> dict:
    train = {"sft_learning_rate": args.lr, "sft_epochs": args.epochs, "dpo_learning_rate": args.dpo_lr,
             "dpo_sft_weight": args.dpo_sft_weight,
             # A distractor adds up to a chunk (200 tokens by default) to prompts of up to ~1000 tokens, and a
             # row longer than max_length loses its end, where the answer is.
             "batch_size": 4, "max_length": 1024 + 256 * args.distractors, "evals_per_epoch": 1,
             "early_stopping_patience": 2,
             "stages": ["sft", "dpo"] if args.dpo else ["sft"]}
    if args.gpu:
        train["device"] = "cuda"
    return {"synth": cycle == 1 and args.synth_chunks > 0, "synth_max_chunks": max(args.synth_chunks, 1),
            "synth_questions_per_chunk": args.synth_questions,
            "teacher": {"candidates": args.synth_candidates, "answer_max_tokens": args.synth_answer_tokens},
            "train": train,
            # General replay rows guard against forgetting (at the default 0.1 the first run's candidates
            # lost 3 of the then 16 general questions and the gate refused them).
            "build": {"replay_ratio": args.replay, "distractor_passages": args.distractors,
                      "abstain_rows": args.abstain, "max_style_share": args.style_cap,
                      "title_negatives": args.title_negatives},
            # Bounded gate on CPU: fewer held-out rows and shorter answers than the defaults, as long as the
            # users' and examiners' (at 32 a right answer was cut before its price). Batches of 16: the 120
            # general questions take about 24 s a model instead of 34 s at 8.
            "gate": {"max_new_tokens": args.max_tokens, "max_sft": 16, "max_pairs": 16, "max_doc_qa": 40,
                     "batch_size": 16},
            "eval_doc_qa": str(gate_questions), "auto_promote": True, "anchor_replay": args.anchor}


def general_from_report(admin: Api, name: str) -> dict[str, float | None]:
    rep = admin.get(f"/v1/admin/adapters/{name}/report")["report"] or {}
    m = rep.get("metrics", {})
    cand, base = m.get("candidate", {}), m.get("base") or m.get("baseline") or {}
    return {"general_qa": cand.get("general_qa"), "general_qa_base": base.get("general_qa"),
            "general_ppl": cand.get("general_ppl"), "general_ppl_base": base.get("general_ppl")}


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def table(rows: list[CycleRow]) -> str:
    head = ("| cycle | serving | gate | like rate, users % | liked and correct, users % | like rate, held-out % | "
            "grounded with retrieval % (paraphrase / unseen) | invented, unanswerable % (with retrieval / closed) | "
            "grounded closed-book % (paraphrase / unseen) | mean words | general_qa % "
            "(base) | general ppl (base) | cycle time s (train / eval / synth) | chat+exam s |")
    out = [head, "|" + "---|" * 14]
    for r in rows:
        ppl = "-" if r.general_ppl is None else f"{r.general_ppl:.2f} ({r.general_ppl_base:.2f})"
        times = "-" if r.cycle_s is None else (f"{r.cycle_s:.0f} ({r.train_s or 0:.0f} / {r.eval_s or 0:.0f} / "
                                              f"{r.synth_s or 0:.0f})")
        invented = "-" if r.invented_rag is None else f"{r.invented_rag} / {r.invented_closed}"
        out.append(f"| {r.cycle} | {r.adapter or 'base'} | {r.gate or '-'} | {r.like_rate_users} | "
                   f"{r.liked_correct_users} | {r.like_rate_heldout} | {r.grounded_rag} ({r.grounded_rag_paraphrase} / "
                   f"{r.grounded_rag_unseen}) | {invented} | {r.grounded_closed} ({r.grounded_closed_paraphrase} / "
                   f"{r.grounded_closed_unseen}) | {r.mean_words} | {pct(r.general_qa)} ({pct(r.general_qa_base)}) "
                   f"| {ppl} | {times} | {r.chat_s:.0f} |")
    return "\n".join(out)


def plot(rows: list[CycleRow], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r.cycle for r in rows]
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
    ax.plot(xs, [r.like_rate_users for r in rows], "o-", label="like rate (users)")
    ax.plot(xs, [r.like_rate_heldout for r in rows], "o--", label="like rate (held-out questions)")
    ax.plot(xs, [r.grounded_rag for r in rows], "s-", label="grounded, with retrieval")
    ax.plot(xs, [r.grounded_closed for r in rows], "s--", label="grounded, closed-book")
    gq = [None if r.general_qa is None else 100 * r.general_qa for r in rows]
    if any(g is not None for g in gq):
        ax.plot(xs, [g if g is not None else float("nan") for g in gq], "^:", label="general_qa (gate suite)")
    ax.set_xticks(xs)
    ax.set_xlabel("cycle (0 = base model)")
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title("Self-improvement loop on the embedded model (bench/loop.py)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def arguments() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=Path, default=DOCS,
                    help="folder of the team's documents (.md .txt .html .pdf), ingested as shared documents")
    ap.add_argument("--questions", type=Path, default=QA_FILE,
                    help="question file for those documents (format: bench/loop_qa.json's _about)")
    ap.add_argument("--cycles", type=int, default=2)
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--per-user", type=int, default=8, help="trained questions each user asks per session")
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--like-words", type=int, default=30, help="the hidden preference's word limit")
    ap.add_argument("--lr", type=float, default=2e-4, help="SFT learning rate")
    ap.add_argument("--epochs", type=float, default=1.5, help="SFT epochs")
    ap.add_argument("--dpo-lr", type=float, default=2e-4,
                    help="DPO learning rate")
    ap.add_argument("--dpo-sft-weight", type=float, default=1.0,
                    help="SFT term added to the DPO loss (RPO; 0 = plain DPO, the product's default)")
    ap.add_argument("--no-dpo", dest="dpo", action="store_false", help="train SFT only")
    ap.add_argument("--synth-chunks", type=int, default=6, help="teacher chunks in the first cycle (0 = none)")
    ap.add_argument("--synth-questions", type=int, default=4, help="teacher questions per chunk")
    ap.add_argument("--synth-candidates", type=int, default=2,
                    help="answers the teacher samples per question; they are only the DPO pairs' "
                         "rejected side, the kept answer is the passage's sentence; 0 = none (docs/teacher.md)")
    ap.add_argument("--synth-answer-tokens", type=int, default=48,
                    help="longest teacher sample in tokens; the extract usually wins anyway")
    ap.add_argument("--replay", type=float, default=2.0,
                    help="general replay rows per SFT row (build option)")
    ap.add_argument("--distractors", type=int, default=0,
                    help="other documents' passages shown with each grounded SFT row (RAFT-style; 0 = off)")
    ap.add_argument("--abstain", type=float, default=0.0,
                    help="'the documents do not say' rows per grounded SFT row (0 = off)")
    ap.add_argument("--style-cap", type=float, default=1.0,
                    help="largest share of style-labelled SFT rows against grounded ones (1.0 = no cap)")
    ap.add_argument("--title-negatives", action="store_true",
                    help="a DPO pair per grounded SFT row: its answer over the cited document's title (build option)")
    ap.add_argument("--no-anchor", dest="anchor", action="store_false",
                    help="replay with the hand-written answers, not the base model's own (training/anchor.py)")
    ap.add_argument("--promote-rejected", action="store_true",
                    help="force-promote a candidate the gate rejected, to measure what it would have done")
    ap.add_argument("--model", default=None, help="base model folder or hub id (default: the embedded one)")
    ap.add_argument("--model-cache", type=Path, default=Path(tempfile.gettempdir()) / "assistant-bench-models")
    ap.add_argument("--gpu", action="store_true", help="serve and train on CUDA")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of the server (default: the product's, all cores)")
    ap.add_argument("--train-threads", type=int, default=2,
                    help="torch threads of the training and gate processes (the product's default is 1, so that "
                         "training leaves a core to chat; here nobody chats while the job runs)")
    ap.add_argument("--home", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "docs", help="where loop.png goes")
    ap.add_argument("--json", type=Path, default=None)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = arguments().parse_args(argv)

    qa = load_questions(args.questions)
    qa["_documents"] = documents_text(args.docs)
    t_all = time.perf_counter()
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    home = args.home or Path(tempfile.mkdtemp(prefix="assistant-loop-")) / "home"
    model = args.model or str(prepare_model(args.model_cache))
    keys = setup_home(home, args.users)
    gate_questions, env = server_inputs(qa, home, args)
    port = free_port()
    proc = start_server(home, model, port, env)
    url = f"http://127.0.0.1:{port}"
    print(f"server ready at {url} ({time.perf_counter() - t_all:.0f} s of set-up); home {home}", file=sys.stderr)
    apis = {name: Api(url, key) for name, key in keys.items()}
    admin = apis["admin"]
    chunks = ingest_documents(admin, args.docs)
    print(f"documents ingested through the API: {chunks} chunks", file=sys.stderr)
    rows: list[CycleRow] = []
    try:
        serving = None
        base_general: dict | None = None  # the gate's "base" column (same suite, same settings every cycle)
        serving_general: dict | None = None  # the gate's numbers for the adapter serving now (None: base)
        row_general: list[dict | None] = []
        for cycle in range(args.cycles + 1):
            info: dict[str, Any] = {}
            if cycle > 0:
                t0 = time.perf_counter()
                job = run_job(admin, cycle_options(cycle, args, gate_questions))
                res = job.get("result") or {}
                timings = res.get("timings") or {}
                info = {"gate": f"{job['status']}: {res.get('status', job.get('error'))}",
                        "cycle_s": round(time.perf_counter() - t0, 1), "train_s": timings.get("train"),
                        "eval_s": timings.get("evaluate"), "synth_s": timings.get("synth"),
                        "synth": res.get("synth")}
                if res.get("candidate"):
                    gen = general_from_report(admin, res["candidate"])
                    print(f"  cycle {cycle}: {res.get('status')} {res.get('candidate')}: {res.get('reason')}; "
                          f"general {gen}", file=sys.stderr)
                    if base_general is None:
                        base_general = gen
                    info["gate"] = f"{res['candidate']} {res.get('status')}"
                    if res.get("status") == "rejected" and args.promote_rejected:
                        # An admin overrides the gate (recorded as a forced promotion) so the bench can show
                        # what the rejected candidate would have done to the users.
                        admin.post(f"/v1/admin/adapters/{res['candidate']}/promote",
                                   {"force": True, "reason": "bench/loop.py --promote-rejected"})
                        info["gate"] += ", force-promoted"
                        serving_general = gen
                    elif res.get("promoted"):
                        serving_general = gen
                serving = admin.get("/v1/admin/adapters")["serving"]
            row = measure(cycle, apis, qa, args, serving, home, model)
            for k, v in info.items():
                setattr(row, k, v)
            row_general.append(serving_general)
            rows.append(row)
            print(table(rows[-1:]).splitlines()[-1], file=sys.stderr)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)

    # General ability of what served in each cycle: the promoted candidate's numbers, else the base's.
    for r, gen in zip(rows, row_general, strict=True):
        if base_general is not None:
            r.general_qa_base, r.general_ppl_base = base_general["general_qa_base"], base_general["general_ppl_base"]
            r.general_qa = (gen or {}).get("general_qa", r.general_qa_base) if gen else r.general_qa_base
            r.general_ppl = gen["general_ppl"] if gen else r.general_ppl_base

    total = time.perf_counter() - t_all
    print("\n" + table(rows))
    first, last = rows[0], rows[-1]
    drops = [round(b.grounded_rag - a.grounded_rag, 1) for a, b in zip(rows, rows[1:], strict=False)]
    summary = {
        "like_rate_gain_points": round(last.like_rate_users - first.like_rate_users, 1),
        "liked_correct_gain_points": round(last.liked_correct_users - first.liked_correct_users, 1),
        "grounded_rag_gain_points": round(last.grounded_rag - first.grounded_rag, 1),
        "grounded_rag_worst_step_points": min(drops) if drops else None,
        "invented_rag_base": first.invented_rag, "invented_rag_last": last.invented_rag,
        "grounded_closed_gain_points": round(last.grounded_closed - first.grounded_closed, 1),
        "general_qa_vs_base_points": None if last.general_qa is None or last.general_qa_base is None
        else round(100 * (last.general_qa - last.general_qa_base), 1),
        "total_s": round(total, 1),
    }
    # The targets of issue 26, after the last cycle against the base model.
    print(f"\n{args.docs.name}: like rate {first.like_rate_users} -> {last.like_rate_users} (target +30); liked and "
          f"correct {first.liked_correct_users} -> {last.liked_correct_users} (target +20); grounded with retrieval "
          f"{first.grounded_rag} -> {last.grounded_rag} (target +15, no cycle more than 2 below the one before: "
          f"worst step {summary['grounded_rag_worst_step_points']}); invented on unanswerable questions "
          f"{first.invented_rag} -> {last.invented_rag} (target: no higher); closed-book {first.grounded_closed} -> "
          f"{last.grounded_closed}; general_qa vs base {summary['general_qa_vs_base_points']} points (target: not more "
          f"than 1 below); total {total / 60:.1f} min")
    load_after = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average before {load_before}, after {load_after}; {platform.node()} {os.cpu_count()} CPUs; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    plot(rows, args.out / "loop.png")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rows": [asdict(r) for r in rows],
                                         "args": {k: str(v) for k, v in vars(args).items()},
                                         "load_average_before": load_before, "load_average_after": load_after},
                                        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
