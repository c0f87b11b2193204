"""Build versioned SFT / DPO / KTO datasets from the conversation store and the teacher's pairs.

In: a `Store` (messages and feedback, plus the `synthetic_pairs` table), a `Settings` (for
`settings.datasets_dir`) and `BuildOptions`.
Out: a snapshot folder `<datasets_dir>/vNNNN/` (layout in training/snapshots.py: `datasets`
DatasetDicts per kind, JSONL copies, the held-out set, and `manifest.json` with counts per kind, split
and source, every filter and the rows it removed, PII found per kind, sha256 of every JSONL file and
the options used) and a `BuildResult`.

Formats are TRL's conversational ones: SFT `messages`; DPO `prompt`/`chosen`/`rejected`; KTO
`prompt`/`completion`/`label`. Every row also carries flat provenance columns (source human /
teacher / replay, origin, conversation, message, feedback, adapter, document, chunk, synthetic id);
trainers select the TRL columns with `TRL_COLUMNS[kind]`.

What becomes training data is decided in training/dataset_sources.py (SFT: rated-up answers, edits,
accepted teacher answers, replay; DPO: edit pairs, regenerate-and-choose, rated-down vs a better
answer, teacher best-vs-worst; KTO: thumbs). Replay rows go to the train split only.

Privacy by construction: prompts are rebuilt only from the `content` of user and assistant messages
that the user saw. System messages, retrieved sources and long-term memories stored with a message are
never read, so a memory the user deleted cannot come back through a stored prompt; and rows whose
messages mention a phrase the user told the assistant to forget (memory.longterm tombstones) are
dropped, in new builds and from the frozen held-out set alike. Every text is
PII-scrubbed, then quality-filtered, then de-duplicated (exact + MinHash near-duplicates, across all
splits, human data first) before anything is written. A deleted conversation is gone from the store
and so from every later build, and rows of it are dropped from the frozen held-out set too.

Splits are assigned by a salted hash of the group (`conv:<id>` or, for a teacher pair's rows,
`synthetic:<pair id>`), so they are stable across rebuilds and a conversation never spans two splits.
Teacher pairs are split one question at a time, not by document: each row carries its passage, and a
document-level split kept whole documents out of training (CHANGELOG.md, 2026-11-23). The frozen held-out set
is taken from the test split the first time there is enough data and reused afterwards; its groups
are excluded from train and validation in every later build, whatever the split ratios.

Command: `assistant data build` (training/cli.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from assistant.config import Settings
from memory.store import Store
from training.dataset_sources import (
    ChunkReader,
    Example,
    TrainingLog,
    forgotten_digests,
    human_examples,
    mentions_forgotten,
    read_training_log,
    replay_examples,
    teacher_examples,
    with_serving_context,
)
from training.fact_check import contradicts, echoes_question
from training.hygiene import Deduplicator, QualityLimits, Scrubbed, quality_problem, scrub_pii
from training.passage_rows import (
    PoolReader,
    SharedPool,
    abstain_examples,
    grounded,
    title_negatives,
    with_distractors,
)
from training.personal_data import (
    PrivacyError,
    by_question,
    check_privacy,
    drop_few_pairs,
    drop_heldout_context,
    forget_marks,
    heldout_outdated,
    personal_splits,
    restrict_log,
)
from training.snapshots import (
    HELDOUT_DIR,
    KINDS,
    SPLITS,
    TRL_COLUMNS,
    latest_snapshot,
    list_snapshots,
    load_split,
    prune_snapshots,
    read_jsonl,
    read_manifest,
    reserve_version,
    save_heldout,
    save_splits,
    write_json,
    write_jsonl,
    write_pointer,
)
from training.synth import SyntheticPairs

if TYPE_CHECKING:
    from memory.knowledge import KnowledgeBase

# The snapshot readers are re-exported: callers know them as training.dataset_build's.
__all__ = [
    "BuildError", "BuildOptions", "BuildResult", "FilterStats", "KINDS", "SPLITS", "TRL_COLUMNS",
    "build_datasets", "clean", "group_fraction", "latest_snapshot", "list_snapshots", "load_split",
    "prune_snapshots", "read_manifest", "split_of", "store_summary",
]

BUILDER_VERSION = 1
DEFAULT_REPLAY = Path(__file__).parent / "data" / "replay_general.jsonl"

ProgressFn = Callable[[str, float], None]


class BuildError(RuntimeError):
    """The build could not complete; nothing was published (no snapshot folder, LATEST unchanged)."""


# 2: the serving system prompt in every row and cited shared passages in the user turn (assistant.prompt).
PROMPT_FORMAT = 2
# Retrieval serves a handful of passages (settings.top_k); more distractors than that is no served prompt.
MAX_DISTRACTORS = 8

# ---------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class BuildOptions:
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    split_salt: str = "split-v1"  # changing it reshuffles every group; the held-out set stays frozen anyway
    context_messages: int = 6  # earlier user/assistant messages kept as context before the rated turn
    quality: QualityLimits = QualityLimits()
    near_dup_threshold: float = 0.85
    include_teacher: bool = True
    max_synthetic_share: float = 0.5  # of the train split, per kind
    synthetic_floor: int = 200  # teacher rows always allowed, so a fresh install can train on documents
    replay_path: Path | None = None  # None: the packaged general set (training/data/replay_general.jsonl)
    # Replay rows per train SFT row. At 0.1 a loop run's candidates lost 3 of the then 16 general questions to the
    # users' style; 1.0 kept all 16. The packaged set has 120 rows, none of them a question
    # of the gate's general suite.
    replay_ratio: float = 1.0
    # RAFT-style rows (training/passage_rows.py): each grounded train SFT row also shows this many passages of other
    # shared documents, shuffled in with its own. 0: the rows as served. Off by default until a loop run measured it.
    distractor_passages: int = 0
    # Honest "not in the documents" rows (training/passage_rows.py), per grounded train SFT row: its question with
    # other shared documents' passages only, answered "The documents I have do not say." Off until measured.
    abstain_rows: float = 0.0
    # Style rows (users' SFT rows of answers whose feedback gave the reason "style": restyling edits, likes for the
    # style) at most this share of style plus grounded rows in train. 1.0: no cap. Off until measured.
    max_style_share: float = 1.0
    # A DPO pair per grounded train SFT row: its answer over the cited document's title (training/passage_rows.py),
    # against answers that name the product and then copy a title. Off until a loop run measured it.
    title_negatives: bool = False
    heldout_min_rows: int = 20  # freeze the held-out set once the test split has this many rows
    heldout_max_per_kind: int = 500
    refreeze_heldout: bool = False  # an explicit admin decision: evaluation results stop being comparable

    def validate(self) -> None:
        r = self.split_ratios
        if len(r) != 3 or any(x < 0 for x in r) or abs(sum(r) - 1.0) > 1e-6 or r[0] <= 0:
            raise ValueError(f"split_ratios must be three non-negative numbers summing to 1 with train > 0, got {r}")
        if not 0.0 <= self.max_synthetic_share <= 1.0:
            raise ValueError(f"max_synthetic_share must be in [0, 1], got {self.max_synthetic_share}")
        if (not isinstance(self.distractor_passages, int) or isinstance(self.distractor_passages, bool)
                or not 0 <= self.distractor_passages <= MAX_DISTRACTORS):
            raise ValueError(f"distractor_passages must be a whole number from 0 to {MAX_DISTRACTORS}, "
                             f"got {self.distractor_passages!r}")
        if not 0.0 <= self.max_style_share <= 1.0:
            raise ValueError(f"max_style_share must be in [0, 1], got {self.max_style_share}")
        if not 0.0 <= self.abstain_rows <= 1.0:
            raise ValueError(f"abstain_rows must be in [0, 1], got {self.abstain_rows}")
        if not isinstance(self.title_negatives, bool):
            raise ValueError(f"title_negatives must be true or false, got {self.title_negatives!r}")
        if self.replay_ratio < 0:
            raise ValueError(f"replay_ratio must be >= 0, got {self.replay_ratio}")
        if self.context_messages < 0 or self.synthetic_floor < 0 or self.heldout_max_per_kind < 0:
            raise ValueError("context_messages, synthetic_floor and heldout_max_per_kind must be >= 0")
        if self.replay_ratio > 0 and self.replay_path is not None and not Path(self.replay_path).is_file():
            raise ValueError(f"replay file not found: {self.replay_path}")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["replay_path"] = str(self.replay_path or DEFAULT_REPLAY)
        d["split_ratios"] = list(self.split_ratios)
        return d

@dataclass
class FilterStats:
    removed: Counter = field(default_factory=Counter)  # filter name -> rows removed
    pii_rows: int = 0  # rows in which something was scrubbed
    pii: Counter = field(default_factory=Counter)  # PII kind -> replacements

    def as_list(self) -> list[dict[str, Any]]:
        order = ["pii_scrub"] + sorted(self.removed)
        out = []
        for name in order:
            if name == "pii_scrub":
                out.append({"name": "pii_scrub", "rows_changed": self.pii_rows, "removed": 0,
                            "by_kind": dict(sorted(self.pii.items()))})
            else:
                out.append({"name": name, "removed": self.removed[name]})
        return out


@dataclass(frozen=True)
class BuildResult:
    version: str
    path: Path
    manifest: dict[str, Any]

    def counts(self, kind: str) -> dict[str, int]:
        return self.manifest["counts"][kind]


# ---------------------------------------------------------------------------------------------- hygiene


def _scrubbed(ex: Example, stats: FilterStats, cache: dict[str, Scrubbed]) -> Example:
    changed = False

    def s(text: str) -> str:
        nonlocal changed
        out = cache.get(text)
        if out is None:
            # The same message is context for every later rated answer of its conversation and
            # appears in SFT and KTO alike: scrub each distinct text once per build.
            out = cache[text] = scrub_pii(text)
        if out.changed:
            changed = True
            stats.pii.update(out.counts)
        return out.text

    new = replace(ex, prompt=tuple((r, s(c)) for r, c in ex.prompt), completion=s(ex.completion),
                  rejected=s(ex.rejected) if ex.rejected is not None else None,
                  passages=tuple(replace(p, title=s(p.title), text=s(p.text)) for p in ex.passages))
    stats.pii_rows += changed
    return new


def clean(examples: list[Example], options: BuildOptions,
          cache: dict[str, Scrubbed] | None = None) -> tuple[list[Example], FilterStats]:
    """Scrub, quality-filter and de-duplicate, in that order; the first copy of a duplicate is kept."""
    stats = FilterStats()
    dedup = Deduplicator(threshold=options.near_dup_threshold)
    cache = {} if cache is None else cache
    kept: list[Example] = []
    for ex in examples:
        ex = _scrubbed(ex, stats, cache)
        problem = quality_problem(ex.completion, options.quality) or quality_problem(ex.prompt[-1][1], options.quality)
        if problem is None and ex.rejected is not None:
            problem = quality_problem(ex.rejected, options.quality)
            if problem is None and ex.rejected.strip() == ex.completion.strip():
                problem = "same_chosen_and_rejected"
        if problem is not None:
            stats.removed[f"quality:{problem}"] += 1
            continue
        dup = dedup.check(ex.dedup_text())
        if dup is not None:
            stats.removed[f"dedup:{dup}"] += 1
            continue
        kept.append(ex)
    return kept, stats


# ---------------------------------------------------------------------------------------------- splits


def group_fraction(group: str, salt: str) -> float:
    """A stable number in [0, 1) for a group: the same group always lands in the same split."""
    h = hashlib.sha256(f"{salt}\x1f{group}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def split_of(group: str, options: BuildOptions) -> str:
    x = group_fraction(group, options.split_salt)
    train, val, _ = options.split_ratios
    if x < train:
        return "train"
    if x < train + val:
        return "validation"
    return "test"


# A first retrain has a handful of conversations. One group in ten lands in test on average, so with
# five groups there is often none, and a candidate nobody can judge is not worth training. Until a
# held-out set is frozen, when the hash puts no group in test, the groups with the highest hash value
# go there instead: one in ten, at least one once there are this many groups. Larger data never needs it.
SMALL_DATA_MIN_GROUPS = 3


def heldout_frozen(root: Path, options: BuildOptions) -> bool:
    """Whether builds under `root` reuse a frozen held-out set (so the test split is not evaluated)."""
    meta = root / HELDOUT_DIR / "meta.json"
    if options.refreeze_heldout or not meta.is_file():
        return False
    return json.loads(meta.read_text(encoding="utf-8")).get("prompt_format") == PROMPT_FORMAT


def assign_splits(groups: set[str], options: BuildOptions, frozen: bool = False) -> dict[str, str]:
    """Each group's split: by its hash (`split_of`), plus the small-data rule above when nothing is frozen."""
    out = {g: split_of(g, options) for g in groups}
    wants_test = options.split_ratios[2] > 0
    if frozen or not wants_test or "test" in out.values() or len(groups) < SMALL_DATA_MIN_GROUPS:
        return out
    take = max(1, len(groups) // 10)
    for g in sorted(groups, key=lambda g: group_fraction(g, options.split_salt), reverse=True)[:take]:
        out[g] = "test"
    return out


def _row_order(ex: Example, salt: str) -> float:
    """A row's place in its split, from ids that repeat when the same data is logged again (no document
    id: documents get random ids at ingest, and one row moving shifts every row after it, so the
    trainer's seeded shuffle would train on another order; that made two loop runs on the same data
    train different adapters)."""
    p = ex.prov
    return group_fraction(f"{p.group}|{p.message_id}|{p.synthetic_id}|{p.feedback_id}|{ex.kind}", salt + "/row")


# ---------------------------------------------------------------------------------------------- held-out


def _heldout_exists(store: Store, rows: list[dict[str, Any]]) -> list[bool]:
    """Which frozen rows still have every message / synthetic pair they came from."""
    msg_ids = {r[k] for r in rows for k in ("message_id", "other_message_id") if r.get(k) is not None}
    syn_ids = {r["synthetic_id"] for r in rows if r.get("synthetic_id") is not None}
    alive_msgs = store.existing_message_ids(msg_ids)
    alive_syn = SyntheticPairs(store).existing_ids(syn_ids)
    out = []
    for r in rows:
        ok = all(r.get(k) is None or r[k] in alive_msgs for k in ("message_id", "other_message_id"))
        ok = ok and (r.get("synthetic_id") is None or r["synthetic_id"] in alive_syn)
        out.append(ok)
    return out


def _row_texts(row: dict[str, Any]) -> list[str]:
    return [m["content"] for col in ("messages", "prompt", "chosen", "rejected", "completion")
            for m in row.get(col) or []]

def _load_heldout(root: Path, store: Store, forgotten: dict[int, set[str]], shared_chunks: ChunkReader | None = None,
                  marks: dict[int, int] | None = None,
                  ) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]] | None:
    meta_path = root / "meta.json"
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("prompt_format") != PROMPT_FORMAT:
        # Frozen with another prompt format (before system prompts and passages): it would measure the
        # model on prompts it is never served, so it is frozen again from this build's test split.
        return None
    rows = {k: read_jsonl(root / f"{k}.jsonl") for k in KINDS}
    removed = 0
    marks = marks or {}
    owners = (store.conversation_owners({r["conversation_id"] for k in KINDS for r in rows[k]} - {None})
              if forgotten or marks else {})
    cited = sorted({c for k in KINDS for r in rows[k] for c in r.get("passage_ids") or []})
    stored = set(shared_chunks(cited)) if shared_chunks is not None and cited else set(cited)
    for k in KINDS:
        alive = _heldout_exists(store, rows[k])
        # a deleted document takes its passages out of the frozen rows too
        alive = [ok and set(r.get("passage_ids") or []) <= stored for ok, r in zip(alive, rows[k], strict=True)]
        for i, r in enumerate(rows[k]):
            owner = owners.get(r.get("conversation_id"))
            if alive[i] and owner in forgotten and mentions_forgotten(_row_texts(r), forgotten[owner]):
                alive[i] = False
            if alive[i] and owner in marks and (r.get("feedback_id") or 0) <= marks[owner]:
                alive[i] = False  # "forget what you learned from me" (training/personal_data.py)
        if not all(alive):
            removed += alive.count(False)
            rows[k] = [r for r, ok in zip(rows[k], alive, strict=True) if ok]
    if removed:
        # Deletion (of a conversation, or of a memory) wins over freezing: rewrite the frozen files.
        meta["removed_deleted"] = int(meta.get("removed_deleted", 0)) + removed
        meta["hashes"] = {k: write_jsonl(root / f"{k}.jsonl", rows[k]) for k in KINDS}
        meta["counts"] = {k: len(rows[k]) for k in KINDS}
        write_json(meta_path, meta)
    meta["removed_now"] = removed
    return rows, meta


