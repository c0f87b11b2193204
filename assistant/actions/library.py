"""One user's documents and long-term memories: add, list, read, change, delete.

In: the settings, the store, the knowledge base and long-term memory (either may be None on a server
without them: the actions then say so), the acting `User`, and the action's arguments.
Out: `DocumentInfo` and `Memory` records, `DocumentDeleted`, or an error from `assistant.actions.base`
(or `memory.documents.IngestError`, a ValueError, for an upload that cannot be read).

Rules, whichever way in asks:
- Everyone reads their own documents and the team's shared ones; another user's private document
  reads as not found. Only admins add shared documents (they reach every user's prompts); the
  uploader or an admin deletes a shared one.
- Deleting a document deletes its chunks and the teacher pairs generated from it, so it cannot come
  back through a later training set.
- Uploads arrive as a file name and bytes, never as a path: the name is checked
  (`memory.documents.check_filename`) and nothing a client names is opened on the server.
- A user's memories are only ever read or changed with that user's id; an admin has no way into
  another user's memories (deleting the account deletes them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from assistant.actions.base import AdminRequired, Conflict, NotFound, TooLarge, require_user
from assistant.config import Settings
from memory.documents import IngestError, check_filename, check_size
from memory.store import Store
from memory.types import User
from training.synth import SyntheticPairs

if TYPE_CHECKING:  # chromadb and the embedder load only when a server or command needs them
    from memory.knowledge import DocumentInfo, KnowledgeBase
    from memory.longterm import LongTermMemory, Memory

Scope = Literal["private", "shared"]
SCOPES: tuple[str, ...] = ("private", "shared")
ProgressFn = Callable[[float, str], None]


class Unavailable(RuntimeError):
    """This server runs without a knowledge base or long-term memory."""


@dataclass(frozen=True)
class DocumentDeleted:
    doc_id: str
    title: str
    chunks: int  # chunks removed from the vector store and the lexical index
    synthetic_pairs: int  # teacher pairs made from the document, removed with it


def _as_ingest_error(e: IngestError) -> ValueError:
    """Over a size limit -> TooLarge (413 on the API); a duplicate -> Conflict (409); else the IngestError."""
    msg = str(e)
    if getattr(e, "too_large", False) or "upload limit" in msg or "the limit is" in msg and "file name" not in msg:
        return TooLarge(msg)
    if "is already in the" in msg:
        return Conflict(msg)
    return e


class Library:
    """Documents and memories of the acting user."""

    def __init__(self, settings: Settings, store: Store, knowledge: KnowledgeBase | None,
                 memories: LongTermMemory | None) -> None:
        self.settings = settings
        self.store = store
        self.knowledge = knowledge
        self.memories = memories

    # ------------------------------------------------------------------ documents
    def _kb(self) -> KnowledgeBase:
        if self.knowledge is None:
            raise Unavailable("documents are not available on this server")
        return self.knowledge

    def list_documents(self, user: User | None, scope: str | None = None) -> list[DocumentInfo]:
        """The user's own documents and the shared ones (or one scope), newest first."""
        user = require_user(user)
        if scope is not None and scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        return self._kb().list_documents(user, scope)  # type: ignore[arg-type]

    def get_document(self, user: User | None, doc_id: str) -> DocumentInfo:
        user = require_user(user)
        try:
            return self._kb().get_document(user, doc_id)
        except LookupError as e:  # memory.knowledge.DocumentNotFound
            raise NotFound(f"document {doc_id!r} not found") from e

    def check_scope(self, user: User | None, scope: str) -> User:
        """Whether the user may add documents to `scope` (shared ones reach every user's prompts)."""
        user = require_user(user)
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        if scope == "shared" and not user.is_admin:
            raise AdminRequired("only admins add team documents; yours stay private")
        return user

    def check_upload(self, user: User | None, filename: str, size: int, scope: str) -> User:
        """Who may add what, and the checks that need no bytes: run before reading an upload."""
        user = self.check_scope(user, scope)
        try:
            check_filename(filename)
            check_size(size, self.settings.upload_max_bytes, filename)
        except IngestError as e:
            raise _as_ingest_error(e) from e
        return user

    def add_document(self, user: User | None, filename: str, data: bytes, scope: str = "private",
                     progress: ProgressFn | None = None) -> DocumentInfo:
        """Check, chunk, embed and store one upload; on any error nothing of it stays stored."""
        user = self.check_upload(user, filename, len(data), scope)
        try:
            return self._kb().ingest(user, filename, data, scope=scope, progress=progress)  # type: ignore[arg-type]
        except IngestError as e:
            raise _as_ingest_error(e) from e

    def add_documents(self, user: User | None, files: Sequence[tuple[str, bytes]], scope: str = "private",
                      progress: ProgressFn | None = None) -> list[DocumentInfo]:
        """Several uploads, all or none: every file is checked first, and if one fails to ingest the
        ones already stored by this call are deleted again before the error is raised."""
        if not files:
            raise ValueError("no files were sent")
        for name, data in files:
            self.check_upload(user, name, len(data), scope)
        done: list[DocumentInfo] = []
        report = progress or (lambda _f, _m: None)
        try:
            for i, (name, data) in enumerate(files):
                def step(frac: float, msg: str, i: int = i, name: str = name) -> None:
                    report((i + frac) / len(files), f"{name}: {msg}")
                done.append(self.add_document(user, name, data, scope, step))
        except BaseException:
            for info in done:
                self.delete_document(user, info.doc_id)
            raise
        return done

    def delete_document(self, user: User | None, doc_id: str) -> DocumentDeleted:
        """Delete a document, its chunks and the teacher pairs generated from it."""
        user = require_user(user)
        kb = self._kb()
        info = self.get_document(user, doc_id)
        try:
            chunks = kb.delete_document(user, doc_id)
        except LookupError as e:  # memory.knowledge.DocumentNotFound
            raise NotFound(f"document {doc_id!r} not found") from e
        # Pairs the teacher wrote from this document must not outlive it in later training sets.
        pairs = SyntheticPairs(self.store).delete_for_document(doc_id)
        return DocumentDeleted(doc_id=doc_id, title=info.title, chunks=chunks, synthetic_pairs=pairs)

    # ------------------------------------------------------------------ memories
    def _lt(self) -> LongTermMemory:
        if self.memories is None:
            raise Unavailable("memory is not available on this server")
        return self.memories

    def list_memories(self, user: User | None) -> list[Memory]:
        """What the assistant remembers about the user now (current versions only)."""
        return self._lt().list_memories(require_user(user).id)

    def get_memory(self, user: User | None, memory_id: int) -> Memory:
        """A current memory of the user's; older versions and other users' memories read as not found."""
        user = require_user(user)
        m = self._lt().get(user.id, int(memory_id))
        if m is None or m.status != "active":
            raise NotFound(f"memory {memory_id} not found")
        return m

    def memory_history(self, user: User | None, memory_id: int) -> list[Memory]:
        """The memory and the older versions it superseded, newest first."""
        m = self.get_memory(user, memory_id)
        return self._lt().history(m.user_id, m.id)

    def add_memory(self, user: User | None, text: str) -> Memory:
        """Remember what the user typed; the same fact again is a no-op, a contradicting one replaces."""
        user = require_user(user)
        return self._lt().remember(user.id, text or "", kind="note", source="explicit").memory

    def edit_memory(self, user: User | None, memory_id: int, text: str) -> Memory:
        """A new version that supersedes the old one (kept as history, no longer used)."""
        m = self.get_memory(user, memory_id)
        try:
            return self._lt().edit(m.user_id, m.id, text or "")
        except LookupError as e:
            raise NotFound(f"memory {memory_id} not found") from e

    def forget_memory(self, user: User | None, memory_id: int) -> int:
        """Delete the memory and every older version of it; returns how many versions went."""
        m = self.get_memory(user, memory_id)
        try:
            return self._lt().forget(m.user_id, m.id)
        except LookupError as e:
            raise NotFound(f"memory {memory_id} not found") from e
