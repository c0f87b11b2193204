"""The static slot cache of batched serving (assistant/batching.py, `SlotCache`), forced on for the CPU
without CUDA graphs and with a small cache: every request of a mixed batch (3 adapters and the base
model, greedy) gets exactly the tokens the one-at-a-time path gives it alone, with rows that join late,
rows that finish early, a roll of the cache at column L, and a row cut ("length") at the largest L.
On CUDA the same step is replayed as a CUDA graph (bench/serving_gpu.py, docs/benchmarks.md).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from assistant.batching import SlotSpec
from assistant.config import Settings
from assistant.runtime import GenerationSettings, TransformersBackend
from tests.conftest import tiny_settings

pytestmark = pytest.mark.timeout(300)

QUESTION = [{"role": "user", "content": "Tell me something about the sea."}]
OTHER = [{"role": "user", "content": "What do you know about the mountains, the rivers and the long winters?"}]
SHORT = GenerationSettings(max_new_tokens=10, temperature=0.0, top_p=1.0)
LONG = GenerationSettings(max_new_tokens=40, temperature=0.0, top_p=1.0)
ADAPTERS = (None, "alpha", "beta", "gamma")




def slot_backend(home: Path, model_dir: Path, adapters: dict[str, Path], spec: SlotSpec) -> TransformersBackend:
    b = TransformersBackend.from_settings(tiny_settings(home, model_dir, serving="batched", batch_max=8),
                                          progress=False, slots=spec)
    for name, path in adapters.items():
        b.load_adapter(name, path)
    return b


@pytest.fixture(scope="module")
def alone(tmp_path_factory, tiny_model_dir, three_adapters) -> dict[tuple[str | None, int, int], str]:
    """The one-at-a-time path's answers (another model copy): (adapter, prompt, tokens) -> text."""
    b = TransformersBackend.from_settings(tiny_settings(tmp_path_factory.mktemp("alone"), tiny_model_dir,
                                                       serving="sequential"), progress=False)
    for name, path in three_adapters.items():
        b.load_adapter(name, path)
    out = {(a, p, gen.max_new_tokens): b.generate(msgs, a, gen).text
           for a in ADAPTERS for p, msgs in enumerate((QUESTION, OTHER)) for gen in (SHORT, LONG)}
    b.close()
    return out


@pytest.fixture(scope="module")
def lengths(alone, tmp_path_factory, tiny_model_dir) -> tuple[int, int]:
    b = TransformersBackend.from_settings(tiny_settings(tmp_path_factory.mktemp("n"), tiny_model_dir), progress=False)
    n = b.count_tokens(QUESTION), b.count_tokens(OTHER)
    b.close()
    assert n[1] > n[0]  # the waves below rely on it
    return n


def wait_for(cond, seconds: float = 30.0) -> None:
    deadline = time.time() + seconds
    while not cond():
        assert time.time() < deadline
        time.sleep(0.001)


def test_late_joiners_early_finishers_and_a_roll_give_every_request_its_answer_alone(
        tmp_path, tiny_model_dir, three_adapters, alone, lengths):
    n_q, _ = lengths
    # Wide enough for one LONG answer on QUESTION, not for the same answer started 3+ columns later:
    # the second wave (starting after 3 steps of the first) must roll the cache to finish.
    spec = SlotSpec(max_len=n_q + LONG.max_new_tokens + 1, min_len=16, graphs=False)
    b = slot_backend(tmp_path, tiny_model_dir, three_adapters, spec)
    engine, slots = b._engine, b._engine.slots
    assert slots is not None
    first = [(OTHER, a, SHORT) for a in ADAPTERS]  # finish early
    gens = [b.stream(m, a, g) for m, a, g in first]
    wait_for(lambda: engine.steps >= 3)
    second = [(QUESTION, a, LONG) for a in ADAPTERS]  # join late, run past column L
    gens += [b.stream(m, a, g) for m, a, g in second]
    assert len(engine.rows) >= 6  # they share the batch
    results = [g.result() for g in gens]
    for (msgs, a, gen), r in zip(first + second, results, strict=True):
        assert r.text == alone[(a, 0 if msgs is QUESTION else 1, gen.max_new_tokens)], (a, gen.max_new_tokens)
        assert r.finish_reason == "length" and r.usage["completion_tokens"] == gen.max_new_tokens
    assert slots.length == spec.max_len and slots.rolls >= 1  # grown to the largest L, then rolled
    assert len({r.text for r in results[4:]}) == 4  # four adapters, four answers
    assert not engine.rows and sorted(slots.free) == list(range(8))
    # the slots are reused: the batch, now empty, serves the same answers again
    again = [b.stream(QUESTION, a, SHORT) for a in ADAPTERS]
    assert [g.result().text for g in again] == [alone[(a, 0, SHORT.max_new_tokens)] for a in ADAPTERS]
    b.close()