def _freeze_heldout(root: Path, test_rows: dict[str, list[dict[str, Any]]], options: BuildOptions,
                    version: str) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    rows = {k: test_rows[k][: options.heldout_max_per_kind] for k in KINDS}
    tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {
        "frozen_at": datetime.now(UTC).isoformat(), "frozen_by_build": version, "split_salt": options.split_salt,
        "prompt_format": PROMPT_FORMAT,
        "counts": {k: len(rows[k]) for k in KINDS},
        "hashes": {k: write_jsonl(tmp / f"{k}.jsonl", rows[k]) for k in KINDS},
        "removed_deleted": 0,
    }
    write_json(tmp / "meta.json", meta)
    if root.exists():  # only with refreeze_heldout
        shutil.rmtree(root)
    os.replace(tmp, root)
    meta["removed_now"] = 0
    return rows, meta

# ---------------------------------------------------------------------------------------------- build


@dataclass
class Gathered:
    """Every row a build would make, cleaned and by kind, before splitting (and without replay)."""

    log: TrainingLog
    syn: list[Any]
    skipped: Counter
    context: Counter
    by_kind: dict[str, list[Example]]
    filters: dict[str, FilterStats]
    forgotten: dict[int, set[str]]
    shared_chunks: ChunkReader | None
    marks: dict[int, int] = field(default_factory=dict)  # user id -> feedback id they had forgotten through
    shared_pool: PoolReader | None = None  # every shared chunk, for distractor passages


