"""Serving throughput through the real API: concurrent streams, one adapter or spread over 4, batched vs one at a time.

    .venv/bin/python -m bench.serving [--streams 1,4,8,16] [--max-tokens 32] [--rounds 2]
                                      [--paths batched,sequential] [--threads 2] [--no-raw]

For each serving path (`serving=batched`, the default, and `serving=sequential`, one generation at a
time) a fresh `assistant serve` starts as its own process with the embedded model; 4 random LoRA
adapters (r16, all linear layers, made here once) are loaded through the admin-only
`POST /v1/load_lora_adapter`. Then N threads (N = each of --streams) each send --rounds streamed chat
requests (official `openai` client), all on adapter a0 ("1 adapter") or stream i on a(i mod 4) ("4
adapters"). Per cell: aggregate completion tokens/s (all streams' tokens / wall time), time to first
token and whole-answer latency (p50/p95), and the server's own queue wait. Afterwards, in this process
and with the server stopped, raw `model.generate` on the same model, dtype and threads decodes a static
batch of N copies of the templated question (PEFT `adapter_names` for 4 adapters) as the ceiling.

Out: a markdown table on stdout, and every number in JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.server_process import free_port, prepare_model, start_server

ROOT = Path(__file__).resolve().parent.parent


QUESTION = "Write a short story about a lighthouse keeper and a storm."
N_ADAPTERS = 4


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def make_adapters(model_dir: Path, out: Path) -> list[Path]:
    """4 LoRA adapters (r16, all linear) with small random B matrices: they change the answers a little."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = [out / f"a{i}" for i in range(N_ADAPTERS)]
    if all((p / "adapter_model.safetensors").is_file() for p in paths):
        return paths
    for i, p in enumerate(paths):
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        pm = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, w in pm.named_parameters():
                if "lora_B" in name:
                    w.copy_(torch.randn(w.shape, generator=g) * 0.002)
        pm.save_pretrained(p)
    return paths


