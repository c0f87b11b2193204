"""Dataset snapshots on disk: the folder layout, writing it atomically, and reading it back.

In: rows (plain dicts in TRL's conversational formats plus flat provenance columns) from
`training.dataset_build`, and a `Settings` for `settings.datasets_dir`.
Out: the layout below, and the readers trainers, evaluation and the admin view use:
`list_snapshots`, `latest_snapshot`, `read_manifest`, `load_split`, `prune_snapshots`.

    <datasets_dir>/vNNNN/manifest.json            counts, filters, hashes, options (dataset_build writes it)
    <datasets_dir>/vNNNN/{sft,dpo,kto}/            `datasets` DatasetDict (train/validation/test), save_to_disk
    <datasets_dir>/vNNNN/jsonl/<kind>.<split>.jsonl
    <datasets_dir>/vNNNN/heldout/<kind>.jsonl      copy of the frozen held-out set (+ heldout/ as a DatasetDict)
    <datasets_dir>/heldout/                        the frozen held-out set itself (meta.json + <kind>.jsonl)
    <datasets_dir>/LATEST                          name of the newest complete snapshot

A snapshot folder is reserved by an atomic `mkdir` of the next `vNNNN`, filled elsewhere, and moved
over the empty reserved folder at the end, so readers never see half a snapshot: a folder without
`manifest.json` is not a snapshot.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from assistant.config import Settings

KINDS = ("sft", "dpo", "kto")
SPLITS = ("train", "validation", "test")
TRL_COLUMNS = {
    "sft": ["messages"],
    "dpo": ["prompt", "chosen", "rejected"],
    "kto": ["prompt", "completion", "label"],
}
PROVENANCE_COLUMNS = ["source", "origin", "group", "conversation_id", "message_id", "other_message_id",
                      "feedback_id", "adapter", "doc_id", "chunk_id", "synthetic_id"]
HELDOUT_DIR = "heldout"
LATEST_FILE = "LATEST"


# ---------------------------------------------------------------------------------------------- files


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> str:
    """Write rows as JSONL (atomically) and return the file's sha256."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    h = hashlib.sha256()
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            line = json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n"
            f.write(line)
            h.update(line.encode("utf-8"))
    os.replace(tmp, path)
    return h.hexdigest()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- datasets


def features_for(kind: str) -> Any:
    """The `datasets.Features` of one kind: TRL's columns plus the provenance columns."""
    from datasets import Features, List, Value

    msg = List({"role": Value("string"), "content": Value("string")})
    prov = {"source": Value("string"), "origin": Value("string"), "group": Value("string"),
            "conversation_id": Value("int64"), "message_id": Value("int64"), "other_message_id": Value("int64"),
            "feedback_id": Value("int64"), "adapter": Value("string"), "doc_id": Value("string"),
            "chunk_id": Value("string"), "synthetic_id": Value("int64")}
    if kind == "sft":
        return Features({"messages": msg, **prov})
    if kind == "dpo":
        return Features({"prompt": msg, "chosen": msg, "rejected": msg, **prov})
    return Features({"prompt": msg, "completion": msg, "label": Value("bool"), **prov})


def as_dataset(rows: list[dict[str, Any]], kind: str) -> Any:
    import pyarrow as pa
    from datasets import Dataset, DatasetInfo

    features = features_for(kind)
    # Straight to Arrow with the features' schema: `Dataset.from_dict` encodes row by row in Python,
    # and column-wise an empty split still gets its schema (from_list([]) would have no columns).
    table = pa.Table.from_pydict({name: [r[name] for r in rows] for name in features}, schema=features.arrow_schema)
    return Dataset(table, info=DatasetInfo(features=features))


def save_splits(path: Path, splits: dict[str, list[dict[str, Any]]], kind: str) -> None:
    """One kind's splits as a DatasetDict folder."""
    from datasets import DatasetDict

    _save_dict(path, DatasetDict({name: as_dataset(rows, kind) for name, rows in splits.items()}))


def save_heldout(path: Path, rows: dict[str, list[dict[str, Any]]]) -> None:
    """The held-out set as a DatasetDict with one entry per kind."""
    from datasets import DatasetDict

    _save_dict(path, DatasetDict({k: as_dataset(rows[k], k) for k in KINDS}))


def _save_dict(path: Path, dd: Any) -> None:
    # One shard per split: `datasets` writes an empty split as zero shards, which it then cannot load.
    with _quiet_datasets():
        dd.save_to_disk(str(path), num_shards=dict.fromkeys(dd, 1))


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No per-split "Saving the dataset" bars: the CLI shows one bar for the whole build."""
    from datasets.utils import logging as ds_logging

    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()


# ---------------------------------------------------------------------------------------------- snapshots


def reserve_version(root: Path) -> tuple[str, Path]:
    """Create the next `vNNNN` folder atomically (mkdir fails if another build took the number)."""
    existing = [int(p.name[1:]) for p in root.glob("v[0-9]*") if p.name[1:].isdigit()]
    n = max(existing, default=0) + 1
    while True:
        path = root / f"v{n:04d}"
        try:
            path.mkdir()
            return path.name, path
        except FileExistsError:
            n += 1


def write_pointer(root: Path, version: str) -> None:
    """Point LATEST at `version` (atomic replace)."""
    tmp = root / f".{LATEST_FILE}.tmp-{os.getpid()}"
    tmp.write_text(version + "\n", encoding="utf-8")
    os.replace(tmp, root / LATEST_FILE)


def list_snapshots(settings: Settings) -> list[Path]:
    """Complete snapshots (those with a manifest), oldest first."""
    root = settings.datasets_dir
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("v[0-9]*") if (p / "manifest.json").is_file())


def latest_snapshot(settings: Settings) -> Path | None:
    pointer = settings.datasets_dir / LATEST_FILE
    if pointer.is_file():
        path = settings.datasets_dir / pointer.read_text(encoding="utf-8").strip()
        if (path / "manifest.json").is_file():
            return path
    snaps = list_snapshots(settings)
    return snaps[-1] if snaps else None


def prune_snapshots(settings: Settings, keep: int) -> list[str]:
    """Delete all but the newest `keep` snapshots (never the one LATEST names); returns the removed names.

    Old snapshots hold data as it was when they were built, including conversations deleted since;
    pruning is how that data leaves the disk. The frozen held-out set is cleaned at every build instead.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    snaps = list_snapshots(settings)
    latest = latest_snapshot(settings)
    removed = []
    for path in snaps[:-keep]:
        if latest is not None and path == latest:
            continue
        shutil.rmtree(path)
        removed.append(path.name)
    return removed


def read_manifest(snapshot: Path) -> dict[str, Any]:
    return json.loads((Path(snapshot) / "manifest.json").read_text(encoding="utf-8"))


def load_split(snapshot: Path, kind: str, split: str = "train", *, trl_only: bool = True) -> Any:
    """One split (or "heldout") as a `datasets.Dataset`; with `trl_only`, only the columns TRL trains on."""
    from datasets import load_from_disk

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if split not in (*SPLITS, "heldout"):
        raise ValueError(f"split must be one of {SPLITS} or 'heldout', got {split!r}")
    name = HELDOUT_DIR if split == "heldout" else kind
    ds = load_from_disk(str(Path(snapshot) / name))
    ds = ds[kind] if split == "heldout" else ds[split]
    return ds.select_columns(TRL_COLUMNS[kind]) if trl_only else ds
