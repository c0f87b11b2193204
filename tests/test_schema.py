"""Who may write SQL against which table (README, "Layout").

`memory/schema.py` defines every table once, and names each table's owning module. The tables of
`memory/` (the conversation store, long-term memory) are read and written only by their owner; every
other module calls its named functions, so training never hand-writes SQL against the store's tables.
Training's own tables (jobs, adapter versions, loop settings, teacher pairs, personal settings) stay
inside `training/`. The API, the CLI and the page touch no table. The migrations keep their own
frozen per-version tables and are left out; tests and benchmarks may read tables directly to check
what was stored.
"""

from __future__ import annotations

import ast

from memory import schema
from tests.test_layers import modules

OWNERS = {
    "users": "memory.store", "api_keys": "memory.store", "conversations": "memory.store",
    "messages": "memory.store", "feedback": "memory.store", "admin_audit": "memory.store",
    "memories": "memory.longterm", "memory_tombstones": "memory.longterm",
    "synthetic_pairs": "training.synth",
    "training_jobs": "training.jobs", "job_events": "training.jobs",
    "adapter_versions": "training.registry", "adapter_serving": "training.registry",
    "loop_settings": "training.scheduler",
    "personal_settings": "training.personal_data",
}


def table_uses(tree: ast.AST) -> set[str]:
    """Tables a module takes from memory.schema: `from memory.schema import x` or `schema.x`."""
    tables = set(schema.metadata.tables)
    used: set[str] = set()
    schema_aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "memory.schema":
            used |= {a.name for a in node.names} & tables
        elif isinstance(node, ast.ImportFrom) and node.module == "memory":
            schema_aliases |= {a.asname or a.name for a in node.names if a.name == "schema"}
        elif isinstance(node, ast.Import):
            schema_aliases |= {a.asname or a.name for a in node.names if a.name == "memory.schema"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in tables:
            if ast.unparse(node.value) in schema_aliases:
                used.add(node.attr)
    return used


def test_every_table_has_an_owner():
    assert set(schema.metadata.tables) <= set(OWNERS), "name the owning module of each new table here"


def may_use(module: str, table: str) -> bool:
    owner = OWNERS.get(table, "")
    return module == owner or (owner.startswith("training.") and module.startswith("training."))


def test_only_a_tables_owner_queries_it():
    wrong = []
    for name, path in modules().items():
        if name in ("memory.schema", "memory.migrations"):
            continue
        for table in sorted(table_uses(ast.parse(path.read_text(encoding="utf-8")))):
            if not may_use(name, table):
                wrong.append(f"{name} uses table {table} (owned by {OWNERS.get(table)}): call a named function there")
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_a_table_used_elsewhere():
    tree = ast.parse("from memory.schema import feedback\nfrom memory import schema as s\nx = s.training_jobs.c.id\n")
    assert table_uses(tree) == {"feedback", "training_jobs"}
    assert not may_use("training.dataset_build", "feedback") and not may_use("assistant.api", "training_jobs")
    assert may_use("memory.store", "feedback") and may_use("training.personal", "training_jobs")
