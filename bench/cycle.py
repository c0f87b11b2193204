"""The whole self-improvement cycle on this CPU with the embedded model (SmolLM2-135M), timed.

    .venv/bin/python -m bench.cycle [--model DIR] [--home DIR] [--conversations 120] [--no-synth] [--docs-out docs]

What it does, through the product's own code paths:
1. a fresh home; the services of a server (`build_services`: store, model backend, knowledge base);
2. a feedback log in the store: `--conversations` chats in which a user edited a rambling, wrong answer
   into a short right one (each edit is an SFT target and a DPO pair), plus thumbs-up on good answers
   and a few regenerate-and-choose picks; and the documents of tests/data/docs ingested (shared) by an
   admin. The logged answers are scripted, not generated, so the bench measures the loop, not chat
   latency (bench/chat_latency.py does that);
3. one retrain job (`training.jobs.JobRunner`, as the admin console or the scheduler starts it):
   teacher pairs from the documents (the serving model with the passage in context, judged) ->
   dataset snapshot -> TRL SFT + DPO in a child process (1 torch thread) -> the evaluation gate in a
   child process -> registered -> promoted and hot-swapped if the gate passed;
4. the evaluation report copied to `--docs-out` (eval_report.md / eval_report.png), and a markdown
   table of the timings printed for docs/benchmarks.md.

`--model DIR` reuses an already converted model folder (the one-time GGUF conversion takes ~40 s and
is reported separately when it runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"),
            ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Kenya", "Nairobi"),
            ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Poland", "Warsaw"), ("Greece", "Athens"),
            ("Turkey", "Ankara"), ("India", "New Delhi"), ("China", "Beijing"), ("Canada", "Ottawa"),
            ("Mexico", "Mexico City"), ("Brazil", "Brasilia"), ("Cuba", "Havana"), ("Ireland", "Dublin"),
            ("Austria", "Vienna"), ("Hungary", "Budapest"), ("Portugal", "Lisbon"), ("Finland", "Helsinki"),
            ("Denmark", "Copenhagen"), ("Belgium", "Brussels"), ("Russia", "Moscow"), ("Thailand", "Bangkok"),
            ("Vietnam", "Hanoi"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Nepal", "Kathmandu"),
            ("Argentina", "Buenos Aires"), ("Colombia", "Bogota"), ("Australia", "Canberra"),
            ("Morocco", "Rabat"), ("Ghana", "Accra"), ("Ukraine", "Kyiv"), ("Romania", "Bucharest")]
HEDGES = ["Let me think about this carefully. It is a tricky question, but I believe {wrong}. You may want to "
          "double-check that with another source.",
          "Great question! There are many things to consider here, and I am not completely sure, but I think "
          "{wrong}.",
          "I don't have exact information about that, but my best guess would be that {wrong}."]


# Curated document questions over tests/data/docs with the facts a grounded answer must contain:
# the grounded check of the gate (held-out teacher rows add to them when a document lands in the test split).
DOC_QA = [
    ("pricing", "How much does the Team plan cost?", ["8 dollars"]),
    ("pricing", "How long after the first payment can customers ask for a refund?", ["14 days"]),
    ("pricing", "What discount do customers get for paying once a year?", ["20 percent"]),
    ("company", "In which city is Brightleaf Labs based?", ["Busan"]),
    ("company", "How many employees does Brightleaf Labs have?", ["48"]),
    ("company", "What is the company mascot of Brightleaf Labs?", ["crane"]),
    ("lumen_desk_overview", "What is the current version of Lumen Desk?", ["3.2"]),
    ("lumen_desk_overview", "How quickly does Lumen Desk index a new page?", ["ten seconds"]),
    ("release_notes", "When is Lumen Desk 3.3 planned?", ["autumn"]),
    ("release_notes", "When was Lumen Desk 3.0 released?", ["September 2024"]),
    ("security", "How is workspace data encrypted at rest?", ["AES-256"]),
    ("security", "In which two cities are the data centers?", ["Seoul", "Frankfurt"]),
    ("support_faq", "How long do deleted pages stay in the trash?", ["30 days"]),
    ("support_faq", "Which keyboard shortcut opens quick search?", ["Ctrl+K"]),
]


def doc_qa_file(folder: Path, out: Path) -> Path:
    rows = []
    for doc, question, facts in DOC_QA:
        text = (folder / f"{doc}.md").read_text(encoding="utf-8")
        passage = "\n".join(line for line in text.splitlines() if not line.startswith("#")).strip()
        rows.append({"question": question, "passage": passage, "key_facts": facts, "source": doc})
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return out


def feedback_log(n: int, seed: int = 0) -> list[dict]:
    """`n` scripted conversations: question, the logged (bad or good) answer, and what the user did."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            country, city = CAPITALS[(i // 3) % len(CAPITALS)]
            other = CAPITALS[(i // 3 + 7) % len(CAPITALS)][1]
            q, good, wrong = (f"What is the capital of {country}?", f"The capital of {country} is {city}.",
                              f"the capital of {country} is {other}")
        elif kind == 1:
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            q, good, wrong = (f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.",
                              f"{a} plus {b} is {a + b + rng.choice([-10, -1, 1, 10])}")
        else:
            h = rng.randint(2, 12)
            q, good, wrong = (f"How many minutes are in {h} hours?", f"{h} hours is {60 * h} minutes.",
                              f"{h} hours is about {60 * h + rng.choice([-30, 30, 100])} minutes")
        bad = rng.choice(HEDGES).format(wrong=wrong)
        action = "edit" if i % 5 else ("thumb_up" if i % 10 else "pair")
        items.append({"question": q, "good": good, "bad": bad, "action": action})
    return items


def seed_store(store, items: list[dict]) -> dict[str, int]:
    user = store.create_user("bench-user", "bench-user-password")
    counts = {"edit": 0, "thumb_up": 0, "thumb_down": 0, "pair": 0}
    for it in items:
        conv = store.create_conversation(user.id, it["question"][:60])
        if it["action"] == "thumb_up":
            _, a = store.add_turn(conv.id, it["question"], it["good"], adapter=None)
            store.add_thumb(user.id, a.id, 1)
            counts["thumb_up"] += 1
            continue
        q, a = store.add_turn(conv.id, it["question"], it["bad"], adapter=None)
        if it["action"] == "edit":
            store.add_thumb(user.id, a.id, -1, reason="wrong")
            store.add_edit(user.id, a.id, it["good"])
            counts["edit"] += 1
            counts["thumb_down"] += 1
        else:  # regenerate-and-choose: the second answer was the good one
            alt = store.add_message(conv.id, "assistant", it["good"], parent_id=q.id, status="alternative")
            store.add_pair(user.id, a.id, alt.id, alt.id)
            counts["pair"] += 1
    return counts


def machine() -> str:
    cpu = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="converted model folder (default: the embedded model)")
    ap.add_argument("--home", type=Path, default=None, help="state folder (default: a fresh temp dir)")
    ap.add_argument("--conversations", type=int, default=120, help="logged conversations with feedback")
    ap.add_argument("--no-synth", action="store_true", help="skip the teacher's document pairs")
    ap.add_argument("--synth-chunks", type=int, default=2, help="document chunks the teacher works on")
    ap.add_argument("--split", default="0.7,0.1,0.2", help="train,validation,test shares of the dataset build")
    ap.add_argument("--train", default="{}", help="TrainConfig overrides, JSON")
    ap.add_argument("--gate", default="{}", help="GateConfig overrides, JSON")
    ap.add_argument("--docs-out", type=Path, default=ROOT / "docs", help="where eval_report.md/png go")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    ns = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from assistant.config import Settings
    from assistant.server import build_services
    from training.jobs import runner_for

    t_all = time.perf_counter()
    home = ns.home or Path(tempfile.mkdtemp(prefix="cycle-bench-"))
    overrides = {"model": ns.model} if ns.model else {}
    settings = Settings.load(env={}, home=home, torch_threads=1, **overrides)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    services = build_services(settings)  # converts the embedded model once when needed
    timings["server start (model, store, knowledge base)"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    items = feedback_log(ns.conversations)
    counts = seed_store(services.store, items)
    admin = services.store.create_user("bench-admin", "bench-admin-password", role="admin")
    kb = services.knowledge
    docs = sorted((ROOT / "tests" / "data" / "docs").glob("*.md"))
    if kb is not None:
        for p in docs:
            kb.ingest_path(admin, p, scope="shared")
    timings["log feedback + ingest documents"] = time.perf_counter() - t0

    options = {"synth": not ns.no_synth and kb is not None, "synth_max_chunks": ns.synth_chunks,
               "build": {"split_ratios": [float(x) for x in ns.split.split(",")]},
               "eval_doc_qa": str(doc_qa_file(ROOT / "tests" / "data" / "docs", home / "doc_qa.jsonl")),
               "train": json.loads(ns.train), "gate": json.loads(ns.gate), "auto_promote": True}
    runner = runner_for(services)
    t0 = time.perf_counter()
    job = runner.start(options, requested_by="bench-admin", trigger="bench")
    last = ""
    while True:
        job = runner.wait(job.id, timeout=5)
        p = job.progress
        line = f"{p.get('phase')} {100 * (p.get('fraction') or 0):.0f}% step {p.get('step')}/{p.get('max_steps')}"
        if line != last:
            print(f"[{time.perf_counter() - t0:6.0f} s] {line} loss {p.get('loss')}", file=sys.stderr, flush=True)
            last = line
        if not job.active:
            break
    cycle_s = time.perf_counter() - t0
    if job.status != "succeeded":
        print(f"cycle {job.status}: {job.error}", file=sys.stderr)
        print(runner.log_tail(job.id, 60), file=sys.stderr)
        return 1
    r = job.result
    reg = services.registry
    version = reg.get(r["candidate"])
    report = version.report()
    ns.docs_out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(version.eval_dir / "report.md", ns.docs_out / "eval_report.md")
    shutil.copyfile(version.eval_dir / "report.png", ns.docs_out / "eval_report.png")
    # the copied markdown points at its plot
    md = (ns.docs_out / "eval_report.md").read_text(encoding="utf-8")
    # Machine-specific paths say nothing to a reader of docs/.
    md = md.replace(str(settings.datasets_dir), "<home>/datasets").replace(
        str(Path(ns.model).parent) if ns.model else str(settings.models_dir), "<models>")
    title, _, rest = md.partition("\n")
    (ns.docs_out / "eval_report.md").write_text(f"{title}\n\n![evaluation](eval_report.png)\n{rest}", encoding="utf-8")

    snapshot = settings.datasets_dir / r["dataset"] / "manifest.json"
    manifest = json.loads(snapshot.read_text(encoding="utf-8"))
    sizes = dict(manifest["counts"])
    train_rows = sum(v["train"] for v in sizes.values())
    out = {
        "machine": machine(), "home": str(home), "feedback": counts, "conversations": ns.conversations,
        "documents": len(docs), "dataset": r["dataset"], "dataset_counts": sizes, "train_rows": train_rows,
        "heldout": manifest["heldout"]["counts"], "synth": r.get("synth"), "train": r["train"],
        "phases_s": r["timings"], "cycle_s": round(cycle_s, 1), "status": r["status"], "candidate": r["candidate"],
        "passed": r["passed"], "reason": r["reason"], "serving_after": services.chat.serving_adapter,
        "metrics": {k: {m: v.get(m) for m in ("val_loss", "pref_accuracy", "grounded", "general_ppl", "general_qa")}
                    for k, v in report["metrics"].items()},
        "setup_s": {k: round(v, 1) for k, v in timings.items()}, "total_s": round(time.perf_counter() - t_all, 1),
    }
    if ns.json:
        ns.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(out, indent=2))
    print(markdown(out))
    services.close()
    return 0


def markdown(o: dict) -> str:
    ph = o["phases_s"]
    stages = {s["stage"]: s for s in o["train"]["stages"]}
    rows = [("teacher pairs from documents", ph.get("synth"),
             f"{o['synth']['pairs']} pairs, {o['synth']['accepted']} accepted from {o['synth']['chunks']} chunks"
             if o.get("synth") else "skipped"),
            ("dataset snapshot", ph.get("dataset"), f"{o['dataset']}: {o['train_rows']} train rows "
             + ", ".join(f"{k} {v['train']}/{v['validation']}/{v['test']}" for k, v in o["dataset_counts"].items()
                         if any(v.values()))),
            ("training (child process, 1 thread)", ph.get("train"),
             "; ".join(f"{k} {s['steps']} steps, loss {s['first_loss']:.3f} -> {s['last_loss']:.3f}"
                       for k, s in stages.items() if s.get("steps"))),
            ("evaluation gate (child process)", ph.get("evaluate"), f"{o['status']}: {o['reason']}"),
            ("register + promote (hot-swap)", ph.get("promote"), f"now serving {o['serving_after']}")]
    lines = ["| step | seconds | what |", "|---|---|---|"]
    lines += [f"| {a} | {b:.1f} | {c} |" if b is not None else f"| {a} | – | {c} |" for a, b, c in rows]
    lines.append(f"| **whole cycle** | **{o['cycle_s']:.1f}** | {o['machine']} |")
    m = o["metrics"]
    lines += ["", "| metric | " + " | ".join(m) + " |", "|---|" + "---|" * len(m)]
    for key in ("val_loss", "pref_accuracy", "grounded", "general_ppl", "general_qa"):
        lines.append(f"| {key} | " + " | ".join("–" if v.get(key) is None else f"{v[key]:.3f}" for v in m.values())
                     + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
