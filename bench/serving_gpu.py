"""The product's runtime on a GPU, in-process, beside raw `model.generate` in the same run.

    python -m bench.serving_gpu [--shapes smollm2-135m,qwen2.5-0.5b] [--streams 1,8,32] [--tokens 128]

Random weights of the SmolLM2-135M and Qwen2.5-0.5B shapes in bf16 (no download: the machine may have
no network), a word-level tokenizer over the model's vocabulary (every id decodes), no end-of-text
token (every answer runs to --tokens), and 8 random LoRA adapters (r16, all linear layers). For each
shape and N in --streams:

- raw `model.generate` of a static batch of N prompts (eager, dynamic cache), and with a static
  cache + `torch.compile` (N = 1 and the largest N only: each batch size compiles anew);
- `TransformersBackend` with serving=batched: N threads each ask for one greedy answer through
  `backend.generate` (the same call the API makes), on the base model, all on one adapter, and spread
  over 8 adapters; serving=sequential for N = 1. `--modes` picks the batched engines: `compiled` (the
  default on CUDA: static slot cache, each decode step one CUDA graph of the torch.compile'd forward),
  `graphs` (the same without torch.compile), `eager` (cuda_graphs=false: growing cache, eager step).
  `--prefills` picks the prefill of the slot-cache engines: `bucketed` (the default on CUDA: joining
  prompts padded to a shape bucket, each bucket one captured CUDA graph) and/or `eager` (one eager
  forward pass per group of joining prompts, the engine before), each its own row of the table.
- `--check`: before timing, 8 greedy answers over 8 adapters from each batched engine, asked
  together, token for token against the eager engine's, asked one at a time (bf16 on a GPU:
  near-ties may part; a broken cache parts at once).

Prints one markdown table (aggregate generated tokens/s; wall time includes prefill).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {
    "smollm2-135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                   num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                                   tie_word_embeddings=True, rope_theta=100000.0)),
    "qwen2.5-0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                   max_position_embeddings=32768,
                                   tie_word_embeddings=True, rope_theta=1000000.0)),
}
PROMPT = [{"role": "user", "content": "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 w15 w16 w17 w18 w19 w20"}]


def word_tokenizer(vocab_size: int):
    """Every id is a word "wN"; a plain chat template; no eos, so generation runs to max_new_tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers import decoders as dec
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = dec.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="w0")
    tok.chat_template = "{% for m in messages %}w1 {{ m['content'] }} w2 {% endfor %}w3"
    return tok


