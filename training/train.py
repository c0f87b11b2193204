"""Train a PEFT adapter with TRL: SFT, then DPO (or KTO), on CPU, one GPU or several (DDP).

In: a `TrainConfig`, a dataset snapshot folder, an output folder. The snapshot holds HF `datasets`
`save_to_disk` folders per kind and split: ``sft/train``, ``sft/validation``, ``dpo/train``,
``dpo/validation``, ``kto/train``, ``kto/validation`` (a per-kind ``DatasetDict`` saved as ``sft/``
has exactly these subfolders; its ``test`` split is never read). TRL formats: conversational ``messages``;
``prompt``/``chosen``/``rejected`` message lists; ``prompt``/``completion``/``label``; pre-tokenized
``input_ids`` also work. A ``manifest.json`` beside them is copied into the adapter.

Out: ``<out>/adapter/`` (PEFT adapter + ``train_config.json`` + ``training_result.json`` +
``dataset_manifest.json``), written to a temporary folder and renamed only when the whole job
succeeded, so a crash, a kill or a cancel never leaves a half adapter. The base weights are never
changed. The CLI also keeps ``<out>/status.json`` (running / succeeded / failed / cancelled).

Run it as its own process so that a crash or out-of-memory never takes the server down::

    python -m training.train --config cfg.json --data DATASET_DIR --out OUT_DIR [--cancel-file F]
    accelerate launch --num_processes 2 -m training.train --config cfg.json --data D --out O   # DDP

It prints one JSON object per line on stdout (``event`` = start / stage_start / progress / eval /
stage_end / done / error; progress carries step, max_steps, loss, eval_loss, epoch, eta_s,
tokens_seen, tokens_per_s), stops at the next optimizer step on SIGTERM/SIGINT or when the cancel
file appears, and exits 0 (succeeded), 1 (failed), 2 (bad config or data) or 3 (cancelled).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.train_config import TrainConfig

if TYPE_CHECKING:
    from datasets import Dataset

Progress = Callable[[dict[str, Any]], None]
ShouldStop = Callable[[], bool]

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_CANCELLED = 0, 1, 2, 3
ADAPTER_DIRNAME = "adapter"
STATUS_FILE = "status.json"

# Columns TRL reads per stage; anything else in a snapshot (provenance, ids) is dropped before training.
_STAGE_COLUMNS = {
    "sft": {"messages", "prompt", "completion", "text", "input_ids", "completion_mask", "assistant_masks",
            "tools", "chat_template_kwargs"},
    "dpo": {"prompt", "chosen", "rejected", "tools", "chat_template_kwargs"},
    "kto": {"prompt", "completion", "label", "tools", "chat_template_kwargs"},
}
_STAGE_REQUIRED = {
    "sft": [{"messages"}, {"prompt", "completion"}, {"text"}, {"input_ids"}],
    "dpo": [{"chosen", "rejected"}],
    "kto": [{"prompt", "completion", "label"}],
}


class TrainingDataError(ValueError):
    """The dataset snapshot is missing, unreadable or not in a TRL format."""


# ---------------------------------------------------------------------------------------------- results


@dataclass
class RuntimeChoice:
    """What the "auto" settings resolved to on this machine, recorded with every result."""

    device: str
    dtype: str
    attn_implementation: str  # padded batches (DPO, KTO, unpacked SFT)
    attn_packed: str  # packed padding-free SFT rows
    packing: bool
    pad_to_multiple_of: int | None
    micro_batch_size: int  # rows per forward pass (KTO: at least 2); batch_size rows per step by accumulating
    liger: bool
    world_size: int
    threads: int | None
    torch_compile: bool


@dataclass
class StageResult:
    stage: str
    status: str  # "done" | "stopped_early" | "skipped" | "cancelled"
    reason: str = ""
    train_rows: int = 0
    validation_rows: int = 0
    steps: int = 0
    epoch: float = 0.0
    first_loss: float | None = None
    last_loss: float | None = None
    best_eval_loss: float | None = None
    eval_losses: list[float] = field(default_factory=list)
    restored_best: bool = False
    tokens_seen: int = 0
    seconds: float = 0.0
    tokens_per_s: float | None = None
    peak_gpu_mem_gb: float | None = None
    peak_rss_gib: float | None = None  # the training process's resident high-water mark at the stage's end


@dataclass
class TrainResult:
    status: str  # "succeeded" | "cancelled"
    adapter_dir: Path | None
    stages: list[StageResult]
    runtime: RuntimeChoice
    seconds: float
    trainable_params: int = 0
    total_params: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["adapter_dir"] = str(self.adapter_dir) if self.adapter_dir else None
        return d


# ---------------------------------------------------------------------------------------------- runtime


def resolve_runtime(config: TrainConfig) -> RuntimeChoice:
    """Turn the config's "auto" fields into concrete choices for this machine."""
    import torch
    from accelerate import PartialState

    cuda = torch.cuda.is_available()
    if config.device == "cuda" and not cuda:
        raise ValueError("device='cuda' but no CUDA device is visible")
    device = "cuda" if (config.device == "cuda" or (config.device == "auto" and cuda)) else "cpu"
    if config.dtype != "auto":
        dtype = config.dtype
    elif device == "cuda":
        dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    else:
        # On a CPU with avx512_bf16 a bf16 LoRA step is 1.8x faster than fp32
        # (docs/benchmarks.md, "Training job"). Without native bf16 instructions it is emulated: fp32.
        dtype = "bfloat16" if cpu_has_native_bf16() else "float32"
    if config.peft_method == "qlora":
        if device != "cuda":
            raise ValueError("peft_method='qlora' needs a CUDA device (4-bit bitsandbytes kernels)")
        if not _importable("bitsandbytes"):
            raise ValueError("peft_method='qlora' needs the bitsandbytes package: pip install bitsandbytes")
    # Rows whose prompt is cached without gradients are computed one by one, so they are never packed.
    packing = config.packing if config.packing is not None else (device == "cuda" and config.prompt_gradients)
    attn = attn_packed = config.attn_implementation
    if attn == "auto":
        # Padding-free packed rows need attention that keeps the sequences apart without a dense
        # (tokens x tokens) mask: flex attention's block-sparse mask does that on CUDA. Padded batches
        # take sdpa (flash / memory-efficient kernels, no compilation).
        attn, attn_packed = "sdpa", ("flex_attention" if device == "cuda" else "sdpa")
    pad_multiple = config.pad_to_multiple_of
    if pad_multiple is None and packing and device == "cuda":
        pad_multiple = config.max_length  # one batch shape: compiled kernels never see a new length
    liger = config.liger if config.liger is not None else (device == "cuda" and _importable("liger_kernel"))
    if liger and device != "cuda":
        raise ValueError("liger=true needs a CUDA device (Triton kernels)")
    if liger and not _importable("liger_kernel"):
        raise ValueError("liger=true but the liger-kernel package is not installed: pip install liger-kernel")
    # On CPU a batch is computed no faster per token than its rows one by one, but it is padded to its
    # longest row and keeps every row's activations at once: one row per pass (docs/benchmarks.md).
    micro = config.micro_batch_size or (1 if device == "cpu" else config.batch_size)
    state = PartialState()
    return RuntimeChoice(
        device=device, dtype=dtype, attn_implementation=attn, attn_packed=attn_packed, packing=packing,
        pad_to_multiple_of=pad_multiple, micro_batch_size=micro, liger=bool(liger),
        world_size=state.num_processes, threads=config.threads if device == "cpu" else None,
        torch_compile=config.torch_compile,
    )


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 dot-product instructions (x86 AVX512-BF16 / AMX-BF16, Arm BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:  # not Linux: no cheap way to know, so take the safe choice
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16", "bf16"))


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ---------------------------------------------------------------------------------------------- data


@dataclass
class StageData:
    train: Dataset
    validation: Dataset | None


def load_stage_data(dataset_dir: Path, stage: str) -> StageData | None:
    """The stage's train/validation splits, or None when the snapshot has no rows for it."""
    from datasets import load_from_disk

    train_dir = dataset_dir / stage / "train"
    if not train_dir.exists():
        return None
    splits = {}
    for split in ("train", "validation"):
        path = dataset_dir / stage / split
        if not path.exists():
            continue
        try:
            ds = load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001 - re-raised with the path, the cause chained
            raise TrainingDataError(f"cannot read {stage}/{split} in {dataset_dir}: {e}") from e
        if not hasattr(ds, "column_names") or isinstance(ds.column_names, dict):
            raise TrainingDataError(f"{path} is a DatasetDict; expected one split saved with save_to_disk")
        splits[split] = _select_columns(ds, stage, path)
    if len(splits["train"]) == 0:
        return None
    val = splits.get("validation")
    return StageData(train=splits["train"], validation=val if val is not None and len(val) else None)


def _select_columns(ds: Dataset, stage: str, path: Path) -> Dataset:
    cols = set(ds.column_names)
    if not any(req <= cols for req in _STAGE_REQUIRED[stage]):
        wanted = " or ".join("+".join(sorted(r)) for r in _STAGE_REQUIRED[stage])
        raise TrainingDataError(f"{path}: columns {sorted(cols)} are not a {stage} dataset (need {wanted})")
    extra = sorted(cols - _STAGE_COLUMNS[stage])
    return ds.remove_columns(extra) if extra else ds


# ---------------------------------------------------------------------------------------------- model


def load_model_and_tokenizer(config: TrainConfig, rt: RuntimeChoice) -> tuple[Any, Any]:
    """The base model (frozen, in the run's dtype) wrapped in a trainable PEFT adapter, and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.chat_template import training_template_for

    base = Path(config.base_model)
    if not (base / "config.json").is_file():
        raise ValueError(f"base_model {base} is not a model folder (no config.json)")
    tok = AutoTokenizer.from_pretrained(base)
    if config.chat_template:
        tok.chat_template = Path(config.chat_template).read_text(encoding="utf-8")
    elif (template := training_template_for(tok)) is not None:
        tok.chat_template = template
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    kwargs: dict[str, Any] = {"dtype": getattr(torch, rt.dtype), "attn_implementation": rt.attn_implementation}
    if config.peft_method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    if config.peft_method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.activation_checkpointing)
    return _wrap_peft(model, config), tok


def _wrap_peft(model: Any, config: TrainConfig) -> Any:
    from peft import LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, PromptTuningInit, get_peft_model

    wanted = {"lora": "LORA", "qlora": "LORA", "prompt_tuning": "PROMPT_TUNING",
              "prefix_tuning": "PREFIX_TUNING"}[config.peft_method]
    if config.init_adapter:
        path = Path(config.init_adapter)
        if not (path / "adapter_config.json").is_file():
            raise ValueError(f"init_adapter {path} is not a PEFT adapter folder (no adapter_config.json)")
        pm = PeftModel.from_pretrained(model, path, is_trainable=True)  # is_trainable: PEFT loads frozen otherwise
        got = pm.peft_config["default"].peft_type.value
        if got != wanted:
            raise ValueError(f"init_adapter {path} is a {got} adapter but peft_method={config.peft_method!r}")
        if wanted == "LORA":
            _set_lora_dropout(pm, config.lora_dropout)  # the job's, not the one the adapter was trained with
        return _train_last_layers(pm, config.lora_layers)
    if wanted == "LORA":
        target = config.lora_target_modules
        peft_cfg = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                              target_modules=target, task_type="CAUSAL_LM")
    elif wanted == "PROMPT_TUNING":
        peft_cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=config.num_virtual_tokens,
                                      prompt_tuning_init=PromptTuningInit.RANDOM)
    else:
        peft_cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=config.num_virtual_tokens)
    pm = get_peft_model(model, peft_cfg)
    return _train_last_layers(pm, config.lora_layers) if wanted == "LORA" else pm


_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


def _set_lora_dropout(pm: Any, p: float) -> None:
    """Every LoRA module's input dropout set to `p` (0: none), and the saved config saying so."""
    import torch

    for module in pm.modules():
        drop = getattr(module, "lora_dropout", None)
        if isinstance(drop, torch.nn.ModuleDict):
            for name in list(drop.keys()):
                drop[name] = torch.nn.Dropout(p) if p > 0 else torch.nn.Identity()
    for cfg in pm.peft_config.values():
        cfg.lora_dropout = p


def _train_last_layers(pm: Any, n: int | None) -> Any:
    """Freeze the LoRA weights below the last `n` decoder layers (`TrainConfig.lora_layers`). Autograd then
    records nothing below the lowest trained layer, so the backward pass stops there."""
    if n is None:
        return pm
    layers = {int(m.group(1)) for name, _ in pm.named_parameters() if (m := _LAYER_RE.search(name))}
    if not layers:
        raise ValueError("lora_layers: the model's parameters name no numbered decoder layers")
    first = max(layers) + 1 - n
    for name, param in pm.named_parameters():
        if "lora_" in name and (m := _LAYER_RE.search(name)) and int(m.group(1)) < first:
            param.requires_grad = False
    return pm


def count_params(model: Any) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


# ---------------------------------------------------------------------------------------------- callbacks


class _Cancelled(Exception):
    pass


def _make_callbacks(stage: str, config: TrainConfig, progress: Progress | None, should_stop: ShouldStop | None,
                    model: Any) -> tuple[Any, Any]:
    """Two TrainerCallbacks: progress/cancel reporting and early stopping with best-weights restore."""
    from transformers import TrainerCallback

    class JobCallback(TrainerCallback):
        """Streams progress (throttled), records losses, and stops at the next step when asked to."""

        def __init__(self) -> None:
            self.cancelled = False
            self.losses: list[float] = []
            self.eval_losses: list[float] = []
            self.t0 = time.monotonic()
            self.t_first: float | None = None
            self.tokens_first = 0
            self.last_emit = 0.0
            self.last_loss: float | None = None
            self.last_eval_step = -1

        def _emit(self, state: Any, event: str, **extra: Any) -> None:
            if progress is None or not state.is_world_process_zero:
                return
            now = time.monotonic()
            step, max_steps = state.global_step, state.max_steps
            eta = tps = None
            if self.t_first is not None and step > 1:
                per_step = (now - self.t_first) / (step - 1)
                eta = round(per_step * max(0, max_steps - step), 1)
                if state.num_input_tokens_seen:
                    tps = (state.num_input_tokens_seen - self.tokens_first) / max(now - self.t_first, 1e-9)
            progress({
                "event": event, "stage": stage, "step": step, "max_steps": max_steps,
                "epoch": round(state.epoch or 0.0, 4), "loss": self.last_loss,
                "eval_loss": self.eval_losses[-1] if self.eval_losses else None, "eta_s": eta,
                "elapsed_s": round(now - self.t0, 3), "tokens_seen": int(state.num_input_tokens_seen or 0),
                "tokens_per_s": round(tps, 1) if tps is not None else None, **extra,
            })
            self.last_emit = now

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.t_first is None:  # the first step carries one-off costs (allocator, compile)
                self.t_first = time.monotonic()
                self.tokens_first = int(state.num_input_tokens_seen or 0)
            if _stop_requested(should_stop, args):
                self.cancelled = True
                control.should_training_stop = True
            if state.global_step % args.logging_steps and self._due(state):
                self._emit(state, "progress")  # steps without a loss log still move the bar and the ETA

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                self.last_loss = float(logs["loss"])
                self.losses.append(self.last_loss)
                if self._due(state):
                    self._emit(state, "progress", learning_rate=logs.get("learning_rate"))

        def _due(self, state: Any) -> bool:
            first_or_last = state.global_step in (1, state.max_steps)
            return first_or_last or time.monotonic() - self.last_emit >= config.progress_interval_s

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kw: Any) -> None:
            if metrics and "eval_loss" in metrics:
                self.eval_losses.append(float(metrics["eval_loss"]))
                self.last_eval_step = state.global_step
                self._emit(state, "eval")

    class EarlyStopping(TrainerCallback):
        """Stops after `patience` evaluations without a better validation loss; keeps the best weights.

        Keeps a CPU copy of the trainable (adapter) tensors at the best evaluation instead of writing
        checkpoints: adapters are small and this needs no disk or `load_best_model_at_end` plumbing.
        """

        def __init__(self) -> None:
            self.best: float | None = None
            self.best_state: dict[str, Any] | None = None
            self.bad = 0
            self.stopped_early = False

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kw: Any) -> None:
            loss = (metrics or {}).get("eval_loss")
            if loss is None or not math.isfinite(loss):
                return
            if self.best is None or loss < self.best - config.early_stopping_min_delta:
                self.best, self.bad = loss, 0
                if config.restore_best:
                    self.best_state = {n: p.detach().to("cpu", copy=True)
                                       for n, p in model.named_parameters() if p.requires_grad}
            else:
                self.bad += 1
                if config.early_stopping_patience and self.bad >= config.early_stopping_patience:
                    self.stopped_early = True
                    control.should_training_stop = True

        def restore(self) -> bool:
            if self.best_state is None:
                return False
            import torch

            params = dict(model.named_parameters())
            with torch.no_grad():
                for n, saved in self.best_state.items():
                    params[n].copy_(saved.to(params[n].device))
            return True

    return JobCallback(), EarlyStopping()


