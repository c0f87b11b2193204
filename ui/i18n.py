"""The page's labels in English and Korean; the browser's language picks one (Gradio's `gr.I18n`).

`T(key)` goes where a component takes a label, a placeholder or a button text; `I18N` is passed to
`gr.mount_gradio_app`, and the browser shows the language it asks for (Korean for `ko`, English
otherwise), or the one chosen with the header's switch (ui/app.py). Text the server writes at run time
goes through `T` too: a sentence with a value in it is `T(key) + " value"` (the browser translates
the key and keeps the rest), so the value comes last.

Text that is more than one label with values in it (a chat bubble's notes and details, the admin
console's readiness and job lines, table headings) is put together on the server in the page's
language: `tr(key, lang, **values)` fills a `{value}` template of `STRINGS`, and `page_language(request)`
says which language the page shows (the header switch's choice, kept in the `assistant-lang` cookie, or
else the browser's first language). Event handlers that call plain functions deep down set it for the
call with `speaking(lang)`; those functions read it through `current_language()` unless given one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import gradio as gr

STRINGS: dict[str, tuple[str, str]] = {  # key: (English, Korean)
    "tab_chat": ("Chat", "채팅"),
    "tab_documents": ("Documents", "문서"),
    "tab_memory": ("Memory", "기억"),
    "tab_account": ("Account", "계정"),
    "tab_admin": ("Admin", "관리"),
    "log_out": ("Log out", "로그아웃"),
    "new_chat": ("+ New conversation", "+ 새 대화"),
    "conversations": ("Conversations", "대화 목록"),
    "rename_or_delete": ("Rename or delete", "이름 바꾸기 또는 삭제"),
    "new_title": ("New title", "새 제목"),
    "rename": ("Rename", "이름 바꾸기"),
    "delete": ("Delete", "삭제"),
    "delete_confirm": ("Yes, delete it and its feedback", "네, 대화와 피드백을 삭제합니다"),
    "keep_it": ("Keep it", "그대로 두기"),
    "model": ("Model", "모델"),
    "model_or_adapter": ("Model or adapter", "모델 또는 어댑터"),
    "model_info": ("assistant = the adapter serving now", "assistant = 지금 서비스 중인 어댑터"),
    "chat_placeholder": ("Ask anything. Answers stream in; Stop ends one early.",
                         "무엇이든 물어보세요. 답변은 실시간으로 나타나며, 중지로 일찍 끝낼 수 있습니다."),
    "message_placeholder": ("Message (Enter sends, Shift+Enter adds a line)",
                            "메시지 (Enter로 보내기, Shift+Enter로 줄 바꿈)"),
    "send": ("Send", "보내기"),
    "message": ("Message", "메시지"),
    "stop": ("Stop", "중지"),
    "reason": ("Reason (optional)", "이유 (선택)"),
    "comment": ("Comment (optional)", "의견 (선택)"),
    "why_rating": ("**Why?** (optional: it helps the next retrain)",
                   "**이유는요?** (선택: 다음 재학습에 도움이 됩니다)"),
    "save_reason": ("Save", "저장"),
    "close": ("Close", "닫기"),
    "other_language": ("한국어", "English"),  # the switch names the language it switches to
    "dark_mode": ("◐ Dark mode", "◐ 어두운 화면"),
    "search_placeholder": ("Search conversations", "대화 검색"),
    "export": ("Export (Markdown and JSON)", "내보내기 (Markdown, JSON)"),
    "export_files": ("Download", "다운로드"),
    "edit_answer": ("Edit this answer into the right one", "이 답변을 올바르게 고치기"),
    "corrected_answer": ("Corrected answer", "고친 답변"),
    "save_correction": ("Save correction", "수정 저장"),
    "regenerate": ("Regenerate and compare", "다시 생성해서 비교하기"),
    "cmp_keep": ("Keep this one", "이 답변으로 정하기"),
    # notices (whole sentences: a notice is translated as a whole in the browser)
    "no_answer_selected": ("No answer selected yet: send a message, then rate, correct or regenerate its answer.",
                           "아직 선택한 답변이 없습니다. 메시지를 보낸 뒤 답변을 평가하거나 고치거나 다시 생성하세요."),
    "note_deleted": ("Conversation deleted.", "대화를 삭제했습니다."),
    "note_wait_to_rate": ("Wait until the answer is complete, then rate it.", "답변이 끝난 뒤에 평가해 주세요."),
    "note_thumb_up": ("Thumbs up saved.", "좋아요를 저장했습니다."),
    "note_thumb_down": ("Thumbs down saved.", "싫어요를 저장했습니다."),
    "note_withdrawn": ("Rating withdrawn.", "평가를 취소했습니다."),
    "note_reason_saved": ("Rating saved with your reason.", "이유와 함께 평가를 저장했습니다."),
    "note_corrected": ("Correction saved.", "고친 답변을 저장했습니다."),
    "note_which_better": ("Which answer is better? ‹ › switch the bubble between the two; keep the better one.",
                          "어느 답변이 더 좋은가요? ‹ › 로 두 답변을 번갈아 보고, 더 좋은 쪽으로 정하세요."),
    "note_nothing_to_compare": ("Stopped: nothing to compare.", "중지되어 비교할 답변이 없습니다."),
    "note_kept_original": ("Saved: you kept the answer before (1/2).", "저장했습니다: 원래 답변(1/2)으로 정했습니다."),
    "note_kept_new": ("Saved: you kept the new answer (2/2).", "저장했습니다: 새 답변(2/2)으로 정했습니다."),
    # the admin console
    "admin_heading": ("## Self-improvement loop", "## 자기 개선 루프"),
    "admin_refresh": ("Refresh", "새로 고침"),
    "admin_data": ("### Data", "### 데이터"),
    "admin_datasets": ("### Datasets", "### 데이터셋"),
    "admin_snapshot": ("Snapshot", "스냅샷"),
    "admin_kind": ("Kind", "종류"),
    "admin_split": ("Split", "분할"),
    "admin_build": ("Build a new snapshot", "새 스냅샷 만들기"),
    "admin_synth": ("Synthetic pairs from documents (teacher)", "문서로 만드는 합성 질문-답변 쌍 (교사 모델)"),
    "admin_synth_chunks": ("Chunks at most", "최대 청크 수"),
    "admin_synth_questions": ("Questions per chunk", "청크당 질문 수"),
    "admin_synth_docs": ("Documents folder on the server (empty: the knowledge base)",
                         "서버의 문서 폴더 (비우면 지식 베이스)"),
    "admin_synth_go": ("Generate", "생성"),
    "admin_retrain": ("### Retrain", "### 재학습"),
    "admin_stages": ("What to train", "학습 단계"),
    "admin_stages_info": ("SFT learns from good and corrected answers; DPO from which of two answers was "
                          "preferred.", "SFT는 좋은 답변과 고친 답변에서, DPO는 두 답변 중 더 나은 쪽에서 배웁니다."),
    "admin_stages_both": ("SFT, then DPO (recommended)", "SFT 후 DPO (권장)"),
    "admin_stages_sft": ("SFT only", "SFT만"),
    "admin_stages_dpo": ("DPO only", "DPO만"),
    "admin_max_steps": ("Max steps per stage", "단계별 최대 스텝"),
    "admin_max_steps_info": ("0 runs the epochs below; a small number (20) makes a quick trial run.",
                             "0이면 아래 에포크만큼 학습합니다. 작은 값(20)은 빠른 시험 실행입니다."),
    "admin_epochs": ("SFT epochs", "SFT 에포크"),
    "admin_epochs_info": ("Passes over the examples (default 2). More can overfit a small dataset.",
                          "예시를 몇 번 반복할지 (기본 2). 데이터가 적을 때 너무 크면 과적합됩니다."),
    "admin_sft_lr": ("SFT learning rate", "SFT 학습률"),
    "admin_lr_info": ("How big each update is (default 0.0001). Lower if the loss jumps around.",
                      "한 번에 얼마나 바꿀지 (기본 0.0001). 손실이 들쭉날쭉하면 낮추세요."),
    "admin_dpo_lr": ("DPO learning rate", "DPO 학습률"),
    "admin_dpo_lr_info": ("Usually 5-10 times smaller than SFT's (default 0.00002).",
                          "보통 SFT보다 5~10배 작게 (기본 0.00002)."),
    "admin_beta": ("DPO beta", "DPO 베타"),
    "admin_beta_info": ("How far DPO may move from the model it starts from (default 0.1; higher stays closer).",
                        "DPO가 시작 모델에서 얼마나 멀어질 수 있는지 (기본 0.1, 클수록 가깝게 유지)."),
    "admin_rank": ("LoRA rank", "LoRA 랭크"),
    "admin_rank_info": ("Size of the adapter (default 8). Bigger learns more and needs more data and memory.",
                        "어댑터 크기 (기본 8). 클수록 더 많이 배우지만 데이터와 메모리가 더 필요합니다."),
    "admin_auto_promote": ("Promote if the gate passes", "평가를 통과하면 바로 적용"),
    "admin_auto_promote_info": ("Off: a model that passes waits for you to press Promote.",
                                "끄면 통과한 모델은 적용 버튼을 누를 때까지 기다립니다."),
    "admin_synth_first": ("Generate synthetic pairs first", "먼저 합성 쌍 만들기"),
    "admin_synth_first_info": ("Ask the teacher for question-answer pairs from the shared documents first.",
                               "먼저 공유 문서에서 교사 모델이 질문-답변 쌍을 만듭니다."),
    "admin_expert": ("Expert options (JSON, optional)", "고급 옵션 (JSON, 선택)"),
    "admin_expert_json": ("Overrides: train / gate / build", "재정의: train / gate / build"),
    "admin_start": ("Start retrain", "재학습 시작"),
    "admin_cancel": ("Cancel", "취소"),
    "admin_job": ("Job", "작업"),
    "admin_cancel_q": ("Cancel this retrain? It stops within seconds and the serving model stays as it is.",
                       "이 재학습을 취소할까요? 몇 초 안에 멈추며 서비스 중인 모델은 그대로입니다."),
    "admin_cancel_yes": ("Yes, cancel it", "네, 취소합니다"),
    "admin_cancel_no": ("Keep it running", "계속 실행"),
    "admin_log": ("Log (tail)", "로그 (끝부분)"),
    "admin_jobs": ("Job history (select a row to watch it)", "작업 기록 (행을 선택하면 진행 상황을 봅니다)"),
    "admin_adapters": ("### Adapters", "### 어댑터"),
    "admin_version": ("Version", "버전"),
    "admin_force": ("Force (gate failed)", "강제 (평가 실패)"),
    "admin_reason": ("Reason (recorded)", "이유 (기록됨)"),
    "admin_promote": ("Promote", "적용"),
    "admin_rollback": ("Roll back", "되돌리기"),
    "admin_promote_q": ("Serve the chosen version to everyone now? Roll back returns to the current one.",
                        "선택한 버전을 지금 모두에게 적용할까요? 되돌리기로 현재 버전으로 돌아갈 수 있습니다."),
    "admin_promote_yes": ("Yes, promote it", "네, 적용합니다"),
    "admin_rollback_q": ("Go back to the previous version for everyone now?", "지금 모두를 이전 버전으로 되돌릴까요?"),
    "admin_rollback_yes": ("Yes, roll back", "네, 되돌립니다"),
    "admin_not_now": ("Not now", "나중에"),
    "admin_reports": ("### Evaluation reports side by side", "### 평가 보고서 나란히 보기"),
    "admin_report_a": ("Report A", "보고서 A"),
    "admin_report_b": ("Report B", "보고서 B"),
    "admin_schedule": ("### Schedule", "### 일정"),
    "admin_s_enabled": ("Retrain automatically", "자동 재학습"),
    "admin_s_mode": ("When", "언제"),
    "admin_s_mode_feedback": ("after enough new feedback", "새 피드백이 충분히 모이면"),
    "admin_s_mode_daily": ("daily", "매일"),
    "admin_s_mode_interval": ("every N hours", "N시간마다"),
    "admin_s_min_feedback": ("New feedback needed", "필요한 새 피드백 수"),
    "admin_s_interval": ("Least hours between retrains", "재학습 사이 최소 시간(시)"),
    "admin_s_daily": ("Daily at (HH:MM, UTC)", "매일 (HH:MM, UTC)"),
    "admin_s_every": ("Every N hours", "N시간마다"),
    "admin_s_keep": ("Versions kept", "보관할 버전 수"),
    "admin_s_save": ("Save schedule", "일정 저장"),
    # the header, the Account tab and the admin console's People section
    "signed_in_admin": ("Signed in as admin:", "관리자로 로그인:"),
    "signed_in_user": ("Signed in as user:", "사용자로 로그인:"),
    "pw_intro": ("Change your password.", "비밀번호를 바꿉니다."),
    "pw_current": ("Current password", "현재 비밀번호"),
    "pw_new": ("New password (at least 8 characters)", "새 비밀번호 (8자 이상)"),
    "pw_again": ("New password again", "새 비밀번호 다시 입력"),
    "pw_change": ("Change password", "비밀번호 바꾸기"),
    "pw_changed": ("Password changed. Use the new one the next time you log in.",
                   "비밀번호를 바꿨습니다. 다음 로그인부터 새 비밀번호를 쓰세요."),
    "pw_wrong": ("The current password is not right.", "현재 비밀번호가 맞지 않습니다."),
    "pw_short": ("The new password needs at least 8 characters.", "새 비밀번호는 8자 이상이어야 합니다."),
    "pw_differ": ("The two new passwords are not the same.", "두 새 비밀번호가 같지 않습니다."),
    "people_heading": ("### People", "### 사용자"),
    "person_name": ("User name", "사용자 이름"),
    "person_password": ("Password (at least 8 characters)", "비밀번호 (8자 이상)"),
    "person_again": ("Password again", "비밀번호 다시 입력"),
    "person_admin": ("Admin", "관리자"),
    "person_add": ("Add person", "사용자 추가"),
    # the Documents tab
    "doc_unavailable": ("Documents are not available: the knowledge base is not attached to this server.",
                        "문서를 쓸 수 없습니다: 이 서버에 지식 베이스가 연결되어 있지 않습니다."),
    "doc_intro": ("Upload text, Markdown, PDF or HTML files. Answers cite the passages they used under "
                  "*How this was answered*. Largest file:",
                  "텍스트, Markdown, PDF, HTML 파일을 올리세요. 답변은 사용한 구절을 "
                  "*답변 과정* 아래에 인용합니다. 파일당 최대 크기:"),
    "doc_files": ("Files", "파일"),
    "doc_only_me": ("Only me", "나만"),
    "doc_team": ("Team (shared)", "팀 (공유)"),
    "doc_who": ("Who may see them", "볼 수 있는 사람"),
    "doc_add": ("Add documents", "문서 추가"),
    "doc_pick": ("Document", "문서"),
    "doc_delete": ("Delete document", "문서 삭제"),
    "doc_delete_q": ("Delete this document? Answers stop citing it, and its passages leave every later "
                     "training set.", "이 문서를 삭제할까요? 답변에서 더 이상 인용되지 않고, 이후 학습 데이터에서도 "
                     "빠집니다."),
    "yes_delete": ("Yes, delete it", "네, 삭제합니다"),
    "doc_deleted": ("Deleted the document and its chunks:", "문서와 그 청크를 삭제했습니다. 청크 수:"),
    # the Memory tab
    "mem_unavailable": ("Memory is not available: long-term memory is not attached to this server.",
                        "기억을 쓸 수 없습니다: 이 서버에 장기 기억이 연결되어 있지 않습니다."),
    "mem_intro": ("What the assistant remembers about you across conversations. Edit or delete anything; a "
                  "deleted memory is never used again, in answers or in training.",
                  "어시스턴트가 대화를 넘어 기억하는 내용입니다. 무엇이든 고치거나 지울 수 있으며, 지운 기억은 "
                  "답변에도 학습에도 다시 쓰이지 않습니다."),
    "mem_new": ("Add something to remember", "기억할 내용 추가"),
    "mem_add": ("Remember", "기억하기"),
    "mem_pick": ("Memory", "기억"),
    "mem_text": ("Text", "내용"),
    "mem_save": ("Save change", "변경 저장"),
    "mem_delete": ("Delete memory", "기억 삭제"),
    "mem_delete_q": ("Delete this memory and its older versions? It is never used again, in answers or in "
                     "training.", "이 기억과 이전 버전을 삭제할까요? 답변에도 학습에도 다시 쓰이지 않습니다."),
    "mem_remembered": ("Remembered:", "기억했습니다:"),
    "mem_saved": ("Saved; the old version is kept as history and no longer used.",
                  "저장했습니다. 이전 버전은 기록으로 남고 더 이상 쓰이지 않습니다."),
    "mem_deleted": ("Deleted. Versions removed:", "삭제했습니다. 지운 버전 수:"),
    "doc_col_title": ("Title", "제목"),
    "doc_col_file": ("File", "파일"),
    "doc_col_type": ("Type", "형식"),
    "doc_col_visible": ("Visible to", "볼 수 있는 사람"),
    "doc_col_chunks": ("Chunks", "청크"),
    "doc_col_size": ("Size", "크기"),
    "doc_col_added": ("Added", "추가한 때"),
    "doc_col_id": ("Id", "Id"),
    "doc_team_short": ("team", "팀"),
    "doc_only_me_short": ("only me", "나만"),
    "doc_added_as": ("added as '{title}' ({chunks} chunks)", "'{title}'(으)로 추가 (청크 {chunks}개)"),
    "mem_col_id": ("Id", "Id"),
    "mem_col_text": ("What I remember", "기억하는 내용"),
    "mem_col_kind": ("Kind", "종류"),
    "mem_col_from": ("From", "출처"),
    "mem_col_updated": ("Updated", "바뀐 때"),
    # ---- text the server puts together in the page's language (tr(key, lang, **values))
    # the chat: an answer's bubble, its notes and "how this was answered"
    "selected_answer": ("Selected answer: “{text}”", "선택한 답변: “{text}”"),
    "bubble_stopped": ("Stopped before the end", "끝나기 전에 중지됨"),
    "bubble_corrected": ("Corrected by you (see the details for your version)",
                         "직접 고친 답변 (고친 내용은 답변 과정에 있습니다)"),
    "your_correction": ("Your correction (kept as the preferred answer):", "내가 고친 답변 (더 나은 답변으로 보관됨):"),
    "details_title": ("How this was answered", "답변 과정"),
    "memory_updated": ("Memory updated: {what}", "기억이 바뀌었습니다: {what}"),
    "memory_remembered": ("remembered “{text}”", "“{text}” 기억함"),
    "memory_forgot": ("forgot “{text}”", "“{text}” 잊음"),
    "d_adapter": ("Adapter: {adapter}", "어댑터: {adapter}"),
    "d_adapter_on": ("Adapter: {adapter} on {base}", "어댑터: {adapter} (기본 모델 {base})"),
    "d_no_adapter": ("none (base model)", "없음 (기본 모델)"),
    "d_generation": ("Generation: {params}", "생성 설정: {params}"),
    "d_defaults": ("defaults", "기본값"),
    "d_temperature": ("temperature", "온도"),
    "d_top_p": ("top-p", "top-p"),
    "d_max_new_tokens": ("max new tokens", "최대 새 토큰"),
    "d_seed": ("seed", "시드"),
    "d_message_id": ("Message id: {id}", "메시지 id: {id}"),
    "d_stopped": ("Stopped before the end.", "끝나기 전에 중지되었습니다."),
    "d_corrected": ("You corrected this answer; the original is kept as the rejected example.",
                    "이 답변을 고쳤습니다. 원래 답변은 거절된 예시로 보관됩니다."),
    "d_preferred": ("You preferred this answer over answer {other}.", "답변 {other}보다 이 답변을 골랐습니다."),
    "d_sources": ("Sources:", "출처:"),
    "d_memories": ("Memories used:", "사용한 기억:"),
    "d_steps": ("Steps:", "단계:"),
    "d_shared_document": ("shared document", "공유 문서"),
    "d_source_n": ("source {n}", "출처 {n}"),
    "step_search_documents": ("Searched the documents for", "문서 검색"),
    "step_recall": ("Looked in your memories for", "기억 검색"),
    "step_remember": ("Remembered", "기억함"),
    "step_forget": ("Forgot", "잊음"),
    "step_calculator": ("Calculated", "계산"),
    "step_current_datetime": ("Checked the date and time", "날짜와 시간 확인"),
    "step_used": ("Used {tool}", "{tool} 사용"),
    "step_failed": ("{step}, which failed: {error}", "{step} (실패: {error})"),
    "cmp_original": ("the answer before", "원래 답변"),
    "cmp_new": ("the new answer", "새 답변"),
    "reason_none": ("(none)", "(없음)"),
    "reason_wrong": ("wrong", "틀림"),
    "reason_unhelpful": ("unhelpful", "도움이 안 됨"),
    "reason_off-topic": ("off-topic", "주제에서 벗어남"),
    "reason_unsafe": ("unsafe", "안전하지 않음"),
    "reason_style": ("style", "말투나 형식"),
    "reason_other": ("other", "기타"),
    "rate_first": ("Rate the answer with a thumb first.", "먼저 엄지로 답변을 평가해 주세요."),
    "nothing_to_choose": ("There is nothing to choose between yet.", "아직 고를 답변이 없습니다."),
    "admin_missing": ("The admin console is not installed in this build.", "이 빌드에는 관리 콘솔이 없습니다."),
    # the admin console: counts, readiness, jobs and their progress, adapters, schedule
    "c_what": ("what", "항목"),
    "c_how_many": ("how many", "개수"),
    "c_users": ("users", "사용자"),
    "c_conversations": ("conversations", "대화"),
    "c_messages": ("messages", "메시지"),
    "c_thumbs": ("thumbs up / down", "좋아요 / 싫어요"),
    "c_edits": ("edits", "고친 답변"),
    "c_pairs": ("regenerate-and-choose pairs", "다시 생성해서 고른 쌍"),
    "c_teacher_pairs": ("teacher pairs", "교사 모델 쌍"),
    "c_new_feedback": ("new feedback since the last job", "마지막 작업 이후 새 피드백"),
    "c_datasets": ("dataset snapshots", "데이터셋 스냅샷"),
    "c_adapters": ("adapter versions", "어댑터 버전"),
    "c_serving": ("serving", "서비스 중"),
    "c_running_job": ("running job", "실행 중인 작업"),
    "c_base_model": ("base model", "기본 모델"),
    "c_none": ("none", "없음"),
    "r_ready": ("Ready to retrain: {have}.", "재학습할 수 있습니다: {have}."),
    "r_not_ready": ("Not ready to retrain: {have}; needs at least {train} training and {heldout} held-out "
                    "examples.",
                    "아직 재학습할 수 없습니다: {have}. 학습 예시 {train}개와 평가용 예시 {heldout}개 이상이 "
                    "필요합니다."),
    "r_have": ("{rated} rated answers, {edits} corrections, {pairs} choices, {teacher} teacher pairs in "
               "{conversations} conversations: {train} training examples and {heldout} held-out examples",
               "대화 {conversations}개에서 평가한 답변 {rated}개, 고친 답변 {edits}개, 고른 답변 {pairs}개, "
               "교사 모델 쌍 {teacher}개: 학습 예시 {train}개, 평가용 예시 {heldout}개"),
    "r_need_train": ("Training needs at least {need} examples; there are {have}. Rate answers (thumbs up), correct "
                     "bad ones, or pick the better of two regenerated answers; or generate question-answer pairs "
                     "from shared documents.",
                     "학습에는 예시가 {need}개 이상 필요한데 지금은 {have}개입니다. 답변을 평가하거나(좋아요), 나쁜 "
                     "답변을 고치거나, 다시 생성한 두 답변 중 나은 쪽을 고르세요. 공유 문서에서 질문-답변 쌍을 만들 "
                     "수도 있습니다."),
    "r_need_heldout": ("Judging a new model needs at least {need} examples it never trained on; there are {have} "
                       "{where}. {hint}",
                       "새 모델을 평가하려면 학습에 쓰지 않은 예시가 {need}개 이상 필요한데 {where} {have}개입니다. "
                       "{hint}"),
    "r_where_frozen": ("in the frozen held-out set", "고정된 평가용 세트에"),
    "r_where_aside": ("set aside to test the new model on", "새 모델 평가용으로 떼어 둔 예시가"),
    "r_hint_few": ("Keep collecting feedback: held-out examples come from whole conversations, about one in ten, "
                   "and at least one once {groups} conversations have feedback.",
                   "피드백을 계속 모아 주세요. 평가용 예시는 대화 단위로 열에 하나쯤 떼어 두며, 피드백이 있는 대화가 "
                   "{groups}개가 되면 적어도 하나를 떼어 둡니다."),
    "r_hint_more": ("Give feedback in a few more conversations.", "몇 개 대화에 피드백을 더 남겨 주세요."),
    "r_split_rules": ("How examples are used: whole conversations go to training (8 in 10), to validation (1 in 10, "
                      "to stop training before it overfits) or to testing (1 in 10, never trained on). With only a "
                      "few conversations, one in ten, and at least one once three have feedback, is kept for "
                      "testing. When 20 test examples exist they are frozen as the held-out set that every later "
                      "model is judged on.",
                      "예시를 쓰는 방법: 대화 단위로 학습(10개 중 8개), 검증(10개 중 1개, 과적합 전에 학습을 멈추는 "
                      "데 씀), 평가(10개 중 1개, 학습에 쓰지 않음)로 나눕니다. 대화가 적을 때도 열에 하나는, 그리고 "
                      "피드백이 있는 대화가 셋이 되면 적어도 하나는 평가용으로 둡니다. 평가 예시가 20개가 되면 "
                      "고정된 평가용 세트가 되어 이후 모든 모델을 이것으로 평가합니다."),
    "not_started": ("**Not started.** {why}", "**시작하지 않았습니다.** {why}"),
    "no_dataset": ("No dataset yet: build one.", "아직 데이터셋이 없습니다. 하나 만드세요."),
    "preview_note": ("{name} {kind}/{split}: showing {shown} of {total} rows",
                     "{name} {kind}/{split}: 전체 {total}행 중 {shown}행"),
    "o_promoted": ("finished: the new model passed the evaluation and now serves",
                   "끝남: 새 모델이 평가를 통과해 지금 서비스 중입니다"),
    "o_registered": ("finished: the new model passed the evaluation; promote it below to serve it",
                     "끝남: 새 모델이 평가를 통과했습니다. 아래에서 적용하면 서비스됩니다"),
    "o_rejected": ("finished: the new model did worse in the evaluation and was not used; nothing changed",
                   "끝남: 새 모델이 평가에서 더 나빠 쓰지 않았습니다. 바뀐 것은 없습니다"),
    "o_finished": ("finished: {decision}", "끝남: {decision}"),
    "o_no_decision": ("no decision", "결정 없음"),
    "o_cancelling": ("cancelling…", "취소하는 중…"),
    "o_waiting": ("waiting to start", "시작을 기다리는 중"),
    "o_running": ("running", "실행 중"),
    "o_cancelled": ("cancelled; nothing changed", "취소됨. 바뀐 것은 없습니다"),
    "o_failed": ("failed; nothing changed", "실패함. 바뀐 것은 없습니다"),
    "jc_id": ("id", "id"),
    "jc_outcome": ("outcome", "결과"),
    "jc_trigger": ("trigger", "시작 이유"),
    "jc_by": ("by", "요청한 사람"),
    "jc_phase": ("phase", "단계"),
    "jc_progress": ("progress %", "진행 %"),
    "jc_candidate": ("candidate", "새 모델"),
    "jc_why": ("why", "이유"),
    "jc_created": ("created", "만든 때"),
    "ac_name": ("name", "이름"),
    "ac_serving": ("serving", "서비스 중"),
    "ac_gate": ("gate", "평가"),
    "ac_parent": ("parent", "이전 버전"),
    "ac_dataset": ("dataset", "데이터셋"),
    "ac_val_loss": ("val_loss", "검증 손실"),
    "ac_pref_acc": ("pref_acc", "선호 정확도"),
    "ac_grounded": ("grounded", "근거성"),
    "ac_general_ppl": ("general_ppl", "일반 ppl"),
    "ac_general_qa": ("general_qa", "일반 QA"),
    "ac_created": ("created", "만든 때"),
    "ac_note": ("note", "메모"),
    "ph_starting": ("starting", "시작하는 중"),
    "ph_synth": ("asking the teacher for document pairs", "교사 모델에게 문서 질문-답변 쌍을 받는 중"),
    "ph_dataset": ("building the dataset", "데이터셋을 만드는 중"),
    "ph_train": ("training", "학습하는 중"),
    "ph_evaluate": ("evaluating the new model", "새 모델을 평가하는 중"),
    "ph_register": ("recording the result", "결과를 기록하는 중"),
    "ph_done": ("done", "끝남"),
    "p_phase": ("Phase {n} of {total}: {words}", "{total}단계 중 {n}단계: {words}"),
    "p_train": (" ({stage}, step {step} of {total})", " ({stage}, {total}스텝 중 {step})"),
    "p_dataset": (" (the base model answers general questions: {done} of {total})",
                  " (기본 모델이 일반 질문에 답하는 중: {total}개 중 {done})"),
    "p_synth": (" (chunk {done} of {total})", " ({total}개 청크 중 {done})"),
    "p_evaluate": (" ({model}: {check})", " ({model}: {check})"),
    "p_eta": ("; about {eta} left for the whole job", "; 전체 작업이 끝나기까지 약 {eta}"),
    "p_seconds": ("{n} s", "{n}초"),
    "p_minutes": ("{n} min", "{n}분"),
    "p_hours": ("{n} h", "{n}시간"),
    "j_no_job": ("no job yet", "아직 작업이 없습니다"),
    "j_running": ("job #{id} running: {progress}", "작업 #{id} 실행 중: {progress}"),
    "j_label": ("job #{id} {outcome}", "작업 #{id} {outcome}"),
    "j_schedule": ("the schedule", "일정"),
    "j_head": ("**Job #{id}**: {outcome} (started by {by})", "**작업 #{id}**: {outcome} (시작: {by})"),
    "j_loss": ("loss {loss}", "손실 {loss}"),
    "j_val_loss": ("loss {loss}, validation loss {val}", "손실 {loss}, 검증 손실 {val}"),
    "j_why": ("Why: {why}", "이유: {why}"),
    "j_result": ("New model {candidate}: {reason}", "새 모델 {candidate}: {reason}"),
    "a_summary": ("Serving **{serving}**; roll back goes to **{back}**.",
                  "서비스 중: **{serving}**. 되돌리면 **{back}**(으)로 돌아갑니다."),
    "a_base": ("the base model", "기본 모델"),
    "a_nothing": ("nothing", "없음"),
    "a_last_change": (" Last change: {action} to {version} by {actor} ({when}).",
                      " 마지막 변경: {actor}님이 {version}(으)로 {action} ({when})."),
    "a_swapped": ("Now serving **{serving}** (was {previous}), switched in {seconds} s.",
                  "이제 **{serving}**을(를) 서비스합니다 (이전: {previous}). 바꾸는 데 {seconds}초 걸렸습니다."),
    "a_pick_version": ("Pick a version.", "버전을 고르세요."),
    "a_no_report": ("{name} has no evaluation report.", "{name}에는 평가 보고서가 없습니다."),
    "s_state": ("Now: **{due}** — {reason}.", "지금: **{due}** — {reason}."),
    "s_due": ("due", "재학습할 때"),
    "s_not_due": ("not due", "아직 아님"),
    "s_not_running": (" (The scheduler thread is not running in this process.)",
                      " (이 프로세스에서는 일정 스레드가 돌고 있지 않습니다.)"),
    "s_saved": ("Saved: {state}, mode {mode}.", "저장했습니다: {state}, 방식 {mode}."),
    "s_on": ("on", "켜짐"),
    "s_off": ("off", "꺼짐"),
    "synth_done": ("{pairs} pairs from {chunks} chunks, {accepted} accepted ({dpo} with a rejected answer), "
                   "{seconds} s.", "청크 {chunks}개에서 쌍 {pairs}개, 그중 {accepted}개 채택 (거절 답변이 있는 것 "
                   "{dpo}개), {seconds}초."),
    "admin_loss_title": ("Training loss", "학습 손실"),
    # People and personal adapters
    "pc_name": ("name", "이름"),
    "pc_role": ("role", "역할"),
    "pc_state": ("state", "상태"),
    "pc_created": ("created", "만든 날"),
    "p_disabled": ("disabled", "사용 중지"),
    "p_active": ("active", "사용 중"),
    "p_added": ("**{name}** can now log in as {role}. Their API key, shown only now: `{key}`",
                "이제 **{name}**님이 {role}(으)로 로그인할 수 있습니다. API 키 (지금만 보입니다): `{key}`"),
    "role_admin": ("admin", "관리자"),
    "role_user": ("user", "사용자"),
    "role_an_admin": ("an admin", "관리자"),
    "role_a_user": ("a user", "사용자"),
    "tab_personal": ("My assistant", "나의 어시스턴트"),
    "my_intro": ("Your own adapter learns from your ratings, corrections and choices, and only you are served it. "
                 "Your private documents may go into it; never into anyone else's.",
                 "나만의 어댑터는 내 평가, 고친 답변, 선택에서 배우며 나에게만 서비스됩니다. 내 비공개 문서가 "
                 "들어갈 수 있지만, 다른 사람의 어댑터에는 절대 들어가지 않습니다."),
    "my_opt": ("Train and serve me my own adapter", "나만의 어댑터를 학습해서 나에게 서비스하기"),
    "my_report": ("Evaluation report", "평가 보고서"),
    "my_sure": ("I understand this cannot be undone", "되돌릴 수 없다는 것을 이해했습니다"),
    "my_forget": ("Forget what you learned from me", "나에게서 배운 것을 잊기"),
    "my_off": ("Personal adapters are off on this server; an admin can turn them on.",
               "이 서버에서는 개인 어댑터가 꺼져 있습니다. 관리자가 켤 수 있습니다."),
    "my_not_opted": ("You have not asked for a personal adapter. Everyone shares one adapter.",
                     "개인 어댑터를 신청하지 않았습니다. 모두가 하나의 어댑터를 함께 씁니다."),
    "my_training": ("Your personal adapter is training now.", "지금 개인 어댑터를 학습하고 있습니다."),
    "my_serving": ("Your answers come from your personal adapter.", "내 답변은 개인 어댑터가 만듭니다."),
    "my_not_served": ("Your newest personal adapter did not answer you better than the shared one, so you are "
                      "served the shared one. The report below says why.",
                      "가장 새 개인 어댑터가 공유 어댑터보다 낫지 않아 공유 어댑터로 답합니다. 아래 보고서에 이유가 "
                      "있습니다."),
    "my_waiting_feedback": ("Rate, correct or choose answers: your personal adapter learns from that.",
                            "답변을 평가하거나 고치거나 고르세요. 개인 어댑터는 그것에서 배웁니다."),
    "my_waiting_turn": ("You have given enough feedback; your personal retrain waits for its turn.",
                        "피드백이 충분합니다. 개인 재학습이 차례를 기다리고 있습니다."),
    "my_serving_you": ("Serving you: `{serving}` (trained from the shared `{shared}`).",
                       "나에게 서비스 중: `{serving}` (공유 어댑터 `{shared}`에서 학습)."),
    "my_newest": ("Newest: `{name}`, gate {gate}: {reason}", "가장 새 버전: `{name}`, 평가 {gate}: {reason}"),
    "my_feedback": ("Feedback it can learn from: {feedback} (a first retrain needs {needs}); disk {used} of {limit}.",
                    "배울 수 있는 피드백: {feedback}개 (첫 재학습에 {needs}개 필요). 디스크 {limit} 중 {used} 사용."),
    "my_no_report": ("No evaluation report yet.", "아직 평가 보고서가 없습니다."),
    "my_report_head": ("**`{version}`**: gate {gate}, {reason}", "**`{version}`**: 평가 {gate}, {reason}"),
    "my_opted_in": ("You now have a personal adapter: it trains once you have given enough feedback.",
                    "이제 개인 어댑터가 있습니다. 피드백이 충분히 모이면 학습합니다."),
    "my_opted_out": ("You are served the shared adapter again. Your personal adapter stays until you ask to "
                     "forget it.", "다시 공유 어댑터로 답합니다. 개인 어댑터는 잊어 달라고 할 때까지 남아 있습니다."),
    "my_tick_first": ("Tick the box first: this cannot be undone.", "먼저 확인란을 선택하세요. 되돌릴 수 없습니다."),
    "my_forgotten": ("Forgotten: {versions} personal versions and their datasets deleted; your feedback so far will "
                     "not be used to train any adapter again.",
                     "잊었습니다: 개인 버전 {versions}개와 그 데이터셋을 지웠습니다. 지금까지의 피드백은 어떤 어댑터 "
                     "학습에도 다시 쓰이지 않습니다."),
    "pa_heading": ("### Personal adapters", "### 개인 어댑터"),
    "pa_show": ("Show personal adapters", "개인 어댑터 보기"),
    "pa_name": ("name", "이름"),
    "pa_opted": ("opted in", "신청"),
    "pa_serving": ("serving", "서비스 중"),
    "pa_versions": ("versions", "버전 수"),
    "pa_newest": ("newest", "가장 새 버전"),
    "pa_gate": ("gate", "평가"),
    "pa_disk": ("disk", "디스크"),
    "yes": ("yes", "예"),
    "no": ("no", "아니요"),
}

I18N = gr.I18n(en={k: v[0] for k, v in STRINGS.items()}, ko={k: v[1] for k, v in STRINGS.items()})


LANG_COOKIE = "assistant-lang"  # set by the header's switch (ui/app.py LANGUAGE_TOGGLE_JS)
LANGUAGES = ("en", "ko")
_LANG: ContextVar[str] = ContextVar("page_language", default="en")


def page_language(request: Any) -> str:
    """"ko" or "en": the language the page shows to this request's browser (the switch's cookie, else
    the browser's first Accept-Language)."""
    cookies = getattr(request, "cookies", None)
    chosen = cookies.get(LANG_COOKIE) if cookies is not None and hasattr(cookies, "get") else None
    if chosen in LANGUAGES:
        return chosen
    headers = getattr(request, "headers", None)
    accept = (headers.get("accept-language") if headers is not None and hasattr(headers, "get") else "") or ""
    return "ko" if accept.split(",")[0].strip().lower().startswith("ko") else "en"


def current_language() -> str:
    return _LANG.get()


@contextmanager
def speaking(lang: str) -> Iterator[None]:
    """Within the block, `tr` without a language uses `lang` (one event handler's call, one thread)."""
    token = _LANG.set(lang if lang in LANGUAGES else "en")
    try:
        yield
    finally:
        _LANG.reset(token)


def tr(key: str, lang: str | None = None, /, **values: Any) -> str:
    """The text `key` in `lang` (default: the current page's), its `{name}` places filled from `values`."""
    if key not in STRINGS:
        raise KeyError(f"no text {key!r} in ui.i18n.STRINGS")
    en, ko = STRINGS[key]
    text = ko if (lang or _LANG.get()) == "ko" else en
    return text.format(**values) if values else text


def T(key: str):  # noqa: N802, ANN201 - short on purpose: it wraps every label of the page
    """The label `key` in the browser's language."""
    if key not in STRINGS:
        raise KeyError(f"no label {key!r} in ui.i18n.STRINGS")
    return I18N(key)

