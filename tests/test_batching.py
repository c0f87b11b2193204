"""Batched serving (serving=batched): many requests decoded together, each on its own adapter.

What is asserted, on the tiny random Llama with random LoRA adapters: a request's answer does not
depend on its neighbours (greedy: the very tokens it gets alone; sampled with a seed: the same draw),
and a routing that mixed adapters up would be caught; cancelling one stream leaves the others whole;
hot-swap and unload inside a running batch; back-pressure; no answer ends in a broken character;
the admin-only vLLM-style LoRA endpoints, driven by `OpenAIBackend` against this product's own server.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from assistant.batching import PieceStreamer, clean_text
from assistant.config import Settings
from assistant.runtime import (
    AdapterLoadError,
    BackendBusy,
    GenerationSettings,
    TransformersBackend,
    UnknownAdapter,
    make_backend,
)
from tests.conftest import tiny_settings

pytestmark = pytest.mark.timeout(600)  # generous: the CI box may be shared; a hang still fails

QUESTION = [{"role": "user", "content": "Tell me something about the sea."}]
OTHER = [{"role": "user", "content": "What do you know about the mountains, the rivers and the long winters?"}]
GREEDY = GenerationSettings(max_new_tokens=24, temperature=0.0, top_p=1.0)
LONG = GenerationSettings(max_new_tokens=80, temperature=0.0, top_p=1.0)
HOLD = GenerationSettings(max_new_tokens=300, temperature=0.0, top_p=1.0)  # still running after an adapter load
ADAPTERS = (None, "alpha", "beta", "gamma")




def backend_with(home: Path, model_dir: Path, adapters: dict[str, Path], **overrides) -> TransformersBackend:
    b = make_backend(tiny_settings(home, model_dir, **overrides), progress=False)
    assert isinstance(b, TransformersBackend)
    for name, path in adapters.items():
        b.load_adapter(name, path)
    return b


@pytest.fixture(scope="module")
def batched(tmp_path_factory, tiny_model_dir, three_adapters) -> TransformersBackend:
    return backend_with(tmp_path_factory.mktemp("batched"), tiny_model_dir, three_adapters, serving="batched",
                        batch_max=8)


@pytest.fixture(scope="module")
def alone(tmp_path_factory, tiny_model_dir, three_adapters) -> dict[tuple[str | None, int, int], str]:
    """Answers of the one-at-a-time path (another backend, another model copy): (adapter, prompt, tokens) -> text."""
    b = backend_with(tmp_path_factory.mktemp("alone"), tiny_model_dir, three_adapters, serving="sequential")
    out = {}
    for a in ADAPTERS:
        for p, msgs in enumerate((QUESTION, OTHER)):
            for gen in (GREEDY, LONG, HOLD) if a in ("alpha", "gamma") else (GREEDY, LONG):
                out[(a, p, gen.max_new_tokens)] = b.generate(msgs, a, gen).text
    b.close()
    return out


def start_all(backend, jobs) -> list:
    """Start every (messages, adapter, settings) job from one thread: `stream` returns once a request has
    joined the batch, so all of them run together while the first still decodes."""
    return [backend.stream(m, a, g) for m, a, g in jobs]


# ------------------------------------------------------------------------------------ neighbours
def test_a_mixed_batch_gives_every_request_its_answer_alone(batched, alone):
    jobs = [(msgs, a, GREEDY) for a in ADAPTERS for msgs in (QUESTION, OTHER)]  # 8 rows, 4 adapters, 2 lengths
    engine = batched._engine
    mixed_before = engine.steps
    gens = start_all(batched, jobs)
    assert len(engine.rows) >= 6  # they really share the batch
    results = [g.result() for g in gens]
    for (msgs, a, _), r in zip(jobs, results, strict=True):
        assert r.text == alone[(a, 0 if msgs is QUESTION else 1, GREEDY.max_new_tokens)], (a, msgs)
        assert r.adapter == a and r.finish_reason == "length"
        assert r.usage["completion_tokens"] == GREEDY.max_new_tokens
        assert r.usage["prompt_tokens"] == batched.count_tokens(msgs)
    assert engine.steps > mixed_before and not engine.rows
    assert len({r.text for (m, _, _), r in zip(jobs, results, strict=True) if m is QUESTION}) == 4


def test_the_equality_check_catches_swapped_adapters(batched, alone, monkeypatch):
    """The test above can fail: route each row to its neighbour's adapter and the answers change."""
    real = batched.route

    def swapped(internals):
        return real(internals[::-1])

    monkeypatch.setattr(batched, "route", swapped)
    jobs = [(QUESTION, a, GREEDY) for a in ADAPTERS]
    results = [g.result() for g in start_all(batched, jobs)]
    wrong = [r.text != alone[(a, 0, GREEDY.max_new_tokens)] for (_, a, _), r in zip(jobs, results, strict=True)]
    assert sum(wrong) >= 3


