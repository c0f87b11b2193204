"""Prefill against decode on this machine: what a long prompt costs before the first token.

    .venv/bin/python -m bench.prefill [--model DIR] [--threads 2] [--lengths 100,300,900]

For each prompt length, one forward pass over that many random token ids (the prefill, after one warm-up
pass) and then 8 cached one-token steps (the decode), on the embedded model (converted once into
--model-cache) in float32. Prints prompt tokens/s and the decode step in milliseconds: the numbers that say
whether a load is prefill-bound (docs/benchmarks.md, "Load").
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.server_process import prepare_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the embedded model, converted once)")
    ap.add_argument("--model-cache", type=Path, default=Path(tempfile.gettempdir()) / "assistant-bench-models")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lengths", default="100,300,900")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model or prepare_model(args.model_cache),
                                                 dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    print("| prompt tokens | prefill s | prompt tok/s | decode step ms |\n|---|---|---|---|")
    with torch.inference_mode():
        for n in (int(x) for x in args.lengths.split(",")):
            ids = torch.randint(100, min(vocab, 4000), (1, n))
            model(ids)
            t = time.perf_counter()
            out = model(ids, use_cache=True)
            prefill = time.perf_counter() - t
            cache, step = out.past_key_values, torch.randint(100, min(vocab, 4000), (1, 1))
            t = time.perf_counter()
            for _ in range(8):
                cache = model(step, past_key_values=cache, use_cache=True).past_key_values
            decode = (time.perf_counter() - t) / 8
            print(f"| {n} | {prefill:.2f} | {n / prefill:.0f} | {1000 * decode:.0f} |", flush=True)
    print(f"threads {args.threads}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
