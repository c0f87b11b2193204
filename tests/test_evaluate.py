"""The evaluation gate: pure decision rules on hand-made numbers, held-out loading from a real dataset
snapshot, and real adapters trained with the real trainer on a tiny model: the gate accepts a genuine
improvement over the serving adapter and rejects one trained on noise labels. One slow test checks
the shipped general-ability suite on the embedded SmolLM2 and that it catches a wrecked adapter."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from training.evaluate import (
    SUITE_DIR,
    Completion,
    EvalDataError,
    EvalSet,
    GateConfig,
    ModelMetrics,
    PrefPair,
    closeness,
    decide,
    evaluate,
    fact_score,
    key_facts,
    keyword_score,
    leaning,
    load_eval_set,
    load_general_suite,
    sign_test,
)

CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"), ("Japan", "Tokyo"),
            ("Egypt", "Cairo"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Kenya", "Nairobi"), ("Norway", "Oslo"),
            ("Sweden", "Stockholm"), ("Poland", "Warsaw"), ("Greece", "Athens"), ("Turkey", "Ankara"),
            ("India", "New Delhi"), ("China", "Beijing"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"),
            ("Brazil", "Brasilia"), ("Cuba", "Havana"), ("Ireland", "Dublin"), ("Austria", "Vienna"),
            ("Hungary", "Budapest"), ("Portugal", "Lisbon"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
            ("Belgium", "Brussels"), ("Russia", "Moscow"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
            ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Nepal", "Kathmandu")]
TRAIN, VALID, HELD_OUT = CAPITALS[:24], CAPITALS[24:27], CAPITALS[27:]
JUNK = "zork blip quax fnord vreem snark plob gribble wux trazz yonk fleem".split()


def mm(label: str, adapter: str | None = "x", **values) -> ModelMetrics:
    return ModelMetrics(label=label, adapter=adapter, **values)


def scores(right: int, wrong: int) -> list[float]:
    return [1.0] * right + [0.0] * wrong


def grounding(items: list[float]) -> dict:
    """ModelMetrics fields for held-out document questions scored `items` (one score per question)."""
    return {"grounded": sum(items) / len(items), "grounded_scores": items}


def flip(items: list[float], lose: range = range(0), win: range = range(0)) -> list[float]:
    out = items[:]
    for i in lose:
        out[i] = 0.0
    for i in win:
        out[i] = 1.0
    return out


GENERAL = {"general_ppl": 10.0, "general_qa": 0.5, "general_qa_scores": scores(60, 60)}


# ---------------------------------------------------------------------------------------------- rules
def test_a_significant_grounded_gain_without_regression_passes() -> None:
    serving_q = scores(10, 14)
    cand_q = flip(serving_q, win=range(10, 16))  # won 6, lost 0: p = 0.016
    base = mm("base", None, **GENERAL)
    serving = mm("baseline", val_loss=1.5, **grounding(serving_q), **GENERAL)
    cand = mm("candidate", val_loss=1.52, **grounding(cand_q), **GENERAL)  # 1.3% worse: within 2%
    d = decide(cand, serving, base, GateConfig(min_sft_rows=0))
    assert d.passed and d.gains == ["grounded"] and not d.declined, d.reason
    gain = next(c for c in d.checks if c.name == "grounded gain")
    assert "won 6, lost 0, p = 0.016" in gain.detail
    assert {c.name for c in d.checks if c.kind == "forgetting"} == {
        "general perplexity vs baseline", "general questions vs baseline", "general perplexity vs base",
        "general questions vs base"}
    assert any("grounded on 24 held-out questions: one item is 4.2 points; a gain needs at least 5 wins" in n
               for n in d.power), d.power
    assert any("a net loss of 2 or more (8.3 points) is refused" in n for n in d.power), d.power


def test_without_a_significance_test_the_reason_does_not_claim_one() -> None:
    """The personal gate runs with gain_significance 0: its verdict says "above its minimum", not "significant"."""
    serving_q = scores(10, 14)
    base = mm("base", None, **GENERAL)
    serving = mm("baseline", val_loss=1.5, **grounding(serving_q), **GENERAL)
    cand = mm("candidate", val_loss=1.52, **grounding(flip(serving_q, win=range(10, 12))), **GENERAL)
    d = decide(cand, serving, base, GateConfig(min_sft_rows=0, gain_significance=0.0))
    assert d.passed and d.reason == "gain above its minimum on grounded; no regression beyond tolerance", d.reason
    same = decide(serving, serving, base, GateConfig(min_sft_rows=0, gain_significance=0.0))
    assert not same.passed and same.reason == "no gain above its minimum on grounded", same.reason


def test_the_personal_gate_serves_on_answers_nearer_the_users_choice_not_on_held_out_loss() -> None:
    """A run of bench/personal.py served "bullets" and "follow-up" adapters on a gain in held-out loss alone; their
    greedy answers were the shared adapter's. The personal gate's gain is edit_match: the user's held-out questions
    answered greedily, each answer nearer the one the user chose than the one they turned down?"""
    from training.personal import PERSONAL_GATE

    cfg = GateConfig.from_dict(PERSONAL_GATE)
    chosen = "- Brightleaf Labs\n- the maker of Lumen Desk\n- has 48 employees"  # the user's edit
    turned_down = served_again = "Brightleaf Labs has 48 employees."  # what they edited, and the shared adapter
    # the shape wanted, with a second line of filler (answers of a real run of the bench)
    listed = "- Brightleaf Labs has 48 employees\n- The Lumen Desk documents are in two data centers in Busan"
    # closeness alone prefers the plain answer (the words the two share weigh more than the shape); the leaning
    # does not: what the chosen and the turned-down answer share cancels
    assert closeness(listed, chosen) < closeness(served_again, chosen)
    assert leaning(served_again, chosen, turned_down) < leaning(listed, chosen, turned_down) < 0.5 * leaning(
        chosen, chosen, turned_down)
    shared_own = [leaning(served_again, chosen, turned_down)] * 3
    base = mm("base", None, **GENERAL)
    serving = mm("baseline", val_loss=1.5, val_rows=3, edit_match=sum(shared_own) / 3, edit_match_scores=shared_own,
                 **GENERAL)
    same_answers = mm("candidate", val_loss=1.2, val_rows=3, edit_match=serving.edit_match,
                      edit_match_scores=shared_own, **GENERAL)  # likelier edits, the same greedy answers
    d = decide(same_answers, serving, base, cfg)
    assert not d.passed and d.reason == "no gain above its minimum on edit_match", d.reason
    assert not [c for c in d.checks if c.metric == "val_loss"]  # measured, shown, never decides
    own = [leaning(listed, chosen, turned_down)] * 2 + shared_own[:1]
    d = decide(mm("candidate", val_loss=1.6, val_rows=3, edit_match=sum(own) / 3, edit_match_scores=own, **GENERAL),
               serving, base, cfg)
    assert d.passed and d.gains == ["edit_match"], d.reason
    assert "won 2, lost 0" in next(c.detail for c in d.checks if c.kind == "gain")
    assert any(n.startswith("edit_match on 3 held-out choices of the user's") for n in d.power), d.power
    worse = [leaning(turned_down + " Also, yes.", chosen, turned_down) - 0.2] * 3
    d = decide(mm("candidate", edit_match=sum(worse) / 3, edit_match_scores=worse, **GENERAL), serving, base, cfg)
    assert not d.passed and d.reason.startswith("regression: edit_match no regression"), d.reason
    one = decide(mm("candidate", edit_match=1.0, edit_match_scores=[1.0], **GENERAL), serving, base, cfg)
    assert one.declined and "edit_match: 1 held-out choices of the user's, fewer than 2" in one.reason, one.reason


def test_held_out_loss_alone_is_no_reason_to_promote() -> None:
    # Issue 26: both promotions of a loop run rested on held-out loss over 2-3 conversations.
    serving_q = scores(12, 12)
    base = mm("base", None, **GENERAL)
    serving = mm("baseline", val_loss=1.5, val_rows=40, **grounding(serving_q), **GENERAL)
    cand = mm("candidate", val_loss=1.0, val_rows=40, **grounding(serving_q), **GENERAL)
    d = decide(cand, serving, base, GateConfig())
    assert not d.passed and d.reason == "no significant gain on grounded", d.reason
    # A rise that is not significant is no gain either: won 3, lost 0 (p = 0.125).
    d = decide(mm("candidate", **grounding(flip(serving_q, win=range(12, 15))), **GENERAL), serving, base,
               GateConfig())
    assert not d.passed and "won 3, lost 0, p = 0.125" in next(c.detail for c in d.checks if c.kind == "gain")


def test_a_candidate_that_loses_held_out_grounding_is_refused_whatever_else_improved() -> None:
    # Issue 26, cycle 2: the gate's grounded score fell 0.625 -> 0.500 on 16 questions (lost 3, won 1) and passed
    # as "not significant" while held-out loss improved; users lost a quarter of their paraphrased answers.
    serving_q = scores(10, 6)
    cand_q = flip(serving_q, lose=range(3), win=range(10, 11))
    assert (sum(serving_q), sum(cand_q)) == (10, 8)
    base = mm("base", None, **GENERAL)
    serving = mm("baseline", val_loss=1.5, val_rows=40, liked_correct=0.5, liked_correct_scores=scores(10, 10),
                 **grounding(serving_q), **GENERAL)
    cand = mm("candidate", val_loss=1.0, val_rows=40, liked_correct=0.9, liked_correct_scores=scores(18, 2),
              **grounding(cand_q), **GENERAL)
    d = decide(cand, serving, base, GateConfig())
    assert "liked_correct" in d.gains  # a significant gain elsewhere does not buy a grounding loss
    assert not d.passed and not d.declined
    assert d.reason.startswith("regression: grounded no regression (worse by 0.125; won 1, lost 3"), d.reason
    # One net answer of 20 (0.05) is within the stated tolerance; two are not.
    twenty = scores(12, 8)
    one = decide(mm("candidate", **grounding(flip(twenty, lose=range(1))), liked_correct=0.9,
                    liked_correct_scores=scores(18, 2), **GENERAL),
                 mm("baseline", **grounding(twenty), liked_correct=0.5, liked_correct_scores=scores(10, 10),
                    **GENERAL), base, GateConfig())
    assert one.passed, one.reason
    two = decide(mm("candidate", **grounding(flip(twenty, lose=range(2))), liked_correct=0.9,
                    liked_correct_scores=scores(18, 2), **GENERAL),
                 mm("baseline", **grounding(twenty), liked_correct=0.5, liked_correct_scores=scores(10, 10),
                    **GENERAL), base, GateConfig())
    assert not two.passed and "grounded no regression" in two.reason
    # At fewer than 20 questions 0.05 is less than one question; one net loss still passes and two do not. The
    # personal gate asked the shared version's 17 and refused, on "won 3, lost 4", an adapter the bench's examiners
    # found grounded 75 % of the time against the shared adapter's 50 %.
    from training.personal import PERSONAL_GATE

    seventeen = scores(8, 9)
    for lost, passed in ((1, True), (2, False)):
        d = decide(mm("candidate", edit_match=0.35, edit_match_scores=[0.35] * 3, **grounding(
                       flip(seventeen, lose=range(lost))), **GENERAL),
                   mm("baseline", edit_match=-0.26, edit_match_scores=[-0.26] * 3, **grounding(seventeen), **GENERAL),
                   base, GateConfig.from_dict(PERSONAL_GATE))
        assert d.passed is passed, (lost, d.reason)
        assert any(f"a net loss of 2 or more ({200 / 17:.1f} points) is refused" in n for n in d.power), d.power


def test_a_gate_with_too_little_held_out_data_declines_to_decide() -> None:
    # Six held-out document questions (the loop's teacher held out 6 in run R): a loss could not be told apart.
    base = mm("base", None, **GENERAL)
    serving = mm("baseline", val_loss=1.5, val_rows=3, **grounding(scores(3, 3)), **GENERAL)
    cand = mm("candidate", val_loss=0.9, val_rows=3, **grounding(scores(6, 0)), **GENERAL)
    d = decide(cand, serving, base, GateConfig())
    assert not d.passed and d.declined and d.gains == []
    assert d.reason.startswith("declined to decide: held-out grounding cannot be judged (grounded: 6 held-out "
                               "questions, fewer than 16)"), d.reason
    assert "val_loss: 3 conversations, fewer than 8" in d.too_small
    # Without documents grounding is only not measured; then too few pairs for liked-and-correct declines.
    d = decide(mm("candidate", pref_accuracy=1.0, pref_scores=scores(5, 0), liked_correct=1.0,
                  liked_correct_scores=scores(5, 0), **GENERAL),
               mm("baseline", pref_accuracy=0.2, pref_scores=scores(1, 4), liked_correct=0.2,
                  liked_correct_scores=scores(1, 4), **GENERAL), base, GateConfig())
    assert not d.passed and d.declined and d.skipped == ["val_loss", "grounded"], d.reason
    assert d.reason.startswith("declined to decide: no gain metric has enough held-out data (pref_accuracy: 5 "
                               "pairs, fewer than 12; liked_correct: 5 pairs, fewer than 12"), d.reason
    # The report says so.
    from training.gate_report import render_markdown
    md = render_markdown({"candidate": "v0002", "baseline": "v0001", "base_model": "m", "eval_set": {},
                          "seconds": 1.0, "created_at": "now", "gate": {}, "metrics": {},
                          "decision": {**asdict(d), "checks": []}})
    assert "**Decision: DECLINED**" in md and "Not judged (too little held-out data): pref_accuracy: 5 pairs" in md


def test_one_lost_general_question_fails_by_default() -> None:
    # With the old 16-question suite one lost question (0.0625) passed the old tolerance of 0.10 in a
    # loop run ("Italie is the capital of Italy"); the default refuses a drop over 1 point.
    win = grounding(flip(scores(10, 14), win=range(10, 16)))
    serving_g = grounding(scores(10, 14))
    base_120 = mm("base", None, general_ppl=10.0, general_qa=67 / 120, general_qa_scores=scores(67, 53))
    serving_120 = mm("baseline", **serving_g, general_ppl=10.0, general_qa=67 / 120, general_qa_scores=scores(67, 53))
    one = mm("candidate", **win, general_ppl=10.0, general_qa=66 / 120, general_qa_scores=scores(66, 54))
    two = mm("candidate", **win, general_ppl=10.0, general_qa=65 / 120, general_qa_scores=scores(65, 55))
    assert decide(one, serving_120, base_120, GateConfig()).passed
    d = decide(two, serving_120, base_120, GateConfig())
    assert not d.passed and "general questions vs base (-0.017)" in d.reason, d.reason
    assert decide(two, serving_120, base_120, GateConfig(general_qa_tolerance=0.02)).passed


def test_general_questions_against_the_serving_adapter_need_a_significant_drop() -> None:
    # Run L of bench/loop.py (docs/loop.md): base 63 of 120, the serving v0001 68 (it changed 15 answers:
    # lost 5, won 10), candidate v0002 62: against v0001 it lost 9 and won 3 (p = 0.073), against the
    # base it is one question down. The old rule refused it for the 5-point drop against v0001.
    base_q = scores(63, 57)
    serving_q = flip(base_q, lose=range(5), win=range(63, 73))
    cand_q = flip(serving_q, lose=range(5, 14), win=range(73, 76))
    assert (sum(base_q), sum(serving_q), sum(cand_q)) == (63, 68, 62)
    assert sign_test(cand_q, serving_q) == (9, 3, pytest.approx(299 / 4096))
    serving_g, win = grounding(scores(10, 14)), grounding(flip(scores(10, 14), win=range(10, 16)))
    base = mm("base", None, general_ppl=10.0, general_qa=63 / 120, general_qa_scores=base_q)
    serving = mm("baseline", **serving_g, general_ppl=10.0, general_qa=68 / 120, general_qa_scores=serving_q)
    cand = mm("candidate", **win, general_ppl=10.0, general_qa=62 / 120, general_qa_scores=cand_q)
    d = decide(cand, serving, base, GateConfig())
    assert d.passed, d.reason
    check = next(c for c in d.checks if c.name == "general questions vs baseline")
    assert check.passed and "lost 9, won 3, p = 0.073" in check.detail
    assert not decide(cand, serving, base, GateConfig(general_qa_significance=0)).passed
    # A one-sided drop of the same size is significant (lost 6, won 0: p = 0.016) and refused.
    clear = flip(serving_q, lose=range(5, 11))
    d = decide(mm("candidate", **win, general_ppl=10.0, general_qa=62 / 120, general_qa_scores=clear),
               serving, base, GateConfig())
    assert not d.passed and "general questions vs baseline (-0.050; lost 6, won 0, p = 0.016)" in d.reason
    # Against the base model the line stays hard: two questions down is refused however noisy.
    two_down = flip(cand_q, lose=range(73, 74))
    d = decide(mm("candidate", **win, general_ppl=10.0, general_qa=61 / 120, general_qa_scores=two_down),
               serving, base, GateConfig())
    assert not d.passed and "general questions vs base (-0.017)" in d.reason, d.reason


def test_regression_beyond_tolerance_fails_even_with_a_gain() -> None:
    base = mm("base", None, **GENERAL)
    serving = mm("baseline", pref_accuracy=0.8, pref_scores=scores(16, 4), **grounding(scores(10, 14)), **GENERAL)
    cand = mm("candidate", pref_accuracy=0.7, pref_scores=scores(14, 6),
              **grounding(flip(scores(10, 14), win=range(10, 16))), **GENERAL)
    d = decide(cand, serving, base, GateConfig())
    assert not d.passed and d.gains == ["grounded"]
    assert d.reason.startswith("regression: pref_accuracy no regression (worse by 0.100"), d.reason


def test_catastrophic_forgetting_is_caught_against_the_base_model() -> None:
    # The serving adapter had already drifted by 8%; the candidate drifts 8% more: within tolerance of
    # the serving one, but 16.6% above the base model.
    win, serving_g = grounding(flip(scores(10, 14), win=range(10, 16))), grounding(scores(10, 14))
    base = mm("base", None, general_ppl=10.0, general_qa=0.9)
    serving = mm("baseline", **serving_g, general_ppl=10.8, general_qa=0.9)
    cand = mm("candidate", **win, general_ppl=11.66, general_qa=0.9)
    d = decide(cand, serving, base, GateConfig())
    assert not d.passed and "general perplexity vs base (+16.6%)" in d.reason
    assert [c.passed for c in d.checks if c.name == "general perplexity vs baseline"] == [True]
    qa = decide(mm("candidate", **win, general_ppl=10.0, general_qa=0.7), serving, base, GateConfig())
    assert not qa.passed and "general questions" in qa.reason


def test_no_gain_and_nothing_measurable_fail() -> None:
    base = mm("base", None, general_ppl=10.0, general_qa=0.9)
    none = decide(mm("candidate", general_ppl=10.0, general_qa=0.9), mm("base", None, general_ppl=10.0,
                                                                       general_qa=0.9), base, GateConfig())
    assert not none.passed and none.reason == "no target metric could be measured on the held-out set"


def test_gate_config_validation_names_the_problem() -> None:
    assert GateConfig.from_dict({"min_val_loss_gain": 0.05}).min_val_loss_gain == 0.05
    with pytest.raises(ValueError, match="unknown gate config keys: \\['speed'\\]"):
        GateConfig.from_dict({"speed": 1})
    with pytest.raises(ValueError, match="not of type"):
        GateConfig.from_dict({"max_new_tokens": "48"})
    with pytest.raises(ValueError, match="general_ppl_tolerance must be a finite number >= 0"):
        GateConfig.from_dict({"general_ppl_tolerance": -0.1})
    with pytest.raises(ValueError, match="target_metrics"):
        GateConfig.from_dict({"target_metrics": ["bleu"]})
    with pytest.raises(ValueError, match="precision must be 'float32' or 'serving'"):
        GateConfig.from_dict({"precision": "bf16"})
    assert set(GateConfig.help()) == set(GateConfig.defaults()) and all(GateConfig.help().values())


# ---------------------------------------------------------------------------------------------- data
def test_shipped_general_suite_is_well_formed() -> None:
    suite = load_general_suite()
    assert len(suite.reference) >= 8 and len(suite.qa) == 120
    assert len({i for i, _ in suite.reference}) == len(suite.reference)
    assert len({q.id for q in suite.qa}) == len({q.question.lower() for q in suite.qa}) == 120
    # The guard must not be trained on: no suite question is a question of the replay training set.
    from training.dataset_build import DEFAULT_REPLAY
    replay = {json.loads(line)["messages"][0]["content"].strip().lower()
              for line in DEFAULT_REPLAY.read_text(encoding="utf-8").splitlines() if line.strip()}
    assert len(replay) >= 100 and not replay & {q.question.strip().lower() for q in suite.qa}
    assert all(len(text.split()) >= 50 for _, text in suite.reference)
    assert keyword_score("The capital of France is Paris.", suite.qa[0].keywords) == 1.0


def test_key_facts_and_scores() -> None:
    passage = "The Northfield library opens at 9:30 on Saturdays and closes at 16:00."
    facts = key_facts("It opens at 9:30 on Saturdays.", passage)
    assert facts == ["9:30", "saturdays", "opens"]
    assert fact_score("Opening time is 9:30 on saturdays!", facts) == pytest.approx(2 / 3)
    assert fact_score("It is closed.", facts) == 0.0
    assert keyword_score("seven days", [["7", "seven"]]) == 1.0 and keyword_score("seventy", [["seven"]]) == 0.0


def test_held_out_set_from_a_real_dataset_snapshot(store, settings) -> None:
    from training.dataset_build import BuildOptions, build_datasets

    user = store.create_user("alice", "pw-alice")
    for country, city in CAPITALS:
        conv = store.create_conversation(user.id, country)
        _, a = store.add_turn(conv.id, f"What is the capital of {country}?", "I am not sure about that.")
        store.add_edit(user.id, a.id, f"The capital of {country} is {city}.")
    snap = build_datasets(store, settings, BuildOptions(split_ratios=(0.5, 0.1, 0.4), heldout_min_rows=10,
                                                         replay_ratio=0.0)).path
    frozen = [json.loads(x) for x in (snap / "heldout" / "sft.jsonl").read_text().splitlines()]
    es = load_eval_set(snap)
    assert len(frozen) >= 5 and len(es.sft) == len(frozen) and len(es.pairs) >= 5 and es.doc_qa == []
    assert es.sft[0].prompt[-1]["role"] == "user" and es.sft[0].completion.startswith("The capital of")
    assert all(p.rejected == "I am not sure about that." for p in es.pairs)


def test_liked_and_correct_leaves_out_pairs_whose_chosen_answer_its_passages_contradict(tmp_path: Path) -> None:
    from assistant.prompt import Passage, render_turn

    prompt = render_turn("sys", [], "How much is the Team plan?",
                         passages=[Passage("Pricing", "shared", "The Team plan costs 8 dollars per member.")])
    rows = [{"prompt": prompt, "chosen": "Lumen Desk Team costs 8 dollars.", "rejected": "I am not sure."},
            {"prompt": prompt, "chosen": "Lumen Desk Team costs 15 dollars.", "rejected": "It costs 8 dollars."},
            {"prompt": "What is the capital of Peru?", "chosen": "Lima.", "rejected": "Cusco."}]
    (tmp_path / "heldout").mkdir()
    (tmp_path / "heldout" / "dpo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "doc_qa.jsonl").write_text(json.dumps({"question": "q", "passage": "p 8", "key_facts": ["8"],
                                                       "split": "trained"}) + "\n")
    es = load_eval_set(tmp_path, tmp_path / "doc_qa.jsonl")
    assert [p.correct for p in es.pairs] == [True, False, True]  # "15 dollars" is not in its passage
    assert es.sizes() == {"sft": 0, "pairs": 3, "pairs_correct": 2, "doc_qa": 0, "doc_qa_trained": 1}


def test_bad_held_out_data_is_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(EvalDataError, match="does not exist"):
        load_eval_set(tmp_path / "nope")
    (tmp_path / "heldout").mkdir()
    with pytest.raises(EvalDataError, match="no held-out rows"):
        load_eval_set(tmp_path)
    (tmp_path / "heldout" / "dpo.jsonl").write_text(json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    with pytest.raises(EvalDataError, match="needs prompt, chosen, rejected"):
        load_eval_set(tmp_path)
    (tmp_path / "heldout" / "dpo.jsonl").write_text("{oops\n")
    with pytest.raises(EvalDataError, match="dpo.jsonl:1: not JSON"):
        load_eval_set(tmp_path)


# ---------------------------------------------------------------------------------------------- real adapters
@pytest.fixture(scope="module")
def learnable_dir(learnable_tiny_model_dir: Path) -> Path:
    return learnable_tiny_model_dir


def _snapshot(root: Path, noisy: bool) -> Path:
    from datasets import Dataset, DatasetDict

    rng = random.Random(0)

    def conv(country: str, city: str) -> dict:
        answer = " ".join(rng.choice(JUNK) for _ in range(8)) if noisy else f"The capital of {country} is {city}."
        return {"messages": [{"role": "user", "content": f"What is the capital of {country}?"},
                             {"role": "assistant", "content": answer}]}

    DatasetDict({"train": Dataset.from_list([conv(*p) for p in TRAIN] * 2),
                 "validation": Dataset.from_list([conv(*p) for p in VALID])}).save_to_disk(str(root / "sft"))
    return root


def _train(model_dir: Path, out: Path, noisy: bool, steps: int) -> Path:
    from training.train import run_training
    from training.train_config import TrainConfig

    cfg = TrainConfig.from_dict({"base_model": str(model_dir), "stages": ["sft"], "max_steps": steps,
                                 "sft_learning_rate": 1e-2, "lora_r": 16, "lora_alpha": 32, "evals_per_epoch": 0,
                                 "warmup_ratio": 0.0, "batch_size": 4})
    result = run_training(cfg, _snapshot(out / "data", noisy), out / "run")
    assert result.status == "succeeded"
    return result.adapter_dir


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, learnable_dir: Path) -> dict[str, Path]:
    """serving: a short genuine run; better: a longer genuine run; noise: trained on random-word answers."""
    root = tmp_path_factory.mktemp("gate-adapters")
    return {"serving": _train(learnable_dir, root / "serving", noisy=False, steps=8),
            "better": _train(learnable_dir, root / "better", noisy=False, steps=24),
            "noise": _train(learnable_dir, root / "noise", noisy=True, steps=16)}


# The capitals have no documents: these adapters are judged on held-out loss and preference, with the sizes and the
# significance relaxed to what six held-out questions allow. The defaults' rules are tested on numbers above.
LOSS_GATE = {"max_new_tokens": 8, "target_metrics": ["val_loss", "pref_accuracy"], "gain_metrics": ["val_loss"],
             "gain_significance": 0.0, "min_sft_rows": 1, "min_pair_rows": 1, "min_liked_correct_rows": 1}


def held_out() -> EvalSet:
    ask = [{"role": "user", "content": "What is the capital of {}?"}]
    return EvalSet(
        sft=[Completion([{**ask[0], "content": ask[0]["content"].format(c)}], f"The capital of {c} is {k}.")
             for c, k in HELD_OUT],
        pairs=[PrefPair([{**ask[0], "content": ask[0]["content"].format(c)}], f"The capital of {c} is {k}.",
                        "I do not know.") for c, k in HELD_OUT],
        source="test")


def test_gate_accepts_a_genuine_improvement(learnable_dir: Path, adapters, tmp_path: Path) -> None:
    report = evaluate(learnable_dir, adapters["better"], held_out(), baseline=adapters["serving"],
                      baseline_name="v0001", candidate_name="v0002", gate=GateConfig(**LOSS_GATE))
    m = report.metrics
    assert report.passed, report.decision.reason
    assert "val_loss" in report.decision.gains
    assert m["candidate"].val_loss < m["baseline"].val_loss * 0.99
    assert m["base"].val_loss is None and m["base"].general_ppl is not None  # base: general suite only
    out = report.save(tmp_path / "report")
    data = json.loads((out / "report.json").read_text())
    assert data["decision"]["passed"] and data["candidate"] == "v0002" and data["baseline"] == "v0001"
    md = (out / "report.md").read_text()
    assert "**Decision: PROMOTE**" in md and "| held-out loss (nats/token) | lower |" in md
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_the_base_models_general_answers_are_kept_between_evaluations(learnable_dir: Path, adapters,
                                                                        tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    runs = []
    for _ in range(2):
        events: list[dict] = []
        report = evaluate(learnable_dir, adapters["better"], held_out(), baseline=adapters["serving"],
                          gate=GateConfig(**LOSS_GATE), progress=events.append, base_cache=cache)
        runs.append((report, [(e.get("model"), e.get("cached")) for e in events if e.get("check") == "general"]))
    (first, first_events), (second, second_events) = runs
    assert first_events == [("base", None), ("baseline", None), ("candidate", None)]
    assert second_events == [("base", True), ("baseline", True), ("candidate", None)]
    assert len(list(cache.glob("base-general-*.json"))) == 1
    # the baseline adapter's are kept too (every personal candidate is judged against one shared version)
    assert len(list(cache.glob("adapter-general-*.json"))) == 1
    for label in ("base", "baseline"):
        for key in ("general_ppl", "general_qa", "general_qa_scores"):
            assert getattr(second.metrics[label], key) == getattr(first.metrics[label], key)
        assert second.metrics[label].answers["general_qa"] == first.metrics[label].answers["general_qa"]
    assert second.metrics["base"].answers == first.metrics["base"].answers
    assert second.decision.passed == first.decision.passed
    # another generation setting is another key; a damaged file is measured again and rewritten
    (file,) = cache.glob("base-general-*.json")
    file.write_text("{not json")
    events = []
    again = evaluate(learnable_dir, adapters["better"], held_out(), baseline=adapters["serving"],
                     gate=GateConfig(**LOSS_GATE), progress=events.append, base_cache=cache)
    assert [e.get("cached") for e in events if e.get("model") == "base" and e.get("check") == "general"] == [None]
    assert again.metrics["base"].general_qa_scores == first.metrics["base"].general_qa_scores
    assert json.loads(file.read_text())["general_ppl"] == first.metrics["base"].general_ppl
    evaluate(learnable_dir, adapters["better"], held_out(), baseline=adapters["serving"],
             gate=GateConfig(**{**LOSS_GATE, "max_new_tokens": 6}), base_cache=cache)
    assert len(list(cache.glob("base-general-*.json"))) == 2


def test_the_serving_adapters_answers_to_a_users_held_out_questions_are_kept(learnable_dir: Path, adapters,
                                                                               tmp_path: Path) -> None:
    """The personal gate asks the shared adapter the user's held-out questions at every retrain of that user:
    its answers are kept in the user's folder, and only questions it has not answered are generated."""
    from training.gate_metrics import prompt_key

    gate = GateConfig(max_new_tokens=8, target_metrics=["edit_match"], gain_metrics=["edit_match"],
                      gain_significance=0.0, min_edit_match_rows=1, max_general=4)
    own = tmp_path / "user-7" / "gate-cache"

    def run(es: EvalSet, baseline: str = "serving") -> tuple[Any, dict[str, Any]]:
        events: list[dict] = []
        report = evaluate(learnable_dir, adapters["better"], es, baseline=adapters[baseline], gate=gate,
                          progress=events.append, own_cache=own)
        return report, {e["model"]: e.get("cached") for e in events if e.get("check") == "edit_match"}

    es = held_out()
    first, cached = run(es)
    assert cached == {"baseline": False, "candidate": False}
    (file,) = own.glob("baseline-*.json")
    kept = json.loads(file.read_text())
    answers = first.metrics["baseline"].answers["edit_match"]
    assert kept == {prompt_key(p.prompt): a for p, a in zip(es.own_choices(), answers, strict=True)}
    second, cached = run(es)
    assert cached == {"baseline": True, "candidate": False}
    assert second.metrics["baseline"].edit_match_scores == first.metrics["baseline"].edit_match_scores
    # a new held-out question is answered and kept; one no longer held out is dropped from the file
    grown = EvalSet(sft=es.sft, pairs=[*es.pairs[1:], PrefPair(
        [{"role": "user", "content": "What is the capital of Peru?"}], "The capital of Peru is Lima.",
        "I do not know.")], source="test")
    third, cached = run(grown)
    assert cached["baseline"] is False and third.metrics["baseline"].answers["edit_match"][:-1] == answers[1:]
    assert set(json.loads(file.read_text())) == {prompt_key(p.prompt) for p in grown.own_choices()}
    # another serving adapter has other answers: its own file, and the old one goes
    run(es, baseline="noise")
    (other,) = own.glob("baseline-*.json")
    assert other != file and len(json.loads(other.read_text())) == len(es.own_choices())


