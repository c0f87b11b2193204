"""The running server's parts, built from one `Settings`: the store, the model backend, the chat
service, the knowledge base and long-term memory, and the retraining loop's registry, job runner,
scheduler and admin actions.

`build_services(settings)` is the only place that opens the database, loads the model and the
knowledge base; nothing does that at import time. Every way in (HTTP API, page, CLI) is handed the
same `Services`. Place in the one-way rule: with the ways in (it holds training's registry and jobs).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from assistant.chat import ChatService
from assistant.config import Settings
from assistant.runtime import Backend, GenerationSettings, make_backend
from memory.store import Store
from training.registry import Registry

if TYPE_CHECKING:
    from assistant.admin_api import AdminActions
    from memory.knowledge import KnowledgeBase
    from memory.longterm import LongTermMemory
    from training.jobs import JobRunner
    from training.scheduler import Scheduler

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
    registry: Registry
    knowledge: KnowledgeBase | None = None  # None without the agent (`with_agent=False`)
    memories: LongTermMemory | None = None
    jobs: JobRunner | None = None  # made by `training.jobs.runner_for` on first use
    scheduler: Scheduler | None = None  # made by `training.scheduler.start_loop`
    admin: AdminActions | None = None  # made by `assistant.admin_api.install_admin`
    warm: threading.Event = field(default_factory=threading.Event)  # set once `warm_up` has run

    def warm_up(self) -> None:
        """Load what the first question would otherwise wait for: the embedder, the lexical index, and
        the model's compute kernels (one token). /health reports `warm` once this has run."""
        try:
            if self.knowledge is not None:
                self.knowledge.warm()
            self.backend.generate([{"role": "user", "content": "Hello"}], None,
                                  GenerationSettings(max_new_tokens=1, temperature=0.0, top_p=1.0))
        except Exception as exc:  # a failed warm-up only means a slower first answer; that answer reports errors
            log.warning("warm-up failed: %s: %s", type(exc).__name__, exc)
        finally:
            self.warm.set()

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
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
                        chat=ChatService(settings, store, backend), registry=Registry(settings, store))
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
    s.knowledge, s.memories = knowledge, memories
    s.chat.agent = Agent(s.settings, s.store, knowledge, memories, backend=s.backend)
