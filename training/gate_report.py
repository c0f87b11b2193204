"""The gate's report: what was measured and decided, as report.json, report.md and report.png.

In: the metrics (`training/gate_metrics.py`), the decision (`training/gate_decision.py`) and the gate's
settings. Out: the three files, written whatever the decision; the admin console and the registry show them.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from training.gate_config import GateConfig
from training.gate_decision import GateDecision
from training.gate_metrics import ModelMetrics

LABELS = ("base", "baseline", "candidate")


@dataclass
class EvalReport:
    candidate: str
    baseline: str | None  # version name / folder of the serving adapter; None = base model
    base_model: str
    eval_set: dict[str, Any]
    gate: GateConfig
    metrics: dict[str, ModelMetrics]
    decision: GateDecision
    seconds: float
    created_at: str
    samples: list[dict[str, Any]] = field(default_factory=list)
    precision: str = ""  # "cpu float32": the device and weights' dtype every answer and score was computed in

    @property
    def passed(self) -> bool:
        return self.decision.passed

    def headline(self) -> dict[str, Any]:
        """Small summary for the registry and job records."""
        c = self.metrics["candidate"]
        return {"passed": self.passed, "reason": self.decision.reason,
                "declined": self.decision.declined,
                **{m: _round(c.value(m)) for m in ("val_loss", "pref_accuracy", "liked_correct", "edit_match",
                                                     "grounded", "grounded_trained", "general_ppl", "general_qa")}}

    def to_dict(self) -> dict[str, Any]:
        return {"candidate": self.candidate, "baseline": self.baseline, "base_model": self.base_model,
                "eval_set": self.eval_set, "gate": self.gate.to_dict(),
                "metrics": {k: _clean(asdict(v)) for k, v in self.metrics.items()},
                "decision": _clean(asdict(self.decision)), "seconds": self.seconds,
                "created_at": self.created_at, "samples": self.samples, "precision": self.precision}

    def to_markdown(self) -> str:
        return render_markdown(self.to_dict())

    def save(self, out_dir: Path | str) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        (out / "report.json").write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        (out / "report.md").write_text(render_markdown(data), encoding="utf-8")
        plot_report(data, out / "report.png")
        return out


def _round(x: float | None, nd: int = 4) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else round(float(x), nd)


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf become None."""
    if isinstance(obj, float):
        return _round(obj, 6)
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------------------ rendering
_METRIC_ROWS = [("val_loss", "held-out loss (nats/token)", "lower"), ("val_ppl", "held-out perplexity", "lower"),
                ("pref_accuracy", "preference accuracy (liked, all held-out pairs)", "higher"),
                ("liked_correct", "liked-and-correct (pairs whose chosen answer its passages support)", "higher"),
                ("pref_margin", "mean log-prob margin", "higher"),
                ("edit_match", "answers nearer the user's choice than what they turned down (held-out, -1 to 1)",
                 "higher"),
                ("grounded", "grounded answers, held-out questions (decides)", "higher"),
                ("grounded_trained", "grounded answers, trained questions (shown beside)", "higher"),
                ("general_ppl", "general-text perplexity", "lower"), ("general_qa", "general questions", "higher")]


def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.4g}" if abs(x) >= 1000 else f"{x:.3f}"
    return str(x)


