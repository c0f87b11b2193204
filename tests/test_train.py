"""The training job (training/train.py) on the tiny random Llama with the real SmolLM2 tokenizer.

Asserts what training did (adapter changed, base untouched, loss fell, DPO's reference is the SFT
adapter), that cancel / SIGTERM / kill end the job cleanly and visibly, and that the CLI streams
JSON progress lines end to end. Each test builds its own small dataset snapshot.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from training.train import (
    EXIT_BAD_INPUT,
    EXIT_CANCELLED,
    EXIT_OK,
    TrainingDataError,
    read_status,
    run_training,
)
from training.train_config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
SYSTEM = {"role": "system", "content": "You answer in one short sentence."}
FACTS = [
    ("capital of France", "Paris"), ("capital of Japan", "Tokyo"), ("capital of Italy", "Rome"),
    ("capital of Spain", "Madrid"), ("colour of the sky", "blue"), ("colour of grass", "green"),
]


def _conv(q: str, a: str) -> list[dict]:
    return [SYSTEM, {"role": "user", "content": f"What is the {q}?"},
            {"role": "assistant", "content": f"The {q} is {a}."}]


def make_snapshot(root: Path, sft: bool = True, dpo: bool = True, repeat: int = 4) -> Path:
    """A dataset snapshot: <kind>/<split> folders, with provenance columns the job must drop.

    SFT is written as one DatasetDict per kind (training/snapshots.py's layout, whose `test` split the
    job never reads); DPO as separately saved splits. Both read the same.
    """
    from datasets import Dataset, DatasetDict

    if sft:
        rows = [{"messages": _conv(q, a), "source": "feedback", "conversation_id": i}
                for i, (q, a) in enumerate(FACTS * repeat)]
        DatasetDict({"train": Dataset.from_list(rows), "validation": Dataset.from_list(rows[: len(FACTS)]),
                     "test": Dataset.from_list(rows[:1])}).save_to_disk(str(root / "sft"))
    if dpo:
        pairs = [{"prompt": [SYSTEM, {"role": "user", "content": f"What is the {q}?"}],
                  "chosen": [{"role": "assistant", "content": f"The {q} is {a}."}],
                  "rejected": [{"role": "assistant", "content": "I would rather not say."}]} for q, a in FACTS]
        Dataset.from_list(pairs).save_to_disk(str(root / "dpo" / "train"))
        Dataset.from_list(pairs[:2]).save_to_disk(str(root / "dpo" / "validation"))
    (root / "manifest.json").write_text(json.dumps({"version": "test", "counts": {"sft": 24}}))
    return root


def cfg(model_dir: Path, **kw) -> TrainConfig:
    # float32 pinned so the numbers asserted below do not depend on whether this CPU has native bf16
    # (dtype "auto" would pick bf16 there); the CLI test covers the bf16 path.
    base = dict(base_model=str(model_dir), stages=["sft"], max_steps=4, batch_size=4, sft_learning_rate=3e-3,
                dpo_learning_rate=1e-3, evals_per_epoch=2, threads=1, device="cpu", dtype="float32")
    base.update(kw)
    return TrainConfig.from_dict(base)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------- config


def test_config_roundtrip_and_clear_errors(tmp_path: Path) -> None:
    c = TrainConfig.from_dict({"base_model": "/m", "lora_r": 16, "stages": ["sft", "kto"]})
    path = c.save(tmp_path / "c.json")
    assert TrainConfig.load(path) == c
    assert all(TrainConfig.help().values()), "every field has help text"
    with pytest.raises(ValueError, match="unknown training config keys: \\['lora_rank'\\]"):
        TrainConfig.from_dict({"base_model": "/m", "lora_rank": 4})
    with pytest.raises(ValueError, match="lora_r='8' is not of type"):
        TrainConfig.from_dict({"base_model": "/m", "lora_r": "8"})
    with pytest.raises(ValueError, match="choose DPO or KTO, not both; lora_r must be >= 1"):
        TrainConfig.from_dict({"base_model": "/m", "lora_r": 0, "stages": ["dpo", "kto"]})
    with pytest.raises(ValueError, match="base_model is required"):
        TrainConfig.from_dict({})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        TrainConfig.load(tmp_path / "bad.json")


# ---------------------------------------------------------------------------------------------- training


def test_sft_then_dpo_trains_adapter_and_leaves_base_untouched(tmp_path: Path, tiny_model_dir: Path) -> None:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    weights = tiny_model_dir / "model.safetensors"
    before = _sha(weights)
    data = make_snapshot(tmp_path / "data")
    events: list[dict] = []
    config = cfg(tiny_model_dir, stages=["sft", "dpo"], max_steps=8, evals_per_epoch=2)
    result = run_training(config, data, tmp_path / "out", progress=events.append)

    assert result.status == "succeeded"
    sft, dpo = result.stages
    assert sft.status == dpo.status == "done"
    assert sft.last_loss < sft.first_loss
    assert 0 < sft.peak_rss_gib <= dpo.peak_rss_gib  # the process's high-water mark, kept per stage
    # The DPO reference is a frozen copy of the SFT adapter, so the first DPO loss is exactly log(2);
    # against the base model (adapter disabled) it would not be.
    assert dpo.first_loss == pytest.approx(math.log(2), abs=1e-4)
    assert dpo.eval_losses[-1] < math.log(2)

    adapter = result.adapter_dir
    assert adapter == tmp_path / "out" / "adapter"
    assert json.loads((adapter / "train_config.json").read_text()) == config.to_dict()
    assert json.loads((adapter / "dataset_manifest.json").read_text())["version"] == "test"
    assert json.loads((adapter / "training_result.json").read_text())["stages"][1]["stage"] == "dpo"
    assert not (adapter / "ref").exists(), "DPO's reference copy must not be saved"
    assert not list((tmp_path / "out").glob(".work-*")), "scratch folder removed"

    tensors = load_file(adapter / "adapter_model.safetensors")
    assert tensors and all("lora_" in k for k in tensors), "only adapter weights are saved"
    # LoRA starts with B = 0: non-zero B means training changed the adapter.
    assert all(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)

    assert _sha(weights) == before, "base model file unchanged"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ref_state = {k: v.clone() for k, v in base.state_dict().items()}
    ids = torch.tensor([[1, 400, 500, 600, 700, 2]])
    with torch.no_grad():
        base_logits = base(ids).logits
        pm = PeftModel.from_pretrained(base, adapter)
        tuned = pm(ids).logits
        with pm.disable_adapter():
            off = pm(ids).logits
    assert torch.equal(off, base_logits), "with the adapter off the model is exactly the base"
    assert not torch.allclose(tuned, base_logits), "the adapter changes the output"
    for k, v in pm.get_base_model().state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, ref_state[k.replace(".base_layer", "")]), k

    kinds = {e["event"] for e in events}
    assert {"stage_start", "progress", "eval", "stage_end"} <= kinds
    prog = [e for e in events if e["event"] == "progress"]
    assert all({"step", "loss", "eval_loss", "epoch", "eta_s"} <= set(e) for e in prog)
    assert prog[-1]["eta_s"] == 0


def test_dpo_sft_weight_adds_the_chosen_answers_token_loss(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = make_snapshot(tmp_path / "data", sft=False)
    first = {}
    for weight in (0.0, 1.0):
        config = cfg(tiny_model_dir, stages=["dpo"], max_steps=2, evals_per_epoch=0, dpo_sft_weight=weight)
        (dpo,) = run_training(config, data, tmp_path / f"out-{weight}").stages
        assert dpo.status == "done"
        first[weight] = dpo.first_loss
    # A fresh LoRA adapter equals its reference, so the DPO term starts at log(2). The SFT term is the
    # random tiny model's token loss on the chosen answers: about log(vocabulary size), 10.8.
    assert first[0.0] == pytest.approx(math.log(2), abs=1e-4)
    assert first[1.0] - math.log(2) > 8, first
    with pytest.raises(ValueError, match="dpo_sft_weight must be >= 0"):
        cfg(tiny_model_dir, dpo_sft_weight=-1.0)


@pytest.fixture(scope="module")
def learnable_model_dir(tmp_path_factory, tokenizer_dir: Path) -> Path:
    """The tiny Llama with larger initial weights.

    With the default init (std 0.02) and a tied, frozen 64-d embedding, the logits can never exceed
    about 1.3, so no adapter can push the loss below ~9.5. Std 0.3 leaves room to learn.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tok), tie_word_embeddings=True, initializer_range=0.3, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    out = tmp_path_factory.mktemp("learnable-model")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_loss_goes_down_on_a_learnable_dataset(tmp_path: Path, learnable_model_dir: Path) -> None:
    data = make_snapshot(tmp_path / "data", dpo=False, repeat=8)
    config = cfg(learnable_model_dir, max_steps=24, sft_learning_rate=1e-2, lora_r=16, lora_alpha=32,
                 evals_per_epoch=4, early_stopping_patience=0, warmup_ratio=0.0)
    (sft,) = run_training(config, data, tmp_path / "out").stages
    assert len(sft.eval_losses) == 4
    assert sft.first_loss > 12, sft  # random start
    # Six facts repeated: memorisable. Measured: eval loss 14 -> ~3 in 40 steps.
    assert sft.eval_losses[-1] < sft.first_loss / 2, sft.eval_losses
    assert sft.eval_losses == sorted(sft.eval_losses, reverse=True), "validation loss falls at every evaluation"
    assert sft.best_eval_loss == sft.eval_losses[-1] and not sft.restored_best


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_micro_batches_give_the_same_step_as_the_whole_batch(tmp_path: Path, learnable_model_dir: Path,
                                                             stage: str) -> None:
    """One row per forward pass (the CPU default) accumulates to the same optimizer step as a batch of 4."""
    from safetensors.torch import load_file

    data = make_snapshot(tmp_path / "data")
    weights, runtimes, losses = {}, {}, {}
    for micro in (4, 1):
        config = cfg(learnable_model_dir, stages=[stage], max_steps=2, evals_per_epoch=0, lora_dropout=0.0,
                     micro_batch_size=micro)
        result = run_training(config, data, tmp_path / f"out-{micro}")
        runtimes[micro] = result.runtime
        losses[micro] = (result.stages[0].first_loss, result.stages[0].last_loss)
        weights[micro] = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert runtimes[1].micro_batch_size == 1 and runtimes[4].micro_batch_size == 4
    assert losses[1] == pytest.approx(losses[4], rel=1e-4), losses  # logged per step, not per micro-batch
    assert weights[1].keys() == weights[4].keys()
    moved = [k for k, t in weights[4].items() if "lora_B" in k and t.abs().max() > 1e-4]
    assert moved, "two steps at this learning rate move the adapter"
    for k, t in weights[4].items():
        assert (weights[1][k] - t).abs().max() <= 1e-4 * max(1.0, float(t.abs().max())), k


