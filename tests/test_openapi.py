"""The OpenAPI schema describes every route of the HTTP API, with an example (issue: operators script
against it). Built from the real app's routers, without a model."""

from __future__ import annotations

from fastapi import FastAPI

from assistant.admin_api import build_admin_router, build_lora_router
from assistant.api import build_router
from assistant.library_api import build_library_router
from assistant.users_api import build_users_router


def schema() -> dict:
    app = FastAPI()
    for router in (build_router(), build_admin_router(), build_lora_router(), build_library_router(),
                   build_users_router()):
        app.include_router(router)
    return app.openapi()


def has_example(node: object) -> bool:
    if isinstance(node, dict):
        return "example" in node or "examples" in node or any(has_example(v) for v in node.values())
    if isinstance(node, list):
        return any(has_example(v) for v in node)
    return False


def test_every_route_has_a_summary_and_an_example():
    spec = schema()
    components = spec.get("components", {}).get("schemas", {})
    missing = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            body_ref = str(op.get("requestBody", {}))
            body_examples = any(has_example(components[name]) for name in components if f"/{name}'" in body_ref)
            if not op.get("summary") or not (has_example(op.get("responses")) or has_example(op) or body_examples):
                missing.append(f"{method.upper()} {path}")
    assert len(spec["paths"]) >= 30
    assert not missing, f"routes without a summary or an example: {missing}"
