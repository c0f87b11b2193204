"""The adapter registry on a real store and a real in-process backend (tiny random model): versions
and their hashes, promote / rollback (atomic, recorded, hot-swapped), corrupt adapters refused,
keep-last-N, start-up restore, and a hot-swap under concurrent streaming requests through the API."""

from __future__ import annotations

import concurrent.futures as cf
import json
import shutil
import threading
import time
from pathlib import Path

import openai
import pytest
import sqlalchemy as sa

from assistant.config import Settings
from assistant.runtime import AdapterLoadError
from assistant.server import build_services
from memory.schema import adapter_serving
from tests.conftest import make_random_adapter
from tests.helpers import start_server
from training import registry
from training.registry import CorruptAdapter, Registry, RegistryError, UnknownVersion


@pytest.fixture
def services(home: Path, tiny_model_dir: Path):
    s = Settings.load(env={}, home=home, model=str(tiny_model_dir), torch_threads=1, dtype="float32")
    svc = build_services(s, with_agent=False)
    yield svc
    svc.close()


@pytest.fixture
def reg(services) -> Registry:
    return Registry(services.settings, services.store)


def serving_row_count(store) -> int:
    with store.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(adapter_serving)).scalar_one()


def test_register_publishes_a_hashed_version_folder(reg: Registry, tiny_adapters, tmp_path: Path) -> None:
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.json").write_text(json.dumps({"decision": {"passed": True}}))
    v1 = reg.register(tiny_adapters["alpha"], gate="passed", metrics={"val_loss": 1.5}, report_dir=report,
                      dataset="v0001", note="first")
    v2 = reg.register(tiny_adapters["beta"], parent=v1.name)
    assert (v1.name, v2.name) == ("v0001", "v0002")
    assert v1.files.keys() == {p.relative_to(tiny_adapters["alpha"]).as_posix()
                               for p in tiny_adapters["alpha"].rglob("*") if p.is_file()}
    weights = tiny_adapters["alpha"] / "adapter_model.safetensors"
    assert v1.files["adapter_model.safetensors"] == registry.sha256_of(weights)
    assert (v1.adapter_dir / "adapter_config.json").is_file() and v1.report() == {"decision": {"passed": True}}
    on_disk = json.loads((v1.path / registry.VERSION_FILE).read_text())
    assert on_disk["files"] == v1.files and on_disk["name"] == "v0001" and on_disk["dataset"] == "v0001"
    assert [v.name for v in reg.list()] == ["v0002", "v0001"] and reg.get("v0002").parent == "v0001"
    assert tiny_adapters["alpha"].is_dir(), "registering copies unless told to move"
    assert not list(reg.root.glob(".staging-*"))


def test_register_refuses_bad_folders_and_publishes_nothing(reg: Registry, tiny_adapters, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(tiny_adapters["alpha"] / "adapter_config.json", no_weights)
    bad_json = tmp_path / "bad-json"
    shutil.copytree(tiny_adapters["alpha"], bad_json)
    (bad_json / "adapter_config.json").write_text("{not json")
    for folder, msg in ((empty, "not a PEFT adapter folder"), (no_weights, "no adapter weights"),
                        (bad_json, "not valid JSON")):
        with pytest.raises(RegistryError, match=msg):
            reg.register(folder)
    with pytest.raises(UnknownVersion):
        reg.register(tiny_adapters["alpha"], parent="v0042")
    with pytest.raises(RegistryError, match="gate"):
        reg.register(tiny_adapters["alpha"], gate="maybe")
    assert reg.list() == [] and [p.name for p in reg.root.iterdir()] == []


def test_a_failed_move_registration_gives_the_adapter_back(reg: Registry, tiny_adapters, tmp_path: Path) -> None:
    src = tmp_path / "trained"
    shutil.copytree(tiny_adapters["alpha"], src)
    before = registry.hash_tree(src)
    report = tmp_path / "report"
    report.mkdir()
    (report / "plot.png").symlink_to(tmp_path / "does-not-exist")  # copying the report fails mid-way
    with pytest.raises(shutil.Error):
        reg.register(src, report_dir=report, move=True)
    assert registry.hash_tree(src) == before  # the trained adapter is back where it was, whole
    assert reg.list() == [] and list(reg.root.iterdir()) == []


def test_promote_and_rollback_hot_swap_and_are_recorded(services, reg: Registry, tiny_adapters) -> None:
    a = reg.register(tiny_adapters["alpha"], gate="passed")
    b = reg.register(tiny_adapters["beta"], parent=a.name, gate="passed")
    assert reg.serving() is None and services.chat.serving_adapter is None

    r1 = reg.promote(a.name, services, actor="root", reason="first")
    assert r1.loaded and (r1.version, r1.previous) == ("v0001", None)
    assert services.backend.has_adapter("v0001") and services.chat.serving_adapter == "v0001"
    reg.promote(b.name, services, actor="root")
    assert services.chat.serving_adapter == "v0002" and reg.serving() == "v0002"
    assert services.backend.has_adapter("v0001"), "the previous version stays loaded for an instant rollback"
    assert reg.rollback_target() == "v0001" and reg.protected() == {"v0001", "v0002"}

    back = reg.rollback(services, actor="root", reason="bad answers")
    assert (back.version, back.previous) == ("v0001", "v0002") and services.chat.serving_adapter == "v0001"
    reg.rollback(services, actor="root")
    assert reg.serving() is None and services.chat.serving_adapter is None  # back to the base model
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        reg.rollback(services)
    hist = reg.history()
    assert [(e.action, e.version, e.previous, e.actor) for e in hist] == [
        ("promote", "v0001", None, "root"), ("promote", "v0002", "v0001", "root"),
        ("rollback", "v0001", "v0002", "root"), ("rollback", None, "v0001", "root")]
    assert hist[0].reason == "first" and hist[2].reason == "bad answers"


def test_failed_load_changes_nothing_and_gate_failures_need_force(services, reg: Registry, tiny_adapters,
                                                                   tmp_path: Path, tokenizer_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    a = reg.register(tiny_adapters["alpha"], gate="passed")
    reg.promote(a.name, services)
    # An adapter trained for another base shape: its hashes verify, but the backend cannot load it.
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    other = tmp_path / "other-model"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=len(tok))).save_pretrained(other)
    misfit = reg.register(make_random_adapter(other, tmp_path / "misfit", seed=3), gate="passed")
    events = serving_row_count(services.store)
    with pytest.raises(AdapterLoadError):
        reg.promote(misfit.name, services)
    assert reg.serving() == "v0001" and services.chat.serving_adapter == "v0001"
    assert serving_row_count(services.store) == events and not services.backend.has_adapter(misfit.name)

    failed = reg.register(tiny_adapters["beta"], gate="failed")
    with pytest.raises(RegistryError, match="failed the evaluation gate"):
        reg.promote(failed.name, services)
    assert reg.serving() == "v0001"
    reg.promote(failed.name, services, force=True, reason="admin override")
    assert reg.serving() == failed.name


