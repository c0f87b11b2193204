"""The conversation store: users, API keys, conversations, messages and feedback in SQL.

In: a SQLAlchemy URL (SQLite file by default, PostgreSQL for scale; see `memory.db`).
Out: `Store`, whose methods take and return the records of `memory.types` (User, Conversation,
Message, Feedback) and plain values. Everything above (assistant, API, UI, training) goes through it.

Rules it enforces so callers don't have to:
- Ownership: every method that takes a `user_id` acts only on that user's rows. Another user's
  conversation reads as absent (None / False); rating another user's message is a PermissionError.
- Atomicity: a chat turn (user message + answer) and a bulk insert commit whole or not at all.
- Secrets: passwords are stored as argon2 hashes, API keys as sha256 hashes plus a short prefix
  for listing; the plaintext key exists only in the return value of `create_api_key`.
- Bad input raises ValueError (LookupError for unknown ids) before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, get_args

import sqlalchemy as sa
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy.engine import Connection, Engine

from memory import migrations
from memory.db import create_engine, is_sqlite, utcnow, write_transaction
from memory.schema import (
    MAX_ADAPTER,
    MAX_KEY_NAME,
    MAX_SOURCE,
    MAX_TITLE,
    MAX_USERNAME,
    admin_audit,
    api_keys,
    conversations,
    feedback,
    messages,
    users,
)
from memory.text import check_text, has_surrogate, text_problem
from memory.types import REASON_TAGS, Conversation, Feedback, Message, MessageRole, Role, User

USER_ROLES: tuple[str, ...] = get_args(Role)
MESSAGE_ROLES: tuple[str, ...] = get_args(MessageRole)
# complete: a finished answer; stopped: cut off by the user; error: generation failed;
# alternative: a regenerated answer that was not (or not yet) chosen over the one in the thread.
MESSAGE_STATUSES = ("complete", "stopped", "error", "alternative")
MESSAGE_META_KEYS = ("adapter", "generation", "sources", "memories", "steps", "parent_id", "status", "imported")
API_KEY_PREFIX_LEN = 10  # "sk-" + 7 characters: enough to tell keys apart in a list, useless to guess
MAX_COMMENT = 4000
# One limit for an edited answer, whichever way it comes in (API, page): generous next to the longest
# answer the model may give (max_tokens_limit tokens), small enough to keep a dataset row sane.
MAX_CORRECTED_CHARS = 32_000
_USERNAME_RE = re.compile(r"^[A-Za-z0-9_.@+-]+$")

AUDIT_ACTIONS = ("user_add", "user_disable", "user_enable", "user_delete", "user_password", "key_add",
                 "key_revoke")
_IN_BATCH = 900  # ids per IN (...) clause: under SQLite's bound-parameter limit


@dataclass(frozen=True)
class FeedbackLog:
    """What a dataset build reads, in one read: all feedback and the conversations that have any.

    Rows are plain tuples in the column order named below, so a build of 100k turns stays cheap.
    """

    # (id, message_id, kind, rating, corrected, other_message_id, chosen_message_id, reason), by id
    feedback: list[tuple[Any, ...]]
    # (id, conversation_id, role, content, adapter, parent_id, status, imported, sources) of the user and
    # assistant messages of conversations with feedback, by conversation then id
    messages: list[tuple[Any, ...]]
    max_message_id: int  # the highest message id in the store, rated or not
    owners: dict[int, int]  # conversation id -> user id, for the conversations in `messages`


# ---------------------------------------------------------------------------------------------------
# Rows to records.


def _user(row: Any) -> User:
    return User(id=row.id, username=row.username, role=row.role, created_at=row.created_at,
                disabled=row.disabled_at is not None)


def _conversation(row: Any) -> Conversation:
    return Conversation(id=row.id, user_id=row.user_id, title=row.title, created_at=row.created_at,
                        updated_at=row.updated_at, source=row.source)


def _message(row: Any) -> Message:
    return Message(
        id=row.id, conversation_id=row.conversation_id, role=row.role, content=row.content,
        created_at=row.created_at, adapter=row.adapter, generation=row.generation or {},
        sources=row.sources or [], memories=row.memories or [], steps=row.steps or [],
        parent_id=row.parent_id, status=row.status, imported=bool(row.imported),
    )


def _feedback(row: Any) -> Feedback:
    return Feedback(
        id=row.id, user_id=row.user_id, message_id=row.message_id, kind=row.kind,
        created_at=row.created_at, rating=row.rating, reason=row.reason, comment=row.comment,
        corrected=row.corrected, other_message_id=row.other_message_id,
        chosen_message_id=row.chosen_message_id,
    )


# ---------------------------------------------------------------------------------------------------
# Validation (raises ValueError with a message a user or API client can act on).


def _text(value: Any, what: str, max_len: int | None = None, *, strip: bool = True) -> str:
    # memory.text holds the rules (no NUL, no lone surrogate, something visible) for every way in.
    return check_text(value, what, max_len, strip=strip)


def _int_id(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{what} must be an integer id, got {value!r}")
    return value


def _json(value: Any, what: str, kind: type) -> Any:
    if value is None:
        return kind()
    if not isinstance(value, kind):
        raise ValueError(f"{what} must be a {kind.__name__}, got {type(value).__name__}")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not JSON-serialisable: {exc}") from exc
    return value


def _hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------------


def thread_order(msgs: list[Message]) -> list[Message]:
    """Messages (in id order; anything with id, role and parent_id) as the conversation reads: each answer
    right after the question it answers.

    A second answer made by regenerate-and-choose on an earlier question is stored later than the
    questions that followed; by id alone the chosen one would move to the end of the conversation and
    its question would be left without a reply. Answers whose parent is not in the list stay in place.
    """
    present = {m.id for m in msgs}
    answers: dict[int, list[Message]] = {}
    out: list[Message] = []
    for m in msgs:
        if m.role == "assistant" and m.parent_id is not None and m.parent_id in present:
            answers.setdefault(m.parent_id, []).append(m)

    def emit(m: Message) -> None:  # a parent is always stored before its children: no cycles
        out.append(m)
        for child in answers.get(m.id, ()):
            emit(child)

    for m in msgs:
        if not (m.role == "assistant" and m.parent_id is not None and m.parent_id in present):
            emit(m)
    return out


class Store:
    """All reads and writes of users, conversations, messages and feedback."""

    def __init__(self, url: str, *, password_hasher: PasswordHasher | None = None) -> None:
        """Engine only; no schema work (use `Store.open` or `migrate`)."""
        self.url = url
        self.engine: Engine = create_engine(url)
        self._hasher = password_hasher or PasswordHasher()
        self._dummy_hash: str | None = None

    @classmethod
    def open(cls, url: str, *, password_hasher: PasswordHasher | None = None) -> Store:
        """Engine + migrate to the latest schema; raises `MigrationError` if that fails."""
        store = cls(url, password_hasher=password_hasher)
        try:
            store.migrate()
        except BaseException:
            store.close()
            raise
        return store

    def migrate(self, target: int | None = None) -> list[int]:
        return migrations.migrate(self.engine, target)

    def schema_version(self) -> int:
        return migrations.current_version(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.engine.url.render_as_string(hide_password=True)!r})"

    # ----------------------------------------------------------------------------------- users

    def create_user(self, username: str, password: str, role: str = "user") -> User:
        """A new user; ValueError on an empty/invalid/taken username, empty password or unknown role."""
        username = _text(username, "username", MAX_USERNAME)
        if not _USERNAME_RE.match(username):
            raise ValueError("username may contain only letters, digits and _ . @ + -")
        if not isinstance(password, str) or not password:
            raise ValueError("password must not be empty")
        if role not in USER_ROLES:
            raise ValueError(f"role must be one of {USER_ROLES}, got {role!r}")
        password_hash = self._hasher.hash(password)
        try:
            with write_transaction(self.engine) as conn:
                if conn.execute(sa.select(users.c.id).where(users.c.username == username)).first():
                    raise ValueError(f"username {username!r} is already taken")
                row = conn.execute(
                    users.insert().values(username=username, password_hash=password_hash, role=role,
                                          created_at=utcnow()).returning(*users.c)
                ).one()
        except sa.exc.IntegrityError as exc:
            # Two registrations of the same name raced past the check; the unique index decided.
            raise ValueError(f"username {username!r} is already taken") from exc
        return _user(row)

    def authenticate(self, username: str, password: str) -> User | None:
        """The user if the password matches, else None. Upgrades the hash if parameters changed."""
        if not isinstance(username, str) or not isinstance(password, str) or not password:
            return None
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(users).where(users.c.username == username.strip())).first()
        if row is None:
            # Spend the same time as a real check so response time doesn't reveal which names exist.
            self._verify(self._dummy(), password)
            return None
        if not self._verify(row.password_hash, password) or row.disabled_at is not None:
            return None  # a disabled account answers like a wrong password: nothing to probe
        if self._hasher.check_needs_rehash(row.password_hash):
            self._store_hash(row.id, self._hasher.hash(password))
        return _user(row)

    def _verify(self, password_hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(password_hash, password)
        except VerificationError:
            return False
        except InvalidHashError as exc:
            raise RuntimeError("stored password hash is corrupt") from exc

    def _dummy(self) -> str:
        if self._dummy_hash is None:
            self._dummy_hash = self._hasher.hash(secrets.token_hex(16))
        return self._dummy_hash

    def _store_hash(self, user_id: int, password_hash: str) -> None:
        with write_transaction(self.engine) as conn:
            conn.execute(users.update().where(users.c.id == user_id).values(password_hash=password_hash))

    def get_user(self, user_id: int) -> User | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(users).where(users.c.id == user_id)).first()
        return _user(row) if row else None

    def get_user_by_name(self, username: str, include_disabled: bool = False) -> User | None:
        """The user, or None; a disabled user is None too unless asked for (a login session of a
        user disabled since then stops working on its next request)."""
        if not isinstance(username, str):
            return None
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(users).where(users.c.username == username.strip())).first()
        if row is None or (row.disabled_at is not None and not include_disabled):
            return None
        return _user(row)

    def list_users(self) -> list[User]:
        with self.engine.connect() as conn:
            return [_user(r) for r in conn.execute(sa.select(users).order_by(users.c.id))]

    def set_password(self, user_id: int, password: str) -> None:
        """Replace a password; LookupError for an unknown user, ValueError for an empty password."""
        if not isinstance(password, str) or not password:
            raise ValueError("password must not be empty")
        password_hash = self._hasher.hash(password)
        with write_transaction(self.engine) as conn:
            result = conn.execute(
                users.update().where(users.c.id == user_id).values(password_hash=password_hash))
            if result.rowcount != 1:
                raise LookupError(f"no user with id {user_id}")

    def set_disabled(self, user_id: int, disabled: bool) -> User:
        """Disable (or enable again) an account: a disabled user can neither log in nor use an API key.
        Their data stays; LookupError for an unknown user."""
        with write_transaction(self.engine) as conn:
            row = conn.execute(users.update().where(users.c.id == user_id)
                               .values(disabled_at=utcnow() if disabled else None).returning(*users.c)).first()
        if row is None:
            raise LookupError(f"no user with id {user_id}")
        return _user(row)

    def delete_user(self, user_id: int) -> dict[str, int]:
        """Delete a user and every row of theirs (keys, conversations with their messages and feedback,
        feedback, memories, tombstones) in one transaction; returns how many of each went.

        The foreign keys cascade; the counts are taken first so the caller can report them. Rows in
        other modules' tables that hang off these (teacher repair pairs of their answers) cascade too.
        """
        with write_transaction(self.engine) as conn:
            if not conn.execute(sa.select(users.c.id).where(users.c.id == user_id)).first():
                raise LookupError(f"no user with id {user_id}")
            counts = self._owned_counts(conn, user_id)
            conn.execute(users.delete().where(users.c.id == user_id))
        return counts

    def _owned_counts(self, conn: Connection, user_id: int) -> dict[str, int]:
        convs = sa.select(conversations.c.id).where(conversations.c.user_id == user_id)

        def n(table: sa.Table, *where: Any) -> int:
            return int(conn.execute(sa.select(sa.func.count()).select_from(table).where(*where)).scalar_one())

        out = {"api_keys": n(api_keys, api_keys.c.user_id == user_id),
               "conversations": n(conversations, conversations.c.user_id == user_id),
               "messages": n(messages, messages.c.conversation_id.in_(convs)),
               "feedback": n(feedback, feedback.c.user_id == user_id)}
        for table in ("memories", "memory_tombstones"):  # memory.longterm's tables (migration 5)
            out[table] = int(conn.execute(sa.text(f"SELECT count(*) FROM {table} WHERE user_id = :u"),
                                          {"u": user_id}).scalar_one())
        return out

    def conversation_ids(self, user_id: int) -> list[int]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(conversations.c.id).where(conversations.c.user_id == user_id)
                                     .order_by(conversations.c.id)).scalars())

    def record_audit(self, actor: str, action: str, target_user_id: int | None = None, target: str | None = None,
                     detail: dict[str, Any] | None = None) -> int:
        """One line of the admin audit log (who did what to which account)."""
        if action not in AUDIT_ACTIONS:
            raise ValueError(f"audit action must be one of {AUDIT_ACTIONS}, got {action!r}")
        actor = _text(actor, "actor", 100)
        with write_transaction(self.engine) as conn:
            return int(conn.execute(admin_audit.insert().values(
                actor=actor, action=action, target_user_id=target_user_id, target=target,
                detail=_json(detail, "detail", dict), created_at=utcnow()).returning(admin_audit.c.id)).scalar_one())

    def list_audit(self, limit: int = 100, target_user_id: int | None = None) -> list[dict[str, Any]]:
        """The newest audit lines first."""
        query = sa.select(admin_audit).order_by(admin_audit.c.id.desc()).limit(max(1, min(int(limit), 1000)))
        if target_user_id is not None:
            query = query.where(admin_audit.c.target_user_id == target_user_id)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def set_role(self, user_id: int, role: str) -> None:
        """Make a user an admin or back; LookupError / ValueError as for the other setters."""
        if role not in USER_ROLES:
            raise ValueError(f"role must be one of {USER_ROLES}, got {role!r}")
        with write_transaction(self.engine) as conn:
            result = conn.execute(users.update().where(users.c.id == user_id).values(role=role))
            if result.rowcount != 1:
                raise LookupError(f"no user with id {user_id}")

    # ----------------------------------------------------------------------------------- API keys

    def create_api_key(self, user_id: int, name: str = "default") -> str:
        """A new `sk-...` key for the user. The plaintext is returned once and never stored."""
        name = _text(name, "key name", MAX_KEY_NAME)
        key = "sk-" + secrets.token_urlsafe(32)
        with write_transaction(self.engine) as conn:
            if not conn.execute(sa.select(users.c.id).where(users.c.id == user_id)).first():
                raise LookupError(f"no user with id {user_id}")
            conn.execute(api_keys.insert().values(
                user_id=user_id, name=name, prefix=key[:API_KEY_PREFIX_LEN], key_hash=_hash_key(key),
                created_at=utcnow()))
        return key

    def user_for_api_key(self, key: str) -> User | None:
        if not isinstance(key, str) or not key.startswith("sk-"):
            return None
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(users).join(api_keys, api_keys.c.user_id == users.c.id)
                .where(api_keys.c.key_hash == _hash_key(key), users.c.disabled_at.is_(None))
            ).first()
        return _user(row) if row else None

    def list_api_keys(self, user_id: int) -> list[dict]:
        """The user's keys as {id, name, prefix, created_at}; never the key or its hash."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(api_keys.c.id, api_keys.c.name, api_keys.c.prefix, api_keys.c.created_at)
                .where(api_keys.c.user_id == user_id).order_by(api_keys.c.id)
            )
            return [dict(r._mapping) for r in rows]

    def revoke_api_key(self, user_id: int, key_id: int) -> bool:
        """Delete one of the user's keys; False if it does not exist or is someone else's."""
        with write_transaction(self.engine) as conn:
            result = conn.execute(
                api_keys.delete().where(api_keys.c.id == key_id, api_keys.c.user_id == user_id))
            return result.rowcount == 1

    # ----------------------------------------------------------------------------------- conversations

    def create_conversation(self, user_id: int, title: str = "New chat", source: str = "ui") -> Conversation:
        title = _text(title, "title", MAX_TITLE)
        source = _text(source, "source", MAX_SOURCE)
        now = utcnow()
        with write_transaction(self.engine) as conn:
            if not conn.execute(sa.select(users.c.id).where(users.c.id == user_id)).first():
                raise LookupError(f"no user with id {user_id}")
            row = conn.execute(
                conversations.insert().values(user_id=user_id, title=title, source=source,
                                              created_at=now, updated_at=now)
                .returning(*conversations.c)
            ).one()
        return _conversation(row)

    def list_conversations(self, user_id: int) -> list[Conversation]:
        """The user's conversations, most recently updated first."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(conversations).where(conversations.c.user_id == user_id)
                .order_by(conversations.c.updated_at.desc(), conversations.c.id.desc())
            )
            return [_conversation(r) for r in rows]

    def get_conversation(self, conversation_id: int, user_id: int) -> Conversation | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(conversations).where(
                conversations.c.id == conversation_id, conversations.c.user_id == user_id)).first()
        return _conversation(row) if row else None

    def rename_conversation(self, conversation_id: int, user_id: int, title: str) -> bool:
        title = _text(title, "title", MAX_TITLE)
        with write_transaction(self.engine) as conn:
            result = conn.execute(
                conversations.update()
                .where(conversations.c.id == conversation_id, conversations.c.user_id == user_id)
                .values(title=title, updated_at=utcnow()))
            return result.rowcount == 1

    def delete_conversation(self, conversation_id: int, user_id: int) -> bool:
        """Hard-delete a conversation, its messages and their feedback (ON DELETE CASCADE)."""
        with write_transaction(self.engine) as conn:
            result = conn.execute(conversations.delete().where(
                conversations.c.id == conversation_id, conversations.c.user_id == user_id))
            return result.rowcount == 1

    # ----------------------------------------------------------------------------------- messages

    def add_message(
        self,
        conversation_id: int,
        role: str,
        content: str,
        *,
        adapter: str | None = None,
        generation: dict | None = None,
        sources: list | None = None,
        memories: list | None = None,
        steps: list | None = None,
        parent_id: int | None = None,
        status: str = "complete",
        imported: bool = False,
    ) -> Message:
        """Append one message; bumps the conversation's updated_at. LookupError for an unknown
        conversation; ValueError for bad values (parent_id must be a message of the same conversation).
        `imported`: the client wrote it (request history); it can never be rated or trained on."""
        meta = dict(adapter=adapter, generation=generation, sources=sources, memories=memories,
                    steps=steps, parent_id=parent_id, status=status, imported=imported)
        with write_transaction(self.engine) as conn:
            return self._insert_messages(conn, conversation_id, [dict(role=role, content=content, **meta)])[0]

    def add_turn(self, conversation_id: int, user_content: str, assistant_content: str,
                 **assistant_meta: Any) -> tuple[Message, Message]:
        """A user message and the assistant's answer (parent = that user message), in ONE transaction:
        both are committed or neither. `assistant_meta` takes add_message's keywords except parent_id."""
        if "parent_id" in assistant_meta:
            raise ValueError("add_turn sets parent_id itself (the answer's parent is the user message)")
        with write_transaction(self.engine) as conn:
            (user_msg,) = self._insert_messages(conn, conversation_id, [dict(role="user", content=user_content)])
            (answer,) = self._insert_messages(conn, conversation_id, [dict(
                role="assistant", content=assistant_content, parent_id=user_msg.id, **assistant_meta)])
        return user_msg, answer

    def add_messages(self, conversation_id: int, messages: list[dict]) -> list[Message]:
        """Bulk append (import, API history) in one transaction. Each dict has role and content and
        optionally add_message's keywords; a `parent_id` may refer to a message inserted earlier."""
        if not isinstance(messages, list):
            raise ValueError("messages must be a list of dicts")
        with write_transaction(self.engine) as conn:
            return self._insert_messages(conn, conversation_id, messages)

    def _check_conversation(self, conn: Connection, conversation_id: int) -> None:
        if not conn.execute(sa.select(conversations.c.id)
                            .where(conversations.c.id == conversation_id)).first():
            raise LookupError(f"no conversation with id {conversation_id}")

    def _insert_messages(self, conn: Connection, conversation_id: int, items: list[dict]) -> list[Message]:
        """Validate and insert inside the caller's transaction (any error rolls all of it back)."""
        self._check_conversation(conn, conversation_id)
        out: list[Message] = []
        for i, item in enumerate(items):
            where = f"message {i}" if len(items) > 1 else "message"
            if not isinstance(item, dict):
                raise ValueError(f"{where} must be a dict, got {type(item).__name__}")
            unknown = set(item) - {"role", "content", *MESSAGE_META_KEYS}
            if unknown:
                raise ValueError(f"{where} has unknown keys {sorted(unknown)}")
            values = self._message_values(conn, conversation_id, item, where)
            row = conn.execute(messages.insert().values(**values).returning(*messages.c)).one()
            out.append(_message(row))
        if out:
            conn.execute(conversations.update().where(conversations.c.id == conversation_id)
                         .values(updated_at=out[-1].created_at))
        return out

    def _message_values(self, conn: Connection, conversation_id: int, item: dict, where: str) -> dict:
        role = item.get("role")
        if role not in MESSAGE_ROLES:
            raise ValueError(f"{where}: role must be one of {MESSAGE_ROLES}, got {role!r}")
        content = item.get("content")
        if not isinstance(content, str):
            raise ValueError(f"{where}: content must be a string")
        if has_surrogate(content):
            raise ValueError(f"{where}: content contains an unpaired surrogate, which is not valid Unicode")
        imported = item.get("imported", False)
        if not isinstance(imported, bool):
            raise ValueError(f"{where}: imported must be true or false, got {imported!r}")
        status = item.get("status", "complete")
        if status not in MESSAGE_STATUSES:
            raise ValueError(f"{where}: status must be one of {MESSAGE_STATUSES}, got {status!r}")
        # A user must have said something; an answer may be empty (the model can stop at once, and
        # that answer must still be logged so that it can be rated).
        if role == "user" and not content.strip():
            raise ValueError(f"{where}: content must not be empty")
        adapter = item.get("adapter")
        if adapter is not None:
            adapter = _text(adapter, f"{where}: adapter", MAX_ADAPTER)
        parent_id = item.get("parent_id")
        if parent_id is not None:
            parent_id = _int_id(parent_id, f"{where}: parent_id")
            parent = conn.execute(sa.select(messages.c.conversation_id)
                                  .where(messages.c.id == parent_id)).first()
            if parent is None or parent.conversation_id != conversation_id:
                raise ValueError(f"{where}: parent_id {parent_id} is not a message of conversation "
                                 f"{conversation_id}")
        return dict(
            conversation_id=conversation_id, role=role, content=content, adapter=adapter,
            generation=_json(item.get("generation"), f"{where}: generation", dict),
            sources=_json(item.get("sources"), f"{where}: sources", list),
            memories=_json(item.get("memories"), f"{where}: memories", list),
            steps=_json(item.get("steps"), f"{where}: steps", list),
            parent_id=parent_id, status=status, imported=imported, created_at=utcnow(),
        )

    def set_message_status(self, message_id: int, status: str, user_id: int | None = None) -> None:
        """Change a message's status (e.g. the chosen one of two regenerated answers becomes
        "complete", the other "alternative"). LookupError if unknown or, with `user_id`, not theirs."""
        if status not in MESSAGE_STATUSES:
            raise ValueError(f"status must be one of {MESSAGE_STATUSES}, got {status!r}")
        where = [messages.c.id == message_id]
        if user_id is not None:
            where.append(messages.c.conversation_id.in_(
                sa.select(conversations.c.id).where(conversations.c.user_id == user_id)))
        with write_transaction(self.engine) as conn:
            if conn.execute(messages.update().where(*where).values(status=status)).rowcount != 1:
                raise LookupError(f"no message with id {message_id}")

    def messages(self, conversation_id: int, user_id: int | None = None) -> list[Message]:
        """The conversation's messages in reading order (`thread_order`). With `user_id`: LookupError if
        the conversation does not exist, PermissionError if it belongs to someone else."""
        with self.engine.connect() as conn:
            if user_id is not None:
                owner = conn.execute(sa.select(conversations.c.user_id)
                                     .where(conversations.c.id == conversation_id)).scalar()
                if owner is None:
                    raise LookupError(f"no conversation with id {conversation_id}")
                if owner != user_id:
                    raise PermissionError(f"conversation {conversation_id} belongs to another user")
            rows = conn.execute(sa.select(messages).where(messages.c.conversation_id == conversation_id)
                                .order_by(messages.c.id))
            return thread_order([_message(r) for r in rows])

    def get_message(self, message_id: int, user_id: int | None = None) -> Message | None:
        """The message, or None if unknown or (with `user_id`) not in one of that user's conversations."""
        query = sa.select(messages).where(messages.c.id == message_id)
        if user_id is not None:
            query = query.join(conversations, conversations.c.id == messages.c.conversation_id).where(
                conversations.c.user_id == user_id)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return _message(row) if row else None

    # ----------------------------------------------------------------------------------- feedback

    def _rateable(self, conn: Connection, user_id: int, message_id: int) -> Any:
        """The message row with its owner, after the checks every kind of feedback shares."""
        _int_id(message_id, "message_id")
        row = conn.execute(
            sa.select(messages.c.id, messages.c.role, messages.c.content, messages.c.conversation_id,
                      messages.c.imported, conversations.c.user_id.label("owner_id"))
            .join(conversations, conversations.c.id == messages.c.conversation_id)
            .where(messages.c.id == message_id)
        ).first()
        if row is None:
            raise LookupError(f"no message with id {message_id}")
        if row.owner_id != user_id:
            raise PermissionError(f"message {message_id} is in another user's conversation")
        if row.role != "assistant":
            raise ValueError(f"only assistant messages can be rated; message {message_id} is {row.role!r}")
        if row.imported:
            # The client wrote it into its request history: rating it would let a client write its own
            # training data (issue 21). Only answers this server generated are rated.
            raise ValueError(f"message {message_id} was sent by the client as history, not generated by this "
                             "server; only the server's answers can be rated, edited or compared")
        return row

    def _insert_feedback(self, conn: Connection, **values: Any) -> Feedback:
        row = conn.execute(feedback.insert().values(created_at=utcnow(), **values)
                           .returning(*feedback.c)).one()
        return _feedback(row)

    def add_thumb(self, user_id: int, message_id: int, rating: int, reason: str | None = None,
                  comment: str | None = None) -> Feedback:
        """Thumbs up (+1) or down (-1). A user has at most one thumb per message: a new one replaces
        the previous (the UI toggles), so counts and datasets see the current opinion only."""
        if not isinstance(rating, int) or isinstance(rating, bool) or rating not in (1, -1):
            raise ValueError(f"rating must be +1 or -1, got {rating!r}")
        if reason is not None and reason not in REASON_TAGS:
            raise ValueError(f"reason must be one of {REASON_TAGS}, got {reason!r}")
        if comment is not None:
            problem = text_problem(comment, allow_blank=True)
            if problem is not None:
                raise ValueError(f"comment {problem}")
            comment = comment.strip() or None
            if comment is not None and len(comment) > MAX_COMMENT:
                raise ValueError(f"comment is longer than {MAX_COMMENT} characters")
        with write_transaction(self.engine) as conn:
            self._rateable(conn, user_id, message_id)
            conn.execute(feedback.delete().where(feedback.c.user_id == user_id,
                                                 feedback.c.message_id == message_id,
                                                 feedback.c.kind == "thumb"))
            return self._insert_feedback(conn, user_id=user_id, message_id=message_id, kind="thumb",
                                         rating=rating, reason=reason, comment=comment)

    def add_edit(self, user_id: int, message_id: int, corrected: str) -> Feedback:
        """The user's corrected version of an answer (chosen) against the original (rejected)."""
        corrected = _text(corrected, "corrected text", MAX_CORRECTED_CHARS)
        with write_transaction(self.engine) as conn:
            row = self._rateable(conn, user_id, message_id)
            if corrected == row.content.strip():
                raise ValueError("corrected text is the same as the original answer")
            return self._insert_feedback(conn, user_id=user_id, message_id=message_id, kind="edit",
                                         corrected=corrected)

    def add_pair(self, user_id: int, message_id: int, other_message_id: int,
                 chosen_message_id: int) -> Feedback:
        """The user's pick between two answers of the same conversation (e.g. after regenerate)."""
        if message_id == other_message_id:
            raise ValueError("a pair needs two different messages")
        if chosen_message_id not in (message_id, other_message_id):
            raise ValueError(f"chosen message {chosen_message_id!r} is not one of the pair")
        with write_transaction(self.engine) as conn:
            first = self._rateable(conn, user_id, message_id)
            second = self._rateable(conn, user_id, other_message_id)
            if first.conversation_id != second.conversation_id:
                raise ValueError("both messages of a pair must be in the same conversation")
            return self._insert_feedback(conn, user_id=user_id, message_id=message_id, kind="pair",
                                         other_message_id=other_message_id,
                                         chosen_message_id=chosen_message_id)

    def delete_feedback(self, user_id: int, feedback_id: int) -> bool:
        """Withdraw one's own feedback (e.g. un-toggle a thumb); False if absent or someone else's."""
        with write_transaction(self.engine) as conn:
            result = conn.execute(feedback.delete().where(feedback.c.id == feedback_id,
                                                          feedback.c.user_id == user_id))
            return result.rowcount == 1

    def feedback_for_message(self, message_id: int) -> list[Feedback]:
        """Feedback on the message, including pairs that name it as the other answer; oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(feedback).where(sa.or_(
                feedback.c.message_id == message_id, feedback.c.other_message_id == message_id,
            )).order_by(feedback.c.id))
            return [_feedback(r) for r in rows]

    def list_feedback(self, since_id: int = 0, limit: int | None = None) -> list[Feedback]:
        """All feedback with id > since_id, oldest first (for admin views and dataset builds)."""
        if limit is not None and (not isinstance(limit, int) or limit < 0):
            raise ValueError(f"limit must be a non-negative integer, got {limit!r}")
        query = sa.select(feedback).where(feedback.c.id > since_id).order_by(feedback.c.id)
        if limit is not None:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            return [_feedback(r) for r in conn.execute(query)]

    def count_feedback(self, *, user_id: int | None = None, since: datetime | None = None,
                       after_id: int | None = None) -> int:
        """Feedback rows: all of them, or only one user's, created after `since`, with an id above `after_id`."""
        query = sa.select(sa.func.count()).select_from(feedback).where(*self._feedback_filter(user_id, since, after_id))
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def newest_feedback_id(self, user_id: int | None = None) -> int | None:
        """The highest feedback id (of one user's feedback, with `user_id`); None when there is none."""
        query = sa.select(sa.func.max(feedback.c.id)).where(*self._feedback_filter(user_id, None, None))
        with self.engine.connect() as conn:
            return conn.execute(query).scalar()

    @staticmethod
    def _feedback_filter(user_id: int | None, since: datetime | None, after_id: int | None) -> list[Any]:
        where = []
        if user_id is not None:
            where.append(feedback.c.user_id == user_id)
        if since is not None:
            where.append(feedback.c.created_at > since)
        if after_id is not None:
            where.append(feedback.c.id > after_id)
        return where

    # ----------------------------------------------------------------------------------- training

    def read_feedback_log(self) -> FeedbackLog:
        """Bulk, read-only, in one transaction: all feedback and the user/assistant messages of conversations
        that have feedback. Two queries instead of one per conversation. Only the columns a dataset may
        use are read: `memories` and `steps` deliberately not."""
        rated_conversations = (
            sa.select(messages.c.conversation_id)
            .join(feedback, feedback.c.message_id == messages.c.id)
            .distinct()
        )
        fb_cols = (feedback.c.id, feedback.c.message_id, feedback.c.kind, feedback.c.rating, feedback.c.corrected,
                   feedback.c.other_message_id, feedback.c.chosen_message_id, feedback.c.reason)
        msg_cols = (messages.c.id, messages.c.conversation_id, messages.c.role, messages.c.content,
                    messages.c.adapter, messages.c.parent_id, messages.c.status, messages.c.imported,
                    messages.c.sources)
        with self.engine.connect() as conn:
            fb = [tuple(r) for r in conn.execute(sa.select(*fb_cols).order_by(feedback.c.id))]
            msgs = [tuple(r) for r in conn.execute(
                sa.select(*msg_cols)
                .where(messages.c.conversation_id.in_(rated_conversations))
                .where(messages.c.role.in_(("user", "assistant")))
                .order_by(messages.c.conversation_id, messages.c.id)
            )]
            max_msg = conn.execute(sa.select(sa.func.max(messages.c.id))).scalar() or 0
            owners = dict(conn.execute(sa.select(conversations.c.id, conversations.c.user_id)
                                       .where(conversations.c.id.in_(rated_conversations))).all())
        return FeedbackLog(feedback=fb, messages=msgs, max_message_id=int(max_msg), owners=owners)

    def existing_message_ids(self, ids: Iterable[int]) -> set[int]:
        """Which of `ids` are still stored messages (of any user)."""
        wanted = sorted(set(ids))
        alive: set[int] = set()
        with self.engine.connect() as conn:
            for i in range(0, len(wanted), _IN_BATCH):
                batch = wanted[i:i + _IN_BATCH]
                alive |= set(conn.execute(sa.select(messages.c.id).where(messages.c.id.in_(batch))).scalars())
        return alive

    def conversation_owners(self, conversation_ids: Iterable[int]) -> dict[int, int]:
        """conversation id -> user id, for those of `conversation_ids` that still exist."""
        wanted = sorted(set(conversation_ids))
        out: dict[int, int] = {}
        with self.engine.connect() as conn:
            for i in range(0, len(wanted), _IN_BATCH):
                out.update(conn.execute(sa.select(conversations.c.id, conversations.c.user_id)
                                        .where(conversations.c.id.in_(wanted[i:i + _IN_BATCH]))).all())
        return out

    # ----------------------------------------------------------------------------------- admin

    def counts(self) -> dict[str, int]:
        """users, conversations, messages, thumbs_up, thumbs_down, edits, pairs."""
        def count(table: sa.Table, *where: Any) -> Any:
            return sa.select(sa.func.count()).select_from(table).where(*where).scalar_subquery()

        query = sa.select(
            count(users).label("users"),
            count(conversations).label("conversations"),
            count(messages).label("messages"),
            count(feedback, feedback.c.kind == "thumb", feedback.c.rating == 1).label("thumbs_up"),
            count(feedback, feedback.c.kind == "thumb", feedback.c.rating == -1).label("thumbs_down"),
            count(feedback, feedback.c.kind == "edit").label("edits"),
            count(feedback, feedback.c.kind == "pair").label("pairs"),
        )
        with self.engine.connect() as conn:
            return {k: int(v) for k, v in conn.execute(query).one()._mapping.items()}

    def integrity_check(self) -> bool:
        """SQLite: PRAGMA integrity_check and foreign_key_check both clean. PostgreSQL: reachable."""
        with self.engine.connect() as conn:
            if is_sqlite(conn):
                result = [r[0] for r in conn.exec_driver_sql("PRAGMA integrity_check")]
                dangling = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                return result == ["ok"] and not dangling
            return conn.execute(sa.text("SELECT 1")).scalar() == 1