def test_micro_batch_default_and_checks(tiny_model_dir: Path) -> None:
    from training.train import resolve_runtime

    assert resolve_runtime(cfg(tiny_model_dir)).micro_batch_size == 1  # CPU: one row per pass
    assert resolve_runtime(cfg(tiny_model_dir, micro_batch_size=2)).micro_batch_size == 2
    with pytest.raises(ValueError, match="micro_batch_size 3 must divide batch_size 4"):
        cfg(tiny_model_dir, micro_batch_size=3)
    with pytest.raises(ValueError, match="micro_batch_size must be >= 1"):
        cfg(tiny_model_dir, micro_batch_size=0)
    with pytest.raises(ValueError, match="KTO needs micro_batch_size >= 2"):
        cfg(tiny_model_dir, stages=["sft", "kto"], micro_batch_size=1)


def test_missing_stage_is_skipped_and_empty_snapshot_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = make_snapshot(tmp_path / "data", dpo=False)
    result = run_training(cfg(tiny_model_dir, stages=["sft", "dpo"], max_steps=2), data, tmp_path / "out")
    assert [s.status for s in result.stages] == ["done", "skipped"]
    assert result.adapter_dir.is_dir()
    with pytest.raises(ValueError, match="already exists"):
        run_training(cfg(tiny_model_dir, max_steps=2), data, tmp_path / "out")
    with pytest.raises(TrainingDataError, match="no training rows"):
        run_training(cfg(tiny_model_dir, stages=["dpo"]), data, tmp_path / "out2")
    with pytest.raises(TrainingDataError, match="does not exist"):
        run_training(cfg(tiny_model_dir), tmp_path / "nowhere", tmp_path / "out3")


