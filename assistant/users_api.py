"""HTTP routes for admins to manage accounts (`/v1/admin/users...`, the audit log `/v1/admin/audit`) and to
ask whether a retrain has what it needs (`/v1/admin/readiness`).

In: requests with an admin's API key. Out: JSON; anonymous -> 401, a non-admin -> 403 on every route,
before any body is read. Each route calls one method of `assistant.actions.users.UserAdmin`, which
checks again, does the work and writes the audit line; errors map as in `assistant.library_api`.

`install_users(app, admin)` adds the routes; `assistant.server.create_app` calls it.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from assistant.actions.readiness import readiness
from assistant.actions.users import UserAdmin
from assistant.admin_api import Admin, require_admin_key
from assistant.api import example
from assistant.library_api import call_action


def _actions(request: Request) -> UserAdmin:
    return request.app.state.user_admin


Actions = Annotated[UserAdmin, Depends(_actions)]


class UserIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"username": "bob", "password": "a long passphrase", "admin": False}]})
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1000)
    admin: bool = False


class PasswordIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"password": "a new passphrase"}]})
    password: str = Field(min_length=1, max_length=1000)


class KeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"name": "laptop"}]})
    name: str = Field("default", min_length=1, max_length=100)


USER_EXAMPLE = {"id": 2, "username": "bob", "role": "user", "disabled": False,
                "created_at": "2026-12-06T10:15:00+00:00"}
KEY_EXAMPLE = {"id": 4, "name": "laptop", "prefix": "sk-Ab3xY9q", "created_at": "2026-12-06T10:15:00+00:00"}
DELETED_EXAMPLE = {"user": {**USER_EXAMPLE, "disabled": True}, "deleted": {
    "api_keys": 2, "conversations": 14, "messages": 61, "feedback": 9, "memories": 3, "memory_tombstones": 1,
    "documents": 2, "chunks": 30, "synthetic_pairs_from_documents": 6, "upload_files": 0, "dataset_rows": 11,
    "snapshots_rewritten": ["v0004", "v0005"], "shared_documents_kept": 0}}
AUDIT_EXAMPLE = {"id": 9, "actor": "root", "action": "user_disable", "target_user_id": 2, "target": "bob",
                 "detail": {}, "created_at": "2026-12-06T10:15:00+00:00"}

READINESS_EXAMPLE = {
    "ready": False, "feedback": {"thumbs_up": 3, "thumbs_down": 1, "edits": 1, "pairs": 0, "teacher_pairs": 0,
                                 "conversations": 4},
    "rows": {"sft": {"train": 3, "validation": 0, "heldout": 1}, "dpo": {"train": 1, "validation": 0, "heldout": 0},
             "kto": {"train": 3, "validation": 0, "heldout": 1}},
    "heldout_frozen": False, "needs": {"train_rows": 8, "heldout_rows": 2},
    "missing": ["A retrain needs at least 8 examples; there are 4. Rate answers, correct them or ..."],
    "summary": "Not ready to retrain: ..."}


def build_users_router() -> APIRouter:
    r = APIRouter(prefix="/v1/admin", dependencies=[Depends(require_admin_key)])

    @r.get("/users", responses=example({"data": [{**USER_EXAMPLE, "api_keys": 1}]}), summary="Every account")
    def list_users(user: Admin, a: Actions) -> dict:
        return {"data": call_action(a.list_users, user)}

    @r.post("/users", status_code=201, responses=example({"user": USER_EXAMPLE, "api_key": "sk-..."}, 201),
            summary="Create an account and its first API key (shown once)")
    def create_user(body: UserIn, user: Admin, a: Actions) -> dict:
        return call_action(a.create_user, user, body.username, body.password, body.admin)

    @r.post("/users/{user_id}/disable", responses=example({**USER_EXAMPLE, "disabled": True}),
            summary="Disable an account: no login, no API key; its data stays")
    def disable(user_id: int, user: Admin, a: Actions) -> dict:
        return call_action(a.set_disabled, user, user_id, True)

    @r.post("/users/{user_id}/enable", responses=example(USER_EXAMPLE), summary="Enable a disabled account again")
    def enable(user_id: int, user: Admin, a: Actions) -> dict:
        return call_action(a.set_disabled, user, user_id, False)

    @r.delete("/users/{user_id}", responses=example(DELETED_EXAMPLE),
              summary="Delete an account and all its data (documents, conversations, memories, dataset rows)")
    def delete(user_id: int, user: Admin, a: Actions) -> dict:
        return call_action(a.delete_user, user, user_id)

    @r.put("/users/{user_id}/password", responses=example(USER_EXAMPLE), summary="Set a new password")
    def password(user_id: int, body: PasswordIn, user: Admin, a: Actions) -> dict:
        return call_action(a.set_password, user, user_id, body.password)

    @r.get("/users/{user_id}/keys", responses=example({"data": [KEY_EXAMPLE]}),
           summary="An account's API keys (names and prefixes; never the keys)")
    def keys(user_id: int, user: Admin, a: Actions) -> dict:
        return {"data": call_action(a.list_keys, user, user_id)}

    @r.post("/users/{user_id}/keys", status_code=201,
            responses=example({"user_id": 2, "name": "laptop", "api_key": "sk-..."}, 201),
            summary="Another API key for an account (shown once)")
    def add_key(user_id: int, body: KeyIn, user: Admin, a: Actions) -> dict:
        return call_action(a.create_key, user, user_id, body.name)

    @r.delete("/users/{user_id}/keys/{key_id}", responses=example({"user_id": 2, "key_id": 4, "revoked": True}),
              summary="Revoke one API key")
    def revoke(user_id: int, key_id: int, user: Admin, a: Actions) -> dict:
        return call_action(a.revoke_key, user, user_id, key_id)

    @r.get("/audit", responses=example({"data": [AUDIT_EXAMPLE]}), summary="Admin actions on accounts, newest first")
    def audit(user: Admin, a: Actions, limit: int = 100, user_id: int | None = None) -> dict[str, Any]:
        return {"data": call_action(a.audit, user, limit, user_id)}

    @r.get("/readiness", responses=example(READINESS_EXAMPLE),
           summary="What a retrain would train and be judged on now, and what is missing")
    def ready(user: Admin, a: Actions) -> dict[str, Any]:
        return call_action(readiness, user, a.store, a.settings, a.knowledge)

    return r


def install_users(app: FastAPI, admin: UserAdmin) -> None:
    app.state.user_admin = admin
    app.include_router(build_users_router())
