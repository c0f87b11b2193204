"""Replay anchored to the base model: general replay rows answered by the base model itself.

Why. The loop trains on what users liked, and users of a product have a style (short answers that
name the product, say). Replay rows with hand-written short answers teach that style on general
questions as well, and at that length a small model starts dropping facts ("2 + 3 is 6"): the
forgetting the gate refuses. Replay whose answers are the base model's own greedy outputs pulls the
adapter back to the base model wherever there is no product context, so the users' style stays where
their feedback was (self-distillation as a guard against forgetting).

A base answer is kept only when it agrees with the hand-written reference (every content word and
number the reference adds to the question is there, in at most `MAX_WORDS` words) and was not cut off.
A question the base model gets wrong gets no replay row: its hand-written answer is short, and in a loop
bench run (Northgate Rail Depot, 2026-12-07) the 48 such rows among 58 replay rows taught the adapter terse
general answers that dropped facts ("The capital of Spain is Spain."): the candidate lost 6 of the 120
general questions; without them it lost none and kept its gain on the trained questions. Only when fewer
than `min_own` answers agree (a model that knows little, or a tiny test model) do the hand-written answers
stay, so there is still something to replay. The result is an ordinary replay JSONL, cached under
``<home>/cache/anchors`` and keyed by the base model, the replay file, the system prompt and the
generation settings, so only the first cycle pays for it.

In: a backend (``assistant.runtime``: answers with ``adapter=None`` are the base model's), the replay
file, the serving system prompt. Out: `AnchorReport` with the path of the anchored replay file.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.teacher import content_words, numbers

if TYPE_CHECKING:
    from assistant.runtime import Backend

ANCHOR_FORMAT = 3  # bump when the way answers are made or checked changes (invalidates caches); 3: own only
MAX_NEW_TOKENS = 96
BATCH_SIZE = 8

MAX_WORDS = 40  # longer base answers wander (and a wandering answer is not worth keeping)
MIN_OWN = 16  # fewer agreeing answers than this: the hand-written answers stay for the rest
NUMBER_WORDS = frozenset({"one", "two"})  # stopwords to the teacher, facts here ("a bird has two legs")


@dataclass
class AnchorReport:
    path: Path
    rows: int  # replay rows written: base_answers + kept_reference
    base_answers: int  # rows whose answer is the base model's
    kept_reference: int  # too few answers agreed (below min_own): these rows keep the hand-written answer
    dropped: int  # questions whose base answer disagreed, wandered or was cut off: no row
    cached: bool
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "rows": self.rows, "base_answers": self.base_answers,
                "kept_reference": self.kept_reference, "dropped": self.dropped, "cached": self.cached,
                "seconds": round(self.seconds, 2)}


def _stems(text: str) -> set[str]:
    return set(content_words(text, keep=NUMBER_WORDS))


def agrees(question: str, reference: str, answer: str) -> bool:
    """True when `answer` states what the reference adds to the question (every content word and
    number of the reference that the question does not already contain) in at most `MAX_WORDS` words."""
    words = answer.split()
    if not words or len(words) > max(MAX_WORDS, 2 * len(reference.split())):
        return False
    needed = _stems(reference) - _stems(question)
    return needed <= _stems(answer) and numbers(reference) - numbers(question) <= numbers(answer)


def _cache_key(model_name: str, replay_path: Path, system_prompt: str, min_own: int) -> str:
    h = hashlib.sha256()
    for part in (str(ANCHOR_FORMAT), str(MAX_NEW_TOKENS), str(MAX_WORDS), str(min_own), model_name, system_prompt):
        h.update(part.encode("utf-8") + b"\0")
    h.update(replay_path.read_bytes())
    return h.hexdigest()[:16]


def anchored_replay(backend: Backend, replay_path: Path, system_prompt: str, cache_dir: Path, *,
                    progress: Callable[[int, int], None] | None = None, min_own: int = MIN_OWN) -> AnchorReport:
    """The replay rows the base model answers right, in its own words (cached); see the module docstring."""
    from assistant.prompt import render_turn
    from assistant.runtime import GenerationSettings, generate_many
    from training.dataset_sources import replay_examples

    started = time.perf_counter()
    replay_path = Path(replay_path)
    key = _cache_key(str(backend.model_name), replay_path, system_prompt, min_own)
    out = Path(cache_dir) / f"replay-{key}.jsonl"
    meta_path = out.with_suffix(".meta.json")
    if out.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        return AnchorReport(out, meta["rows"], meta["base_answers"], meta["kept_reference"], meta["dropped"], True,
                            time.perf_counter() - started)

    rows = replay_examples(replay_path)
    gen = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0, top_p=1.0, seed=0)
    conversations = [[{"role": r, "content": c} for r, c in row.prompt] for row in rows]
    # Batched where the backend can, 8 at a time (one request each took 96 s for 43 rows on the 2-core box).
    results = generate_many(backend, [render_turn(system_prompt, t[:-1], t[-1]["content"]) for t in conversations],
                            None, gen, batch_size=BATCH_SIZE, progress=progress)
    answered = []
    for row, turns, result in zip(rows, conversations, results, strict=True):
        answer = result.text.strip()
        own = result.finish_reason == "stop" and agrees(turns[-1]["content"], row.completion, answer)
        answered.append((row, turns, answer if own else None))
    base_answers = sum(answer is not None for _, _, answer in answered)
    keep_reference = base_answers < min_own
    lines = []
    for row, turns, answer in answered:
        if answer is None and not keep_reference:
            continue
        turns.append({"role": "assistant", "content": row.completion if answer is None else answer})
        lines.append(json.dumps({"messages": turns}, ensure_ascii=False))
    kept_reference = len(lines) - base_answers
    dropped = len(rows) - len(lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(out)
    meta = {"rows": len(lines), "base_answers": base_answers, "kept_reference": kept_reference, "dropped": dropped,
            "model": str(backend.model_name), "replay": str(replay_path), "format": ANCHOR_FORMAT}
    meta_path.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return AnchorReport(out, len(lines), base_answers, kept_reference, dropped, False,
                        time.perf_counter() - started)
