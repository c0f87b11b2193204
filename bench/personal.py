"""Personal adapters, measured: do users with conflicting tastes each get what they like from their own adapter?

    .venv/bin/python -m bench.personal [--model DIR] [--threads 1] [--asks 16] [--json FILE]

What happens, in one process through the product's own parts (`build_services`, `ChatService`, the job runner,
`assistant.actions.personal`):

1. A fresh home with personal adapters on. An admin adds the Lumen Desk documents (tests/data/docs) as shared
   documents. Four users opt in, each with a HIDDEN preference, and the four conflict:
   - short: answers under 15 words;
   - bullets: a bulleted list (at least two lines that start with "- ", "* " or "1.");
   - follow-up: the answer ends with a question to them;
   - brand: the answer opens with the product's name (the question file's `product`, "Lumen Desk").
2. The users ask the question file's `trained` questions (`ask`), served by the base model with retrieval
   (greedy; the served answer is logged for each user as their own turn). Each user rates every answer by their
   preference: a liked answer gets a thumbs up; a disliked one a thumbs down and an edit into the answer they
   wanted (the question's `ideal` answer, reshaped to their taste). With `--long-edits` the tastes also conflict
   on length: the "bullets" and "follow-up" users want what the documents say next about the fact as well (the
   sentence after the one that holds it: a second list item, a second sentence before the closing question).
3. An admin retrains the shared adapter on everyone's feedback (one job), and it is promoted even when the gate
   declines (the bench compares against it; the report gives the gate's verdict).
4. Each user's personal retrain runs as a job (`PersonalActions.train`: from the shared adapter's weights, on their
   own feedback plus shared replay, judged by the personal gate). Its time is reported.
5. Examiners ask the held-out paraphrases (`heldout`, never asked in training) greedily with retrieval, once under
   the base model, once under the shared adapter, and once per user under that user's personal candidate (served
   or not: the report says which the gate served).

Reported per user: like rate under base, shared and personal; grounded accuracy with retrieval (an answer holds one
alternative of every key-fact group and does not recite the prompt's markup); the gate's general-ability score
(general_qa: base, shared, personal) and the time of each personal retrain. A markdown table goes to stdout, every
number to `--json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from assistant.prompt import recites_prompt

ROOT = Path(__file__).resolve().parent.parent
QA_FILE = Path(__file__).with_name("loop_qa.json")
DOCS = ROOT / "tests" / "data" / "docs"
BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+\S", re.M)


# ------------------------------------------------------------------------------------------ the users' tastes
def words(text: str) -> int:
    return len(re.findall(r"\S+", text))


def sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]


def likes_short(answer: str, product: str) -> bool:
    return 0 < words(answer) < 15


def likes_bullets(answer: str, product: str) -> bool:
    return len(BULLET.findall(answer)) >= 2


def likes_follow_up(answer: str, product: str) -> bool:
    return answer.rstrip().endswith("?")


def likes_brand(answer: str, product: str) -> bool:
    return answer.lstrip(" *#\"'").lower().startswith(product.lower())


def edit_short(ideal: str, product: str, detail: str = "") -> str:
    first = sentences(ideal)[0] if sentences(ideal) else ideal
    w = first.split()
    return first if len(w) < 15 else " ".join(w[:13]).rstrip(",;:") + "."


def _adds(ideal: str, detail: str) -> bool:
    """Whether the documents' sentence says more than the ideal answer (it is not the same sentence)."""
    norm = lambda t: re.sub(r"\W+", " ", t).strip().lower()  # noqa: E731
    return bool(detail) and norm(detail) != norm(ideal)


def edit_bullets(ideal: str, product: str, detail: str = "") -> str:
    parts = sentences(ideal) + ([detail] if _adds(ideal, detail) else [])
    if len(parts) < 2:
        parts = [p.strip() for p in re.split(r",\s+|\s+and\s+", ideal.rstrip(".")) if p.strip()]
    if len(parts) < 2:
        parts = [ideal.rstrip("."), f"Source: the {product} documents"]
    return "\n".join(f"- {p.rstrip('.')}" for p in parts)


