"""Training throughput: stock TRL `SFTTrainer` defaults vs this project's training job, in one session.

In: a model shape (random weights of a real architecture's config) and a synthetic, tokenizer-free
chat-length token dataset (lengths log-normal, median 300 tokens, 32..1024; each sequence repeats
a random 8-token phrase, so the loss can fall). Out: a table of tokens/s, speed-up over stock,
seconds/step, tokens/step, peak GPU memory and model FLOPs utilisation, plus a JSON file.

Every variant runs in its own process: "stock" is `SFTTrainer` with `SFTConfig` defaults (only
max_steps and measurement switches set) and LoRA r=16 on all linear layers; the others are
`python -m training.train` (the product's CLI), under `accelerate launch` for several GPUs.

Commands (docs/benchmarks.md records what they printed):

    python -m bench.train_throughput gpu --out OUT            # 1 GPU: stock vs optimised, + checks
    python -m bench.train_throughput scaling --out OUT        # optimised on 1 GPU vs 2 GPUs (DDP)
    python -m bench.train_throughput verify --tokenizer DIR --out OUT [--gpus 2]   # SFT->DPO via the CLI
    python -m bench.train_throughput cpu --out OUT            # embedded-model shape, 1 thread, fp32 vs bf16

How FLOPs are counted (LoRA): per trained token, frozen matmul weights N cost 2N forward + 2N for the
input gradient (their weight gradient is never computed): 4N; LoRA weights n cost 6n; attention costs
3 x 4 x layers x (heads x head_dim) x the mean causal context (E[L(L+1)/2] / E[L] over the documents;
packed documents never attend to each other). N counts q/k/v/o/gate/up/down of every layer plus the
LM head (vocab x hidden); embeddings' lookups are free. Padding and activation recomputation are not
counted (model FLOPs, not hardware FLOPs). MFU = tokens/s x FLOPs/token / measured bf16 matmul peak.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

SHAPES: dict[str, dict[str, Any]] = {
    # Qwen/Qwen2.5-0.5B-Instruct config.json
    "qwen2.5-0.5b": dict(arch="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=True),
    # HuggingFaceTB/SmolLM2-135M-Instruct config.json (the embedded model)
    "smollm2-135m": dict(arch="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True),
    # for a quick CPU check of this script itself
    "tiny": dict(arch="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096, max_position_embeddings=4096, rope_theta=10000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=True),
}
LORA = dict(lora_r=16, lora_alpha=32, lora_dropout=0.05, lora_target_modules="all-linear")


# ---------------------------------------------------------------------------------------------- setup


def build_model(shape: str, out: Path, dtype: str = "bfloat16") -> Path:
    """Random weights of a real architecture's shape + a 3-token tokenizer (the data is pre-tokenized)."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    if (out / "config.json").is_file():
        return out
    spec = dict(SHAPES[shape])
    arch = spec.pop("arch")
    cfg_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if arch == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    cfg = cfg_cls(**spec, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    model = model_cls(cfg).to(getattr(torch, dtype))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2}, unk_token="<unk>")),
        pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def chat_lengths(n: int, seed: int, median: float = 300, sigma: float = 0.6, lo: int = 32, hi: int = 1024) -> list[int]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(math.log(median), sigma, n)), lo, hi).astype(int).tolist()


def build_dataset(out: Path, vocab: int, n: int, seed: int = 0, median: float = 300, hi: int = 1024) -> dict:
    """sft/train of `n` token sequences; returns the length statistics the FLOP count needs."""
    import numpy as np
    from datasets import Dataset

    lengths = chat_lengths(n, seed, median=median, hi=hi)
    if not (out / "sft" / "train").exists():
        rng = np.random.default_rng(seed + 1)
        rows = []
        for length in lengths:
            phrase = rng.integers(3, vocab, 8)
            rows.append({"input_ids": np.resize(phrase, length).tolist()})
        Dataset.from_list(rows).save_to_disk(str(out / "sft" / "train"))
    arr = np.array(lengths, dtype=np.float64)
    return {"rows": n, "mean_len": float(arr.mean()), "ctx_eff": float((arr * (arr + 1) / 2).mean() / arr.mean())}


