"""The page's two languages: every text the page uses has an English and a Korean version, and the text
the server puts together (bubble notes, "how this was answered", the admin console's readiness and job
lines, table headings) comes out in the page's language."""

from __future__ import annotations

import ast
import asyncio
import re
from pathlib import Path

import gradio as gr
import httpx
import pytest
from gradio.state_holder import SessionState
from starlette.requests import Request as StarletteRequest

from memory.types import REASON_TAGS
from tests.helpers import start_server
from tests.test_ui_handlers import env, open_services  # noqa: F401 - the module's services fixture
from training.gate_report import render_markdown
from training.registry import Registry
from ui import admin as ui_admin
from ui import app as ui_app
from ui import handlers as h
from ui import library, people, personal, sentences
from ui.app import reason_choices
from ui.i18n import STRINGS, page_language, speaking, tr
from ui.render import details_markdown, memory_note, step_sentence
from ui.sentences import gate_reason, say

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


# ---- sentences other layers write (errors, gate reasons, evaluation reports), the login form and first run
def korean_request(lang_cookie: str | None = None, accept: str = "ko-KR,ko;q=0.9") -> gr.Request:
    """A page request from a browser set to Korean (or with the header switch's cookie)."""
    headers = [(b"accept-language", accept.encode())]
    if lang_cookie:
        headers.append((b"cookie", f"assistant-lang={lang_cookie}".encode()))
    return gr.Request(request=StarletteRequest({"type": "http", "method": "POST", "path": "/", "headers": headers,
                                                "query_string": b""}), username="alice")


def test_the_pages_errors_come_in_korean(env):  # noqa: F811
    s, alice = env["services"], env["alice"]
    used = keys_used_in_ui() | sentences.KEYS | {"login_note"}
    assert sorted(used - set(STRINGS)) == []
    # a refusal of the chat service (too long: the limit is 500 here), through the page's own error wrapper
    long = "x" * 600
    with pytest.raises(h.UiError) as refused:
        h.start_turn(s, alice, None, long)
    assert refused.value.message == "message is 600 characters; the limit is 500"  # the service's own words
    assert say(refused.value.message, "ko") == "메시지가 600자입니다. 최대 500자입니다."

    def rename(cid, title, request: gr.Request):
        h.rename_conversation(s, alice, cid, title)

    with pytest.raises(gr.Error) as toast:
        ui_app._guarded(rename)(None, "new", korean_request())
    assert toast.value.message == "먼저 대화를 고르세요."
    with pytest.raises(gr.Error) as toast:
        ui_app._guarded(rename)(None, "new", korean_request(lang_cookie="en"))  # the switch chose English
    assert toast.value.message == "choose a conversation first"
    with pytest.raises(h.UiError) as refused:
        h.start_turn(s, alice, None, "hello", model="no-such-model")
    assert say(refused.value.message, "ko").startswith("'no-such-model' 모델은 없습니다. 쓸 수 있는 모델: ")
    with pytest.raises(h.UiError) as refused:
        h.rate(s, alice, 10**9, 1)
    assert say(refused.value.message, "ko") == "그 답변을 찾을 수 없습니다."
    # an upload the knowledge base refuses, as the Documents tab lists it
    summary = library.upload_summary([library.UploadResult("empty.md", False, "'empty.md' is empty")], "ko")
    assert "'empty.md'은(는) 빈 파일입니다." in summary and "is empty" not in summary
    # the account tab and the admin console's People section (a store's refusal)
    with speaking("ko"):
        assert personal.forget(s, alice, False) == "먼저 확인란을 선택하세요. 되돌릴 수 없습니다."
    with pytest.raises(h.UiError) as refused:
        people.add_person(s, env["admin"], "alice", "long-enough-1", "long-enough-1", False)
    assert say(refused.value.message, "ko") == "'alice'은(는) 이미 있는 사용자 이름입니다."
    # a sentence nobody translated yet is shown as it is, never dropped
    assert say("the moon is made of cheese", "ko") == "the moon is made of cheese"
    assert say("conversation 7 not found", "en") == "conversation 7 not found"