def test_the_gathered_lora_matches_peft_adapter_names(batched):
    """A mixed batch goes through one gathered LoRA matmul per layer (assistant/lora_gather.py): its logits
    are PEFT's own `adapter_names` logits, row for row, and differ from the base model's."""
    import torch

    def compare() -> tuple[float, float]:
        names = [batched.resolve_adapter(a) for a in ADAPTERS]
        try:
            ids = torch.tensor([[5, 9, 13, 2, 7]] * len(names))
            model, kwargs = batched.route(names)
            assert kwargs == {} and model is not batched._peft  # the gathered path, not adapter_names
            gathered = model(input_ids=ids).logits
            batched._set_lora(True)
            peft = batched._peft(input_ids=ids, adapter_names=[n or "__base__" for n in names]).logits
            return float((gathered - peft).abs().max()), float((peft[1:] - peft[0]).abs().max())
        finally:
            for n in names:
                batched.release_adapter(n)

    with torch.inference_mode():
        diff, spread = batched._engine.call(compare)
    assert diff < 1e-4 and spread > 1e-3, (diff, spread)


def test_a_seeded_sampled_request_draws_the_same_in_a_batch(batched):
    sampled = GenerationSettings(max_new_tokens=20, temperature=0.9, top_p=0.9, seed=7)
    first = batched.generate(QUESTION, "beta", sampled).text
    jobs = [(OTHER, "alpha", LONG), (QUESTION, "beta", sampled), (QUESTION, None, LONG),
            (OTHER, "gamma", GenerationSettings(max_new_tokens=30, temperature=1.0, top_p=1.0, seed=1))]
    results = [g.result() for g in start_all(batched, jobs)]
    assert results[1].text == first
    reseeded = GenerationSettings(max_new_tokens=20, temperature=0.9, top_p=0.9, seed=8)
    assert batched.generate(QUESTION, "beta", reseeded).text != first


def test_cancelling_one_stream_leaves_the_others_whole(batched, alone):
    cancel = threading.Event()
    keep1, victim, keep2 = (batched.stream(QUESTION, "alpha", LONG), batched.stream(OTHER, "beta", LONG, cancel),
                            batched.stream(QUESTION, None, LONG))
    next(victim)
    cancel.set()
    list(victim)
    assert victim.finish_reason == "cancelled" and victim.usage["completion_tokens"] < LONG.max_new_tokens
    closed = batched.stream(OTHER, "gamma", LONG)
    next(closed)
    closed.close()  # a client that went away
    assert keep1.result().text == alone[("alpha", 0, LONG.max_new_tokens)]
    assert keep2.result().text == alone[(None, 0, LONG.max_new_tokens)]


def test_the_queue_drains_in_parallel(batched):
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda a: batched.generate(QUESTION, a, LONG), list(ADAPTERS) * 2))
    # 8 requests on a batch of 8: none waits for another to finish (80 decode steps each)
    slowest_step = max(r.duration_s for r in results) / LONG.max_new_tokens
    assert max(r.queue_wait_s for r in results) < 10 * slowest_step
    assert batched.queue_depth == 0