def flops_per_token(shape: str, ctx_eff: float, r: int = 16) -> dict[str, float]:
    s = SHAPES[shape]
    h, i, layers, v = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    d_head = h // s["num_attention_heads"]
    kv = s["num_key_value_heads"] * d_head
    linears = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # q k v o gate up down (in, out)
    n_frozen = layers * sum(a * b for a, b in linears) + v * h
    n_lora = layers * sum(r * (a + b) for a, b in linears)
    attn = 3 * 4 * layers * h * ctx_eff
    return {"n_frozen": n_frozen, "n_lora": n_lora, "lora_aware": 4 * n_frozen + 6 * n_lora + attn,
            "six_n": 6 * (n_frozen + n_lora) + attn}


# ---------------------------------------------------------------------------------------------- variants


@dataclass
class Variant:
    name: str
    kind: str  # "stock" | "job"
    what: str
    config: dict[str, Any] = field(default_factory=dict)
    gpus: int = 1
    steps: int = 30


@dataclass
class Measured:
    name: str
    what: str
    ok: bool
    error: str = ""
    tokens_per_s: float = 0.0
    s_per_step: float = 0.0
    tokens_per_step: float = 0.0
    peak_gb: float | None = None
    first_loss: float | None = None
    last_loss: float | None = None
    steps_timed: int = 0
    wall_s: float = 0.0
    to_first_step_s: float | None = None  # process start -> first optimizer step done (imports, load, compile)
    mfu: float | None = None
    mfu_6n: float | None = None


def job_config(model: Path, steps: int, **kw: Any) -> dict[str, Any]:
    base = dict(base_model=str(model), stages=["sft"], max_steps=steps, sft_learning_rate=2e-5, evals_per_epoch=0,
                early_stopping_patience=0, warmup_ratio=0.0, logging_steps=10, progress_interval_s=0.0, **LORA)
    base.update(kw)
    return base


def run_variant(v: Variant, model: Path, data: Path, work: Path, warmup: int, timeout: float) -> Measured:
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if v.gpus == 1:  # one process seeing several GPUs would make Trainer use nn.DataParallel (TRL refuses)
        env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    if v.kind == "stock":
        cmd = [sys.executable, "-m", "bench.train_throughput", "_stock", "--model", str(model), "--data", str(data),
               "--steps", str(v.steps), "--work", str(work)]
    else:
        cfg_path = work / "cfg.json"
        cfg_path.write_text(json.dumps(v.config, indent=1))
        tail = ["--config", str(cfg_path), "--data", str(data), "--out", str(work / "out")]
        if v.gpus > 1:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(v.gpus), "--multi_gpu",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "training.train",
                   *tail]
        else:
            cmd = [sys.executable, "-m", "training.train", *tail]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr, rc = f"timed out after {timeout:.0f}s", -1
    (work / "stdout.jsonl").write_text(stdout)
    (work / "stderr.txt").write_text(stderr[-200_000:] if stderr else "")
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    m = measure(v, events, warmup)
    m.wall_s = round(time.monotonic() - t0, 1)
    if rc != 0 and m.ok:
        m.ok, m.error = False, f"exit {rc}"
    if not m.ok and not m.error:
        m.error = f"exit {rc}: " + (stderr or "").strip().splitlines()[-1][:200] if stderr else f"exit {rc}"
    return m


def measure(v: Variant, events: list[dict], warmup: int) -> Measured:
    """Steady-state rate from the progress stream: tokens and seconds between step `warmup` and the last."""
    prog = [e for e in events if e.get("event") == "progress" and e.get("tokens_seen")]
    losses = [e["loss"] for e in prog if e.get("loss") is not None]
    end = next((e for e in events if e.get("event") in ("stage_end", "stock_end")), {})
    m = Measured(name=v.name, what=v.what, ok=False, first_loss=losses[0] if losses else None,
                 last_loss=losses[-1] if losses else None, peak_gb=end.get("peak_gpu_mem_gb"))
    timed = [e for e in prog if e["step"] >= warmup]
    if len(timed) < 2 or timed[-1]["step"] == timed[0]["step"]:
        m.error = "too few steps measured"
        return m
    a, b = timed[0], timed[-1]
    dt, dsteps = b["elapsed_s"] - a["elapsed_s"], b["step"] - a["step"]
    m.tokens_per_s = round((b["tokens_seen"] - a["tokens_seen"]) / dt, 1)
    m.s_per_step = round(dt / dsteps, 4)
    m.tokens_per_step = round((b["tokens_seen"] - a["tokens_seen"]) / dsteps, 1)
    m.steps_timed, m.ok = dsteps, True
    start = next((e for e in events if e.get("event") == "start"), None)
    if start and "time" in start and "time" in prog[0]:
        m.to_first_step_s = round(prog[0]["time"] - start["time"], 1)
    return m


