"""Teachers and synthetic pairs (training/teacher.py, training/synth.py).

The judge and question checks are pure functions tested on hand-written cases. The GroundedTeacher
is tested with a scripted model whose replies are fixed, so best/worst selection can be checked by
hand; then each real TeacherModel runs for real: a local HF model (tiny random Llama), the OpenAI
client against this product's own API server, the runtime backend, and (slow) the embedded SmolLM2.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from training.synth import SyntheticPairs, chunk_text, chunks_from_folder, pick_chunks, run_synth
from training.teacher import (
    QUESTION_SYSTEM,
    BackendTeacherModel,
    Chunk,
    GroundedTeacher,
    HFTeacherModel,
    OpenAITeacherModel,
    Teacher,
    TeacherModel,
    TeacherOptions,
    clean_answer,
    clean_question,
    extract_answer,
    judge,
    local_teacher,
    openai_teacher,
    question_problem,
    self_teacher,
    summarize,
    template_questions,
)

DOCS = Path(__file__).parent / "data" / "docs"
PRICING = (DOCS / "pricing.md").read_text(encoding="utf-8")
PRICING_CHUNK = Chunk("pricing", "0", PRICING, "Lumen Desk plans and pricing")
Q = "How much does the Team plan cost?"


# --------------------------------------------------------------------------------------- judge


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("The Team plan costs 8 dollars per member per month.", None),
        ("It costs 8 dollars per member per month.", None),
        ("The Team plan costs 12 dollars per member per month.", "unsupported_number"),
        ("The Lumin Team plan costs 8 dollars per member per month.", "unsupported_name"),
        ("I don't know, sorry.", "refusal"),
        ("The passage says the Team plan costs 8 dollars per member per month.", "mentions_passage"),
        ("Team plan.", "too_short"),
        ("The Team plan is loved by astronauts, pirates and famous violinists everywhere.", "ungrounded"),
        ("The Free plan allows up to 3 members.", "off_question"),
        ("plan plan plan plan plan plan plan plan plan plan plan plan plan plan plan plan", "repetitive"),
    ],
)
def test_judge(answer, reason):
    verdict = judge(Q, clean_answer(answer), PRICING)
    if reason is None:
        assert verdict.accepted and verdict.reasons == () and verdict.score > 0.9
    else:
        assert not verdict.accepted and reason in verdict.reasons, verdict


def test_clean_answer_and_question():
    assert clean_answer('  "According to the passage, it costs 8 dollars."') == "It costs 8 dollars."
    assert clean_answer("Answer: Based on the text: yes, 14 days.") == "Yes, 14 days."
    assert clean_question("1. What does the Team plan cost?\nIt costs...") == "What does the Team plan cost?"
    assert clean_question('The answer to the question "How long is the refund window?" is 14 days.') == \
        "How long is the refund window?"
    assert clean_question("Question: Who can get the Team plan for free? Schools.") == \
        "Who can get the Team plan for free?"


@pytest.mark.parametrize(
    ("question", "problem"),
    [
        ("How much does the Team plan cost?", None),
        ("The Team plan costs money.", "not_a_question"),
        ("Cost?", "bad_length"),
        ("What is this text about, in short?", "mentions_passage"),
        ("What is the capital of Mongolia today?", "not_about_passage"),
        ("How much does the Zephyr Team plan cost?", "unknown_name"),
    ],
)
def test_question_checks(question, problem):
    assert question_problem(question, PRICING) == problem


def test_template_questions_cover_every_document():
    chunks = chunks_from_folder(DOCS)
    assert {c.doc_id for c in chunks} == {p.stem for p in DOCS.glob("*.md")}
    for chunk in chunks:
        questions = template_questions(chunk, limit=3)
        assert len(questions) == 3, chunk.doc_id
        for q in questions:
            assert question_problem(q, chunk.passage) is None, (chunk.doc_id, q)
    overview = next(c for c in chunks if c.doc_id == "lumen_desk_overview")
    assert template_questions(overview, 3) == ["What is Lumen Desk?", "What does a workspace hold?",
                                               "What does Lumen Desk run on?"]


def test_chunking():
    text = "# Title\n\n" + "\n\n".join(f"Paragraph {i} " + "word " * 30 for i in range(6))
    chunks = chunk_text("doc", text, title="Title", max_chars=400)
    assert len(chunks) == 3 and [c.chunk_id for c in chunks] == ["0", "1", "2"]
    assert all(len(c.text) <= 400 for c in chunks) and "# Title" not in chunks[0].text
    assert "Paragraph 0" in chunks[0].text and "Paragraph 5" in chunks[-1].text
    with pytest.raises(FileNotFoundError):
        chunks_from_folder(DOCS / "missing")


# --------------------------------------------------------------------------------------- scripted teacher


class ScriptedModel:
    """Replies from fixed lists in order; records every call. Its output is known by hand."""

    name = "scripted"

    def __init__(self, questions: list[str], answers: list[str]) -> None:
        self.questions, self.answers = list(questions), list(answers)
        self.calls: list[tuple[str, int, int]] = []

    def complete(self, messages, *, n, temperature, top_p, max_new_tokens, seed):
        asking = messages[0]["content"] == QUESTION_SYSTEM
        self.calls.append(("question" if asking else "answer", n, seed))
        source = self.questions if asking else self.answers
        return [source.pop(0) for _ in range(n)]


GOOD = "The Team plan costs 8 dollars per member per month."
SHORT_GOOD = "It costs 8 dollars per member each month."
WRONG_NUMBER = "The Team plan costs 80 dollars per member per month."
REFUSAL = "I'm not sure about that."


def test_grounded_teacher_keeps_the_best_and_pairs_it_with_the_worst():
    model = ScriptedModel(
        questions=["How much does the Team plan cost?", "What is this text about?", "Nice text."],
        answers=[WRONG_NUMBER, GOOD, REFUSAL, SHORT_GOOD] + [GOOD] * 4,
    )
    assert isinstance(model, TeacherModel)
    teacher = GroundedTeacher(model, TeacherOptions(candidates=4, question_samples=3))
    assert isinstance(teacher, Teacher)
    pairs = teacher.pairs_for_chunk(PRICING_CHUNK, questions=2)
    assert [(p.question, p.question_source) for p in pairs] == [
        ("How much does the Team plan cost?", "model"),
        ("What does Lumen Desk have?", "template"),  # the other model questions were unusable
    ]
    first = pairs[0]
    assert first.answer == GOOD and first.accepted and first.score == 1.0
    assert first.rejected == REFUSAL and first.rejected_score == 0.0
    assert (first.doc_id, first.chunk_id, first.chunk_sha256) == ("pricing", "0", PRICING_CHUNK.sha256)
    assert [c.verdict.accepted for c in first.candidates] == [False, True, False, True]
    record = first.judge_record()["candidates"]
    assert record[0]["reasons"] == ["unsupported_number"] and record[1]["accepted"]
    # four identical answers about the price, to "What does Lumen Desk have?": the passage's own sentence
    # answers it better, so the extract is kept and the model's answer becomes the rejected side
    assert pairs[1].answer == "Lumen Desk has three plans: Free, Team and Business."
    assert pairs[1].answer_origin == "extract" and pairs[1].rejected == GOOD
    assert teacher.stats == {"model_questions": 1, "template_questions": 1, "questions_rejected": 2}
    assert [kind for kind, _, _ in model.calls] == ["question", "answer", "answer"]
    # GOOD is the passage's sentence word for word, so that sample counts as the extract it is
    assert first.answer_origin == "extract" and [c.origin for c in first.candidates][1] == "extract"
    assert summarize(pairs)["dpo_pairs"] == 2 and summarize(pairs)["accepted_extracts"] == 2


def test_extract_answer_quotes_the_sentence_that_answers_or_nothing():
    assert extract_answer(Q, PRICING_CHUNK.passage) == GOOD
    assert extract_answer("What is the refund window in days?", PRICING_CHUNK.passage) == \
        "Customers can ask for a full refund within 14 days of their first payment."
    # one shared word of five is not an answer; nor is the chunk's title line
    assert extract_answer("How far is the moon from the Earth in plan terms?", PRICING_CHUNK.passage) is None
    titled = "Lumen Desk plans and pricing\nNothing here."
    assert extract_answer("What are Lumen Desk plans and pricing?", titled) is None


def test_the_extract_rescues_a_question_the_model_gets_wrong_and_pairs_with_its_worst_answer():
    pairs = {}
    for extract in (True, False):
        model = ScriptedModel([], [WRONG_NUMBER, REFUSAL])
        teacher = GroundedTeacher(model, TeacherOptions(candidates=2, extract=extract))
        pairs[extract] = teacher.answer("What does the Team plan cost per month?", PRICING_CHUNK, "template")
    rescued = pairs[True]
    assert rescued.accepted and rescued.answer == GOOD and rescued.answer_origin == "extract"
    assert rescued.rejected == REFUSAL  # the worst model sample is the DPO pair's rejected side
    assert [c.origin for c in rescued.candidates] == ["model", "model", "extract"]
    assert rescued.judge_record()["candidates"][2] == {
        "text": GOOD, "origin": "extract", "accepted": True, "score": 1.0, "support": 1.0, "relevance": 1.0,
        "reasons": []}
    assert summarize([rescued])["accepted_extracts"] == 1
    assert not pairs[False].accepted and len(pairs[False].candidates) == 2


def test_a_tie_between_a_model_answer_and_the_extract_goes_to_the_extract_unless_told_otherwise():
    kept = {}
    for extract_wins in (True, False):
        model = ScriptedModel([], [SHORT_GOOD, REFUSAL])
        teacher = GroundedTeacher(model, TeacherOptions(candidates=2, extract_wins_ties=extract_wins))
        kept[extract_wins] = teacher.answer("What does the Team plan cost per member each month?", PRICING_CHUNK)
    for pair in kept.values():
        extract = next(c for c in pair.candidates if c.origin == "extract")
        assert extract.verdict.score == pair.score == 1.0 and pair.rejected == REFUSAL
    assert kept[True].answer == GOOD and kept[True].answer_origin == "extract"
    assert kept[False].answer == SHORT_GOOD and kept[False].answer_origin == "model"


def test_pick_chunks_spreads_over_documents_then_moves_on_to_unread_ones(store):
    chunks = [Chunk(doc, str(i), f"{doc} paragraph {i}", doc) for doc, n in (("a", 6), ("b", 3), ("c", 1))
              for i in range(n)]
    first = pick_chunks(chunks, 5)
    # every document, each one's chunks evenly spaced, in the documents' order
    assert [(c.doc_id, c.chunk_id) for c in first] == [("a", "0"), ("a", "5"), ("b", "0"), ("b", "2"), ("c", "0")]
    assert pick_chunks(chunks, 20) == chunks and pick_chunks(chunks, 0) == []

    # the teacher's stored pairs mark a chunk read: the next cycle reads the others
    model = ScriptedModel(questions=["Nothing useful"] * 100, answers=[GOOD, REFUSAL] * 100)
    run_synth(store, GroundedTeacher(model, TeacherOptions(candidates=2)), first, questions_per_chunk=1)
    read = SyntheticPairs(store).read_chunks()
    assert read == {c.sha256 for c in first}
    second = pick_chunks(chunks, 5, read)
    assert not {c.sha256 for c in second} & read and len(second) == 5
    assert {c.doc_id for c in second} == {"a", "b"}  # c has no unread chunk left
    # all read: start over, spread as before; fewer unread than n: topped up with read ones
    assert pick_chunks(chunks, 5, {c.sha256 for c in chunks}) == first
    rest = pick_chunks(chunks, 5, read | {c.sha256 for c in second})
    assert len(rest) == 5 and {c.sha256 for c in rest} >= {c.sha256 for c in chunks} - read - {c.sha256 for c in second}


def test_teacher_is_deterministic_per_chunk_and_question():
    runs = []
    for _ in range(2):
        model = ScriptedModel(questions=["x"] * 3, answers=[GOOD] * 8)
        GroundedTeacher(model, TeacherOptions(candidates=4)).pairs_for_chunk(PRICING_CHUNK, 2)
        runs.append([seed for _, _, seed in model.calls])
    assert runs[0] == runs[1] and len(set(runs[0])) == 3  # seeds depend on chunk and question only


def test_run_synth_stores_pairs_with_progress(store):
    chunks = chunks_from_folder(DOCS)[:2]
    model = ScriptedModel(questions=["Nothing useful"] * 6, answers=[GOOD, REFUSAL] * 20)
    seen = []
    report = run_synth(store, GroundedTeacher(model, TeacherOptions(candidates=2)), chunks,
                       questions_per_chunk=2, progress=lambda done, total, new: seen.append((done, total, len(new))))
    assert seen == [(1, 2, 2), (2, 2, 2)]
    assert report.pairs == 4 and report.template_questions == 4 and report.chunks == 2
    table = SyntheticPairs(store)
    stored = table.list()
    assert [p.id for p in stored] == list(report.pair_ids)
    assert {p.doc_id for p in stored} == {c.doc_id for c in chunks}
    assert all(p.judge["candidates"] and p.teacher == "scripted" for p in stored)
    assert len(table.list(accepted_only=True)) == report.accepted
    assert table.delete_for_document(chunks[0].doc_id) == 2
    assert table.counts()["total"] == 2


def test_repair_pairs_die_with_their_conversation(store):
    u = store.create_user("carol", "pw-carol")
    c = store.create_conversation(u.id, "plans")
    _, answer = store.add_turn(c.id, Q, "It is free.")
    teacher = GroundedTeacher(ScriptedModel([], [GOOD, REFUSAL]), TeacherOptions(candidates=2))
    pair = teacher.answer(Q, PRICING_CHUNK)
    table = SyntheticPairs(store)
    with pytest.raises(ValueError, match="repair"):
        table.add(pair, "repair")
    table.add(pair, "repair", target_message_id=answer.id)
    assert table.counts()["total"] == 1
    store.delete_conversation(c.id, u.id)
    assert table.counts()["total"] == 0


# --------------------------------------------------------------------------------------- real models


FAST = TeacherOptions(candidates=2, question_samples=2, question_max_tokens=8, answer_max_tokens=8)


def test_local_hf_teacher_on_the_tiny_model(tiny_model_dir):
    teacher = local_teacher(tiny_model_dir, FAST)
    assert isinstance(teacher.model, HFTeacherModel)
    pairs = teacher.pairs_for_chunk(PRICING_CHUNK, questions=1)
    assert len(pairs) == 1 and [c.origin for c in pairs[0].candidates] == ["model", "model", "extract"]
    # random weights write no usable question and no grounded answer: a template question, every sample
    # rejected, and the passage's own sentence kept, with a sample as the DPO pair's rejected side
    assert pairs[0].question_source == "template" and not any(c.verdict.accepted for c in pairs[0].candidates[:2])
    assert pairs[0].accepted and pairs[0].answer_origin == "extract" and pairs[0].rejected
    assert teacher.stats["questions_rejected"] == 2


def test_openai_teacher_against_our_own_api(tmp_path, tiny_model_dir):
    from tests.helpers import start_server

    server = start_server(tmp_path / "api-home", tiny_model_dir, max_new_tokens=16)
    try:
        user = server.services.store.create_user("teacher", "teacher-password-1")
        key = server.services.store.create_api_key(user.id)
        teacher = openai_teacher(server.url + "/v1", server.services.backend.model_name, api_key=key, options=FAST)
        assert isinstance(teacher.model, OpenAITeacherModel)
        before = server.calls
        pairs = teacher.pairs_for_chunk(PRICING_CHUNK, questions=1)
        assert server.calls - before == FAST.question_samples + FAST.candidates  # every sample was a request
        assert len(pairs) == 1 and pairs[0].teacher.startswith("openai:")
        assert [c.origin for c in pairs[0].candidates] == ["model", "model", "extract"]
    finally:
        server.stop()


def test_self_teacher_through_the_runtime_backend(settings, tiny_model_dir):
    from assistant.runtime import make_backend

    backend = make_backend(settings.model_copy(update={"model": str(tiny_model_dir), "torch_threads": 1}),
                           progress=False)
    teacher = self_teacher(backend, options=FAST)
    assert isinstance(teacher.model, BackendTeacherModel) and teacher.name.startswith("self:")
    pairs = teacher.pairs_for_chunk(PRICING_CHUNK, questions=2)
    assert len(pairs) == 2 and all([c.origin for c in p.candidates] == ["model", "model", "extract"] for p in pairs)


@pytest.fixture(scope="module")
def embedded_model_dir(tmp_path_factory) -> Path:
    from assistant.config import Settings
    from assistant.models import prepare_model

    return prepare_model(Settings.load(env={}, home=tmp_path_factory.mktemp("embedded")), progress=False)


@pytest.mark.slow
def test_self_teacher_on_the_embedded_model_makes_grounded_pairs(store, settings, embedded_model_dir):
    from assistant.runtime import make_backend

    backend = make_backend(settings.model_copy(update={"model": str(embedded_model_dir), "torch_threads": 1}),
                           progress=False)
    chunks = [c for c in chunks_from_folder(DOCS) if c.doc_id in ("pricing", "company")]
    options = TeacherOptions(candidates=3, question_samples=2, answer_max_tokens=64)
    report = run_synth(store, self_teacher(backend, options=options), chunks, questions_per_chunk=1)
    stored = SyntheticPairs(store).list()
    assert report.pairs == len(stored) == 2
    assert report.accepted >= 1, [p.judge for p in stored]
    for p in stored:
        assert p.doc_id in ("pricing", "company")
        verdicts = p.judge["candidates"]
        assert [v["origin"] for v in verdicts] == ["model"] * 3 + ["extract"] * (len(verdicts) - 3)
        assert all(v["accepted"] == (not v["reasons"]) for v in verdicts)
        if p.accepted:
            assert judge(p.question, p.answer, next(c.text for c in chunks if c.doc_id == p.doc_id)).accepted


def test_cli_synth_with_a_local_teacher(store, settings, tiny_model_dir):
    from typer.testing import CliRunner

    from training.cli import app

    runner = CliRunner()
    args = ["synth", "--home", str(settings.home), "--docs", str(DOCS), "--teacher", "local",
            "--teacher-model", str(tiny_model_dir), "--questions", "1", "--candidates", "2", "--limit", "2"]
    out = runner.invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "2 pairs from 2 chunks" in out.output
    assert SyntheticPairs(store).counts()["total"] == 2
    first = {p.doc_id for p in SyntheticPairs(store).list()}
    # a second run reads two chunks the first did not (spread over the documents, not the first two again)
    out = runner.invoke(app, args)
    assert out.exit_code == 0, out.output
    second = {p.doc_id for p in SyntheticPairs(store).list()} - first
    assert len(first) == 2 and len(second) == 2
    missing = runner.invoke(app, ["synth", "--home", str(settings.home), "--teacher", "local"])
    assert missing.exit_code == 2 and "--docs FOLDER or --kb" in missing.output


def test_chunks_from_the_knowledge_base(store, settings, tiny_embedder_dir):
    from memory.knowledge import KnowledgeBase
    from training.synth import chunks_from_knowledge

    kb = KnowledgeBase(settings.model_copy(update={"embedder": str(tiny_embedder_dir), "chunk_tokens": 60,
                                                   "chunk_overlap": 10}))
    try:
        alice = store.create_user("alice", "pw-alice")
        bob = store.create_user("bob", "pw-bob")
        info = kb.ingest(alice, "pricing.md", PRICING.encode(), scope="private")
        kb.ingest(bob, "security.md", (DOCS / "security.md").read_bytes(), scope="private")
        chunks = chunks_from_knowledge(kb, alice)
        assert len(chunks) == info.chunks > 1
        assert {c.doc_id for c in chunks} == {info.doc_id}  # bob's private document is not alice's to use
        assert all(c.title == info.title and c.text.strip() for c in chunks)
        assert "8 dollars per member per month" in " ".join(c.text for c in chunks)
        assert chunks_from_knowledge(kb, alice, doc_ids=["nope"]) == []
    finally:
        kb.close()


# --------------------------------------------------------------------------------------- whose answer is kept
def test_the_self_teacher_keeps_the_passages_sentence_never_its_own_sample():
    """Issue 26: no sample of the embedded teacher was ever kept. The extract gets the judge's top score, and the
    samples that pass the lexical judge either restate it or stitch in other sentences' words; so the self-teacher
    keeps only the extract, and its samples are the DPO pair's rejected side (docs/teacher.md)."""
    mixed = "The Team plan costs 8 dollars per member per month and includes unlimited version history."
    model = ScriptedModel([], [mixed, REFUSAL] + [SHORT_GOOD, SHORT_GOOD])
    teacher = GroundedTeacher(model, TeacherOptions(candidates=2, answers_from_samples=False))
    pair = teacher.answer("What does the Team plan cost per month?", PRICING_CHUNK)
    assert pair.accepted and pair.answer == GOOD and pair.answer_origin == "extract"
    assert pair.rejected == REFUSAL
    # Without an extract (here switched off) an accepted sample is still not kept as the answer.
    teacher = GroundedTeacher(model, TeacherOptions(candidates=2, answers_from_samples=False, extract=False))
    nothing = teacher.answer("How much is it each month for each member?", PRICING_CHUNK)
    assert [c.origin for c in nothing.candidates] == ["model", "model"] and any(
        c.verdict.accepted for c in nothing.candidates)
    assert not nothing.accepted and nothing.rejected is None
    # self_teacher sets it whatever options it is given (the backend is only called when it samples).
    assert not self_teacher(object(), options=TeacherOptions(candidates=2)).options.answers_from_samples


