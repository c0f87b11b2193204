"""The adapter registry: every trained adapter version, which one serves, promote and roll back.

In: a `Settings` (its `adapters_dir`) and the `Store` (whose database holds the record). Out:
`AdapterVersion` records and the serving version's name.

Each version is a folder ``<adapters_dir>/<name>/``::

    adapter/               the PEFT adapter exactly as training wrote it (what the backend loads),
                           with train_config.json, dataset_manifest.json, training_result.json inside
    eval/                  the evaluation report (report.json, report.md, report.png)
    version.json           name, parent, created_at, job, gate decision and the sha256 of every file

The database is the source of truth: table ``adapter_versions`` (one row per version, with the
sha256 of every file recorded at registration) and ``adapter_serving`` (an append-only history of
promote / rollback events; the serving version is the last event's). A folder is published with a
rename and its row inserted in the same transaction, and a promotion is one inserted row, so a crash
at any point leaves either the old state or the new one.

Hot-swap (`promote`, `rollback`, `sync_serving`): verify the files against the recorded hashes ->
``backend.load_adapter(name, path)`` beside the adapters already loaded -> record the event ->
``chat.set_serving(name)``. Requests resolve the serving alias when they start, so the ones in flight
finish on their adapter; versions that are neither serving nor the rollback target are unloaded
later (`unload_retired`), after a grace period long enough for those requests to finish.

Rollback semantics: promotions form a stack; ``rollback`` pops it, returning to whatever served
before the current version (possibly the base model), so repeated rollbacks walk back in history.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from assistant.config import Settings
from memory.db import utcnow, write_transaction
from memory.schema import adapter_serving, adapter_versions
from memory.store import Store

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from assistant.chat import ChatService
    from assistant.runtime import Backend
    from assistant.services import Services

log = logging.getLogger("assistant.registry")

ADAPTER_SUBDIR = "adapter"
EVAL_SUBDIR = "eval"
VERSION_FILE = "version.json"
GATE_STATES = ("passed", "failed", "skipped")
_NAME_RE = re.compile(r"^v\d{4,}$")
_PERSONAL_NAME_RE = re.compile(r"^u(\d+)-v\d{4,}$")


def personal_owner(name: str | None) -> int | None:
    """The user a personal version name (``u<user_id>-vNNNN``) belongs to; None for a shared name."""
    m = _PERSONAL_NAME_RE.match(name or "")
    return int(m.group(1)) if m else None

class RegistryError(ValueError):
    """A registry request that cannot be done (unknown version, nothing to roll back to...)."""


class UnknownVersion(RegistryError, LookupError):
    """No adapter version of that name (or it was deleted)."""


class CorruptAdapter(RegistryError):
    """An adapter's files no longer match the hashes recorded when it was registered."""


# ------------------------------------------------------------------------------------------ records
@dataclass(frozen=True)
class AdapterVersion:
    name: str
    path: Path  # the version folder; the PEFT adapter is `adapter_dir`
    parent: str | None  # the version that served when this one was trained (None = base model)
    files: dict[str, str]  # path inside adapter/ -> sha256, recorded at registration
    gate: str  # "passed" | "failed" | "skipped"
    metrics: dict[str, Any]  # headline numbers from the evaluation report
    created_at: datetime
    job_id: int | None = None
    dataset: str | None = None
    note: str | None = None
    deleted_at: datetime | None = None

    @property
    def adapter_dir(self) -> Path:
        return self.path / ADAPTER_SUBDIR

    @property
    def eval_dir(self) -> Path:
        return self.path / EVAL_SUBDIR

    def report(self) -> dict[str, Any] | None:
        """The saved evaluation report (report.json), or None if the version has none."""
        p = self.eval_dir / "report.json"
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "parent": self.parent, "gate": self.gate, "metrics": self.metrics,
                "created_at": self.created_at.isoformat(), "job_id": self.job_id, "dataset": self.dataset,
                "note": self.note, "deleted": self.deleted_at is not None, "files": dict(self.files)}