def test_the_bucketed_prefill_gives_every_request_its_answer_alone(tmp_path, tiny_model_dir, three_adapters, alone,
                                                                   lengths):
    """`SlotSpec.bucketed_prefill` (the default on CUDA, where each bucket is a captured graph; here eager):
    a group of joining prompts is padded to a bucket of rows and width (powers of two), prefilled with each
    row's LoRA slot and copied into the slot cache whole. Two groups, the second joining a running batch:
    every answer is the one the request gets alone."""
    n_q, n_o = lengths
    b = slot_backend(tmp_path, tiny_model_dir, three_adapters,
                     SlotSpec(max_len=256, min_len=16, graphs=False, bucketed_prefill=True))
    engine, slots = b._engine, b._engine.slots
    assert slots is not None
    asked = [(OTHER, "alpha", LONG), (QUESTION, "beta", LONG), (QUESTION, None, LONG),  # 3 rows: a bucket of 4
             (OTHER, "gamma", SHORT), (QUESTION, "alpha", SHORT)]  # join the running batch: a bucket of 2
    results: list = [None] * len(asked)

    def ask(i: int) -> None:
        msgs, a, gen = asked[i]
        results[i] = b.generate(msgs, a, gen)

    threads = []
    for wave in (range(3), range(3, 5)):  # each wave waits while the engine is held, then joins as one group
        gate = threading.Event()
        held = threading.Thread(target=engine.call, args=(gate.wait,))
        held.start()
        wait_for(lambda: engine._running and not engine._commands)
        threads += [threading.Thread(target=ask, args=(i,)) for i in wave]
        for t in threads[-len(wave):]:
            t.start()
        wait_for(lambda n=len(wave): engine.waiting == n)
        gate.set()
        held.join()
        wait_for(lambda n=len(threads): len(engine.rows) == n or engine.steps >= 3)
    for t in threads:
        t.join()
    for (msgs, a, gen), r in zip(asked, results, strict=True):
        assert r.text == alone[(a, 0 if msgs is QUESTION else 1, gen.max_new_tokens)], (a, gen.max_new_tokens)
    assert engine.prefills == slots.bucket_prefills == 2
    assert sorted(slots._buckets) == [(2, max(16, 1 << (n_o - 1).bit_length())),
                                      (4, max(16, 1 << (n_o - 1).bit_length()))]
    b.close()


def test_a_row_that_fills_the_largest_cache_ends_with_length(tmp_path, tiny_model_dir, three_adapters, alone,
                                                              lengths):
    n_q, n_o = lengths
    spec = SlotSpec(max_len=n_o + 12, min_len=16, graphs=False)
    b = slot_backend(tmp_path, tiny_model_dir, three_adapters, spec)
    cut, short = b.stream(OTHER, "gamma", LONG), b.stream(QUESTION, "alpha", SHORT)
    r, s = cut.result(), short.result()
    assert r.finish_reason == "length" and r.usage["completion_tokens"] == spec.max_len - n_o + 1
    assert alone[("gamma", 1, LONG.max_new_tokens)].startswith(r.text) and r.text
    assert s.text == alone[("alpha", 0, SHORT.max_new_tokens)]
    b.close()


def test_the_equality_check_catches_swapped_lora_slots(tmp_path, tiny_model_dir, three_adapters, alone, monkeypatch):
    """The tests above can fail: give each slot its neighbour's LoRA weights and the answers change."""
    b = slot_backend(tmp_path, tiny_model_dir, three_adapters, SlotSpec(max_len=256, min_len=16, graphs=False))
    real = b.slot_route

    def swapped(internals, rows, compiled=False):
        forward, kwargs, lora, key = real(internals, rows, compiled)
        return forward, kwargs, lora[::-1] if lora else lora, key

    monkeypatch.setattr(b, "slot_route", swapped)
    gens = [b.stream(QUESTION, a, SHORT) for a in ADAPTERS]
    wrong = [g.result().text != alone[(a, 0, SHORT.max_new_tokens)] for a, g in zip(ADAPTERS, gens, strict=True)]
    assert sum(wrong) >= 3
    b.close()


