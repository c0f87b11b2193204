"""Is there enough data to retrain? The check a job makes before it starts, and that admins can ask for.

In: the store, the settings (for the datasets folder and its frozen held-out set), the job's dataset
build overrides (the same plain dict a retrain takes) and its training stages.
Out: `Readiness`: what is there (rated answers, corrections, choices, teacher pairs; training and
held-out rows per stage), what a first retrain needs, and, when something is missing, plain sentences
saying what and how to get it. `check_readiness` reads the store and the held-out files and writes
nothing; the page, the HTTP API and the CLI all call it, and a retrain is refused with its reason
before anything slow runs.

Rows are counted as `training.dataset_build` makes them (`gather_examples`: the same sources, scrubbing,
quality filter and de-duplication; `assign_splits`: the same split by conversation, including the
small-data rule that puts at least one conversation in the test split), but without the general replay
rows, which are not feedback. The rules:

- Training needs at least `MIN_TRAIN_ROWS` rows from feedback or teacher pairs in the train split of
  the stages that will run: fewer teach the adapter nothing measurable.
- The gate needs at least `MIN_HELDOUT_ROWS` held-out rows (the frozen held-out set once there is one,
  before that the snapshot's test split), or it cannot judge the candidate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from training.dataset_build import (
    SMALL_DATA_MIN_GROUPS,
    BuildOptions,
    assign_splits,
    gather_examples,
    heldout_frozen,
)
from training.snapshots import HELDOUT_DIR, read_jsonl

if TYPE_CHECKING:
    from pathlib import Path

    from assistant.config import Settings
    from memory.knowledge import KnowledgeBase
    from memory.store import Store
    from training.dataset_build import Gathered

MIN_TRAIN_ROWS = 8
MIN_HELDOUT_ROWS = 2
TRAINED_KINDS = ("sft", "dpo", "kto")


@dataclass(frozen=True)
class Readiness:
    """What a retrain would have to work with, and whether that is enough."""

    ready: bool
    feedback: dict[str, int]  # thumbs_up, thumbs_down, edits, pairs, teacher_pairs, conversations
    rows: dict[str, dict[str, int]]  # stage -> {"train", "validation", "heldout"} rows (replay not counted)
    heldout_frozen: bool
    needs: dict[str, int]  # train_rows, heldout_rows
    missing: list[str] = field(default_factory=list)  # plain sentences; empty when ready
    summary: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_readiness(store: Store, settings: Settings, build: dict[str, Any] | BuildOptions | None = None,
                    stages: list[str] | tuple[str, ...] = ("sft", "dpo"),
                    knowledge: KnowledgeBase | None = None) -> Readiness:
    """Count what a retrain with these options would train and be judged on; see the module docstring."""
    options = build if isinstance(build, BuildOptions) else _build_options(build)
    root = settings.datasets_dir
    frozen = heldout_frozen(root, options)
    gathered = gather_examples(store, settings, options, knowledge)
    frozen_rows = _frozen_rows(root) if frozen else {}
    frozen_groups = {r.get("group") for rows in frozen_rows.values() for r in rows}
    groups = {ex.prov.group for rows in gathered.by_kind.values() for ex in rows}
    splits = assign_splits(groups, options, frozen=frozen)
    rows: dict[str, dict[str, int]] = {}
    for kind in TRAINED_KINDS:
        count = {"train": 0, "validation": 0, "heldout": len(frozen_rows.get(kind, []))}
        for ex in gathered.by_kind[kind]:
            split = splits[ex.prov.group]
            if split == "test":
                count["heldout"] += 0 if frozen else 1
            elif ex.prov.group not in frozen_groups:
                count[split] += 1
        rows[kind] = count
    feedback = _feedback_counts(gathered)
    train_rows = sum(rows[s]["train"] for s in stages if s in rows)
    # The gate reads SFT and DPO held-out rows whatever the stages (training/evaluate.py, load_eval_set).
    heldout_rows = rows["sft"]["heldout"] + rows["dpo"]["heldout"]
    missing = _missing_sentences(train_rows, heldout_rows, frozen, feedback)
    return Readiness(ready=not missing, feedback=feedback, rows=rows, heldout_frozen=frozen,
                     needs={"train_rows": MIN_TRAIN_ROWS, "heldout_rows": MIN_HELDOUT_ROWS},
                     missing=missing, summary=_summary(feedback, train_rows, heldout_rows, missing))


def _build_options(overrides: dict[str, Any] | None) -> BuildOptions:
    from training.loop import build_options  # the one place that turns plain overrides into BuildOptions

    return build_options(overrides)


def _frozen_rows(root: Path) -> dict[str, list[dict[str, Any]]]:
    """The frozen held-out rows as stored (read only: deleted rows drop out at the next build)."""
    out = {}
    for kind in TRAINED_KINDS:
        path = root / HELDOUT_DIR / f"{kind}.jsonl"
        out[kind] = read_jsonl(path) if path.is_file() else []
    return out


def _feedback_counts(gathered: Gathered) -> dict[str, int]:
    fb = gathered.log.feedback
    thumbs = [f for f in fb if f.kind == "thumb"]
    return {"thumbs_up": sum(1 for f in thumbs if (f.rating or 0) > 0),
            "thumbs_down": sum(1 for f in thumbs if (f.rating or 0) < 0),
            "edits": sum(1 for f in fb if f.kind == "edit"),
            "pairs": sum(1 for f in fb if f.kind == "pair"),
            "teacher_pairs": len(gathered.syn),
            "conversations": len({gathered.log.messages[f.message_id].conversation_id for f in fb
                                  if f.message_id in gathered.log.messages})}


def _missing_sentences(train_rows: int, heldout_rows: int, frozen: bool, feedback: dict[str, int]) -> list[str]:
    out = []
    if train_rows < MIN_TRAIN_ROWS:
        out.append(f"Training needs at least {MIN_TRAIN_ROWS} examples; there are {train_rows}. Rate answers "
                   "(thumbs up), correct bad ones, or pick the better of two regenerated answers; "
                   "or generate question-answer pairs from shared documents.")
    if heldout_rows < MIN_HELDOUT_ROWS:
        where = "in the frozen held-out set" if frozen else "set aside to test the new model on"
        hint = ("Keep collecting feedback: held-out examples come from whole conversations, about one in ten, "
                f"and at least one once {SMALL_DATA_MIN_GROUPS} conversations have feedback."
                if feedback["conversations"] < 10 else "Give feedback in a few more conversations.")
        out.append(f"Judging a new model needs at least {MIN_HELDOUT_ROWS} examples it never trained on; "
                   f"there are {heldout_rows} {where}. {hint}")
    return out


def _n(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _summary(feedback: dict[str, int], train_rows: int, heldout_rows: int, missing: list[str]) -> str:
    rated = feedback["thumbs_up"] + feedback["thumbs_down"]
    have = (f"{_n(rated, 'rated answer')}, {_n(feedback['edits'], 'correction')}, "
            f"{_n(feedback['pairs'], 'choice')}, {_n(feedback['teacher_pairs'], 'teacher pair')} in "
            f"{_n(feedback['conversations'], 'conversation')}: {_n(train_rows, 'training example')} and "
            f"{_n(heldout_rows, 'held-out example')}")
    if not missing:
        return f"Ready to retrain: {have}."
    return (f"Not ready to retrain: {have}; needs at least {MIN_TRAIN_ROWS} training and {MIN_HELDOUT_ROWS} "
            "held-out examples.")