def test_gate_rejects_an_adapter_trained_on_noise_through_the_cli(learnable_dir: Path, adapters, tmp_path: Path):
    data = tmp_path / "snap"
    (data / "heldout").mkdir(parents=True)
    es = held_out()
    (data / "heldout" / "sft.jsonl").write_text("".join(
        json.dumps({"messages": [*c.prompt, {"role": "assistant", "content": c.completion}]}) + "\n" for c in es.sft))
    (data / "heldout" / "dpo.jsonl").write_text("".join(
        json.dumps({"prompt": p.prompt, "chosen": [{"role": "assistant", "content": p.chosen}],
                    "rejected": [{"role": "assistant", "content": p.rejected}]}) + "\n" for p in es.pairs))
    (tmp_path / "gate.json").write_text(json.dumps(LOSS_GATE))
    proc = subprocess.run(
        [sys.executable, "-m", "training.evaluate", "--base-model", str(learnable_dir), "--candidate",
         str(adapters["noise"]), "--baseline", str(adapters["serving"]), "--baseline-name", "v0001",
         "--data", str(data), "--out", str(tmp_path / "out"), "--gate", str(tmp_path / "gate.json")],
        capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert {"eval_progress", "eval_done"} == {e["event"] for e in events}
    done = events[-1]
    assert done["passed"] is False and done["reason"].startswith("regression: val_loss no regression")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    m = report["metrics"]
    assert m["candidate"]["val_loss"] > m["baseline"]["val_loss"] * 1.02
    assert "**Decision: REJECT**" in (tmp_path / "out" / "report.md").read_text()


def test_cli_bad_input_exits_2_with_a_json_error(learnable_dir: Path, adapters, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "training.evaluate", "--base-model", str(learnable_dir), "--candidate",
         str(adapters["serving"]), "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert proc.returncode == 2
    err = json.loads(proc.stdout.splitlines()[-1])
    assert err["event"] == "error" and "does not exist" in err["error"]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the whole general suite, twice, on the real model with one torch thread
def test_general_suite_on_the_embedded_model_and_a_wrecked_adapter(tmp_path: Path, embedded_model_dir: Path):
    """SmolLM2 answers the shipped questions; an adapter with large random weights fails the
    forgetting guard against the base model (and the held-out checks)."""
    from tests.conftest import make_random_adapter

    model_dir = embedded_model_dir
    wrecked = make_random_adapter(model_dir, tmp_path / "wrecked", seed=1)
    es = EvalSet(sft=held_out().sft[:3], source="test")
    report = evaluate(model_dir, wrecked, es, gate=GateConfig(max_new_tokens=24, batch_size=8))
    base, cand = report.metrics["base"], report.metrics["candidate"]
    assert 0.45 <= base.general_qa <= 0.65, base.answers["general_qa"]  # measured: 0.508 with 24 tokens
    assert base.general_ppl < 30 and base.val_loss < 1.5  # measured: ~11.8 and ~0.3
    assert cand.general_ppl > 100 * base.general_ppl and cand.general_qa < 0.2
    assert not report.passed and "general perplexity vs base" in report.decision.reason
    assert SUITE_DIR.is_dir()


@pytest.mark.slow
@pytest.mark.timeout(2400)  # SmolLM2 trains on CPU: about 10 steps of 2 served prompts of ~400 tokens
@pytest.mark.skipif(os.environ.get("ASSISTANT_LONG_TESTS") != "1",
                    reason="trains and judges the real SmolLM2 for about 13 minutes on 2 CPU cores (passed on "
                           "2026-12-06: held-out grounding 0.32 base vs 0.00 candidate, refused); "
                           "ASSISTANT_LONG_TESTS=1 runs it")
def test_a_style_overfitted_candidate_is_refused_on_held_out_grounding(tmp_path: Path, embedded_model_dir: Path):
    """Issue 26: a second retrain traded grounding for style and was promoted. Here an adapter of the embedded
    SmolLM2 is trained only on style edits (short, names the product, states no fact; over three epochs at a high
    learning rate) on served prompts with their passages; on the loop bench's frozen held-out gate questions it
    answers worse than the base model, and the gate refuses it for held-out grounding."""
    from bench.loop import load_questions, write_gate_questions
    from training.evaluate import DocQA, GeneralSuite, doc_qa_item, grounded_prompt
    from training.train import run_training
    from training.train_config import TrainConfig

    qa = load_questions(Path(__file__).parents[1] / "bench" / "loop_qa.json")
    rows = [json.loads(x) for x in write_gate_questions(qa, tmp_path / "gate.jsonl").read_text().splitlines()]
    held_out = [doc_qa_item(r) for r in rows if r["split"] == "held-out"]
    trained = [doc_qa_item(r) for r in rows if r["split"] == "trained"]
    style = ["Lumen Desk makes that easy for your team!", "Lumen Desk has you covered there.",
             "With Lumen Desk, that just works.", "Lumen Desk handles it for you."]
    from datasets import Dataset, DatasetDict

    def row(i: int, q: DocQA) -> dict:
        return {"messages": [*grounded_prompt(q), {"role": "assistant", "content": style[i % len(style)]}]}

    trained = trained[:6]  # 10 steps of 2 rows: over three epochs of style edits
    DatasetDict({"train": Dataset.from_list([row(i, q) for i, q in enumerate(trained)]),
                 "validation": Dataset.from_list([row(0, trained[0])])}).save_to_disk(str(tmp_path / "data" / "sft"))
    cfg = TrainConfig.from_dict({"base_model": str(embedded_model_dir), "stages": ["sft"], "max_steps": 10,
                                 "sft_learning_rate": 3e-3, "lora_r": 8, "evals_per_epoch": 0, "warmup_ratio": 0.0,
                                 "batch_size": 2, "max_length": 768})
    result = run_training(cfg, tmp_path / "data", tmp_path / "run")
    assert result.status == "succeeded"
    full = load_general_suite()
    report = evaluate(embedded_model_dir, result.adapter_dir, EvalSet(doc_qa=held_out, source="bench gate"),
                      gate=GateConfig(max_new_tokens=24, batch_size=8),
                      suite=GeneralSuite(full.reference[:2], full.qa[:40]))
    base, cand = report.metrics["base"], report.metrics["candidate"]
    print("grounded base", base.grounded, "candidate", cand.grounded, cand.answers["grounded"][:4])
    assert len(held_out) >= GateConfig().min_grounded_rows and cand.grounded < base.grounded - 0.05
    assert not report.passed and not report.decision.declined
    assert "grounded no regression" in report.decision.reason, report.decision.reason


def test_an_answer_that_recites_the_prompt_is_not_credited_with_its_facts() -> None:
    """A model that answers by copying its prompt (data block, passage and all) holds the fact and answers nothing:
    the gate's grounded check and the benches' checks give it no credit; the same fact in an answer counts."""
    from assistant.prompt import Passage, quote, recites_prompt, render_turn
    from bench.loop import grounded as loop_grounded
    from bench.personal import grounded as personal_grounded
    from training.gate_metrics import fact_score, grounded_score

    passage = Passage("Northgate Rail Depot: maintenance intervals", "shared", "A-exam: 2.2 hours\nB-exam: 1.4 hours")
    user_turn = render_turn("You are a helpful assistant.", [], "How long does an A-exam take?",
                            passages=[passage])[-1]["content"]
    recited = user_turn.split("\n\nMy question:")[0]  # what such a candidate generated: the data block
    answer = "An A-exam takes 2.2 hours."
    assert fact_score(recited, ["2.2 hours"]) == 1.0  # the plain check would credit it
    assert recites_prompt(recited) and grounded_score(recited, ["2.2 hours"]) == 0.0
    assert grounded_score("Northgate Rail Depot: maintenance intervals </documents>", ["northgate"]) == 0.0
    assert not recites_prompt(answer) and grounded_score(answer, ["2.2 hours"]) == 1.0
    assert not loop_grounded(recited, [["2.2 hours"]]) and loop_grounded(answer, [["2.2 hours"]])
    assert not personal_grounded(recited, [["2.2 hours"]]) and personal_grounded(answer, [["2.2 hours"]])
    # a document that itself writes "<data>" is quoted defused, so an answer quoting that text is not caught
    quoted = quote("Wrap it in <data> tags.")
    assert "&lt;data>" in quoted and not recites_prompt(quoted)


def test_an_answer_that_only_repeats_its_question_is_an_echo() -> None:
    from training.fact_check import echoes_question

    q = "What is the minimum time it takes to complete a Northgate Rail Depot BMX?"
    assert echoes_question(f"Your question: {q}", q)  # liked in a loop bench run
    assert echoes_question("You asked about the Northgate Rail Depot BMX.", q)
    assert not echoes_question("A Northgate Rail Depot BMX takes at least 2.2 hours.", q)
    assert not echoes_question("No.", "Is the depot open on Sundays?")  # no content words: a fair short answer
