"""Accounts for admins: create, list, disable, enable, delete, reset a password, list and revoke keys.

In: the settings, the store, the knowledge base (None where there is none), the acting admin (a
`User` with the admin role, or the `Operator` at the server's command line) and the action's
arguments. Out: plain dicts (JSON-ready); every change is written to the audit log
(`admin_audit`: who, what, to which account, when). Errors from `assistant.actions.base`.

Rules:
- Passwords have at least `MIN_PASSWORD` characters, whichever way in sets them.
- Only admins act here; an admin cannot disable, demote or delete their own account, and the last
  enabled admin cannot be disabled or deleted (someone must be able to log in and undo things).
- A disabled user can neither log in nor use an API key; their data stays until they are deleted.
- Deleting a user deletes everything of theirs: their private documents (chunks and the teacher pairs
  made from them), conversations with messages and feedback, memories and forgotten-memory
  tombstones, API keys, their uploads folder (`uploads/<user id>/`), and their rows in every dataset
  snapshot and the frozen held-out set (`training.forget`), and their personal adapters with their datasets
  and job folders (`training.personal`). Shared documents they added belong to the
  team and stay. The audit log keeps the line that says they were deleted.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from assistant.actions.base import Actor, Conflict, NotFound, Operator, actor_name, require_admin
from assistant.config import Settings
from memory.store import Store
from memory.types import User
from training.forget import Deleted, purge_rows
from training.personal import delete_files as delete_personal
from training.synth import SyntheticPairs

if TYPE_CHECKING:
    from memory.knowledge import KnowledgeBase


MIN_PASSWORD = 8  # characters; the page's forms say so before they send


def check_password(password: Any) -> str:
    """A password an account may get (the store only refuses an empty one)."""
    if not isinstance(password, str) or len(password) < MIN_PASSWORD:
        raise ValueError(f"the password needs at least {MIN_PASSWORD} characters")
    return password


def user_dict(u: User, keys: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"id": u.id, "username": u.username, "role": u.role, "disabled": u.disabled,
                           "created_at": u.created_at.isoformat()}
    if keys is not None:
        out["api_keys"] = keys
    return out


def _key_dict(k: dict[str, Any]) -> dict[str, Any]:
    return {"id": k["id"], "name": k["name"], "prefix": k["prefix"], "created_at": k["created_at"].isoformat()}


class UserAdmin:
    """Every account action; each checks the actor first and writes an audit line when it changes something."""

    def __init__(self, settings: Settings, store: Store, knowledge: KnowledgeBase | None = None) -> None:
        self.settings = settings
        self.store = store
        self.knowledge = knowledge

    # ------------------------------------------------------------------ helpers
    def _user(self, user_id: int) -> User:
        u = self.store.get_user(user_id) if isinstance(user_id, int) and not isinstance(user_id, bool) else None
        if u is None:
            raise NotFound(f"user {user_id} not found")
        return u

    def _not_self(self, actor: Actor, target: User, what: str) -> None:
        if isinstance(actor, User) and actor.id == target.id:
            raise Conflict(f"you cannot {what} your own account; ask another admin")

    def _not_last_admin(self, target: User, what: str) -> None:
        if target.is_admin and not target.disabled:
            others = [u for u in self.store.list_users() if u.is_admin and not u.disabled and u.id != target.id]
            if not others:
                raise Conflict(f"cannot {what} the last enabled admin")

    def _audit(self, actor: Actor, action: str, target: User, **detail: Any) -> None:
        self.store.record_audit(actor_name(actor), action, target.id, target.username, detail)

    def find(self, actor: Actor | None, username: str) -> User:
        """A user by name, disabled or not (for the command line, which names users)."""
        require_admin(actor)
        u = self.store.get_user_by_name(username, include_disabled=True)
        if u is None:
            raise NotFound(f"no user {username!r}")
        return u

    # ------------------------------------------------------------------ actions
    def list_users(self, actor: Actor | None) -> list[dict[str, Any]]:
        require_admin(actor)
        return [user_dict(u, len(self.store.list_api_keys(u.id))) for u in self.store.list_users()]

    def create_user(self, actor: Actor | None, username: str, password: str, admin: bool = False,
                    key_name: str = "default") -> dict[str, Any]:
        """A new account and its first API key (the key is in the answer once and never again)."""
        actor = require_admin(actor)
        user = self.store.create_user(username, check_password(password), role="admin" if admin else "user")
        key = self.store.create_api_key(user.id, name=key_name)
        self._audit(actor, "user_add", user, role=user.role)
        return {"user": user_dict(user), "api_key": key}

    def set_disabled(self, actor: Actor | None, user_id: int, disabled: bool) -> dict[str, Any]:
        actor = require_admin(actor)
        target = self._user(user_id)
        if disabled:
            self._not_self(actor, target, "disable")
            self._not_last_admin(target, "disable")
        user = self.store.set_disabled(target.id, disabled)
        self._audit(actor, "user_disable" if disabled else "user_enable", user)
        return user_dict(user)

    def set_password(self, actor: Actor | None, user_id: int, password: str) -> dict[str, Any]:
        actor = require_admin(actor)
        target = self._user(user_id)
        self.store.set_password(target.id, check_password(password))
        self._audit(actor, "user_password", target)
        return user_dict(target)

    def list_keys(self, actor: Actor | None, user_id: int) -> list[dict[str, Any]]:
        require_admin(actor)
        return [_key_dict(k) for k in self.store.list_api_keys(self._user(user_id).id)]

    def create_key(self, actor: Actor | None, user_id: int, name: str = "default") -> dict[str, Any]:
        actor = require_admin(actor)
        target = self._user(user_id)
        key = self.store.create_api_key(target.id, name=name)
        self._audit(actor, "key_add", target, name=name, prefix=key[:10])
        return {"user_id": target.id, "name": name, "api_key": key}

    def revoke_key(self, actor: Actor | None, user_id: int, key_id: int) -> dict[str, Any]:
        actor = require_admin(actor)
        target = self._user(user_id)
        keys = {k["id"]: k for k in self.store.list_api_keys(target.id)}
        if key_id not in keys or not self.store.revoke_api_key(target.id, key_id):
            raise NotFound(f"user {target.username!r} has no API key {key_id}")
        self._audit(actor, "key_revoke", target, key_id=key_id, prefix=keys[key_id]["prefix"])
        return {"user_id": target.id, "key_id": key_id, "revoked": True}

    def audit(self, actor: Actor | None, limit: int = 100, user_id: int | None = None) -> list[dict[str, Any]]:
        require_admin(actor)
        return [{**row, "created_at": row["created_at"].isoformat()}
                for row in self.store.list_audit(limit, target_user_id=user_id)]

    def delete_user(self, actor: Actor | None, user_id: int) -> dict[str, Any]:
        """Delete the account and everything of theirs (see the module docstring); returns what went."""
        actor = require_admin(actor)
        target = self._user(user_id)
        self._not_self(actor, target, "delete")
        self._not_last_admin(target, "delete")
        # Disabled first: no new turn, upload or key use lands while the rest is being deleted.
        self.store.set_disabled(target.id, True)
        conversation_ids = frozenset(self.store.conversation_ids(target.id))
        docs = self._delete_private_documents(target)
        purged = purge_rows(self.settings, Deleted(conversation_ids=conversation_ids, doc_ids=frozenset(docs.ids)))
        personal = delete_personal(self.settings, self.store, target.id)  # their adapters, datasets, job folders
        rows = self.store.delete_user(target.id)
        report = {**rows, "documents": len(docs.ids), "chunks": docs.chunks,
                  "synthetic_pairs_from_documents": docs.pairs, "upload_files": self._delete_uploads(target),
                  "dataset_rows": purged.rows, "snapshots_rewritten": purged.snapshots,
                  "shared_documents_kept": docs.shared_kept, **personal}
        self._audit(actor, "user_delete", target, **report)
        return {"user": user_dict(target), "deleted": report}

    def _delete_private_documents(self, target: User) -> _DocsDeleted:
        """Each private document of `target`, deleted with its chunks and teacher pairs."""
        out = _DocsDeleted()
        if self.knowledge is None:
            return out
        pairs = SyntheticPairs(self.store)
        for d in self.knowledge.list_documents(target):
            if d.owner_id != target.id:
                continue
            if d.scope == "shared":
                out.shared_kept += 1
                continue
            out.chunks += self.knowledge.delete_document(target, d.doc_id)
            out.pairs += pairs.delete_for_document(d.doc_id)
            out.ids.append(d.doc_id)
        return out

    def _delete_uploads(self, target: User) -> int:
        """Files left in `uploads/<user id>/` (an ingestion cut short); returns how many went."""
        folder = self.settings.uploads_dir / str(target.id)
        if not folder.is_dir():
            return 0
        n = sum(1 for p in folder.rglob("*") if p.is_file())
        shutil.rmtree(folder)
        return n


@dataclass
class _DocsDeleted:
    ids: list[str] = field(default_factory=list)
    chunks: int = 0
    pairs: int = 0
    shared_kept: int = 0


__all__ = ["Operator", "UserAdmin", "user_dict"]
