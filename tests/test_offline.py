"""Nothing leaves the machine at run time: `assistant serve` in a network namespace whose every
outbound packet is recorded (tests/netwatch.py), driven from outside over a private link.

The namespace has loopback, a veth link to the test (the only way in), and a TUN device holding the
default routes (IPv4 and IPv6) with a watcher on it; its resolv.conf names a server behind the TUN.
So a DNS lookup or a TCP connection attempt from any code in the server (Python, ONNX Runtime's C++
telemetry, a subprocess) shows up as a line in the watcher's log, and fails as it would offline.

The server runs on its own defaults (the real embedded embedder, so ONNX Runtime runs retrieval),
with a tiny model. The test logs in, uploads a document through the page, chats about it through the
API (plain and streamed), rates the answer, and asks the page's file route and an event for URLs. The
watcher must record nothing. First it proves it can: a name lookup and a TCP connection made in the
namespace on purpose are both recorded.

Needs root and iproute2 (`ip netns`), as on the CI machine; skipped with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import free_port
from tests.test_security import gradio_upload, make_user, product_env

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def watched_namespace(tmp: Path) -> Iterator[tuple[str, str, Path]]:
    """(namespace, the server's address on the link, the watcher's log)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to make a network namespace")
    ns, n = f"asst-{os.getpid()}", os.getpid() % 250
    host_if, ns_if = f"vh{os.getpid()}"[:15], f"vn{os.getpid()}"[:15]
    try:
        _ip("netns", "add", ns)
    except subprocess.CalledProcessError as e:
        pytest.skip(f"cannot make a network namespace here: {e.stderr.strip()}")
    etc = Path("/etc/netns") / ns
    log = tmp / "outbound.jsonl"
    log.touch()
    watcher = None
    try:
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text("nameserver 10.99.0.53\noptions timeout:1 attempts:1\n")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "tuntap", "add", "dev", "tun0", "mode", "tun")
        _ip("-n", ns, "addr", "add", "10.99.0.1/24", "dev", "tun0")
        _ip("-n", ns, "addr", "add", "fd00:99::1/64", "dev", "tun0", "nodad")
        _ip("-n", ns, "link", "set", "tun0", "up")
        _ip("-n", ns, "route", "add", "default", "dev", "tun0")
        _ip("-n", ns, "-6", "route", "add", "default", "dev", "tun0")
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", ns)
        _ip("addr", "add", f"10.213.{n}.1/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", ns, "addr", "add", f"10.213.{n}.2/30", "dev", ns_if)
        _ip("-n", ns, "link", "set", ns_if, "up")
        watcher = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, str(ROOT / "tests" / "netwatch.py"),
                                    "tun0", str(log)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert watcher.stdout is not None and watcher.stdout.readline().strip() == b"ready", watcher.stderr
        yield ns, f"10.213.{n}.2", log
    finally:
        if watcher is not None:
            watcher.kill()
            watcher.wait()
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "del", host_if)
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("netns", "del", ns)
        shutil.rmtree(etc, ignore_errors=True)


def recorded(log: Path, settle_s: float = 1.5) -> list[dict]:
    time.sleep(settle_s)  # the watcher writes as packets arrive
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def in_ns(ns: str, code: str, env: dict[str, str]) -> None:
    subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], env=env, capture_output=True,
                   timeout=60)


@contextlib.contextmanager
def serve_in(ns: str, address: str, home: Path, env: dict[str, str], *args: str) -> Iterator[str]:
    port = free_port()
    out = (home.parent / "serve.log").open("w")
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "assistant.cli", "serve", "--home",
                             str(home), "--host", address, "--port", str(port), *args],
                            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{address}:{port}"
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, Path(out.name).read_text(errors="replace")[-4000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).json().get("warm"):
                    break
            assert time.time() < deadline, Path(out.name).read_text(errors="replace")[-4000:]
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
        out.close()


def upload_event(client: httpx.Client, url: str) -> int:
    cfg = client.get(url + "/config").json()
    button = next(c["id"] for c in cfg["components"] if c.get("props", {}).get("elem_id") == "doc-upload")
    return next(d.get("id", i) for i, d in enumerate(cfg["dependencies"]) if [button, "click"] in d["targets"])


def test_the_watcher_sees_lookups_and_connections(tmp_path):
    with watched_namespace(tmp_path) as (ns, _, log):
        env = product_env(tmp_path)
        in_ns(ns, "import socket\ntry: socket.getaddrinfo('probe.example.com', 443)\nexcept OSError: pass", env)
        in_ns(ns, "import socket; s = socket.socket(); s.settimeout(1); s.connect_ex(('93.184.216.34', 80))", env)
        seen = recorded(log)
    assert {"kind": "dns", "name": "probe.example.com", "to": "10.99.0.53"} in seen, seen
    assert {"kind": "tcp", "to": "93.184.216.34:80"} in seen, seen


def test_serve_reaches_nothing_outside(tmp_path, tiny_model_dir):
    with watched_namespace(tmp_path) as (ns, address, log):
        env = product_env(tmp_path)
        home = tmp_path / "home"
        key = make_user(home, env, "dora", "dora-password-1")
        with serve_in(ns, address, home, env, "--model", str(tiny_model_dir)) as url, \
                httpx.Client(timeout=300) as client:
            assert client.post(url + "/login", data={"username": "dora", "password": "dora-password-1"}).is_success
            doc = (ROOT / "tests" / "data" / "docs" / "pricing.md").read_bytes()
            done = gradio_upload(client, url, "pricing.md", doc)
            assert done.get("success") is True, done
            auth = {"Authorization": f"Bearer {key}"}
            body = {"messages": [{"role": "user", "content": "How much does the team plan cost?"}], "max_tokens": 8}
            for _ in range(2):  # retrieval runs ONNX Runtime each time
                r = client.post(url + "/v1/chat/completions", headers=auth, json=body)
                assert r.status_code == 200, r.text
                assert r.json()["sources"], "the answer should have used the uploaded document"
            r = client.post(url + "/v1/feedback/thumb", headers=auth,
                            json={"message_id": r.json()["message_id"], "rating": 1})
            assert r.status_code == 200
            with client.stream("POST", url + "/v1/chat/completions", headers=auth, json={**body, "stream": True}) as s:
                assert any("[DONE]" in line for line in s.iter_lines())
            # The page's file route and events never fetch a URL for a user.
            for target in ("https://example.com/a.md", "http://example.org/b.txt"):
                assert client.get(url + f"/gradio_api/file={target}").status_code == 404
                assert client.get(url + f"/gradio_api/proxy={target}").status_code == 404
            file_data = {"path": "https://example.com/a.md", "url": "https://example.com/a.md", "orig_name": "a.md",
                         "meta": {"_type": "gradio.FileData"}}
            r = client.post(url + "/gradio_api/queue/join",
                            json={"data": [[file_data], "private"], "event_data": None, "trigger_id": None,
                                  "fn_index": upload_event(client, url), "session_hash": "dora-url"})
            assert r.status_code == 400, r.text
        seen = recorded(log)
    assert seen == [], f"the server reached out: {seen[:10]}"
