"""The page's own routes against a hostile logged-in user (docs/security.md, "The page").

Through the real app (`create_app` with the Gradio page mounted, tiny model, tiny embedder, real SQLite
and chromadb), with Gradio's own upload, event and file routes driven as the browser drives them:

- an event may name only files that this login uploaded: a server path, a URL or another user's
  upload is refused before Gradio reads it, and nothing is ingested;
- uploads live under the home folder and are gone after ingestion or refusal;
- the file route serves a login only its own uploads, and never fetches a URL;
- routes the page never calls (dev reload, monitoring, proxy, run/api/call) answer 404, not 500;
- a page session belongs to the login that first used it;
- the login throttle counts per client address and name;
- no CORS grant to other origins.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from assistant.config import Settings
from assistant.server import build_services, create_app
from tests.test_security import gradio_event
from ui.auth import gradio_sub_app
from ui.uploads import PageUploads

ROOT = Path(__file__).resolve().parents[1]
SECRET = "quokka-secret-9931"
PASSWORDS = {"ann": "ann-password-1", "ben": "ben-password-1"}


@pytest.fixture(scope="module")
def page(tmp_path_factory, tiny_model_dir, tiny_embedder_dir):
    home = tmp_path_factory.mktemp("page-home")
    settings = Settings.load(env={}, home=home, model=str(tiny_model_dir), torch_threads=1,
                             embedder=str(tiny_embedder_dir), max_new_tokens=4)
    services = build_services(settings, with_agent=True)
    for name, pw in PASSWORDS.items():
        services.store.create_user(name, pw)
    app = create_app(services, with_ui=True)
    # A file outside the upload folder that a hostile client will name.
    outside = home / "outside-secret.md"
    outside.write_text(f"# Server file\n\nThe secret is {SECRET}.\n")
    yield services, app, outside
    services.close()


def client_for(app, name: str | None, address: str = "10.0.0.1") -> TestClient:
    c = TestClient(app, base_url="http://127.0.0.1", client=(address, 50000))
    if name:
        r = c.post("/login", data={"username": name, "password": PASSWORDS[name]})
        assert r.status_code == 200, r.text
    return c


def upload(c: TestClient, name: str, content: bytes) -> str:
    r = c.post("/gradio_api/upload", files=[("files", (name, content, "text/markdown"))])
    assert r.status_code == 200, r.text
    return r.json()[0]


def file_data(path: str, name: str = "doc.md") -> dict[str, Any]:
    return {"path": path, "orig_name": name, "size": 10, "mime_type": "text/markdown",
            "meta": {"_type": "gradio.FileData"}}


def docs_of(services, name: str) -> list[str]:
    from memory.knowledge import KnowledgeBase  # noqa: F401  (the attached one is used)

    user = services.store.get_user_by_name(name)
    return [d.filename for d in services.chat.agent.knowledge.list_documents(user)]


def join(c: TestClient, fn_index: int, data: list, session: str) -> Any:
    return c.post("/gradio_api/queue/join", json={"data": data, "event_data": None, "fn_index": fn_index,
                                                  "trigger_id": None, "session_hash": session})


def upload_fn_index(c: TestClient) -> int:
    cfg = c.get("/config").json()
    button = next(x["id"] for x in cfg["components"] if x.get("props", {}).get("elem_id") == "doc-upload")
    dep = next(i for i, d in enumerate(cfg["dependencies"]) if [button, "click"] in [list(t) for t in d["targets"]])
    return cfg["dependencies"][dep].get("id", dep)


def uploads_folder(services) -> Path:
    return services.settings.uploads_dir / "page"


def test_an_event_naming_a_server_file_is_refused_and_reads_nothing(page):
    services, app, outside = page
    with client_for(app, "ann") as c:
        fn = upload_fn_index(c)
        hostile = [str(outside), str(ROOT / "README.md"), "/etc/hostname", "../../outside-secret.md",
                   "https://example.com/doc.md", str(uploads_folder(services) / ".." / "outside-secret.md")]
        for i, path in enumerate(hostile):
            r = join(c, fn, [[file_data(path)], "private"], f"ann-hostile-{i}")
            assert r.status_code == 400, (path, r.status_code, r.text)
            assert "not uploaded here" in r.text and SECRET not in r.text
            # The same refusal whether or not the path exists: nothing tells which server files exist.
            assert r.json() == join(c, fn, [[file_data("/no/such/file.md")], "private"], f"ann-x-{i}").json()
        # A file object without Gradio's meta, or a bare path string, does not slip past either.
        r = join(c, fn, [[{"path": str(outside), "orig_name": "x.md"}], "private"], "ann-nometa")
        assert r.status_code == 400
    assert docs_of(services, "ann") == []
    assert not list(uploads_folder(services).rglob("*.md")), "nothing was copied into the upload folder"


def test_the_handler_itself_takes_only_this_logins_uploads(page):
    from ui import library as lib

    services, _, outside = page
    uploads = PageUploads(services.settings.uploads_dir / "handler-check")
    uploads.start()
    ann = services.store.get_user_by_name("ann")
    received, refused = lib.receive_uploads(uploads, ann, [str(outside), "/etc/hostname"])
    assert received == [] and [r.ok for r in refused] == [False, False]
    assert outside.exists() and SECRET in outside.read_text()


def test_a_real_upload_is_ingested_and_then_gone_from_disk(page):
    services, app, _ = page
    with client_for(app, "ann") as c:
        good = upload(c, "lighthouse.md", b"# Lighthouse\n\nThe lighthouse keeper is named Orla.\n")
        empty = upload(c, "empty.md", b"")
        assert Path(good).is_file() and Path(good).is_relative_to(uploads_folder(services))
        done = gradio_event(c, "", "doc-upload", [[file_data(good, "lighthouse.md"), file_data(empty, "empty.md")],
                                                 "private"])
        assert done.get("success") is True, done
        text = json.dumps(done["output"])
        assert "lighthouse.md" in text and "empty" in text
    assert "lighthouse.md" in docs_of(services, "ann")
    assert not Path(good).exists() and not Path(empty).exists(), "uploads stay on disk after ingestion/refusal"
    assert [p for p in uploads_folder(services).glob("*/*") if p.is_file()] == []
    uploads = PageUploads(uploads_folder(services))
    uploads.sweep(stray_age_s=0)  # the parser's empty temp files go with the next sweep
    assert [p for p in uploads_folder(services).rglob("*") if p.is_file()] == []


def test_another_login_can_neither_use_nor_fetch_an_upload(page):
    services, app, _ = page
    with client_for(app, "ann") as ann, client_for(app, "ben", address="10.0.0.2") as ben:
        path = upload(ann, "ann-private.md", f"# Ann\n\nAnn's code is {SECRET}.\n".encode())
        r = ben.get(f"/gradio_api/file={path}")
        assert r.status_code == 404 and SECRET not in r.text
        r = join(ben, upload_fn_index(ben), [[file_data(path)], "private"], "ben-steals")
        assert r.status_code == 400
        assert Path(path).exists(), "a refused claim must not delete the owner's upload"
        r = ann.get(f"/gradio_api/file={path}")
        assert r.status_code == 200 and SECRET in r.text
        # URLs are never fetched, and files outside the upload folder are never served.
        for target in ("https://example.com/x.md", "http://127.0.0.1:1/x", str(ROOT / "README.md"), "/etc/hostname"):
            assert ann.get(f"/gradio_api/file={target}").status_code == 404, target
            assert ann.get(f"/file={target}").status_code == 404, target
    assert docs_of(services, "ben") == []


@pytest.mark.parametrize("path", [
    "/gradio_api/dev/reload", "/dev/reload", "/monitoring", "/monitoring/summary", "/gradio_api/monitoring/summary",
    "/gradio_api/proxy=https://example.com/x", "/proxy=https://example.com/x", "/gradio_api/runs",
])
def test_routes_the_page_never_calls_are_closed(page, path):
    _, app, _ = page
    with client_for(app, "ann") as c:
        r = c.get(path)
        assert r.status_code == 404, (path, r.status_code, r.text[:200])


@pytest.mark.parametrize("path", ["/gradio_api/call/v2/on_send", "/gradio_api/run/predict", "/gradio_api/api/on_send",
                                  "/run/predict", "/gradio_api/call/on_send"])
def test_gradio_entry_points_answer_404_not_500(page, path):
    _, app, _ = page
    with client_for(app, "ann") as c:
        r = c.post(path, json={"data": ["hi"]})
        assert r.status_code == 404, (path, r.status_code, r.text[:200])


def test_a_page_session_belongs_to_its_login(page):
    _, app, _ = page
    with client_for(app, "ann") as ann, client_for(app, "ben", address="10.0.0.2") as ben:
        session = f"ann-session-{time.time_ns()}"
        cfg = ann.get("/config").json()
        whoami_fn = 0
        assert join(ann, whoami_fn, [], session).status_code in (200, 422)
        r = ben.get(f"/gradio_api/queue/data?session_hash={session}")
        assert r.status_code == 403
        assert join(ben, whoami_fn, [], session).status_code == 403
        assert ben.post("/gradio_api/cancel", json={"session_hash": session, "fn_index": 0,
                                                     "event_id": "x"}).status_code == 403
        assert ben.get(f"/gradio_api/heartbeat/{session}").status_code == 403
        assert cfg["components"], "ann's own page still works"


def test_wrong_passwords_from_one_address_do_not_lock_out_another(page):
    _, app, _ = page
    with TestClient(app, base_url="http://127.0.0.1", client=("10.9.9.9", 1)) as attacker:
        for _ in range(8):
            r = attacker.post("/login", data={"username": "ben", "password": "wrong"})
            assert r.status_code == 400
        # The attacker's address is now throttled, even with the right password...
        assert attacker.post("/login", data={"username": "ben", "password": PASSWORDS["ben"]}).status_code == 400
    # ...but ben, from his own address, still logs in.
    with client_for(app, "ben", address="10.0.0.2") as c:
        assert c.get("/config").status_code == 200


def test_no_cors_grant_to_other_origins(page):
    _, app, _ = page
    with client_for(app, "ann") as c:
        for origin in ("http://localhost:9999", "http://evil.example"):
            pre = c.options("/v1/models", headers={"Origin": origin, "Access-Control-Request-Method": "GET"})
            assert "access-control-allow-origin" not in pre.headers, origin
            r = c.get("/config", headers={"Origin": origin})
            assert r.headers.get("access-control-allow-origin") in (None,), origin
            assert r.headers.get("access-control-allow-credentials") is None


def test_the_guard_is_mounted_on_the_gradio_app(page):
    _, app, _ = page
    assert gradio_sub_app(app).uploaded_file_dir.endswith("uploads/page")


def test_same_bytes_uploaded_by_two_logins_stay_each_ones_until_both_took_them(tmp_path):
    uploads = PageUploads(tmp_path / "page")
    uploads.start()
    path = uploads.folder / "abc" / "same.md"
    path.parent.mkdir()
    path.write_text("same content")
    uploads.received("ann", [str(path)])
    uploads.received("ben", [str(path)])
    assert uploads.take("ann", path).data == b"same content"
    assert path.exists(), "ben's upload of the same bytes must survive ann's ingestion"
    from ui.uploads import UploadRefused

    with pytest.raises(UploadRefused):
        uploads.take("ann", path)  # once only
    assert uploads.take("ben", path).data == b"same content"
    assert not path.exists() and not path.parent.exists()
    # Outside paths are never recorded, so never taken.
    uploads.received("ann", [str(tmp_path / "elsewhere.md"), "/etc/hostname"])
    assert uploads.pending() == 0