def edit_follow_up(ideal: str, product: str, detail: str = "") -> str:
    more = f" {detail.rstrip()}" if _adds(ideal, detail) else ""
    return ideal.rstrip() + more + " Would you like to know more about it?"


def edit_brand(ideal: str, product: str, detail: str = "") -> str:
    return ideal if likes_brand(ideal, product) else f"{product}: {ideal[0].lower() + ideal[1:]}"


def _doc_sentences() -> list[tuple[str, str]]:
    """Each sentence of the shared documents with the one after it in its paragraph ("" at a paragraph's end)."""
    out: list[tuple[str, str]] = []
    for doc in sorted(DOCS.glob("*.md")):
        for line in doc.read_text(encoding="utf-8").splitlines():
            line = line.strip().lstrip("#-*| ").strip()
            para = [s for s in sentences(line) if len(s.split()) >= 4]
            out += list(zip(para, para[1:] + [""], strict=True)) if para else []
    return out


def detail_of(keys: list[list[str]], doc_sentences: list[tuple[str, str]]) -> str:
    """What the documents say next about a fact: the sentence after the first one that holds it (an alternative of
    its first key group), in the same paragraph; "" when there is none."""
    for alt in keys[0] if keys else []:
        for sentence, after in doc_sentences:
            if alt.lower() in sentence.lower():
                return after
    return ""


TASTES: dict[str, tuple[Callable[[str, str], bool], Callable[[str, str, str], str]]] = {
    "short": (likes_short, edit_short),
    "bullets": (likes_bullets, edit_bullets),
    "follow_up": (likes_follow_up, edit_follow_up),
    "brand": (likes_brand, edit_brand),
}


def grounded(answer: str, keys: list[list[str]]) -> bool:
    if recites_prompt(answer):  # facts copied out of the prompt with its markup: as in the gate
        return False
    low = answer.lower()
    return all(any(alt.lower() in low for alt in group) for group in keys)


