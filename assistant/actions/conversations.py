"""A user's conversations exported whole: every message with what produced it and its feedback.

In: the store, the acting `User`, and one conversation id or none (all of them). Out: a JSON-ready
dict (`export`) and its Markdown rendering (`to_markdown`). Only the user's own conversations are
exported; another user's reads as not found, for admins too.
"""

from __future__ import annotations

from typing import Any

from assistant.actions.base import NotFound, require_user
from memory.store import Store
from memory.types import Conversation, Feedback, Message, User

FORMATS = ("json", "markdown")


def _feedback(f: Feedback) -> dict[str, Any]:
    out: dict[str, Any] = {"id": f.id, "kind": f.kind, "created_at": f.created_at.isoformat()}
    if f.kind == "thumb":
        out.update(rating=f.rating, reason=f.reason, comment=f.comment)
    elif f.kind == "edit":
        out.update(corrected=f.corrected)
    else:
        out.update(message_id=f.message_id, other_message_id=f.other_message_id,
                   chosen_message_id=f.chosen_message_id)
    return out


def _message(store: Store, m: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"id": m.id, "role": m.role, "content": m.content, "status": m.status,
                           "created_at": m.created_at.isoformat()}
    if m.role == "assistant":
        out.update(adapter=m.adapter, generation=m.generation, sources=m.sources, parent_id=m.parent_id,
                   feedback=[_feedback(f) for f in store.feedback_for_message(m.id)])
    return out


def _conversation(store: Store, c: Conversation) -> dict[str, Any]:
    return {"id": c.id, "title": c.title, "source": c.source, "created_at": c.created_at.isoformat(),
            "updated_at": c.updated_at.isoformat(),
            "messages": [_message(store, m) for m in store.messages(c.id, c.user_id)]}


def export(store: Store, user: User | None, conversation_id: int | None = None) -> dict[str, Any]:
    """One conversation of the user's, or all of them (newest first), with messages and feedback."""
    user = require_user(user)
    if conversation_id is None:
        convs = store.list_conversations(user.id)
    else:
        conv = store.get_conversation(conversation_id, user.id)
        if conv is None:
            raise NotFound(f"conversation {conversation_id} not found")
        convs = [conv]
    return {"user": user.username, "conversations": [_conversation(store, c) for c in convs]}


def _feedback_line(f: dict[str, Any]) -> str:
    if f["kind"] == "thumb":
        thumb = "👍" if f["rating"] == 1 else "👎"
        extra = "".join(f" ({x})" for x in (f.get("reason"), f.get("comment")) if x)
        return f"> feedback: {thumb}{extra}"
    if f["kind"] == "edit":
        return "> feedback: edited to:\n>\n" + "\n".join(f"> {line}" for line in f["corrected"].splitlines())
    return (f"> feedback: of answers {f['message_id']} and {f['other_message_id']}, "
            f"chose {f['chosen_message_id']}")


def to_markdown(data: dict[str, Any]) -> str:
    """The export as a readable Markdown document (one section per conversation)."""
    lines = [f"# Conversations of {data['user']}", ""]
    for c in data["conversations"]:
        lines += [f"## {c['title']}", "", f"Conversation {c['id']}, started {c['created_at']} ({c['source']}).", ""]
        for m in c["messages"]:
            who = {"user": "You", "assistant": "Assistant"}.get(m["role"], m["role"])
            status = "" if m["status"] == "complete" else f" ({m['status']})"
            lines += [f"**{who}**{status} · message {m['id']}", "", m["content"] or "*(empty)*", ""]
            for f in m.get("feedback") or []:
                lines += [_feedback_line(f), ""]
    return "\n".join(lines).rstrip() + "\n"