def render_markdown(r: dict[str, Any]) -> str:
    d = r["decision"]
    m = r["metrics"]
    cols = [k for k in LABELS if k in m]
    head = {"base": "base model", "baseline": f"serving ({r['baseline'] or 'base model'})",
            "candidate": f"candidate ({Path(r['candidate']).name})"}
    lines = [f"# Evaluation: {Path(r['candidate']).name} vs {r['baseline'] or 'the base model'}", "",
             f"**Decision: {verdict_word(d)}** — {d['reason']}", "",
             f"Base model `{r['base_model']}`; held-out set `{r['eval_set'].get('source', '')}` "
             f"({', '.join(f'{k} {v}' for k, v in r['eval_set'].get('sizes', {}).items())}); "
             f"evaluated in {r['seconds']:.1f} s on {r['created_at']}"
             + (f" ({r['precision']})." if r.get("precision") else "."), ""]
    spent = [f"{head[c].split(' (')[0]}: " + ", ".join(f"{k} {v:.0f} s" for k, v in m[c]["check_seconds"].items())
             for c in cols if m[c].get("check_seconds")]
    if spent:
        lines += ["Time per check: " + "; ".join(spent) + ".", ""]
    lines += ["## Metrics", "",
             "| metric | better | " + " | ".join(head[c] for c in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for key, label, better in _METRIC_ROWS:
        vals = [m[c].get(key) for c in cols]
        if all(v is None for v in vals):
            continue
        lines.append(f"| {label} | {better} | " + " | ".join(_fmt(v) for v in vals) + " |")
    lines += ["", "## Checks", "", "| check | result | candidate | reference | threshold | detail |",
              "|---|---|---|---|---|---|"]
    for ch in d["checks"]:
        res = "pass" if ch["passed"] else ("no gain" if ch["kind"] == "gain" else "FAIL")
        lines.append(f"| {ch['name']} | {res} | {_fmt(ch['candidate'])} | {_fmt(ch['reference'])} "
                     f"({ch['reference_label']}) | {ch['threshold']} | {ch['detail']} |")
    if d["skipped"]:
        lines += ["", f"Not measured (no held-out rows): {', '.join(d['skipped'])}."]
    if d.get("too_small"):
        lines += ["", "Not judged (too little held-out data): " + "; ".join(d["too_small"]) + "."]
    if d.get("power"):
        lines += ["", "## What these checks can see", "", *[f"- {note}" for note in d["power"]]]
    if r.get("samples"):
        lines += ["", "## Sample answers", ""]
        for s in r["samples"]:
            lines += [f"**{s['check']}: {_cell(s['question'], 200)}**", ""]
            lines += ["| model | answer |", "|---|---|"]
            for c in cols:
                if c in s["answers"]:
                    lines.append(f"| {head[c]} | {_cell(s['answers'][c], 300)} |")
            lines.append("")
    lines += ["", "## Gate configuration", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in r["gate"].items()]
    return "\n".join(lines) + "\n"


def verdict_word(decision: dict[str, Any]) -> str:
    """PROMOTE, REJECT, or DECLINED when the gate had too little held-out data to decide."""
    return "PROMOTE" if decision["passed"] else "DECLINED" if decision.get("declined") else "REJECT"


def _cell(text: str, limit: int) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def plot_report(r: dict[str, Any], path: Path) -> Path:
    """One bar group per metric (base / serving / candidate); the candidate bar green if its checks passed."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must come before pyplot
    import matplotlib.pyplot as plt

    m = r["metrics"]
    cols = [k for k in LABELS if k in m]
    shown = [(k, lbl, b) for k, lbl, b in _METRIC_ROWS
             if k in ("val_loss", "pref_accuracy", "liked_correct", "edit_match", "grounded", "grounded_trained",
                      "general_ppl", "general_qa")
             and any(m[c].get(k) is not None for c in cols)]
    failed_metrics = {ch["metric"] for ch in r["decision"]["checks"] if not ch["passed"] and ch["kind"] != "gain"}
    fig, axes = plt.subplots(1, max(len(shown), 1), figsize=(3.2 * max(len(shown), 1), 3.6), squeeze=False)
    colors = {"base": "#9e9e9e", "baseline": "#4c72b0"}
    for ax, (key, label, better) in zip(axes[0], shown, strict=False):
        vals = [m[c].get(key) for c in cols]
        bar_colors = [colors.get(c, "#c44e52" if key in failed_metrics else "#55a868") for c in cols]
        ax.bar(range(len(cols)), [v if v is not None else 0 for v in vals], color=bar_colors)
        ax.set_xticks(range(len(cols)), [{"baseline": "serving"}.get(c, c) for c in cols], fontsize=8)
        ax.set_title(f"{label}\n({better} is better)", fontsize=9)
        for i, v in enumerate(vals):
            ax.annotate(_fmt(v), (i, v or 0), ha="center", va="bottom", fontsize=7)
        positive = [v for v in vals if v]
        if key == "general_ppl" and len(positive) == len(vals) and max(positive) / min(positive) > 20:
            ax.set_yscale("log")  # a wrecked model's perplexity is orders of magnitude off the chart
        else:
            ax.set_ylim(bottom=0)  # small differences must look small
    verdict = verdict_word(r["decision"])
    fig.suptitle(f"{Path(r['candidate']).name} vs {r['baseline'] or 'base model'}: {verdict}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

