"""What the browser page does, as plain functions the tests call directly.

In: the `Services` of the running server, the logged-in `User` (the wiring resolves it from the
login session on the server; nothing the page sends can choose it) and the page's input values.
Out: small dataclasses (`ChatView`, `Comparison`) that `ui.app` turns into component updates, or a
`UiError` whose message the page shows. Every action goes through the store's ownership checks, so a
user can neither read nor rate nor edit another user's conversation: to them it does not exist.

Chat turns go through `ChatService` exactly like API turns (validation, logging, adapters). A message
the service refuses (too long, unknown model) raises before anything is generated or stored; an empty
message is not sent at all.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from assistant.chat import ChatError, Reply, TurnRequest
from assistant.runtime import GenerationError
from memory.store import MAX_CORRECTED_CHARS
from memory.types import REASON_TAGS, Feedback, Message, User
from ui.i18n import T, current_language, tr
from ui.render import citations_markdown, details_markdown, details_title, excerpt, memory_note, safe_markdown

if TYPE_CHECKING:
    from assistant.services import Services

MAX_COMMENT = 4000
HIDDEN_STATUSES = ("alternative", "error")  # answers the conversation does not continue from


class UiError(Exception):
    """Something the page tells the user; nothing was changed."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class EmptyMessage(UiError):
    """The input was empty: nothing is sent and nothing needs saying."""


class NotLoggedIn(UiError):
    pass


def _not_found(what: str) -> UiError:
    # Another user's item reads exactly like a missing one, so ids can't be probed.
    return UiError(f"{what} not found")


# ------------------------------------------------------------------------------------------ users
def resolve_user(services: Services, username: str | None) -> User:
    """The `User` behind a login session's username; NotLoggedIn if there is none (or it was deleted)."""
    user = services.store.get_user_by_name(username) if username else None
    if user is None:
        raise NotLoggedIn("please log in again")
    return user


def require_admin(services: Services, username: str | None) -> User:
    """For admin pages: every admin action must call this, because hidden tabs are still callable."""
    user = resolve_user(services, username)
    if not user.is_admin:
        raise UiError("this needs an admin account")
    return user


def whoami(user: User) -> str:
    """The header's line, e.g. "Signed in as admin: **root**" (the words in the browser's language)."""
    return T("signed_in_admin" if user.is_admin else "signed_in_user") + f" **{safe_markdown(user.username)}**"


# ------------------------------------------------------------------------------------------ views
@dataclass
class ChatView:
    """What the chat area shows: Chatbot rows, and which stored answer each row belongs to."""

    conversation_id: int | None
    rows: list[dict[str, Any]] = field(default_factory=list)
    row_ids: list[int | None] = field(default_factory=list)  # answer id per row (None: user rows)
    answers: dict[int, str] = field(default_factory=dict)  # answer id -> its raw text (for editing)
    thumbs: list[str | None] = field(default_factory=list)  # per answer: "Like", "Dislike" or None
    lang: str = "en"  # the page's language ("en" or "ko") for the notes and details on the bubbles

    @property
    def last_answer_id(self) -> int | None:
        ids = [i for i in self.row_ids if i is not None]
        return ids[-1] if ids else None

    def add_user(self, text: str) -> None:
        self.rows.append({"role": "user", "content": safe_markdown(text)})
        self.row_ids.append(None)

    def add_answer(self, message_id: int | None, text: str, details: str | None = None,
                   notes: list[str] | None = None, sources: list[dict[str, Any]] | None = None) -> None:
        """`notes` show on the bubble itself, under the answer ("Stopped", "Corrected", "Memory updated"),
        and so do the cited `sources`, each opening to its passage."""
        shown = safe_markdown(text)
        if sources:
            shown += "\n\n" + citations_markdown(sources, self.lang)
        if notes:
            shown += "\n\n" + " · ".join(f"*{safe_markdown(n)}*" for n in notes)
        self.rows.append({"role": "assistant", "content": shown})
        self.row_ids.append(message_id)
        if message_id is not None:
            self.answers[message_id] = text
        if details is not None:
            # A metadata row renders as a collapsed box right under the answer (same bubble group).
            self.rows.append({"role": "assistant", "content": details,
                              "metadata": {"title": details_title(self.lang), "status": "done"}})
            self.row_ids.append(message_id)