def _report(tmp_path: Path, reason: str) -> Path:
    """A gate report folder written by the training layer's own renderer."""
    metrics = {"val_loss": 1.2, "pref_accuracy": 0.5, "grounded": 0.4, "general_qa": 0.6}
    data = {"candidate": str(tmp_path / "cand-v0003"), "baseline": None, "base_model": "tiny",
            "eval_set": {"source": "frozen", "sizes": {"sft": 4, "dpo": 2}}, "seconds": 3.5,
            "created_at": "2026-12-06T10:00:00", "gate": {"min_gain": 0.02},
            "metrics": {"base": {**metrics, "val_loss": 1.5}, "candidate": metrics},
            "decision": {"passed": False, "declined": True, "reason": reason,
                         "checks": [{"name": "general questions vs base", "passed": False, "kind": "forgetting",
                                     "candidate": 0.6, "reference": 0.7, "reference_label": "base",
                                     "threshold": "drop <= 0.05", "detail": "-0.100"}],
                         "skipped": ["liked_correct"], "too_small": ["grounded: 2 questions, fewer than 10"],
                         "power": ["pref_accuracy on 2 pairs: one item is 50.0 points."]},
            "samples": [{"check": "grounded", "question": "휴가는 며칠?", "answers": {"base": "몰라요",
                                                                                 "candidate": "15일"}}]}
    out = tmp_path / "report"
    out.mkdir()
    (out / "report.md").write_text(render_markdown(data), encoding="utf-8")
    return out


def test_gate_reasons_and_reports_in_korean(env, tiny_adapters, tmp_path):  # noqa: F811
    s, admin = env["services"], env["admin"]
    reason = ("declined to decide: no gain metric has enough held-out data (pref_accuracy: 2 pairs, fewer than "
              "10)")
    v = Registry(s.settings, s.store).register(tiny_adapters["alpha"], gate="failed", note=reason,
                                               report_dir=_report(tmp_path, reason))
    actions = ui_admin.AdminActions(s)
    with speaking("ko"):
        frame, _, _ = ui_admin.adapters_view(actions, admin)
        row = frame[frame[tr("ac_name", "ko")] == v.name].iloc[0]
        assert row[tr("ac_gate", "ko")] == "실패"
        assert row[tr("ac_note", "ko")].startswith("결정 보류: 향상을 판단할 평가용 데이터가 충분한 지표가 없습니다 (")
        md, _ = ui_admin.report_view(actions, admin, v.name)
    for korean in ("# 평가: cand-v0003 대 기본 모델", "**결정: 보류** — 결정 보류: ", "## 지표",
                   "| 지표 | 좋은 쪽 | 기본 모델 |", "| 평가용 손실 (nats/토큰) | 낮을수록 |", "## 검사",
                   "| 검사 | 결과 | 새 모델 |", "| 실패 |",
                   "측정하지 못함 (평가용 행 없음): liked_correct.", "판단하지 않음 (평가용 데이터 부족): grounded: 2",
                   "## 이 검사로 알 수 있는 것", "## 답변 예시", "| 모델 | 답변 |", "| 새 모델 (cand-v0003) | 15일 |",
                   "## 평가 설정", "| 설정 | 값 |", "2026-12-06T10:00:00에 3.5초 동안 평가했습니다."):
        assert korean in md, korean
    assert not re.search(r"Decision|Metrics|Checks|Not measured|held-out loss|Sample answers", md), md
    # the English page keeps the training layer's own words
    md_en, _ = ui_admin.report_view(actions, admin, v.name)
    assert "**Decision: DECLINED** — declined to decide" in md_en
    assert gate_reason("gate passed: significant gain on pref_accuracy; no regression beyond tolerance", "ko") == \
        "평가 통과: pref_accuracy에서 의미 있게 향상되었고, 허용 범위를 넘어 나빠진 것은 없습니다"
    assert gate_reason("gate passed: gain above its minimum on liked_correct; no regression beyond tolerance",
                       "ko") == ("평가 통과: liked_correct에서 최소 기준을 넘게 향상되었고, "
                                 "허용 범위를 넘어 나빠진 것은 없습니다")
    assert gate_reason("no gain above its minimum on grounded", "ko") == "grounded에서 최소 기준을 넘는 향상이 없습니다"
    assert gate_reason("regression: general questions vs base (-0.100)", "ko") == \
        "나빠짐: general questions vs base (-0.100)"
    assert gate_reason("a reason from a later version", "ko") == "a reason from a later version"


