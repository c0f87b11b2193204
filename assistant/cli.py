"""The `assistant` command: serve, manage users, documents and memories, chat in the terminal, prepare the model.

Every command builds one `Settings` from `--config`, `--home`, the environment (`ASSISTANT_*`) and its
own flags, and passes it down. User, document, memory and export commands call the same actions as
the HTTP API (`assistant.actions`); the operator running them has the server's files, so they act as
an admin, recorded in the audit log as `cli:<os user>`.

The document and memory commands open the knowledge base in this process. chromadb's embedded store
takes one writing process at a time, so while a server runs, add documents through its API
(`POST /v1/documents`) or point both at a `chroma run` server (`chroma_url`).
"""

from __future__ import annotations

import getpass
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from assistant.actions import conversations as export_actions
from assistant.actions.base import Operator
from assistant.actions.library import Library
from assistant.actions.personal import PersonalActions
from assistant.actions.users import UserAdmin
from assistant.config import Settings
from memory.documents import SUPPORTED
from memory.store import Store
from memory.types import User
from training.admin_cli import app as admin_app
from training.cli import app as data_app

T = TypeVar("T")

app = typer.Typer(help="A chat assistant that improves itself.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
user_app = typer.Typer(help="Manage users and API keys.", no_args_is_help=True)
model_app = typer.Typer(help="Manage the base model.", no_args_is_help=True)
docs_app = typer.Typer(help="Add, list and delete documents.", no_args_is_help=True)
memory_app = typer.Typer(help="List, edit and delete what the assistant remembers about a user.",
                         no_args_is_help=True)
app.add_typer(user_app, name="user")
app.add_typer(docs_app, name="docs")
app.add_typer(memory_app, name="memory")
app.add_typer(model_app, name="model")
app.add_typer(data_app, name="data")
app.add_typer(admin_app, name="admin")
personal_app = typer.Typer(help="Personal adapters: each opted-in user's own adapter, trained on their own feedback.",
                           no_args_is_help=True)
app.add_typer(personal_app, name="personal")

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML settings file.")]
HomeOpt = Annotated[Path | None, typer.Option("--home", help="State directory (default ~/.assistant).")]
ModelOpt = Annotated[str | None, typer.Option("--model", help="Base model: embedded id, hub id or folder.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def load_settings(config: Path | None, home: Path | None, **overrides) -> Settings:
    try:
        return Settings.load(config, home=home, **overrides)
    except (ValueError, OSError) as e:
        typer.secho(f"error: bad settings: {e}", fg="red", err=True)
        raise typer.Exit(2) from e


def open_store(settings: Settings) -> Store:
    settings.ensure_dirs()
    return Store.open(settings.db_url)


def operator() -> Operator:
    return Operator(f"cli:{getpass.getuser()}")


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(f"error: {message}", fg="red", err=True)
    return typer.Exit(code)


def act(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run an action; its refusal becomes an error line and exit code 2 (1 for a server-side failure)."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, LookupError, PermissionError) as e:
        raise fail(str(e).strip("'\"")) from e
    except RuntimeError as e:
        raise fail(str(e), 1) from e


def show(data: Any, as_json: bool, text: str) -> None:
    typer.echo(json.dumps(data, indent=2, default=str) if as_json else text)


def user_admin(settings: Settings, with_documents: bool = False) -> UserAdmin:
    """The account actions; with the knowledge base when a deletion must reach documents."""
    return UserAdmin(settings, open_store(settings), knowledge_base(settings) if with_documents else None)


def knowledge_base(settings: Settings) -> Any:
    from memory.knowledge import KnowledgeBase  # chromadb: loaded only by the commands that need it

    return KnowledgeBase(settings)


def library(settings: Settings, documents: bool = False, memories: bool = False) -> Library:
    store = open_store(settings)
    lt = None
    if memories:
        from memory.longterm import LongTermMemory  # the embedder: loaded only by the commands that need it

        lt = LongTermMemory(settings, store)
    return Library(settings, store, knowledge_base(settings) if documents else None, lt)


def named_user(settings: Settings, username: str | None, admin_default: bool = False) -> User:
    """The enabled user called `username`; without a name (where allowed) the first enabled admin."""
    store = open_store(settings)
    if username is None and admin_default:
        admins = [u for u in store.list_users() if u.is_admin and not u.disabled]
        if not admins:
            raise fail("no admin exists; create one with `assistant user add --admin NAME` or pass --user")
        return admins[0]
    user = store.get_user_by_name(username or "")
    if user is None:
        raise fail(f"no enabled user {username!r}")
    return user


@app.command()
def serve(
    config: ConfigOpt = None,
    home: HomeOpt = None,
    model: ModelOpt = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000).")] = None,
) -> None:
    """Serve the browser UI and the OpenAI-compatible API from one process."""
    from assistant.server import serve as run

    run(load_settings(config, home, model=model, host=host, port=port))


@user_app.command("add")
def user_add(
    username: str,
    admin: Annotated[bool, typer.Option("--admin", help="Give the user the admin role.")] = False,
    password: Annotated[str | None, typer.Option(help="Password (prompted when omitted).")] = None,
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Create a user and print a first API key."""
    settings = load_settings(config, home)
    password = password if password is not None else ask_password()
    made = act(user_admin(settings).create_user, operator(), username, password, admin)
    u = made["user"]
    typer.echo(f"created {u['role']} {u['username']!r} (id {u['id']})")
    typer.echo(f"API key (shown once): {made['api_key']}")


def ask_password() -> str:
    password = getpass.getpass("password: ")
    if password != getpass.getpass("again: "):
        raise fail("passwords differ")
    return password


@user_app.command("list")
def user_list(config: ConfigOpt = None, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """List users: id, name, role, whether disabled, how many API keys."""
    users = act(user_admin(load_settings(config, home)).list_users, operator())
    show(users, as_json, "\n".join(f"{u['id']}\t{u['username']}\t{u['role']}"
                                   f"{chr(9) + 'disabled' if u['disabled'] else ''}\tkeys: {u['api_keys']}"
                                   for u in users))


@user_app.command("key")
def user_key(username: str, name: str = "cli", config: ConfigOpt = None, home: HomeOpt = None) -> None:
    """Create another API key for a user (printed once)."""
    ua = user_admin(load_settings(config, home))
    target = act(ua.find, operator(), username)
    typer.echo(act(ua.create_key, operator(), target.id, name)["api_key"])


@user_app.command("keys")
def user_keys(username: str, config: ConfigOpt = None, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """List a user's API keys (id, name, prefix; never the key)."""
    ua = user_admin(load_settings(config, home))
    keys = act(ua.list_keys, operator(), act(ua.find, operator(), username).id)
    show(keys, as_json, "\n".join(f"{k['id']}\t{k['name']}\t{k['prefix']}...\t{k['created_at']}" for k in keys))


@user_app.command("revoke")
def user_revoke(username: str, key_id: int, config: ConfigOpt = None, home: HomeOpt = None) -> None:
    """Revoke one of a user's API keys (ids from `assistant user keys NAME`)."""
    ua = user_admin(load_settings(config, home))
    act(ua.revoke_key, operator(), act(ua.find, operator(), username).id, key_id)
    typer.echo(f"revoked key {key_id} of {username!r}")


@user_app.command("disable")
def user_disable(username: str, config: ConfigOpt = None, home: HomeOpt = None) -> None:
    """Disable a user: no login, no API key; their data stays."""
    ua = user_admin(load_settings(config, home))
    act(ua.set_disabled, operator(), act(ua.find, operator(), username).id, True)
    typer.echo(f"disabled {username!r}")


@user_app.command("enable")
def user_enable(username: str, config: ConfigOpt = None, home: HomeOpt = None) -> None:
    """Enable a disabled user again."""
    ua = user_admin(load_settings(config, home))
    act(ua.set_disabled, operator(), act(ua.find, operator(), username).id, False)
    typer.echo(f"enabled {username!r}")


@user_app.command("passwd")
def user_passwd(
    username: str,
    password: Annotated[str | None, typer.Option(help="New password (prompted when omitted).")] = None,
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Set a user's password."""
    ua = user_admin(load_settings(config, home))
    target = act(ua.find, operator(), username)
    act(ua.set_password, operator(), target.id, password if password is not None else ask_password())
    typer.echo(f"password of {username!r} changed")


@user_app.command("delete")
def user_delete(
    username: str,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    config: ConfigOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Delete a user and all their data: conversations, feedback, private documents, memories, uploads,
    and their rows in every dataset snapshot. Shared documents they added stay with the team."""
    settings = load_settings(config, home)
    ua = user_admin(settings, with_documents=True)
    target = act(ua.find, operator(), username)
    if not yes and not typer.confirm(f"delete {username!r} and all their data?"):
        raise typer.Exit(1)
    done = act(ua.delete_user, operator(), target.id)
    text = f"deleted {username!r}: " + ", ".join(f"{k} {v}" for k, v in done["deleted"].items())
    show(done, as_json, text)


# ------------------------------------------------------------------------------------------ documents
def document_files(paths: list[Path]) -> list[Path]:
    """Files named, and the supported files under folders named (sorted, hidden ones skipped)."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUPPORTED
                          and not any(part.startswith(".") for part in f.relative_to(p).parts))
        else:
            out.append(p)
    return out


@docs_app.command("add")
def docs_add(
    paths: Annotated[list[Path], typer.Argument(help="Files or folders (folders: every .txt/.md/.pdf/.html).")],
    shared: Annotated[bool, typer.Option("--shared", help="For the whole team (needs an admin user).")] = False,
    username: Annotated[str | None, typer.Option("--user", help="Whose documents (default: the first admin).")] = None,
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Add documents, one by one with a progress bar; a refused file is reported and the rest go in."""
    from tqdm import tqdm

    settings = load_settings(config, home)
    user = named_user(settings, username, admin_default=True)
    files = document_files(paths)
    if not files:
        raise fail("no supported files found (.txt, .md, .markdown, .pdf, .html, .htm)")
    lib = library(settings, documents=True)
    failed = 0
    for f in tqdm(files, desc="documents", unit="file", disable=len(files) < 2, file=sys.stderr):
        try:
            if not f.is_file():
                raise ValueError(f"{f} is not a file")
            info = lib.add_document(user, f.name, f.read_bytes(), "shared" if shared else "private")
        except (ValueError, PermissionError, OSError) as e:
            failed += 1
            tqdm.write(f"✗ {f}: {e}", file=sys.stderr)
            continue
        tqdm.write(f"✓ {f}: {info.doc_id} '{info.title}' ({info.chunks} chunks)")
    typer.echo(f"added {len(files) - failed} of {len(files)} documents for {user.username!r}"
               f" ({'shared' if shared else 'private'})")
    if failed:
        raise typer.Exit(1)


@docs_app.command("list")
def docs_list(
    username: Annotated[str | None, typer.Option("--user", help="Whose view (default: the first admin).")] = None,
    config: ConfigOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The user's documents and the shared ones: id, scope, chunks, file name, title."""
    settings = load_settings(config, home)
    docs = act(library(settings, documents=True).list_documents, named_user(settings, username, True))
    rows = [{"id": d.doc_id, "scope": d.scope, "chunks": d.chunks, "filename": d.filename, "title": d.title}
            for d in docs]
    show(rows, as_json, "\n".join(f"{r['id']}\t{r['scope']}\t{r['chunks']}\t{r['filename']}\t{r['title']}"
                                  for r in rows))


@docs_app.command("rm")
def docs_rm(
    doc_ids: Annotated[list[str], typer.Argument(help="Document ids (from `assistant docs list`).")],
    username: Annotated[str | None, typer.Option("--user", help="Whose documents (default: the first admin).")] = None,
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Delete documents with their chunks and the teacher pairs made from them."""
    settings = load_settings(config, home)
    lib = library(settings, documents=True)
    user = named_user(settings, username, True)
    for doc_id in doc_ids:
        d = act(lib.delete_document, user, doc_id)
        typer.echo(f"deleted {d.doc_id} '{d.title}': {d.chunks} chunks, {d.synthetic_pairs} teacher pairs")


# ------------------------------------------------------------------------------------------ memories
UserOpt = Annotated[str, typer.Option("--user", help="Whose memories.")]


@memory_app.command("list")
def memory_list(username: UserOpt, config: ConfigOpt = None, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """What the assistant remembers about a user now: id, kind, text."""
    settings = load_settings(config, home)
    mems = act(library(settings, memories=True).list_memories, named_user(settings, username))
    rows = [{"id": m.id, "kind": m.kind, "text": m.text, "source": m.source,
             "updated_at": m.updated_at.isoformat()} for m in mems]
    show(rows, as_json, "\n".join(f"{r['id']}\t{r['kind']}\t{r['text']}" for r in rows))


@memory_app.command("history")
def memory_history(memory_id: int, username: UserOpt, config: ConfigOpt = None, home: HomeOpt = None) -> None:
    """A memory and the older versions it replaced, newest first."""
    settings = load_settings(config, home)
    for m in act(library(settings, memories=True).memory_history, named_user(settings, username), memory_id):
        typer.echo(f"{m.id}\t{m.status}\t{m.updated_at:%Y-%m-%d %H:%M}\t{m.text}")


@memory_app.command("add")
def memory_add(text: str, username: UserOpt, config: ConfigOpt = None, home: HomeOpt = None) -> None:
    """Remember something for a user (the same fact again changes nothing; a contradicting one replaces)."""
    settings = load_settings(config, home)
    m = act(library(settings, memories=True).add_memory, named_user(settings, username), text)
    typer.echo(f"{m.id}\t{m.text}")


@memory_app.command("edit")
def memory_edit(memory_id: int, text: str, username: UserOpt, config: ConfigOpt = None,
                home: HomeOpt = None) -> None:
    """Replace a memory's text: a new version; the old one is kept as history and no longer used."""
    settings = load_settings(config, home)
    m = act(library(settings, memories=True).edit_memory, named_user(settings, username), memory_id, text)
    typer.echo(f"{m.id}\t{m.text}")


@memory_app.command("rm")
def memory_rm(memory_id: int, username: UserOpt, config: ConfigOpt = None, home: HomeOpt = None) -> None:
    """Delete a memory and every older version of it."""
    settings = load_settings(config, home)
    n = act(library(settings, memories=True).forget_memory, named_user(settings, username), memory_id)
    typer.echo(f"deleted memory {memory_id} ({n} version{'s' if n != 1 else ''})")


# ------------------------------------------------------------------------------------------ export
@app.command("export")
def export(
    username: Annotated[str, typer.Option("--user", help="Whose conversations.")],
    conversation: Annotated[int | None, typer.Option(help="One conversation id (default: all).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="json or markdown.")] = "json",
    out: Annotated[Path | None, typer.Option(help="Write to this file instead of standard output.")] = None,
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Export a user's conversations with their feedback, as JSON or Markdown."""
    if fmt not in export_actions.FORMATS:
        raise fail(f"--format must be one of {export_actions.FORMATS}")
    settings = load_settings(config, home)
    data = act(export_actions.export, open_store(settings), named_user(settings, username), conversation)
    text = export_actions.to_markdown(data) if fmt == "markdown" else json.dumps(data, indent=2, ensure_ascii=False)
    if out is None:
        typer.echo(text)
    else:
        out.write_text(text, encoding="utf-8")
        typer.echo(f"wrote {len(data['conversations'])} conversations to {out}", err=True)


@model_app.command("prepare")
def model_prepare(config: ConfigOpt = None, home: HomeOpt = None, model: ModelOpt = None) -> None:
    """Verify and convert (or download) the base model ahead of time, with a progress bar."""
    from assistant.models import prepare_model
    from assistant.server import quiet_network

    settings = load_settings(config, home, model=model)
    quiet_network(settings)
    settings.ensure_dirs()
    try:
        path = prepare_model(settings, progress=True)
    except (RuntimeError, ValueError, OSError) as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(1) from e
    typer.echo(f"model ready: {path}")


@app.command()
def chat(
    username: Annotated[str, typer.Option("--user", help="Who is chatting (logged under this user).")],
    model: Annotated[str, typer.Option(help="Model or adapter name.")] = "assistant",
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Chat in the terminal against the same runtime, logged like any other turn."""
    from assistant.chat import ChatError, TurnRequest
    from assistant.server import build_services

    settings = load_settings(config, home)
    services = build_services(settings)
    user = services.store.get_user_by_name(username)
    if user is None:
        typer.secho(f"error: no user {username!r}; create one with `assistant user add`", fg="red", err=True)
        raise typer.Exit(2)
    conversation_id = None
    typer.echo("Type a message; Ctrl-D or /quit to leave.")
    while True:
        try:
            text = input("you> ")
        except EOFError:
            break
        if text.strip() in ("/quit", "/exit"):
            break
        if not text.strip():
            continue
        try:
            reply = services.chat.reply(TurnRequest(user=user, text=text, model=model,
                                                    conversation_id=conversation_id, source="cli"))
            sys.stdout.write("assistant> ")
            for piece in reply:
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
        except ChatError as e:
            typer.secho(f"error: {e.message}", fg="red", err=True)
            continue
        if reply.conversation is not None:
            conversation_id = reply.conversation.id
    services.close()


# ------------------------------------------------------------------------------------------ personal adapters
PersonalUserOpt = Annotated[str, typer.Option("--user", help="Whose personal adapter.")]


def personal_actions(settings: Settings) -> PersonalActions:
    """The personal-adapter actions over this home's store and registry (no model is loaded)."""
    from types import SimpleNamespace

    from training.registry import Registry

    store = open_store(settings)
    services = SimpleNamespace(settings=settings, store=store, registry=Registry(settings, store), backend=None,
                               chat=None, knowledge=None, memories=None, jobs=None, scheduler=None, admin=None,
                               close=lambda: None)
    return PersonalActions(services)  # type: ignore[arg-type]


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@personal_app.command("list")
def personal_list(config: ConfigOpt = None, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Every user who opted in or has a personal adapter: serving version, versions kept, disk use."""
    settings = load_settings(config, home)
    rows = act(personal_actions(settings).overview, operator())
    show(rows, as_json, "\n".join(
        f"{r['username']}\t{'opted in' if r['opted_in'] else 'opted out'}\tserving {r['serving'] or '-'}\t"
        f"{r['versions']} versions\t{_mib(r['disk_bytes'])} of {_mib(r['disk_limit_bytes'])}" for r in rows)
        or "no personal adapters")


@personal_app.command("status")
def personal_status(username: PersonalUserOpt, config: ConfigOpt = None, home: HomeOpt = None,
                    as_json: JsonOpt = False) -> None:
    """A user's personal adapter: opted in or not, the version serving them, and what the next retrain waits for."""
    settings = load_settings(config, home)
    st = act(personal_actions(settings).status, named_user(settings, username))
    latest = st["latest"]
    text = (f"{username}: {st['state']}; serving {st['serving'] or 'the shared adapter'}"
            + (f"; newest {latest['name']} ({latest['gate']}: {latest['reason']})" if latest else "")
            + "".join(f"\n- {m}" for m in st["readiness"]["missing"]))
    show(st, as_json, text)


@personal_app.command("opt-in")
def personal_opt_in(username: PersonalUserOpt, config: ConfigOpt = None, home: HomeOpt = None) -> None:
    """Give a user a personal adapter: retrained on their own feedback and served to them alone."""
    settings = load_settings(config, home)
    st = act(personal_actions(settings).set_opt_in, named_user(settings, username), True)
    typer.echo(f"{username}: {st['state']}")


@personal_app.command("opt-out")
def personal_opt_out(username: PersonalUserOpt, config: ConfigOpt = None, home: HomeOpt = None) -> None:
    """Stop serving and training a user's personal adapter (it stays on disk until they forget it)."""
    settings = load_settings(config, home)
    st = act(personal_actions(settings).set_opt_in, named_user(settings, username), False)
    typer.echo(f"{username}: {st['state']}")


@personal_app.command("report")
def personal_report(username: PersonalUserOpt, version: Annotated[str | None, typer.Option(
        help="One of the user's versions (default: the newest).")] = None,
                    config: ConfigOpt = None, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """The evaluation report of a user's personal version, as Markdown."""
    settings = load_settings(config, home)
    rep = act(personal_actions(settings).report, named_user(settings, username), version)
    show(rep, as_json, rep["markdown"] or json.dumps(rep["report"], indent=2))


@personal_app.command("forget")
def personal_forget(
    username: PersonalUserOpt,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    config: ConfigOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Forget what the assistant learned from a user: delete their personal adapters and datasets, and leave their
    feedback so far out of every later build (shared and personal)."""
    settings = load_settings(config, home)
    user = named_user(settings, username)
    if not yes and not typer.confirm(f"delete {username!r}'s personal adapter and forget their feedback so far?"):
        raise typer.Exit(1)
    done = act(personal_actions(settings).forget, user)
    show(done, as_json, f"forgot {username!r}: " + ", ".join(f"{k} {v}" for k, v in done["deleted"].items()))


@personal_app.command("train")
def personal_train(
    username: str,
    steps: Annotated[int | None, typer.Option(help="Cap on optimizer steps per stage (TrainConfig.max_steps).")] = None,
    config: ConfigOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run a personal retrain of one user now, as a recorded job, and wait for its verdict."""
    from training.jobs import runner_for

    settings = load_settings(config, home)
    actions = personal_actions(settings)
    user = named_user(settings, username)
    job = act(actions.train, operator(), user.id, {"train": {"max_steps": steps}} if steps else {})
    typer.echo(f"job {job['id']} started", err=True)
    runner = runner_for(actions.services)
    try:
        done = runner.wait(job["id"])
    except KeyboardInterrupt:
        runner.cancel(job["id"], by=operator().name)
        done = runner.wait(job["id"])
    result = done.result
    show(done.to_dict(), as_json, f"job {done.id} {done.status}: " + (
        f"{result.get('candidate')} {result.get('status')} ({result.get('reason')})" if result else str(done.error)))
    if done.status != "succeeded":
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
