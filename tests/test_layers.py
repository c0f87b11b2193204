"""The one-way rule, checked on the source (README, "Layout").

    memory  <-  assistant core  <-  training  <-  actions and services  <-  the ways in

- `memory/`: the store, the knowledge base, long-term memory.
- assistant core: configuration, models, runtime, prompt, tools, agent, chat.
- `training/`: datasets, teacher, training, gate, registry, jobs, scheduler.
- actions and services: `assistant/actions/` (every action, once) and `assistant/services.py` (the
  server's parts, built from one `Settings`).
- the ways in: the HTTP API (`assistant/api.py`, `admin_api.py`, `library_api.py`, `users_api.py`,
  `personal_api.py`), the command lines (`assistant/cli.py`, `training/cli.py`, `training/admin_cli.py`), the
  composition root (`assistant/server.py`) and the page (`ui/`).

A module may import from its own layer or the layers below, never above, wherever the import sits
(module level or inside a function); imports under `TYPE_CHECKING` are type names only and are left
out. And no two of our modules import each other, directly or round a longer cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("memory", "assistant", "training", "ui")
WAYS_IN = {"assistant.api", "assistant.admin_api", "assistant.library_api", "assistant.users_api",
           "assistant.personal_api", "assistant.cli",
           "assistant.server", "training.cli", "training.admin_cli"}
LAYERS = ("memory", "assistant core", "training", "actions and services", "ways in")


def layer(module: str) -> int:
    top = module.split(".")[0]
    if top == "memory":
        return 0
    if top == "ui" or module in WAYS_IN:
        return 4
    if module == "assistant.services" or module.startswith("assistant.actions"):
        return 3
    return 2 if top == "training" else 1


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = f
    return out


def imports(path: Path, known: dict[str, Path]) -> dict[str, int]:
    """Our modules imported by `path` (outside TYPE_CHECKING blocks) -> the line of the first import."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    type_only = {id(n) for node in ast.walk(tree)
                 if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    found: dict[str, int] = {}
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            if (target := resolve(n)) is not None:
                found.setdefault(target, node.lineno)
    return found


def graph() -> dict[str, dict[str, int]]:
    known = modules()
    return {m: {t: line for t, line in imports(f, known).items() if t != m} for m, f in known.items()}


def test_imports_point_one_way():
    wrong = [f"{m} ({LAYERS[layer(m)]}) imports {t} ({LAYERS[layer(t)]}) on line {line}"
             for m, targets in graph().items() for t, line in targets.items() if layer(t) > layer(m)]
    assert not wrong, "imports against the one-way rule:\n" + "\n".join(wrong)


def test_no_import_cycles():
    g = graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the path, 2 done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(g[m]):
            if state.get(t) == 1:
                cycles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_rule_sees_a_wrong_way_import(tmp_path):
    """The check itself can fail: a memory module importing the server is caught."""
    known = modules()
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from assistant.server import create_app\n")
    found = imports(bad, known)
    assert found == {"assistant.server": 2} and layer("assistant.server") > layer("memory.store")


def _declared() -> set[str]:
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"]) + [d for extra in project["optional-dependencies"].values() for d in extra]
    return {re.split(r"[\[<>=!~; ]", s, maxsplit=1)[0].lower().replace("_", "-") for s in specs}


def test_every_direct_import_is_declared():
    """A third-party module imported by our code, benchmarks or tests comes from a package that
    pyproject.toml names (not only from something another package happens to pull in)."""
    import importlib.metadata
    import sys

    dists = importlib.metadata.packages_distributions()
    declared = _declared()
    undeclared: dict[str, set[str]] = {}
    for folder in (*PACKAGES, "bench", "tests"):
        for f in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for top in {n.split(".")[0] for n in names}:
                    if top in sys.stdlib_module_names or top in (*PACKAGES, "bench", "tests"):
                        continue
                    owners = {d.lower().replace("_", "-") for d in dists.get(top, [top])}
                    if not owners & declared:
                        undeclared.setdefault(top, set()).add(str(f.relative_to(ROOT)))
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
