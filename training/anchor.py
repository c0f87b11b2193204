"""Replay anchored to the base model: general replay rows answered by the base model itself.

Why. The loop trains on what users liked, and users of a product have a style (short answers that
name the product, say). Replay rows with hand-written short answers teach that style on general
questions as well, and at that length a small model starts dropping facts ("2 + 3 is 6"): the
forgetting the gate refuses. Replay whose answers are the base model's own greedy outputs pulls the
adapter back to the base model wherever there is no product context, so the users' style stays where
their feedback was (self-distillation as a guard against forgetting).

A base answer is kept only when it agrees with the hand-written reference (every content word and
number the reference adds to the question is there, in at most `MAX_WORDS` words) and was not cut off;
otherwise the reference stays. The result is an ordinary
replay JSONL, cached under ``<home>/cache/anchors`` and keyed by the base model, the replay file,
the system prompt and the generation settings, so only the first cycle pays for it.

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

ANCHOR_FORMAT = 2  # bump when the way answers are made or checked changes (invalidates caches); 2: batched
MAX_NEW_TOKENS = 96
BATCH_SIZE = 8

MAX_WORDS = 40  # longer base answers wander (and a wandering answer is not worth keeping)
NUMBER_WORDS = frozenset({"one", "two"})  # stopwords to the teacher, facts here ("a bird has two legs")


@dataclass
class AnchorReport:
    path: Path
    rows: int
    base_answers: int  # rows whose answer is now the base model's
    kept_reference: int  # base answer disagreed, wandered or was cut off: the hand-written answer stays
    cached: bool
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "rows": self.rows, "base_answers": self.base_answers,
                "kept_reference": self.kept_reference, "cached": self.cached, "seconds": round(self.seconds, 2)}


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


def _cache_key(model_name: str, replay_path: Path, system_prompt: str) -> str:
    h = hashlib.sha256()
    for part in (str(ANCHOR_FORMAT), str(MAX_NEW_TOKENS), str(MAX_WORDS), model_name, system_prompt):
        h.update(part.encode("utf-8") + b"\0")
    h.update(replay_path.read_bytes())
    return h.hexdigest()[:16]


def anchored_replay(backend: Backend, replay_path: Path, system_prompt: str, cache_dir: Path, *,
                    progress: Callable[[int, int], None] | None = None) -> AnchorReport:
    """The replay file with base-model answers where they agree with the reference (cached)."""
    from assistant.prompt import render_turn
    from assistant.runtime import GenerationSettings, generate_many
    from training.dataset_sources import replay_examples

    started = time.perf_counter()
    replay_path = Path(replay_path)
    key = _cache_key(str(backend.model_name), replay_path, system_prompt)
    out = Path(cache_dir) / f"replay-{key}.jsonl"
    meta_path = out.with_suffix(".meta.json")
    if out.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        return AnchorReport(out, meta["rows"], meta["base_answers"], meta["kept_reference"], True,
                            time.perf_counter() - started)

    rows = replay_examples(replay_path)
    gen = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0, top_p=1.0, seed=0)
    conversations = [[{"role": r, "content": c} for r, c in row.prompt] for row in rows]
    # Batched where the backend can, 8 at a time (one request each took 96 s for 43 rows on the 2-core box).
    results = generate_many(backend, [render_turn(system_prompt, t[:-1], t[-1]["content"]) for t in conversations],
                            None, gen, batch_size=BATCH_SIZE, progress=progress)
    lines, base_answers = [], 0
    for row, turns, result in zip(rows, conversations, results, strict=True):
        answer = result.text.strip()
        use_base = result.finish_reason == "stop" and agrees(turns[-1]["content"], row.completion, answer)
        base_answers += use_base
        turns.append({"role": "assistant", "content": answer if use_base else row.completion})
        lines.append(json.dumps({"messages": turns}, ensure_ascii=False))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(out)
    meta = {"rows": len(rows), "base_answers": base_answers, "kept_reference": len(rows) - base_answers,
            "model": str(backend.model_name), "replay": str(replay_path), "format": ANCHOR_FORMAT}
    meta_path.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return AnchorReport(out, len(rows), base_answers, len(rows) - base_answers, False,
                        time.perf_counter() - started)