# ------------------------------------------------------------------------------------ adapters in flight
def test_hot_swap_during_batched_streaming(tmp_path, tiny_model_dir, three_adapters, alone):
    """`live` is replaced while 3 requests stream on it: they finish on the old weights, requests that
    start after the swap get the new ones, in the same batch, and the old weights go when the last
    old request ends."""
    b = backend_with(tmp_path, tiny_model_dir, {"live": three_adapters["alpha"]}, batch_max=8)
    old = [b.stream(m, "live", HOLD) for m in (QUESTION, OTHER, QUESTION)]
    first = [next(g) for g in old]
    b.load_adapter("live", three_adapters["beta"])
    new = [b.stream(m, "live", LONG) for m in (QUESTION, OTHER)]
    deadline = time.time() + 10
    while len(b._engine.rows) < 5 and time.time() < deadline:  # the last one may still be in its prefill
        time.sleep(0.001)
    assert len(b._engine.rows) == 5 and len(b._peft.peft_config) == 2  # both versions serve at once
    for g, m, f in zip(old, (QUESTION, OTHER, QUESTION), first, strict=True):
        assert f + "".join(g) == alone[("alpha", 0 if m is QUESTION else 1, HOLD.max_new_tokens)]
        assert g.finish_reason == "length"
    for g, m in zip(new, (QUESTION, OTHER), strict=True):
        assert g.result().text == alone[("beta", 0 if m is QUESTION else 1, LONG.max_new_tokens)]
    assert len(b._peft.peft_config) == 1 and b.adapters() == ["live"]


def test_unload_waits_for_the_last_request(tmp_path, tiny_model_dir, three_adapters, alone):
    b = backend_with(tmp_path, tiny_model_dir, {"going": three_adapters["gamma"], "staying": three_adapters["beta"]})
    gen = b.stream(QUESTION, "going", HOLD)
    first = next(gen)
    with ThreadPoolExecutor(1) as pool:
        unloading = pool.submit(b.unload_adapter, "going")
        deadline = time.time() + 10
        while b.has_adapter("going") and time.time() < deadline:
            time.sleep(0.01)
        assert not b.has_adapter("going")  # new requests are refused at once...
        with pytest.raises(UnknownAdapter):
            b.stream(QUESTION, "going", GREEDY)
        time.sleep(0.2)
        assert not unloading.done() and not gen.done  # ...while the one in flight still runs on it
        assert first + "".join(gen) == alone[("gamma", 0, HOLD.max_new_tokens)]
        unloading.result(timeout=10)
    assert list(b._peft.peft_config) == [b._adapters["staying"].internal]
    assert b.generate(QUESTION, "staying", GREEDY).text == alone[("beta", 0, GREEDY.max_new_tokens)]


# ------------------------------------------------------------------------------------ back-pressure
def test_back_pressure_counts_requests_waiting_outside_the_batch(tmp_path, tiny_model_dir):
    b = backend_with(tmp_path, tiny_model_dir, {}, batch_max=2, queue_max=1, queue_timeout_s=30)
    forever = GenerationSettings(max_new_tokens=1500, temperature=0.0, top_p=1.0)
    stop = threading.Event()
    running = [b.stream(QUESTION, None, forever, stop) for _ in range(2)]  # the batch is full
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(b.generate, QUESTION, None, GREEDY)
        deadline = time.time() + 10
        while b.queue_depth < 1 and time.time() < deadline:
            time.sleep(0.01)
        assert b.queue_depth == 1
        with pytest.raises(BackendBusy, match="already waiting"):
            b.stream(QUESTION, None, GREEDY)
        stop.set()
        for g in running:
            g.result()
        r = waiting.result(timeout=30)
    assert r.queue_wait_s > 0 and r.usage["completion_tokens"] == GREEDY.max_new_tokens


