"""The in-process runtime on the tiny random Llama with two random LoRA adapters.

What is asserted: concurrent requests on different adapters give exactly the answers each gives alone
(the active adapter is state of the whole model), the answers are those of plain transformers + PEFT,
streaming, errors, cancellation, back-pressure and adapter loading failures. Greedy decoding
everywhere, so every expected text is reproducible.
"""

from __future__ import annotations

import gc
import random
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from assistant.config import Settings
from assistant.runtime import (
    AdapterLoadError,
    BackendBusy,
    GenerationError,
    GenerationSettings,
    InvalidMessages,
    TransformersBackend,
    UnknownAdapter,
    make_backend,
    normalize_messages,
)
from tests.conftest import make_random_adapter

pytestmark = pytest.mark.timeout(120)  # a hang is a failure, not a stuck CI job

GREEDY = GenerationSettings(max_new_tokens=24, temperature=0.0, top_p=1.0)
QUESTION = [{"role": "user", "content": "Tell me something about the sea."}]


# The back-pressure tests run on both serving paths; batched with a batch of one, so that one long
# generation fills it and the next request has to wait, as on the one-at-a-time path.
MODES = [pytest.param({"serving": "sequential"}, id="sequential"),
         pytest.param({"serving": "batched", "batch_max": 1}, id="batched")]


def tiny_settings(home: Path, model_dir: Path, **overrides) -> Settings:
    overrides.setdefault("dtype", "float32")  # batched answers equal answers alone (tests/conftest.py, tiny_settings)
    return Settings.load(env={}, home=home, model=str(model_dir), torch_threads=1, **overrides)


@pytest.fixture(scope="module")
def backend(tmp_path_factory, tiny_model_dir, tiny_adapters) -> TransformersBackend:
    b = make_backend(tiny_settings(tmp_path_factory.mktemp("rt-home"), tiny_model_dir), progress=False)
    assert isinstance(b, TransformersBackend)
    for name, path in tiny_adapters.items():
        b.load_adapter(name, path)
    return b


@pytest.fixture(scope="module")
def alone(backend) -> dict[str | None, str]:
    """Each adapter's greedy answer, one request at a time."""
    return {a: backend.generate(QUESTION, a, GREEDY).text for a in (None, "alpha", "beta")}


def long_generation(backend, adapter=None, cancel=None):
    """A generation that keeps the model busy until cancelled (the tiny model rarely stops)."""
    gen = backend.stream(QUESTION, adapter, GenerationSettings(max_new_tokens=1500, temperature=0.0, top_p=1.0),
                         cancel=cancel)
    next(gen)  # it holds the model now
    return gen


# ------------------------------------------------------------------------------------ correctness
def test_factory_loads_the_folder_and_applies_threads(backend, tiny_model_dir):
    assert backend.model_name == tiny_model_dir.name
    assert torch.get_num_threads() == 1
    assert backend.adapters() == ["alpha", "beta"]
    assert backend.has_adapter("alpha") and not backend.has_adapter("gamma")


def test_adapters_change_the_answer(alone):
    assert len(set(alone.values())) == 3, alone
    assert all(alone.values())


def test_answers_equal_plain_transformers_and_peft(backend, alone, tiny_model_dir, tiny_adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    msgs = normalize_messages(QUESTION, backend.settings.system_prompt)
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    n = enc["input_ids"].shape[1]

    def answer(model) -> str:
        out = model.generate(**enc, max_new_tokens=GREEDY.max_new_tokens, do_sample=False)
        return tok.decode(out[0, n:], skip_special_tokens=True)

    dtype = backend._base.dtype
    assert answer(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)) == alone[None]
    for name in ("alpha", "beta"):
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)
        assert answer(PeftModel.from_pretrained(base, tiny_adapters[name]).eval()) == alone[name]


def test_two_concurrent_requests_on_two_adapters_match_alone(backend, alone):
    gen = GenerationSettings(max_new_tokens=24, temperature=0.0, top_p=1.0)
    barrier = threading.Barrier(2)

    def run(adapter):
        barrier.wait()
        return backend.generate(QUESTION, adapter, gen)

    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(run, ["alpha", "beta"])
    assert a.text == alone["alpha"] and a.adapter == "alpha"
    assert b.text == alone["beta"] and b.adapter == "beta"
    assert a.finish_reason in ("stop", "length") and a.usage["completion_tokens"] > 0
    assert max(a.queue_wait_s, b.queue_wait_s) > 0  # they really overlapped; one waited for the other


