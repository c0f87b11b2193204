"""HTTP routes for personal adapters: a user's own (`/v1/personal...`) and the admins' list (`/v1/admin/personal...`).

In: requests with an API key. Out: JSON. A user reads and changes only their own personal adapter: their
status, opt-in, evaluation report and "forget what you learned from me"; another user's version name reads
as not found. The admin routes answer 401 / 403 before any body is read. Each route calls one method of
`assistant.actions.personal.PersonalActions`; errors map as in `assistant.library_api`.

`install_personal(app, actions)` adds the routes; `assistant.server.create_app` calls it.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from pydantic import BaseModel, ConfigDict

from assistant.actions.personal import PersonalActions
from assistant.admin_api import Admin, body_example, require_admin_key
from assistant.api import example
from assistant.library_api import CurrentUser, call_action


def _actions(request: Request) -> PersonalActions:
    return request.app.state.personal


Actions = Annotated[PersonalActions, Depends(_actions)]


class OptIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"opted_in": True}]})
    opted_in: bool


VERSION_EXAMPLE = {"name": "u2-v0007", "parent": "v0005", "gate": "passed",
                   "reason": "gain on pref_accuracy; no regression beyond tolerance",
                   "metrics": {"candidate": {"pref_accuracy": 0.83}}, "created_at": "2026-12-06T10:15:00+00:00",
                   "job_id": 12}
STATUS_EXAMPLE = {
    "user_id": 2, "enabled": True, "opted_in": True, "state": "serving", "serving": "u2-v0007",
    "shared_serving": "v0005", "latest": VERSION_EXAMPLE, "versions": [VERSION_EXAMPLE],
    "readiness": {"ready": False, "feedback": 41, "needs": 20, "retrains_today": 1, "retrains_per_day": 1,
                  "disk_bytes": 9_830_400, "disk_limit_bytes": 209_715_200,
                  "missing": ["1 personal retrains today already; the limit is 1 a day."]},
    "last_job": {"id": 12, "status": "succeeded", "phase": "done", "error": None,
                 "result": {"status": "promoted", "candidate": "u2-v0007"}, "created_at": "2026-12-06T10:10:00+00:00"},
    "forgotten_through_feedback": None}
LINE_EXAMPLE = {"user_id": 2, "username": "bob", "opted_in": True, "serving": "u2-v0007", "versions": 2,
                "latest": "u2-v0007", "latest_gate": "passed", "disk_bytes": 9_830_400,
                "disk_limit_bytes": 209_715_200, "last_job": STATUS_EXAMPLE["last_job"]}


def build_personal_router() -> APIRouter:
    r = APIRouter()

    @r.get("/v1/personal", responses=example(STATUS_EXAMPLE),
           summary="Your personal adapter: opted in or not, the version serving you, its gate and the next retrain")
    def status(user: CurrentUser, a: Actions) -> dict:
        return call_action(a.status, user)

    @r.put("/v1/personal", responses=example(STATUS_EXAMPLE), summary="Opt in to a personal adapter, or out")
    def opt_in(body: OptIn, user: CurrentUser, a: Actions) -> dict:
        return call_action(a.set_opt_in, user, body.opted_in)

    @r.get("/v1/personal/report", responses=example({"version": "u2-v0007", "gate": "passed", "serving": True,
                                                     "reason": VERSION_EXAMPLE["reason"], "report": {},
                                                     "markdown": "# Evaluation: u2-v0007 vs v0005\n..."}),
           summary="The evaluation report of one of your personal versions (default: the newest)")
    def report(user: CurrentUser, a: Actions, version: str | None = None) -> dict:
        return call_action(a.report, user, version)

    @r.delete("/v1/personal", responses=example({"user_id": 2, "deleted": {
        "versions": 2, "serving_events": 1, "adapter_bytes": 9_000_000, "dataset_bytes": 830_400, "job_folders": 2,
        "feedback_forgotten_through": 118}}),
              summary="Forget what you learned from me: delete my personal adapter, its datasets and my rows "
                      "from every later build")
    def forget(user: CurrentUser, a: Actions) -> dict:
        return call_action(a.forget, user)

    admin = APIRouter(prefix="/v1/admin/personal", dependencies=[Depends(require_admin_key)])

    @admin.get("", responses=example({"data": [LINE_EXAMPLE]}),
               summary="Every user's personal adapter: opted in, serving version, disk use")
    def overview(user: Admin, a: Actions) -> dict[str, Any]:
        return {"data": call_action(a.overview, user)}

    @admin.get("/{user_id}", responses=example({**LINE_EXAMPLE, "state": "serving", "versions": [VERSION_EXAMPLE],
                                                "readiness": STATUS_EXAMPLE["readiness"]}),
               summary="One user's personal versions with their gate decisions (not their reports)")
    def one(user_id: int, user: Admin, a: Actions) -> dict[str, Any]:
        return call_action(a.user_adapters, user, user_id)

    @admin.post("/{user_id}/train", status_code=202,
                openapi_extra=body_example({"train": {"max_steps": 40}, "auto_promote": True}),
                responses=example({"id": 12, "status": "queued", "params": {"user_id": 2}}, 202),
                summary="Start a personal retrain of one user now (one job at a time)")
    def train(user_id: int, body: dict[str, Any], user: Admin, a: Actions) -> dict[str, Any]:
        return call_action(a.train, user, user_id, body)

    r.include_router(admin)
    return r


def install_personal(app: FastAPI, actions: PersonalActions) -> None:
    app.state.personal = actions
    app.include_router(build_personal_router())