def test_a_refused_request_gets_503_and_writes_nothing(tmp_path, tiny_model_dir):
    """Through the API: a full batch and no room to wait -> 503 with Retry-After, no conversation stored."""
    from tests.helpers import start_server

    srv = start_server(tmp_path, tiny_model_dir, serving="batched", batch_max=1, queue_max=0)
    stop = threading.Event()
    try:
        store = srv.services.store
        user = store.create_user("refused", "refused-password-1")
        key = store.create_api_key(user.id)
        forever = GenerationSettings(max_new_tokens=1500, temperature=0.0, top_p=1.0)
        held = srv.services.backend.stream(QUESTION, None, forever, stop)  # takes the one place in the batch
        next(held)
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=60, headers={"Authorization": f"Bearer {key}"},
                       json={"model": "assistant", "max_tokens": 8, "messages": QUESTION})
        assert r.status_code == 503 and r.headers.get("retry-after"), r.text
        assert r.json()["error"]["code"] == "server_busy"
        assert store.list_conversations(user.id) == []
        stop.set()
        held.result()
        ok = httpx.post(srv.url + "/v1/chat/completions", timeout=60, headers={"Authorization": f"Bearer {key}"},
                        json={"model": "assistant", "max_tokens": 8, "messages": QUESTION})
        assert ok.status_code == 200 and len(store.list_conversations(user.id)) == 1
    finally:
        stop.set()
        srv.stop()


@pytest.mark.parametrize("serving", ["batched", "sequential"])
def test_a_refused_request_does_none_of_its_turn(tmp_path, tiny_model_dir, serving):
    """Back-pressure comes before the turn's own work: a "remember that ..." refused with 503 stores no
    memory (the agent's remember step runs while the prompt is built), and a refused question neither
    retrieves nor writes; once the model is free the same request is answered and remembered."""
    from tests.helpers import start_server

    srv = start_server(tmp_path, tiny_model_dir, with_agent=True, serving=serving, batch_max=1, queue_max=0)
    stop = threading.Event()
    try:
        store, memories = srv.services.store, srv.services.memories
        user = store.create_user("refused", "refused-password-1")
        key = store.create_api_key(user.id)
        forever = GenerationSettings(max_new_tokens=1500, temperature=0.0, top_p=1.0)
        held = srv.services.backend.stream(QUESTION, None, forever, stop)  # takes the model
        next(held)
        ask = [{"role": "user", "content": "Remember that my favourite colour is green."}]
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=60, headers={"Authorization": f"Bearer {key}"},
                       json={"model": "assistant", "max_tokens": 4, "messages": ask})
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_busy", r.text
        assert memories.list_memories(user.id) == [] and store.list_conversations(user.id) == []
        stop.set()
        held.result()
        ok = httpx.post(srv.url + "/v1/chat/completions", timeout=60, headers={"Authorization": f"Bearer {key}"},
                        json={"model": "assistant", "max_tokens": 4, "messages": ask})
        assert ok.status_code == 200, ok.text
        assert [m.text for m in memories.list_memories(user.id)] == ["My favourite colour is green."]
    finally:
        stop.set()
        srv.stop()


# ------------------------------------------------------------------------------------ broken characters
@pytest.mark.parametrize("text", ["안녕하세요, 반갑습니다. 오늘 날씨가 좋네요!", "Let's go 😀🎉 to the 바다 🌊."])
def test_no_answer_ends_in_a_broken_character(tokenizer_dir, text):
    """Korean syllables and emoji span several byte-level tokens; an answer cut after any token (max_tokens,
    cancel) keeps only whole characters, streamed and stored alike."""
    import queue

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tok.decode(ids[:n]) for n in range(1, len(ids)))  # the cut really splits characters
    for n in range(1, len(ids) + 1):
        out: queue.Queue = queue.Queue()
        streamer = PieceStreamer(tok, out)
        for t in ids[:n]:
            streamer.add(t)
        streamer.end()
        pieces = [out.get() for _ in range(out.qsize())]
        whole = "".join(pieces)
        assert "\ufffd" not in whole and text.startswith(whole), (n, whole)
        assert whole == clean_text(tok, ids[:n], final=True)


# ------------------------------------------------------------------------------------ vLLM-style endpoints
@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir, tiny_adapters):
    from tests.helpers import start_server

    srv = start_server(tmp_path_factory.mktemp("lora-server"), tiny_model_dir, {"alpha": tiny_adapters["alpha"]})
    yield srv
    srv.stop()


def key_for(server, role: str) -> str:
    store = server.services.store
    user = store.create_user(f"{role}{time.monotonic_ns()}", "lora-password-1", role=role)
    return store.create_api_key(user.id)