def test_corrupt_adapter_is_refused_with_a_clear_message(services, reg: Registry, tiny_adapters) -> None:
    a = reg.register(tiny_adapters["alpha"], gate="passed")
    b = reg.register(tiny_adapters["beta"], gate="passed")
    reg.promote(a.name, services)
    weights = b.adapter_dir / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte in the tensor data: still loads, silently different weights
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptAdapter) as err:
        reg.promote(b.name, services)
    msg = str(err.value)
    assert "v0002 is corrupt" in msg and "adapter_model.safetensors has sha256" in msg and "will not be loaded" in msg
    assert services.chat.serving_adapter == "v0001" and not services.backend.has_adapter("v0002")
    (b.adapter_dir / "adapter_config.json").unlink()
    with pytest.raises(CorruptAdapter, match="adapter_config.json is missing"):
        reg.verify(b.name)


def test_restore_at_start_up_loads_serving_or_falls_back_from_a_corrupt_one(
        home: Path, tiny_model_dir: Path, tiny_adapters) -> None:
    s = Settings.load(env={}, home=home, model=str(tiny_model_dir), torch_threads=1, dtype="float32")
    first = build_services(s, with_agent=False)
    reg = Registry(s, first.store)
    a = reg.register(tiny_adapters["alpha"], gate="passed")
    b = reg.register(tiny_adapters["beta"], parent=a.name, gate="passed")
    reg.promote(a.name, first)
    reg.promote(b.name, first)
    first.close()

    again = build_services(s, with_agent=False)  # a restarted server
    assert again.chat.serving_adapter is None
    assert registry.restore_serving(again) == "v0002"
    assert again.chat.serving_adapter == "v0002" and again.backend.has_adapter("v0002")
    again.close()

    (b.adapter_dir / "adapter_model.safetensors").write_bytes(b"garbage")
    third = build_services(s, with_agent=False)
    assert registry.restore_serving(third) == "v0001"
    last = Registry(s, third.store).history()[-1]
    assert (last.action, last.version, last.actor) == ("rollback", "v0001", "system")
    assert "v0002 could not be loaded at start-up" in last.reason and "corrupt" in last.reason
    third.close()


def test_keep_last_n_never_deletes_serving_or_its_parent(services, reg: Registry, tiny_adapters) -> None:
    names = []
    for i in range(6):
        parent = names[-1] if names else None
        names.append(reg.register(tiny_adapters["alpha" if i % 2 else "beta"], parent=parent, gate="passed").name)
    reg.promote("v0001", services)
    reg.promote("v0003", services)  # serving v0003 (parent v0002), rollback target v0001
    assert reg.protected() == {"v0001", "v0002", "v0003"}
    removed = reg.prune(keep_last=2)
    assert removed == ["v0004"]  # newest two (v0006, v0005) stay; v0001-v0003 are protected
    assert [v.name for v in reg.list()] == ["v0006", "v0005", "v0003", "v0002", "v0001"]
    assert not (reg.root / "v0004").exists() and reg.get("v0004", include_deleted=True).deleted_at is not None
    with pytest.raises(UnknownVersion, match="deleted"):
        reg.promote("v0004", services)
    reg.rollback(services)  # the protected rollback target still works
    assert services.chat.serving_adapter == "v0001"
    with pytest.raises(RegistryError):
        reg.prune(keep_last=0)