def test_many_concurrent_mixed_requests_match_alone(backend, alone):
    adapters = [None, "alpha", "beta"] * 4
    random.Random(7).shuffle(adapters)
    with ThreadPoolExecutor(len(adapters)) as pool:
        results = list(pool.map(lambda a: backend.generate(QUESTION, a, GREEDY), adapters))
    assert [r.text for r in results] == [alone[a] for a in adapters]
    assert [r.adapter for r in results] == adapters
    # 12 requests at once on one model: most of them really waited for the gate.
    assert sum(r.queue_wait_s > 0 for r in results) >= 6
    assert backend.queue_depth == 0


def test_a_batch_answers_each_conversation_as_it_would_alone(backend, alone):
    from assistant.runtime import generate_many

    longer = [{"role": "user", "content": "Tell me something about the sea, the sky and the long winter nights."}]
    short = [{"role": "user", "content": "Hi."}]
    for adapter in (None, "alpha"):
        singles = [backend.generate(m, adapter, GREEDY) for m in (QUESTION, longer, short)]
        batch = backend.generate_batch([QUESTION, longer, short], adapter, GREEDY)
        # left padding: the prompts differ in length and each answer is still the one it gets alone
        assert [r.text for r in batch] == [r.text for r in singles]
        assert batch[0].text == alone[adapter]
        assert [r.usage for r in batch] == [r.usage for r in singles]
        assert [r.finish_reason for r in batch] == [r.finish_reason for r in singles]
    seen = []
    many = generate_many(backend, [short, QUESTION, longer, short], "beta", GREEDY, batch_size=2,
                         progress=lambda done, total: seen.append((done, total)))
    asked = (short, QUESTION, longer, short)
    assert [r.text for r in many] == [backend.generate(m, "beta", GREEDY).text for m in asked]
    assert seen == [(2, 4), (4, 4)] and backend.queue_depth == 0
    with pytest.raises(ValueError, match="greedily"):
        backend.generate_batch([QUESTION], None, GenerationSettings(max_new_tokens=4, temperature=0.7, top_p=1.0))
    with pytest.raises(UnknownAdapter):
        backend.generate_batch([QUESTION], "nope", GREEDY)


def test_stream_interval_joins_pieces_but_not_the_first(backend, alone, monkeypatch):
    # An interval longer than the whole answer: the first token's text leaves at once (time to first
    # token is untouched), everything after it leaves as one piece when the answer ends.
    monkeypatch.setattr(backend.settings, "stream_interval_ms", 60_000.0)
    with backend.stream(QUESTION, "alpha", GREEDY) as gen:
        pieces = list(gen)
    assert "".join(pieces) == alone["alpha"]
    assert len(pieces) == 2 and len(pieces[0]) < len(alone["alpha"])
    assert gen.usage["completion_tokens"] == GREEDY.max_new_tokens
    assert gen.first_token_s is not None and gen.first_token_s < gen.duration_s


def test_base_model_name_means_no_adapter(backend, alone):
    r = backend.generate(QUESTION, backend.model_name, GREEDY)
    assert r.text == alone[None] and r.adapter is None


def test_streaming_yields_the_same_text_piece_by_piece(backend, alone, monkeypatch):
    monkeypatch.setattr(backend.settings, "stream_interval_ms", 0.0)
    with backend.stream(QUESTION, "alpha", GREEDY) as gen:
        pieces = list(gen)
    assert "".join(pieces) == alone["alpha"] == gen.text
    assert "" not in pieces
    # token-level streaming: roughly one piece per token, not one blob at the end
    assert len(pieces) >= GREEDY.max_new_tokens // 2
    assert gen.usage["completion_tokens"] == GREEDY.max_new_tokens
    assert gen.usage["total_tokens"] == gen.usage["prompt_tokens"] + GREEDY.max_new_tokens
    assert gen.finish_reason == "length"
    assert gen.first_token_s is not None and gen.first_token_s <= gen.duration_s


def test_usage_counts_the_templated_prompt(backend):
    r = backend.generate(QUESTION, None, GenerationSettings(max_new_tokens=3, temperature=0.0, top_p=1.0))
    assert r.usage["prompt_tokens"] == backend.count_tokens(QUESTION)
    assert r.usage["completion_tokens"] == 3 and r.finish_reason == "length"


