"""The `assistant` command: serve, manage users, chat in the terminal, prepare the model.

Every command builds one `Settings` from `--config`, `--home`, the environment (`ASSISTANT_*`) and its
own flags, and passes it down.
"""

from __future__ import annotations

import getpass
import sys
from pathlib import Path
from typing import Annotated

import typer

from assistant.config import Settings
from training.admin_cli import app as admin_app
from training.cli import app as data_app

app = typer.Typer(help="A chat assistant that improves itself.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
user_app = typer.Typer(help="Manage users and API keys.", no_args_is_help=True)
model_app = typer.Typer(help="Manage the base model.", no_args_is_help=True)
app.add_typer(user_app, name="user")
app.add_typer(model_app, name="model")
app.add_typer(data_app, name="data")
app.add_typer(admin_app, name="admin")

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML settings file.")]
HomeOpt = Annotated[Path | None, typer.Option("--home", help="State directory (default ~/.assistant).")]
ModelOpt = Annotated[str | None, typer.Option("--model", help="Base model: embedded id, hub id or folder.")]


def load_settings(config: Path | None, home: Path | None, **overrides) -> Settings:
    try:
        return Settings.load(config, home=home, **overrides)
    except (ValueError, OSError) as e:
        typer.secho(f"error: bad settings: {e}", fg="red", err=True)
        raise typer.Exit(2) from e


def open_store(settings: Settings):
    from memory.store import Store

    settings.ensure_dirs()
    return Store.open(settings.db_url)


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
    if password is None:
        password = getpass.getpass("password: ")
        if password != getpass.getpass("again: "):
            typer.secho("error: passwords differ", fg="red", err=True)
            raise typer.Exit(2)
    store = open_store(settings)
    try:
        user = store.create_user(username, password, role="admin" if admin else "user")
    except ValueError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from e
    key = store.create_api_key(user.id)
    typer.echo(f"created {user.role} {user.username!r} (id {user.id})")
    typer.echo(f"API key (shown once): {key}")


@user_app.command("list")
def user_list(config: ConfigOpt = None, home: HomeOpt = None) -> None:
    """List users and their roles."""
    for u in open_store(load_settings(config, home)).list_users():
        typer.echo(f"{u.id}\t{u.username}\t{u.role}")


@user_app.command("key")
def user_key(username: str, name: str = "cli", config: ConfigOpt = None, home: HomeOpt = None) -> None:
    """Create another API key for a user."""
    store = open_store(load_settings(config, home))
    user = store.get_user_by_name(username)
    if user is None:
        typer.secho(f"error: no user {username!r}", fg="red", err=True)
        raise typer.Exit(2)
    typer.echo(store.create_api_key(user.id, name=name))


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


if __name__ == "__main__":
    app()
