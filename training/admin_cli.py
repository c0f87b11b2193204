"""`assistant admin ...`: the retraining loop from the command line (the same actions as the admin console).

In: `--config` / `--home` (one `Settings`) and each command's flags. Out: text (or `--json`) on stdout,
errors on stderr with a non-zero exit code. The operator running these has the server's files, so no
login is asked; actions are recorded with the actor ``cli:<os user>``.

    assistant admin train --steps 60                    # one cycle now, in this process; prints progress
    assistant admin train --train '{"lora_r": 16}' --gate '{"min_val_loss_gain": 0.02}' --no-promote
    assistant admin jobs [ID] [--log]                    # history, or one job with its events and log
    assistant admin cancel ID                            # works on a job another process runs
    assistant admin adapters                             # versions, which one serves, rollback target
    assistant admin report v0003                         # the evaluation report (markdown)
    assistant admin promote v0003 [--force]              # a running server switches within one tick
    assistant admin rollback
    assistant admin schedule --set enabled=true --set mode=daily --set daily_at=03:00
"""

from __future__ import annotations

import getpass
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Annotated, Any

import typer

from assistant.config import Settings
from training.registry import Registry, RegistryError

if TYPE_CHECKING:
    from training.jobs import Job, JobRunner

app = typer.Typer(help="Retrain, evaluate, promote and roll back adapters; jobs and schedule.",
                  no_args_is_help=True, pretty_exceptions_enable=False)

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML settings file.")]
HomeOpt = Annotated[Path | None, typer.Option("--home", help="State directory (default ~/.assistant).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def _actor() -> str:
    return f"cli:{getpass.getuser()}"


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(f"error: {message}", fg="red", err=True)
    return typer.Exit(code)


def _services(config: Path | None, home: Path | None, with_backend: bool = False) -> Any:
    """Settings + store (+ the model backend when a command needs it). No model is loaded otherwise."""
    try:
        settings = Settings.load(config, home=home)
    except (ValueError, OSError) as e:
        raise _fail(f"bad settings: {e}", 2) from e
    settings.ensure_dirs()
    if with_backend:
        from assistant.services import build_services

        return build_services(settings)
    from memory.store import Store

    store = Store.open(settings.db_url)
    return SimpleNamespace(settings=settings, store=store, registry=Registry(settings, store), backend=None,
                           chat=None, knowledge=None, memories=None, jobs=None, scheduler=None, admin=None,
                           close=lambda: None)


def _json_arg(text: str | None, what: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise typer.BadParameter(f"{what} must be a JSON object: {e}") from e
    if not isinstance(value, dict):
        raise typer.BadParameter(f"{what} must be a JSON object")
    return value


def _print(data: Any, as_json: bool, text: str) -> None:
    typer.echo(json.dumps(data, indent=2, default=str) if as_json else text)


# ------------------------------------------------------------------------------------------ train
@app.command()
def train(
    config: ConfigOpt = None,
    home: HomeOpt = None,
    steps: Annotated[int | None, typer.Option(help="Cap on optimizer steps per stage (TrainConfig.max_steps).")] = None,
    dataset: Annotated[str | None, typer.Option(help="Use this snapshot (vNNNN) instead of building one.")] = None,
    synth: Annotated[bool, typer.Option(help="Generate teacher pairs from --docs first (loads the model).")] = False,
    docs: Annotated[Path | None, typer.Option(help="Documents folder for --synth.")] = None,
    train_json: Annotated[str | None, typer.Option("--train", help="TrainConfig overrides, JSON.")] = None,
    gate_json: Annotated[str | None, typer.Option("--gate", help="GateConfig overrides, JSON.")] = None,
    build_json: Annotated[str | None, typer.Option("--build", help="Dataset build overrides, JSON.")] = None,
    promote: Annotated[bool, typer.Option(help="Promote the candidate when it passes the gate.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Run one retraining cycle now (build -> train -> evaluate -> register -> promote), as a recorded job."""
    from training.jobs import JobBusy, runner_for

    options: dict[str, Any] = {"train": _json_arg(train_json, "--train"), "gate": _json_arg(gate_json, "--gate"),
                               "build": _json_arg(build_json, "--build"), "auto_promote": promote,
                               "synth": synth, "dataset": dataset}
    if steps is not None:
        options["train"]["max_steps"] = steps
    if docs is not None:
        options["synth_docs"] = str(docs)
    services = _services(config, home, with_backend=synth)
    runner = runner_for(services)
    try:
        job = runner.start(options, requested_by=_actor(), trigger="cli")
    except JobBusy as e:
        raise _fail(str(e), 3) from e
    except ValueError as e:
        raise _fail(str(e), 2) from e
    typer.echo(f"job {job.id} started", err=True)
    try:
        job = _follow(runner, job.id, quiet=as_json)
    except KeyboardInterrupt:
        runner.cancel(job.id, by=_actor())
        job = runner.wait(job.id)
    _print(job.to_dict(), as_json, _job_text(job))
    services.close()
    if job.status != "succeeded":
        raise typer.Exit(1)


def _follow(runner: JobRunner, job_id: int, quiet: bool) -> Job:
    """Wait for the job, printing phases and training progress on stderr."""
    seen = 0
    while runner.running_here(job_id):
        runner.wait(job_id, timeout=1.0)
        for ev in runner.events(job_id, since_id=seen):
            seen = ev.id
            if quiet:
                continue
            d = ev.data
            if ev.kind == "phase":
                typer.echo(f"[{100 * d.get('fraction', 0):5.1f}%] {d.get('phase')}", err=True)
            elif ev.kind == "progress":
                typer.echo(f"  {d.get('stage')} step {d.get('step')}/{d.get('max_steps')} loss {_num(d.get('loss'))}"
                           f" eval_loss {_num(d.get('eval_loss'))} eta {_num(d.get('eta_s'))} s", err=True)
            elif ev.kind in ("log", "error"):
                typer.echo(f"  {d.get('message')}", err=True)
    return runner.get(job_id)


def _num(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, int | float) else "-"


def _job_text(job: Job) -> str:
    lines = [f"job {job.id}: {job.status} ({job.trigger}, by {job.requested_by or '-'}, "
             f"created {job.created_at:%Y-%m-%d %H:%M:%S})"]
    p = job.progress
    if job.active:
        lines.append(f"  {p.get('phase')} {100 * (p.get('fraction') or 0):.0f}%  step {p.get('step')}/"
                     f"{p.get('max_steps')}  loss {_num(p.get('loss'))}  eta {_num(p.get('eta_s'))} s")
    if job.error:
        lines.append(f"  error: {job.error}")
    r = job.result
    if r:
        lines.append(f"  {r.get('status')}: candidate {r.get('candidate')} (dataset {r.get('dataset')}); "
                     f"{r.get('reason')}")
        lines.append("  timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in (r.get("timings") or {}).items()))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ jobs
@app.command()
def jobs(
    job_id: Annotated[int | None, typer.Argument(help="Show this job in detail.")] = None,
    config: ConfigOpt = None,
    home: HomeOpt = None,
    log: Annotated[bool, typer.Option("--log", help="With a job id: print the tail of its log.")] = False,
    limit: Annotated[int, typer.Option(help="How many jobs to list.")] = 20,
    as_json: JsonOpt = False,
) -> None:
    """List retraining jobs, or show one with its progress events."""
    from training.jobs import JobNotFound, runner_for

    services = _services(config, home)
    runner = runner_for(services)
    if job_id is None:
        items = runner.list(limit)
        _print([j.to_dict() for j in items], as_json, "\n".join(_job_text(j) for j in items) or "no jobs yet")
        return
    try:
        job = runner.get(job_id)
    except JobNotFound as e:
        raise _fail(str(e)) from e
    if as_json:
        _print({"job": job.to_dict(), "events": [e.to_dict() for e in runner.events(job_id)],
                "log": runner.log_tail(job_id) if log else None}, True, "")
        return
    typer.echo(_job_text(job))
    for ev in runner.events(job_id, kinds=("phase", "log", "error")):
        typer.echo(f"  {ev.created_at:%H:%M:%S} {ev.kind}: {ev.data.get('phase') or ev.data.get('message')}")
    if log:
        typer.echo(runner.log_tail(job_id))


@app.command()
def cancel(job_id: int, config: ConfigOpt = None, home: HomeOpt = None) -> None:
    """Ask a running job to stop (the process running it stops its training within seconds)."""
    from training.jobs import JobNotFound, runner_for

    services = _services(config, home)
    try:
        job = runner_for(services).cancel(job_id, by=_actor())
    except JobNotFound as e:
        raise _fail(str(e)) from e
    typer.echo(f"job {job.id}: {'cancel requested' if job.active else 'already ' + job.status}")


# ------------------------------------------------------------------------------------------ adapters
@app.command()
def adapters(config: ConfigOpt = None, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Adapter versions, the serving one, the rollback target and the serving history."""

    services = _services(config, home)
    reg = services.registry
    serving = reg.serving()
    try:
        target: str | None = reg.rollback_target()
        back = target or "the base model"
    except RegistryError:
        target, back = None, "nothing"
    versions = reg.list()
    if as_json:
        _print({"serving": serving, "rollback_target": target, "versions": [v.to_dict() for v in versions],
                "history": [e.to_dict() for e in reg.history(50)]}, True, "")
        return
    typer.echo(f"serving: {serving or 'the base model'}; rollback goes to: {back}")
    for v in versions:
        mark = "*" if v.name == serving else " "
        m = v.metrics
        typer.echo(f"{mark} {v.name}  gate {v.gate:7}  parent {v.parent or '-':6}  dataset {v.dataset or '-':6}  "
                   f"val_loss {_num(m.get('val_loss'))}  general_ppl {_num(m.get('general_ppl'))}  "
                   f"{v.created_at:%Y-%m-%d %H:%M}")


@app.command()
def report(name: str, config: ConfigOpt = None, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Print a version's evaluation report (markdown, or the full JSON)."""

    services = _services(config, home)
    try:
        v = services.registry.get(name)
    except RegistryError as e:
        raise _fail(str(e)) from e
    md = v.eval_dir / "report.md"
    if as_json:
        _print(v.report(), True, "")
    elif md.is_file():
        typer.echo(md.read_text(encoding="utf-8"))
    else:
        raise _fail(f"{name} has no evaluation report")


@app.command()
def promote(
    name: str,
    config: ConfigOpt = None,
    home: HomeOpt = None,
    force: Annotated[bool, typer.Option(help="Promote even though the gate failed it.")] = False,
    reason: Annotated[str | None, typer.Option(help="Recorded with the promotion.")] = None,
) -> None:
    """Serve this version (a running server switches within one scheduler tick)."""

    services = _services(config, home)
    try:
        res = services.registry.promote(name, actor=_actor(), reason=reason, force=force)
    except RegistryError as e:
        raise _fail(str(e)) from e
    typer.echo(f"serving {res.version} (was {res.previous or 'the base model'})")


@app.command()
def rollback(
    config: ConfigOpt = None,
    home: HomeOpt = None,
    reason: Annotated[str | None, typer.Option(help="Recorded with the rollback.")] = None,
) -> None:
    """Serve what served before the current version."""

    services = _services(config, home)
    try:
        res = services.registry.rollback(actor=_actor(), reason=reason)
    except RegistryError as e:
        raise _fail(str(e)) from e
    typer.echo(f"serving {res.version or 'the base model'} (was {res.previous})")


# ------------------------------------------------------------------------------------------ schedule
@app.command()
def schedule(
    config: ConfigOpt = None,
    home: HomeOpt = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="key=value (JSON value, else text).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show or change the automatic retraining schedule."""
    from memory.db import utcnow
    from training.scheduler import LoopSettings, due, load_loop_settings, loop_state, save_loop_settings

    services = _services(config, home)
    if set_:
        changes = {}
        for item in set_:
            key, sep, raw = item.partition("=")
            if not sep:
                raise _fail(f"--set takes key=value, got {item!r}", 2)
            try:
                changes[key.strip()] = json.loads(raw)
            except json.JSONDecodeError:
                changes[key.strip()] = raw
        try:
            save_loop_settings(services.store, changes, by=_actor())
        except ValueError as e:
            raise _fail(str(e), 2) from e
    ls = load_loop_settings(services.store)
    go, why = due(ls, loop_state(services.store), utcnow())
    if as_json:
        _print({"settings": ls.to_dict(), "due": go, "reason": why}, True, "")
        return
    helps = LoopSettings.help()
    for key, value in ls.to_dict().items():
        typer.echo(f"{key:20} {json.dumps(value):24} {helps[key]}")
    typer.echo(f"now: {'due' if go else 'not due'} ({why})")


if __name__ == "__main__":
    sys.exit(app())


# ------------------------------------------------------------------------------------------ readiness
@app.command()
def readiness(
    config: ConfigOpt = None,
    home: HomeOpt = None,
    build_json: Annotated[str | None, typer.Option("--build", help="Dataset build overrides, JSON.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """What a retrain would train and be judged on now, and what is missing (exit code 1 when not ready)."""
    from training.readiness import check_readiness

    services = _services(config, home)
    settings = services.settings
    knowledge = None
    if settings.chroma_url or settings.chroma_dir.exists():  # the passages answers cited, read-only
        from memory.knowledge import KnowledgeBase

        knowledge = KnowledgeBase(settings)
    r = check_readiness(services.store, settings, _json_arg(build_json, "--build"), knowledge=knowledge)
    rows = "\n".join(f"  {kind}: {n['train']} train, {n['validation']} validation, {n['heldout']} held out"
                     for kind, n in r.rows.items())
    _print(r.to_dict(), as_json, "\n".join([r.summary, rows, *(f"- {m}" for m in r.missing)]))
    if not r.ready:
        raise typer.Exit(1)