def test_a_stronger_teachers_accepted_answer_comes_before_the_extract():
    """The extract scores the judge's maximum (1.0), so a paraphrase could never win; a teacher stronger than the
    student (a local model or an OpenAI-compatible endpoint) ranks its accepted answers first."""
    kept = {}
    for prefer in (False, True):
        model = ScriptedModel([], [SHORT_GOOD, REFUSAL])
        teacher = GroundedTeacher(model, TeacherOptions(candidates=2, prefer_samples=prefer))
        kept[prefer] = teacher.answer("What does the Team plan cost per month?", PRICING_CHUNK)
    assert kept[False].answer == GOOD and kept[True].answer == SHORT_GOOD and kept[True].accepted
    strong = openai_teacher("http://127.0.0.1:9/v1", "m")  # no request is made until it is asked
    assert strong.options.prefer_samples and strong.options.answers_from_samples


def test_an_answer_must_give_the_kind_of_thing_its_question_asks_for() -> None:
    """A year for "which year", a number for "how much", a time for "when". The self-teacher answered "Which year
    does the Hanbit Family Clinic open?" with the clinic's opening sentence (it shares the question's words, holds no
    year), and the adapter trained on it opened every answer with a document's first sentence."""
    from training.teacher import answers_kind, extract_answer, judge

    bench = Path(__file__).parents[1] / "bench" / "docsets"
    guide = (bench / "hanbit" / "clinic_guide.md").read_text(encoding="utf-8")
    first = guide.split("\n\n")[1].split(". ")[0] + "."
    question = "Which year does the Hanbit Family Clinic open?"
    assert "wrong_kind" in judge(question, first, guide).reasons
    assert extract_answer(question, guide) != first
    assert not judge(question, first, guide).accepted
    rules = (bench / "railyard" / "depot_rules.md").read_text(encoding="utf-8")
    assert extract_answer("In which year did the depot open?", rules).startswith("The depot opened in 1998")
    assert answers_kind("How much is the flu shot?", "It costs 35,000 won.")
    assert not answers_kind("How many members can the Free plan have?", "The Free plan is for small teams.")
    assert answers_kind("How long do I wait after a vaccination?", "Please wait fifteen minutes.")
    assert not answers_kind("When is the lunch break?", "Hanbit Clinic is a family medicine clinic.")
    assert answers_kind("What does fault F-101 mean?", "Traction overtemperature.")  # no kind to check