def test_wrong_columns_are_a_clear_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    from datasets import Dataset

    Dataset.from_list([{"question": "q", "answer": "a"}]).save_to_disk(str(tmp_path / "d" / "sft" / "train"))
    with pytest.raises(TrainingDataError, match=r"columns \['answer', 'question'\] are not a sft dataset"):
        run_training(cfg(tiny_model_dir), tmp_path / "d", tmp_path / "out")
    assert not (tmp_path / "out" / "adapter").exists()


def test_early_stopping_restores_best_weights(tmp_path: Path, learnable_model_dir: Path) -> None:
    data = make_snapshot(tmp_path / "data", dpo=False, repeat=8)
    # A learning rate far too high makes the validation loss climb after the first evaluation.
    config = cfg(learnable_model_dir, max_steps=40, sft_learning_rate=2.0, warmup_ratio=0.0, evals_per_epoch=20,
                 early_stopping_patience=2, max_grad_norm=100.0)
    (sft,) = run_training(config, data, tmp_path / "out").stages
    assert sft.status == "stopped_early", sft
    assert sft.steps < 40
    assert sft.restored_best
    assert sft.best_eval_loss == min(sft.eval_losses) < sft.eval_losses[-1]


def test_cancel_stops_at_the_next_step(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = make_snapshot(tmp_path / "data")
    asked: list[int] = []

    def should_stop() -> bool:  # asked once per optimizer step (and before each stage)
        asked.append(1)
        return len(asked) >= 3

    config = cfg(tiny_model_dir, stages=["sft", "dpo"], max_steps=50, evals_per_epoch=0)
    result = run_training(config, data, tmp_path / "out", should_stop=should_stop)
    assert result.status == "cancelled"
    assert [s.status for s in result.stages] == ["cancelled", "cancelled"]
    assert result.stages[0].steps == 2  # 1st call before the stage, 2nd after step 1, 3rd after step 2
    assert result.adapter_dir is None and not (tmp_path / "out" / "adapter").exists()
    assert not list((tmp_path / "out").glob(".work-*"))


def test_sft_then_kto(tmp_path: Path, tiny_model_dir: Path) -> None:
    from datasets import Dataset

    data = make_snapshot(tmp_path / "data", dpo=False)
    rows = []
    for q, a in FACTS:
        prompt = [SYSTEM, {"role": "user", "content": f"What is the {q}?"}]
        rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": f"The {q} is {a}."}],
                     "label": True})
        rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": "No."}], "label": False})
    Dataset.from_list(rows).save_to_disk(str(data / "kto" / "train"))
    result = run_training(cfg(tiny_model_dir, stages=["sft", "kto"], max_steps=3, evals_per_epoch=0), data,
                          tmp_path / "out")
    sft, kto = result.stages
    assert sft.status == kto.status == "done" and kto.steps == 3
    # KTO's loss is 1 - sigmoid(0) = 0.5 while the policy equals its reference (the SFT adapter's copy).
    assert kto.first_loss == pytest.approx(0.5, abs=1e-4)
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_prompt_and_prefix_tuning_are_selectable(tmp_path: Path, tiny_model_dir: Path, method: str) -> None:
    data = make_snapshot(tmp_path / "data")
    config = cfg(tiny_model_dir, peft_method=method, stages=["sft", "dpo"], max_steps=2, num_virtual_tokens=4,
                 evals_per_epoch=0)
    result = run_training(config, data, tmp_path / "out")
    assert [s.status for s in result.stages] == ["done", "done"]
    saved = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert saved["peft_type"] == method.upper()
    assert saved["num_virtual_tokens"] == 4


