"""The gate's decision: a pure function of the numbers `training/gate_metrics.py` measured.

In: the candidate's, the serving adapter's and the base model's `ModelMetrics` and a `GateConfig`. Out: a
`GateDecision` (passed or not, and why, with every check), which `training/gate_report.py` renders.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from training.gate_config import GateConfig
from training.gate_metrics import ModelMetrics


@dataclass
class Check:
    name: str
    kind: str  # "gain" | "regression" | "forgetting"
    metric: str
    passed: bool
    candidate: float | None
    reference: float | None
    reference_label: str
    threshold: str
    detail: str


@dataclass
class GateDecision:
    passed: bool
    reason: str
    checks: list[Check]
    gains: list[str]
    skipped: list[str]


HIGHER_IS_BETTER = {"val_loss": False, "pref_accuracy": True, "grounded": True, "general_ppl": False,
                    "general_qa": True}


def sign_test(candidate: Sequence[float], reference: Sequence[float]) -> tuple[int, int, float]:
    """Questions the candidate scores lower / higher than the reference on, and the exact one-sided
    sign-test p-value of losing at least that many of the differing ones if neither were better."""
    lost = sum(c < r for c, r in zip(candidate, reference, strict=True))
    won = sum(c > r for c, r in zip(candidate, reference, strict=True))
    n = lost + won
    return lost, won, sum(math.comb(n, k) for k in range(lost, n + 1)) / 2 ** n if n else 1.0


def _unless_significant(ok: bool, threshold: str, detail: str, candidate: Sequence[float] | None,
                        reference: Sequence[float] | None, significance: float) -> tuple[bool, str, str]:
    """A drop check that also passes when the drop is not significant (sign test over paired scores)."""
    if significance <= 0 or not candidate or not reference or len(candidate) != len(reference):
        return ok, threshold, detail
    lost, won, p = sign_test(candidate, reference)
    return (ok or p >= significance, threshold + f" or not significant (p >= {significance:g})",
            detail + f"; lost {lost}, won {won}, p = {p:.3f}")


def decide(candidate: ModelMetrics, baseline: ModelMetrics, base: ModelMetrics, cfg: GateConfig) -> GateDecision:
    """The gate's verdict from the numbers alone (see the module docstring)."""
    checks: list[Check] = []
    gains: list[str] = []
    skipped: list[str] = []
    gain_rules = {
        "val_loss": (cfg.min_val_loss_gain, cfg.val_loss_tolerance, True),  # (gain, tolerance, relative)
        "pref_accuracy": (cfg.min_pref_accuracy_gain, cfg.pref_accuracy_tolerance, False),
        "grounded": (cfg.min_grounded_gain, cfg.grounded_tolerance, False),
    }
    for metric in cfg.target_metrics:
        c, b = candidate.value(metric), baseline.value(metric)
        if c is None or b is None or (isinstance(c, float) and math.isnan(c)):
            skipped.append(metric)
            continue
        min_gain, tol, relative = gain_rules[metric]
        up = HIGHER_IS_BETTER[metric]
        improvement = ((c - b) if up else (b - c)) / ((abs(b) or 1.0) if relative else 1.0)  # > 0 = better

        def amount(x: float, relative: bool = relative) -> str:
            return f"{100 * x:.1f}%" if relative else f"{x:.3f}"

        gained = improvement > 0 and improvement >= min_gain
        if gained:
            gains.append(metric)
        direction = "better" if improvement > 0 else "worse" if improvement < 0 else "unchanged"
        checks.append(Check(f"{metric} gain", "gain", metric, gained, c, b, "baseline",
                            f">= {amount(min_gain)} better", f"{direction} by {amount(abs(improvement))}"))
        ok = improvement >= -tol
        threshold, detail = f"<= {amount(tol)} worse", "within tolerance" if ok else f"worse by {amount(-improvement)}"
        if metric == "grounded":
            ok, threshold, detail = _unless_significant(ok, threshold, detail, candidate.grounded_scores,
                                                        baseline.grounded_scores, cfg.grounded_significance)
        checks.append(Check(f"{metric} no regression", "regression", metric, ok, c, b, "baseline", threshold, detail))
    # Forgetting is judged against the baseline and against the base model (once, if they are the same).
    refs = [(baseline, "baseline")] if baseline is not base else []
    for ref, label in [*refs, (base, "base")]:
        c, r = candidate.general_ppl, ref.general_ppl
        if c is not None and r is not None:
            rise = (c - r) / r
            checks.append(Check(f"general perplexity vs {label}", "forgetting", "general_ppl",
                                rise <= cfg.general_ppl_tolerance, c, r, label,
                                f"<= +{100 * cfg.general_ppl_tolerance:.0f}%", f"{100 * rise:+.1f}%"))
        c, r = candidate.general_qa, ref.general_qa
        if c is not None and r is not None:
            ok = r - c <= cfg.general_qa_tolerance + 1e-9
            threshold, detail = f"drop <= {cfg.general_qa_tolerance:.2f}", f"{c - r:+.3f}"
            if label == "baseline":
                ok, threshold, detail = _unless_significant(ok, threshold, detail, candidate.general_qa_scores,
                                                            ref.general_qa_scores, cfg.general_qa_significance)
            checks.append(Check(f"general questions vs {label}", "forgetting", "general_qa", ok, c, r, label,
                                threshold, detail))
    failed = [ch for ch in checks if not ch.passed and ch.kind != "gain"]
    measured = [m for m in cfg.target_metrics if m not in skipped]
    if not measured:
        return GateDecision(False, "no target metric could be measured on the held-out set", checks, gains, skipped)
    if failed:
        return GateDecision(False, "regression: " + "; ".join(f"{ch.name} ({ch.detail})" for ch in failed),
                            checks, gains, skipped)
    if not gains:
        return GateDecision(False, "no gain on any target metric (" + ", ".join(measured) + ")",
                            checks, gains, skipped)
    return GateDecision(True, "gain on " + ", ".join(gains) + "; no regression beyond tolerance",
                        checks, gains, skipped)

