"""Time to first token and decode speed: the whole API path versus raw `model.generate`.

Same prompts, same greedy settings, same thread count: the raw model in this process (a streamer that
only records token times) and `assistant serve` as a separate process measured with the official
`openai` client streaming over HTTP. Each prompt goes to both paths back to back, alternating which
goes first, so that drift in the machine's speed during the run (a shared VM) moves both alike.
The server's agent runs as in production (memory
recall, the document router); with no documents or memories it sends the plain system prompt, so both
paths feed the model the same tokens, which the script checks (prompt tokens, answer tokens).
Each path gets one untimed warm-up request first (the server's is reported on its own line), sent once
/health says the server is warm. Prints a table; paste it into docs/benchmarks.md.

    .venv/bin/python -m bench.chat_latency [--threads 2] [--max-tokens 64] [--repeats 3] [--stream-interval-ms MS ...]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for writing clear emails.",
    "Explain what a LoRA adapter is in two sentences.",
    "Write a short poem about the sea.",
    "How do I boil an egg?",
]


def thread_counters(pid: int) -> dict[int, tuple[float, int, int]]:
    """Per thread of process `pid`: (CPU seconds, voluntary, involuntary context switches), from /proc.
    Counts, not timings: they say where the server's time goes with much less noise than tok/s."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text().rsplit(")", 1)[1].split()
            status = dict(line.split(":\t", 1) for line in (task / "status").read_text().splitlines() if ":\t" in line)
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended
        out[int(task.name)] = ((int(stat[11]) + int(stat[12])) / tick, int(status["voluntary_ctxt_switches"]),
                               int(status["nonvoluntary_ctxt_switches"]))
    return out


