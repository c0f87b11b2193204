"""Start-up: build every service from one `Settings`, then serve API and UI from one process.

`build_services(settings)` is the only place that opens the database, loads the model and the
knowledge base; nothing does that at import time. `create_app(services)` returns the FastAPI app
with the API routes and (when the `ui` package is importable) the Gradio UI mounted at `/`.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from assistant.actions.library import Library
from assistant.actions.users import UserAdmin
from assistant.admin_api import install_admin
from assistant.api import create_api
from assistant.chat import ChatService
from assistant.config import Settings
from assistant.library_api import install_library
from assistant.runtime import Backend, make_backend
from assistant.users_api import install_users
from memory.store import Store

log = logging.getLogger("assistant")

OFFLINE_ENV = {
    # No telemetry, no version checks, no hub lookups: nothing leaves the machine unless configured.
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    "ANONYMIZED_TELEMETRY": "False",
    "TOKENIZERS_PARALLELISM": "false",
    "DO_NOT_TRACK": "1",
    "ORT_DISABLE_TELEMETRY": "1",  # ONNX Runtime (the embedder) phones home otherwise
}


def quiet_network(settings: Settings) -> None:
    """Called by entry points before heavy imports; the hub stays reachable only for hub models."""
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    if settings.model.startswith("embedded:") or os.path.isdir(settings.model):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class Services:
    settings: Settings
    store: Store
    backend: Backend
    chat: ChatService
    extras: dict[str, Any] = field(default_factory=dict)  # knowledge base, memories, registry...
    warm: threading.Event = field(default_factory=threading.Event)  # set once `warm_up` has run

    def warm_up(self) -> None:
        """Load what the first question would otherwise wait for: the embedder, the lexical index, and
        the model's compute kernels (one token). /health reports `warm` once this has run."""
        try:
            knowledge = self.extras.get("knowledge")
            if knowledge is not None:
                knowledge.warm()
            from assistant.runtime import GenerationSettings

            self.backend.generate([{"role": "user", "content": "Hello"}], None,
                                  GenerationSettings(max_new_tokens=1, temperature=0.0, top_p=1.0))
        except Exception as exc:  # a failed warm-up only means a slower first answer; that answer reports errors
            log.warning("warm-up failed: %s: %s", type(exc).__name__, exc)
        finally:
            self.warm.set()

    def close(self) -> None:
        scheduler = self.extras.get("scheduler")
        if scheduler is not None:
            scheduler.stop()
        close_backend = getattr(self.backend, "close", None)  # the OpenAI backend holds no thread
        if close_backend is not None:
            close_backend()
        self.store.close()


def build_services(settings: Settings, backend: Backend | None = None, with_agent: bool = True) -> Services:
    """Open the store (migrating it), load the model and wire the chat service."""
    quiet_network(settings)
    settings.ensure_dirs()
    store = Store.open(settings.db_url)
    backend = backend or make_backend(settings)
    services = Services(settings=settings, store=store, backend=backend,
                        chat=ChatService(settings, store, backend))
    if with_agent:
        attach_agent(services)
    return services


def attach_agent(services: Services) -> None:
    """Memory + documents + tools (the embedder and vector store load lazily, on first use)."""
    from assistant.agent import Agent
    from memory.knowledge import KnowledgeBase
    from memory.longterm import LongTermMemory

    s = services
    knowledge = KnowledgeBase(s.settings)
    memories = LongTermMemory(s.settings, s.store)
    s.extras.update(knowledge=knowledge, memories=memories)
    s.chat.agent = Agent(s.settings, s.store, knowledge, memories, backend=s.backend)


def create_app(services: Services, with_ui: bool = True) -> FastAPI:
    # No Swagger/ReDoc pages: they load scripts from a CDN. The schema stays at /openapi.json.
    app = FastAPI(title="Self-improving assistant", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.services = services
    # Our own CORS policy: no origin but the page's own unless configured, and never with credentials.
    # Gradio adds none of its own (it allowed credentialed requests from any localhost origin) when the
    # host app has one.
    app.add_middleware(CORSMiddleware, allow_origins=services.settings.cors_origins, allow_credentials=False,
                       allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"], allow_headers=["Authorization",
                                                                                           "Content-Type"])
    create_api(app, services.store, services.chat)
    install_admin(app, services)  # /v1/admin/...: the retraining loop's admin actions
    knowledge = services.extras.get("knowledge")
    install_library(app, Library(services.settings, services.store, knowledge, services.extras.get("memories")))
    install_users(app, UserAdmin(services.settings, services.store, knowledge))  # /v1/admin/users, /v1/admin/audit
    if with_ui:
        from ui.gradio_import import skip_stub_writing

        skip_stub_writing()  # 2.7 s of gradio's import writes editor stubs (ui/gradio_import.py)
        from ui.app import mount_ui  # gradio is heavy: imported only when the UI is wanted

        app = mount_ui(app, services)
    return app


def serve(settings: Settings) -> None:
    import uvicorn

    from training.scheduler import start_loop

    services = build_services(settings)
    app = create_app(services)
    # Recover jobs a crash left running, load the recorded serving adapter, start the (opt-in) scheduler.
    start_loop(services)
    # The embedder, the lexical index and the model's kernels load beside start-up.
    threading.Thread(target=services.warm_up, name="warm-up", daemon=True).start()
    log.warning("serving on http://%s:%d", settings.host, settings.port)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
