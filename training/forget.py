"""Take a deleted user's rows out of every dataset already on disk.

In: a `Settings` (for `settings.datasets_dir`) and what was deleted: conversation ids, document ids
and synthetic pair ids. Out: `purge_rows(...) -> PurgeReport`, after which no snapshot and no frozen
held-out set holds a row that came from them.

Why: a later build leaves a deleted conversation out by itself (it is gone from the store), but the
snapshots built before, and the frozen held-out set until the next build, still hold its rows. When a
whole account is deleted those copies go at once: each affected JSONL file is rewritten, its
`datasets` folder saved again from the rewritten rows, and the manifest's counts and hashes updated
(with `removed_after_build` saying how many rows left). Snapshots without such rows are not touched.

Called by the user-deletion action (assistant/actions/users.py).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from assistant.config import Settings
from training.snapshots import (
    HELDOUT_DIR,
    KINDS,
    SPLITS,
    list_snapshots,
    read_jsonl,
    read_manifest,
    save_heldout,
    save_splits,
    write_json,
    write_jsonl,
)


@dataclass(frozen=True)
class Deleted:
    """What was deleted; a dataset row that came from any of these must go."""

    conversation_ids: frozenset[int] = frozenset()
    doc_ids: frozenset[str] = frozenset()
    synthetic_ids: frozenset[int] = frozenset()

    def matches(self, row: dict[str, Any]) -> bool:
        return (row.get("conversation_id") in self.conversation_ids or row.get("doc_id") in self.doc_ids
                or row.get("synthetic_id") in self.synthetic_ids)

    def __bool__(self) -> bool:
        return bool(self.conversation_ids or self.doc_ids or self.synthetic_ids)


@dataclass
class PurgeReport:
    rows: int = 0  # rows removed, over every file
    snapshots: list[str] = field(default_factory=list)  # snapshots rewritten
    heldout: int = 0  # rows removed from the frozen held-out set

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "snapshots": self.snapshots, "heldout": self.heldout}


def _filter(path: Path, deleted: Deleted) -> tuple[list[dict[str, Any]], int]:
    rows = read_jsonl(path)
    kept = [r for r in rows if not deleted.matches(r)]
    return kept, len(rows) - len(kept)


def _replace_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Write a folder beside `target` and swap it in, so a reader never sees half of one."""
    tmp = target.with_name(f".{target.name}.purge-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def _purge_kind(snapshot: Path, kind: str, deleted: Deleted, hashes: dict[str, str]) -> int:
    splits: dict[str, list[dict[str, Any]]] = {}
    removed = 0
    for s in SPLITS:
        splits[s], n = _filter(snapshot / "jsonl" / f"{kind}.{s}.jsonl", deleted)
        removed += n
    if removed:
        for s in SPLITS:
            hashes[f"jsonl/{kind}.{s}.jsonl"] = write_jsonl(snapshot / "jsonl" / f"{kind}.{s}.jsonl", splits[s])
        if (snapshot / kind).exists():
            _replace_dir(snapshot / kind, lambda tmp: save_splits(tmp, splits, kind))
    return removed


def _purge_snapshot_heldout(snapshot: Path, deleted: Deleted, hashes: dict[str, str]) -> int:
    folder = snapshot / HELDOUT_DIR
    rows: dict[str, list[dict[str, Any]]] = {}
    removed = 0
    for k in KINDS:
        rows[k], n = _filter(folder / f"{k}.jsonl", deleted)
        removed += n
    if removed:
        def write(tmp: Path) -> None:
            save_heldout(tmp, rows)
            for k in KINDS:
                hashes[f"{HELDOUT_DIR}/{k}.jsonl"] = write_jsonl(tmp / f"{k}.jsonl", rows[k])
        _replace_dir(folder, write)
    return removed


def _purge_snapshot(snapshot: Path, deleted: Deleted) -> int:
    manifest = read_manifest(snapshot)
    hashes: dict[str, str] = dict(manifest.get("hashes") or {})
    removed = sum(_purge_kind(snapshot, k, deleted, hashes) for k in KINDS)
    removed += _purge_snapshot_heldout(snapshot, deleted, hashes)
    if removed:
        manifest["hashes"] = hashes
        counts = manifest.get("counts") or {}
        for k in KINDS:
            if isinstance(counts.get(k), dict):
                counts[k] = {s: len(read_jsonl(snapshot / "jsonl" / f"{k}.{s}.jsonl")) for s in SPLITS}
        manifest["removed_after_build"] = int(manifest.get("removed_after_build", 0)) + removed
        write_json(snapshot / "manifest.json", manifest)
    return removed


def _purge_frozen_heldout(root: Path, deleted: Deleted) -> int:
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        return 0
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    removed = 0
    hashes = dict(meta.get("hashes") or {})
    counts = dict(meta.get("counts") or {})
    for k in KINDS:
        rows, n = _filter(root / f"{k}.jsonl", deleted)
        if n:
            removed += n
            hashes[k] = write_jsonl(root / f"{k}.jsonl", rows)
            counts[k] = len(rows)
    if removed:
        meta.update(hashes=hashes, counts=counts, removed_deleted=int(meta.get("removed_deleted", 0)) + removed)
        write_json(meta_path, meta)
    return removed


def purge_rows(settings: Settings, deleted: Deleted) -> PurgeReport:
    """Remove every dataset row that came from `deleted`, in every snapshot and the frozen held-out set."""
    report = PurgeReport()
    if not deleted:
        return report
    report.heldout = _purge_frozen_heldout(settings.datasets_dir / HELDOUT_DIR, deleted)
    report.rows += report.heldout
    for snapshot in list_snapshots(settings):
        n = _purge_snapshot(snapshot, deleted)
        if n:
            report.rows += n
            report.snapshots.append(snapshot.name)
    return report