def conversation_choices(services: Services, user: User) -> list[tuple[str, int]]:
    """(label, id) for the sidebar, most recent first."""
    out = []
    for c in services.store.list_conversations(user.id):
        when = c.updated_at.strftime("%Y-%m-%d %H:%M")
        out.append((f"{excerpt(c.title, 48)}  ·  {when}", c.id))
    return out


def _own_feedback(services: Services, user: User, answer: Message) -> list[Feedback]:
    return [f for f in services.store.feedback_for_message(answer.id)
            if f.user_id == user.id and f.message_id == answer.id]


def conversation_view(services: Services, user: User, conversation_id: int | None,
                      lang: str | None = None) -> ChatView:
    """The stored conversation as the page shows it (the answers it continues from), its notes and
    details in `lang` (default: the current page's language)."""
    lang = lang or current_language()
    view = ChatView(conversation_id=conversation_id, lang=lang)
    if conversation_id is None:
        return view
    try:
        messages = services.store.messages(int(conversation_id), user.id)
    except (PermissionError, LookupError, ValueError, TypeError) as e:
        raise _not_found("conversation") from e
    for m in messages:
        if m.role == "user":
            view.add_user(m.content)
        elif m.role == "assistant" and m.status not in HIDDEN_STATUSES:
            own = _own_feedback(services, user, m)
            edits = [f for f in own if f.kind == "edit"]
            thumbs = [f for f in own if f.kind == "thumb"]
            details = details_markdown(m, lang=lang)
            if edits:
                details += "\n\n" + tr("your_correction", lang) + "\n\n" + safe_markdown(edits[-1].corrected or "")
            notes = [n for n in (
                tr("bubble_stopped", lang) if m.status == "stopped" else None,
                tr("bubble_corrected", lang) if edits else None,
                memory_note(m, lang)) if n]
            view.add_answer(m.id, m.content, details, notes, m.sources)
            # The Chatbot shows this per answer bubble, so a reload keeps the thumbs as they were.
            view.thumbs.append(None if not thumbs else "Like" if thumbs[-1].rating == 1 else "Dislike")
    return view


def search_conversations(services: Services, user: User, query: str | None) -> list[tuple[str, int]]:
    """The sidebar's choices whose title or any message contains every word of `query` (any case);
    all of them for an empty query. Only this user's conversations are looked at."""
    words = (query or "").casefold().split()
    choices = conversation_choices(services, user)
    if not words:
        return choices
    kept = []
    for label, cid in choices:
        title = label.casefold()
        if all(w in title for w in words):
            kept.append((label, cid))
            continue
        text = " ".join(m.content for m in services.store.messages(cid, user.id)
                        if m.status not in HIDDEN_STATUSES).casefold()
        if all(w in text or w in title for w in words):
            kept.append((label, cid))
    return kept


def _export_rows(services: Services, user: User, conversation_id: int | None) -> tuple[Any, list[Message]]:
    if conversation_id is None:
        raise UiError("choose a conversation first")
    conv = services.store.get_conversation(int(conversation_id), user.id)
    if conv is None:
        raise _not_found("conversation")
    msgs = [m for m in services.store.messages(conv.id, user.id)
            if m.role in ("user", "assistant") and m.status not in HIDDEN_STATUSES]
    return conv, msgs


