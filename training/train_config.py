"""The configuration of one training job: what `training.train.run_training` reads.

In: a JSON file or a dict (``TrainConfig.from_dict`` / ``TrainConfig.load``); unknown keys and bad values
are refused with a message that names them. Out: a validated, frozen-in-spirit dataclass that is saved,
exactly as given, next to every adapter it produced (``train_config.json``).

Every field carries its help text (``TrainConfig.help()`` lists them). Defaults run on a 2-core CPU:
LoRA r=8 on all linear layers, small learning rates, early stopping on validation loss, one torch
thread. ``"auto"`` fields are resolved at run time by `training.train.resolve_runtime` (the resolved
values are recorded in the job's result, not written back into the config).
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

PeftMethod = Literal["lora", "qlora", "prompt_tuning", "prefix_tuning"]
Stage = Literal["sft", "dpo", "kto"]
STAGES: tuple[str, ...] = ("sft", "dpo", "kto")


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field whose help text travels in its metadata (like TRL's configs)."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """One training job: SFT, then DPO (or KTO), on a PEFT adapter over a frozen base model."""

    # --- model and adapter ---
    base_model: str = _f("", "Local folder of the base model (a `from_pretrained` folder). Required.")
    peft_method: PeftMethod = _f(
        "lora",
        "Adapter type: 'lora' (default), 'qlora' (4-bit base, needs CUDA and bitsandbytes), "
        "'prompt_tuning' or 'prefix_tuning' (the seeds' alternatives; these want much larger learning rates).",
    )
    lora_r: int = _f(8, "LoRA rank.")
    lora_alpha: int = _f(16, "LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA input.")
    lora_target_modules: str | list[str] = _f(
        "all-linear", "Modules that get LoRA: 'all-linear' or a list of module names such as ['q_proj', 'v_proj']."
    )
    lora_layers: int | None = _f(
        None,
        "Train the LoRA weights of the last N decoder layers only. The layers below keep theirs frozen (a fresh "
        "adapter's stay zero, an init_adapter's stay as they are), and the backward pass stops at the lowest "
        "trained layer: on SmolLM2-135M (30 layers) on a 2-core CPU the last 8 trained 1.5x faster and the last "
        "16 1.15x, and both learned a user's taste less well (docs/personal.md). None = every layer.",
    )
    num_virtual_tokens: int = _f(16, "Virtual tokens for prompt tuning / prefix tuning.")
    init_adapter: str | None = _f(
        None,
        "Continue training this existing adapter folder (for example the one serving) instead of starting a "
        "fresh adapter. Its type must match peft_method.",
    )
    chat_template: str | None = _f(
        None,
        "Path of a Jinja chat template with {% generation %} markers to train with. None: the tokenizer's own "
        "template when it has the markers, the project's SmolLM2 training template for SmolLM2-style tokenizers, "
        "else TRL's own patching.",
    )

    # --- stages ---
    stages: list[str] = _f(
        ["sft", "dpo"],
        "Stages to run, in order, from 'sft', 'dpo', 'kto'. A stage whose data is missing or empty in the "
        "snapshot is skipped (and reported); if none can run the job fails.",
    )
    sft_learning_rate: float = _f(1e-4, "Peak learning rate of the SFT stage (small: the base stays frozen).")
    sft_epochs: float = _f(2.0, "Epochs of the SFT stage.")
    sft_row_budget: int | None = _f(
        None,
        "Rows the SFT stage reads at most, counting each epoch's (never less than one epoch): with 48, 24 training "
        "rows get sft_epochs 2, 40 rows 1.2 epochs, 64 rows one. Larger data then trains fewer epochs instead of "
        "longer. None = always sft_epochs.",
    )
    assistant_only_loss: bool = _f(
        True, "SFT loss on the assistant's tokens only (conversational data); False trains on every token."
    )
    prompt_gradients: bool = _f(
        True,
        "SFT backpropagates through the prompt. False: each row's prompt (everything before its first trained "
        "token) is read once without gradients and kept as a key/value cache, and only the trained part runs "
        "forward and backward; the LoRA weights then learn from the answer's positions alone. Much less work "
        "when prompts are long and answers short (retrieved passages before a short answer), one row per pass "
        "(CPU), no packing, no activation checkpointing. Measured in docs/personal.md.",
    )
    dpo_learning_rate: float = _f(2e-5, "Peak learning rate of the DPO / KTO stage.")
    dpo_epochs: float = _f(1.0, "Epochs of the DPO / KTO stage.")
    dpo_beta: float = _f(0.1, "DPO / KTO beta: how far the policy may move from the reference.")
    dpo_loss_type: str = _f("sigmoid", "DPO loss ('sigmoid' is the original DPO loss; see TRL's DPOConfig).")
    dpo_sft_weight: float = _f(
        0.0, "Weight of an SFT term (the chosen answer's token loss) added to the DPO loss, as in RPO "
        "(Pang et al., 2024); 0 = plain DPO. It keeps the chosen answers likely while DPO pulls them away "
        "from the rejected ones.",
    )
    max_steps: int = _f(-1, "Cap on optimizer steps per stage; -1 means run the epochs.")
    warmup_ratio: float = _f(0.05, "Fraction of each stage's steps spent warming the learning rate up.")
    lr_scheduler: str = _f("linear", "Learning-rate schedule ('linear', 'cosine', 'constant', ...).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.")
    batch_size: int = _f(4, "Per-device training batch size (rows, or packed rows when packing).")
    eval_batch_size: int = _f(8, "Per-device evaluation batch size.")
    grad_accum: int = _f(1, "Gradient accumulation steps.")
    micro_batch_size: int | None = _f(
        None,
        "Rows per forward pass. An optimizer step still sees batch_size x grad_accum rows: the job "
        "accumulates micro-batches, so the step's gradient is the same. None = 1 on CPU (2 for KTO) and "
        "batch_size on GPU. On CPU one row at a time has no padding and holds one row's activations: in "
        "float32 a 1,000-token row of SmolLM2-135M with LoRA takes about 4.4 GB in training (measured, "
        "docs/benchmarks.md), so a padded DPO batch of 4 pairs would need some 35 GB. Evaluation passes "
        "hold at most this many rows too.",
    )
    max_length: int = _f(1024, "Longest tokenized example; with packing, the length of a packed row.")
    seed: int = _f(0, "Random seed (data order, adapter init).")

    # --- validation and early stopping ---
    evals_per_epoch: int = _f(4, "Validation-loss evaluations per epoch (0 = none: no early stopping).")
    early_stopping_patience: int = _f(
        3, "Stop a stage after this many evaluations without a better validation loss; 0 disables."
    )
    early_stopping_min_delta: float = _f(0.0, "Smallest drop in validation loss that counts as better.")
    restore_best: bool = _f(True, "At the end of a stage, put back the adapter weights of the best evaluation.")

    # --- hardware and speed ---
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "Where to train: 'auto' = cuda if available.")
    dtype: Literal["auto", "float32", "bfloat16"] = _f(
        "auto",
        "Compute dtype: 'auto' = bfloat16 on CUDA, and on CPUs with native bf16 instructions (measured 1.8x "
        "faster than float32 for LoRA steps, docs/benchmarks.md); float32 on other CPUs.",
    )
    threads: int = _f(1, "torch threads on CPU (1 while the server serves on the same box).")
    attn_implementation: str = _f(
        "auto",
        "'auto', 'sdpa', 'eager', 'flex_attention' or 'flash_attention_2'. 'auto' = flex_attention for packed "
        "SFT on CUDA (padding-free rows need attention that keeps the packed sequences apart without a dense "
        "mask) and sdpa for everything else (padded DPO/KTO batches, CPU).",
    )
    packing: bool | None = _f(
        None, "Pack SFT examples padding-free into rows of max_length. None = on for CUDA, off for CPU."
    )
    pad_to_multiple_of: int | None = _f(
        None,
        "Pad each batch's token count to a multiple of this, so compiled kernels (flex attention, torch.compile) "
        "see few distinct shapes. None = max_length for packed SFT on CUDA (one shape), no padding elsewhere.",
    )
    liger: bool | None = _f(
        None, "Use Liger Triton kernels (RMSNorm, SwiGLU, RoPE). None = on when CUDA and liger-kernel exist."
    )
    torch_compile: bool = _f(False, "torch.compile the model (long warm-up; pays off on long GPU runs).")
    activation_checkpointing: bool = _f(
        False, "Recompute activations in backward: less memory, ~20-30% slower. Off unless memory is short."
    )
    dataloader_workers: int = _f(0, "DataLoader worker processes (0 = load in the training process).")
    logging_steps: int = _f(1, "Optimizer steps between loss logs (each log syncs the GPU once).")
    progress_interval_s: float = _f(1.0, "Least seconds between two progress events (logs and evals always go).")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save(self, path: Path | str) -> Path:
        path = Path(path)
        path.write_text(self.to_json() + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build and validate; unknown keys or values of the wrong type raise `ValueError`."""
        if not isinstance(data, dict):
            raise ValueError(f"a training config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training config keys: {unknown} (see TrainConfig.help())")
        hints = typing.get_type_hints(cls)
        for name, value in data.items():
            if not _matches(value, hints[name]):
                raise ValueError(f"training config {name}={value!r} is not of type {hints[name]}")
        cfg = cls(**data)
        cfg.validate()
        return cfg

    @classmethod
    def load(cls, path: Path | str) -> TrainConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"training config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"training config {path} is not valid JSON: {e}") from None
        return cls.from_dict(data)

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help text, for CLIs and the admin console."""
        return {f.name: f.metadata["help"] for f in fields(cls)}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        out = {}
        for f in fields(cls):
            out[f.name] = f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]
        return out

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise `ValueError` naming every bad field (all at once, so a form can show them together)."""
        errors: list[str] = []
        if not self.base_model:
            errors.append("base_model is required (a local model folder)")
        if not self.stages:
            errors.append("stages must name at least one of sft, dpo, kto")
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            errors.append(f"unknown stages {bad}; choose from {list(STAGES)}")
        if "dpo" in self.stages and "kto" in self.stages:
            errors.append("choose DPO or KTO, not both")
        if len(set(self.stages)) != len(self.stages):
            errors.append(f"stages repeat: {self.stages}")
        if self.peft_method not in typing.get_args(PeftMethod):
            errors.append(f"peft_method must be one of {typing.get_args(PeftMethod)}")
        for name in ("lora_r", "lora_alpha", "num_virtual_tokens", "batch_size", "eval_batch_size",
                     "grad_accum", "max_length", "threads", "logging_steps"):
            if getattr(self, name) < 1:
                errors.append(f"{name} must be >= 1")
        for name in ("sft_learning_rate", "dpo_learning_rate", "sft_epochs", "dpo_epochs", "dpo_beta"):
            if not getattr(self, name) > 0:
                errors.append(f"{name} must be > 0")
        if not self.dpo_sft_weight >= 0:
            errors.append("dpo_sft_weight must be >= 0")
        elif self.dpo_sft_weight > 0 and self.dpo_loss_type == "sft":
            errors.append("dpo_sft_weight adds an SFT term; dpo_loss_type is already 'sft'")
        if self.sft_row_budget is not None and self.sft_row_budget < 1:
            errors.append("sft_row_budget must be >= 1 or null")
        if self.lora_layers is not None and (self.lora_layers < 1 or self.peft_method not in ("lora", "qlora")):
            errors.append("lora_layers must be >= 1 or null, and only with peft_method lora or qlora")
        if not self.prompt_gradients:
            if self.packing:
                errors.append("prompt_gradients=false needs unpacked rows (packing false or null on CPU)")
            if self.activation_checkpointing:
                errors.append("prompt_gradients=false cannot recompute activations (activation_checkpointing)")
        if not 0 <= self.lora_dropout < 1:
            errors.append("lora_dropout must be in [0, 1)")
        if not 0 <= self.warmup_ratio < 1:
            errors.append("warmup_ratio must be in [0, 1)")
        if self.max_steps == 0 or self.max_steps < -1:
            errors.append("max_steps must be -1 (use epochs) or >= 1")
        if self.micro_batch_size is not None:
            if self.micro_batch_size < 1:
                errors.append("micro_batch_size must be >= 1 or null")
            elif self.batch_size >= 1 and self.batch_size % self.micro_batch_size:
                errors.append(f"micro_batch_size {self.micro_batch_size} must divide batch_size {self.batch_size}")
            elif self.micro_batch_size == 1 and "kto" in self.stages:
                errors.append("KTO needs micro_batch_size >= 2 (its KL term pairs rows of one forward pass)")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            errors.append("pad_to_multiple_of must be >= 1 or null")
        for name in ("evals_per_epoch", "early_stopping_patience", "dataloader_workers"):
            if getattr(self, name) < 0:
                errors.append(f"{name} must be >= 0")
        if self.device not in ("auto", "cpu", "cuda"):
            errors.append("device must be auto, cpu or cuda")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            errors.append("dtype must be auto, float32 or bfloat16")
        if self.attn_implementation not in ("auto", "sdpa", "eager", "flex_attention", "flash_attention_2",
                                            "flash_attention_3"):
            errors.append(f"attn_implementation {self.attn_implementation!r} is not supported")
        if errors:
            raise ValueError("invalid training config: " + "; ".join(errors))


def _matches(value: Any, hint: Any) -> bool:
    """A small runtime type check for JSON values against the dataclass annotations."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)