def test_continue_from_existing_adapter_and_type_checks(
    tmp_path: Path, tiny_model_dir: Path, tiny_adapters: dict[str, Path]
) -> None:
    from safetensors.torch import load_file

    data = make_snapshot(tmp_path / "data", dpo=False)
    start = tiny_adapters["alpha"]
    result = run_training(cfg(tiny_model_dir, init_adapter=str(start), max_steps=2, evals_per_epoch=0),
                          data, tmp_path / "out")
    old = load_file(start / "adapter_model.safetensors")
    new = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert old.keys() == new.keys()
    assert any(not (old[k] == new[k]).all() for k in old), "training moved the existing adapter"
    with pytest.raises(ValueError, match="is a LORA adapter but peft_method='prompt_tuning'"):
        run_training(cfg(tiny_model_dir, init_adapter=str(start), peft_method="prompt_tuning"), data,
                     tmp_path / "o2")
    with pytest.raises(ValueError, match="qlora' needs a CUDA device"):
        run_training(cfg(tiny_model_dir, peft_method="qlora"), data, tmp_path / "o3")
    with pytest.raises(ValueError, match="liger=true needs a CUDA device"):
        run_training(cfg(tiny_model_dir, liger=True), data, tmp_path / "o4")


def test_lora_layers_trains_the_last_layers_only_and_keeps_the_ones_below(
    tmp_path: Path, tiny_model_dir: Path, tiny_adapters: dict[str, Path]
) -> None:
    import re

    from safetensors.torch import load_file

    data = make_snapshot(tmp_path / "data", dpo=False)
    start = tiny_adapters["alpha"]
    layers = json.loads((tiny_model_dir / "config.json").read_text())["num_hidden_layers"]
    result = run_training(cfg(tiny_model_dir, init_adapter=str(start), max_steps=2, evals_per_epoch=0, lora_layers=1,
                              lora_dropout=0.0), data, tmp_path / "out")
    old = load_file(start / "adapter_model.safetensors")
    new = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert old.keys() == new.keys()
    layer_of = {k: int(re.search(r"\.layers\.(\d+)\.", k).group(1)) for k in old}
    moved = {layer_of[k] for k in old if not (old[k] == new[k]).all()}
    assert moved == {layers - 1}, f"only the last layer may move, moved: {sorted(moved)}"
    saved = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert saved["lora_dropout"] == 0.0  # the job's dropout, not the starting adapter's
    with pytest.raises(ValueError, match="lora_layers must be >= 1"):
        cfg(tiny_model_dir, lora_layers=0)