def setup_home(home: Path) -> str:
    """A fresh home with one admin (its API key is returned): the bench loads adapters and chats as it."""
    from argon2 import PasswordHasher

    from assistant.config import Settings
    from memory.store import Store

    settings = Settings.load(env={}, home=home)
    settings.ensure_dirs()
    store = Store.open(settings.db_url, password_hasher=PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
    admin = store.create_user("bench-admin", "bench-admin-password", role="admin")
    key = store.create_api_key(admin.id)
    store.close()
    return key


def one_stream(client, adapter: str, rounds: int, max_tokens: int, out: dict) -> None:
    for _ in range(rounds):
        started = time.perf_counter()
        first = None
        final = None
        try:
            for chunk in client.chat.completions.create(
                    model=adapter, messages=[{"role": "user", "content": QUESTION}], max_tokens=max_tokens,
                    temperature=0, stream=True, stream_options={"include_usage": True}):
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - started
                final = chunk
        except Exception as e:  # noqa: BLE001 - counted and printed
            out["errors"].append(f"{type(e).__name__}: {str(e)[:200]}")
            continue
        out["latency"].append(time.perf_counter() - started)
        if first is not None:
            out["ttft"].append(first)
        extra = final.model_extra or {}
        out["tokens"] += final.usage.completion_tokens if final.usage else 0
        if extra.get("queue_wait_s") is not None:
            out["queue_wait"].append(float(extra["queue_wait_s"]))


def api_cell(url: str, key: str, streams: int, spread: int, rounds: int, max_tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=900)
    outs = [{"latency": [], "ttft": [], "queue_wait": [], "tokens": 0, "errors": []} for _ in range(streams)]
    threads = [threading.Thread(target=one_stream, args=(client, f"a{i % spread}", rounds, max_tokens, outs[i]))
               for i in range(streams)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    merged = {k: [x for o in outs for x in o[k]] for k in ("latency", "ttft", "queue_wait", "errors")}
    tokens = sum(o["tokens"] for o in outs)
    return {"tok_s": tokens / wall, "tokens": tokens, "wall_s": wall, "errors": merged["errors"],
            **{f"{k}_{q}": pct(merged[k], v) for k in ("ttft", "latency", "queue_wait")
               for q, v in (("p50", .5), ("p95", .95))}}


def run_path(path: str, model: str, adapters: list[Path], args: argparse.Namespace) -> dict:
    import httpx

    home = Path(tempfile.mkdtemp(prefix=f"assistant-serving-{path}-")) / "home"
    key = setup_home(home)
    adapters = [Path(shutil.copytree(p, home / "adapters" / p.name)) for p in adapters]  # loads read only there
    env = {**os.environ, "ASSISTANT_TORCH_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads),
           "ASSISTANT_SERVING": path, "ASSISTANT_BATCH_MAX": str(max(args.streams)),
           "ASSISTANT_QUEUE_MAX": "64", "ASSISTANT_QUEUE_TIMEOUT_S": "600",
           "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    port = free_port()
    proc = start_server(home, model, port, env, timeout_s=300)
    url = f"http://127.0.0.1:{port}"
    cells = {}
    try:
        for i, p in enumerate(adapters):
            r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": f"a{i}", "lora_path": str(p)},
                           headers={"Authorization": f"Bearer {key}"}, timeout=120)
            r.raise_for_status()
        api_cell(url, key, 1, 1, 1, 8)  # warm-up
        for spread in args.spreads:
            for n in args.streams:
                cell = api_cell(url, key, n, spread, args.rounds, args.max_tokens)
                cells[f"{spread}/{n}"] = cell
                print(f"  {path} adapters={spread} streams={n}: {cell['tok_s']:.1f} tok/s, "
                      f"errors {len(cell['errors'])}", file=sys.stderr)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    return cells


def raw_generate(model_dir: str, adapters: list[Path], args: argparse.Namespace) -> dict:
    """Static-batch `model.generate` of N copies of the templated question: the ceiling for each cell."""
    import torch
    from peft import PeftModel

    from assistant.config import Settings
    from assistant.models import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(Settings.load(env={}, model=model_dir), Path(model_dir))
    tok = loaded.tokenizer
    model = PeftModel.from_pretrained(loaded.model, str(adapters[0]), adapter_name="a0")
    for i, p in enumerate(adapters[1:], 1):
        model.load_adapter(str(p), adapter_name=f"a{i}")
    model.eval()
    msgs = [{"role": "system", "content": Settings().system_prompt}, {"role": "user", "content": QUESTION}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = {}
    with torch.inference_mode():
        model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)  # warm-up
        for spread in args.spreads:
            for n in args.streams:
                batch = ids.repeat(n, 1)
                kwargs = {"adapter_names": [f"a{i % spread}" for i in range(n)]} if spread > 1 else {}
                t = time.perf_counter()
                model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), max_new_tokens=args.max_tokens,
                               min_new_tokens=args.max_tokens, do_sample=False, **kwargs)
                out[f"{spread}/{n}"] = n * args.max_tokens / (time.perf_counter() - t)
                print(f"  raw adapters={spread} batch={n}: {out[f'{spread}/{n}']:.1f} tok/s", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8, 16])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--spreads", type=lambda s: [int(x) for x in s.split(",")], default=[1, N_ADAPTERS],
                    help=f"adapters the streams are spread over: 1 and/or {N_ADAPTERS}")
    ap.add_argument("--rounds", type=int, default=2, help="streamed requests per stream, one after another")
    ap.add_argument("--paths", default="batched,sequential")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the server and of raw generate")
    ap.add_argument("--no-raw", action="store_true", help="skip raw model.generate")
    ap.add_argument("--model-cache", type=Path, default=Path(tempfile.gettempdir()) / "assistant-bench-models")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    model = str(prepare_model(args.model_cache))
    adapters = make_adapters(Path(model), args.model_cache / "serving-adapters")
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    results = {p: run_path(p, model, adapters, args) for p in args.paths.split(",")}
    raw = {} if args.no_raw else raw_generate(model, adapters, args)
    load_after = " ".join(f"{x:.2f}" for x in os.getloadavg())

    def f(x: float | None, nd: int = 2) -> str:
        return "-" if x is None else f"{x:.{nd}f}"

    print("\n| path | adapters | streams | tok/s | vs sequential | vs raw generate | TTFT p50 / p95 s "
          "| latency p50 / p95 s | queue wait p50 / p95 s | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path, cells in results.items():
        for cell_key, c in cells.items():
            spread, n = cell_key.split("/")
            seq = results.get("sequential", {}).get(cell_key)
            vs_seq = f"{c['tok_s'] / seq['tok_s']:.2f}x" if seq else "-"
            vs_raw = f"{c['tok_s'] / raw[cell_key]:.0%}" if cell_key in raw else "-"
            print(f"| {path} | {spread} | {n} | {c['tok_s']:.1f} | {vs_seq} | {vs_raw} | {f(c['ttft_p50'])} / "
                  f"{f(c['ttft_p95'])} | {f(c['latency_p50'])} / {f(c['latency_p95'])} | {f(c['queue_wait_p50'])} / "
                  f"{f(c['queue_wait_p95'])} | {len(c['errors'])} |")
    for cell_key, v in raw.items():
        spread, n = cell_key.split("/")
        print(f"| raw generate | {spread} | {n} | {v:.1f} | - | 100% | - | - | - | - |")
    if "batched" in results and N_ADAPTERS in args.spreads and 1 in args.spreads:
        b = results["batched"]
        mixed = [b[f"{N_ADAPTERS}/{n}"]["tok_s"] / b[f"1/{n}"]["tok_s"] for n in args.streams if n >= N_ADAPTERS]
        if mixed:
            print(f"\nbatched, {N_ADAPTERS} adapters vs 1 adapter: " + ", ".join(f"{m:.0%}" for m in mixed)
                  + f" (mean {statistics.mean(mixed):.0%})")
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    machine = f"{platform.node()} {os.cpu_count()} CPUs"
    print(f"load average before {load_before}, after {load_after}; {machine}; {date}")
    if args.json:
        args.json.write_text(json.dumps({"api": results, "raw_generate": raw, "machine": machine, "date": date,
                                         "load_average": [load_before, load_after], "args": vars(args)},
                                        indent=2, default=str) + "\n")
    errors = sum(len(c["errors"]) for cells in results.values() for c in cells.values())
    for cells in results.values():
        for c in cells.values():
            for e in c["errors"][:3]:
                print("error:", e)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
