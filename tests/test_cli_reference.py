"""docs/cli.md is generated from the command line; it must match what the CLI says now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_is_current():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "cli_reference.py"), "--check"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert out.returncode == 0, out.stderr + "\n(regenerate it with `make docs`)"
    text = (ROOT / "docs" / "cli.md").read_text()
    for command in ("assistant serve", "assistant user delete", "assistant docs add", "assistant admin promote"):
        assert f"## `{command}`" in text
