"""Dataset build time for 100k logged turns, and self-teacher pairs per minute, on this machine.

1. Build: a fresh SQLite store in a temp home is filled (bulk inserts, not timed) with `--turns`
   chat turns in conversations of `--turns-per-conversation`, with feedback like a busy deployment's:
   30% of answers thumbed (2/3 up), 5% edited, 3% regenerated-and-chosen; 1% of messages carry an
   e-mail address or phone number. Then `build_datasets` runs once, timed per stage.
2. Teacher: the self-teacher on the embedded SmolLM2-135M (the serving runtime backend, 1 thread)
   over the documents in tests/data/docs; pairs per minute and accepted pairs per minute.

    .venv/bin/python -m bench.training_data                       # both (teacher part takes a few minutes)
    .venv/bin/python -m bench.training_data --skip-teacher --turns 100000
    .venv/bin/python -m bench.training_data --skip-build --questions 3 --candidates 4 --dump /tmp/pairs.json

Prints a JSON summary and a markdown table to paste into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("account adapter answer backup battery billing browser budget cable calendar camera chart client "
         "cloud config cursor dashboard database deadline desk device driver editor email export filter "
         "folder font garden guest history holiday invoice keyboard laptop layout library license login "
         "meeting memory menu monitor network notebook offline page password payment plan printer project "
         "recipe refund report router schedule screen search server settings share shortcut signal storage "
         "sync tablet team template theme ticket timer upload user version volume wallet window workspace").split()
VERBS = "open reset export share restore rename delete move copy update install remove check fix sync print".split()


def _sentence(rng: random.Random, n: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n)]
    return f"How do I {rng.choice(VERBS)} the {words[0]} " + " ".join(words[1:]) + f" ({rng.randint(1, 999)})?"


def _answer(rng: random.Random, n: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n)]
    return (f"To {rng.choice(VERBS)} the {words[0]}, open {words[1]} settings, choose {words[2]} and then "
            + " ".join(words[3:]) + f". It takes about {rng.randint(2, 90)} seconds.")


def seed_store(store, turns: int, per_conversation: int, seed: int = 0) -> dict[str, int]:
    """Bulk-insert users, conversations, messages and feedback straight into the store's tables."""

    from memory.db import utcnow
    from memory.schema import conversations, feedback, messages, users

    rng = random.Random(seed)
    now = utcnow()
    n_conv = (turns + per_conversation - 1) // per_conversation
    msg_rows, fb_rows, conv_rows = [], [], []
    mid = fid = 0
    base = {"adapter": None, "generation": {}, "sources": [], "memories": [], "steps": [], "created_at": now}
    for c in range(1, n_conv + 1):
        conv_rows.append({"id": c, "user_id": 1 + c % 50, "title": f"conversation {c}", "source": "ui",
                          "created_at": now, "updated_at": now})
        for _ in range(min(per_conversation, turns - (c - 1) * per_conversation)):
            q = _sentence(rng, rng.randint(4, 12))
            if rng.random() < 0.01:
                q += rng.choice([f" Mail me at user{mid}@example.com.", f" Call 010-{rng.randint(1000, 9999)}-5678."])
            mid += 1
            msg_rows.append({**base, "id": mid, "conversation_id": c, "role": "user", "content": q,
                             "status": "complete", "parent_id": None})
            user_id = mid
            mid += 1
            msg_rows.append({**base, "id": mid, "conversation_id": c, "role": "assistant",
                             "content": _answer(rng, rng.randint(8, 30)), "adapter": "v1", "status": "complete",
                             "parent_id": user_id})
            r = rng.random()
            owner = 1 + c % 50
            if r < 0.30:
                fid += 1
                fb_rows.append({"id": fid, "user_id": owner, "message_id": mid, "kind": "thumb",
                                "rating": 1 if rng.random() < 2 / 3 else -1, "created_at": now})
            elif r < 0.35:
                fid += 1
                fb_rows.append({"id": fid, "user_id": owner, "message_id": mid, "kind": "edit",
                                "corrected": _answer(rng, rng.randint(8, 30)), "created_at": now})
            elif r < 0.38:
                mid += 1
                msg_rows.append({**base, "id": mid, "conversation_id": c, "role": "assistant",
                                 "content": _answer(rng, rng.randint(8, 30)), "status": "alternative",
                                 "parent_id": user_id})
                fid += 1
                fb_rows.append({"id": fid, "user_id": owner, "message_id": mid - 1, "kind": "pair",
                                "other_message_id": mid, "chosen_message_id": mid - 1, "created_at": now})
    fb_defaults = {"rating": None, "reason": None, "comment": None, "corrected": None, "other_message_id": None,
                   "chosen_message_id": None}
    with store.engine.begin() as conn:
        conn.execute(users.insert(), [{"id": i, "username": f"user{i}", "password_hash": "x", "role": "user",
                                       "created_at": now} for i in range(1, 51)])
        conn.execute(conversations.insert(), conv_rows)
        for i in range(0, len(msg_rows), 20000):
            conn.execute(messages.insert(), msg_rows[i:i + 20000])
        conn.execute(feedback.insert(), [{**fb_defaults, **r} for r in fb_rows])
    return {"turns": turns, "conversations": n_conv, "messages": len(msg_rows), "feedback": len(fb_rows)}