def drop_wrong_facts(examples: list[Example]) -> tuple[list[Example], Counter]:
    """Leave out users' rows that would teach a wrong fact, or nothing at all.

    Users like and edit answers for their style; a liked answer can still be wrong ("Lumen Desk Team costs 15
    dollars" where the passage says 8), and an edit that fixes the style can keep the wrong fact. Such an answer
    is no SFT target, no DPO chosen side and no desirable KTO row: a human row whose answer states a number,
    code or named letter that none of its cited passages (nor the question) holds is dropped
    (`training/fact_check.py`, "contradicts_passage"). So is one that only repeats its question ("Your question:
    What is ...?", "echoes_question"): short and naming the product, it was liked in the loop bench and taught
    the model to hand questions back. Rows without passages are checked for echoes only; teacher rows and
    undesirable KTO rows are kept. Returns the kept examples and a count per (kind, reason) dropped, for the
    manifest's filters.
    """
    kept, dropped = [], Counter()
    for ex in examples:
        teaches = ex.prov.source == "human" and (ex.kind != "kto" or ex.label)
        question = ex.prompt[-1][1]
        if teaches and ex.passages and contradicts(ex.completion, "\n".join(p.text for p in ex.passages), question):
            dropped[ex.kind, "contradicts_passage"] += 1
            continue
        if teaches and echoes_question(ex.completion, question):
            dropped[ex.kind, "echoes_question"] += 1
            continue
        kept.append(ex)
    return kept, dropped


