"""`assistant data ...`: build dataset snapshots and generate synthetic pairs from the command line.

In: `--config` / `--home` (one `Settings`, as every command) and each command's flags.
Out: `build` writes a snapshot under `<home>/datasets/vNNNN` and prints its counts (or the manifest
with `--json`); `synth` runs a teacher over documents and stores the pairs in the database; `list`
shows the snapshots. All of them show tqdm progress bars on stderr.

    assistant data synth --docs tests/data/docs                  # the self-teacher on the serving model
    assistant data synth --kb --user admin --teacher openai --base-url http://gpu:8000/v1 --teacher-model big
    assistant data build --split 0.8,0.1,0.1 --synthetic-share 0.5 --replay-ratio 0.1
    assistant data list
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from assistant.config import Settings

app = typer.Typer(help="Build training datasets and generate synthetic pairs.", no_args_is_help=True,
                  pretty_exceptions_enable=False)

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML settings file.")]
HomeOpt = Annotated[Path | None, typer.Option("--home", help="State directory (default ~/.assistant).")]


def _knowledge(settings: Settings):
    """The knowledge base, read-only here (the passages answers cited), or None when there is none yet."""
    if not settings.chroma_dir.exists() and settings.chroma_url is None:
        return None
    from memory.knowledge import KnowledgeBase

    return KnowledgeBase(settings)


def _settings(config: Path | None, home: Path | None) -> Settings:
    try:
        settings = Settings.load(config, home=home)
    except (ValueError, OSError) as e:
        typer.secho(f"error: bad settings: {e}", fg="red", err=True)
        raise typer.Exit(2) from e
    settings.ensure_dirs()
    return settings


def _store(settings: Settings):
    from memory.store import Store

    return Store.open(settings.db_url)


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(f"error: {message}", fg="red", err=True)
    return typer.Exit(code)


def _ratios(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError as e:
        raise typer.BadParameter(f"expected three numbers like 0.8,0.1,0.1, got {text!r}") from e
    if len(parts) != 3:
        raise typer.BadParameter(f"expected three numbers like 0.8,0.1,0.1, got {text!r}")
    return parts  # type: ignore[return-value]


@app.command()
def build(
    config: ConfigOpt = None,
    home: HomeOpt = None,
    split: Annotated[str, typer.Option(help="train,validation,test ratios.")] = "0.8,0.1,0.1",
    teacher: Annotated[bool, typer.Option("--teacher/--no-teacher", help="Include accepted teacher pairs.")] = True,
    synthetic_share: Annotated[float, typer.Option(help="Largest share of teacher rows in train.")] = 0.5,
    synthetic_floor: Annotated[int, typer.Option(help="Teacher rows always allowed (cold start).")] = 200,
    replay: Annotated[Path | None, typer.Option(help="JSONL of general {'messages': [...]} rows.")] = None,
    replay_ratio: Annotated[float, typer.Option(help="Replay rows per train SFT row.")] = 1.0,
    near_dup: Annotated[float, typer.Option(help="Near-duplicate Jaccard threshold.")] = 0.85,
    distractors: Annotated[int, typer.Option(
        help="Other shared documents' passages shown with each grounded train SFT row (off until measured).")] = 0,
    abstain_rows: Annotated[float, typer.Option(
        help="'Not in the documents' rows per grounded train SFT row (off until measured).")] = 0.0,
    max_style_share: Annotated[float, typer.Option(
        help="Largest share of style-labelled rows against grounded rows in train (1.0: no cap).")] = 1.0,
    title_negatives: Annotated[bool, typer.Option(
        help="A DPO pair per grounded train SFT row: its answer over the cited document's title.")] = False,
    heldout_min_rows: Annotated[int, typer.Option(help="Freeze the held-out set at this many test rows.")] = 20,
    refreeze_heldout: Annotated[bool, typer.Option(help="Replace the frozen held-out set (breaks comparisons).")]
    = False,
    keep_last: Annotated[int | None, typer.Option(help="Afterwards delete all but the newest N snapshots.")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Build a dataset snapshot (SFT, DPO, KTO) from feedback and teacher pairs."""
    from tqdm.auto import tqdm

    from training.dataset_build import BuildError, BuildOptions, build_datasets, prune_snapshots

    settings = _settings(config, home)
    try:
        options = BuildOptions(split_ratios=_ratios(split), include_teacher=teacher,
                               max_synthetic_share=synthetic_share, synthetic_floor=synthetic_floor,
                               replay_path=replay, replay_ratio=replay_ratio, near_dup_threshold=near_dup,
                               heldout_min_rows=heldout_min_rows, refreeze_heldout=refreeze_heldout,
                               distractor_passages=distractors, abstain_rows=abstain_rows,
                               max_style_share=max_style_share, title_negatives=title_negatives)
        options.validate()
    except ValueError as e:
        raise _fail(str(e), 2) from e
    store = _store(settings)
    bar = tqdm(total=100, desc="building", unit="%", leave=False)

    def progress(stage: str, fraction: float) -> None:
        bar.set_description(stage)
        bar.update(int(fraction * 100) - bar.n)

    knowledge = _knowledge(settings)
    try:
        result = build_datasets(store, settings, options, progress=progress, knowledge=knowledge)
    except BuildError as e:
        raise _fail(str(e)) from e
    finally:
        if knowledge is not None:
            knowledge.close()
        bar.close()
        store.close()
    removed = prune_snapshots(settings, keep_last) if keep_last else []
    m = result.manifest
    if as_json:
        typer.echo(json.dumps(m, indent=2, ensure_ascii=False))
        return
    typer.echo(f"{result.version}: {result.path}  ({m['duration_s']} s)")
    for kind, counts in m["counts"].items():
        typer.echo(f"  {kind}: " + ", ".join(f"{s} {n}" for s, n in counts.items())
                   + f"  | held-out {m['heldout']['counts'][kind]}")
    for kind, filters in m["filters"].items():
        dropped = ", ".join(f"{f['name']} {f['removed']}" for f in filters if f["removed"])
        scrubbed = next(f for f in filters if f["name"] == "pii_scrub")["rows_changed"]
        typer.echo(f"  {kind} hygiene: PII scrubbed in {scrubbed} rows" + (f"; removed {dropped}" if dropped else ""))
    if removed:
        typer.echo(f"  pruned snapshots: {', '.join(removed)}")