def export_markdown(services: Services, user: User, conversation_id: int | None) -> str:
    """The conversation as Markdown: a heading, then each message under its speaker, in reading order."""
    conv, msgs = _export_rows(services, user, conversation_id)
    out = [f"# {conv.title}", "", f"Exported {conv.updated_at:%Y-%m-%d %H:%M} UTC", ""]
    for m in msgs:
        who = "You" if m.role == "user" else "Assistant" + (f" ({m.adapter})" if m.adapter else "")
        out += [f"## {who}", "", m.content, ""]
        if m.role == "assistant" and m.sources:
            out += ["Sources: " + "; ".join(f"[{i}] {s.get('title') or s.get('doc_id') or 'document'}"
                                          for i, s in enumerate(m.sources, 1) if isinstance(s, dict)), ""]
    return "\n".join(out)


def export_json(services: Services, user: User, conversation_id: int | None) -> dict[str, Any]:
    """The conversation as plain data: title, times, and each message with what produced it."""
    conv, msgs = _export_rows(services, user, conversation_id)
    return {"id": conv.id, "title": conv.title, "created_at": conv.created_at.isoformat(),
            "updated_at": conv.updated_at.isoformat(),
            "messages": [{"id": m.id, "role": m.role, "content": m.content, "created_at": m.created_at.isoformat(),
                          **({"adapter": m.adapter, "status": m.status, "sources": m.sources, "steps": m.steps}
                             if m.role == "assistant" else {})} for m in msgs]}


def rename_conversation(services: Services, user: User, conversation_id: int | None, title: str) -> str:
    if conversation_id is None:
        raise UiError("choose a conversation first")
    title = " ".join((title or "").split())
    if not title:
        raise UiError("the new title is empty")
    if len(title) > 200:
        raise UiError(f"the title is {len(title)} characters; the limit is 200")
    try:
        renamed = services.store.rename_conversation(int(conversation_id), user.id, title)
    except ValueError as e:  # the store's text rule (memory.text): NUL, a lone surrogate, nothing visible
        raise UiError(str(e)) from e
    if not renamed:
        raise _not_found("conversation")
    return title


def delete_conversation(services: Services, user: User, conversation_id: int | None) -> None:
    if conversation_id is None:
        raise UiError("choose a conversation first")
    if not services.store.delete_conversation(int(conversation_id), user.id):
        raise _not_found("conversation")


def model_choices(services: Services) -> list[str]:
    return services.chat.model_names()


# ------------------------------------------------------------------------------------------ turns
class ActiveReplies:
    """The answer each browser session is streaming, so its Stop button can stop exactly that one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._replies: dict[tuple[int, str], Reply] = {}

    def start(self, user: User, session: str, reply: Reply) -> None:
        with self._lock:
            old = self._replies.get((user.id, session))
            self._replies[(user.id, session)] = reply
        if old is not None:  # one stream per page: a new one supersedes a forgotten one
            old.stop()

    def finish(self, user: User, session: str, reply: Reply) -> None:
        with self._lock:
            if self._replies.get((user.id, session)) is reply:
                del self._replies[(user.id, session)]

    def stop(self, user: User, session: str) -> bool:
        """Stop this user's stream in this session; False if nothing was running."""
        with self._lock:
            reply = self._replies.get((user.id, session))
        if reply is None:
            return False
        reply.stop()
        return True


def start_turn(services: Services, user: User, conversation_id: int | None, text: str,
               model: str | None = None) -> Reply:
    """Validate and start one turn. Raises EmptyMessage, or UiError with the service's reason
    (too long, unknown model, conversation not found) before anything is generated or stored."""
    if not isinstance(text, str) or not text.strip():
        raise EmptyMessage("")
    if conversation_id is not None and services.store.get_conversation(int(conversation_id), user.id) is None:
        raise _not_found("conversation")
    try:
        return services.chat.reply(TurnRequest(user=user, text=text, model=model or "assistant",
                                               conversation_id=conversation_id, source="ui"))
    except ChatError as e:
        raise UiError(e.message) from e


# The answer bubble before its first token: three dots that ui/static/typing.css animates.
TYPING = '<span class="typing-dots" title="…"><i></i><i></i><i></i></span>'


