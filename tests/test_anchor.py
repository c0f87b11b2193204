"""Replay anchored to the base model (training/anchor.py): which base answers are kept, the cache, and
the loop's dataset using the anchored file. The agreeing/disagreeing cases run on the embedded SmolLM2,
whose real answers are what the check is for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from assistant.config import Settings
from assistant.runtime import make_backend
from training.anchor import agrees, anchored_replay


def write_replay(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in rows), encoding="utf-8")
    return path


def answers(path: Path) -> list[str]:
    return [json.loads(line)["messages"][-1]["content"] for line in path.read_text().splitlines()]


def test_agrees_needs_every_new_word_and_number_of_the_reference() -> None:
    q = "How many legs does a bird have?"
    assert agrees(q, "A bird has two legs.", "Birds have two legs, like people.")
    assert not agrees(q, "A bird has two legs.", "A bird has four legs.")
    assert agrees("Which planet is known as the Red Planet?", "Mars is known as the Red Planet.",
                  "The Red Planet is a planet in the solar system known as Mars.")
    assert not agrees("What is 100 divided by 4?", "100 divided by 4 is 25.", "100 divided by 4 is 20.5.")
    assert agrees("What is 100 divided by 4?", "100 divided by 4 is 25.", "It equals 25.")
    assert not agrees(q, "A bird has two legs.", "")
    assert not agrees(q, "A bird has two legs.", "A bird has two legs. " + "It flies far away. " * 12)  # wanders


def test_anchored_replay_is_cached_per_model_file_and_prompt(tmp_path, tiny_model_dir) -> None:
    settings = Settings.load(env={}, home=tmp_path / "home", model=str(tiny_model_dir), torch_threads=1)
    backend = make_backend(settings, progress=False)
    try:
        replay = write_replay(tmp_path / "replay.jsonl", [("What color is snow?", "Snow is white."),
                                                          ("What is 2 + 2?", "2 + 2 is 4.")])
        calls = []
        first = anchored_replay(backend, replay, "Be brief.", tmp_path / "cache",
                                progress=lambda d, n: calls.append((d, n)))
        assert (first.rows, first.cached) == (2, False) and calls == [(2, 2)]  # one batch
        # A random model's answers never state the facts: fewer than min_own agree, so both hand-written
        # answers stay rather than leaving nothing to replay.
        assert (first.base_answers, first.kept_reference, first.dropped) == (0, 2, 0)
        assert answers(first.path) == ["Snow is white.", "2 + 2 is 4."]
        again = anchored_replay(backend, replay, "Be brief.", tmp_path / "cache")
        assert again.cached and again.path == first.path and again.rows == 2
        other = anchored_replay(backend, replay, "Be detailed.", tmp_path / "cache")
        assert not other.cached and other.path != first.path
    finally:
        backend.close()


@pytest.mark.slow
def test_the_base_models_right_answers_replace_the_references(tmp_path, embedded_model_dir) -> None:
    """Its right answer in its own words; a question it gets wrong gets no row (its short hand-written answer
    taught terse general answers), unless too few agree, when the references stay."""
    settings = Settings.load(env={}, home=tmp_path / "home", model=str(embedded_model_dir), torch_threads=1)
    backend = make_backend(settings, progress=False)
    try:
        replay = write_replay(tmp_path / "replay.jsonl", [
            ("What is the capital of France?", "Paris."),
            ("How many legs does a bird have?", "A bird has two legs."),  # SmolLM2-135M says four
        ])
        report = anchored_replay(backend, replay, settings.system_prompt, tmp_path / "cache", min_own=1)
        [france] = answers(report.path)
        assert france != "Paris." and "Paris" in france, france
        assert (report.rows, report.base_answers, report.kept_reference, report.dropped) == (1, 1, 0, 1)
        few = anchored_replay(backend, replay, settings.system_prompt, tmp_path / "cache", min_own=2)
        assert not few.cached and answers(few.path) == [france, "A bird has two legs."]
        assert (few.rows, few.base_answers, few.kept_reference, few.dropped) == (2, 1, 1, 0)
    finally:
        backend.close()