def test_the_template_default_system_prompt_is_never_used(backend):
    explicit = [{"role": "system", "content": backend.settings.system_prompt}, *QUESTION]
    assert backend.count_tokens(QUESTION) == backend.count_tokens(explicit)
    assert backend.generate(QUESTION, "alpha", GREEDY).text == backend.generate(explicit, "alpha", GREEDY).text
    rendered = backend.tokenizer.apply_chat_template(normalize_messages(QUESTION, "Be brief."), tokenize=False)
    assert "Be brief." in rendered and "SmolLM" not in rendered


def test_sampling_with_a_seed_is_reproducible(backend):
    gen = GenerationSettings(max_new_tokens=16, temperature=0.9, top_p=0.95, seed=123)
    first = backend.generate(QUESTION, "beta", gen).text
    assert backend.generate(QUESTION, "beta", gen).text == first
    other = GenerationSettings(max_new_tokens=16, temperature=0.9, top_p=0.95, seed=124)
    assert backend.generate(QUESTION, "beta", other).text != first


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("messages, match", [
    ([], "non-empty"),
    ([{"role": "robot", "content": "hi"}], "role"),
    ([{"role": "user"}], "'content'"),
    ([{"role": "user", "content": ["hi"]}], "string"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "first"),
    ([{"role": "system", "content": "only"}], "nothing to answer"),
])
def test_bad_messages_are_refused(backend, messages, match):
    with pytest.raises(InvalidMessages, match=match):
        backend.stream(messages, None, GREEDY)


def test_prompt_longer_than_the_context_is_refused(backend):
    long = [{"role": "user", "content": "word " * (backend.context_length + 10)}]
    with pytest.raises(InvalidMessages, match="context"):
        backend.stream(long, None, GREEDY)
    assert backend.queue_depth == 0


@pytest.mark.parametrize("kwargs", [
    dict(max_new_tokens=0, temperature=0.0, top_p=1.0),
    dict(max_new_tokens=8, temperature=-1.0, top_p=1.0),
    dict(max_new_tokens=8, temperature=float("nan"), top_p=1.0),
    dict(max_new_tokens=8, temperature=0.5, top_p=0.0),
])
def test_bad_generation_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        GenerationSettings(**kwargs)


def test_generation_settings_as_dict_and_defaults(settings):
    g = GenerationSettings.from_settings(settings, temperature=0.0)
    assert g.as_dict() == {"max_new_tokens": settings.max_new_tokens, "temperature": 0.0,
                           "top_p": settings.top_p, "seed": None}
    assert g.greedy


def test_unknown_adapter_raises_before_any_model_work(backend):
    cancel = threading.Event()
    busy = long_generation(backend, cancel=cancel)  # the model is taken: queueing would block
    try:
        t = time.perf_counter()
        with pytest.raises(UnknownAdapter, match="gamma"):
            backend.stream(QUESTION, "gamma", GREEDY)
        assert time.perf_counter() - t < 1.0
        assert backend.queue_depth == 0
    finally:
        cancel.set()
        busy.result()