@dataclass(frozen=True)
class ServingEvent:
    id: int
    action: str  # "promote" | "rollback"
    version: str | None  # what serves after this event (None = base model)
    previous: str | None
    actor: str | None
    reason: str | None
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "action": self.action, "version": self.version, "previous": self.previous,
                "actor": self.actor, "reason": self.reason, "created_at": self.created_at.isoformat()}


@dataclass
class SwapResult:
    """What a promote / rollback did."""

    version: str | None
    previous: str | None
    event_id: int
    loaded: bool  # whether the running backend now serves it (False when no backend was given)
    seconds: float
    unloaded: list[str] = field(default_factory=list)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def hash_tree(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, keyed by its POSIX path relative to `folder`."""
    return {p.relative_to(folder).as_posix(): sha256_of(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _version(row: Any, root: Path) -> AdapterVersion:
    return AdapterVersion(name=row.name, path=root / row.name, parent=row.parent, files=dict(row.files or {}),
                          gate=row.gate, metrics=dict(row.metrics or {}), created_at=row.created_at,
                          job_id=row.job_id, dataset=row.dataset, note=row.note, deleted_at=row.deleted_at)


def _event(row: Any) -> ServingEvent:
    return ServingEvent(id=row.id, action=row.action, version=row.version, previous=row.previous,
                        actor=row.actor, reason=row.reason, created_at=row.created_at)


# ------------------------------------------------------------------------------------------ registry
class Registry:
    """Adapter versions on disk + their record in the store. Thread-safe within one process.

    `owner_id` None is the shared adapter everyone is served; a user id is that user's personal adapter
    (training/personal.py): versions named ``u<user_id>-vNNNN`` under ``<adapters_dir>/personal/<user_id>/``,
    rows and serving events recorded with that owner, and a promotion that points only that user's requests
    at it (``chat.set_personal``). Each owner's versions, history and rollback stack are its own.
    """

    def __init__(self, settings: Settings, store: Store, owner_id: int | None = None) -> None:
        self.settings = settings
        self.store = store
        self.owner_id = owner_id
        self.root = settings.adapters_dir if owner_id is None else settings.personal_adapters_dir / str(owner_id)
        self._name_re = _NAME_RE if owner_id is None else re.compile(rf"^u{owner_id}-v\d{{4,}}$")
        self._lock = threading.RLock()
        # name -> monotonic time it stopped being needed (for the unload grace period)
        self._retired_at: dict[str, float] = {}

    def _mine(self, table: sa.Table) -> Any:
        """The WHERE clause that keeps this registry's rows (the shared adapter's, or one user's)."""
        return table.c.owner_id.is_(None) if self.owner_id is None else table.c.owner_id == self.owner_id

    def _point(self, chat: ChatService, name: str | None) -> None:
        """Make the chat service serve `name` to this registry's users (everyone, or its owner)."""
        if self.owner_id is None:
            chat.set_serving(name)
        else:
            chat.set_personal(self.owner_id, name)

    def _pointed(self, chat: ChatService) -> str | None:
        return chat.serving_adapter if self.owner_id is None else chat.personal_adapter(self.owner_id)

    # ------------------------------------------------------------------ reading
    def get(self, name: str, *, include_deleted: bool = False) -> AdapterVersion:
        with self.store.engine.connect() as conn:
            row = conn.execute(sa.select(adapter_versions).where(adapter_versions.c.name == name,
                                                                  self._mine(adapter_versions))).first()
        if row is None or (row.deleted_at is not None and not include_deleted):
            raise UnknownVersion(f"adapter version {name!r} does not exist"
                                + (" (it was deleted)" if row is not None else ""))
        return _version(row, self.root)

    def list(self, *, include_deleted: bool = False) -> list[AdapterVersion]:
        """Newest first."""
        q = sa.select(adapter_versions).where(self._mine(adapter_versions)).order_by(adapter_versions.c.id.desc())
        if not include_deleted:
            q = q.where(adapter_versions.c.deleted_at.is_(None))
        with self.store.engine.connect() as conn:
            return [_version(r, self.root) for r in conn.execute(q)]

    def history(self, limit: int | None = None) -> list[ServingEvent]:
        """Serving events, oldest first (the last `limit` when given)."""
        q = sa.select(adapter_serving).where(self._mine(adapter_serving)).order_by(adapter_serving.c.id.desc())
        if limit is not None:
            q = q.limit(limit)
        with self.store.engine.connect() as conn:
            return [_event(r) for r in reversed(conn.execute(q).all())]

    def serving(self) -> str | None:
        """The recorded serving version (None = the base model)."""
        with self.store.engine.connect() as conn:
            row = conn.execute(sa.select(adapter_serving.c.version).where(self._mine(adapter_serving))
                               .order_by(adapter_serving.c.id.desc()).limit(1)).first()
        return row.version if row else None

    def _stack(self, conn: Connection) -> list[str | None]:
        """Replay the history: promote pushes, rollback pops. Bottom is always the base model (None)."""
        stack: list[str | None] = [None]
        for action, version in conn.execute(sa.select(adapter_serving.c.action, adapter_serving.c.version)
                                            .where(self._mine(adapter_serving)).order_by(adapter_serving.c.id)):
            if action == "promote":
                stack.append(version)
            elif len(stack) > 1:
                stack.pop()
        return stack

    def rollback_target(self) -> str | None:
        """What `rollback` would serve; RegistryError when the base model serves and nothing is below."""
        with self.store.engine.connect() as conn:
            stack = self._stack(conn)
        if len(stack) < 2:
            raise RegistryError("nothing to roll back to: the base model is serving and has no predecessor")
        return stack[-2]

    def protected(self) -> set[str]:
        """Versions that must never be deleted: the serving one, its parent and the rollback target."""
        with self.store.engine.connect() as conn:
            stack = self._stack(conn)
        keep: set[str | None] = {stack[-1]}
        if len(stack) > 1:
            keep.add(stack[-2])
        if stack[-1] is not None:
            try:
                keep.add(self.get(stack[-1], include_deleted=True).parent)
            except RegistryError:
                pass  # a serving name with no row cannot happen through this class; nothing to protect
        return {k for k in keep if k is not None}

    # ------------------------------------------------------------------ verification
    def verify(self, name_or_version: str | AdapterVersion) -> AdapterVersion:
        """Check every recorded file against its sha256; CorruptAdapter names what is wrong."""
        v = self.get(name_or_version) if isinstance(name_or_version, str) else name_or_version
        if not v.files:
            raise CorruptAdapter(f"adapter {v.name} has no recorded files; it cannot be verified")
        problems: list[str] = []
        for rel, expected in sorted(v.files.items()):
            p = v.adapter_dir / rel
            if not p.is_file():
                problems.append(f"{rel} is missing")
            elif (actual := sha256_of(p)) != expected:
                problems.append(f"{rel} has sha256 {actual[:12]}..., registered {expected[:12]}...")
        if problems:
            raise CorruptAdapter(
                f"adapter {v.name} is corrupt and will not be loaded: {'; '.join(problems)}. "
                f"Its folder is {v.adapter_dir}; restore it from a backup or promote another version.")
        return v

    # ------------------------------------------------------------------ registration
    def register(self, adapter_dir: Path | str, *, parent: str | None = None, gate: str = "skipped",
                 metrics: dict[str, Any] | None = None, report_dir: Path | str | None = None,
                 job_id: int | None = None, dataset: str | None = None, note: str | None = None,
                 move: bool = False) -> AdapterVersion:
        """Copy (or move) a trained PEFT adapter folder in as a new version named v0001, v0002...

        The folder must hold adapter_config.json and adapter weights. `report_dir` (the evaluation
        output) is copied into the version's eval/ folder. Nothing is published unless everything
        was copied and hashed.
        """
        src = Path(adapter_dir)
        if gate not in GATE_STATES:
            raise RegistryError(f"gate must be one of {GATE_STATES}, got {gate!r}")
        if not (src / "adapter_config.json").is_file():
            raise RegistryError(f"{src} is not a PEFT adapter folder (no adapter_config.json)")
        if not any((src / w).is_file() for w in ("adapter_model.safetensors", "adapter_model.bin")):
            raise RegistryError(f"{src} holds no adapter weights (adapter_model.safetensors)")
        try:
            json.loads((src / "adapter_config.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise RegistryError(f"{src}/adapter_config.json is not valid JSON: {e}") from e
        if parent is not None:
            (self if self.owner_id is None else Registry(self.settings, self.store)).get(parent, include_deleted=True)
        metrics = dict(metrics or {})
        json.dumps(metrics, allow_nan=False)  # refuse NaN/inf before anything is written

        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".staging-{uuid.uuid4().hex[:12]}"
        staging.mkdir()
        try:
            # A move within one filesystem is a rename: no copy of the weights.
            (shutil.move if move else shutil.copytree)(str(src), str(staging / ADAPTER_SUBDIR))
            if report_dir is not None and Path(report_dir).is_dir():
                shutil.copytree(report_dir, staging / EVAL_SUBDIR)
            files = hash_tree(staging / ADAPTER_SUBDIR)
            created = utcnow()
            with self._lock, write_transaction(self.store.engine) as conn:
                new_id = conn.execute(adapter_versions.insert().values(
                    name=f".pending-{staging.name}", parent=parent, files=files, gate=gate, metrics=metrics,
                    job_id=job_id, dataset=dataset, note=note, created_at=created,
                    owner_id=self.owner_id)).inserted_primary_key[0]
                name = f"v{new_id:04d}" if self.owner_id is None else f"u{self.owner_id}-v{new_id:04d}"
                conn.execute(adapter_versions.update().where(adapter_versions.c.id == new_id).values(name=name))
                _write_json(staging / VERSION_FILE, {
                    "name": name, "parent": parent, "gate": gate, "metrics": metrics, "job_id": job_id,
                    "dataset": dataset, "note": note, "created_at": created.isoformat(), "files": files})
                target = self.root / name
                if target.exists():
                    # A leftover from a crash between rename and commit of an earlier attempt.
                    shutil.rmtree(target)
                os.replace(staging, target)  # last step: if the commit fails below, the folder is an orphan
        except BaseException:
            if move and not src.exists() and (staging / ADAPTER_SUBDIR).exists():
                shutil.move(str(staging / ADAPTER_SUBDIR), str(src))  # give the caller its adapter back
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("registered adapter %s (gate %s, parent %s)", name, gate, parent)
        return self.get(name)

    def set_gate(self, name: str, gate: str, metrics: dict[str, Any] | None = None) -> AdapterVersion:
        if gate not in GATE_STATES:
            raise RegistryError(f"gate must be one of {GATE_STATES}, got {gate!r}")
        self.get(name)
        values: dict[str, Any] = {"gate": gate}
        if metrics is not None:
            values["metrics"] = metrics
        with write_transaction(self.store.engine) as conn:
            conn.execute(adapter_versions.update().where(adapter_versions.c.name == name).values(**values))
        return self.get(name)

    # ------------------------------------------------------------------ serving
    def promote(self, name: str, services: Services | None = None, *, actor: str | None = None,
                reason: str | None = None, force: bool = False) -> SwapResult:
        """Make `name` the serving version: verify, load beside the current one, record, switch.

        `services` (with `.backend` and `.chat`) is the running server's; without it only the record
        changes and a server picks it up through `sync_serving`. A version the gate failed needs
        `force=True`. Any failure leaves the previous version serving and recorded.
        """
        with self._lock:
            v = self.get(name)
            if v.gate == "failed" and not force:
                raise RegistryError(f"adapter {name} failed the evaluation gate; promote it with force=True "
                                    "if you are sure")
            self.verify(v)
            return self._switch("promote", name, services, actor, reason)

    def rollback(self, services: Services | None = None, *, actor: str | None = None,
                 reason: str | None = None) -> SwapResult:
        """Serve whatever served before the current version (see the module docstring)."""
        with self._lock:
            target = self.rollback_target()
            if target is not None:
                self.verify(target)
            return self._switch("rollback", target, services, actor, reason)

    def _switch(self, action: str, name: str | None, services: Services | None, actor: str | None,
                reason: str | None) -> SwapResult:
        t0 = time.perf_counter()
        backend = getattr(services, "backend", None)
        chat = getattr(services, "chat", None)
        loaded_now = False
        if backend is not None and name is not None and not backend.has_adapter(name):
            backend.load_adapter(name, self.get(name).adapter_dir)  # raises; nothing recorded yet
            loaded_now = True
        try:
            with write_transaction(self.store.engine) as conn:
                previous = conn.execute(sa.select(adapter_serving.c.version).where(self._mine(adapter_serving))
                                        .order_by(adapter_serving.c.id.desc()).limit(1)).scalar()
                if action == "rollback":
                    # Re-check inside the write lock: a concurrent promote may have moved the stack.
                    stack = self._stack(conn)
                    if len(stack) < 2 or stack[-2] != name:
                        raise RegistryError("the serving version changed during the rollback; try again")
                event_id = conn.execute(adapter_serving.insert().values(
                    action=action, version=name, previous=previous, actor=actor, reason=reason,
                    created_at=utcnow(), owner_id=self.owner_id)).inserted_primary_key[0]
        except BaseException:
            if loaded_now:
                backend.unload_adapter(name)
            raise
        if chat is not None:
            self._point(chat, name)
        if previous is not None and previous != name:
            self._retired_at.setdefault(previous, time.monotonic())
        if name is not None:
            self._retired_at.pop(name, None)
        log.warning("%s: now serving %s (was %s) by %s", action, name or "the base model",
                    previous or "the base model", actor or "system")
        return SwapResult(version=name, previous=previous, event_id=event_id, loaded=chat is not None,
                          seconds=round(time.perf_counter() - t0, 3))

    def restore_serving(self, services: Services) -> str | None:
        """Start-up: load the recorded serving version into the backend and point the chat at it.

        A serving version that fails verification is not loaded: the registry rolls back (recorded,
        actor "system") to the newest earlier version that verifies, or to the base model, and says so
        in the log, so the server starts serving something sound instead of not starting at all.
        """
        with self._lock:
            name = self.serving()
            while name is not None:
                try:
                    v = self.verify(name)
                    if not services.backend.has_adapter(name):
                        services.backend.load_adapter(name, v.adapter_dir)
                    self._point(services.chat, name)
                    return name
                except Exception as e:  # noqa: BLE001 - any load failure: fall back, record it, keep going
                    log.error("serving adapter %s cannot be restored: %s", name, e)
                    self._switch("rollback", self._safe_rollback_target(), None, "system",
                                 f"{name} could not be loaded at start-up: {e}")
                    name = self.serving()
            self._point(services.chat, None)
            return None

    def _safe_rollback_target(self) -> str | None:
        try:
            return self.rollback_target()
        except RegistryError:
            return None

    def sync_serving(self, services: Services) -> bool:
        """Make the running server serve what the store records (a CLI or another process may have
        promoted). Returns True when it switched."""
        with self._lock:
            recorded = self.serving()
            if recorded == self._pointed(services.chat):
                return False
            if recorded is not None:
                v = self.verify(recorded)
                if not services.backend.has_adapter(recorded):
                    services.backend.load_adapter(recorded, v.adapter_dir)
            previous = self._pointed(services.chat)
            self._point(services.chat, recorded)
            if previous is not None:
                self._retired_at.setdefault(previous, time.monotonic())
            log.warning("sync: now serving %s (recorded elsewhere)", recorded or "the base model")
            return True

    def unload_retired(self, backend: Backend, grace_s: float) -> list[str]:
        """Unload registry versions that are neither serving nor the rollback target and stopped being
        needed more than `grace_s` ago (requests that resolved them before the switch have finished)."""
        with self._lock:
            keep = self.protected()
            now = time.monotonic()
            ours = {v.name for v in self.list(include_deleted=True)}
            out = []
            for name in backend.adapters():
                if name not in ours or name in keep:
                    self._retired_at.pop(name, None)
                    continue
                since = self._retired_at.setdefault(name, now)
                if now - since >= grace_s:
                    backend.unload_adapter(name)
                    self._retired_at.pop(name, None)
                    out.append(name)
            return out

    # ------------------------------------------------------------------ pruning
    def prune(self, keep_last: int) -> list[str]:
        """Delete all but the newest `keep_last` versions, never a protected one (serving, its parent,
        the rollback target). Rows stay (marked deleted) so history and reports keep their names."""
        if keep_last < 1:
            raise RegistryError("keep_last must be at least 1")
        with self._lock:
            protected = self.protected()
            live = self.list()
            doomed = [v for v in live[keep_last:] if v.name not in protected]
            for v in doomed:
                with write_transaction(self.store.engine) as conn:
                    conn.execute(adapter_versions.update().where(adapter_versions.c.name == v.name)
                                 .values(deleted_at=utcnow()))
                # Rename first, so a half-deleted folder is never mistaken for a version.
                trash = self.root / f".deleted-{v.name}-{uuid.uuid4().hex[:6]}"
                if v.path.exists():
                    os.replace(v.path, trash)
                    shutil.rmtree(trash)
            return [v.name for v in doomed]

    def clean_orphans(self) -> list[str]:
        """Remove staging folders and version folders without a row (left by a crash mid-register)."""
        known = {v.name for v in self.list(include_deleted=True)}
        removed = []
        if not self.root.is_dir():
            return removed
        for p in self.root.iterdir():
            if p.is_dir() and (p.name.startswith((".staging-", ".deleted-"))
                               or (self._name_re.match(p.name) and p.name not in known)):
                shutil.rmtree(p)
                removed.append(p.name)
        return removed

    def disk_bytes(self) -> int:
        """Bytes this registry's folder holds on disk."""
        return folder_bytes(self.root)

    def delete_all(self, backend: Backend | None = None) -> dict[str, int]:
        """A personal registry only: unload, then delete every version (folders and rows) and its serving history.

        For "forget what you learned from me" and for deleting a user; the shared registry refuses."""
        if self.owner_id is None:
            raise RegistryError("the shared adapter's versions are not deleted wholesale")
        with self._lock:
            names = [v.name for v in self.list(include_deleted=True)]
            if backend is not None:
                for name in names:
                    if backend.has_adapter(name):
                        backend.unload_adapter(name)
            freed = self.disk_bytes()
            with write_transaction(self.store.engine) as conn:
                events = conn.execute(adapter_serving.delete().where(self._mine(adapter_serving))).rowcount
                rows = conn.execute(adapter_versions.delete().where(self._mine(adapter_versions))).rowcount
            if self.root.exists():
                trash = self.root.with_name(f".deleted-{self.root.name}-{uuid.uuid4().hex[:6]}")
                os.replace(self.root, trash)
                shutil.rmtree(trash)
            self._retired_at.clear()
            return {"versions": int(rows), "serving_events": int(events), "bytes": freed}


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under `folder` (0 when it does not exist)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def restore_serving(services: Services) -> str | None:
    """Server start-up hook: load and serve the recorded serving version (see `Registry.restore_serving`).

    Uses ``services.registry``, the one the admin routes share.
    """
    registry: Registry = services.registry
    registry.clean_orphans()
    return registry.restore_serving(services)
