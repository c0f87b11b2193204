"""bench/loop.py's document sets and scoring, without a model: every question file is well formed, every fact is
in its documents, the users' edits would pass the dataset builder's fact check, the gate gets enough frozen held-out
questions to decide, and the examiners' scoring counts an invented fact or an invented answer as wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from assistant.config import Settings
from bench.loop import (
    DOCS,
    QA_FILE,
    abstains,
    arguments,
    cycle_options,
    document_paths,
    documents_text,
    grounded,
    judge,
    liked,
    load_questions,
    server_inputs,
    write_gate_questions,
)
from training.fact_check import unsupported_facts
from training.gate_config import GateConfig
from training.loop import build_options
from training.synth import allowed_docs_file

BENCH = Path(__file__).parents[1] / "bench"
SETS = [(DOCS, QA_FILE), (BENCH / "docsets" / "hanbit", BENCH / "docsets" / "hanbit.json"),
        (BENCH / "docsets" / "railyard", BENCH / "docsets" / "railyard.json")]


@pytest.mark.parametrize(("docs", "questions"), SETS, ids=[q.stem for _, q in SETS])
def test_each_document_set_holds_its_facts_and_enough_held_out_questions(docs: Path, questions: Path,
                                                                          tmp_path: Path) -> None:
    qa = load_questions(questions)
    text = documents_text(docs).lower()
    assert len(document_paths(docs)) >= 3 and len(qa["trained"]) >= 12 and len(qa["unanswerable"]) >= 6
    ids = [f["id"] for group in ("trained", "unseen", "unanswerable", "gate") for f in qa[group]]
    assert len(ids) == len(set(ids)), "ids repeat"
    for fact in qa["trained"] + qa["unseen"] + qa["gate"]:
        for group in fact["keys"]:
            assert any(alt.lower() in text for alt in group), (fact["id"], group)
    for fact in qa["trained"]:
        # The users' edit is the answer they want: liked, correct, and no fact the documents lack (else the dataset
        # builder would rightly drop it: training/dataset_build.py, drop_wrong_facts).
        assert liked(fact["ideal"], 30, "stop", qa["product"]), fact["ideal"]
        assert grounded(fact["ideal"], fact["keys"], text, fact["ask"]), fact["id"]
        assert not unsupported_facts(fact["ideal"], documents_text(docs), fact["ask"]), fact["id"]
    asked = {f[k].lower() for f in qa["trained"] for k in ("ask", "heldout")} | {f["heldout"].lower()
                                                                                for f in qa["unseen"]}
    assert not asked & {f["question"].lower() for f in qa["gate"]}, "a gate question is asked by users or examiners"
    rows = [json.loads(x) for x in write_gate_questions(qa, tmp_path / "gate.jsonl", docs).read_text().splitlines()]
    held_out = [r for r in rows if r["split"] == "held-out"]
    assert len(held_out) >= GateConfig().min_grounded_rows  # else the gate declines to decide every cycle
    assert len(rows) - len(held_out) == len(qa["trained"])
    # every trained fact is also asked in a third wording, and the bench's gate answers every question
    again = {f["id"].removesuffix("~again") for f in qa["gate"] if f["id"].endswith("~again")}
    assert again == {f["id"] for f in qa["trained"]}
    gate = cycle_options(1, arguments().parse_args([]), tmp_path / "gate.jsonl")["gate"]
    assert gate["max_doc_qa"] >= max(len(held_out), len(qa["trained"]))


def test_an_invented_fact_or_answer_counts_as_wrong() -> None:
    docs = "The Team plan costs 8 dollars per member per month, with up to 10 guests."
    keys = [["8 dollars", "$8"]]
    assert grounded("Lumen Desk Team costs 8 dollars.", keys, docs, "How much is the Team plan?")
    assert not grounded("Lumen Desk Team costs 8 dollars, or 12 dollars a year.", keys, docs, "")
    assert not grounded("It costs 10 dollars.", keys, docs, "")
    # a citation of a passage by its number, as the served prompt asks, is no fact; a number in brackets still is
    assert grounded("Lumen Desk Team costs 8 dollars [1].", keys, docs, "") and not unsupported_facts(
        "It costs 8 dollars [1][3].", docs)
    assert unsupported_facts("It costs 8 dollars [plan 12].", docs) == ["12"]
    unanswerable = {"id": "x", "heldout": "How much does the Enterprise plan cost?"}
    for honest in ("The documents do not say.", "I don't know.", "There is no information about an Enterprise plan.",
                   "I cannot find that in the documents."):
        assert abstains(honest) and judge("unanswerable", unanswerable, honest, docs), honest
    for invented in ("Lumen Desk Enterprise costs 25 dollars.", "The Enterprise plan costs 8 dollars per member."):
        assert not judge("unanswerable", unanswerable, invented, docs), invented


def test_the_training_data_flags_reach_the_retrain_job(tmp_path: Path) -> None:
    """--distractors / --abstain / --style-cap / --title-negatives go into the admin job's build options, which the
    builder accepts; left out, the job builds today's rows."""
    args = arguments().parse_args(["--distractors", "2", "--abstain", "0.25", "--style-cap", "0.5",
                                   "--title-negatives"])
    build = cycle_options(1, args, tmp_path / "gate.jsonl")["build"]
    assert cycle_options(1, args, tmp_path / "gate.jsonl")["train"]["max_length"] == 1024 + 2 * 256  # room for them
    assert build == {"replay_ratio": 2.0, "distractor_passages": 2, "abstain_rows": 0.25, "max_style_share": 0.5,
                     "title_negatives": True}
    opts = build_options(build)
    assert (opts.distractor_passages, opts.abstain_rows, opts.max_style_share, opts.title_negatives) == (
        2, 0.25, 0.5, True)
    plain = build_options(cycle_options(1, arguments().parse_args([]), tmp_path / "gate.jsonl")["build"])
    assert (plain.distractor_passages, plain.abstain_rows, plain.max_style_share, plain.title_negatives) == (
        0, 0.0, 1.0, False)


def test_the_server_may_read_the_gate_questions_the_jobs_name(tmp_path: Path) -> None:
    """The retrain job's options name the gate's question file, a server file; the admin API reads only files under
    `synth_docs_dir`, so the bench's server must be started with that folder (a run once failed its first job
    with a 403 here)."""
    args = arguments().parse_args([])
    gate_file, env = server_inputs(load_questions(QA_FILE), tmp_path / "home", args)
    named = cycle_options(1, args, gate_file)["eval_doc_qa"]
    settings = Settings.load(env={k: v for k, v in env.items() if k.startswith("ASSISTANT_")}, home=tmp_path / "home")
    assert allowed_docs_file(settings.synth_docs_dir, named) == gate_file.resolve()
    assert gate_file.read_text().count("\n") >= GateConfig().min_grounded_rows