def test_promotion_from_another_process_reaches_the_server_and_old_versions_unload(
        services, reg: Registry, tiny_adapters) -> None:
    a = reg.register(tiny_adapters["alpha"], gate="passed")
    b = reg.register(tiny_adapters["beta"], gate="passed")
    c = reg.register(tiny_adapters["alpha"], gate="passed")
    reg.promote(a.name, services)
    cli = Registry(services.settings, services.store)  # as `assistant admin promote` would: no backend
    swap = cli.promote(b.name, actor="cli")
    assert not swap.loaded and services.chat.serving_adapter == "v0001"
    assert reg.sync_serving(services) and services.chat.serving_adapter == "v0002"
    assert not reg.sync_serving(services)
    reg.promote(c.name, services)
    assert set(services.backend.adapters()) >= {"v0001", "v0002", "v0003"}
    assert reg.unload_retired(services.backend, grace_s=3600) == []  # in-flight requests may still hold v0001
    assert reg.unload_retired(services.backend, grace_s=0) == ["v0001"]
    assert set(services.backend.adapters()) == {"v0002", "v0003"}  # serving + rollback target


def test_concurrent_promotions_keep_a_consistent_history(services, reg: Registry, tiny_adapters) -> None:
    versions = [reg.register(tiny_adapters["alpha" if i % 2 else "beta"], gate="passed").name for i in range(4)]
    errors: list[BaseException] = []

    def promote(name: str) -> None:
        try:
            Registry(services.settings, services.store).promote(name, services)
        except BaseException as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=promote, args=(n,)) for n in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    hist = reg.history()
    assert sorted(e.version for e in hist) == versions
    # Each event's `previous` is the event before it: no lost update.
    assert [e.previous for e in hist] == [None, *[e.version for e in hist[:-1]]]
    assert services.chat.serving_adapter == hist[-1].version == reg.serving()


# ---------------------------------------------------------------------------------------------- hot-swap
def test_hot_swap_during_concurrent_streaming_requests(tmp_path: Path, tiny_model_dir: Path, tiny_adapters) -> None:
    srv = start_server(tmp_path / "home", tiny_model_dir)
    try:
        store = srv.services.store
        user = store.create_user("root", "root-password-1", role="admin")
        key = store.create_api_key(user.id)
        reg = Registry(srv.services.settings, store)
        old = reg.register(tiny_adapters["alpha"], gate="passed").name
        new = reg.register(tiny_adapters["beta"], parent=old, gate="passed").name
        reg.promote(old, srv.services)
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=120)
        ask = {"messages": [{"role": "user", "content": "Tell me a story about a cat."}], "temperature": 0,
               "max_tokens": 24}
        def answer(model: str) -> str:  # the whole greedy answer of one version, asked by name
            return client.chat.completions.create(model=model, **ask).choices[0].message.content

        expected = {old: answer(old)}

        def stream(i: int) -> tuple[str, str | None]:
            parts, adapter = [], None
            for chunk in client.chat.completions.create(model="assistant", stream=True, **ask):
                if chunk.choices and chunk.choices[0].delta.content:
                    parts.append(chunk.choices[0].delta.content)
                adapter = (chunk.model_extra or {}).get("adapter", adapter)
            return "".join(parts), adapter

        with cf.ThreadPoolExecutor(6) as pool:
            before = [pool.submit(stream, i) for i in range(4)]
            # Wait until all four resolved the alias and reached the backend (1 call came before).
            deadline = time.monotonic() + 60
            while srv.calls < 5 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert srv.calls == 5, "all four requests reached the model before the swap"
            swap = reg.promote(new, srv.services, actor="root")
            after = [pool.submit(stream, i) for i in range(2)]
            results_before = [f.result(timeout=300) for f in before]
            results_after = [f.result(timeout=300) for f in after]
        assert swap.loaded and srv.services.chat.serving_adapter == new
        expected[new] = answer(new)
        assert expected[old] != expected[new]
        for text, adapter in results_before:
            assert (text, adapter) == (expected[old], old), "a request finishes on the adapter it started with"
        for text, adapter in results_after:
            assert (text, adapter) == (expected[new], new)
        stored = [m for c in store.list_conversations(user.id) for m in store.messages(c.id) if m.role == "assistant"]
        assert sorted(m.adapter for m in stored).count(new) == 3 and all(m.status == "complete" for m in stored)
    finally:
        srv.stop()