def test_sft_row_budget_trains_larger_data_fewer_epochs_and_never_less_than_one(tmp_path: Path,
                                                                                 tiny_model_dir: Path) -> None:
    small = make_snapshot(tmp_path / "small", dpo=False, repeat=1)  # 6 training rows
    large = make_snapshot(tmp_path / "large", dpo=False, repeat=4)  # 24
    runs = {}
    for name, data in (("small", small), ("large", large)):
        result = run_training(cfg(tiny_model_dir, max_steps=-1, sft_epochs=2.0, sft_row_budget=12, batch_size=4,
                                  evals_per_epoch=0), data, tmp_path / f"out-{name}")
        runs[name] = result.stages[0].epoch
    assert runs["small"] == pytest.approx(2.0)  # 12 / 6 = 2: all of sft_epochs
    assert runs["large"] == pytest.approx(1.0)  # 12 / 24 = 0.5: one epoch, never less
    with pytest.raises(ValueError, match="sft_row_budget must be >= 1"):
        cfg(tiny_model_dir, sft_row_budget=0)


def test_cached_prompt_loss_is_the_full_loss_with_gradients_through_the_answer_only(tiny_model_dir: Path) -> None:
    """prompt_gradients=false: the same loss value as one full forward pass over each row; the gradient differs
    only by what would have flowed back through the prompt's keys and values."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from training.train import cached_prompt_loss

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a trained adapter, so the prompt's activations depend on it
            torch.nn.init.normal_(p, std=0.05)
    model.train()
    prompts, answers = [9, 30], [4, 6]  # prompt and answer lengths of two rows; the shorter row is padded
    width = max(p + a for p, a in zip(prompts, answers, strict=True))
    ids = torch.randint(3, 40000, (2, width))
    mask = torch.zeros(2, width, dtype=torch.long)
    labels = torch.full((2, width), -100)
    for b, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        mask[b, : p + a] = 1
        labels[b, p: p + a] = ids[b, p: p + a]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def grads(loss: torch.Tensor) -> dict[str, torch.Tensor]:
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    cached = cached_prompt_loss(model, batch)
    g_cached = grads(cached)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    full = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100,
                           reduction="sum") / sum(answers)
    g_full = grads(full)
    assert cached.item() == pytest.approx(full.item(), rel=1e-5)
    assert cached_prompt_loss(model, batch, num_items_in_batch=2 * sum(answers)).item() == pytest.approx(
        full.item() / 2, rel=1e-5)  # a share of an accumulated step
    assert all(g.abs().sum() > 0 for n, g in g_cached.items() if "lora_B" in n), "every layer still learns"
    assert any(not torch.allclose(g_cached[n], g_full[n], atol=1e-7) for n in g_full), "the prompt's path is cut"
    # The LM head's input at the answer positions is the same either way, so the last layer's MLP output
    # projection, which sees no other position, gets the same gradient.
    down = [n for n in g_full if "layers.1.mlp.down_proj.lora_B" in n]
    assert down and all(torch.allclose(g_cached[n], g_full[n], atol=1e-6) for n in down)


def test_prompt_gradients_false_trains_and_refuses_what_it_cannot_do(tmp_path: Path,
                                                                      learnable_model_dir: Path) -> None:
    data = make_snapshot(tmp_path / "data", dpo=False, repeat=8)
    config = cfg(learnable_model_dir, max_steps=24, sft_learning_rate=1e-2, lora_r=16, lora_alpha=32,
                 evals_per_epoch=4, early_stopping_patience=0, warmup_ratio=0.0, prompt_gradients=False)
    result = run_training(config, data, tmp_path / "out")
    (sft,) = result.stages
    assert not result.runtime.packing and sft.steps == 24
    assert sft.first_loss > 12 and sft.eval_losses[-1] < sft.first_loss / 2, (sft.first_loss, sft.eval_losses)
    with pytest.raises(ValueError, match="prompt_gradients=false needs unpacked rows"):
        cfg(learnable_model_dir, prompt_gradients=False, packing=True)
    with pytest.raises(ValueError, match="activation_checkpointing"):
        cfg(learnable_model_dir, prompt_gradients=False, activation_checkpointing=True)


def test_packed_rows_give_the_same_loss_as_padded_rows(tiny_model_dir: Path) -> None:
    """Padding-free packing (what GPU runs use) must not let sequences attend to each other."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    seqs = [{"input_ids": torch.randint(3, 40000, (n,)).tolist()} for n in (7, 19, 12)]
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(seqs)
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(seqs)
    assert packed["input_ids"].shape == (1, 38) and "attention_mask" not in packed
    with torch.no_grad():
        lp = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        # use_cache=False as in training (SFTTrainer sets it): with a cache, transformers skips the
        # packed-sequence detection and the sequences would attend to each other.
        lk = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
    keep = padded["attention_mask"].bool()
    assert torch.allclose(lp[keep], lk[0], atol=1e-4)


