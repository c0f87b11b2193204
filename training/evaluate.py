"""The evaluation gate: is a candidate adapter better than the one serving, without forgetting?

In: the base model folder, the candidate adapter folder, the serving adapter folder (or none: then
the base model is the baseline), the frozen held-out evaluation set (`EvalSet`, read from a dataset
snapshot by `load_eval_set`), the general-ability suite shipped with the project
(``training/general_suite/*.jsonl``) and a `GateConfig`.
Out: an `EvalReport` (per-model metrics, the checks and the decision), saved as ``report.json``,
``report.md`` and ``report.png`` whatever the decision.

The code is split by stage (issue 22): `training/gate_config.py` (the settings), `training/gate_metrics.py` (the
held-out data and every measurement), `training/gate_decision.py` (the rules) and `training/gate_report.py`
(report.json / .md / .png). This module runs them in order and keeps the names its importers use.

Metrics, each measured for the candidate and the baseline (the general suite for the base model too):

- ``val_loss``: mean negative log-likelihood per assistant token on the held-out conversations (also
  reported as perplexity). Lower is better.
- ``pref_accuracy``: share of held-out preference pairs where the model gives the chosen answer a
  higher log-probability than the rejected one (sum over the answer's tokens, as DPO scores them).
- ``liked_correct``: the same over the pairs whose chosen answer states no number or code its passages lack
  (`training/fact_check.py`): what users liked AND what is right.
- ``grounded``: on held-out document questions (never trained on), answered greedily with the source passage in
  the prompt, the share of the passage's key facts that the answer contains. ``grounded_trained``: the same on
  questions whose facts users asked, shown beside it and never deciding.
- ``edit_match`` (asked for by the personal gate only): the user's held-out choices (an answer they edited into
  or chose, and the one they turned down), each question answered greedily in the served prompt; per question the
  answer's closeness to the chosen answer minus its closeness to the turned-down one (`leaning`; closeness is
  difflib's character similarity ratio, so list markers, a closing question and the opening words count with
  the words, and what the two answers share cancels), -1 to 1, averaged.
- ``general_ppl``: perplexity on short reference texts, and ``general_qa``: share of expected keywords
  in greedy answers to simple general questions: the catastrophic-forgetting guard. The shipped
  suite has 120 single-fact questions over eight areas (geography, arithmetic, science, animals,
  language, time and units, everyday objects, people and history), none of them in the training replay
  set. It was written as a fair test, not picked for what the base model knows: SmolLM2-135M answers
  about half of them (0.51-0.56 over the prompts and answer lengths measured). So a candidate can lose
  some questions and win others; the score is the net. `GateConfig.max_general` asks a subset spread over the
  suite instead (the personal gate asks 40: training/personal.py), and the report's power lines say so.

The decision (`decide`, a pure function of the numbers), in order: a measure on fewer held-out items than its
``min_*_rows`` is not judged (the report lists it); a regression beyond a tolerance refuses the candidate, and
held-out grounding's line is hard (no significance escape); too few held-out document questions, or too little
data for every gain metric, declines to decide (not promoted, and the report says so); otherwise the candidate
needs a gain on grounding or liked-and-correct that is at least the stated minimum AND significant (one-sided
sign test), and the general suite must stay within tolerance of both the baseline and the base model. The report
states what each check can see at its size (`GateDecision.power`).

Run it as its own process (it loads its own copy of the model), like training::

    python -m training.evaluate --base-model DIR --candidate DIR [--baseline DIR] --data SNAPSHOT \\
        --out REPORT_DIR [--gate gate.json] [--threads 1]

It prints JSON lines (``event`` = eval_progress / eval_done / error) and exits 0 when the evaluation
ran (passed or not), 1 when it failed, 2 on bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from training.gate_config import TARGET_METRICS, GateConfig
from training.gate_decision import Check, GateDecision, decide, sign_test
from training.gate_metrics import (
    DEFAULT_SYSTEM_PROMPT,
    SUITE_DIR,
    Completion,
    DocQA,
    EvalDataError,
    EvalSet,
    GeneralQA,
    GeneralSuite,
    ModelMetrics,
    PrefPair,
    Progress,
    Scorer,
    closeness,
    doc_qa_item,
    fact_score,
    grounded_prompt,
    key_facts,
    keyword_score,
    leaning,
    load_eval_set,
    load_general_suite,
    measure,
    prompt_key,
    read_jsonl,
    samples,
)
from training.gate_report import LABELS, EvalReport, plot_report, render_markdown

# The names importers of this module use; the code lives in the gate_* modules (issue 22's split).
__all__ = ["DEFAULT_SYSTEM_PROMPT", "LABELS", "SUITE_DIR", "TARGET_METRICS", "Check", "Completion", "DocQA",
           "EvalDataError", "EvalReport", "EvalSet", "GateConfig", "GateDecision", "GeneralQA", "GeneralSuite",
           "ModelMetrics", "PrefPair", "Progress", "Scorer", "closeness", "decide", "doc_qa_item", "evaluate",
           "fact_score", "general_power", "general_subset", "grounded_prompt", "key_facts", "keyword_score",
           "leaning", "load_eval_set", "load_general_suite", "main", "measure", "plot_report", "read_jsonl",
           "render_markdown", "sign_test"]


def load_models(base_model: Path, candidate: Path, baseline: Path | None, device: str = "cpu",
                dtype: str = "float32") -> tuple[Any, Any]:
    """The base model with the candidate (and baseline) adapter loaded as "candidate" / "baseline"."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=getattr(torch, dtype)).to(device)
    model = PeftModel.from_pretrained(model, str(candidate), adapter_name="candidate")
    if baseline is not None:
        model.load_adapter(str(baseline), adapter_name="baseline")
    model.eval()
    return model, tok