def test_lora_endpoints_refuse_non_admins(server, tiny_adapters):
    body = {"lora_name": "sneaky", "lora_path": str(tiny_adapters["beta"])}
    for path, payload in (("/v1/load_lora_adapter", body), ("/v1/unload_lora_adapter", {"lora_name": "alpha"})):
        assert httpx.post(server.url + path, json=payload).status_code == 401
        r = httpx.post(server.url + path, json=payload, headers={"Authorization": f"Bearer {key_for(server, 'user')}"})
        assert r.status_code == 403, r.text
    assert server.services.backend.adapters() == ["alpha"]


def in_adapters_dir(server, src: Path | None, name: str) -> Path:
    """A copy of `src` (None: an empty folder) in the server's adapters folder, where loads are read from."""
    import shutil

    dst = server.services.settings.adapters_dir / name
    if src is None:
        dst.mkdir(parents=True)
    else:
        shutil.copytree(src, dst)
    return dst


def test_lora_endpoints_bad_input(server, tiny_adapters):
    h = {"Authorization": f"Bearer {key_for(server, 'admin')}"}
    personal = server.services.settings.personal_adapters_dir / "7" / "u7-v0001"
    personal.parent.mkdir(parents=True)
    import shutil

    shutil.copytree(tiny_adapters["beta"], personal)
    r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "mine", "lora_path": str(personal)},
                   headers=h)
    assert r.status_code == 403 and "personal adapter" in r.json()["error"]["message"], r.text
    empty = in_adapters_dir(server, None, "empty")
    r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(empty)}, headers=h)
    assert r.status_code == 409 and "cannot read adapter" in r.json()["error"]["message"]
    no_path = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "x"}, headers=h)
    assert no_path.status_code in (400, 422)
    assert httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "nope"}, headers=h).status_code == 404
    server.services.chat.set_serving("alpha")
    try:
        r = httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "alpha"}, headers=h)
        assert r.status_code == 409 and "serving adapter" in r.text
    finally:
        server.services.chat.set_serving(None)
    assert server.services.backend.adapters() == ["alpha"]


def test_openai_backend_hot_swap_and_rollback_against_our_server(server, tiny_adapters, tmp_path):
    """The remote backend's whole adapter life cycle, as the registry drives it, against a real server."""
    local = server.services.backend
    remote = make_backend(Settings.load(env={}, home=tmp_path, backend="openai", openai_base_url=server.url + "/v1",
                                        openai_api_key=key_for(server, "admin"), model_name=local.model_name))
    gen = GenerationSettings(max_new_tokens=12, temperature=0.0, top_p=1.0)
    long = GenerationSettings(max_new_tokens=60, temperature=0.0, top_p=1.0)
    # the server builds its own prompt (system prompt, memory), so answers are compared with its own
    before = remote.generate(QUESTION, "alpha", gen).text

    beta = in_adapters_dir(server, tiny_adapters["beta"], "beta")
    alpha = in_adapters_dir(server, tiny_adapters["alpha"], "a")
    remote.load_adapter("v2", beta)  # roll out under a new name
    assert remote.adapters() == ["alpha", "v2"] and local.has_adapter("v2")
    assert remote.generate(QUESTION, "v2", gen).text != before
    with pytest.raises(AdapterLoadError, match="already serves"):  # never replaced in place
        remote.load_adapter("v2", alpha)
    with pytest.raises(AdapterLoadError, match="refused"):  # the server's refusal, nothing changed
        remote.load_adapter("v3", server.services.settings.adapters_dir / "missing")
    assert remote.adapters() == ["alpha", "v2"]

    whole_v2 = remote.generate(QUESTION, "v2", long).text
    streaming = remote.stream(QUESTION, "v2", long)
    first = next(streaming)
    remote.unload_adapter("v2")  # roll back to alpha: the server waits for the stream on v2 to finish
    assert first + "".join(streaming) == whole_v2 and streaming.finish_reason == "length"
    assert remote.adapters() == ["alpha"] and not local.has_adapter("v2")
    assert remote.generate(QUESTION, "alpha", gen).text == before
    with pytest.raises(UnknownAdapter):
        remote.unload_adapter("v2")