def gather_examples(store: Store, settings: Settings, options: BuildOptions, knowledge: KnowledgeBase | None = None,
                    cleaning: Callable[[], None] | None = None, owner_id: int | None = None) -> Gathered:
    """Read the store and the teacher's pairs, then scrub, filter and de-duplicate: the rows a build splits.

    Separate from `build_datasets` so the readiness check (training/readiness.py) counts exactly these.
    `owner_id`: one user's personal build (their own conversations and private passages, no teacher
    pairs; training/personal_data.py states the rule). Feedback a user had forgotten is never read.
    """
    marks = forget_marks(store)
    log = restrict_log(read_training_log(store), owner_id, marks)
    syn = SyntheticPairs(store).list(accepted_only=True) if options.include_teacher and owner_id is None else []
    repairs: dict[int, list[Any]] = defaultdict(list)
    for p in syn:
        if p.kind == "repair" and p.target_message_id is not None:
            repairs[p.target_message_id].append(p)
    skipped: Counter = Counter()
    examples = human_examples(log, repairs, options.context_messages, skipped) + teacher_examples(syn)
    shared_chunks = knowledge.shared_chunks if knowledge is not None else None
    private_chunks = partial(knowledge.private_chunks, owner_id) if owner_id is not None and knowledge else None
    examples, context = with_serving_context(examples, log, settings.system_prompt, shared_chunks, private_chunks)
    check_privacy(examples, log, owner_id)
    examples, wrong_facts = drop_wrong_facts(examples)
    # A memory the user deleted must not come back through the messages it was learnt from: rows of
    # that user that mention a forgotten phrase are dropped (before scrubbing, on the text as said).
    forgotten = forgotten_digests(store)
    dropped_forgotten: Counter = Counter()
    if forgotten:
        kept = []
        for ex in examples:
            owner = log.owners.get(ex.prov.conversation_id or -1)
            if owner in forgotten and mentions_forgotten(ex.texts(), forgotten[owner]):
                dropped_forgotten[ex.kind] += 1
                continue
            kept.append(ex)
        examples = kept
    if cleaning is not None:
        cleaning()

    by_kind: dict[str, list[Example]] = {k: [] for k in KINDS}
    for ex in examples:  # human rows come first, so a duplicate keeps its human copy
        by_kind[ex.kind].append(ex)
    filters: dict[str, FilterStats] = {}
    scrub_cache: dict[str, Scrubbed] = {}
    for kind in KINDS:
        by_kind[kind], filters[kind] = clean(by_kind[kind], options, scrub_cache)
        if dropped_forgotten[kind]:
            filters[kind].removed["forgotten_memory"] = dropped_forgotten[kind]
        for reason in ("contradicts_passage", "echoes_question"):
            if wrong_facts[kind, reason]:
                filters[kind].removed[reason] = wrong_facts[kind, reason]
    pool = knowledge.all_shared_chunks if knowledge is not None else None
    return Gathered(log, syn, skipped, context, by_kind, filters, forgotten, shared_chunks, marks, pool)


