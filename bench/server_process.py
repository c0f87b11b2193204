"""Start-up shared by the benchmarks that drive `assistant serve` as a separate process (load.py, loop.py).

Imported as `bench.server_process` by the benchmarks, which run as modules from the repository root.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_model(cache: Path) -> Path:
    """The embedded model converted once into `cache` (reused by later runs)."""
    out = subprocess.run([sys.executable, "-m", "assistant.cli", "model", "prepare", "--home", str(cache)],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    return Path(re.search(r"model ready: (.+)", out.stdout).group(1).strip())


def start_server(home: Path, model: str, port: int, env: dict[str, str], timeout_s: float = 600,
                 poll_s: float = 0.5) -> subprocess.Popen:
    """`assistant serve` in its own session (so the caller can kill its process group), logging to
    `<home>/../server.log`; returns once /health answers.

    The server is in another session, so a plain `kill` of the benchmark would leave it (and any
    training child) running and skew every later measurement: SIGTERM is turned into SystemExit here,
    which runs the caller's `finally` that stops the server's process group."""
    import httpx

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    log = open(home.parent / "server.log", "w")  # noqa: SIM115 - the server's whole life
    proc = subprocess.Popen([sys.executable, "-m", "assistant.cli", "serve", "--home", str(home), "--model", model,
                             "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see {log.name}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)
    raise SystemExit(f"server did not start in {timeout_s:.0f} s")
