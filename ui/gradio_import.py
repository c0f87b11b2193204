"""Import gradio without the type stubs it writes while importing.

In: nothing. Out: `skip_stub_writing()`, called by the server before it first imports gradio.

Gradio's component metaclass (`gradio.component_meta.create_or_modify_pyi`) reads and parses the
source of every component class as it is defined, and writes `.pyi` stubs for editors beside it in
site-packages. That was 3.6 s of gradio's 4.5 s import on the 2-core dev box (AMD EPYC, AVX2), paid
on every start of the server, for files that nothing at run time reads. A one-shot import hook
replaces the function with a no-op as soon as gradio defines it, before any component class exists.
It acts only on the gradio release it was checked against; on another one gradio imports as usual.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any

CHECKED_GRADIO = "6.31.0"  # the release whose create_or_modify_pyi only writes stubs
_MODULE = "gradio.component_meta"


def _no_stubs(*args: Any, **kwargs: Any) -> None:
    return None


class _SkipStubs(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != _MODULE:
            return None
        sys.meta_path.remove(self)  # one shot: every later import goes the usual way
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            if callable(getattr(module, "create_or_modify_pyi", None)):
                module.create_or_modify_pyi = _no_stubs

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def skip_stub_writing() -> bool:
    """Install the hook if gradio is not imported yet and is the checked release. Returns whether it did."""
    if _MODULE in sys.modules or any(isinstance(f, _SkipStubs) for f in sys.meta_path):
        return False
    try:
        if version("gradio") != CHECKED_GRADIO:
            return False
    except PackageNotFoundError:
        return False
    sys.meta_path.insert(0, _SkipStubs())
    return True