class ThreadCounts:
    """`thread_counters` of one process summed over the requests it answered, and the tokens it made."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.threads: dict[int, list[float]] = {}  # thread id -> [CPU s, voluntary, involuntary]
        self.tokens = 0

    def around(self, ask: Callable[[str], tuple], prompt: str) -> tuple:
        before = thread_counters(self.pid)
        result = ask(prompt)
        for tid, now in thread_counters(self.pid).items():
            was = before.get(tid, (0.0, 0, 0))
            acc = self.threads.setdefault(tid, [0.0, 0, 0])
            for k in range(3):
                acc[k] += now[k] - was[k]
        self.tokens += result[2]
        return result

    def row(self, name: str) -> str:
        """Per generated token: the busiest thread (the one that generates), the second (its OpenMP
        worker at 2 threads) and all the others together: CPU ms, voluntary / involuntary switches."""
        rows = sorted(self.threads.values(), key=lambda c: -c[0])
        n = max(self.tokens, 1)

        def cell(cs: list[list[float]]) -> str:
            cpu, vol, inv = (sum(c[k] for c in cs) for k in range(3))
            return f"{cpu / n * 1000:.2f} / {vol / n:.2f} / {inv / n:.2f}"

        return f"| {name} | {cell(rows[:1])} | {cell(rows[1:2])} | {cell(rows[2:])} ({max(len(rows) - 2, 0)}) |"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


class RawPath:
    """`model.generate` in this process with a streamer that only records token times."""

    def __init__(self, settings, threads: int, max_tokens: int) -> None:
        import torch

        from assistant.models import load_model, prepare_model

        torch.set_num_threads(threads)
        self.settings, self.max_tokens = settings, max_tokens
        self.model, self.tok, self.device, _ = load_model(settings, prepare_model(settings, progress=False))
        self.counts = ThreadCounts(os.getpid())

    def ask(self, prompt: str) -> tuple[float, float, int, int]:
        import torch
        from transformers.generation.streamers import BaseStreamer

        class Clock(BaseStreamer):
            def __init__(self) -> None:
                self.times: list[float] = []
                self.first = True

            def put(self, value) -> None:
                if self.first:  # generate() first "puts" the prompt
                    self.first = False
                    return
                self.times.append(time.perf_counter())

            def end(self) -> None:
                pass

        msgs = [{"role": "system", "content": self.settings.system_prompt}, {"role": "user", "content": prompt}]
        enc = self.tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True).to(self.device)
        clock = Clock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            self.model.generate(**enc, streamer=clock, max_new_tokens=self.max_tokens, do_sample=False,
                                pad_token_id=self.tok.pad_token_id)
        done = time.perf_counter()
        n = len(clock.times)
        decode = (n - 1) / (done - clock.times[0]) if n > 1 else 0.0
        return clock.times[0] - t0, decode, n, int(enc["input_ids"].shape[1])


class ApiPath:
    """`assistant serve` as a separate process, asked with the official `openai` client, streaming."""

    def __init__(self, home: Path, threads: int, max_tokens: int, port: int = 8765,
                 stream_interval_ms: float | None = None) -> None:
        self.home, self.threads, self.max_tokens, self.port = home, threads, max_tokens, port
        self.stream_interval_ms = stream_interval_ms

    def __enter__(self) -> ApiPath:
        import httpx
        import openai

        env = {**os.environ, "ASSISTANT_HOME": str(self.home), "ASSISTANT_TORCH_THREADS": str(self.threads),
               "ASSISTANT_PORT": str(self.port)}
        if self.stream_interval_ms is not None:
            env["ASSISTANT_STREAM_INTERVAL_MS"] = str(self.stream_interval_ms)
        exe = Path(sys.executable).parent / "assistant"
        subprocess.run([str(exe), "user", "add", "bench", "--password", "bench-password"], env=env, check=True,
                       capture_output=True)
        key = subprocess.run([str(exe), "user", "key", "bench"], env=env, check=True, capture_output=True,
                             text=True).stdout.strip().splitlines()[-1]
        t_start = time.perf_counter()
        self.proc = subprocess.Popen([str(exe), "serve"], env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        health = f"http://127.0.0.1:{self.port}/health"
        while True:
            try:
                if httpx.get(health, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("server exited")
            time.sleep(0.1)
        self.counts = ThreadCounts(self.proc.pid)
        print(f"server ready in {time.perf_counter() - t_start:.1f} s (/health answers)")
        while not httpx.get(health, timeout=5).json().get("warm"):
            time.sleep(0.05)
        print(f"server warm in {time.perf_counter() - t_start:.1f} s (embedder, lexical index, model kernels loaded)")
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)

    def ask(self, prompt: str) -> tuple[float, float, int, int]:
        t0 = time.perf_counter()
        first, done, n, prompt_tokens = None, None, 0, 0
        for chunk in self.client.chat.completions.create(
                model="assistant", stream=True, temperature=0, max_tokens=self.max_tokens,
                messages=[{"role": "user", "content": prompt}]):
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter()
            if chunk.usage:
                done = time.perf_counter()
                n, prompt_tokens = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
        assert first is not None and done is not None, "no text or no usage in the stream"
        # The first piece is the first token; the last chunk carries the usage and leaves once the
        # turn is logged. Both paths count the tokens after the first (end-of-sequence included)
        # over the time to the end, so it holds whether the server sends a piece per token or fewer.
        decode = (n - 1) / (done - first) if n > 1 else 0.0
        return first - t0, decode, n, prompt_tokens


def measure(raw: RawPath, apis: list[ApiPath], repeats: int) -> tuple[list, list[list]]:
    """Each prompt on every path back to back, rotating which goes first, so that a machine that
    speeds up or slows down during the run (other tenants, clocks) moves every column alike."""
    for api in apis:
        first = api.ask(PROMPTS[0])
        print(f"first request after /health (warm-up, not in the table): TTFT {first[0] * 1000:.0f} ms")
    raw.ask(PROMPTS[0])
    paths = [raw] + apis
    results: list[list] = [[] for _ in paths]
    for r in range(repeats):
        for i, prompt in enumerate(PROMPTS):
            shift = (r + i) % len(paths)
            for j in list(range(shift, len(paths))) + list(range(shift)):
                results[j].append(paths[j].counts.around(paths[j].ask, prompt))
    return results[0], results[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stream-interval-ms", type=float, nargs="+", default=None, metavar="MS",
                    help="the server's stream_interval_ms (default: the product's default); several values "
                         "start one server each, measured interleaved with raw")
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from assistant.config import Settings
    from assistant.models import prepare_model

    shared = Settings.load()
    prepare_model(shared, progress=False)  # converted once, here: the servers' start-up is timed after it
    shared_models = shared.models_dir

    def fresh_home() -> Path:
        home = Path(tempfile.mkdtemp(prefix="bench-chat-"))
        (home / "models").symlink_to(shared_models)  # reuse the converted model, don't convert again
        return home

    settings = Settings.load(home=fresh_home())
    settings.ensure_dirs()
    intervals: list[float | None] = list(args.stream_interval_ms or [None])
    with contextlib.ExitStack() as stack:
        apis = [stack.enter_context(ApiPath(fresh_home(), args.threads, args.max_tokens, port=8765 + j,
                                            stream_interval_ms=iv))
                for j, iv in enumerate(intervals)]
        raw_path = RawPath(settings, args.threads, args.max_tokens)
        raw, api_results = measure(raw_path, apis, args.repeats)

    def row(name: str, xs: list[tuple[float, float, int]]) -> str:
        ttft = [x[0] * 1000 for x in xs]
        dec = [x[1] for x in xs]
        return (f"| {name} | {statistics.median(ttft):.0f} | {pct(ttft, 0.95):.0f} | "
                f"{statistics.median(dec):.1f} | {statistics.mean(x[2] for x in xs):.0f} |")

    def label(iv: float | None) -> str:
        return "API (openai client, streaming" + ("" if iv is None else f", stream interval {iv:g} ms") + ")"

    print(f"\nthreads={args.threads} max_tokens={args.max_tokens} prompts={len(PROMPTS)} x {args.repeats}, greedy")
    print("| path | TTFT p50 (ms) | TTFT p95 (ms) | decode tok/s p50 | tokens/answer |")
    print("|---|---|---|---|---|")
    print(row("raw model.generate", raw))
    for iv, api in zip(intervals, api_results, strict=True):
        print(row(label(iv), api))
    for iv, api in zip(intervals, api_results, strict=True):
        same = [r[2:] == a[2:] for r, a in zip(raw, api, strict=True)]
        ttft_over = statistics.median(a[0] for a in api) * 1000 - statistics.median(r[0] for r in raw) * 1000
        ratio = statistics.median(a[1] for a in api) / statistics.median(r[1] for r in raw)
        paired = statistics.median(a[1] / r[1] for r, a in zip(raw, api, strict=True) if r[1])
        print(f"\n{label(iv)}: same prompt and answer length (tokens) as raw: {sum(same)}/{len(same)} requests")
        print(f"TTFT overhead p50: {ttft_over:.0f} ms (target <= 50); decode API/raw: {ratio:.1%} "
              f"(median of the same request on both paths: {paired:.1%}; target >= 95%)")
    print("\nThreads of each path's process while it answered, per token: CPU ms / voluntary / involuntary "
          "context switches (/proc; the raw path's process also runs the client of the API path, idle then)")
    print("| path | busiest thread (generation) | second (OpenMP worker) | all others (how many) |")
    print("|---|---|---|---|")
    print(raw_path.counts.row("raw model.generate"))
    for iv, api in zip(intervals, apis, strict=True):
        print(api.counts.row(label(iv)))


if __name__ == "__main__":
    main()