# ------------------------------------------------------------------------------------ failures
def scaled_adapter(src: Path, out: Path, factor: float) -> Path:
    """A copy of an adapter with its B matrices multiplied, as a diverged training run would leave it."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    f = out / "adapter_model.safetensors"
    save_file({k: v * factor if "lora_B" in k else v for k, v in load_file(f).items()}, f)
    return out


def test_adapter_with_nan_weights_is_refused(backend, tiny_adapters, tmp_path):
    with pytest.raises(AdapterLoadError, match="NaN/Inf"):
        backend.load_adapter("nan", scaled_adapter(tiny_adapters["alpha"], tmp_path / "nan", float("nan")))
    assert backend.adapters() == ["alpha", "beta"]


def test_error_inside_generation_surfaces_without_hanging(backend, alone, tiny_adapters, tmp_path):
    # Finite but huge weights: the activations overflow, the logits turn NaN and sampling raises
    # inside the generation thread.
    backend.load_adapter("exploded", scaled_adapter(tiny_adapters["alpha"], tmp_path / "huge", 1e30))
    try:
        sampling = GenerationSettings(max_new_tokens=8, temperature=0.7, top_p=0.9)
        gen = backend.stream(QUESTION, "exploded", sampling)
        t = time.perf_counter()
        with pytest.raises(GenerationError, match="probability tensor"):
            list(gen)
        assert time.perf_counter() - t < 10
        assert gen.done
    finally:
        backend.unload_adapter("exploded")
    # the model was released and still answers correctly
    assert backend.generate(QUESTION, "alpha", GREEDY).text == alone["alpha"]


def test_cancel_stops_promptly(backend, alone):
    cancel = threading.Event()
    gen = long_generation(backend, "beta", cancel=cancel)
    cancel.set()
    rest = list(gen)
    assert gen.finish_reason == "cancelled"
    assert gen.usage["completion_tokens"] < 100
    assert len(rest) < 100
    t = time.perf_counter()
    assert backend.generate(QUESTION, "beta", GREEDY).text == alone["beta"]
    assert time.perf_counter() - t < 10


def test_close_releases_the_model(backend, alone):
    gen = long_generation(backend, "alpha")
    gen.close()
    assert gen.finish_reason == "cancelled" and gen.done
    assert list(gen) == []
    r = backend.generate(QUESTION, "alpha", GREEDY)
    assert r.text == alone["alpha"] and r.queue_wait_s < 5


def test_an_abandoned_generation_is_cancelled_when_collected(backend, alone):
    gen = long_generation(backend, "alpha")
    del gen  # a client that disconnected without closing
    gc.collect()
    r = backend.generate(QUESTION, "beta", GREEDY)
    assert r.text == alone["beta"] and r.queue_wait_s < 5


def test_stall_timeout_becomes_a_generation_error(tiny_model_dir, tmp_path):
    b = make_backend(tiny_settings(tmp_path, tiny_model_dir, generation_timeout_s=0.0001), progress=False)
    with pytest.raises(GenerationError, match="produced nothing"):
        # a prompt long enough that prefill takes longer than the stall timeout
        list(b.stream([{"role": "user", "content": "sea " * 1500}], None, GREEDY))
    # the stalled generation was cancelled and gave the model back
    b.settings = b.settings.model_copy(update={"generation_timeout_s": 60.0})
    r = b.generate(QUESTION, None, GREEDY)
    assert r.usage["completion_tokens"] > 0 and r.queue_wait_s < 5


@pytest.mark.parametrize("mode", MODES)
def test_queue_full_raises_backend_busy_at_once(tiny_model_dir, tmp_path, mode):
    b = make_backend(tiny_settings(tmp_path, tiny_model_dir, queue_max=1, **mode), progress=False)
    cancel = threading.Event()
    holder = long_generation(b, cancel=cancel)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(b.generate, QUESTION, None, GREEDY)
        deadline = time.time() + 10
        while b.queue_depth < 1 and time.time() < deadline:
            time.sleep(0.01)
        assert b.queue_depth == 1
        t = time.perf_counter()
        with pytest.raises(BackendBusy, match="already waiting"):
            b.stream(QUESTION, None, GREEDY)
        assert time.perf_counter() - t < 0.5
        cancel.set()
        holder.result()
        result = waiting.result(timeout=30)
    assert result.queue_wait_s > 0 and result.finish_reason in ("stop", "length")
    assert b.queue_depth == 0


@pytest.mark.parametrize("mode", MODES)
def test_waiting_too_long_raises_backend_busy(tiny_model_dir, tmp_path, mode):
    b = make_backend(tiny_settings(tmp_path, tiny_model_dir, queue_timeout_s=0.3, **mode), progress=False)
    cancel = threading.Event()
    holder = long_generation(b, cancel=cancel)
    try:
        t = time.perf_counter()
        with pytest.raises(BackendBusy, match="waited"):
            b.stream(QUESTION, None, GREEDY)
        assert 0.25 < time.perf_counter() - t < 3
        assert b.queue_depth == 0
    finally:
        cancel.set()
        holder.result()


@pytest.mark.parametrize("mode", MODES)
def test_cancel_while_queued_never_takes_the_model(tiny_model_dir, tmp_path, mode):
    b = make_backend(tiny_settings(tmp_path, tiny_model_dir, **mode), progress=False)
    stop_holder, stop_waiter = threading.Event(), threading.Event()
    holder = long_generation(b, cancel=stop_holder)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(b.stream, QUESTION, None, GREEDY, stop_waiter)
        while b.queue_depth < 1:
            time.sleep(0.01)
        stop_waiter.set()
        gen = waiting.result(timeout=5)
    assert list(gen) == [] and gen.finish_reason == "cancelled"
    assert b.queue_depth == 0
    stop_holder.set()
    holder.result()


# ------------------------------------------------------------------------------------ adapters
def corrupt_copy(src: Path, out: Path) -> Path:
    shutil.copytree(src, out)
    f = out / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    return out


def test_corrupt_or_missing_adapter_leaves_serving_adapters_untouched(backend, alone, tiny_adapters, tmp_path):
    with pytest.raises(AdapterLoadError, match="cannot read adapter"):
        backend.load_adapter("gamma", corrupt_copy(tiny_adapters["beta"], tmp_path / "corrupt"))
    with pytest.raises(AdapterLoadError, match="does not exist"):
        backend.load_adapter("gamma", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterLoadError, match="cannot read adapter"):
        backend.load_adapter("gamma", tmp_path / "empty")
    # a broken new version under an existing name does not replace the working one
    with pytest.raises(AdapterLoadError):
        backend.load_adapter("alpha", corrupt_copy(tiny_adapters["beta"], tmp_path / "corrupt2"))
    assert backend.adapters() == ["alpha", "beta"]
    assert {a: backend.generate(QUESTION, a, GREEDY).text for a in alone} == alone


def test_adapter_for_another_base_model_is_refused(tiny_model_dir, tiny_adapters, tmp_path):
    """Shapes that do not fit: refused, and the base model (no adapter yet) is left as it was."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    other = tmp_path / "other-model"
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=len(tok))).save_pretrained(other)
    foreign = make_random_adapter(other, tmp_path / "foreign", seed=3)

    b = make_backend(tiny_settings(tmp_path / "home", tiny_model_dir), progress=False)
    before = b.generate(QUESTION, None, GREEDY).text
    with pytest.raises(AdapterLoadError, match="size mismatch|does not fit"):
        b.load_adapter("foreign", foreign)
    assert b.adapters() == [] and b._peft is None
    assert b.generate(QUESTION, None, GREEDY).text == before
    b.load_adapter("alpha", tiny_adapters["alpha"])  # and the next load still works
    with pytest.raises(AdapterLoadError):
        b.load_adapter("foreign", foreign)
    assert b.adapters() == ["alpha"]


