"""Admin actions of the self-improvement loop, for the HTTP API, the admin console and the CLI.

In: the server's services and the acting `User`. Out: plain dicts (JSON-ready).

`AdminActions` holds every action as a plain method whose first argument is the acting user: a
missing user raises `LoginRequired`, a non-admin `AdminRequired` (both PermissionError), before
anything is read or changed. The browser console (`ui.admin`) calls the same methods, so hidden
buttons are no back door. `build_admin_router()` exposes them under ``/v1/admin/...`` with the same
bearer API keys as the rest of the API: anonymous -> 401, non-admin -> 403 on every route.

Routes: counts; datasets (list, build, preview); synth; jobs (start a retrain, list, detail with
progress, loss curve and log, cancel); adapters (list, evaluation report as JSON/markdown/PNG,
promote, rollback); schedule (get, set).

`install_admin(app, services)` adds the routes and the actions to an app built by
`assistant.server.create_app`. Nothing starts here; `training.scheduler.start_loop(services)` is the
start-up call for recovery, the serving adapter and the scheduler thread.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from assistant.actions.base import AdminRequired, LoginRequired
from assistant.api import ApiError, example, examples, user_from_key
from assistant.library_api import call_action
from memory.types import User
from training.jobs import runner_for
from training.registry import Registry, RegistryError
from training.scheduler import LoopSettings, due, load_loop_settings, loop_state, save_loop_settings

_SNAPSHOT_RE = re.compile(r"^v\d{4,}$")
PREVIEW_KINDS = ("sft", "dpo", "kto")
PREVIEW_SPLITS = ("train", "validation", "test", "heldout")


class AdapterInUse(RuntimeError):
    """The adapter is the one the chat serves (409)."""


def require_admin(user: User | None) -> User:
    """The user when an admin; LoginRequired / AdminRequired (assistant/actions/base.py) otherwise."""
    if user is None:
        raise LoginRequired("log in first")
    if not user.is_admin:
        raise AdminRequired("this needs an admin account")
    return user


class AdminActions:
    """Every admin action of the loop; each checks the user first (see module docstring)."""

    def __init__(self, services: Any) -> None:
        self.services = services
        self.settings = services.settings
        self.store = services.store

    @property
    def registry(self) -> Registry:
        return self.services.registry

    @property
    def jobs(self):  # noqa: ANN201 - JobRunner; imported lazily by runner_for
        return runner_for(self.services)

    # ------------------------------------------------------------------ data
    def counts(self, user: User | None) -> dict[str, Any]:
        require_admin(user)
        from training.dataset_build import list_snapshots, store_summary

        state = loop_state(self.store)
        active = self.jobs.active()
        return {**self.store.counts(), **store_summary(self.store),
                "datasets": len(list_snapshots(self.settings)),
                "adapter_versions": len(self.registry.list()), "serving": self.registry.serving(),
                "new_feedback_since_last_job": state.new_feedback,
                "active_job": active.to_dict() if active else None}

    def list_datasets(self, user: User | None) -> list[dict[str, Any]]:
        require_admin(user)
        from training.dataset_build import list_snapshots, read_manifest

        out = []
        for path in reversed(list_snapshots(self.settings)):
            m = read_manifest(path)
            out.append({"name": path.name, "created_at": m.get("created_at") or m.get("built_at"),
                        "counts": m.get("counts", {}), "heldout": (m.get("heldout") or {}).get("counts")})
        return out

    def build_dataset(self, user: User | None, options: dict[str, Any] | None = None) -> dict[str, Any]:
        require_admin(user)
        from training.dataset_build import build_datasets
        from training.loop import build_options

        result = build_datasets(self.store, self.settings, build_options(self._server_files(options or {})),
                                knowledge=self.services.knowledge)
        return {"name": result.version, "counts": result.manifest.get("counts", {})}

    def _snapshot(self, name: str) -> Path:
        if not isinstance(name, str) or not _SNAPSHOT_RE.match(name):
            raise ValueError(f"dataset name must look like v0001, got {name!r}")
        path = self.settings.datasets_dir / name
        if not (path / "manifest.json").is_file():
            raise LookupError(f"dataset {name} does not exist")
        return path

    def preview_dataset(self, user: User | None, name: str, kind: str = "sft", split: str = "train",
                        limit: int = 20, offset: int = 0) -> dict[str, Any]:
        require_admin(user)
        if kind not in PREVIEW_KINDS or split not in PREVIEW_SPLITS:
            raise ValueError(f"kind must be one of {PREVIEW_KINDS} and split one of {PREVIEW_SPLITS}")
        if not 1 <= limit <= 200 or offset < 0:
            raise ValueError("limit must be 1..200 and offset >= 0")
        path = self._snapshot(name)
        f = path / "heldout" / f"{kind}.jsonl" if split == "heldout" else path / "jsonl" / f"{kind}.{split}.jsonl"
        rows = [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()] \
            if f.is_file() else []
        return {"name": name, "kind": kind, "split": split, "total": len(rows), "offset": offset,
                "rows": rows[offset:offset + limit]}

    def synth(self, user: User | None, max_chunks: int = 8, questions_per_chunk: int = 2,
              docs: str | None = None) -> dict[str, Any]:
        """Teacher pairs from the admin's readable documents (or a server-side folder), stored for builds."""
        admin = require_admin(user)
        from training.synth import (
            SyntheticPairs,
            allowed_docs_folder,
            chunks_from_folder,
            chunks_from_knowledge,
            pick_chunks,
            run_synth,
        )
        from training.teacher import self_teacher

        if not 1 <= max_chunks <= 500 or not 1 <= questions_per_chunk <= 10:
            raise ValueError("max_chunks must be 1..500 and questions_per_chunk 1..10")
        if docs:
            # Only settings.synth_docs_dir (and below) may be read: 403 outside it, 404 missing inside.
            root = self.settings.synth_docs_dir
            chunks = chunks_from_folder(allowed_docs_folder(root, docs), root=root)
        else:
            kb = self.services.knowledge
            if kb is None:
                raise ValueError("no knowledge base is attached to this server; pass a documents folder")
            chunks = chunks_from_knowledge(kb, admin)
        if not chunks:
            raise ValueError("there are no documents to generate pairs from")
        chunks = pick_chunks(chunks, max_chunks, SyntheticPairs(self.store).read_chunks())
        report = run_synth(self.store, self_teacher(self.services.backend), chunks,
                           questions_per_chunk=questions_per_chunk)
        return {"chunks": report.chunks, "pairs": report.pairs, "accepted": report.accepted,
                "dpo_pairs": report.dpo_pairs, "seconds": round(report.seconds, 2)}

    # ------------------------------------------------------------------ jobs
    def start_retrain(self, user: User | None, options: dict[str, Any] | None = None) -> dict[str, Any]:
        admin = require_admin(user)
        options = dict(options or {})
        if options.get("synth_docs") is not None:  # the same folder rule as `synth`, checked before the job
            from training.synth import allowed_docs_folder

            if not isinstance(options["synth_docs"], str):
                raise ValueError("synth_docs must be a folder name")
            options["synth_docs"] = str(allowed_docs_folder(self.settings.synth_docs_dir, options["synth_docs"]))
        if options.get("eval_doc_qa") is not None:
            options["eval_doc_qa"] = self._server_files({"eval_doc_qa": options["eval_doc_qa"]})["eval_doc_qa"]
        if isinstance(options.get("build"), dict):
            options["build"] = self._server_files(options["build"])
        return self.jobs.start(options, requested_by=admin.username, trigger="manual").to_dict()

    def _server_files(self, options: dict[str, Any]) -> dict[str, Any]:
        """Options naming a server file (`replay_path`, `eval_doc_qa`) may name only files under
        settings.synth_docs_dir, like synth's folder: no admin option reads any file on the server."""
        from training.synth import allowed_docs_file

        out = dict(options)
        for key in ("replay_path", "eval_doc_qa"):
            if out.get(key) is not None:
                out[key] = str(allowed_docs_file(self.settings.synth_docs_dir, out[key]))
        return out

    def cancel_job(self, user: User | None, job_id: int) -> dict[str, Any]:
        admin = require_admin(user)
        return self.jobs.cancel(job_id, by=admin.username).to_dict()

    def list_jobs(self, user: User | None, limit: int = 20) -> list[dict[str, Any]]:
        require_admin(user)
        return [j.to_dict() for j in self.jobs.list(limit=max(1, min(limit, 500)))]

    def job_detail(self, user: User | None, job_id: int, since_event: int = 0,
                   log_lines: int = 200) -> dict[str, Any]:
        require_admin(user)
        job = self.jobs.get(job_id)
        return {"job": job.to_dict(), "events": [e.to_dict() for e in self.jobs.events(job_id, since_event)],
                "loss_curve": self.jobs.loss_curve(job_id),
                "log": self.jobs.log_tail(job_id, max(1, min(log_lines, 5000)))}

    # ------------------------------------------------------------------ adapters
    def list_adapters(self, user: User | None) -> dict[str, Any]:
        require_admin(user)
        reg = self.registry
        serving = reg.serving()
        try:
            target = reg.rollback_target()
            can_roll_back = True
        except RegistryError:
            target, can_roll_back = None, False
        protected = reg.protected()
        return {"serving": serving, "rollback_target": target, "can_roll_back": can_roll_back,
                "versions": [{**v.to_dict(), "serving": v.name == serving, "protected": v.name in protected}
                             for v in reg.list()],
                "history": [e.to_dict() for e in reg.history(limit=50)]}

    def report(self, user: User | None, name: str) -> dict[str, Any]:
        require_admin(user)
        v = self.registry.get(name)
        md = v.eval_dir / "report.md"
        return {"name": name, "gate": v.gate, "report": v.report(),
                "markdown": md.read_text(encoding="utf-8") if md.is_file() else None,
                "plot": str(v.eval_dir / "report.png") if (v.eval_dir / "report.png").is_file() else None}

    def report_plot(self, user: User | None, name: str) -> Path:
        require_admin(user)
        p = self.registry.get(name).eval_dir / "report.png"
        if not p.is_file():
            raise LookupError(f"adapter {name} has no evaluation plot")
        return p

    def promote(self, user: User | None, name: str, force: bool = False, reason: str | None = None) -> dict[str, Any]:
        admin = require_admin(user)
        res = self.registry.promote(name, self.services, actor=admin.username, reason=reason, force=force)
        return {"serving": res.version, "previous": res.previous, "event_id": res.event_id,
                "hot_swapped": res.loaded, "seconds": res.seconds}

    def rollback(self, user: User | None, reason: str | None = None) -> dict[str, Any]:
        admin = require_admin(user)
        res = self.registry.rollback(self.services, actor=admin.username, reason=reason)
        return {"serving": res.version, "previous": res.previous, "event_id": res.event_id,
                "hot_swapped": res.loaded, "seconds": res.seconds}

    # ------------------------------------------------------------------ LoRA adapters of the model server
    def load_lora_adapter(self, user: User | None, name: str, path: str) -> str:
        """vLLM's dynamic LoRA contract: load the folder `path` (on this server) under a NEW name.

        A name that is already served is refused, as vLLM does: roll out a new version under a new
        name, switch callers, then unload the old one (`runtime.OpenAIBackend` does exactly that)."""
        require_admin(user)
        root, folder = self.settings.adapters_dir.resolve(), Path(path).resolve()
        if not folder.is_relative_to(root):
            # An admin account is not a shell on the machine: only this server's own adapter folders load.
            raise PermissionError(f"adapters load only from the adapters folder ({root})")
        if folder.is_relative_to(self.settings.personal_adapters_dir.resolve()):
            # A personal adapter may hold its owner's private documents: only its owner is ever served it,
            # by the chat service, never under a name anyone can ask for.
            raise PermissionError("a user's personal adapter can't be loaded under a shared name")
        backend = self.services.backend
        if backend.has_adapter(name):
            raise ValueError(f"the lora adapter {name!r} has already been loaded; use a new name")
        backend.load_adapter(name, Path(path))  # ValueError: bad name; AdapterLoadError: bad folder
        return f"Success: LoRA adapter '{name}' added successfully."

    def unload_lora_adapter(self, user: User | None, name: str) -> str:
        """Unload `name` once its last request has finished. The adapter the chat serves is refused."""
        require_admin(user)
        if name == self.services.chat.serving_adapter:
            raise AdapterInUse(f"{name!r} is the serving adapter; promote or roll back to another one first")
        self.services.backend.unload_adapter(name)  # UnknownAdapter (404) when not loaded
        return f"Success: LoRA adapter '{name}' removed successfully."

    # ------------------------------------------------------------------ schedule
    def get_schedule(self, user: User | None) -> dict[str, Any]:
        require_admin(user)
        from memory.db import utcnow

        ls = load_loop_settings(self.store)
        go, why = due(ls, loop_state(self.store), utcnow())
        sched = self.services.scheduler
        return {"settings": ls.to_dict(), "help": LoopSettings.help(), "due": go, "reason": why,
                "scheduler_running": bool(sched and sched.running),
                "last_check": sched.last_check if sched else None}

    def set_schedule(self, user: User | None, changes: dict[str, Any]) -> dict[str, Any]:
        admin = require_admin(user)
        return save_loop_settings(self.store, changes, by=admin.username).to_dict()


