"""Small records passed between the store and everything above it."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

Role = Literal["user", "admin"]
MessageRole = Literal["system", "user", "assistant", "tool"]
FeedbackKind = Literal["thumb", "edit", "pair"]
REASON_TAGS = ("wrong", "unhelpful", "off-topic", "unsafe", "style", "other")


@dataclass(frozen=True)
class User:
    id: int
    username: str
    role: Role
    created_at: datetime
    disabled: bool = False  # an admin disabled the account: no login, no API key

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class Conversation:
    id: int
    user_id: int
    title: str
    created_at: datetime
    updated_at: datetime
    source: str = "ui"  # "ui", "api", "cli"


@dataclass(frozen=True)
class Message:
    id: int
    conversation_id: int
    role: MessageRole
    content: str
    created_at: datetime
    # assistant messages only: what produced them
    adapter: str | None = None  # adapter version name, None = base model
    generation: dict[str, Any] = field(default_factory=dict)  # temperature, top_p, max_tokens, seed, model
    sources: list[dict[str, Any]] = field(default_factory=list)  # retrieved chunks cited
    memories: list[dict[str, Any]] = field(default_factory=list)  # long-term memories used
    steps: list[dict[str, Any]] = field(default_factory=list)  # agent steps: tool, args, result, ms
    parent_id: int | None = None  # the user message this answers
    status: str = "complete"  # "complete", "stopped", "error", "alternative" (an unchosen regeneration)
    imported: bool = False  # written by the client as request history, not generated here: never rated or trained on


@dataclass(frozen=True)
class Feedback:
    id: int
    user_id: int
    message_id: int
    kind: FeedbackKind
    created_at: datetime
    rating: int | None = None  # +1 / -1 for thumbs
    reason: str | None = None
    comment: str | None = None
    # edits: corrected text (chosen); the rated message is the rejected one.
    # pairs: the other message id and which one won.
    corrected: str | None = None
    other_message_id: int | None = None
    chosen_message_id: int | None = None
