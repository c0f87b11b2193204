"""What one more row costs in a decode step: the embedded model's matrix products at 1, 8 and 16 rows.

    .venv/bin/python -m bench.matmul [--threads 1] [--rows 1,8,16]

A decode step of SmolLM2-135M is 210 products of a few rows by a layer's weights (q, k, v, o, gate, up, down in
30 layers) and one by the 49,152-word output layer. Batching pays only as far as a product of 8 rows costs less
than 8 products of one. This times `torch.nn.functional.linear` for each shape with the weights coming from
memory, as in the model (60 different weight matrices per shape, cycled, more than the caches hold), and prints
milliseconds, GFLOP/s and the cost relative to one row. No model is loaded; random weights of the real shapes.
"""

from __future__ import annotations

import argparse
import platform
import time

SHAPES = {  # name: (out, in, per step) for SmolLM2-135M (hidden 576, 3 KV heads of 64, MLP 1536, 30 layers)
    "q/o 576x576": (576, 576, 60),
    "k/v 192x576": (192, 576, 60),
    "gate/up 1536x576": (1536, 576, 60),
    "down 576x1536": (576, 1536, 30),
    "output 49152x576": (49152, 576, 1),
}


def time_linear(out_f: int, in_f: int, rows: int, copies: int, reps: int) -> float:
    import torch

    weights = [torch.randn(out_f, in_f) for _ in range(copies)]
    x = torch.randn(rows, in_f)
    for w in weights:  # warm-up
        torch.nn.functional.linear(x, w)
    t = time.perf_counter()
    for _ in range(reps):
        for w in weights:
            torch.nn.functional.linear(x, w)
    return (time.perf_counter() - t) / (reps * copies)


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 16])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or platform.machine()}")
    print("| product | rows | ms | GFLOP/s | cost vs 1 row |")
    print("|---|---|---|---|---|")
    step = dict.fromkeys(args.rows, 0.0)
    for name, (out_f, in_f, per_step) in SHAPES.items():
        copies = 4 if out_f > 10_000 else 60
        base = None
        for r in args.rows:
            s = time_linear(out_f, in_f, r, copies, reps=3 if out_f > 10_000 else 5)
            step[r] += s * per_step
            base = base or s
            print(f"| {name} | {r} | {s * 1e3:.2f} | {2 * r * out_f * in_f / s / 1e9:.1f} | {s / base:.2f}x |")
    first = step[args.rows[0]]
    print("\nall products of one decode step: " + ", ".join(
        f"{r} rows {step[r] * 1e3:.0f} ms ({step[r] / first:.2f}x, {r * first / step[r]:.2f}x the tokens per second)"
        for r in args.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