def build_datasets(store: Store, settings: Settings, options: BuildOptions = BuildOptions(),
                   progress: ProgressFn | None = None, knowledge: KnowledgeBase | None = None,
                   owner_id: int | None = None) -> BuildResult:
    """Read, clean, split and write one snapshot; see the module docstring for what goes where.

    `knowledge` (a `memory.knowledge.KnowledgeBase`) supplies the shared passages answers cited, so that
    training prompts are the served ones; without it rows carry the system prompt and no passages.
    `owner_id`: that user's personal snapshot, written under ``<datasets_dir>/personal/<user_id>/`` with
    its own frozen held-out set (training/personal_data.py says what it may hold).
    """
    options.validate()
    report = progress or (lambda _stage, _frac: None)
    started = time.perf_counter()
    root = settings.datasets_dir if owner_id is None else settings.personal_datasets_dir / str(owner_id)
    root.mkdir(parents=True, exist_ok=True)

    report("reading the store", 0.0)
    try:
        g = gather_examples(store, settings, options, knowledge, lambda: report("cleaning", 0.3), owner_id)
    except PrivacyError as e:
        raise BuildError(f"dataset build refused, nothing was written: {e}") from e
    log, syn, skipped, context, by_kind, filters = g.log, g.syn, g.skipped, g.context, g.by_kind, g.filters
    forgotten, shared_chunks = g.forgotten, g.shared_chunks

    report("splitting", 0.5)
    split_rows: dict[str, dict[str, list[Example]]] = {k: {s: [] for s in SPLITS} for k in KINDS}
    personal_split: dict[str, Any] | None = None
    if owner_id is None:
        splits = assign_splits({ex.prov.group for kind in KINDS for ex in by_kind[kind]}, options,
                               frozen=heldout_frozen(root, options))
    else:  # by question, with a held-out floor (training/personal_data.py)
        by_kind = by_question(by_kind, log)
        if not options.refreeze_heldout and heldout_outdated(root / HELDOUT_DIR):
            options = replace(options, refreeze_heldout=True)
        splits, personal_split = personal_splits(by_kind, options.split_ratios,
                                                 partial(_salted_fraction, options.split_salt),
                                                 frozen=heldout_frozen(root, options))
    for kind in KINDS:
        for ex in by_kind[kind]:
            split_rows[kind][splits[ex.prov.group]].append(ex)
        for s in SPLITS:
            split_rows[kind][s].sort(key=lambda e: _row_order(e, options.split_salt))

    version, final = reserve_version(root)
    tmp = root / f".{version}.tmp-{os.getpid()}"
    try:
        # Held-out: reuse the frozen set (minus deleted rows) or freeze it from this test split.
        heldout_root = root / HELDOUT_DIR
        loaded = None if options.refreeze_heldout else _load_heldout(heldout_root, store, forgotten, shared_chunks,
                                                                      g.marks)
        test_total = sum(len(split_rows[k]["test"]) for k in KINDS)
        if loaded is None and (test_total >= options.heldout_min_rows or options.refreeze_heldout) and test_total:
            loaded = _freeze_heldout(heldout_root, {k: [e.row() for e in split_rows[k]["test"]] for k in KINDS},
                                     options, version)
        heldout_rows, heldout_meta = loaded if loaded else ({k: [] for k in KINDS}, None)
        heldout_groups = {r["group"] for k in KINDS for r in heldout_rows[k]}
        # Sets frozen before teacher pairs were split by question hold whole documents ("doc:<id>"): their
        # pairs stay out of training, whatever their group is now.
        heldout_docs = {g.removeprefix("doc:") for g in heldout_groups if g.startswith("doc:")}

        def held_out(e: Example) -> bool:
            return e.prov.group in heldout_groups or (e.prov.source == "teacher" and e.prov.doc_id in heldout_docs)

        for kind in KINDS:
            for s in ("train", "validation"):
                before = len(split_rows[kind][s])
                split_rows[kind][s] = [e for e in split_rows[kind][s] if not held_out(e)]
                if before - len(split_rows[kind][s]):
                    filters[kind].removed["heldout_group_excluded"] += before - len(split_rows[kind][s])
        if personal_split is not None:
            scored = {k: heldout_rows[k] + [e.row() for e in split_rows[k]["test"]] for k in KINDS}  # what is judged
            for kind, n in drop_heldout_context(split_rows, scored).items():
                if n:
                    filters[kind].removed["heldout_answer_in_context"] += n
            personal_split["dpo_pairs_below_minimum"] = drop_few_pairs(split_rows)
            if personal_split["dpo_pairs_below_minimum"]:
                filters["dpo"].removed["too_few_pairs_for_dpo"] += personal_split["dpo_pairs_below_minimum"]

        caps = {k: _cap_synthetic(split_rows[k], options, filters[k]) for k in KINDS}
        style_info = _cap_style(split_rows["sft"], options, filters["sft"], g.log)
        title_info = _title_negatives(split_rows, options)  # before distractors: the cited passage's own title
        passage_info = _passage_rows(split_rows["sft"], options, filters["sft"], g, owner_id)
        passage_info["title_negatives"] = title_info
        replay_info = _add_replay(split_rows["sft"], options, filters["sft"], settings.system_prompt)

        report("writing", 0.7)
        tmp.mkdir()
        (tmp / "jsonl").mkdir()
        hashes: dict[str, str] = {}
        rows_out: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for kind in KINDS:
            rows_out[kind] = {s: [e.row() for e in split_rows[kind][s]] for s in SPLITS}
            for s in SPLITS:
                hashes[f"jsonl/{kind}.{s}.jsonl"] = write_jsonl(tmp / "jsonl" / f"{kind}.{s}.jsonl",
                                                                  rows_out[kind][s])
            save_splits(tmp / kind, rows_out[kind], kind)
        (tmp / HELDOUT_DIR).mkdir()
        for kind in KINDS:
            hashes[f"{HELDOUT_DIR}/{kind}.jsonl"] = write_jsonl(tmp / HELDOUT_DIR / f"{kind}.jsonl",
                                                                 heldout_rows[kind])
        save_heldout(tmp / HELDOUT_DIR, heldout_rows)
        report("manifest", 0.95)
        manifest = _manifest(version, options, log, syn, rows_out, heldout_rows, heldout_meta, filters, skipped,
                             caps, replay_info, hashes, time.perf_counter() - started)
        manifest["passage_rows"] = passage_info
        manifest["style_cap"] = style_info
        manifest["owner_id"] = owner_id  # None: the shared adapter's; a user id: that user's personal adapter
        if personal_split is not None:
            manifest["personal_split"] = personal_split
        manifest["prompts"] = {
            "system_prompt": settings.system_prompt, "format": PROMPT_FORMAT,
            "passages": ("shared documents, re-read by chunk id" if knowledge is not None
                         else "none (no knowledge base)"),
            **{k: int(v) for k, v in sorted(context.items())},
        }
        write_json(tmp / "manifest.json", manifest)
        os.replace(tmp, final)  # final is the empty reserved folder: the snapshot appears whole
        write_pointer(root, version)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if final.exists() and not any(final.iterdir()):
            final.rmdir()
        if isinstance(exc, (KeyboardInterrupt, SystemExit, BuildError)):
            raise
        raise BuildError(f"dataset build {version} failed; nothing was published: {exc}") from exc
    report("done", 1.0)
    return BuildResult(version=version, path=final, manifest=manifest)

