"""Load: N concurrent API users chat and rate for a fixed time against `assistant serve`.

    .venv/bin/python -m bench.load [--users 50] [--duration 180] [--max-tokens 32] [--model DIR] [--url URL]
                                   [--serving batched,sequential]

With --serving naming both paths (the default), the whole run happens once per serving path, each
against a fresh server and home, one after the other, and the table has a row per path plus the
batched/sequential ratios.

In: a server (started here as its own process with a fresh home, the embedded model and the
knowledge base holding tests/data/docs; or an already running one with `--url` and `--keys-file`).
Out: a markdown table on stdout (latency percentiles, time to first token, queue waits, back-pressure
responses, throughput) and, with `--json FILE`, every number in JSON.

Each simulated user is a thread with its own API key and the official `openai` client (retries off):
it asks a question about the documents (half of them streamed, a third continuing its previous
conversation), then rates the answer with a thumb (sometimes with a reason). The server's
back-pressure answer (503 `server_busy` with `Retry-After`) is expected when more requests wait than
`queue_max` or one waits longer than `queue_timeout_s`: the user honours Retry-After (plus jitter) and
tries again. Anything else is an error, and the run fails if there is one.

At the end the server is stopped and the store is opened: every answer the API accepted (its
message_id) and every rating it accepted (its feedback id) must be in the database, and the database
must pass its integrity check.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.server_process import free_port, prepare_model, start_server

ROOT = Path(__file__).resolve().parent.parent

QUESTIONS = [
    "What does Lumen Desk do?",
    "How much does the Team plan cost per month?",
    "Which plan includes single sign-on?",
    "How do I reset my password?",
    "What changed in the latest release?",
    "Where is the company based?",
    "How is customer data encrypted?",
    "Can I export my tickets?",
    "What are the support hours?",
    "Is there a free trial?",
    "Tell me one tip for writing a good support reply.",
    "Summarise the security policy in one sentence.",
]
REASONS = ["wrong", "unhelpful", "off-topic", "style", "other"]


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


@dataclass
class Tally:
    """Everything one user saw; merged at the end (each user owns its own, so no locking)."""

    accepted: list[int] = field(default_factory=list)  # message ids the API answered with
    ratings: list[int] = field(default_factory=list)  # feedback ids the API answered with
    latency: list[float] = field(default_factory=list)  # request start -> complete answer
    ttft: list[float] = field(default_factory=list)  # streamed: request start -> first content piece
    queue_wait: list[float] = field(default_factory=list)  # the server's own count of seconds queued
    completion_tokens: int = 0
    prompt_tokens: list[int] = field(default_factory=list)  # each answer's prompt, as the server counted it
    busy: int = 0  # 503 server_busy (intended back-pressure)
    busy_without_retry_after: int = 0
    rating_busy: int = 0
    errors: list[str] = field(default_factory=list)


def user_loop(url: str, key: str, deadline: float, max_tokens: int, seed: int, tally: Tally) -> None:
    import httpx
    import openai

    rng = random.Random(seed)
    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=600)
    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120)
    conversation = None
    while time.time() < deadline:
        question = rng.choice(QUESTIONS)
        stream = rng.random() < 0.5
        extra = {"conversation_id": conversation} if conversation and rng.random() < 0.33 else {}
        started = time.perf_counter()
        try:
            if stream:
                first = None
                final = None
                chunks = client.chat.completions.create(
                    model="assistant", messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
                    stream=True, extra_body=extra)
                for chunk in chunks:
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.perf_counter() - started
                    final = chunk
                extra_out = final.model_extra or {}
                if extra_out.get("message_id") is None:
                    raise RuntimeError(f"stream ended without a stored answer: {final}")
                if first is not None:
                    tally.ttft.append(first)
                tally.completion_tokens += final.usage.completion_tokens if final.usage else 0
                if final.usage:
                    tally.prompt_tokens.append(final.usage.prompt_tokens)
            else:
                resp = client.chat.completions.create(
                    model="assistant", messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
                    extra_body=extra)
                extra_out = resp.model_extra or {}
                tally.completion_tokens += resp.usage.completion_tokens if resp.usage else 0
                if resp.usage:
                    tally.prompt_tokens.append(resp.usage.prompt_tokens)
        except openai.APIStatusError as e:
            if e.status_code == 503 and "server_busy" in str(e.body):
                tally.busy += 1
                retry_after = e.response.headers.get("retry-after")
                if retry_after is None:
                    tally.busy_without_retry_after += 1
                time.sleep(float(retry_after or 5) * (0.5 + rng.random()))
                continue
            tally.errors.append(f"chat {e.status_code}: {str(e.body)[:200]}")
            continue
        except Exception as e:  # noqa: BLE001 - every failure is counted and reported, and fails the run
            tally.errors.append(f"chat {type(e).__name__}: {str(e)[:200]}")
            continue
        tally.latency.append(time.perf_counter() - started)
        tally.accepted.append(extra_out["message_id"])
        conversation = extra_out.get("conversation_id")
        if extra_out.get("queue_wait_s") is not None:
            tally.queue_wait.append(float(extra_out["queue_wait_s"]))
        body = {"message_id": extra_out["message_id"], "rating": rng.choice([1, -1])}
        if body["rating"] < 0 and rng.random() < 0.5:
            body["reason"] = rng.choice(REASONS)
        for _ in range(5):  # a rating is small: retry it through back-pressure until it lands
            r = http.post("/v1/feedback/thumb", json=body)
            if r.status_code == 200:
                tally.ratings.append(r.json()["id"])
                break
            if r.status_code == 503:
                tally.rating_busy += 1
                time.sleep(float(r.headers.get("retry-after", 2)))
                continue
            tally.errors.append(f"thumb {r.status_code}: {r.text[:200]}")
            break
    http.close()


# ------------------------------------------------------------------------------------------ server


def setup_home(home: Path, users: int) -> tuple[list[str], str]:
    """Users with API keys and an admin's key, in a fresh home (the documents go in through the API once
    the server runs: `upload_documents`)."""
    from argon2 import PasswordHasher

    from assistant.config import Settings
    from memory.store import Store

    settings = Settings.load(env={}, home=home)
    settings.ensure_dirs()
    # Cheap password hashes: the load test uses API keys only; 50 default argon2 hashes take ~25 s here.
    store = Store.open(settings.db_url, password_hasher=PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
    keys = []
    admin = store.create_user("load-admin", "load-admin-password", role="admin")
    admin_key = store.create_api_key(admin.id)
    for i in range(users):
        u = store.create_user(f"load{i:03d}", f"load-password-{i:03d}")
        keys.append(store.create_api_key(u.id))
    store.close()
    return keys, admin_key


def upload_documents(url: str, admin_key: str) -> int:
    """The test documents, shared with everyone, through `POST /v1/documents` as an operator would."""
    import httpx

    docs = sorted((ROOT / "tests" / "data" / "docs").glob("*.md"))
    files = [("files", (d.name, d.read_bytes(), "text/markdown")) for d in docs]
    r = httpx.post(url + "/v1/documents", headers={"Authorization": f"Bearer {admin_key}"}, files=files,
                   data={"scope": "shared"}, timeout=600)
    r.raise_for_status()
    return len(r.json()["data"])


def verify(home: Path, accepted: list[int], ratings: list[int]) -> dict:
    import sqlalchemy as sa

    from assistant.config import Settings
    from memory.schema import feedback, messages
    from memory.store import Store

    store = Store.open(Settings.load(env={}, home=home).db_url)
    try:
        with store.engine.connect() as conn:
            have_msgs = {r[0] for r in conn.execute(sa.select(messages.c.id).where(messages.c.role == "assistant"))}
            have_fb = {r[0] for r in conn.execute(sa.select(feedback.c.id).where(feedback.c.kind == "thumb"))}
        return {"answers_accepted": len(accepted), "answers_in_db": len(set(accepted) & have_msgs),
                "ratings_accepted": len(ratings), "ratings_in_db": len(set(ratings) & have_fb),
                "integrity_ok": store.integrity_check(), "counts": store.counts()}
    finally:
        store.close()


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_once(args: argparse.Namespace, serving: str | None) -> dict:
    """One load run against a fresh server on serving path `serving` (None: the server's own setting)."""
    env = {**os.environ, "ASSISTANT_TORCH_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    if serving is not None:
        env["ASSISTANT_SERVING"] = serving
    if args.queue_max is not None:
        env["ASSISTANT_QUEUE_MAX"] = str(args.queue_max)
    if args.queue_timeout is not None:
        env["ASSISTANT_QUEUE_TIMEOUT_S"] = str(args.queue_timeout)
    if args.batch_max is not None:
        env["ASSISTANT_BATCH_MAX"] = str(args.batch_max)
    proc = None
    t_setup = time.perf_counter()
    if args.url:
        if not args.keys_file:
            raise SystemExit("--url needs --keys-file")
        url, keys, home = args.url.rstrip("/"), args.keys_file.read_text().split(), None
    else:
        home = (args.home / (serving or "default") if args.home else
                Path(tempfile.mkdtemp(prefix="assistant-load-")) / "home")
        model = args.model or str(prepare_model(args.model_cache))
        keys, admin_key = setup_home(home, args.users)
        port = free_port()
        proc = start_server(home, model, port, env, timeout_s=300)
        url = f"http://127.0.0.1:{port}"
        upload_documents(url, admin_key)
    setup_s = time.perf_counter() - t_setup
    load_before = loadavg()
    print(f"[{serving or 'server default'}] server ready at {url} after {setup_s:.0f} s; {args.users} users for "
          f"{args.duration:.0f} s; load average {load_before}", file=sys.stderr)

    tallies = [Tally() for _ in range(args.users)]
    deadline = time.time() + args.duration
    started = time.perf_counter()
    threads = [threading.Thread(target=user_loop, args=(url, keys[i % len(keys)], deadline, args.max_tokens, i, t),
                                daemon=True) for i, t in enumerate(tallies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started  # includes the requests still in flight at the deadline
    load_after = loadavg()

    merged = Tally()
    for t in tallies:
        for name in ("accepted", "ratings", "latency", "ttft", "queue_wait", "errors", "prompt_tokens"):
            getattr(merged, name).extend(getattr(t, name))
        merged.completion_tokens += t.completion_tokens
        merged.busy += t.busy
        merged.busy_without_retry_after += t.busy_without_retry_after
        merged.rating_busy += t.rating_busy

    if proc is not None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    checked = verify(home, merged.accepted, merged.ratings) if home is not None else None
    ok = not merged.errors and merged.busy_without_retry_after == 0 and bool(merged.accepted) and (
        checked is None or (checked["answers_in_db"] == checked["answers_accepted"]
                            and checked["ratings_in_db"] == checked["ratings_accepted"] and checked["integrity_ok"]))
    return {
        "serving": serving or "server default", "ok": ok,
        "users": args.users, "duration_s": args.duration, "wall_s": round(wall, 1), "max_tokens": args.max_tokens,
        "answers": len(merged.accepted), "ratings": len(merged.ratings), "busy_503": merged.busy,
        "busy_without_retry_after": merged.busy_without_retry_after, "rating_busy_503": merged.rating_busy,
        "errors": len(merged.errors), "error_samples": merged.errors[:10],
        "answers_per_min": round(len(merged.accepted) / wall * 60, 1),
        "completion_tokens_per_s": round(merged.completion_tokens / wall, 2),
        "latency_s": {q: pct(merged.latency, v) for q, v in (("p50", .5), ("p90", .9), ("p99", .99))},
        "ttft_s": {q: pct(merged.ttft, v) for q, v in (("p50", .5), ("p90", .9), ("p99", .99))},
        "queue_wait_s": {q: pct(merged.queue_wait, v) for q, v in (("p50", .5), ("p90", .9), ("p99", .99))},
        "prompt_tokens": {q: pct(merged.prompt_tokens, v) for q, v in (("p10", .1), ("p50", .5), ("p90", .9))},
        "load_average_before": load_before, "load_average_after": load_after, "verify": checked,
        "machine": f"{platform.node()} {os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=50)
    ap.add_argument("--duration", type=float, default=180.0, help="seconds of load")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--model", default=None, help="model folder (default: the embedded model, converted once)")
    ap.add_argument("--model-cache", type=Path, default=Path(tempfile.gettempdir()) / "assistant-bench-models")
    ap.add_argument("--home", type=Path, default=None, help="fresh state folder (default: a temp folder)")
    ap.add_argument("--url", default=None, help="load an already running server (needs --keys-file)")
    ap.add_argument("--keys-file", type=Path, default=None, help="one API key per line, for --url")
    ap.add_argument("--queue-max", type=int, default=None, help="server setting queue_max (default: its own)")
    ap.add_argument("--queue-timeout", type=float, default=None, help="server setting queue_timeout_s")
    ap.add_argument("--batch-max", type=int, default=None, help="server setting batch_max (default: its own)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    ap.add_argument("--serving", default="batched,sequential",
                    help="serving paths to run one after the other (server setting `serving`)")
    ap.add_argument("--json", type=Path, default=None, help="write every number here")
    args = ap.parse_args(argv)

    paths: list[str | None] = [None] if args.url else args.serving.split(",")
    results = [run_once(args, p) for p in paths]
    command = "python -m bench.load " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.json:
        args.json.write_text(json.dumps({"command": command, "runs": results}, indent=2) + "\n")

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}"

    print("\n| serving | users | s | answers | ratings | 503 busy | errors | answers/min | tok/s "
          "| latency p50/p90/p99 s | TTFT p50/p90/p99 s | queue wait p50/p90/p99 s | in DB (answers, ratings) "
          "| integrity | prompt tokens p10/p50/p90 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        checked, lat, ttft, qw = r["verify"], r["latency_s"], r["ttft_s"], r["queue_wait_s"]
        db = f"{checked['answers_in_db']}/{checked['answers_accepted']}, {checked['ratings_in_db']}/" \
             f"{checked['ratings_accepted']}" if checked else "-"
        print(f"| {r['serving']} | {r['users']} | {r['wall_s']:.0f} | {r['answers']} | {r['ratings']} "
              f"| {r['busy_503']} | {r['errors']} | {r['answers_per_min']} | {r['completion_tokens_per_s']} "
              f"| {ms(lat['p50'])} / {ms(lat['p90'])} / {ms(lat['p99'])} | {ms(ttft['p50'])} / {ms(ttft['p90'])} / "
              f"{ms(ttft['p99'])} | {ms(qw['p50'])} / {ms(qw['p90'])} / {ms(qw['p99'])} | {db} "
              f"| {checked['integrity_ok'] if checked else '-'} "
              f"| {' / '.join(str(r['prompt_tokens'][q]) for q in ('p10', 'p50', 'p90'))} |")
    by = {r["serving"]: r for r in results}
    if "batched" in by and "sequential" in by:
        b, q = by["batched"], by["sequential"]
        apm = b["answers_per_min"] / q["answers_per_min"] if q["answers_per_min"] else float("inf")
        p50 = (b["latency_s"]["p50"] or 0) / q["latency_s"]["p50"] if q["latency_s"]["p50"] else float("nan")
        print(f"\nbatched vs sequential: answers/min {apm:.2f}x, latency p50 {p50:.2f}x")
    for r in results:
        print(f"[{r['serving']}] load average before {r['load_average_before']}, after {r['load_average_after']}; "
              f"{r['machine']}; {r['date']}")
        for e in r["error_samples"]:
            print("error:", e)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