# ------------------------------------------------------------------------------------------ HTTP
class StrictBody(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BuildIn(StrictBody):
    model_config = ConfigDict(extra="forbid", **examples({"options": {"replay_ratio": 0.5}}))
    options: dict[str, Any] = Field(default_factory=dict)


class SynthIn(StrictBody):
    model_config = ConfigDict(extra="forbid", **examples({"max_chunks": 8, "questions_per_chunk": 2}))
    max_chunks: int = 8
    questions_per_chunk: int = 2
    docs: str | None = None


class PromoteIn(StrictBody):
    model_config = ConfigDict(extra="forbid", **examples({"reason": "better on held-out grounding"}))
    force: bool = False
    reason: str | None = Field(None, max_length=2000)


class RollbackIn(StrictBody):
    model_config = ConfigDict(extra="forbid", **examples({"reason": "users report worse answers"}))
    reason: str | None = Field(None, max_length=2000)


class LoadLoraIn(BaseModel):  # vLLM's body; vLLM ignores fields it does not know, so do we
    model_config = examples({"lora_name": "v0003", "lora_path": "/home/me/.assistant/adapters/v0003"})
    lora_name: str = Field(min_length=1, max_length=128)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoraIn(BaseModel):
    model_config = examples({"lora_name": "v0001"})
    lora_name: str = Field(min_length=1, max_length=128)


def require_admin_key(request: Request) -> User:
    """401 without a valid key, 403 for a non-admin; runs before any body is looked at."""
    user = user_from_key(request)
    if not user.is_admin:
        raise ApiError(403, "this needs an admin account", "forbidden")
    return user


Admin = Annotated[User, Depends(require_admin_key)]


def _actions(request: Request) -> AdminActions:
    return request.app.state.admin


Actions = Annotated[AdminActions, Depends(_actions)]


JOB_EXAMPLE = {"id": 3, "state": "running", "phase": "sft", "progress": 0.4}


def body_example(body: dict[str, Any]) -> dict[str, Any]:
    """A request example for a route whose body is a free-form object (options, settings)."""
    return {"requestBody": {"content": {"application/json": {"example": body}}}}


def build_admin_router() -> APIRouter:
    r = APIRouter(prefix="/v1/admin", dependencies=[Depends(require_admin_key)])

    @r.get("/counts", summary="What feedback and data there is", responses=example(
        {"conversations": 120, "messages": 480, "thumbs_up": 40, "thumbs_down": 12, "edits": 9, "pairs": 5}))
    def counts(user: Admin, a: Actions) -> dict:
        return call_action(a.counts, user)

    @r.get("/datasets", summary="Dataset snapshots", responses=example({"data": [{"name": "v0004", "rows": 212}]}))
    def datasets(user: Admin, a: Actions) -> dict:
        return {"data": call_action(a.list_datasets, user)}

    @r.post("/datasets", summary="Build a dataset snapshot", responses=example({"name": "v0005", "rows": 230}))
    def build(body: BuildIn, user: Admin, a: Actions) -> dict:
        return call_action(a.build_dataset, user, body.options)

    @r.get("/datasets/{name}/preview", summary="Rows of a snapshot",
           responses=example({"rows": [{"messages": [{"role": "user", "content": "Hi"}]}], "total": 212}))
    def preview(name: str, user: Admin, a: Actions, kind: str = "sft", split: str = "train", limit: int = 20,
                offset: int = 0) -> dict:
        return call_action(a.preview_dataset, user, name, kind, split, limit, offset)

    @r.post("/synth", summary="Teacher pairs from the documents", responses=example({"accepted": 12, "rejected": 3}))
    def synth(body: SynthIn, user: Admin, a: Actions) -> dict:
        return call_action(a.synth, user, body.max_chunks, body.questions_per_chunk, body.docs)

    @r.post("/jobs", status_code=202, summary="Start a retrain",
           openapi_extra=body_example({"stages": ["sft", "dpo"]}),
           responses=example({"id": 3, "state": "queued"}, 202))
    def start(body: dict[str, Any], user: Admin, a: Actions) -> dict:
        return call_action(a.start_retrain, user, body)

    @r.get("/jobs", summary="Retraining jobs", responses=example({"data": [JOB_EXAMPLE]}))
    def jobs(user: Admin, a: Actions, limit: int = 20) -> dict:
        return {"data": call_action(a.list_jobs, user, limit)}

    @r.get("/jobs/{job_id}", summary="One job with its progress events and log",
           responses=example({**JOB_EXAMPLE, "events": [], "log": []}))
    def job(job_id: int, user: Admin, a: Actions, since_event: int = 0, log_lines: int = 200) -> dict:
        return call_action(a.job_detail, user, job_id, since_event, log_lines)

    @r.post("/jobs/{job_id}/cancel", summary="Cancel a job", responses=example({"id": 3, "state": "cancelling"}))
    def cancel(job_id: int, user: Admin, a: Actions) -> dict:
        return call_action(a.cancel_job, user, job_id)

    @r.get("/adapters", summary="Adapter versions and the serving one",
           responses=example({"serving": "v0002", "versions": [{"name": "v0002", "gate": "passed"}]}))
    def adapters(user: Admin, a: Actions) -> dict:
        return call_action(a.list_adapters, user)

    @r.get("/adapters/{name}/report", summary="A candidate's evaluation report",
           responses=example({"name": "v0003", "passed": False, "reason": "held-out grounding fell 0.08"}))
    def report(name: str, user: Admin, a: Actions) -> dict:
        return call_action(a.report, user, name)

    @r.get("/adapters/{name}/report.png", summary="The report's plot", response_class=FileResponse,
           responses=example("(PNG bytes)", media="image/png"))
    def report_png(name: str, user: Admin, a: Actions) -> FileResponse:
        return FileResponse(call_action(a.report_plot, user, name), media_type="image/png")

    @r.post("/adapters/{name}/promote", summary="Serve this version",
            responses=example({"serving": "v0003", "previous": "v0002"}))
    def promote(name: str, body: PromoteIn, user: Admin, a: Actions) -> dict:
        return call_action(a.promote, user, name, body.force, body.reason)

    @r.post("/rollback", summary="Serve the previous version again",
            responses=example({"serving": "v0002", "previous": "v0003"}))
    def rollback(body: RollbackIn, user: Admin, a: Actions) -> dict:
        return call_action(a.rollback, user, body.reason)

    @r.get("/schedule", summary="Automatic retraining settings",
           responses=example({"enabled": False, "trigger": "feedback", "min_feedback": 50}))
    def get_schedule(user: Admin, a: Actions) -> dict:
        return call_action(a.get_schedule, user)

    @r.put("/schedule", summary="Change automatic retraining",
           openapi_extra=body_example({"enabled": True}),
           responses=example({"settings": {"enabled": True, "trigger": "feedback", "min_feedback": 50}}))
    def set_schedule(body: dict[str, Any], user: Admin, a: Actions) -> dict:
        return {"settings": call_action(a.set_schedule, user, body)}

    return r


def build_lora_router() -> APIRouter:
    """vLLM's runtime LoRA endpoints (`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`), admin only,
    so that `runtime.OpenAIBackend` drives this server as it drives vLLM. Plain-text answers, as vLLM."""
    r = APIRouter(prefix="/v1", dependencies=[Depends(require_admin_key)])

    @r.post("/load_lora_adapter", response_class=PlainTextResponse, summary="Load an adapter (vLLM's contract)",
            responses=example("Success: LoRA adapter 'v0003' added successfully.", media="text/plain"))
    def load_lora(body: LoadLoraIn, user: Admin, a: Actions) -> str:
        return call_action(a.load_lora_adapter, user, body.lora_name, body.lora_path)

    @r.post("/unload_lora_adapter", response_class=PlainTextResponse, summary="Unload an adapter",
            responses=example("Success: LoRA adapter 'v0001' removed successfully.", media="text/plain"))
    def unload_lora(body: UnloadLoraIn, user: Admin, a: Actions) -> str:
        return call_action(a.unload_lora_adapter, user, body.lora_name)

    return r


def install_admin(app: FastAPI, services: Any) -> AdminActions:
    """Add the admin routes to `app` and keep the actions in ``services.admin`` (the UI uses them)."""
    actions = services.admin
    if actions is None:
        actions = services.admin = AdminActions(services)
    app.state.admin = actions
    app.include_router(build_admin_router())
    app.include_router(build_lora_router())
    return actions
