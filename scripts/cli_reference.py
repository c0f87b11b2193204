"""Write docs/cli.md from the command line itself, so the reference cannot drift from the code.

    .venv/bin/python scripts/cli_reference.py          # rewrite docs/cli.md
    .venv/bin/python scripts/cli_reference.py --check  # exit 1 if docs/cli.md is out of date (CI)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from assistant.cli import app

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "docs" / "cli.md"


def _params(cmd: Any) -> list[str]:
    """Typer's commands are click commands (typer vendors click), read through click's attributes."""
    rows = []
    for p in cmd.params:
        if getattr(p, "hidden", False):
            continue
        if p.param_type_name == "argument":
            name = (p.metavar or p.name or "").upper()
            help_text = " ".join((getattr(p, "help", None) or "").split())
            kind = f"argument{'s' if p.nargs == -1 else ''}{'' if p.required else ', optional'}"
            rows.append(f"| `{name}` | {help_text or kind} | |")
            continue
        flags = ", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
        default = "" if p.default in (None, False, (), []) or callable(p.default) else f"`{p.default}`"
        rows.append(f"| {flags} | {' '.join((p.help or '').split())} | {default} |")
    return rows


def _walk(cmd: Any, path: list[str]) -> list[str]:
    out: list[str] = []
    if hasattr(cmd, "commands"):
        for name in sorted(cmd.commands):
            sub = cmd.commands[name]
            if not sub.hidden:
                out += _walk(sub, [*path, name])
        return out
    help_text = " ".join((cmd.help or "").split())
    out += [f"## `{' '.join(path)}`", "", help_text, ""]
    rows = _params(cmd)
    if rows:
        out += ["| argument or option | meaning | default |", "|---|---|---|", *rows, ""]
    return out


def render() -> str:
    root = typer.main.get_command(app)
    lines = ["# Command line reference", "",
             "Generated from the command line by `scripts/cli_reference.py` (`make docs`); a test fails when it",
             "is out of date. Every command also takes `--help`.", ""]
    return "\n".join(lines + _walk(root, ["assistant"])).rstrip() + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv[1:]:
        if not TARGET.exists() or TARGET.read_text(encoding="utf-8") != text:
            print(f"{TARGET.relative_to(ROOT)} is out of date: run `make docs`", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text, encoding="utf-8")
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