def _stop_requested(should_stop: ShouldStop | None, args: Any) -> bool:
    """True on every rank as soon as any rank was asked to stop (so DDP ranks stop at the same step)."""
    local = bool(should_stop and should_stop())
    if getattr(args, "world_size", 1) <= 1:
        return local
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1.0 if local else 0.0], device=args.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


# ---------------------------------------------------------------------------------------------- trainers


def _common_args(config: TrainConfig, rt: RuntimeChoice, stage: str, work: Path, data: StageData) -> dict:
    lr = config.sft_learning_rate if stage == "sft" else config.dpo_learning_rate
    epochs = config.sft_epochs if stage == "sft" else config.dpo_epochs
    if stage == "sft" and config.sft_row_budget and len(data.train):
        epochs = min(epochs, max(1.0, config.sft_row_budget / len(data.train)))
    has_eval = data.validation is not None and config.evals_per_epoch > 0
    micro = rt.micro_batch_size
    if stage == "kto" and micro < 2 <= config.batch_size and config.micro_batch_size is None:
        # KTO's KL term pairs each row with another row of the same forward pass.
        micro = 2 if config.batch_size % 2 == 0 else config.batch_size
    eval_rows = config.eval_batch_size if micro >= config.batch_size else min(config.eval_batch_size, micro)
    args: dict[str, Any] = dict(
        output_dir=str(work / stage), use_cpu=rt.device == "cpu", bf16=rt.dtype == "bfloat16", fp16=False,
        activation_checkpointing=config.activation_checkpointing,  # gradient_checkpointing is the deprecated alias
        learning_rate=lr, num_train_epochs=epochs, max_steps=config.max_steps,
        per_device_train_batch_size=micro, per_device_eval_batch_size=eval_rows,
        gradient_accumulation_steps=config.grad_accum * (config.batch_size // micro),
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio, weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm,
        max_length=config.max_length, seed=config.seed, data_seed=config.seed,
        logging_steps=config.logging_steps, logging_strategy="steps", save_strategy="no", report_to="none",
        disable_tqdm=True, log_level="warning", include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=config.dataloader_workers, dataloader_pin_memory=rt.device == "cuda",
        torch_compile=rt.torch_compile, use_liger_kernel=rt.liger,
        # Every adapter parameter takes part in each step; finding unused ones costs a graph walk per step.
        ddp_find_unused_parameters=False,
        eval_strategy="steps" if has_eval else "no",
    )
    if has_eval:
        # A ratio of the stage's total steps, so it holds for packed rows whose count is only known later.
        total_evals = max(1, round(config.evals_per_epoch * (epochs if config.max_steps < 0 else 1)))
        if total_evals > 1:
            args["eval_steps"] = 1.0 / total_evals
        else:
            args["eval_strategy"] = "no"  # the one evaluation happens after training (see _run_stage)
    if rt.liger:
        args["liger_kernel_config"] = {"fused_linear_cross_entropy": False}  # TRL fuses the LM head itself
    return args


def _build_trainer(stage: str, model: Any, tok: Any, config: TrainConfig, rt: RuntimeChoice, work: Path,
                   data: StageData, callbacks: list[Any]) -> Any:
    import warnings

    common = _common_args(config, rt, stage, work, data)
    # TRL deprecates use_liger_kernel in favour of hub kernels, which need network access we never have.
    warnings.filterwarnings("ignore", message=".*use_liger_kernel=True.*deprecated.*", category=FutureWarning)
    if stage == "sft":
        from trl import SFTConfig

        conversational = "messages" in data.train.column_names
        args = SFTConfig(**common, packing=rt.packing, pad_to_multiple_of=rt.pad_to_multiple_of if rt.packing
                         else None, assistant_only_loss=config.assistant_only_loss and conversational)
        return _sft_trainer_class(config.prompt_gradients)(
            model=model, args=args, train_dataset=data.train, eval_dataset=data.validation, processing_class=tok,
            callbacks=callbacks)
    if stage == "dpo":
        from trl import DPOConfig, DPOTrainer

        losses = {"loss_type": [config.dpo_loss_type]}
        if config.dpo_sft_weight > 0:
            losses = {"loss_type": [config.dpo_loss_type, "sft"], "loss_weights": [1.0, config.dpo_sft_weight]}
        args = DPOConfig(**common, beta=config.dpo_beta, **losses)
        return DPOTrainer(model=model, ref_model=None, args=args, train_dataset=data.train,
                          eval_dataset=data.validation, processing_class=tok, callbacks=callbacks)
    from trl import KTOConfig, KTOTrainer

    args = KTOConfig(**common, beta=config.dpo_beta)
    return KTOTrainer(model=model, ref_model=None, args=args, train_dataset=data.train,
                      eval_dataset=data.validation, processing_class=tok, callbacks=callbacks)


def _sft_trainer_class(prompt_gradients: bool) -> Any:
    from trl import SFTTrainer

    if prompt_gradients:
        return SFTTrainer

    class CachedPromptSFTTrainer(SFTTrainer):
        """SFT whose training loss reads each row's prompt without gradients (TrainConfig.prompt_gradients)."""

        def compute_loss(self, model: Any, inputs: dict, return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            if not model.training or return_outputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return cached_prompt_loss(model, inputs, num_items_in_batch)

    return CachedPromptSFTTrainer


def cached_prompt_loss(model: Any, inputs: dict, num_items_in_batch: Any = None) -> Any:
    """Token-summed cross-entropy of a batch's trained tokens, divided by `num_items_in_batch` (the trained
    tokens of the whole accumulated step) or by this batch's own count.

    Row by row, padding dropped: the prompt before the first trained token runs once under `no_grad` and its
    keys and values become the cache the rest of the row attends to; only the rest runs with gradients. The
    prompt's activations still depend on the adapter, but no gradient flows back through them."""
    import torch
    import torch.nn.functional as F

    ids, labels, mask = inputs["input_ids"], inputs["labels"], inputs.get("attention_mask")
    total, count = None, 0
    for b in range(ids.shape[0]):
        row, target = ids[b], labels[b]
        if mask is not None:
            keep = mask[b].bool()
            row, target = row[keep], target[keep]
        trained = (target[1:] != -100).nonzero()
        if not len(trained):
            continue
        cut = int(trained[0])  # the position whose logits predict the first trained token
        past = None
        if cut > 0:
            with torch.no_grad():
                past = model(input_ids=row[None, :cut], use_cache=True).past_key_values
        logits = model(input_ids=row[None, cut:], past_key_values=past, use_cache=False).logits[0, :-1]
        loss = F.cross_entropy(logits.float(), target[cut + 1:], ignore_index=-100, reduction="sum")
        total = loss if total is None else total + loss
        count += int((target[cut + 1:] != -100).sum())
    if total is None:  # no trained token in the batch: a zero that still belongs to the graph
        return sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
    denominator = num_items_in_batch if num_items_in_batch is not None else count
    return total / torch.as_tensor(denominator, device=total.device).clamp(min=1)


def _run_stage(stage: str, model: Any, tok: Any, config: TrainConfig, rt: RuntimeChoice, work: Path,
               data: StageData, progress: Progress | None, should_stop: ShouldStop | None) -> StageResult:
    attn = rt.attn_packed if stage == "sft" and rt.packing else rt.attn_implementation
    base = model.get_base_model()
    if base.config._attn_implementation != attn:
        base.set_attn_implementation(attn)
    job, early = _make_callbacks(stage, config, progress, should_stop, model)
    trainer = _build_trainer(stage, model, tok, config, rt, work, data, [job, early])
    from transformers import PrinterCallback, ProgressCallback

    # Our JobCallback reports; the default printers would write dicts to stdout, which the CLI keeps for JSON.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    import torch

    cuda = rt.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.monotonic()
    trainer.train()
    seconds = time.monotonic() - t0
    res = StageResult(stage=stage, status="done", train_rows=len(data.train),
                      validation_rows=len(data.validation) if data.validation is not None else 0)
    if job.cancelled:
        res.status = "cancelled"
    else:
        if (data.validation is not None and config.evals_per_epoch > 0
                and job.last_eval_step != trainer.state.global_step):
            trainer.evaluate()  # so "best" also considers the final weights
        res.restored_best = config.restore_best and early.best is not None and (
            not job.eval_losses or job.eval_losses[-1] > early.best) and early.restore()
        res.status = "stopped_early" if early.stopped_early else "done"
    st = trainer.state
    res.steps, res.epoch, res.seconds = st.global_step, float(st.epoch or 0.0), round(seconds, 3)
    res.first_loss = job.losses[0] if job.losses else None
    res.last_loss = job.losses[-1] if job.losses else None
    res.eval_losses, res.best_eval_loss = job.eval_losses, early.best
    res.tokens_seen = int(st.num_input_tokens_seen or 0)
    res.tokens_per_s = round(res.tokens_seen / seconds, 1) if seconds > 0 and res.tokens_seen else None
    res.peak_gpu_mem_gb = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
    res.peak_rss_gib = _peak_rss_gib()
    # DPO/KTO add a frozen "ref" copy of the adapter as their reference model; it must not be saved.
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")
        model.set_adapter("default")
    return res


def _peak_rss_gib() -> float | None:
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return round(peak * (1024 if sys.platform.startswith("linux") else 1) / 2**30, 2)


# ---------------------------------------------------------------------------------------------- entry point


def run_training(
    config: TrainConfig,
    dataset_dir: Path | str,
    out_dir: Path | str,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> TrainResult:
    """Run the configured stages and save the adapter as ``<out_dir>/adapter``.

    Returns a `TrainResult` with status "succeeded" or "cancelled" (then no adapter is written).
    Raises `ValueError` (including `TrainingDataError`) for a bad config or dataset, before any training,
    and lets any other failure (out of memory, a TRL error) propagate after cleaning up its scratch files.
    """
    import torch

    t_start = time.monotonic()
    config.validate()
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    if not dataset_dir.is_dir():
        raise TrainingDataError(f"dataset folder {dataset_dir} does not exist")
    final = out_dir / ADAPTER_DIRNAME
    if final.exists():
        raise ValueError(f"{final} already exists; each training run needs a fresh output folder")
    data = {s: load_stage_data(dataset_dir, s) for s in config.stages}
    if all(d is None for d in data.values()):
        raise TrainingDataError(f"no training rows in {dataset_dir} for stages {config.stages}")

    rt = resolve_runtime(config)
    if rt.device == "cpu":
        torch.set_num_threads(config.threads)  # torch's default team collapses when the server shares the cores
    from transformers import set_seed

    set_seed(config.seed)
    emit = progress or (lambda _e: None)
    is_main = _is_main_process()
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / f".work-{os.getpid()}"
    try:
        model, tok = load_model_and_tokenizer(config, rt)
        trainable, total = count_params(model)
        results: list[StageResult] = []
        cancelled = False
        for i, stage in enumerate(config.stages):
            if data[stage] is None:
                results.append(StageResult(stage=stage, status="skipped", reason="no rows in the snapshot"))
                continue
            if cancelled or (should_stop and should_stop()):
                cancelled = True
                results.append(StageResult(stage=stage, status="cancelled", reason="cancelled before start"))
                continue
            if is_main:
                emit({"event": "stage_start", "stage": stage, "index": i, "stages": config.stages,
                      "train_rows": len(data[stage].train)})
            res = _run_stage(stage, model, tok, config, rt, work, data[stage], progress, should_stop)
            results.append(res)
            if is_main:
                emit({"event": "stage_end", **asdict(res)})
            cancelled = res.status == "cancelled"
        status = "cancelled" if cancelled else "succeeded"
        adapter_dir = None
        if not cancelled and is_main:
            adapter_dir = _save_adapter(model, config, dataset_dir, final, work, results, rt, trainable, total,
                                        time.monotonic() - t_start)
        return TrainResult(status=status, adapter_dir=adapter_dir, stages=results, runtime=rt,
                           seconds=round(time.monotonic() - t_start, 3), trainable_params=trainable,
                           total_params=total)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def _save_adapter(model: Any, config: TrainConfig, dataset_dir: Path, final: Path, work: Path,
                  stages: list[StageResult], rt: RuntimeChoice, trainable: int, total: int, seconds: float) -> Path:
    """Write the adapter and its provenance into a temp folder, then rename it into place (atomic)."""
    tmp = work / "adapter.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, selected_adapters=["default"])
    config.save(tmp / "train_config.json")
    manifest = dataset_dir / "manifest.json"
    if manifest.is_file():
        shutil.copyfile(manifest, tmp / "dataset_manifest.json")
    summary = {"dataset_dir": str(dataset_dir), "runtime": asdict(rt), "stages": [asdict(s) for s in stages],
               "trainable_params": trainable, "total_params": total, "seconds": round(seconds, 3),
               "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (tmp / "training_result.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, final)
    return final


# ---------------------------------------------------------------------------------------------- job status


def write_status(out_dir: Path, state: str, **extra: Any) -> None:
    """Atomically record the job's state in ``<out_dir>/status.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{STATUS_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps({"state": state, "pid": os.getpid(), "updated_at": time.time(), **extra}),
                   encoding="utf-8")
    os.replace(tmp, out_dir / STATUS_FILE)


def read_status(out_dir: Path | str) -> dict[str, Any]:
    """The job's last recorded state; a "running" job whose process is gone reads as "failed".

    A kill -9 or an out-of-memory kill gives the process no chance to write anything, so this is how a
    parent (or the scheduler at start-up) tells a dead job from a live one.
    """
    path = Path(out_dir) / STATUS_FILE
    if not path.is_file():
        return {"state": "missing"}
    status = json.loads(path.read_text(encoding="utf-8"))
    if status.get("state") == "running" and not _pid_alive(int(status.get("pid", -1))):
        status = {**status, "state": "failed", "error": "training process died without reporting (killed?)"}
    return status


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) still answers kill(0); it is not running.
    with contextlib.suppress(OSError):
        fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields_[0] != "Z"
    return True


# ---------------------------------------------------------------------------------------------- CLI


class _StopFlag:
    """Set by SIGTERM/SIGINT or by the cancel file appearing; a second signal kills at once."""

    def __init__(self, cancel_file: Path | None) -> None:
        self.cancel_file = cancel_file
        self.signalled = False

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signalled:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signalled = True

    def __call__(self) -> bool:
        return self.signalled or bool(self.cancel_file and self.cancel_file.exists())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, type=Path, help="TrainConfig JSON file")
    parser.add_argument("--data", required=True, type=Path, help="dataset snapshot folder")
    parser.add_argument("--out", required=True, type=Path, help="output folder (adapter/ and status.json)")
    parser.add_argument("--cancel-file", type=Path, default=None, help="stop when this file appears")
    ns = parser.parse_args(argv)

    # Never reach the network from a training process (set before transformers is imported).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rank = int(os.environ.get("RANK", "0"))
    out = sys.stdout
    sys.stdout = sys.stderr  # libraries that print() must not corrupt the JSON line stream

    def emit(event: dict[str, Any]) -> None:
        if rank == 0:
            out.write(json.dumps({**event, "time": round(time.time(), 3)}, default=str) + "\n")
            out.flush()

    stop = _StopFlag(ns.cancel_file)
    stop.install()
    if rank == 0:
        write_status(ns.out, "running")
    emit({"event": "start", "pid": os.getpid(), "config": str(ns.config), "data": str(ns.data),
          "out": str(ns.out)})
    try:
        config = TrainConfig.load(ns.config)
        result = run_training(config, ns.data, ns.out, progress=emit, should_stop=stop)
    except ValueError as e:
        return _fail(emit, ns.out, rank, e, EXIT_BAD_INPUT)
    except BaseException as e:  # noqa: BLE001 - every failure must be reported and recorded, then exit non-zero
        return _fail(emit, ns.out, rank, e, EXIT_FAILED)
    if rank == 0:
        write_status(ns.out, result.status, result=result.to_dict())
    emit({"event": "done", "status": result.status, "adapter_dir": result.adapter_dir,
          "result": result.to_dict()})
    return EXIT_OK if result.status == "succeeded" else EXIT_CANCELLED


def _fail(emit: Progress, out_dir: Path, rank: int, e: BaseException, code: int) -> int:
    message = f"{type(e).__name__}: {e}"
    tb = traceback.format_exc()
    print(tb, file=sys.stderr)
    if rank == 0:
        write_status(out_dir, "failed", error=message, traceback=tb[-4000:])
    emit({"event": "error", "error": message, "exit_code": code})
    return code


if __name__ == "__main__":
    sys.exit(main())