def test_bad_adapter_names_are_refused(backend, tiny_adapters):
    for name in ("", " alpha", "a b", backend.model_name, "x" * 200):
        with pytest.raises(ValueError):
            backend.load_adapter(name, tiny_adapters["alpha"])
    with pytest.raises(UnknownAdapter):
        backend.unload_adapter("gamma")


def test_replace_load_beside_and_unload(tiny_model_dir, tiny_adapters, alone, tmp_path):
    b = make_backend(tiny_settings(tmp_path, tiny_model_dir), progress=False)
    b.load_adapter("current", tiny_adapters["alpha"])
    assert b.generate(QUESTION, "current", GREEDY).text == alone["alpha"]
    b.load_adapter("current", tiny_adapters["beta"])  # replaced in place
    assert b.generate(QUESTION, "current", GREEDY).text == alone["beta"]
    assert b.adapters() == ["current"] and len(b._peft.peft_config) == 1
    b.unload_adapter("current")
    assert b.adapters() == [] and b._peft is None
    assert b.generate(QUESTION, None, GREEDY).text == alone[None]
    b.load_adapter("again", tiny_adapters["alpha"])
    assert b.generate(QUESTION, "again", GREEDY).text == alone["alpha"]


def test_adapter_changes_never_disturb_a_generation_in_flight(tiny_model_dir, tiny_adapters, alone, tmp_path):
    """Loads wait for the generation in flight: the first load (which wraps the model in PEFT), a
    load beside, and a replacement of the very adapter being used."""
    b = make_backend(tiny_settings(tmp_path, tiny_model_dir), progress=False)
    long = GenerationSettings(max_new_tokens=120, temperature=0.0, top_p=1.0)

    def in_flight(adapter, change) -> None:
        expected = b.generate(QUESTION, adapter, long).text
        gen = b.stream(QUESTION, adapter, long)
        first = next(gen)
        change()
        assert gen.done is False
        assert first + "".join(gen) == expected

    in_flight(None, lambda: b.load_adapter("v1", tiny_adapters["alpha"]))
    in_flight("v1", lambda: b.load_adapter("v2", tiny_adapters["beta"]))
    in_flight("v1", lambda: b.load_adapter("v1", tiny_adapters["beta"]))
    assert b.generate(QUESTION, "v1", GREEDY).text == alone["beta"]
    in_flight("v2", lambda: b.unload_adapter("v1"))  # roll forward: callers switched to v2
    assert b.adapters() == ["v2"]
    assert b.generate(QUESTION, "v2", GREEDY).text == alone["beta"]