# ------------------------------------------------------------------------------------------ asking
def ask_all(services: Any, user: Any, questions: list[str], model: str = "assistant", max_tokens: int = 80,
            log: bool = True) -> list[Any]:
    """Greedy answers to `questions` as `user`, started together (they share the batch), drained in threads."""
    from assistant.chat import TurnRequest

    replies = [services.chat.reply(TurnRequest(user=user, text=q, model=model, temperature=0.0,
                                               max_tokens=max_tokens, source="bench")) for q in questions]
    threads = [threading.Thread(target=r.drain) for r in replies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if not log:  # examiners' answers are not kept as anyone's conversations
        for r in replies:
            if r.conversation is not None:
                services.store.delete_conversation(r.conversation.id, user.id)
    return replies


def like_rate(answers: list[str], taste: str, product: str) -> float:
    likes = TASTES[taste][0]
    return round(sum(likes(a, product) for a in answers) / max(len(answers), 1), 3)


def grounded_rate(answers: list[str], facts: list[dict[str, Any]]) -> float:
    return round(sum(grounded(a, f["keys"]) for a, f in zip(answers, facts, strict=True)) / max(len(facts), 1), 3)


def _metric(report: dict[str, Any] | None, which: str, metric: str) -> float | None:
    if not report:
        return None
    v = ((report.get("metrics") or {}).get(which) or {}).get(metric)
    return round(float(v), 3) if isinstance(v, int | float) else None


def general_qa(report: dict[str, Any] | None, which: str) -> float | None:
    return _metric(report, which, "general_qa")


# ------------------------------------------------------------------------------------------ the run
def run(model: str | None, threads: int, asks: int, home: Path,
        saved: Callable[[dict[str, Any]], None] = lambda _res: None, reuse: bool = False,
        only: list[str] | None = None, options: dict[str, Any] | None = None, timing: bool = False,
        long_edits: bool = False) -> dict[str, Any]:
    """The whole bench; `saved(results so far)` is called after each step, so a run cut short keeps its numbers.
    `reuse`: `home` holds an earlier run's users, feedback and shared adapter; only the examiners' answers and the
    personal retrains run again (to measure a personal recipe without the shared retrain's 40-60 minutes), for the
    users in `only`; `options`: personal retrain options over the defaults (`PersonalActions.train`); `timing`: then
    one more retrain, of a user with 40 answers, timed (`timing_retrain`)."""
    from assistant.actions.base import Operator
    from assistant.actions.personal import PersonalActions
    from assistant.config import Settings
    from assistant.services import build_services
    from bench.loop import write_gate_questions
    from training.jobs import runner_for
    from training.loop import GATE_QUESTIONS, keep_held_out_questions
    from training.registry import Registry
    from training.scheduler import start_loop

    qa = json.loads(QA_FILE.read_text(encoding="utf-8"))
    product = qa.get("product") or "Lumen Desk"
    facts = qa["trained"][:asks]
    overrides: dict[str, Any] = {"home": home, "torch_threads": threads, "train_threads": threads,
                                 "personal_adapters": True, "personal_min_feedback": min(8, asks),
                                 "personal_retrains_per_day": 10}
    if model:
        overrides["model"] = model
    settings = Settings.load(env={}, **overrides)
    services = build_services(settings)
    t_start = time.perf_counter()
    out: dict[str, Any] = {"machine": {"cpu": _cpu(), "threads": threads, "python": platform.python_version()},
                           "model": settings.model, "asks": len(facts), "options": options or {},
                           "long_edits": long_edits, "users": {}}
    try:
        store = services.store
        actions = PersonalActions(services)
        runner = runner_for(services)
        examiner_name = "examiner"
        held = [f["heldout"] for f in facts]
        # The gate's document questions: the question file's frozen `gate` questions (nobody asks them) decide, the
        # users' own questions are shown beside (bench/loop.py). The shared version keeps the held-out ones, and
        # each personal gate asks them too.
        gate_questions = write_gate_questions(qa, home / "gate_questions.jsonl")
        if reuse:
            # A home where steps 1-3 ran: the same users, the same feedback, the shared adapter serving.
            users = {taste: store.get_user_by_name(f"user-{taste}") for taste in TASTES}
            if None in users.values() or Registry(settings, store).serving() is None:
                raise SystemExit(f"--reuse: {home} holds no finished shared retrain of this bench")
            out["reused"] = str(home)
            # What a server does at start-up: a job the earlier run left "running" is marked failed, and the
            # recorded serving versions (shared and personal) are loaded and served again.
            start_loop(services, start_thread=False)
            kept = Registry(settings, store).get(Registry(settings, store).serving()).eval_dir / GATE_QUESTIONS
            if not kept.is_file():  # a shared version of a run from before its gate questions were kept
                keep_held_out_questions(gate_questions, kept)
            examiner_name = f"examiner-{int(time.time())}"
        else:
            admin = store.create_user("admin", "bench-admin-pw", role="admin")
            for doc in sorted(DOCS.glob("*.md")):
                services.knowledge.ingest(admin, doc.name, doc.read_bytes(), scope="shared")
            users = {taste: store.create_user(f"user-{taste}", f"bench-{taste}-pw") for taste in TASTES}
            for u in users.values():
                actions.set_opt_in(u, True)

            # 2. chat under the base model (one greedy answer per question, logged for each user), rate, edit
            t0 = time.perf_counter()
            asker = store.create_user("asker", "bench-asker-pw")
            served = ask_all(services, asker, [f["ask"] for f in facts], log=False)
            doc_sentences = _doc_sentences() if long_edits else []
            for taste, u in users.items():
                likes, edit = TASTES[taste]
                for f, r in zip(facts, served, strict=True):
                    conv = store.create_conversation(u.id, f["id"], source="bench")
                    _, a = store.add_turn(conv.id, f["ask"], r.text, adapter=r.adapter, sources=r.sources)
                    if likes(r.text, product):
                        store.add_thumb(u.id, a.id, 1)
                    else:
                        store.add_thumb(u.id, a.id, -1)
                        store.add_edit(u.id, a.id, edit(f["ideal"], product, detail_of(f["keys"], doc_sentences)))
            out["chat_s"] = round(time.perf_counter() - t0, 1)
            out["training_like_rate_base"] = {t: like_rate([r.text for r in served], t, product) for t in TASTES}

        # 5a. the examiners' held-out answers under the base model (by its name: a shared adapter may serve already)
        examiner = store.create_user(examiner_name, "bench-examiner-pw")
        base_answers = [r.text for r in ask_all(services, examiner, held, model=services.backend.model_name,
                                                log=False)]

        # 3. the shared retrain, promoted for the comparison whatever the gate said
        shared_reg = Registry(settings, store)
        t0 = time.perf_counter()
        if reuse:
            shared_name = shared_reg.serving()
            out["shared"] = {"version": shared_name, "reused": True}
        else:
            job = runner.start({"auto_promote": True, "build": {"split_ratios": [0.7, 0.1, 0.2]},
                                "eval_doc_qa": str(gate_questions)}, requested_by="bench", trigger="bench")
            job = runner.wait(job.id)
            if job.status != "succeeded":
                raise RuntimeError(f"shared retrain {job.status}: {job.error}")
            shared_name = job.result["candidate"]
            if shared_reg.serving() != shared_name:
                shared_reg.promote(shared_name, services, actor="bench", force=True,
                                   reason="bench: compared whatever the gate said")
            out["shared"] = {"version": shared_name, "seconds": round(time.perf_counter() - t0, 1),
                             "gate_passed": job.result["passed"], "reason": job.result["reason"],
                             "timings": job.result["timings"]}
        shared_report = shared_reg.get(shared_name).report()
        out["shared"].update(general_qa_base=general_qa(shared_report, "base"),
                             general_qa=general_qa(shared_report, "candidate"))
        shared_replies = ask_all(services, examiner, held, log=False)
        wrong = {r.adapter for r in shared_replies} - {shared_name}
        if wrong:  # the comparison is with the shared adapter, or it means nothing
            raise RuntimeError(f"the examiner was served {wrong}, not the shared adapter {shared_name}")
        shared_answers = [r.text for r in shared_replies]
        out["grounded_base"] = grounded_rate(base_answers, facts)
        out["grounded_shared"] = grounded_rate(shared_answers, facts)
        saved(out)

        # 4. one personal retrain per user, then 5b. their held-out answers under their personal candidate
        operator = Operator("bench")
        for taste, u in users.items():
            if only is not None and taste not in only:
                continue
            t0 = time.perf_counter()
            pj = actions.train(operator, u.id, options or {})
            pj = runner.wait(pj["id"])
            seconds = round(time.perf_counter() - t0, 1)
            row: dict[str, Any] = {"job": pj.id, "status": pj.status, "seconds": seconds, "error": pj.error}
            if pj.status == "succeeded":
                name = pj.result["candidate"]
                reg = Registry(settings, store, owner_id=u.id)
                v = reg.get(name)
                if not services.backend.has_adapter(name):  # a refused candidate is measured too
                    services.backend.load_adapter(name, v.adapter_dir)
                answers = [r.text for r in ask_all(services, u, held, model=name, log=False)]
                rep = v.report()
                trained = json.loads((v.adapter_dir / "training_result.json").read_text(encoding="utf-8"))
                row.update(train_rows=sum(st.get("train_rows") or 0 for st in trained.get("stages", [])),
                           feedback_rows=_feedback_rows(v.adapter_dir),
                           edit_match=_metric(rep, "candidate", "edit_match"),
                           edit_match_shared=_metric(rep, "baseline", "edit_match"),
                           gate_grounded=_metric(rep, "candidate", "grounded"),
                           gate_grounded_shared=_metric(rep, "baseline", "grounded"),
                           gate_check_seconds={k: (rep or {}).get("metrics", {}).get(k, {}).get("check_seconds")
                                               for k in ("baseline", "candidate")})
                row.update(version=name, served=reg.serving() == name, gate_passed=pj.result["passed"],
                           reason=pj.result["reason"], timings=pj.result["timings"],
                           general_qa=general_qa(rep, "candidate"), general_qa_base=general_qa(rep, "base"),
                           like_personal=like_rate(answers, taste, product),
                           grounded_personal=grounded_rate(answers, facts), samples=answers[:3])
            row.update(like_base=like_rate(base_answers, taste, product),
                       like_shared=like_rate(shared_answers, taste, product))
            out["users"][taste] = row
            saved(out)
        out["grounded_base"] = grounded_rate(base_answers, facts)
        out["grounded_shared"] = grounded_rate(shared_answers, facts)
        out["samples"] = {"base": base_answers[:3], "shared": shared_answers[:3]}
        if timing:
            out["timing"] = timing_retrain(services, actions, runner, operator, qa, product, options or {},
                                           long_edits)
            saved(out)
    finally:
        out["total_s"] = round(time.perf_counter() - t_start, 1)
        services.close()
    return out


def timing_retrain(services: Any, actions: Any, runner: Any, operator: Any, qa: dict[str, Any], product: str,
                   options: dict[str, Any], long_edits: bool = False) -> dict[str, Any]:
    """One personal retrain on about 40 of a user's answers, timed: a "bullets" user asks 40 questions (the file's
    trained questions, their held-out paraphrases and the unseen facts' questions), likes the lists and edits every
    other answer into one. This user is timed only: they asked the examiners' questions, so no like rate is
    measured on them."""
    store = services.store
    user = store.get_user_by_name("user-timing") or store.create_user("user-timing", "bench-timing-pw")
    actions.set_opt_in(user, True)
    doc_sentences = _doc_sentences() if long_edits else []
    facts = [(f["ask"], f.get("ideal"), detail_of(f["keys"], doc_sentences)) for f in qa["trained"]] + [
        (f["heldout"], f.get("ideal"), detail_of(f["keys"], doc_sentences))
        for f in qa["trained"] + qa.get("unseen", [])]
    if not store.list_conversations(user.id):
        likes, edit = TASTES["bullets"]
        served = ask_all(services, user, [q for q, _, _ in facts], log=False)
        for (question, ideal, detail), r in zip(facts, served, strict=True):
            conv = store.create_conversation(user.id, question[:60], source="bench")
            _, a = store.add_turn(conv.id, question, r.text, adapter=r.adapter, sources=r.sources)
            store.add_thumb(user.id, a.id, 1 if likes(r.text, product) else -1)
            if not likes(r.text, product):
                store.add_edit(user.id, a.id, edit(ideal or r.text, product, detail))
    t0 = time.perf_counter()
    job = runner.wait(actions.train(operator, user.id, options)["id"])
    row: dict[str, Any] = {"answers": len(facts), "status": job.status, "seconds": round(time.perf_counter() - t0, 1),
                           "error": job.error}
    if job.status == "succeeded":
        from training.registry import Registry

        v = Registry(services.settings, store, owner_id=user.id).get(job.result["candidate"])
        trained = json.loads((v.adapter_dir / "training_result.json").read_text(encoding="utf-8"))
        rep = v.report() or {}
        row.update(timings=job.result["timings"], passed=job.result["passed"], reason=job.result["reason"],
                   train_rows=sum(st.get("train_rows") or 0 for st in trained.get("stages", [])),
                   feedback_rows=_feedback_rows(v.adapter_dir), held_out=rep.get("eval_set", {}).get("sizes"),
                   check_seconds={k: m.get("check_seconds") for k, m in rep.get("metrics", {}).items()})
    return row


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _feedback_rows(adapter_dir: Path) -> int | None:
    """The user's own rows the candidate trained on (its dataset's SFT training split, replay rows not counted)."""
    try:
        manifest = json.loads((adapter_dir / "dataset_manifest.json").read_text(encoding="utf-8"))
        return sum(n for src, n in manifest["by_source"]["sft"]["train"].items() if not src.startswith("replay"))
    except (OSError, KeyError, ValueError, AttributeError):
        return None


def table(res: dict[str, Any]) -> str:
    lines = ["| user (taste) | like: base | shared | personal | gain vs base | vs shared | grounded: personal "
             "| general_qa: personal | gate edit_match: shared / personal | gate grounded: shared / personal "
             "| train rows (user's) | retrain s | served |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for taste, r in res["users"].items():
        p = r.get("like_personal")
        gain = f"{100 * (p - r['like_base']):+.1f}" if p is not None else "-"
        vs = f"{100 * (p - r['like_shared']):+.1f}" if p is not None else "-"
        lines.append(f"| {taste} | {100 * r['like_base']:.1f} | {100 * r['like_shared']:.1f} | "
                     f"{'-' if p is None else f'{100 * p:.1f}'} | {gain} | {vs} | "
                     f"{r.get('grounded_personal', '-')} | {r.get('general_qa', '-')} "
                     f"(base {r.get('general_qa_base', '-')}) | "
                     f"{r.get('edit_match_shared', '-')} / {r.get('edit_match', '-')} | "
                     f"{r.get('gate_grounded_shared', '-')} / {r.get('gate_grounded', '-')} | "
                     f"{r.get('train_rows', '-')} ({r.get('feedback_rows', '-')}) | "
                     f"{r['seconds']} | {r.get('served', '-')} |")
    sh = res.get("shared", {})
    if res.get("timing"):
        t = res["timing"]
        lines += ["", f"timed retrain: {t.get('answers')} answers of one user, {t.get('train_rows')} training rows "
                      f"({t.get('feedback_rows')} theirs), held out {t.get('held_out')}: {t.get('seconds')} s "
                      f"({t.get('timings')}; {t.get('status')}, {t.get('reason')})"]
    lines.append("")
    lines.append(f"grounded with retrieval: base {res.get('grounded_base')}, shared {res.get('grounded_shared')}; "
                 f"general_qa: base {sh.get('general_qa_base')}, shared {sh.get('general_qa')}; "
                 f"shared retrain {sh.get('seconds')} s (gate passed: {sh.get('gate_passed')}); "
                 f"total {res.get('total_s')} s")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for serving and training")
    ap.add_argument("--asks", type=int, default=16, help="questions each user asks (at most the file's 16)")
    ap.add_argument("--home", type=Path, default=None, help="state folder (default: a fresh temporary one)")
    ap.add_argument("--json", type=Path, default=None, help="write every number here")
    ap.add_argument("--reuse", action="store_true",
                    help="--home holds an earlier run: keep its users, feedback and shared adapter, and run the "
                         "examiners and the personal retrains again")
    ap.add_argument("--users", default=",".join(TASTES),
                    help=f"whose personal retrains run with --reuse (comma-separated, of {', '.join(TASTES)})")
    ap.add_argument("--options", type=json.loads, default={},
                    help='personal retrain options over the defaults, as JSON (a recipe to measure, for example '
                         '\'{"train": {"lora_layers": 16}}\')')
    ap.add_argument("--timing", action="store_true",
                    help="then time one personal retrain on 40 answers of one more user (the issue's ~40 rows)")
    ap.add_argument("--long-edits", action="store_true",
                    help="the bullets and follow-up users' edits also carry the documents' next sentence about the "
                         "fact (tastes that conflict on length; measured once, docs/personal.md)")
    ns = ap.parse_args()
    users = [u.strip() for u in ns.users.split(",") if u.strip()]
    if not users or set(users) - set(TASTES) or (not ns.reuse and users != list(TASTES)):
        ap.error(f"--users: some of {', '.join(TASTES)}, and only with --reuse")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if ns.reuse and ns.home is None:
        ap.error("--reuse needs --home (the earlier run's state folder)")
    home = ns.home or Path(tempfile.mkdtemp(prefix="bench-personal-"))
    def save(res: dict[str, Any]) -> None:
        if ns.json:
            ns.json.write_text(json.dumps(res, indent=2, default=str) + "\n", encoding="utf-8")

    res = run(ns.model, ns.threads, ns.asks, home, save, reuse=ns.reuse, only=users, options=ns.options,
              timing=ns.timing, long_edits=ns.long_edits)
    save(res)
    print(table(res))


if __name__ == "__main__":
    main()