def test_the_login_form_and_first_run_follow_the_browsers_language(tmp_path, tiny_model_dir):
    srv = start_server(tmp_path / "home", tiny_model_dir, with_ui=True, max_new_tokens=4)
    ko = {"Accept-Language": "ko-KR,ko;q=0.9,en;q=0.8"}
    try:
        with httpx.Client(base_url=srv.url, follow_redirects=False, timeout=30) as c:
            form = c.get("/setup", headers=ko)
            assert form.status_code == 200 and '<html lang="ko">' in form.text
            for korean in ("아직 계정이 없습니다", "사용자 이름", "비밀번호 (8자 이상)", "관리자 만들기"):
                assert korean in form.text, korean
            assert "Create the administrator" not in form.text
            # the header switch's cookie wins over the browser's language
            assert "Create the administrator" in c.get("/setup", headers={**ko, "Cookie": "assistant-lang=en"}).text
            nonce = re.search(r'name="nonce" value="([^"]+)"', form.text).group(1)
            short = c.post("/setup", headers=ko, data={"nonce": nonce, "username": "hana", "password": "short",
                                                       "again": "short"})
            assert "비밀번호는 8자 이상이어야 합니다." in short.text and srv.services.store.list_users() == []
            nonce = re.search(r'name="nonce" value="([^"]+)"', short.text).group(1)
            done = c.post("/setup", headers=ko, data={"nonce": nonce, "username": "hana",
                                                      "password": "hana-pass-1", "again": "hana-pass-1"})
            assert "관리자 <b>hana</b>을(를) 만들었습니다" in done.text
            # Gradio's login form: its note, in the language of each request
            login_ko = c.get("/", headers=ko)
            assert login_ko.status_code == 200 and tr("login_note", "ko") in login_ko.text
            login_en = c.get("/", headers={**ko, "Cookie": "assistant-lang=en"})
            assert tr("login_note", "en") in login_en.text and tr("login_note", "ko") not in login_en.text
            assert tr("login_note", "en") in c.get("/", headers={"Accept-Language": "en-US"}).text
    finally:
        srv.stop()


def test_switching_the_language_sends_every_tab_its_label_again(env):  # noqa: F811
    """Gradio translates a tab's label once, when the page is built, and again only when that tab is
    updated: the switch's event and the page's load event update every tab (the browser test sees them
    relabelled); their browser part waits until the new language is in place before asking the server."""
    s = env["services"]
    demo = ui_app.build_blocks(s)
    tabs = [b for b in demo.blocks.values() if isinstance(b, gr.Tab)]
    assert len(tabs) == 6  # Chat, Documents, Memory, Account, My assistant, Admin
    switch = next(f for f in demo.fns.values() if f.js == ui_app.LANGUAGE_TOGGLE_JS)
    load = next(f for f in demo.fns.values() if f.js == ui_app.LOAD_LANGUAGE_JS)
    for event in (switch, load):
        assert {t._id for t in tabs} <= {o._id for o in event.outputs}
        assert "await (" in event.js and "changeLocale" in event.js
    admin_tab = next(t for t in tabs if t.elem_id is None and str(t.label) == str(ui_app.T("tab_admin")))

    async def run(event, inputs, user):
        state = SessionState(demo)
        out = await demo.process_api(block_fn=event, inputs=inputs, state=state,
                                     request=korean_request(lang_cookie="en") if user is None else user)
        return dict(zip([o._id for o in event.outputs], out["data"], strict=True))

    request = korean_request(lang_cookie="en")
    by_id = asyncio.run(run(switch, [None, None], request))
    for t in tabs:
        update = by_id[t._id]
        assert update["__type__"] == "update" and str(update["label"]) == str(t.label), update
        assert "visible" not in update  # the switch leaves the admin tab as the load left it
    by_id = asyncio.run(run(load, [], request))
    assert by_id[admin_tab._id]["visible"] is False  # alice is no admin
    assert all(str(by_id[t._id]["label"]) == str(t.label) for t in tabs)