def _base_cache_key(base_model: Path, suite: GeneralSuite, gate: GateConfig, system_prompt: str, device: str,
                    dtype: str) -> str:
    """What the base model's general-suite results depend on: its files (name, size, modification time),
    the suite, the prompt, the generation settings and the library versions."""
    import torch
    import transformers

    h = hashlib.sha256()
    for f in sorted(p for p in base_model.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(base_model)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    parts = [json.dumps([[q.question, q.keywords] for q in suite.qa]), json.dumps(suite.reference), system_prompt,
             device, dtype, str(gate.max_new_tokens), str(gate.batch_size), str(gate.batch_tokens),
             str(gate.max_length),
             torch.__version__, transformers.__version__, "1"]
    h.update("\0".join(parts).encode())
    return h.hexdigest()[:24]


def general_subset(suite: GeneralSuite, n: int) -> GeneralSuite:
    """At most `n` of the suite's questions (0: all), spread evenly over it: the shipped suite is ordered by area,
    so its first questions would all be geography."""
    if not n or n >= len(suite.qa):
        return suite
    return GeneralSuite(suite.reference, [suite.qa[i * len(suite.qa) // n] for i in range(n)])


def general_power(n: int, gate: GateConfig) -> str:
    """What the forgetting guard can see on `n` general questions (a subset of the suite: the personal gate)."""
    one = 100 / n
    k = math.floor(gate.general_qa_tolerance * n + 1e-9) + 1
    return (f"general_qa on {n} questions (a subset of the suite): one question is {one:.1f} points; a net loss of "
            f"{k} or more ({k * one:.1f} points) against the base model is refused.")


def _read_general(path: Path | None, suite: GeneralSuite) -> dict[str, Any] | None:
    """Kept general-suite results, or None: no cache, none kept yet, or a damaged file (measured again)."""
    if path is None or not path.is_file():
        return None
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
        return known if len(known["answers"]) == len(suite.qa) else None
    except (ValueError, KeyError, TypeError):
        return None


def _write_general(path: Path | None, mm: ModelMetrics, grounded_key: str | None = None) -> None:
    """Keep `mm`'s general-suite results in `path`, and its grounded answers under `grounded_key` (the questions'
    hash) beside the ones kept for other question sets."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    grounded: dict[str, list[str]] = {}
    with contextlib.suppress(OSError, ValueError, AttributeError):
        grounded = dict(json.loads(path.read_text(encoding="utf-8")).get("grounded") or {})
    if grounded_key is not None and "grounded" in mm.answers:
        grounded[grounded_key] = mm.answers["grounded"]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"general_ppl": mm.general_ppl, "answers": mm.answers["general_qa"],
                               "grounded": grounded}), encoding="utf-8")
    tmp.replace(path)


def _read_own(path: Path | None) -> dict[str, str]:
    """The baseline's kept answers to a user's held-out questions (by `prompt_key`); empty when none are."""
    if path is None or not path.is_file():
        return {}
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
        return {str(k): str(v) for k, v in known.items()} if isinstance(known, dict) else {}
    except ValueError:
        return {}


def _write_own(path: Path | None, known: dict[str, str], es: EvalSet, mm: ModelMetrics) -> None:
    """Keep the answers of this evaluation's held-out questions (only those: the file never outgrows the
    held-out set), and drop the files of earlier baselines in the same folder."""
    if path is None or "edit_match" not in mm.answers:
        return
    answers = {prompt_key(p.prompt): a for p, a in zip(es.own_choices(), mm.answers["edit_match"], strict=True)}
    if answers == known:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(answers, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)
    for old in path.parent.glob("baseline-*.json"):
        if old != path:
            old.unlink(missing_ok=True)


def _questions_key(questions: Sequence[DocQA]) -> str:
    return hashlib.sha256(json.dumps([[q.question, q.passage, q.title] for q in questions]).encode()).hexdigest()[:24]


def evaluate(base_model: Path | str, candidate: Path | str, eval_set: EvalSet, *,
             baseline: Path | str | None = None, baseline_name: str | None = None,
             candidate_name: str | None = None, gate: GateConfig | None = None,
             suite: GeneralSuite | None = None, system_prompt: str = DEFAULT_SYSTEM_PROMPT,
             progress: Progress | None = None, device: str = "cpu", dtype: str = "float32",
             threads: int | None = None, base_cache: Path | str | None = None,
             own_cache: Path | str | None = None) -> EvalReport:
    """Measure base, baseline and candidate and decide. Raises EvalDataError / ValueError on bad input.

    `base_cache`: a folder where the base model's general-suite answers are kept between evaluations
    (they are the same for every candidate of the same base model, suite and settings; about 30 s a
    retrain on the 2-core box), and the baseline adapter's too (the same for every candidate judged against
    that adapter: every personal retrain trained from one shared version, training/personal.py).
    `own_cache`: a folder of the user's (a personal gate) where the baseline adapter's answers to the user's
    held-out questions are kept: a later retrain of that user generates only the questions that are new."""
    import torch

    t0 = time.perf_counter()
    gate = gate or GateConfig()
    gate.validate()
    full = suite or load_general_suite()
    suite = general_subset(full, gate.max_general)  # the personal gate asks a subset (training/personal.py)
    emit = progress or (lambda _e: None)
    for what, p in (("base model", base_model), ("candidate adapter", candidate), ("baseline adapter", baseline)):
        if p is not None and not Path(p).is_dir():
            raise EvalDataError(f"{what} folder {p} does not exist")
    if threads and device == "cpu":
        torch.set_num_threads(threads)  # share the 2-core box with the server
    es = eval_set.capped(gate)
    model, tok = load_models(Path(base_model), Path(candidate), Path(baseline) if baseline else None, device, dtype)
    scorer = Scorer(model, tok, gate, system_prompt)
    metrics: dict[str, ModelMetrics] = {}
    # The base model only runs the general suite when a serving adapter is the baseline.
    cache_file = baseline_file = own_file = None
    if base_cache is not None or own_cache is not None:
        key = _base_cache_key(Path(base_model), suite, gate, system_prompt, device, dtype)
        # the adapter's files with everything the base model's answers depend on
        adapter_key = _base_cache_key(Path(baseline), suite, gate, system_prompt, device, dtype) if baseline else None
        if base_cache is not None:
            cache_file = Path(base_cache) / f"base-general-{key}.json"
            if adapter_key:
                baseline_file = Path(base_cache) / f"adapter-general-{key}-{adapter_key}.json"
        if own_cache is not None and adapter_key:
            own_file = Path(own_cache) / f"baseline-{key}-{adapter_key}.json"
    known = _read_general(cache_file, suite)
    metrics["base"] = measure(scorer, "base", None, None, es, suite, emit, held_out=baseline is None,
                              general=known)
    if known is None:
        _write_general(cache_file, metrics["base"])
    if baseline is not None:
        # The serving adapter's answers are the same for every candidate judged against it (every personal
        # retrain of every user): its general answers and its answers to each set of document questions are kept.
        known_baseline = _read_general(baseline_file, suite)
        qa_key = _questions_key(es.doc_qa) if es.doc_qa else None
        known_grounded = ((known_baseline or {}).get("grounded") or {}).get(qa_key) if qa_key else None
        known_own = _read_own(own_file)
        metrics["baseline"] = measure(scorer, "baseline", "baseline", baseline_name or str(baseline), es, suite, emit,
                                      general=known_baseline, grounded=known_grounded, own_answers=known_own)
        if known_baseline is None or (qa_key is not None and known_grounded is None):
            _write_general(baseline_file, metrics["baseline"], qa_key)
        _write_own(own_file, known_own, es, metrics["baseline"])
    metrics["candidate"] = measure(scorer, "candidate", "candidate", candidate_name or str(candidate), es, suite,
                                   emit)
    base_ref = metrics["base"]
    baseline_metrics = metrics.get("baseline", base_ref)
    decision = decide(metrics["candidate"], baseline_metrics, base_ref, gate)
    report = EvalReport(
        candidate=candidate_name or str(candidate), baseline=baseline_name or (str(baseline) if baseline else None),
        base_model=str(base_model), eval_set={"source": es.source, "sizes": es.sizes(),
                                              "available": eval_set.sizes()},
        gate=gate, metrics=metrics, decision=decision, seconds=round(time.perf_counter() - t0, 2),
        created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), samples=samples(metrics, es, suite, gate.samples),
        precision=f"{device} {dtype}")
    if len(suite.qa) < len(full.qa):
        decision.power.append(general_power(len(suite.qa), gate))
    if baseline is None:
        # With no serving adapter the base model is the baseline; the report shows it once.
        report.metrics = {"base": base_ref, "candidate": metrics["candidate"]}
    return report


# ------------------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-model", required=True, type=Path, help="base model folder")
    parser.add_argument("--candidate", required=True, type=Path, help="candidate PEFT adapter folder")
    parser.add_argument("--candidate-name", default=None, help="name shown in the report")
    parser.add_argument("--baseline", type=Path, default=None, help="serving adapter folder (none: base model)")
    parser.add_argument("--baseline-name", default=None, help="serving version name shown in the report")
    parser.add_argument("--data", required=True, type=Path, help="dataset snapshot with the held-out set")
    parser.add_argument("--doc-qa", type=Path, default=None, help="JSONL of held-out document questions")
    parser.add_argument("--out", required=True, type=Path, help="folder for report.json / .md / .png")
    parser.add_argument("--gate", type=Path, default=None, help="GateConfig JSON file")
    parser.add_argument("--suite", type=Path, default=SUITE_DIR, help="general-ability suite folder")
    parser.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT, help="system prompt used when serving")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--base-cache", type=Path, default=None,
                        help="folder that keeps the base model's general-suite answers between evaluations")
    parser.add_argument("--own-cache", type=Path, default=None,
                        help="a user's folder that keeps the baseline's answers to their held-out questions")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="weights dtype; the loop passes the serving dtype (scores use float32 log-softmax)")
    ns = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = sys.stdout
    sys.stdout = sys.stderr  # library prints must not corrupt the JSON line stream

    def emit(event: dict[str, Any]) -> None:
        out.write(json.dumps(event, default=str) + "\n")
        out.flush()

    try:
        gate = GateConfig.from_dict(json.loads(ns.gate.read_text(encoding="utf-8"))) if ns.gate else GateConfig()
        eval_set = load_eval_set(ns.data, ns.doc_qa)
        suite = load_general_suite(ns.suite)
        report = evaluate(ns.base_model, ns.candidate, eval_set, baseline=ns.baseline,
                          baseline_name=ns.baseline_name, candidate_name=ns.candidate_name, gate=gate, suite=suite,
                          system_prompt=ns.system_prompt, progress=emit, device=ns.device, dtype=ns.dtype,
                          threads=ns.threads, base_cache=ns.base_cache, own_cache=ns.own_cache)
        report.save(ns.out)
    except (ValueError, OSError) as e:
        print(traceback.format_exc(), file=sys.stderr)
        emit({"event": "error", "error": f"{type(e).__name__}: {e}", "exit_code": 2})
        return 2
    except Exception as e:  # noqa: BLE001 - report any failure as a JSON line, then exit non-zero
        print(traceback.format_exc(), file=sys.stderr)
        emit({"event": "error", "error": f"{type(e).__name__}: {e}", "exit_code": 1})
        return 1
    emit({"event": "eval_done", "passed": report.passed, "reason": report.decision.reason,
          "headline": report.headline(), "report": str(ns.out / "report.json"), "seconds": report.seconds})
    return 0


if __name__ == "__main__":
    sys.exit(main())