@app.command()
def synth(
    config: ConfigOpt = None,
    home: HomeOpt = None,
    docs: Annotated[Path | None, typer.Option(help="Folder of .md/.txt documents.")] = None,
    kb: Annotated[bool, typer.Option("--kb", help="Use the documents in the knowledge base.")] = False,
    user: Annotated[str | None, typer.Option(help="With --kb: whose documents (private + shared).")] = None,
    teacher: Annotated[str, typer.Option(help="self | local | openai")] = "self",
    teacher_model: Annotated[str | None, typer.Option(help="local: hub id or folder; openai: model.")] = None,
    base_url: Annotated[str | None, typer.Option(help="openai: the endpoint, e.g. http://host:8000/v1")] = None,
    api_key: Annotated[str, typer.Option(envvar="ASSISTANT_TEACHER_API_KEY", help="openai: API key.")]
    = "not-needed",
    adapter: Annotated[str | None, typer.Option(help="self: serve with this adapter folder.")] = None,
    questions: Annotated[int, typer.Option(help="Questions per chunk.")] = 2,
    candidates: Annotated[int, typer.Option(help="Answers sampled per question.")] = 4,
    extract: Annotated[bool, typer.Option(help="Also judge the passage's own best-matching sentence as an answer.")]
    = True,
    limit: Annotated[int | None, typer.Option(
        help="At most this many chunks: unread ones first, spread over the documents.")] = None,
) -> None:
    """Generate question/answer pairs from documents with a teacher and store them."""
    from tqdm.auto import tqdm

    from training.synth import SyntheticPairs, chunks_from_folder, pick_chunks, run_synth
    from training.teacher import TeacherOptions, local_teacher, openai_teacher, self_teacher

    settings = _settings(config, home)
    if (docs is None) == (not kb):
        raise _fail("give exactly one of --docs FOLDER or --kb", 2)
    if teacher not in ("self", "local", "openai"):
        raise _fail(f"--teacher must be self, local or openai, got {teacher!r}", 2)
    if questions < 1 or candidates < 1:
        raise _fail("--questions and --candidates must be at least 1", 2)
    store = _store(settings)
    try:
        if docs is not None:
            chunks = chunks_from_folder(docs)
        else:
            chunks = _kb_chunks(settings, store, user)
        chunks = pick_chunks(chunks, limit, SyntheticPairs(store).read_chunks()) if limit else chunks
        if not chunks:
            raise _fail("no document chunks to work on")
        options = TeacherOptions(candidates=candidates, extract=extract)
        if teacher == "openai":
            if not base_url or not teacher_model:
                raise _fail("--teacher openai needs --base-url and --teacher-model", 2)
            t = openai_teacher(base_url, teacher_model, api_key, options)
        elif teacher == "local":
            if not teacher_model:
                raise _fail("--teacher local needs --teacher-model (hub id or folder)", 2)
            t = local_teacher(teacher_model, options, threads=settings.train_threads)
        else:
            t = self_teacher(_serving_backend(settings, adapter), "teacher-adapter" if adapter else None, options)
        bar = tqdm(total=len(chunks), desc=f"teacher {t.name}", unit="chunk")
        accepted = 0

        def progress(done: int, total: int, new: list) -> None:
            nonlocal accepted
            accepted += sum(p.accepted for p in new)
            bar.update(1)
            bar.set_postfix(accepted=accepted)

        try:
            report = run_synth(store, t, chunks, questions_per_chunk=questions, progress=progress)
        finally:
            bar.close()
    except (FileNotFoundError, ValueError) as e:
        raise _fail(str(e)) from e
    finally:
        store.close()
    typer.echo(f"{report.pairs} pairs from {report.chunks} chunks in {report.seconds:.0f} s: "
               f"{report.accepted} accepted ({report.acceptance_rate:.0%}; {report.accepted_extracts} of them the "
               f"passage's own sentence), {report.dpo_pairs} DPO pairs, "
               f"{report.template_questions} template questions; {report.pairs_per_minute:.1f} pairs/min")