def test_request_for_an_adapter_unloaded_while_it_waited(tiny_model_dir, tiny_adapters, tmp_path):
    b = make_backend(tiny_settings(tmp_path, tiny_model_dir, serving="sequential"), progress=False)
    b.load_adapter("old", tiny_adapters["alpha"])
    cancel = threading.Event()
    holder = long_generation(b, cancel=cancel)
    with ThreadPoolExecutor(2) as pool:
        waiting = pool.submit(b.stream, QUESTION, "old", GREEDY)
        while b.queue_depth < 1:
            time.sleep(0.01)
        unloading = pool.submit(b.unload_adapter, "old")  # goes ahead of the waiting request
        while b._gate._priority_waiting < 1:
            time.sleep(0.01)
        cancel.set()
        holder.result()
        unloading.result(timeout=10)
        with pytest.raises(UnknownAdapter, match="unloaded while"):
            waiting.result(timeout=10)
    assert b.queue_depth == 0
    assert b.generate(QUESTION, None, GREEDY).finish_reason in ("stop", "length")


# ------------------------------------------------------------------------------------ OpenAI-compatible server
@pytest.fixture(scope="module")
def api_server(tmp_path_factory, tiny_model_dir, tiny_adapters):
    """This product's own API server (a real uvicorn in a thread) in front of the tiny model."""
    from tests.helpers import start_server

    srv = start_server(tmp_path_factory.mktemp("oa-server"), tiny_model_dir, tiny_adapters)
    yield srv
    srv.stop()


def remote_settings(api_server, home: Path, **overrides) -> Settings:
    user = api_server.services.store.create_user(f"rt{time.monotonic_ns()}", "runtime-password-1")
    key = api_server.services.store.create_api_key(user.id)
    values = dict(backend="openai", openai_base_url=api_server.url + "/v1", openai_api_key=key,
                  model_name=api_server.services.backend.model_name)
    values.update(overrides)
    return Settings.load(env={}, home=home, **values)


def test_openai_backend_against_a_real_server(api_server, tmp_path):
    from assistant.runtime import OpenAIBackend

    remote = make_backend(remote_settings(api_server, tmp_path))
    assert isinstance(remote, OpenAIBackend)
    assert remote.adapters() == ["alpha", "beta"]  # the "assistant" alias is not an adapter
    assert remote.has_adapter("beta") and not remote.has_adapter("assistant")

    gen = GenerationSettings(max_new_tokens=10, temperature=0.0, top_p=1.0)
    whole = remote.generate(QUESTION, "alpha", gen)
    assert whole.text and whole.adapter == "alpha" and whole.finish_reason in ("stop", "length")
    assert whole.usage["prompt_tokens"] > 0 and 0 < whole.usage["completion_tokens"] <= 10
    with remote.stream(QUESTION, "alpha", gen) as streamed:
        pieces = list(streamed)
    assert "".join(pieces) == whole.text and "" not in pieces
    assert streamed.usage == whole.usage
    assert remote.generate(QUESTION, "beta", gen).text != whole.text
    assert remote.generate(QUESTION, None, gen).adapter is None
    # no batch endpoint over HTTP: generate_many asks one request at a time
    from assistant.runtime import generate_many

    seen = []
    many = generate_many(remote, [QUESTION, QUESTION], "beta", gen, progress=lambda d, n: seen.append((d, n)))
    assert [r.text for r in many] == [remote.generate(QUESTION, "beta", gen).text] * 2
    assert seen == [(1, 2), (2, 2)]

    calls = api_server.calls
    with pytest.raises(UnknownAdapter):
        remote.stream(QUESTION, "gamma", gen)
    assert api_server.calls == calls  # refused before the server generated anything


def test_openai_backend_cancel(api_server, tmp_path):
    remote = make_backend(remote_settings(api_server, tmp_path))
    cancel = threading.Event()
    gen = remote.stream(QUESTION, "beta", GenerationSettings(max_new_tokens=400, temperature=0.0, top_p=1.0),
                        cancel=cancel)
    next(gen)
    cancel.set()
    assert list(gen) == [] and gen.finish_reason == "cancelled"


def test_openai_backend_with_a_wrong_base_name_fails_at_start(api_server, tmp_path):
    from assistant.runtime import BackendError

    with pytest.raises(BackendError, match="does not serve 'no-such-model'"):
        make_backend(remote_settings(api_server, tmp_path, model_name="no-such-model"))