def test_an_adapter_loaded_mid_batch_serves_at_once(tmp_path, tiny_model_dir, three_adapters, alone):
    """Loading an adapter between two steps changes the step's model (on CUDA: a new graph); the row
    already running keeps its answer and the new adapter's first request gets its own."""
    b = slot_backend(tmp_path, tiny_model_dir, {"alpha": three_adapters["alpha"]},
                     SlotSpec(max_len=256, min_len=16, graphs=False))
    running = b.stream(OTHER, "alpha", LONG)
    head = next(running)
    b.load_adapter("gamma", three_adapters["gamma"])
    late = b.stream(QUESTION, "gamma", SHORT)
    assert late.result().text == alone[("gamma", 0, SHORT.max_new_tokens)]
    assert head + "".join(running) == alone[("alpha", 1, LONG.max_new_tokens)]
    b.close()


def test_sampled_rows_beside_greedy_ones_in_the_slot_cache(tmp_path, tiny_model_dir, three_adapters, alone):
    """Greedy rows start each step before the host has read the last (their input comes from the GPU's
    argmax); a sampled row makes the engine read first. A seeded row draws the same alone and beside
    greedy rows that come and go, and the greedy rows keep their answers alone."""
    b = slot_backend(tmp_path, tiny_model_dir, three_adapters, SlotSpec(max_len=256, min_len=16, graphs=False))
    sampled = GenerationSettings(max_new_tokens=20, temperature=0.9, top_p=0.9, seed=7)
    first = b.generate(QUESTION, "beta", sampled).text
    greedy = [b.stream(OTHER, "alpha", LONG), b.stream(QUESTION, None, SHORT)]
    wait_for(lambda: b._engine.steps >= 2)
    mixed = b.stream(QUESTION, "beta", sampled)  # joins running greedy rows, outlives the short one
    assert mixed.result().text == first
    assert [g.result().text for g in greedy] == [alone[("alpha", 1, LONG.max_new_tokens)],
                                                 alone[(None, 0, SHORT.max_new_tokens)]]
    assert b.generate(QUESTION, "beta", GenerationSettings(max_new_tokens=20, temperature=0.9, top_p=0.9,
                                                           seed=8)).text != first
    b.close()


def test_the_streaming_decoder_gives_the_tokenizers_text(tokenizer_dir):
    """Streaming calls the fast tokenizer's Rust decoder directly: the same text as `decode`, for every
    prefix (cut characters included) and with special tokens skipped."""
    from transformers import AutoTokenizer

    from assistant.batching import _decoder, clean_text

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tok.encode("Hello 안녕하세요 🙂, sea!") + [tok.eos_token_id] + tok.encode(" end")
    decode = _decoder(tok)
    assert decode.__name__ == "<lambda>" and "rust" in decode.__code__.co_freevars  # the direct path
    for n in range(len(ids) + 1):
        want = tok.decode(ids[:n], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert decode(ids[:n]) == want
        assert clean_text(tok, ids[:n], final=True) == clean_text(_SlowDecode(tok), ids[:n], final=True)


class _SlowDecode:
    """A tokenizer that only has `decode`: the path every other tokenizer takes."""

    def __init__(self, tok):
        self.decode = tok.decode


def test_the_cpu_keeps_the_eager_step_whatever_cuda_graphs_says(tmp_path, tiny_model_dir):
    """`cuda_graphs` (on by default) turns the slot cache on for CUDA only; a CPU backend keeps the
    growing cache and eager step that the rest of the suite tests."""
    for on in (True, False):
        settings = tiny_settings(tmp_path, tiny_model_dir, serving="batched", cuda_graphs=on)
        assert settings.cuda_graphs is on
        b = TransformersBackend.from_settings(settings, progress=False)
        assert b.device.type == "cpu" and b._engine is not None and b._engine.slots is None
        b.close()
    assert Settings.load(env={}, home=tmp_path).cuda_graphs is True
