"""One mapping from an action's exceptions to HTTP answers, whichever router calls the action."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from assistant.actions.base import Conflict, LoginRequired, NotFound, TooLarge
from assistant.actions.library import Unavailable
from assistant.api import ApiError
from assistant.library_api import call_action
from training.jobs import JobBusy, JobNotFound
from training.registry import CorruptAdapter, UnknownVersion

ROOT = Path(__file__).resolve().parents[1]


def raises(exc: BaseException):
    def action():
        raise exc
    return action


@pytest.mark.parametrize(("exc", "status", "code"), [
    (LoginRequired("sign in"), 401, "invalid_api_key"),
    (PermissionError("admins only"), 403, "forbidden"),
    (JobBusy("job 3 is running"), 409, "job_running"),
    (CorruptAdapter("v0002 changed on disk"), 409, "adapter_corrupt"),
    (NotFound("document 'x' not found"), 404, "not_found"),
    (JobNotFound("job 9 not found"), 404, "not_found"),
    (UnknownVersion("no version v0009"), 404, "not_found"),
    (KeyError("x"), 404, "not_found"),
    (Conflict("cannot delete the last admin"), 409, "conflict"),
    (TooLarge("the file is over 20 MB"), 413, "too_large"),
    (Unavailable("documents are not available"), 503, "unavailable"),
    (ValueError("limit must be positive"), 400, "invalid_request_error"),
    (RuntimeError("the backend could not load v0002"), 409, "conflict"),
])
def test_each_exception_has_one_answer(exc, status, code):
    with pytest.raises(ApiError) as got:
        call_action(raises(exc))
    assert (got.value.status, got.value.code) == (status, code)


def test_a_result_passes_through():
    assert call_action(lambda a, b=0: a + b, 2, b=3) == 5


def mappings(source: str) -> list[str]:
    """Functions other than `call_action` with a `try` whose handlers turn several exceptions into ApiErrors."""
    found = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, ast.FunctionDef) or fn.name == "call_action":
            continue
        for t in ast.walk(fn):
            if isinstance(t, ast.Try) and sum("ApiError" in ast.unparse(h) for h in t.handlers) > 2:
                found.append(f"{fn.name} (line {fn.lineno})")
    return found


def test_no_router_keeps_its_own_mapping():
    """Every HTTP router calls `call_action`; none keeps its own copy of the mapping."""
    own = {p.name: mappings(p.read_text(encoding="utf-8")) for p in sorted((ROOT / "assistant").glob("*_api.py"))}
    assert not {k: v for k, v in own.items() if v}, own
    handlers = "".join(f"    except {e} as x:\n        raise ApiError(400, str(x), 'c') from x\n"
                       for e in ("KeyError", "ValueError", "OSError"))
    copy = "def _call(fn):\n    try:\n        return fn()\n" + handlers
    assert mappings(copy) == ["_call (line 1)"]