def _cap_synthetic(splits: dict[str, list[Example]], options: BuildOptions, stats: FilterStats) -> dict[str, Any]:
    """Keep teacher rows in train to at most `max_synthetic_share` (but always `synthetic_floor`)."""
    train = splits["train"]
    human = sum(1 for e in train if e.prov.source == "human")
    teacher = [e for e in train if e.prov.source == "teacher"]
    share = options.max_synthetic_share
    allowed = len(teacher) if share >= 1.0 else max(options.synthetic_floor, int(share / (1 - share) * human))
    info = {"share": share, "floor": options.synthetic_floor, "human_rows": human, "teacher_rows": len(teacher),
            "allowed": min(allowed, len(teacher)), "removed": 0}
    if len(teacher) > allowed:
        keep = {id(e) for e in sorted(teacher, key=lambda e: _row_order(e, options.split_salt + "/cap"))[:allowed]}
        splits["train"] = [e for e in train if e.prov.source != "teacher" or id(e) in keep]
        info["removed"] = len(teacher) - allowed
        stats.removed["synthetic_cap"] += info["removed"]
    return info


def _cap_style(splits: dict[str, list[Example]], options: BuildOptions, stats: FilterStats,
               log: TrainingLog) -> dict[str, Any]:
    """Keep style rows in the SFT train split to at most `max_style_share` of style plus grounded rows.

    A style row: a user's SFT row of an answer whose feedback gave the reason "style" (rated down for its style and
    edited, or liked for it). A grounded row: any other SFT row whose prompt quotes passages. A loop run that
    learnt the users' style traded grounding for it (issue 26); the cap keeps reading the passages the larger part.
    """
    style_ids = {f.message_id for f in log.feedback if f.reason == "style"}
    train = splits["train"]

    def is_style(e: Example) -> bool:
        return e.prov.source == "human" and e.prov.message_id in style_ids

    style = [e for e in train if is_style(e)]
    n_grounded = sum(1 for e in train if e.passages and not is_style(e))
    share = options.max_style_share
    allowed = len(style) if share >= 1.0 else int(share / (1 - share) * n_grounded)
    info = {"share": share, "style_rows": len(style), "grounded_rows": n_grounded,
            "allowed": min(allowed, len(style)), "removed": 0}
    if len(style) > allowed:
        keep = {id(e) for e in sorted(style, key=lambda e: _row_order(e, options.split_salt + "/style"))[:allowed]}
        splits["train"] = [e for e in train if not is_style(e) or id(e) in keep]
        info["removed"] = len(style) - allowed
        stats.removed["style_cap"] += info["removed"]
    return info