def stock_main(ns: argparse.Namespace) -> int:
    """One stock run: SFTTrainer + SFTConfig defaults, LoRA r=16 all-linear; prints progress JSON lines."""
    t_start = time.time()
    import torch
    from datasets import load_from_disk
    from peft import LoraConfig
    from transformers import AutoTokenizer, PrinterCallback, ProgressCallback, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    out = sys.stdout
    sys.stdout = sys.stderr

    def emit(e: dict) -> None:
        out.write(json.dumps({"time": round(time.time(), 3), **e}) + "\n")
        out.flush()

    emit({"event": "start", "time": round(t_start, 3)})

    class Timing(TrainerCallback):
        def __init__(self) -> None:
            self.t0, self.loss = time.monotonic(), None

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.loss = logs["loss"]

        def on_step_end(self, args, state, control, **kw):
            emit({"event": "progress", "step": state.global_step, "elapsed_s": time.monotonic() - self.t0,
                  "tokens_seen": state.num_input_tokens_seen, "loss": self.loss})

    cuda = torch.cuda.is_available()
    args = SFTConfig(
        output_dir=str(Path(ns.work) / "stock"), max_steps=ns.steps, report_to="none", save_strategy="no",
        include_num_input_tokens_seen="non_padding", disable_tqdm=True,  # measurement only
        **({} if cuda else {"use_cpu": True, "bf16": False}),  # SFTConfig's defaults assume a GPU (bf16)
    )
    trainer = SFTTrainer(
        model=str(ns.model), args=args, train_dataset=load_from_disk(str(Path(ns.data) / "sft" / "train")),
        processing_class=AutoTokenizer.from_pretrained(ns.model), callbacks=[Timing()],
        peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                               task_type="CAUSAL_LM"))
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.train()
    emit({"event": "stock_end", "peak_gpu_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)
          if cuda else None, "activation_checkpointing": args.activation_checkpointing,
          "batch": args.per_device_train_batch_size, "max_length": args.max_length, "optim": args.optim,
          "attn": trainer.model.config._attn_implementation})
    return 0


# ---------------------------------------------------------------------------------------------- checks


