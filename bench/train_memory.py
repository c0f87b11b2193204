"""Training memory on CPU: peak resident memory of one LoRA forward + backward, by rows and attention.

In: a causal LM folder (the embedded SmolLM2-135M-Instruct by default: its real weights), a dtype
(`--dtype`: float32 as a CPU without native bf16 trains it, or bfloat16 weights; unlike the job, no
autocast, so the LoRA path stays float32) and a grid of variants. Out: a markdown table (rows per pass,
tokens per row, attention implementation, activation checkpointing, seconds of the second forward +
backward, seconds per row, peak resident GB, GB per row) and a JSON file.

Each variant runs in a fresh process (`ru_maxrss` is a process-lifetime high-water mark), with LoRA r=8
on all linear layers as the loop's jobs use, random token ids, and one row left-padded by a third, so
the attention mask is not trivial. The loss is a full-vocabulary log-softmax over every position, as
SFT's and DPO's token log-probabilities are. This is what set `micro_batch_size`'s CPU default of 1
(training/train_config.py): memory grows by about a row's worth for every row in the pass.

    python -m bench.train_memory --model MODEL_DIR [--threads 2] [--json OUT.json]
    python -m bench.train_memory --model MODEL_DIR --variants sdpa:0:1:1000 eager:0:1:1000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

DEFAULT_VARIANTS = ["sdpa:0:1:1000", "eager:0:1:1000", "sdpa:1:1:1000", "sdpa:0:2:1000", "sdpa:1:2:1000",
                    "sdpa:1:4:1000"]


def one(model: str, attn: str, checkpointing: bool, rows: int, length: int, threads: int, dtype: str) -> dict:
    """Runs in the child process: two forward + backward passes, then the process's peak resident memory."""
    import resource
    import time

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype), attn_implementation=attn)
    m = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                     task_type="CAUSAL_LM"))
    if checkpointing:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m.train()
    vocab = m.config.vocab_size
    ids = torch.randint(0, vocab, (rows, length))
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[0, : length // 3] = 0
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB -> GB on Linux
    times = []
    for _ in range(2):  # the second pass is the one timed: the first also warms the kernels up
        t0 = time.perf_counter()
        logits = m(input_ids=ids, attention_mask=mask).logits
        torch.log_softmax(logits.float(), -1).gather(-1, ids.unsqueeze(-1)).sum().backward()
        del logits
        times.append(time.perf_counter() - t0)
    seconds = times[-1]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return {"attn": attn, "checkpointing": checkpointing, "rows": rows, "length": length, "threads": threads,
            "dtype": dtype, "seconds": round(seconds, 2), "s_per_row": round(seconds / rows, 2),
            "first_pass_s": round(times[0], 2), "loaded_gb": round(loaded, 2), "peak_gb": round(peak, 2),
            "gb_per_row": round((peak - loaded) / rows, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="causal LM folder (config.json + weights)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                    help="attn:checkpointing(0/1):rows:tokens, e.g. sdpa:0:1:1000")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="weights dtype (the job trains bfloat16 weights on CPUs with native bf16)")
    ap.add_argument("--json", type=Path, help="write the rows here too")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    if ns.child:
        attn, ckpt, rows, length = ns.child.split(":")
        print(json.dumps(one(ns.model, attn, ckpt == "1", int(rows), int(length), ns.threads, ns.dtype)))
        return 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": str(ns.threads)}
    results = []
    print(f"{ns.dtype}, {ns.threads} threads; s = the second forward + backward (the first warms up)")
    print("| rows per pass | tokens per row | attention | checkpointing | s (fwd+bwd) | s per row | peak GB "
          "| GB per row |")
    print("|---|---|---|---|---|---|---|---|")
    for variant in ns.variants:
        proc = subprocess.run([sys.executable, "-m", "bench.train_memory", "--model", ns.model,
                               "--threads", str(ns.threads), "--dtype", ns.dtype, "--child", variant],
                              capture_output=True, text=True, env=env, check=False,
                              cwd=Path(__file__).resolve().parents[1])
        if proc.returncode != 0:
            # A negative code is the signal that ended the child (-9: SIGKILL, the kernel's OOM killer's).
            tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:]
            print(f"| {variant} failed: exit {proc.returncode}, {tail} ||||||||", flush=True)
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(r)
        print(f"| {r['rows']} | {r['length']} | {r['attn']} | {'on' if r['checkpointing'] else 'off'} | "
              f"{r['seconds']} | {r['s_per_row']} | {r['peak_gb']} | {r['gb_per_row']} |", flush=True)
    if ns.json:
        ns.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0 if len(results) == len(ns.variants) else 1


if __name__ == "__main__":
    raise SystemExit(main())