def stream_turn(services: Services, user: User, conversation_id: int | None, text: str, reply: Reply,
                active: ActiveReplies | None = None, session: str = "", lang: str | None = None) -> Iterator[ChatView]:
    """Views while the answer streams in; the last one is re-read from the store (with ids)."""
    base = conversation_view(services, user, conversation_id, lang)
    if active is not None:
        active.start(user, session, reply)
    try:
        partial = ""
        # The question shows at once, with the typing dots on the answer bubble until the first token,
        # then the answer so far with a cursor.
        for piece in itertools.chain([""], reply):
            partial += piece
            view = ChatView(base.conversation_id, list(base.rows), list(base.row_ids), dict(base.answers),
                            lang=base.lang)
            view.add_user(text)
            if partial:
                view.add_answer(None, partial + " ▌")
            else:
                view.rows.append({"role": "assistant", "content": TYPING})
                view.row_ids.append(None)
            yield view
    except ChatError as e:
        raise UiError(e.message) from e
    except GenerationError as e:
        raise UiError(f"the model failed while answering: {e}") from e
    finally:
        if active is not None:
            active.finish(user, session, reply)
    conv = reply.conversation.id if reply.conversation is not None else conversation_id
    yield conversation_view(services, user, conv, base.lang)


def send(services: Services, user: User, conversation_id: int | None, text: str,
         model: str | None = None) -> ChatView:
    """One whole turn without streaming (tests, scripts): start, drain, return the stored view."""
    reply = start_turn(services, user, conversation_id, text, model)
    views = list(stream_turn(services, user, conversation_id, text, reply))
    return views[-1]


# ------------------------------------------------------------------------------------------ feedback
def _answer(services: Services, user: User, message_id: int | None) -> Message:
    if message_id is None:
        raise UiError("choose an answer first")
    msg = services.store.get_message(int(message_id), user.id)
    if msg is None or msg.role != "assistant":
        raise _not_found("answer")
    return msg


def _store_call(action):
    try:
        return action()
    except (PermissionError, LookupError) as e:
        raise _not_found("answer") from e
    except ValueError as e:
        raise UiError(str(e)) from e


def rate(services: Services, user: User, message_id: int | None, rating: int, reason: str | None = None,
         comment: str | None = None) -> Feedback:
    """Thumbs up (+1) / down (-1) with an optional reason tag and comment; replaces an earlier thumb."""
    msg = _answer(services, user, message_id)
    if rating not in (1, -1):
        raise UiError("rating must be thumbs up or thumbs down")
    reason = reason or None
    if reason is not None and reason not in REASON_TAGS:
        raise UiError(f"reason must be one of {', '.join(REASON_TAGS)}")
    comment = (comment or "").strip() or None
    if comment is not None and len(comment) > MAX_COMMENT:
        raise UiError(f"the comment is {len(comment)} characters; the limit is {MAX_COMMENT}")
    return _store_call(lambda: services.store.add_thumb(user.id, msg.id, rating, reason, comment))


def clear_rating(services: Services, user: User, message_id: int | None) -> bool:
    """Withdraw this user's thumb on the answer (the page's toggle); False if there was none."""
    msg = _answer(services, user, message_id)
    thumbs = [f for f in services.store.feedback_for_message(msg.id)
              if f.user_id == user.id and f.kind == "thumb" and f.message_id == msg.id]
    deleted = False
    for f in thumbs:  # all of them, not just the first: any() would stop early
        deleted = services.store.delete_feedback(user.id, f.id) or deleted
    return deleted


def current_rating(services: Services, user: User, message_id: int) -> Feedback | None:
    thumbs = [f for f in services.store.feedback_for_message(message_id)
              if f.user_id == user.id and f.kind == "thumb" and f.message_id == message_id]
    return thumbs[-1] if thumbs else None


def edit_answer(services: Services, user: User, message_id: int | None, corrected: str) -> Feedback:
    """Store the user's corrected version of an answer (chosen) against the original (rejected)."""
    msg = _answer(services, user, message_id)
    if not isinstance(corrected, str) or not corrected.strip():
        raise UiError("the corrected answer is empty")
    limit = MAX_CORRECTED_CHARS  # the store's limit, the same one the API uses
    if len(corrected) > limit:
        raise UiError(f"the corrected answer is {len(corrected)} characters; the limit is {limit}")
    return _store_call(lambda: services.store.add_edit(user.id, msg.id, corrected))