def matmul_peak_tflops() -> float:
    """bf16 8192^3 matmul rate on random data (median of 20 after 3 warm-ups)."""
    import torch

    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    times.sort()
    return 2 * n**3 / times[len(times) // 2] / 1e12


def packed_attention_check(model_dir: Path) -> dict[str, float]:
    """Packed padding-free rows (flex attention, bf16) vs each sequence alone (sdpa): relative error."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    seqs = [torch.randint(3, 50000, (n,), device="cuda") for n in (300, 1024, 77, 513)]
    out = {}
    with torch.no_grad():
        ref_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                         attn_implementation="sdpa").cuda()
        alone = torch.cat([ref_model(input_ids=s[None], use_cache=False).logits[0].float() for s in seqs])
        del ref_model
        ids = torch.cat(seqs)[None]
        pos = torch.cat([torch.arange(len(s), device="cuda") for s in seqs])[None]
        for attn in ("flex_attention", "sdpa"):
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                         attn_implementation=attn).cuda()
            packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0].float()
            out[attn] = float((packed - alone).norm() / alone.norm())
            del model
    # Without separate sequences (one long causal row) the error is large: shows the check can fail.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    with torch.no_grad():
        joined = model(input_ids=ids, use_cache=False).logits[0].float()
    out["no_boundaries(control)"] = float((joined - alone).norm() / alone.norm())
    return out


# ---------------------------------------------------------------------------------------------- modes


def table(rows: list[Measured], header: str) -> str:
    base = next((r.tokens_per_s for r in rows if r.name == "stock" and r.ok), None)
    lines = [header, f"{'variant':<22} {'tok/s':>9} {'x stock':>7} {'s/step':>7} {'tok/step':>9} {'peakGB':>7} "
                     f"{'MFU':>6} {'MFU6N':>6} {'1st step':>8} {'loss first->last':>17}  what"]
    for r in rows:
        if not r.ok:
            lines.append(f"{r.name:<22} FAILED: {r.error[:150]}")
            continue
        sp = f"{r.tokens_per_s / base:.2f}" if base else "-"
        mfu = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "-"
        mfu6 = f"{100 * r.mfu_6n:.1f}%" if r.mfu_6n is not None else "-"
        loss = f"{r.first_loss:.2f}->{r.last_loss:.2f}" if r.first_loss is not None else "-"
        pk = f"{r.peak_gb:.1f}" if r.peak_gb is not None else "-"
        first = f"{r.to_first_step_s:.0f}s" if r.to_first_step_s is not None else "-"
        lines.append(f"{r.name:<22} {r.tokens_per_s:>9.0f} {sp:>7} {r.s_per_step:>7.3f} {r.tokens_per_step:>9.0f} "
                     f"{pk:>7} {mfu:>6} {mfu6:>6} {first:>8} {loss:>17}  {r.what}")
    return "\n".join(lines)


def gpu_variants(model: Path, steps: int, only: list[str] | None) -> list[Variant]:
    opt = dict(device="cuda", packing=True, max_length=4096, dataloader_workers=2)  # attention: auto (flex)
    vs = [  # most important first: a run that hits its time budget skips the tail
        Variant("stock", "stock", "SFTTrainer defaults: bs 8, pad to longest, act. ckpt, sdpa", steps=steps),
        Variant("opt-32k", "job", "job: packed padding-free 8x4096, flex, liger, no ckpt",
                job_config(model, steps, batch_size=8, liger=True, **opt), steps=steps),
        Variant("opt-16k", "job", "job: packed padding-free 4x4096, flex, liger, no ckpt",
                job_config(model, steps, batch_size=4, liger=True, **opt), steps=steps),
        Variant("opt-32k-noliger", "job", "opt-32k without liger kernels",
                job_config(model, steps, batch_size=8, liger=False, **opt), steps=steps),
        Variant("stock-nockpt", "job", "job, stock batch (8 rows, padded), no ckpt, no liger",
                job_config(model, steps, device="cuda", packing=False, batch_size=8, max_length=1024, liger=False,
                           attn_implementation="sdpa"), steps=steps),
        Variant("opt-32k-compile", "job", "opt-32k + torch.compile",
                job_config(model, steps, batch_size=8, liger=True, torch_compile=True, **opt), steps=steps),
    ]
    return [v for v in vs if not only or v.name in only]


def run_variants(variants: list[Variant], model: Path, data: Path, out: Path, warmup: int, deadline: float,
                 per_variant_timeout: float, flops: dict | None, peak: float | None) -> list[Measured]:
    results = []
    for v in variants:
        left = deadline - time.monotonic()
        if left < 45:
            results.append(Measured(v.name, v.what, ok=False, error="skipped: out of time"))
            continue
        m = run_variant(v, model, data, out / v.name, warmup, min(per_variant_timeout, left - 15))
        if m.ok and flops and peak:
            m.mfu = m.tokens_per_s * flops["lora_aware"] / (peak * 1e12)
            m.mfu_6n = m.tokens_per_s * flops["six_n"] / (peak * 1e12)
        results.append(m)
        print(json.dumps(asdict(m)), flush=True)
    return results


def gpu_main(ns: argparse.Namespace) -> int:
    import torch

    t_start = time.monotonic()
    deadline = t_start + ns.budget_s
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(ns.shape, Path(ns.work) / f"model-{ns.shape}")
    stats = build_dataset(Path(ns.work) / "data", SHAPES[ns.shape]["vocab_size"], ns.rows)
    flops = flops_per_token(ns.shape, stats["ctx_eff"])
    info: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
                            "torch": torch.__version__, "shape": ns.shape, "data": stats, "flops": flops,
                            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    info["versions"] = _versions()
    info["peak_tflops"] = round(matmul_peak_tflops(), 1)
    if ns.check:
        info["packed_attention_rel_err"] = packed_attention_check(model)
    print(json.dumps(info), flush=True)
    results = run_variants(gpu_variants(model, ns.steps, ns.variants), model, Path(ns.work) / "data", out,
                           ns.warmup, deadline, ns.variant_timeout, flops, info["peak_tflops"])
    (out / "train_throughput.json").write_text(json.dumps({"info": info, "results": [asdict(r) for r in results]},
                                                          indent=1))
    print(table(results, f"\n{info['device']} x1, {ns.shape}, LoRA r=16 all-linear, chat-length data "
                         f"(mean {stats['mean_len']:.0f} tok), {ns.steps} steps, timed from step {ns.warmup}; "
                         f"bf16 peak {info['peak_tflops']} TFLOP/s"))
    return 0


def scaling_main(ns: argparse.Namespace) -> int:
    import torch

    deadline = time.monotonic() + ns.budget_s
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(ns.shape, Path(ns.work) / f"model-{ns.shape}")
    stats = build_dataset(Path(ns.work) / "data", SHAPES[ns.shape]["vocab_size"], ns.rows)
    flops = flops_per_token(ns.shape, stats["ctx_eff"])
    n = torch.cuda.device_count()
    info = {"device": torch.cuda.get_device_name(0), "gpus": n, "peak_tflops": round(matmul_peak_tflops(), 1),
            "data": stats, "versions": _versions(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    print(json.dumps(info), flush=True)
    opt = job_config(model, ns.steps, device="cuda", packing=True, max_length=4096, batch_size=8, liger=ns.liger,
                     dataloader_workers=2)
    variants = [Variant("opt-32k-1gpu", "job", "optimised job, 1 GPU", opt, gpus=1, steps=ns.steps)]
    variants += [Variant(f"opt-32k-{g}gpu", "job", f"optimised job, {g} GPUs DDP (accelerate launch)", opt,
                         gpus=g, steps=ns.steps) for g in range(2, n + 1)]
    if "stock" in (ns.variants or []):
        variants.insert(0, Variant("stock", "stock", "SFTTrainer defaults, 1 GPU", steps=ns.steps))
    results = run_variants(variants, model, Path(ns.work) / "data", out, ns.warmup, deadline, ns.variant_timeout,
                           flops, info["peak_tflops"])
    one = next((r for r in results if r.name == "opt-32k-1gpu" and r.ok), None)
    for r in results:
        if one and r.ok and r.name.endswith("gpu"):
            gpus = int(r.name.split("-")[-1].removesuffix("gpu"))
            r.what += f"; {r.tokens_per_s / one.tokens_per_s:.2f}x one GPU"
            if r.mfu is not None:
                r.mfu /= gpus  # per-GPU utilisation
                r.mfu_6n = r.mfu_6n / gpus if r.mfu_6n is not None else None
    (out / "train_scaling.json").write_text(json.dumps({"info": info, "results": [asdict(r) for r in results]},
                                                       indent=1))
    print(table(results, f"\n{info['device']} x{n}, {ns.shape}, scaling (MFU per GPU)"))
    return 0


def verify_main(ns: argparse.Namespace) -> int:
    """SFT then DPO on conversational data through the CLI (optionally DDP): proves the GPU path end to end."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    work = Path(ns.work) / "verify"
    tok = AutoTokenizer.from_pretrained(ns.tokenizer)
    spec = dict(SHAPES[ns.shape])
    spec.pop("arch")
    spec["vocab_size"] = len(tok)
    model_dir = work / "smollm2-shape"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**spec, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                 bos_token_id=tok.bos_token_id)).to(torch.bfloat16).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    sys_msg = {"role": "system", "content": "Answer briefly."}
    facts = [(f"item {i}", f"value {i * 7 % 13}") for i in range(64)]
    sft = [{"messages": [sys_msg, {"role": "user", "content": f"What is {q}?"},
                         {"role": "assistant", "content": f"{q} is {a}."}]} for q, a in facts]
    dpo = [{"prompt": [sys_msg, {"role": "user", "content": f"What is {q}?"}],
            "chosen": [{"role": "assistant", "content": f"{q} is {a}."}],
            "rejected": [{"role": "assistant", "content": "No idea."}]} for q, a in facts]
    data = work / "data"
    Dataset.from_list(sft[:56]).save_to_disk(str(data / "sft" / "train"))
    Dataset.from_list(sft[56:]).save_to_disk(str(data / "sft" / "validation"))
    Dataset.from_list(dpo[:56]).save_to_disk(str(data / "dpo" / "train"))
    Dataset.from_list(dpo[56:]).save_to_disk(str(data / "dpo" / "validation"))
    cfg = dict(base_model=str(model_dir), stages=["sft", "dpo"], max_steps=8, batch_size=4, evals_per_epoch=2,
               sft_learning_rate=1e-3, dpo_learning_rate=1e-4, device=ns.device, logging_steps=2)
    v = Variant(f"verify-{ns.gpus}gpu", "job", "SFT->DPO conversational via CLI", cfg, gpus=ns.gpus, steps=8)
    m = run_variant(v, model_dir, data, Path(ns.out) / v.name, warmup=1, timeout=ns.variant_timeout)
    events = [json.loads(x) for x in (Path(ns.out) / v.name / "stdout.jsonl").read_text().splitlines() if x]
    done = events[-1] if events else {}
    stages = [(s["stage"], s["status"], s["steps"], s["first_loss"], s["last_loss"], s["eval_losses"])
              for s in done.get("result", {}).get("stages", [])]
    adapter = Path(done.get("adapter_dir") or "/nonexistent") / "adapter_model.safetensors"
    print(json.dumps({"verify": v.name, "done": done.get("status"), "error": m.error,
                      "runtime": done.get("result", {}).get("runtime"), "stages": stages,
                      "adapter_saved": adapter.is_file()}), flush=True)
    return 0 if done.get("status") == "succeeded" and adapter.is_file() else 1


