"""A real server in a background thread, for tests that talk HTTP to it."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from assistant.config import Settings
from assistant.server import Services, build_services, create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerThread:
    services: Services
    server: uvicorn.Server
    thread: threading.Thread
    url: str
    counter: dict[str, int] = field(default_factory=lambda: {"calls": 0})

    @property
    def calls(self) -> int:
        """How many generations the backend has started (a spy, not a fake)."""
        return self.counter["calls"]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.services.close()


def count_calls(services: Services, counter: dict[str, int]) -> None:
    real = services.backend.stream

    def stream(*args: Any, **kwargs: Any):
        counter["calls"] += 1
        return real(*args, **kwargs)

    services.backend.stream = stream  # type: ignore[method-assign]


def start_server(home: Path, model_dir: Path, adapters: dict[str, Path] | None = None, *,
                 with_ui: bool = False, with_agent: bool = False, **overrides: Any) -> ServerThread:
    port = free_port()
    overrides.setdefault("dtype", "float32")  # batched answers equal answers alone (tests/conftest.py, tiny_settings)
    settings = Settings.load(env={}, home=home, model=str(model_dir), port=port, torch_threads=1, **overrides)
    services = build_services(settings, with_agent=with_agent)
    for name, path in (adapters or {}).items():
        services.backend.load_adapter(name, path)
    srv = ServerThread(services=services, server=None, thread=None, url=f"http://127.0.0.1:{port}")  # type: ignore[arg-type]
    count_calls(services, srv.counter)
    app = create_app(services, with_ui=with_ui)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(srv.url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    else:
        raise RuntimeError("server did not start")
    srv.server, srv.thread = server, thread
    return srv