def build(shape: str, device: str, dtype: str = "bfloat16"):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    arch, cfg = SHAPES[shape]
    cls, config_cls = (LlamaForCausalLM, LlamaConfig) if arch == "llama" else (Qwen2ForCausalLM, Qwen2Config)
    torch.manual_seed(0)
    config = config_cls(**cfg, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    model = cls(config).to(device=device, dtype=getattr(torch, dtype)).eval()
    model.generation_config.eos_token_id = None
    return model, word_tokenizer(cfg["vocab_size"])


def make_adapters(model, out: Path, n: int) -> list[Path]:
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    paths = []
    for i in range(n):
        pm = get_peft_model(copy.deepcopy(model).float().cpu(),
                            LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, w in pm.named_parameters():
                if "lora_B" in name:
                    w.copy_(torch.randn(w.shape, generator=g) * 0.002)
        pm.save_pretrained(out / f"a{i}")
        paths.append(out / f"a{i}")
    return paths


def engine(model, tok, tmp: str, mode: str, batch: int, shape: str, paths: list[Path], bucketed: bool = True):
    """A TransformersBackend over `model` with the 8 adapters loaded, serving in `mode` (`bucketed`: the
    slot-cache engines' prefill in captured shape buckets)."""
    from assistant.batching import SlotSpec
    from assistant.config import Settings
    from assistant.runtime import TransformersBackend

    settings = Settings.load(env={}, home=Path(tmp) / "home", serving="sequential" if mode == "sequential" else
                             "batched", cuda_graphs=mode in ("graphs", "compiled"), batch_max=batch,
                             stream_interval_ms=40.0, queue_max=256)
    slots = SlotSpec(max_len=model.config.max_position_embeddings, compile=mode == "compiled",
                     bucketed_prefill=bucketed) if mode in ("graphs", "compiled") else None
    backend = TransformersBackend(model, tok, settings, model_name=shape, slots=slots)
    for i, p in enumerate(paths):
        backend.load_adapter(f"a{i}", p)
    return backend


def timed(fn) -> float:
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def raw(model, tok, n: int, tokens: int, compiled: bool) -> float:
    import torch

    ids = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"].to(model.device).repeat(n, 1)
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
              do_sample=False, pad_token_id=0)
    if compiled:
        kw.update(cache_implementation="static")  # generate() compiles the forward for a static cache on CUDA
    with torch.inference_mode():
        model.generate(**{**kw, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up (compiles)
        if compiled:
            model.generate(**kw)
        return n * tokens / timed(lambda: model.generate(**kw))


def product(backend, n: int, tokens: int, adapters: list[str | None]) -> tuple[float, float]:
    """Aggregate tok/s of N concurrent `backend.generate` calls, and their median time to first token."""
    from assistant.runtime import GenerationSettings

    gen = GenerationSettings(max_new_tokens=tokens, temperature=0.0, top_p=1.0)
    results = [None] * n
    barrier = threading.Barrier(n)

    def one(i: int) -> None:
        barrier.wait()
        results[i] = backend.generate(PROMPT, adapters[i % len(adapters)], gen)

    backend.generate(PROMPT, adapters[0], GenerationSettings(max_new_tokens=4, temperature=0.0, top_p=1.0))
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]

    def go() -> None:
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    eng = backend._engine
    before = (eng.steps, getattr(eng, "wait_s", 0.0), getattr(eng, "prefills", 0), getattr(eng, "prefill_s", 0.0)) \
        if eng is not None else (0, 0.0, 0, 0.0)
    captures = eng.slots.prefill_captures if eng is not None and eng.slots is not None else 0
    wall = timed(go)
    done = sum(r.usage["completion_tokens"] for r in results)
    assert done == n * tokens, (done, n * tokens)
    ttft = sorted(r.first_token_s for r in results)[n // 2]
    if eng is not None and eng.slots is not None and eng.steps > before[0]:
        steps = eng.steps - before[0]
        wait = getattr(eng, "wait_s", 0.0) - before[1]
        prefills = getattr(eng, "prefills", 0) - before[2]
        prefill_s = getattr(eng, "prefill_s", 0.0) - before[3]
        print(f"  {n} streams: {wall * 1e3:.0f} ms: {prefills} prefills {prefill_s * 1e3:.0f} ms, {steps} steps "
              f"{(wall - prefill_s) / steps * 1e3:.2f} ms each (the rest of the wall time over the steps), of which "
              f"{wait / steps * 1e3:.2f} ms waiting for the GPU's tokens; graph replay alone "
              f"{replay_ms(eng.slots, adapters != [None]):.2f} ms; prefill graphs captured meanwhile: "
              f"{eng.slots.prefill_captures - captures}", flush=True)
    return done / wall, ttft


def replay_ms(slots, gathered: bool) -> float:
    """The GPU time of one decode step: its captured graph (base rows only, or the gathered LoRA one)
    replayed alone, back to back (ms); nan without one. Only between requests: the replays write K/V
    at columns 0-52 of every slot."""
    import torch

    graphs = [g for k, g in slots.graphs.items() if g is not None and (k[0][0] == "gathered") == gathered]
    if not graphs or not torch.cuda.is_available():
        return float("nan")
    try:
        with torch.inference_mode():  # the cache's tensors are inference tensors
            return _replay_ms(slots, graphs[-1][0])
    except Exception as e:  # a measurement aid: never the end of the run
        print(f"  (timing the replay failed: {e!r})", flush=True)
        return float("nan")


def _replay_ms(slots, graph) -> float:
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def column0() -> None:
        for layer in slots.cache.layers:
            layer.cumulative_length.fill_(0)

    for _ in range(3):
        column0()
        graph.replay()
    column0()  # the 50 replays write columns 0-49 (L >= 256)
    start.record()
    for _ in range(50):
        graph.replay()
    end.record()
    end.synchronize()
    slots._set_write()
    return start.elapsed_time(end) / 50


def agreement(backend, reference, tokens: int, adapters: list[str | None]) -> tuple[int, int, int]:
    """(answers equal, leading tokens equal summed over answers, tokens compared) for 8 mixed greedy answers."""
    from assistant.runtime import GenerationSettings

    gen = GenerationSettings(max_new_tokens=tokens, temperature=0.0, top_p=1.0)
    same = lead = 0
    answers: list = [None] * 8

    def one(i: int) -> None:  # together, as one batch; the reference's one at a time
        answers[i] = backend.generate(PROMPT, adapters[i % len(adapters)], gen).text.split()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        a = adapters[i % len(adapters)]
        mine, ref = answers[i], reference.generate(PROMPT, a, gen).text.split()
        same += mine == ref
        lead += next((j for j, (x, y) in enumerate(zip(mine, ref, strict=False)) if x != y),
                     min(len(mine), len(ref)))
    return same, lead, 8 * tokens


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="smollm2-135m,qwen2.5-0.5b")
    ap.add_argument("--streams", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--no-compile", action="store_true", help="no raw generate with static cache + compile")
    ap.add_argument("--raw-streams", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="streams for raw eager generate (default: --streams)")
    ap.add_argument("--modes", default="compiled,graphs,eager,sequential",
                    help="runtime engines: compiled (the default), graphs, eager (batched) and sequential")
    ap.add_argument("--prefills", default="bucketed",
                    help="prefill of the slot-cache engines: bucketed (the default), eager, or both")
    ap.add_argument("--check", action="store_true", help="compare answers of each batched engine with eager's")
    ap.add_argument("--device", default="cuda", help="cpu: the same cells on this machine's processor")
    ap.add_argument("--dtype", default="bfloat16", help="float32 on a CPU without native bf16 (AVX2)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    args = ap.parse_args(argv)
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"{device_name} torch {torch.__version__}", flush=True)
    rows = []
    for shape in args.shapes.split(","):
        model, tok = build(shape, device, args.dtype)
        with tempfile.TemporaryDirectory() as tmp:
            paths = make_adapters(model, Path(tmp), args.adapters)
            for n in args.raw_streams if args.raw_streams is not None else args.streams:
                rows.append((shape, "raw generate, eager", "-", n, raw(model, tok, n, args.tokens, False), None))
                print(rows[-1], flush=True)
            if not args.no_compile:
                for n in sorted({args.streams[0], args.streams[-1]}):
                    rows.append((shape, "raw generate, static cache + compile", "-", n,
                                 raw(model, tok, n, args.tokens, True), None))
                    print(rows[-1], flush=True)
                torch._dynamo.reset()
            modes = args.modes.split(",")
            names = [f"a{i}" for i in range(args.adapters)]
            spreads = {"base": [None], "1 adapter": ["a0"], f"{args.adapters} adapters": names}
            reference = None
            if args.check:  # the eager engine's answers, on its own copy of the model
                reference = engine(copy.deepcopy(model), tok, tmp, "eager", max(args.streams), shape, paths)
            runs = [(m, p == "bucketed") for m in modes
                    for p in (args.prefills.split(",") if m in ("graphs", "compiled") else ["eager"])]
            for mode, bucketed in runs:
                t0 = time.perf_counter()
                backend = engine(model, tok, tmp, mode, max(args.streams), shape, paths, bucketed)
                label = {"graphs": "runtime, batched, slot cache + CUDA graphs",
                         "compiled": "runtime, batched, slot cache + CUDA graphs + compile",
                         "eager": "runtime, batched, eager (cuda_graphs=false)"}.get(mode, f"runtime, {mode}")
                if mode in ("graphs", "compiled"):
                    label += ", prefill " + ("in captured buckets" if bucketed else "eager")
                    mode = f"{mode}/{'bucketed' if bucketed else 'eager'} prefill"
                if reference is not None and not mode.startswith("sequential"):
                    print(f"check {mode}: (same answers, equal leading tokens, tokens) =",
                          agreement(backend, reference, 16, [None, *names]), flush=True)
                for spread, adapters in spreads.items():
                    for n in args.streams if mode != "sequential" else args.streams[:1]:
                        tps, ttft = product(backend, n, args.tokens, adapters)
                        rows.append((shape, label, spread, n, tps, ttft))
                        print(rows[-1], flush=True)
                slots = backend._engine.slots if backend._engine is not None else None
                if slots is not None:
                    counters = torch._dynamo.utils.counters
                    print(f"{mode}: L={slots.length} graphs captured={slots.captures} (prefill buckets: "
                          f"{slots.prefill_captures}, {sorted(slots._buckets)}) rolls={slots.rolls} "
                          f"({time.perf_counter() - t0:.0f} s in all); torch.compile: {dict(counters['stats'])}, "
                          f"graph breaks {sum(counters['graph_break'].values())}", flush=True)
                for name in names:
                    backend.unload_adapter(name)
                backend.close()
                model = backend._base  # the PEFT wrapper is gone once the last adapter is unloaded
                torch._dynamo.reset()
            if reference is not None:
                reference.close()
                del reference
        del model
        torch.cuda.empty_cache()

    print(f"\n{args.tokens} new tokens per stream, {args.dtype}, {device_name}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("| shape | what | adapters | streams | tok/s (aggregate) | median TTFT s |")
    print("|---|---|---|---|---|---|")
    for shape, what, adapters, n, tps, ttft in rows:
        print(f"| {shape} | {what} | {adapters} | {n} | {tps:,.0f} | {'-' if ttft is None else f'{ttft:.3f}'} |")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