def _title_negatives(split_rows: dict[str, dict[str, list[Example]]], options: BuildOptions) -> dict[str, Any]:
    """DPO pairs against copying the cited document's title (training/passage_rows.py), into the DPO train split."""
    if not options.title_negatives:
        return {"on": False, "added": 0}
    added, info = title_negatives(split_rows["sft"]["train"])
    split_rows["dpo"]["train"] = sorted(split_rows["dpo"]["train"] + added,
                                        key=lambda e: _row_order(e, options.split_salt))
    return {"on": True, **info}


def _passage_rows(splits: dict[str, list[Example]], options: BuildOptions, stats: FilterStats, g: Gathered,
                  owner_id: int | None) -> dict[str, Any]:
    """Distractor passages in the train split's grounded SFT rows and "not in the documents" rows beside them
    (training/passage_rows.py); the manifest's `passage_rows`. Validation and test rows stay as served: the gate
    judges the prompts users send."""
    info: dict[str, Any] = {"distractors": {"per_row": options.distractor_passages, "rows": 0},
                            "abstain": {"share": options.abstain_rows, "added": 0}}
    if (options.distractor_passages == 0 and options.abstain_rows == 0) or not any(map(grounded, splits["train"])):
        return info
    pool = SharedPool.read(g.shared_pool)
    fraction = partial(_salted_fraction, options.split_salt + "/passages")
    train = splits["train"]
    # As many passages as a grounded row shows, so the number of passages does not give the answer away.
    abstain, info["abstain"] = abstain_examples(train, pool, options.abstain_rows, options.distractor_passages,
                                                fraction)
    train, info["distractors"] = with_distractors(train, pool, options.distractor_passages, fraction)
    splits["train"] = sorted(train + abstain, key=lambda e: _row_order(e, options.split_salt))
    stats.pii.update(pool.pii)
    check_privacy(splits["train"], g.log, owner_id)
    return info