@dataclass
class Comparison:
    """Two answers to the same question: the original (1 of 2) and the regenerated one (2 of 2), shown in
    turn in the original's bubble."""

    original_id: int
    original_text: str
    alternative_text: str = ""
    alternative_id: int | None = None  # set once the alternative is complete and stored
    done: bool = False
    showing: int = 2  # which one the bubble shows: 1 the original, 2 the new one

    @property
    def shown_id(self) -> int | None:
        """The answer on show, which "keep this one" chooses."""
        return self.original_id if self.showing == 1 else self.alternative_id


def compared_rows(view: ChatView, cmp: Comparison) -> list[dict[str, Any]]:
    """The chat's rows with the compared answer's bubble showing answer `cmp.showing` of 2, marked
    "‹ n/2 ›" (the page's arrows under the chat switch it). The rows stay as many as in `view`, so a
    click or a thumb still names the same row; the other answers are as stored."""
    rows = [dict(r) for r in view.rows]
    for i, (row, answer_id) in enumerate(zip(rows, view.row_ids, strict=True)):
        if answer_id != cmp.original_id or "metadata" in row:
            continue
        if cmp.showing == 2:
            text = safe_markdown(cmp.alternative_text) + ("" if cmp.done else " ▌")
        else:
            text = row["content"]
        rows[i] = {**row, "content": f"{text}\n\n**‹ {cmp.showing}/2 ›**"}
        break
    return rows


def start_regenerate(services: Services, user: User, message_id: int | None, model: str | None = None) -> Reply:
    """Start a second answer to the question `message_id` answered (validated before generating)."""
    msg = _answer(services, user, message_id)
    if msg.status in HIDDEN_STATUSES:
        raise UiError("that answer was already replaced; compare from the current one")
    try:
        return services.chat.regenerate(user, msg.id, model=model or None)
    except ChatError as e:
        raise UiError(e.message) from e


def stream_regenerate(services: Services, user: User, message_id: int, reply: Reply,
                      active: ActiveReplies | None = None, session: str = "") -> Iterator[Comparison]:
    original = _answer(services, user, message_id)
    if active is not None:
        active.start(user, session, reply)
    cmp = Comparison(original.id, original.content)
    try:
        for piece in reply:
            cmp.alternative_text += piece
            yield replace(cmp)
    except ChatError as e:
        raise UiError(e.message) from e
    except GenerationError as e:
        raise UiError(f"the model failed while answering: {e}") from e
    finally:
        if active is not None:
            active.finish(user, session, reply)
    cmp.alternative_text = reply.text
    cmp.alternative_id = reply.assistant_message.id if reply.assistant_message is not None else None
    cmp.done = True
    yield replace(cmp)


def choose(services: Services, user: User, original_id: int | None, alternative_id: int | None,
           chosen_id: int | None) -> Feedback:
    """Store the pick between two answers as a pair; the chosen one is what the chat continues from."""
    if original_id is None or alternative_id is None:
        raise UiError("there is nothing to choose between yet")
    if chosen_id not in (original_id, alternative_id):
        raise UiError("choose one of the two answers")
    _answer(services, user, original_id)
    _answer(services, user, alternative_id)
    try:
        return services.chat.choose(user, int(original_id), int(alternative_id), int(chosen_id))
    except ChatError as e:
        raise UiError(e.message) from e


def answer_summary(view: ChatView, message_id: int | None) -> str:
    """One line quoting the answer the feedback controls act on (its words, not its id), in the view's
    language."""
    if message_id is None or message_id not in view.answers:
        return tr("no_answer_selected", view.lang)
    return tr("selected_answer", view.lang, text=safe_markdown(excerpt(view.answers[message_id], 120)))