def cpu_main(ns: argparse.Namespace) -> int:
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    model = Path(ns.model) if ns.model else build_model(ns.shape, Path(ns.work) / f"model-{ns.shape}-fp32",
                                                        dtype="float32")
    stats = build_dataset(Path(ns.work) / "data-cpu", SHAPES[ns.shape]["vocab_size"], 200, median=ns.median,
                          hi=512)
    # micro_batch_size=4: whole padded batches per pass (the job's CPU default is one row per pass,
    # the "fp32-rows" variant).
    common = dict(device="cpu", threads=1, batch_size=4, micro_batch_size=4, max_length=512, logging_steps=1)
    variants = [
        Variant("fp32-rows", "job", "job, fp32, one row per pass (the CPU default)",
                job_config(model, ns.steps, dtype="float32", **{**common, "micro_batch_size": 1}), steps=ns.steps),
        Variant("fp32", "job", "job, fp32, padded batches", job_config(model, ns.steps, dtype="float32", **common),
                steps=ns.steps),
        Variant("bf16", "job", "job, bf16 weights + autocast, padded",
                job_config(model, ns.steps, dtype="bfloat16", **common), steps=ns.steps),
        Variant("fp32-packed", "job", "job, fp32, packed padding-free (sdpa)",
                job_config(model, ns.steps, dtype="float32", packing=True, **common), steps=ns.steps),
    ]
    if ns.stock:
        variants.insert(0, Variant("stock", "stock", "SFTTrainer defaults on CPU (fp32)", steps=ns.steps))
    variants = [v for v in variants if not ns.variants or v.name in ns.variants]
    results = run_variants(variants, model, Path(ns.work) / "data-cpu", out, ns.warmup,
                           time.monotonic() + ns.budget_s, ns.variant_timeout, None, None)
    lines = [f"\nCPU ({os.cpu_count()} cores), 1 torch thread, {ns.shape}"
             f"{' (real weights)' if ns.model else ''}, LoRA r=16, batch 4, chat lengths median {ns.median:.0f} "
             f"(mean {stats['mean_len']:.0f}), {ns.steps} steps, timed from step {ns.warmup}",
             f"{'variant':<14} {'steps/s':>8} {'tok/s':>8} {'s/step':>7}  loss first->last"]
    for r in results:
        if r.ok:
            loss = f"{r.first_loss:.2f}->{r.last_loss:.2f}" if r.first_loss is not None else "-"
            lines.append(f"{r.name:<14} {1 / r.s_per_step:>8.3f} {r.tokens_per_s:>8.0f} {r.s_per_step:>7.2f}  "
                         f"{loss}  {r.what}")
        else:
            lines.append(f"{r.name:<14} FAILED: {r.error[:200]}")
    (out / "train_cpu.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    print("\n".join(lines))
    return 0


def cpu_ab_main(ns: argparse.Namespace) -> int:
    """fp32 vs bf16 LoRA steps on CPU, interleaved in one process so both see the same machine load.

    Mirrors the job's two CPU modes: fp32 weights; bf16 weights with bf16 autocast (LoRA weights fp32).
    One optimizer step = forward + backward + AdamW on the same batch of 4 chat-length sequences.
    """
    import statistics

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model_dir = Path(ns.model) if ns.model else build_model(ns.shape, Path(ns.work) / f"model-{ns.shape}-fp32",
                                                            dtype="float32")
    lengths = chat_lengths(4, seed=1, median=ns.median, hi=512)  # [197, 262, 195, 73]
    g = torch.Generator().manual_seed(0)
    batch = torch.full((4, max(lengths)), 0, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, n in enumerate(lengths):
        batch[row, :n] = torch.randint(3, SHAPES[ns.shape]["vocab_size"], (n,), generator=g)
        mask[row, :n] = 1
    labels = batch.masked_fill(mask == 0, -100)
    runs = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        runs[name] = (model, opt, dtype)

    def step(name: str) -> float:
        model, opt, dtype = runs[name]
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(input_ids=batch, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    for name in runs:  # warm-up
        print(f"warm-up {name}: {step(name):.1f} s", file=sys.stderr, flush=True)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(ns.steps):
        for name in runs:
            times[name].append(step(name))
            # each step as it ends: on a CPU without native bf16 one bf16 step can take minutes
            print(f"round {i + 1}/{ns.steps} {name}: {times[name][-1]:.1f} s", file=sys.stderr, flush=True)
    tokens = int(mask.sum())
    print(f"\nCPU A/B ({os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}), 1 thread, {ns.shape}, LoRA r=16, "
          f"batch 4 x {lengths} = {tokens} tokens, {ns.steps} interleaved rounds")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<5} median {med:6.2f} s/step  {1 / med:6.3f} steps/s  {tokens / med:7.1f} tok/s  "
              f"(all: {' '.join(f'{t:.1f}' for t in ts)})")
    return 0


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for p in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "liger-kernel", "triton"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = "missing"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    for name in ("gpu", "scaling", "cpu", "cpu-ab", "verify"):
        s = sub.add_parser(name)
        s.add_argument("--out", required=True)
        s.add_argument("--work", default="/tmp/train_throughput")
        s.add_argument("--shape", default="smollm2-135m" if name in ("cpu", "cpu-ab", "verify") else "qwen2.5-0.5b",
                       choices=SHAPES)
        s.add_argument("--device", default="cuda", help="verify: where the job trains")
        s.add_argument("--steps", type=int, default=8 if name == "cpu" else 30)
        s.add_argument("--warmup", type=int, default=2 if name == "cpu" else 8)
        s.add_argument("--rows", type=int, default=6000)
        s.add_argument("--variants", nargs="*", default=None)
        s.add_argument("--budget-s", type=float, default=520)
        s.add_argument("--variant-timeout", type=float, default=240)
        s.add_argument("--check", action=argparse.BooleanOptionalAction, default=True)
        s.add_argument("--liger", action=argparse.BooleanOptionalAction, default=True)
        s.add_argument("--gpus", type=int, default=1)
        s.add_argument("--tokenizer", default=None)
        s.add_argument("--model", default=None, help="cpu: a real model folder instead of random weights")
        s.add_argument("--median", type=float, default=160)
        s.add_argument("--stock", action="store_true", help="cpu: also run the stock SFTTrainer")
    st = sub.add_parser("_stock")
    for a in ("--model", "--data", "--work"):
        st.add_argument(a, required=True)
    st.add_argument("--steps", type=int, required=True)
    ns = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return {"gpu": gpu_main, "scaling": scaling_main, "cpu": cpu_main, "cpu-ab": cpu_ab_main, "verify": verify_main,
            "_stock": stock_main}[ns.mode](ns)


if __name__ == "__main__":
    sys.exit(main())