def _salted_fraction(salt: str, key: str) -> float:
    return group_fraction(key, salt)


def _add_replay(splits: dict[str, list[Example]], options: BuildOptions, stats: FilterStats,
                system: str) -> dict[str, Any]:
    path = Path(options.replay_path or DEFAULT_REPLAY)
    wanted = int(round(options.replay_ratio * len(splits["train"])))
    info = {"path": str(path), "ratio": options.replay_ratio, "requested": wanted, "used": 0}
    if wanted == 0:
        return info
    rows = [replace(e, system=system) for e in replay_examples(path)]
    rows.sort(key=lambda e: _row_order(e, options.split_salt + "/replay"))
    replay_stats = FilterStats()
    cleaned, replay_stats = clean(rows, options)
    stats.pii.update(replay_stats.pii)
    stats.pii_rows += replay_stats.pii_rows
    for name, n in replay_stats.removed.items():
        stats.removed[f"replay_{name}"] += n
    chosen = cleaned[:wanted]
    splits["train"] = sorted(splits["train"] + chosen, key=lambda e: _row_order(e, options.split_salt))
    info["used"] = len(chosen)
    return info


def _manifest(version: str, options: BuildOptions, log: TrainingLog, syn: list[Any],
              rows: dict[str, dict[str, list[dict[str, Any]]]], heldout: dict[str, list[dict[str, Any]]],
              heldout_meta: dict[str, Any] | None, filters: dict[str, FilterStats], skipped: Counter,
              caps: dict[str, Any], replay: dict[str, Any], hashes: dict[str, str], seconds: float) -> dict[str, Any]:
    counts = {k: {s: len(rows[k][s]) for s in SPLITS} for k in KINDS}
    by_source = {k: {s: dict(sorted(Counter(f"{r['source']}:{r['origin']}" for r in rows[k][s]).items()))
                     for s in SPLITS} for k in KINDS}
    groups = {s: len({r["group"] for k in KINDS for r in rows[k][s]}) for s in SPLITS}
    content = hashlib.sha256("".join(f"{n}={h}\n" for n, h in sorted(hashes.items())).encode()).hexdigest()
    return {
        "version": version,
        "builder_version": BUILDER_VERSION,
        "created_at": datetime.now(UTC).isoformat(),
        "duration_s": round(seconds, 3),
        "formats": {"sft": "conversational messages", "dpo": "conversational prompt/chosen/rejected",
                    "kto": "conversational prompt/completion/label"},
        "trl_columns": TRL_COLUMNS,
        "options": options.as_dict(),
        "inputs": {"feedback_rows": len(log.feedback), "max_feedback_id": log.max_feedback_id,
                   "max_message_id": log.max_message_id,
                   "conversations_with_feedback": len(log.by_conversation),
                   "teacher_pairs_accepted": len(syn), "skipped": dict(sorted(skipped.items()))},
        "counts": counts,
        "by_source": by_source,
        "groups": groups,
        "filters": {k: filters[k].as_list() for k in KINDS},
        "synthetic_cap": caps,
        "replay": replay,
        "heldout": {
            "frozen": heldout_meta is not None,
            "counts": {k: len(heldout[k]) for k in KINDS},
            "frozen_at": heldout_meta.get("frozen_at") if heldout_meta else None,
            "frozen_by_build": heldout_meta.get("frozen_by_build") if heldout_meta else None,
            "removed_deleted_total": heldout_meta.get("removed_deleted", 0) if heldout_meta else 0,
            "removed_deleted_now": heldout_meta.get("removed_now", 0) if heldout_meta else 0,
            "hashes": heldout_meta.get("hashes") if heldout_meta else None,
        },
        "hashes": hashes,
        "content_sha256": content,
    }


def store_summary(store: Store) -> dict[str, int]:
    """Small summary for CLIs and the admin view: conversations, feedback and teacher pairs."""
    return {"conversations": store.counts()["conversations"], "feedback": store.count_feedback(),
            "synthetic_pairs": SyntheticPairs(store).counts()["total"]}