def _serving_backend(settings: Settings, adapter: str | None):
    import torch

    from assistant.runtime import make_backend

    torch.set_num_threads(settings.train_threads)  # runs beside the server on small machines
    backend = make_backend(settings.model_copy(update={"torch_threads": settings.train_threads}))
    if adapter:
        backend.load_adapter("teacher-adapter", Path(adapter))
    return backend


def _kb_chunks(settings: Settings, store, username: str | None):
    from memory.knowledge import KnowledgeBase
    from training.synth import chunks_from_knowledge

    if not username:
        raise _fail("--kb needs --user NAME (documents are read as that user sees them)", 2)
    user = store.get_user_by_name(username)
    if user is None:
        raise _fail(f"no user named {username!r}", 2)
    kb = KnowledgeBase(settings)
    try:
        return chunks_from_knowledge(kb, user)
    finally:
        kb.close()


@app.command("list")
def list_(config: ConfigOpt = None, home: HomeOpt = None) -> None:
    """List dataset snapshots, newest last."""
    from training.dataset_build import latest_snapshot, list_snapshots, read_manifest

    settings = _settings(config, home)
    latest = latest_snapshot(settings)
    snaps = list_snapshots(settings)
    if not snaps:
        typer.echo("no dataset snapshots yet: run `assistant data build`")
        return
    for path in snaps:
        m = read_manifest(path)
        sizes = "  ".join(f"{k} {sum(m['counts'][k].values())}" for k in m["counts"])
        mark = " (latest)" if path == latest else ""
        typer.echo(f"{path.name}{mark}  {m['created_at'][:19]}  {sizes}")
