"""One action, every way in: the same document added and deleted through the HTTP API, the page's
handlers and the CLI leaves the same rows (the same record, the same chunks), and each deletion
takes the document's teacher pairs with it."""

from __future__ import annotations

import httpx
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from assistant.actions.library import Library
from assistant.cli import app as cli_app
from memory.db import utcnow, write_transaction
from memory.schema import synthetic_pairs
from tests.helpers import ServerThread, start_server
from ui import library as page
from ui.uploads import Received

TEXT = (b"# Harbour rules\n\nBoats dock at pier 4 before 18:00. The harbour office closes at 17:30 on Fridays.\n\n"
        b"Fuel is sold at pier 2; pay at the office.\n")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir, tiny_embedder_dir):
    srv = start_server(tmp_path_factory.mktemp("one-action-home"), tiny_model_dir, with_agent=True,
                       embedder=str(tiny_embedder_dir), max_new_tokens=4)
    yield srv
    srv.stop()


def library(server: ServerThread) -> Library:
    return server.server.config.app.state.library  # what install_library gave the API


def add_pair(server: ServerThread, doc_id: str) -> None:
    with write_transaction(server.services.store.engine) as conn:
        conn.execute(synthetic_pairs.insert().values(
            kind="doc", teacher="test", doc_id=doc_id, chunk_id=f"{doc_id}:00000", question="When do boats dock?",
            question_source="model", answer="Before 18:00.", accepted=True, score=1.0, judge={}, created_at=utcnow()))


def pairs(server: ServerThread, doc_ids: list[str]) -> int:
    with server.services.store.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(synthetic_pairs)
                            .where(synthetic_pairs.c.doc_id.in_(doc_ids))).scalar_one()


def test_the_same_document_through_api_page_and_cli(server, tiny_embedder_dir, tmp_path):
    store, settings = server.services.store, server.services.settings
    users = {name: store.create_user(name, f"pw-{name}-123") for name in ("api", "page", "cli")}
    key = store.create_api_key(users["api"].id)

    r = httpx.post(server.url + "/v1/documents", headers={"Authorization": f"Bearer {key}"},
                   files=[("files", ("harbour.md", TEXT, "text/markdown"))], timeout=120)
    assert r.status_code == 201, r.text
    [res] = page.upload_documents(server.services, users["page"], [Received("harbour.md", TEXT)])
    assert res.ok, res.message
    (tmp_path / "harbour.md").write_bytes(TEXT)
    env = {"ASSISTANT_HOME": str(settings.home), "ASSISTANT_EMBEDDER": str(tiny_embedder_dir)}
    out = CliRunner().invoke(cli_app, ["docs", "add", str(tmp_path / "harbour.md"), "--user", "cli"], env=env)
    assert out.exit_code == 0, out.output

    lib = library(server)
    docs = {name: lib.list_documents(u, "private") for name, u in users.items()}
    assert all(len(d) == 1 for d in docs.values()), docs
    record = {name: {k: v for k, v in vars(d[0]).items() if k not in ("doc_id", "owner_id", "created_at")}
              for name, d in docs.items()}
    assert record["api"] == record["page"] == record["cli"]
    chunks = {name: [c.text for c in lib.knowledge.document_chunks(users[name], d[0].doc_id)]
              for name, d in docs.items()}
    assert chunks["api"] == chunks["page"] == chunks["cli"] and chunks["api"]

    ids = {name: d[0].doc_id for name, d in docs.items()}
    for doc_id in ids.values():
        add_pair(server, doc_id)
    assert httpx.delete(f"{server.url}/v1/documents/{ids['api']}", headers={"Authorization": f"Bearer {key}"},
                        timeout=60).status_code == 200
    assert page.delete_document(server.services, users["page"], ids["page"]) == record["page"]["chunks"]
    out = CliRunner().invoke(cli_app, ["docs", "rm", ids["cli"], "--user", "cli"], env=env)
    assert out.exit_code == 0 and "1 teacher pairs" in out.output, out.output
    assert pairs(server, list(ids.values())) == 0
    assert all(lib.list_documents(u, "private") == [] for u in users.values())
