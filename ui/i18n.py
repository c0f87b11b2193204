"""The page's labels in English and Korean; the browser's language picks one (Gradio's `gr.I18n`).

`T(key)` goes where a component takes a label, a placeholder or a button text; `I18N` is passed to
`gr.mount_gradio_app`, and the browser shows the language it asks for (Korean for `ko`, English
otherwise). Text the server writes at run time (notices, tables, the admin console's reports) is
English for now.
"""

from __future__ import annotations

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
    "stop": ("Stop", "중지"),
    "reason": ("Reason (optional)", "이유 (선택)"),
    "comment": ("Comment (optional)", "의견 (선택)"),
    "good_answer": ("Good answer", "좋은 답변"),
    "bad_answer": ("Bad answer", "나쁜 답변"),
    "edit_answer": ("Edit this answer into the right one", "이 답변을 올바르게 고치기"),
    "corrected_answer": ("Corrected answer", "고친 답변"),
    "save_correction": ("Save correction", "수정 저장"),
    "regenerate": ("Regenerate and compare", "다시 생성해서 비교하기"),
    "a_better": ("A is better", "A가 더 좋음"),
    "b_better": ("B is better", "B가 더 좋음"),
}

I18N = gr.I18n(en={k: v[0] for k, v in STRINGS.items()}, ko={k: v[1] for k, v in STRINGS.items()})


def T(key: str):  # noqa: N802, ANN201 - short on purpose: it wraps every label of the page
    """The label `key` in the browser's language."""
    if key not in STRINGS:
        raise KeyError(f"no label {key!r} in ui.i18n.STRINGS")
    return I18N(key)