def bench_build(turns: int, per_conversation: int) -> dict:
    from assistant.config import Settings
    from memory.store import Store
    from training.dataset_build import BuildOptions, build_datasets

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings.load(env={}, home=Path(tmp) / "home")
        settings.ensure_dirs()
        store = Store.open(settings.db_url)
        t = time.perf_counter()
        seeded = seed_store(store, turns, per_conversation)
        seed_s = time.perf_counter() - t
        stages: list[tuple[str, float]] = []
        load_before = os.getloadavg()[0]
        start, cpu_start = time.perf_counter(), time.process_time()
        result = build_datasets(store, settings, BuildOptions(),
                                progress=lambda stage, _f: stages.append((stage, time.perf_counter() - start)))
        total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        store.close()
        m = result.manifest
        spans = {a[0]: round(b[1] - a[1], 2) for a, b in zip(stages, stages[1:], strict=False)}
        # On a shared 2-core box the wall time depends on the neighbours; CPU time much less so.
        return {"seeded": seeded, "seed_s": round(seed_s, 1), "build_s": round(total, 2), "build_cpu_s": round(cpu, 2),
                "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)], "stages_s": spans,
                "counts": m["counts"], "filters": {k: {f["name"]: f.get("removed") or f.get("rows_changed")
                                                       for f in m["filters"][k]} for k in m["filters"]}}


def bench_teacher(questions: int, candidates: int, limit: int | None, dump: Path | None = None) -> dict:
    import torch

    from assistant.config import Settings
    from assistant.models import prepare_model
    from assistant.runtime import make_backend
    from training.synth import chunks_from_folder
    from training.teacher import TeacherOptions, self_teacher, summarize

    torch.set_num_threads(1)
    home = Path(os.environ.get("ASSISTANT_BENCH_HOME", Path(tempfile.gettempdir()) / "assistant-bench-home"))
    model_dir = prepare_model(Settings.load(env={}, home=home))
    backend = make_backend(Settings.load(env={}, home=home, model=str(model_dir), torch_threads=1), progress=False)
    chunks = chunks_from_folder(ROOT / "tests" / "data" / "docs")[:limit]
    teacher = self_teacher(backend, options=TeacherOptions(candidates=candidates))
    pairs = []
    load_before = os.getloadavg()[0]
    start, cpu_start = time.perf_counter(), time.process_time()
    for chunk in chunks:
        pairs += teacher.pairs_for_chunk(chunk, questions)
    minutes = (time.perf_counter() - start) / 60
    cpu_minutes = (time.process_time() - cpu_start) / 60
    if dump is not None:  # every pair with its candidates and verdicts, for docs/teacher.md
        dump.write_text(json.dumps([{"doc_id": p.doc_id, "chunk_id": p.chunk_id, "question": p.question,
                                     "question_source": p.question_source, "answer": p.answer, "accepted": p.accepted,
                                     "rejected": p.rejected, **p.judge_record()} for p in pairs], indent=1,
                                   ensure_ascii=False), encoding="utf-8")
    s = summarize(pairs)
    return {"chunks": len(chunks), "questions_per_chunk": questions, "candidates_per_question": candidates,
            "minutes": round(minutes, 2), "cpu_minutes": round(cpu_minutes, 2),
            "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "pairs_per_min": round(s["pairs"] / minutes, 2), "pairs_per_cpu_min": round(s["pairs"] / cpu_minutes, 2),
            "accepted_per_min": round(s["accepted"] / minutes, 2), **s, "question_stats": teacher.stats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turns", type=int, default=100_000)
    ap.add_argument("--turns-per-conversation", type=int, default=5)
    ap.add_argument("--questions", type=int, default=2)
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--teacher-chunks", type=int, default=None)
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--skip-teacher", action="store_true")
    ap.add_argument("--dump", type=Path, default=None, help="write the teacher's pairs and verdicts as JSON")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    out: dict = {"date": datetime.now(UTC).strftime("%Y-%m-%d"), "machine": machine}
    if not args.skip_build:
        out["build"] = bench_build(args.turns, args.turns_per_conversation)
    if not args.skip_teacher:
        out["teacher"] = bench_teacher(args.questions, args.candidates, args.teacher_chunks, args.dump)
    print(json.dumps(out, indent=2))
    print("\n| measurement | result |\n|---|---|")
    if "build" in out:
        b = out["build"]
        print(f"| dataset build, {b['seeded']['turns']:,} turns ({b['seeded']['feedback']:,} feedback rows) "
              f"| {b['build_s']} s wall, {b['build_cpu_s']} s CPU, load avg {b['load_avg_1min']} (target <= 60 s) |")
    if "teacher" in out:
        t = out["teacher"]
        print(f"| self-teacher, SmolLM2-135M, 1 thread, {t['candidates_per_question']} candidates per question "
              f"| {t['pairs_per_min']} pairs/min wall ({t['pairs_per_cpu_min']} per CPU-minute), "
              f"{t['accepted_per_min']} accepted/min ({t['accepted']}/{t['pairs']} accepted), "
              f"load avg {t['load_avg_1min']} |")


if __name__ == "__main__":
    main()
