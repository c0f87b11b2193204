"""The evaluation gate's settings: when a candidate adapter may replace the one serving.

One dataclass, every field with its help text (`GateConfig.help()`); the loop writes it as `gate.json` next
to each evaluation, and `python -m training.evaluate --gate FILE` reads it back. The rules that use it are in
`training/gate_decision.py`.
"""

from __future__ import annotations

import math
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

TARGET_METRICS = ("val_loss", "pref_accuracy", "grounded", "liked_correct")
# Every metric a gate may judge. edit_match (greedy answers to the user's own held-out questions: nearer the answer
# they edited into or chose than the one they turned down?) costs a generation per question, so only the personal
# gate asks for it.
METRICS = (*TARGET_METRICS, "edit_match")
# What users see: a promotion's gain must come from one of these (held-out loss over a few conversations moved
# in every loop run, including the ones whose adapters answered worse: issue 26).
USER_METRICS = ("grounded", "liked_correct")


def _f(default: Any, help: str) -> Any:
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


# ------------------------------------------------------------------------------------------ config
@dataclass
class GateConfig:
    """When a candidate may replace the serving adapter. Every field carries its help text."""

    target_metrics: list[str] = _f(
        list(TARGET_METRICS),
        "Metrics on which the candidate must not regress (beyond its *_tolerance) against the serving adapter. "
        "Choose from val_loss, pref_accuracy, grounded, liked_correct, edit_match. Metrics the held-out set cannot "
        "measure, or measures on fewer rows than their min_*_rows, are skipped and reported.")
    gain_metrics: list[str] = _f(
        list(USER_METRICS),
        "Metrics a promotion's gain must come from: at least one must rise by its min_*_gain AND significantly "
        "(gain_significance). Default: what users see, grounded answers to held-out document questions and "
        "liked-and-correct (held-out preference pairs whose chosen answer states no fact its passages lack).")
    gain_significance: float = _f(
        0.05, "A gain counts only when an exact one-sided sign test over the items the two models score "
        "differently gives p below this value: with no losses, 5 wins are the fewest that can count.")
    min_val_loss_gain: float = _f(
        0.01, "Smallest relative drop in held-out loss that counts as a gain (0.01 = 1% lower).")
    min_pref_accuracy_gain: float = _f(0.05, "Smallest rise in preference accuracy that counts as a gain.")
    min_grounded_gain: float = _f(0.05, "Smallest rise in the grounded-answer score that counts as a gain.")
    min_liked_correct_gain: float = _f(0.05, "Smallest rise in liked-and-correct that counts as a gain.")
    min_edit_match_gain: float = _f(
        0.05, "Smallest rise in edit_match (per held-out choice of the user's, closeness of the greedy answer to the "
        "chosen answer minus its closeness to the turned-down one, -1 to 1, averaged) that counts as a gain.")
    min_sft_rows: int = _f(
        8, "Fewest held-out conversations (answers scored) for held-out loss to be judged at all.")
    min_pair_rows: int = _f(12, "Fewest held-out preference pairs for preference accuracy to be judged.")
    min_liked_correct_rows: int = _f(
        12, "Fewest held-out pairs with a correct chosen answer for liked-and-correct to be judged.")
    min_grounded_rows: int = _f(
        16, "Fewest held-out document questions (never trained on) for grounding to be judged. Below it the "
        "gate declines to decide: it cannot tell a candidate that lost grounding from one that did not.")
    min_edit_match_rows: int = _f(
        8, "Fewest held-out choices of the user's (an answer they edited into or chose, and the one they turned "
        "down) for edit_match to be judged.")
    min_general_rows: int = _f(40, "Fewest general-suite questions for the forgetting guard to be judged.")
    val_loss_tolerance: float = _f(
        0.02, "Largest relative rise in held-out loss accepted on the way to a gain elsewhere (0.02 = 2%).")
    pref_accuracy_tolerance: float = _f(0.05, "Largest drop in preference accuracy accepted.")
    liked_correct_tolerance: float = _f(0.05, "Largest drop in liked-and-correct accepted.")
    edit_match_tolerance: float = _f(0.05, "Largest drop in edit_match accepted.")
    grounded_tolerance: float = _f(
        0.05, "Largest drop in held-out grounding against the serving adapter accepted, whatever else improved "
        "and however noisy: with 20 questions a net loss of one answer passes and two do not (with fewer, one "
        "answer still passes: a single question cannot tell a loss from noise). (Until issue 26 a "
        "drop passed unless a sign test found it significant; a candidate that lost 3 and won 1 of 16 passed "
        "and users lost a quarter of their paraphrased answers.)")
    general_ppl_tolerance: float = _f(
        0.10, "Catastrophic-forgetting guard: largest relative rise in general-text perplexity accepted, "
        "against the baseline AND the base model (0.10 = 10%).")
    general_qa_tolerance: float = _f(
        0.01, "Catastrophic-forgetting guard: largest drop in the general-question keyword score accepted, "
        "against the baseline AND the base model. 0.01: with the shipped 120 questions, a net loss of one "
        "question (0.008) passes and two do not (at 0.10 a loop run promoted an adapter that answered "
        "'Italie is the capital of Italy').")
    general_qa_significance: float = _f(
        0.05, "Against the serving adapter only (the base model's line stays hard): a general-question drop "
        "beyond the tolerance refuses the candidate when it is also significant, an exact one-sided sign test "
        "over the questions the two answer differently giving p below this value. In the loop bench adapters "
        "changed 11-24 of the 120 answers, both ways, so the serving adapter's lucky wins would otherwise "
        "ratchet the bar up for every later candidate. 0 = the plain tolerance, as against the base model.")
    max_new_tokens: int = _f(48, "Tokens generated per answer for the grounded and general-question checks.")
    max_sft: int = _f(64, "Held-out conversations scored at most (first ones; bounds CPU time).")
    max_pairs: int = _f(64, "Held-out preference pairs scored at most.")
    max_doc_qa: int = _f(24, "Document questions answered at most, held-out and trained ones each.")
    max_general: int = _f(
        0, "General-suite questions asked at most, spread evenly over the suite (every third of the shipped 120 "
        "for 40): 0 = all. The personal gate asks 40 (training/personal.py), to bound a personal retrain's time.")
    batch_size: int = _f(8, "Sequences per forward pass / generation batch.")
    batch_tokens: int = _f(
        8192, "Most prompt tokens in one generation batch (rows x its longest prompt; prompts are batched longest "
        "first): long document prompts go in smaller batches and short questions in larger ones, up to batch_size. "
        "Fewer batches mean fewer decoding steps, which cost a CPU about the same at 8 rows as at 40.")
    max_length: int = _f(1024, "Longest scored sequence in tokens (longer prompts are cut from the left).")
    precision: str = _f(
        "float32", "Weights' dtype for every answer and score the gate computes: 'float32', or 'serving' for the "
        "server's own dtype. In bfloat16 a greedy answer depends on which questions share its batch (bench/"
        "gate_batches.py: 1-4 of 17 answers changed with the batch, none in float32), so a decision resting on "
        "a net two or three answers could be the batch's; float32 costs the gate about 2.4x its generation time "
        "on a CPU with native bfloat16.")
    samples: int = _f(4, "Answers per check shown side by side in the report.")

    def validate(self) -> None:
        errors = []
        for name in ("target_metrics", "gain_metrics"):
            chosen = getattr(self, name)
            bad = [m for m in chosen if m not in METRICS]
            if bad or not chosen:
                errors.append(f"{name} must be a non-empty subset of {list(METRICS)}, got {bad or '[]'}")
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name.startswith(("min_", "max_")) or f.name.endswith("_tolerance"):
                if not isinstance(v, int | float) or isinstance(v, bool) or v < 0 or not math.isfinite(v):
                    errors.append(f"{f.name} must be a finite number >= 0, got {v!r}")
        for name in ("general_qa_significance", "gain_significance"):
            p = getattr(self, name)
            if not isinstance(p, int | float) or isinstance(p, bool) or not 0 <= p < 1:
                errors.append(f"{name} must be a number in [0, 1), got {p!r}")
        if self.precision not in ("float32", "serving"):
            errors.append(f"precision must be 'float32' or 'serving', got {self.precision!r}")
        for name in ("max_new_tokens", "batch_size", "batch_tokens", "max_length"):
            if getattr(self, name) < 1:
                errors.append(f"{name} must be >= 1")
        if errors:
            raise ValueError("invalid gate config: " + "; ".join(errors))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GateConfig:
        if not isinstance(data, dict):
            raise ValueError(f"a gate config must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown gate config keys: {unknown} (see GateConfig.help())")
        hints = typing.get_type_hints(cls)
        for k, v in data.items():
            want = hints[k]
            ok = (isinstance(v, list) and all(isinstance(x, str) for x in v)) if want == list[str] else (
                isinstance(v, str) if want is str else
                isinstance(v, int) and not isinstance(v, bool) if want is int else
                isinstance(v, int | float) and not isinstance(v, bool))
            if not ok:
                raise ValueError(f"gate config {k}={v!r} is not of type {want}")
        cfg = cls(**data)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata["help"] for f in fields(cls)}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {f.name: (f.default_factory() if f.default is MISSING else f.default)  # type: ignore[misc]
                for f in fields(cls)}

