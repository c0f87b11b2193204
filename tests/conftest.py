"""Shared fixtures: every test gets its own home directory; tiny random models are built once.

Fast tests use a 2-layer Llama built from a config with the real SmolLM2 tokenizer. Tests marked
`slow` use the real embedded models.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach the network (the product sets these itself at start-up too).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one torch/OpenMP thread each (and in the servers they
    # start), or the two collapse each other's speed.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from assistant.config import Settings  # noqa: E402


@pytest.fixture(autouse=True)
def _state_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever a test forgets to point elsewhere lands in its temp folder, never in ~/.assistant,
    Gradio's system temp folder or matplotlib's cache."""
    monkeypatch.setenv("ASSISTANT_HOME", str(tmp_path / "default-home"))
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "matplotlib"))


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def settings(home: Path) -> Settings:
    s = Settings.load(env={}, home=home)
    s.ensure_dirs()
    return s


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The real SmolLM2 tokenizer, extracted once per session from the embedded GGUF."""
    from assistant.models import embedded_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    embedded_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir: Path) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer, saved as a normal model folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_random_adapter(model_dir: Path, out: Path, seed: int, r: int = 4, scale: float = 0.5,
                        only_b: bool = False) -> Path:
    """A LoRA adapter with random (non-zero) B matrices, so it really changes the output. `only_b` keeps PEFT's
    own A and randomises B alone (with a small `scale`: a real model's answer changes without turning into noise)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    pm = get_peft_model(
        base, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ("lora_B" if only_b else "lora_") in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    pm.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_adapters(tmp_path_factory, tiny_model_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "alpha": make_random_adapter(tiny_model_dir, root / "alpha", seed=1),
        "beta": make_random_adapter(tiny_model_dir, root / "beta", seed=2),
    }


# --------------------------------------------------------------------------- conversation store


def fast_password_hasher():
    """Real argon2id with tiny cost parameters: the default costs ~0.5 s per hash on 2 busy cores,
    and tests create many users. Production keeps argon2-cffi's defaults."""
    from argon2 import PasswordHasher

    return PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


@pytest.fixture
def store(settings: Settings):
    """The conversation store on SQLite in this test's home, migrated to the latest schema."""
    from memory.store import Store

    s = Store.open(settings.db_url, password_hasher=fast_password_hasher())
    yield s
    s.close()


@pytest.fixture
def pg_url():
    """URL of a fresh, empty schema on the test PostgreSQL server, dropped afterwards.

    Skips when ASSISTANT_TEST_PG_URL is unset (`source .ci/postgres.sh` sets it); fails loudly when it
    is set but the server cannot be reached.
    """
    import uuid

    import sqlalchemy as sa

    from memory.db import normalize_url

    base = os.environ.get("ASSISTANT_TEST_PG_URL")
    if not base:
        pytest.skip("ASSISTANT_TEST_PG_URL is not set (source .ci/postgres.sh to start PostgreSQL)")
    url = sa.make_url(normalize_url(base))
    schema = f"test_{uuid.uuid4().hex[:16]}"
    admin = sa.create_engine(url)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    try:
        yield url.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


@pytest.fixture(scope="session")
def three_adapters(tmp_path_factory, tiny_model_dir: Path, tiny_adapters: dict[str, Path]) -> dict[str, Path]:
    """alpha and beta, plus a third random adapter: with the base model, four ways to answer."""
    return {**tiny_adapters, "gamma": make_random_adapter(tiny_model_dir, tmp_path_factory.mktemp("g") / "gamma", 3)}


def tiny_settings(home: Path, model_dir: Path, **overrides) -> Settings:
    """Settings for an in-process backend of a tiny model: one torch thread, every token streamed at once, float32.

    float32 because tests compare a batched answer with the same request's answer alone, token for token. With
    dtype "auto" an AVX-512 CPU serves in bf16, where a batch's other shapes round differently and a greedy token
    of a random model can flip (README, "Serving many users at once")."""
    overrides.setdefault("dtype", "float32")
    return Settings.load(env={}, home=home, model=str(model_dir), torch_threads=1, stream_interval_ms=0.0,
                         **overrides)


@pytest.fixture(scope="session")
def learnable_tiny_model_dir(tmp_path_factory, tokenizer_dir: Path) -> Path:
    """The tiny Llama with larger initial weights (std 0.3), so a LoRA adapter can really move its loss.

    With the default init the frozen 64-d tied embedding caps the logits near 1.3 and no adapter can
    push the loss below ~9.5 (see tests/test_train.py). Used by the gate and loop tests.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tok), max_position_embeddings=2048, tie_word_embeddings=True, initializer_range=0.3,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    out = tmp_path_factory.mktemp("learnable-tiny-model")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_embedder_dir(tmp_path_factory) -> Path:
    """A 1-layer random BERT (32-d) with MiniLM's real tokenizer, saved as a sentence-transformers folder.

    Configured through `settings.embedder` like any folder; fast tests of the knowledge base and memory
    use it (their behaviour does not depend on vector quality). Tests of retrieval quality use the real
    embedded all-MiniLM-L6-v2 and are marked slow.
    """
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as models
    from transformers import AutoTokenizer, BertConfig, BertModel

    from memory.embedder import embedded_model_dir

    root = tmp_path_factory.mktemp("tiny-embedder")
    tok = AutoTokenizer.from_pretrained(embedded_model_dir())
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=512)).save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    word = models.Transformer(str(root / "bert"), max_seq_length=256)
    st = SentenceTransformer(modules=[word, models.Pooling(word.get_embedding_dimension(), "mean"),
                                      models.Normalize()], device="cpu")
    st.save(str(root / "st"))
    return root / "st"


@pytest.fixture(scope="session")
def embedded_model_dir(tmp_path_factory) -> Path:
    """The embedded SmolLM2-135M-Instruct, hash-checked and converted once per test run (~40 s),
    for the few `slow` tests that need the real model."""
    from filelock import FileLock

    from assistant.models import prepare_model

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by this run's workers: the first converts, the others wait and reuse it
    with FileLock(str(root / "embedded-model.lock")):
        return prepare_model(Settings.load(env={}, home=root / "embedded-model"), progress=False)
