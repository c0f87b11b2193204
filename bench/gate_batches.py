"""Does a gate answer depend on the batch it is generated in? The same questions, three ways, two dtypes.

    .venv/bin/python -m bench.gate_batches --doc-qa HOME/jobs/job-1/eval/doc_qa.jsonl [--model DIR] [--threads 2]

Takes the document questions a gate asked (the `doc_qa.jsonl` a loop run leaves in its job's eval folder) and
has the gate's own `Scorer.generate` answer the held-out questions nobody asks (ids not ending in `~again`)
greedily: on their own, among all the held-out questions, and one at a time (batch size 1, no padding), in
bfloat16 and in float32. Prints, per dtype, the grounded score of each way and how many answers differ between
them. Equal answers everywhere mean the gate's decisions do not depend on which questions share a batch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--doc-qa", type=Path, required=True, help="a gate's doc_qa.jsonl")
    ap.add_argument("--model", default=str(Path.home() / ".assistant" / "models" / "smollm2-135m-instruct"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=32,
                    help="32: the bench gate's length when docs/loop.md's figures were measured (it answers in 40 "
                         "now, bench/loop.py --max-tokens)")
    ap.add_argument("--batch-size", type=int, default=16, help="as bench/loop.py's gate")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.gate_config import GateConfig
    from training.gate_metrics import DocQA, Scorer, grounded_prompt, grounded_score

    torch.set_num_threads(args.threads)
    rows = [json.loads(line) for line in args.doc_qa.read_text(encoding="utf-8").splitlines() if line.strip()]
    held = [DocQA(question=r["question"], passage=r["passage"], key_facts=r["key_facts"], source=r.get("source", ""),
                  title=r.get("title", "")) for r in rows if r.get("split", "held-out") == "held-out"]
    unasked = [i for i, q in enumerate(held) if not q.source.endswith("~again")]
    tok = AutoTokenizer.from_pretrained(args.model)
    print(f"{len(unasked)} questions nobody asks, {len(held)} held-out in all")
    print("| dtype | on their own | among all held-out | one at a time | answers differing "
          "(own/among, own/one, among/one) |")
    print("|---|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float32):
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
        batched = Scorer(model, tok, GateConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size))
        single = Scorer(model, tok, GateConfig(max_new_tokens=args.max_new_tokens, batch_size=1))
        prompts = [grounded_prompt(q, batched.system_prompt) for q in held]
        own = batched.generate([prompts[i] for i in unasked])
        among_all = batched.generate(prompts)
        among = [among_all[i] for i in unasked]
        one = single.generate([prompts[i] for i in unasked])

        def score(answers: list[str]) -> float:
            facts = [held[i].key_facts for i in unasked]
            return sum(grounded_score(a, f) for a, f in zip(answers, facts, strict=True)) / len(unasked)

        def differ(a: list[str], b: list[str]) -> int:
            return sum(x != y for x, y in zip(a, b, strict=True))

        print(f"| {str(dtype).removeprefix('torch.')} | {score(own):.3f} | {score(among):.3f} | {score(one):.3f} | "
              f"{differ(own, among)}, {differ(own, one)}, {differ(among, one)} |", flush=True)


if __name__ == "__main__":
    main()
