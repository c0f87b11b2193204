"""The page's two languages: every text the page uses has an English and a Korean version, and the text
the server puts together (bubble notes, "how this was answered", the admin console's readiness and job
lines, table headings) comes out in the page's language."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from memory.types import REASON_TAGS
from tests.test_ui_handlers import env, open_services  # noqa: F401 - the module's services fixture
from ui import admin as ui_admin
from ui import handlers as h
from ui import library, people, personal
from ui.app import reason_choices
from ui.i18n import STRINGS, page_language, speaking, tr
from ui.render import details_markdown, memory_note, step_sentence

UI = Path(__file__).resolve().parent.parent / "ui"
HANGUL = re.compile(r"[\uac00-\ud7a3]")
PLACE = re.compile(r"{(\w*)}")
# Texts that read the same in both languages (names, ids, technical terms; the switch names the other one).
SAME_IN_BOTH = {"other_language", "doc_col_id", "mem_col_id", "jc_id", "d_top_p", "p_evaluate"}


def keys_used_in_ui() -> set[str]:
    """Every literal key passed to T / tr / label (ui.library's name for T) in ui/*.py."""
    used = set()
    for path in UI.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                    and node.func.id in ("T", "tr", "label") and node.args \
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                used.add(node.args[0].value)
    return used


def test_every_text_the_page_uses_has_english_and_korean():
    used = keys_used_in_ui()
    assert len(used) > 200  # the scan found the page's texts
    # keys made from tables rather than written out
    used |= {f"reason_{t}" for t in REASON_TAGS}
    used |= set(ui_admin.JOB_HEADINGS) | set(ui_admin.ADAPTER_HEADINGS) | set(ui_admin.OUTCOMES.values())
    used |= set(ui_admin.PHASE_WORDS.values()) | set(personal.STATE_WORDS.values()) | set(personal.ADMIN_HEADINGS)
    used |= set(library.DOC_HEADINGS) | set(library.MEMORY_HEADINGS) | set(people.PEOPLE_HEADINGS)
    used |= {key for key, _ in ui_admin.STAGE_CHOICES}
    assert sorted(used - set(STRINGS)) == []
    for key, (en, ko) in STRINGS.items():
        assert en.strip() and ko.strip(), key
        assert sorted(PLACE.findall(en)) == sorted(PLACE.findall(ko)), f"{key}: the two versions fill different places"
        if key not in SAME_IN_BOTH:
            assert HANGUL.search(ko), f"{key} has no Korean: {ko!r}"


def test_the_page_language_follows_the_switch_then_the_browser():
    class Req:
        def __init__(self, cookies, accept):
            self.cookies, self.headers = cookies, {"accept-language": accept}

    assert page_language(Req({}, "ko-KR,ko;q=0.9,en;q=0.8")) == "ko"
    assert page_language(Req({}, "en-US,en;q=0.9,ko;q=0.8")) == "en"
    assert page_language(Req({"assistant-lang": "en"}, "ko-KR")) == "en"  # the header switch wins
    assert page_language(Req({"assistant-lang": "ko"}, "")) == "ko"
    assert page_language(Req({"assistant-lang": "xx"}, "")) == "en"  # anything else: English
    assert page_language(object()) == "en"


def test_an_answer_in_korean_on_its_bubble_and_in_its_details(env):  # noqa: F811
    s, alice = env["services"], env["alice"]
    conv = s.store.create_conversation(alice.id, "한국어")
    _, answer = s.store.add_turn(
        conv.id, "q", "a", adapter="alpha", generation={"temperature": 0.2},
        sources=[{"title": "leave.md", "snippet": "15 days"}],
        steps=[{"tool": "search_documents", "args": {"query": "휴가"}, "result": "2 hits", "ms": 3},
               {"tool": "remember", "args": {"text": "차를 좋아함"}, "result": "ok"}],
        status="stopped")
    s.store.add_edit(alice.id, answer.id, "고친 답")
    view = h.conversation_view(s, alice, conv.id, "ko")
    bubble, details = view.rows[1]["content"], view.rows[2]
    assert "*끝나기 전에 중지됨*" in bubble and "*직접 고친 답변" in bubble
    assert "기억이 바뀌었습니다: “차를 좋아함” 기억함" in bubble
    assert details["metadata"]["title"] == "답변 과정"
    md = details["content"]
    for korean in ("어댑터: **alpha**", "생성 설정: 온도 0.2", "끝나기 전에 중지되었습니다.", "출처:", "단계:",
                   "문서 검색 “휴가”: 2 hits", "내가 고친 답변"):
        assert korean in md, korean
    assert not re.search(r"Adapter|Generation|Stopped|Sources|Steps", md)
    assert h.answer_summary(view, answer.id).startswith("선택한 답변: “")
    # the same answer in English, as before; the default is English
    assert h.conversation_view(s, alice, conv.id).rows[2]["metadata"]["title"] == "How this was answered"
    assert "Memory updated: remembered" in memory_note(answer) and "Stopped before the end." in details_markdown(answer)
    with speaking("ko"):  # what an event handler sets for the plain functions it calls
        assert step_sentence({"tool": "calculator", "args": {"expression": "2+2"}, "result": "4"}) == "계산 “2+2”: 4"
    assert reason_choices("ko")[0] == ("(없음)", "") and ("틀림", "wrong") in reason_choices("ko")


def test_the_admin_console_in_korean(env):  # noqa: F811
    s, admin = env["services"], env["admin"]
    actions = ui_admin.AdminActions(s)
    with speaking("ko"):
        ready = ui_admin.readiness_markdown(actions, admin)
        assert ready.startswith("**아직 재학습할 수 없습니다: ") and "학습에는 예시가" in ready
        assert "예시를 쓰는 방법" in ready
        assert "Training" not in ready and "examples" not in ready
        assert list(ui_admin.jobs_rows(actions, admin).columns) == [tr(k, "ko") for k in ui_admin.JOB_HEADINGS]
        assert "결과" in ui_admin.jobs_rows(actions, admin).columns
        frame, summary, _ = ui_admin.adapters_view(actions, admin)
        assert summary.startswith("서비스 중: **") and "이름" in frame.columns
        assert "| 항목 | 개수 |" in ui_admin.counts_markdown(actions, admin)
        job = {"status": "running", "params": {}, "progress": {"phase": "train", "step": 3, "max_steps": 10,
                                                                "stage": "sft", "fraction": 0.5}}
        assert ui_admin.progress_text(job) == "4단계 중 2단계: 학습하는 중 (sft, 10스텝 중 3)"
        rejected = {"status": "succeeded", "result": {"status": "rejected"}}
        assert ui_admin.job_outcome(rejected).startswith("끝남: 새 모델이")
        assert list(people.people_frame(s, admin).columns) == ["이름", "역할", "상태", "만든 날"]
    # English stays the training layer's own sentences
    ready = ui_admin.readiness_markdown(actions, admin)
    assert ready.startswith("**Not ready to retrain: ") and "Training needs at least" in ready


def test_my_assistant_in_korean(env):  # noqa: F811
    s, alice = env["services"], env["alice"]
    with speaking("ko"):
        _, text = personal.status_markdown(s, alice)
        assert HANGUL.search(text) and not re.search(r"[A-Za-z]{4,}", text.replace("LoRA", "")), text
        assert personal.report_markdown(s, alice) == "아직 평가 보고서가 없습니다."
        assert personal.forget(s, alice, False) == "먼저 확인란을 선택하세요. 되돌릴 수 없습니다."


@pytest.mark.parametrize("lang", ["en", "ko"])
def test_tr_fills_the_values(lang):
    text = tr("p_phase", lang, n=1, total=4, words="x")
    assert "1" in text and "4" in text and "x" in text and "{" not in text