# ---------------------------------------------------------------------------------------------- CLI


def _start_cli(tmp_path: Path, config: TrainConfig, data: Path, *extra: str) -> subprocess.Popen:
    cfg_path = config.save(tmp_path / "cfg.json")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "training.train", "--config", str(cfg_path), "--data", str(data),
         "--out", str(tmp_path / "out"), *extra],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def _read_until(proc: subprocess.Popen, predicate, timeout: float = 120) -> list[dict]:
    events, deadline = [], time.monotonic() + timeout
    for line in proc.stdout:
        events.append(json.loads(line))  # every stdout line is one JSON object
        if predicate(events[-1]) or time.monotonic() > deadline:
            break
    return events


def test_cli_runs_end_to_end_and_streams_json(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = make_snapshot(tmp_path / "data")
    proc = _start_cli(tmp_path, cfg(tiny_model_dir, stages=["sft", "dpo"], max_steps=3, dtype="bfloat16"), data)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_OK, err[-3000:]
    events = [json.loads(line) for line in out.splitlines()]
    assert events[0]["event"] == "start" and events[-1]["event"] == "done"
    assert events[-1]["status"] == "succeeded"
    assert events[-1]["result"]["runtime"]["dtype"] == "bfloat16"
    prog = [e for e in events if e["event"] == "progress"]
    assert {e["stage"] for e in prog} == {"sft", "dpo"}
    assert all({"step", "loss", "eval_loss", "epoch", "eta_s"} <= set(e) for e in prog)
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    assert read_status(tmp_path / "out")["state"] == "succeeded"


def test_cli_bad_input_exits_2_with_a_clear_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = make_snapshot(tmp_path / "data")
    (tmp_path / "cfg.json").write_text(json.dumps({"base_model": str(tiny_model_dir), "epochz": 3}))
    proc = subprocess.run(
        [sys.executable, "-m", "training.train", "--config", str(tmp_path / "cfg.json"), "--data", str(data),
         "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_BAD_INPUT
    last = json.loads(proc.stdout.splitlines()[-1])
    assert last["event"] == "error" and "epochz" in last["error"]
    status = read_status(tmp_path / "out")
    assert status["state"] == "failed" and "epochz" in status["error"]


def test_cli_sigterm_cancels_promptly(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = make_snapshot(tmp_path / "data")
    proc = _start_cli(tmp_path, cfg(tiny_model_dir, max_steps=500, evals_per_epoch=0), data)
    try:
        _read_until(proc, lambda e: e["event"] == "progress" and e["step"] >= 2)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        proc.kill()
    assert proc.returncode == EXIT_CANCELLED, err[-3000:]
    assert took < 15, f"cancel took {took:.1f}s"
    assert json.loads(out.splitlines()[-1])["status"] == "cancelled"
    assert read_status(tmp_path / "out")["state"] == "cancelled"
    assert not (tmp_path / "out" / "adapter").exists()


def test_cli_cancel_file(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = make_snapshot(tmp_path / "data")
    stop = tmp_path / "cancel"
    proc = _start_cli(tmp_path, cfg(tiny_model_dir, max_steps=500, evals_per_epoch=0), data,
                      "--cancel-file", str(stop))
    try:
        _read_until(proc, lambda e: e["event"] == "progress")
        stop.touch()
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_CANCELLED
    assert read_status(tmp_path / "out")["state"] == "cancelled"


def test_killed_process_leaves_a_clear_failure(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = make_snapshot(tmp_path / "data")
    proc = _start_cli(tmp_path, cfg(tiny_model_dir, max_steps=500, evals_per_epoch=0), data)
    try:
        _read_until(proc, lambda e: e["event"] == "progress")
        assert read_status(tmp_path / "out")["state"] == "running"
        proc.kill()  # SIGKILL: no handler runs, like the OOM killer
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    status = read_status(tmp_path / "out")
    assert status["state"] == "failed" and "died" in status["error"]
    assert not (tmp_path / "out" / "adapter").exists(), "no half-written adapter"
