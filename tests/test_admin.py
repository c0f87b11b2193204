"""Admin actions through every entry point, on a real server (tiny model) and a real store: the HTTP
API under /v1/admin (401 anonymous, 403 non-admin on every route, and the admin's actions doing what
they say), the console's Gradio handlers (refused for non-admins), and the `assistant admin` CLI."""

from __future__ import annotations

import inspect
import json
import time
from pathlib import Path

import gradio as gr
import httpx
import pytest
from typer.testing import CliRunner

from assistant.admin_api import AdminActions
from tests.helpers import ServerThread, start_server
from training.dataset_build import read_manifest
from training.jobs import runner_for
from training.registry import Registry
from training.scheduler import load_loop_settings
from ui import admin as ui_admin

# Runs until it is stopped; a large test share so the few conversations leave held-out rows.
LONG = {"train": {"stages": ["sft"], "max_steps": 5000, "evals_per_epoch": 0},
        "build": {"replay_ratio": 0.0, "split_ratios": [0.5, 0.1, 0.4]}}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir: Path):
    srv = start_server(tmp_path_factory.mktemp("admin-home"), tiny_model_dir)
    yield srv
    runner = srv.services.jobs
    for job in runner.list() if runner else []:
        if job.active:
            runner.cancel(job.id)
            runner.wait(job.id, 60)
    srv.stop()


@pytest.fixture(scope="module")
def people(server: ServerThread) -> dict:
    store = server.services.store
    root = store.create_user("root", "root-password-1", role="admin")
    bob = store.create_user("bob", "bob-password-1")
    for country, city in [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
                          ("Egypt", "Cairo"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Kenya", "Nairobi"),
                          ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Poland", "Warsaw"), ("Greece", "Athens")]:
        conv = store.create_conversation(bob.id, country)
        _, a = store.add_turn(conv.id, f"What is the capital of {country}?", "No idea.")
        store.add_edit(bob.id, a.id, f"The capital of {country} is {city}.")
    return {"root": (root, store.create_api_key(root.id)), "bob": (bob, store.create_api_key(bob.id))}


@pytest.fixture(scope="module")
def versions(server: ServerThread, tiny_adapters, tmp_path_factory) -> list[str]:
    report = tmp_path_factory.mktemp("report")
    (report / "report.json").write_text(json.dumps({"decision": {"passed": True}}))
    (report / "report.md").write_text("# Evaluation: v0001\n\n**Decision: PROMOTE**\n")
    (report / "report.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    reg = Registry(server.services.settings, server.services.store)
    return [reg.register(tiny_adapters["alpha"], gate="passed", report_dir=report, metrics={"val_loss": 1.0}).name,
            reg.register(tiny_adapters["beta"], gate="passed").name]


def call(server: ServerThread, method: str, path: str, key: str | None = None, body=None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, server.url + path, headers=headers, json=body, timeout=120)


def admin_routes(server: ServerThread) -> list[tuple[str, str]]:
    """Every /v1/admin route of the running app (from its OpenAPI schema), with sample path parameters."""
    paths = server.server.config.app.openapi()["paths"]
    return sorted((method.upper(), path.replace("{name}", "v0001").replace("{job_id}", "1")
                   .replace("{user_id}", "1").replace("{key_id}", "1"))
                  for path, ops in paths.items() if path.startswith("/v1/admin") for method in ops)


# ---------------------------------------------------------------------------------------------- API
def test_every_admin_route_refuses_anonymous_and_non_admins(server, people, versions) -> None:
    routes = admin_routes(server)
    # a new route must be added to this count: 16 of the loop (AdminActions), 11 of accounts, the audit log
    # and readiness (assistant/users_api.py), 3 of personal adapters (assistant/personal_api.py)
    assert len(routes) == 30
    schedule_before = load_loop_settings(server.services.store)
    serving_before = server.services.chat.serving_adapter
    for method, path in routes:
        body = {} if method in ("POST", "PUT") else None
        anon = call(server, method, path, None, body)
        assert anon.status_code == 401, (method, path, anon.text)
        assert anon.json()["error"]["code"] == "invalid_api_key"
        bob = call(server, method, path, people["bob"][1], body)
        assert bob.status_code == 403, (method, path, bob.text)
        assert bob.json()["error"]["message"] == "this needs an admin account"
    # a malformed body from a non-admin is still a 403, not a validation error that reveals the schema
    assert call(server, "PUT", "/v1/admin/schedule", people["bob"][1], ["not", "an", "object"]).status_code == 403
    assert load_loop_settings(server.services.store) == schedule_before
    assert server.services.chat.serving_adapter == serving_before
    assert runner_for(server.services).list() == []


def test_admin_promotes_rolls_back_and_reads_reports(server, people, versions) -> None:
    key = people["root"][1]
    r = call(server, "POST", f"/v1/admin/adapters/{versions[0]}/promote", key, {"reason": "looks good"})
    assert r.status_code == 200 and r.json()["serving"] == versions[0] and r.json()["hot_swapped"]
    assert server.services.chat.serving_adapter == versions[0]
    r = call(server, "POST", f"/v1/admin/adapters/{versions[1]}/promote", key, {})
    assert r.json() | {"seconds": 0} == {"serving": versions[1], "previous": versions[0], "event_id": 2,
                                         "hot_swapped": True, "seconds": 0}
    listing = call(server, "GET", "/v1/admin/adapters", key).json()
    assert listing["serving"] == versions[1] and listing["rollback_target"] == versions[0]
    assert [v["name"] for v in listing["versions"]] == versions[::-1]
    assert [(h["action"], h["actor"]) for h in listing["history"]] == [("promote", "root"), ("promote", "root")]
    r = call(server, "POST", "/v1/admin/rollback", key, {"reason": "worse on my questions"})
    assert r.status_code == 200 and r.json()["serving"] == versions[0]
    assert server.services.chat.serving_adapter == versions[0]
    assert Registry(server.services.settings, server.services.store).history()[-1].reason == "worse on my questions"

    rep = call(server, "GET", f"/v1/admin/adapters/{versions[0]}/report", key).json()
    assert rep["report"] == {"decision": {"passed": True}} and rep["markdown"].startswith("# Evaluation: v0001")
    png = call(server, "GET", f"/v1/admin/adapters/{versions[0]}/report.png", key)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    assert call(server, "GET", f"/v1/admin/adapters/{versions[1]}/report.png", key).status_code == 404
    missing = call(server, "POST", "/v1/admin/adapters/v0999/promote", key, {})
    assert missing.status_code == 404 and "v0999" in missing.json()["error"]["message"]
    assert call(server, "POST", f"/v1/admin/adapters/{versions[0]}/promote", key, {"colour": 1}).status_code == 400


def test_a_corrupt_adapter_is_refused_over_the_api(server, people, tiny_adapters) -> None:
    reg = Registry(server.services.settings, server.services.store)
    bad = reg.register(tiny_adapters["beta"], gate="passed")
    (bad.adapter_dir / "adapter_model.safetensors").write_bytes(b"not the registered weights")
    serving = server.services.chat.serving_adapter
    r = call(server, "POST", f"/v1/admin/adapters/{bad.name}/promote", people["root"][1], {})
    assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_corrupt"
    assert f"adapter {bad.name} is corrupt" in r.json()["error"]["message"]
    assert server.services.chat.serving_adapter == serving


def test_admin_data_schedule_and_jobs(server, people) -> None:
    key = people["root"][1]
    counts = call(server, "GET", "/v1/admin/counts", key).json()
    assert counts["edits"] == 12 and counts["users"] == 2 and counts["active_job"] is None
    built = call(server, "POST", "/v1/admin/datasets", key, {"options": {"replay_ratio": 0.0}})
    assert built.status_code == 200, built.text
    name = built.json()["name"]
    assert [d["name"] for d in call(server, "GET", "/v1/admin/datasets", key).json()["data"]][0] == name
    prev = call(server, "GET", f"/v1/admin/datasets/{name}/preview?kind=sft&split=train&limit=2", key).json()
    assert prev["total"] == built.json()["counts"]["sft"]["train"] and len(prev["rows"]) == min(2, prev["total"])
    assert prev["rows"][0]["messages"][-1]["content"].startswith("The capital of")
    assert call(server, "GET", "/v1/admin/datasets/../../etc/preview", key).status_code == 404
    assert call(server, "GET", "/v1/admin/datasets/x1/preview", key).status_code == 400
    assert call(server, "POST", "/v1/admin/datasets", key, {"options": {"bogus": 1}}).status_code == 400
    rows = {"distractor_passages": 2, "abstain_rows": 0.5, "max_style_share": 0.5}
    built = call(server, "POST", "/v1/admin/datasets", key, {"options": {"replay_ratio": 0.0, **rows}})
    assert built.status_code == 200, built.text
    options = read_manifest(server.services.settings.datasets_dir / built.json()["name"])["options"]
    assert {k: options[k] for k in rows} == rows
    bad = call(server, "POST", "/v1/admin/datasets", key, {"options": {"abstain_rows": 3}})
    assert bad.status_code == 400 and "abstain_rows" in bad.json()["error"]["message"]

    sched = call(server, "PUT", "/v1/admin/schedule", key, {"enabled": True, "mode": "daily", "daily_at": "02:00"})
    assert sched.status_code == 200 and sched.json()["settings"]["daily_at"] == "02:00"
    bad = call(server, "PUT", "/v1/admin/schedule", key, {"daily_at": "2am"})
    assert bad.status_code == 400 and "daily_at" in bad.json()["error"]["message"]
    got = call(server, "GET", "/v1/admin/schedule", key).json()
    assert got["settings"]["mode"] == "daily" and got["settings"]["daily_at"] == "02:00" and "help" in got

    started = call(server, "POST", "/v1/admin/jobs", key, LONG)
    assert started.status_code == 202, started.text
    job_id = started.json()["id"]
    second = call(server, "POST", "/v1/admin/jobs", key, {})
    assert second.status_code == 409 and f"job {job_id} is" in second.json()["error"]["message"]

    def trained():
        d = call(server, "GET", f"/v1/admin/jobs/{job_id}", key).json()
        return d if d["loss_curve"] else None

    deadline = time.monotonic() + 240
    detail = None
    while detail is None and time.monotonic() < deadline:
        detail = trained()
        time.sleep(0.5)
    assert detail is not None, "the job never reported a training step"
    assert detail["job"]["status"] == "running" and detail["job"]["progress"]["phase"] == "train"
    assert detail["loss_curve"][0]["series"] == "sft loss" and detail["events"][0]["kind"] == "phase"
    r = call(server, "POST", f"/v1/admin/jobs/{job_id}/cancel", key)
    assert r.status_code == 200 and r.json()["cancel_requested"]
    job = runner_for(server.services).wait(job_id, 120)
    assert job.status == "cancelled"
    listed = call(server, "GET", "/v1/admin/jobs", key).json()["data"]
    assert listed[0]["id"] == job_id and listed[0]["status"] == "cancelled"
    final = call(server, "GET", f"/v1/admin/jobs/{job_id}", key).json()
    assert "cancel requested by root" in [e["data"].get("message") for e in final["events"]]
    assert final["log"].rstrip().endswith("[loop] job cancelled: training was cancelled")
    assert call(server, "GET", "/v1/admin/jobs/999", key).status_code == 404
    assert call(server, "POST", "/v1/admin/jobs", key, {"train": {"lora_r": "big"}}).status_code == 400


# ---------------------------------------------------------------------------------------------- UI
def test_console_view_functions_refuse_non_admins(server, people, versions) -> None:
    actions = AdminActions(server.services)
    bob, root = people["bob"][0], people["root"][0]
    calls = [
        lambda u: ui_admin.counts_markdown(actions, u), lambda u: ui_admin.dataset_choices(actions, u),
        lambda u: ui_admin.preview_frame(actions, u, None, "sft", "train"),
        lambda u: ui_admin.jobs_rows(actions, u), lambda u: ui_admin.job_view(actions, u, None),
        lambda u: ui_admin.adapters_view(actions, u), lambda u: ui_admin.report_view(actions, u, versions[0]),
        lambda u: ui_admin.report_view(actions, u, None), lambda u: ui_admin.schedule_values(actions, u),
        lambda u: ui_admin.save_schedule(actions, u, False, "feedback", 5, 1, "03:00", 24, True, 5, False),
        lambda u: ui_admin.start_job(actions, u, "sft,dpo", 1, None, None, None, None, None, True, False, ""),
        lambda u: actions.cancel_job(u, 1), lambda u: actions.promote(u, versions[0]), lambda u: actions.rollback(u),
        lambda u: actions.synth(u), lambda u: actions.build_dataset(u), lambda u: actions.list_adapters(u),
    ]
    for fn in calls:
        with pytest.raises(PermissionError, match="this needs an admin account"):
            fn(bob)
        with pytest.raises(PermissionError, match="log in first"):
            fn(None)
    assert all(j.requested_by != "bob" for j in runner_for(server.services).list())
    # and they work for an admin
    assert "| edits | 12 |" in ui_admin.counts_markdown(actions, root)
    frame, summary, names = ui_admin.adapters_view(actions, root)
    assert set(names) >= set(versions) and "Serving **" in summary and list(frame.columns) == ui_admin.ADAPTER_COLUMNS
    md, plot = ui_admin.report_view(actions, root, versions[0])
    assert md.startswith("# Evaluation") and plot.endswith("report.png")


def test_every_console_event_handler_refuses_non_admins(server, people) -> None:
    with gr.Blocks() as demo, gr.Tab("Admin"):
        ui_admin.build_admin_tab(server.services)
    handlers = [f.fn for f in demo.fns.values()]
    assert len(handlers) >= 15
    for username, message in (("bob", "this needs an admin account"), (None, "log in first")):
        request = gr.Request(username=username)
        for fn in handlers:
            # Gradio passes the request where it is annotated and the event's inputs around it; the
            # refusal must come before any input is looked at, so placeholders will do.
            args = [request if p.annotation in (gr.Request, "gr.Request") else None
                    for p in inspect.signature(fn).parameters.values() if p.kind is not p.VAR_POSITIONAL]
            with pytest.raises(gr.Error, match=message):
                fn(*args)


def test_console_handlers_drive_the_loop_for_an_admin(server, people, versions) -> None:
    """The console's own Gradio event functions, called as Gradio calls them, with an admin's session."""
    with gr.Blocks() as demo, gr.Tab("Admin"):
        ui_admin.build_admin_tab(server.services)
    fns = {f.fn.__name__: f for f in demo.fns.values()}
    root = gr.Request(username="root")

    def run(name: str, *inputs):
        bf = fns[name]
        out = bf.fn(root, *inputs)
        assert len(out if isinstance(out, tuple) else (out,)) == len(bf.outputs), name  # one value per output
        return out

    loaded = run("admin_load_all", None)
    assert "| edits | 12 |" in loaded[0]
    assert loaded[1].startswith("**Ready to retrain: 0 rated answers, 12 corrections") and "held out" not in loaded[0]
    serving = server.services.chat.serving_adapter
    other = versions[1] if serving != versions[1] else versions[0]
    msg, frame, summary, asked = run("admin_promote", other, False, "from the console")
    assert asked.visible is False  # the confirmation closes once it ran
    assert msg.startswith(f"Now serving **{other}**") and server.services.chat.serving_adapter == other
    assert frame.loc[frame["name"] == other, "serving"].item() == "serving"
    msg, _, _, _ = run("admin_rollback", "undo")
    assert server.services.chat.serving_adapter == serving and msg.startswith("Now serving")
    assert run("admin_save", True, "interval", 10, 1.0, "03:00", 6.0, True, 5, False).startswith(
        "Saved: on, mode interval.")
    assert load_loop_settings(server.services.store).every_hours == 6.0
    plot, md = run("admin_show_report", versions[0])
    assert plot.endswith("report.png") and md.startswith("# Evaluation")

    # the form's fields, with the expert options (JSON) on top: train until stopped
    started = run("admin_start", "sft", 0, 2.0, 1e-4, 2e-5, 0.1, 8, True, False, json.dumps(LONG))
    job_id = started[0]
    assert started[5].active is True  # the timer starts polling

    def watched():
        out = run("admin_watch", job_id)
        return out if out[2] is not None and len(out[2]) else None  # the loss curve has points

    deadline = time.monotonic() + 240
    view = None
    while view is None and time.monotonic() < deadline:
        view = watched()
        time.sleep(0.5)
    assert view is not None, "no training progress reached the console"
    bar, status, curve, _log, timer, _jobs = view
    assert f"job #{job_id} running: Phase 2 of 4: training (sft, step" in bar and set(curve["series"]) == {"sft loss"}
    assert timer.active is True  # keeps polling while the job runs
    asked = time.monotonic()
    cancelling = run("admin_cancel", job_id)
    assert "cancelling…" in cancelling[0] and "cancelling…" in cancelling[1]  # the bar and the status say so
    assert runner_for(server.services).wait(job_id, 10).status == "cancelled"
    assert time.monotonic() - asked < 10
    after = run("admin_watch", job_id)
    assert after[4].active is False and "cancelled" in after[1]


def test_job_states_say_what_happened_to_the_serving_model() -> None:
    done = {"status": "succeeded", "result": {"status": "rejected"}}
    assert ui_admin.job_outcome(done).startswith("finished: the new model did worse") and "succeeded" not in \
        ui_admin.job_outcome(done)
    assert "now serves" in ui_admin.job_outcome({"status": "succeeded", "result": {"status": "promoted"}})
    assert "promote it below" in ui_admin.job_outcome({"status": "succeeded", "result": {"status": "registered"}})
    assert ui_admin.job_outcome({"status": "running", "cancel_requested": True}) == "cancelling…"
    assert ui_admin.job_outcome({"status": "failed"}) == "failed; nothing changed"
    assert ui_admin.plain_error("ValueError: split ratios must sum to 1") == "Split ratios must sum to 1"
    assert ui_admin.plain_error("training.loop.CycleFailed: no rows") == "No rows"
    assert ui_admin.plain_error(
        "training failed (exit code 1): Traceback (most recent call last): | ValueError: the snapshot "
        "/srv/home/datasets/v0003 has no rows") == "Training failed (exit code 1): the snapshot v0003 has no rows"


def test_progress_names_the_phase_n_of_total_and_a_whole_job_eta() -> None:
    from datetime import UTC, datetime, timedelta

    now = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
    job = {"status": "running", "params": {}, "started_at": (now - timedelta(seconds=120)).isoformat(),
           "progress": {"phase": "train", "fraction": 0.4, "step": 12, "max_steps": 40, "stage": "sft"}}
    assert ui_admin.progress_text(job, now) == ("Phase 2 of 4: training (sft, step 12 of 40); "
                                                "about 3 min left for the whole job")
    job["params"] = {"synth": True}
    job["progress"] = {"phase": "dataset", "fraction": 0.01, "done": 20, "total": 100}
    assert ui_admin.progress_text(job, now) == ("Phase 2 of 5: building the dataset "
                                                "(the base model answers general questions: 20 of 100)")
    assert ui_admin.job_eta_s({**job, "status": "succeeded"}, now) is None


def test_the_retrain_form_sends_its_fields_and_refuses_bad_ones_in_words() -> None:
    options = ui_admin.retrain_options("sft,dpo", 0, None, None, None, None, None, True, False, "")
    assert options["train"] == {"stages": ["sft", "dpo"], "sft_epochs": 2.0, "sft_learning_rate": 1e-4,
                                "dpo_learning_rate": 2e-5, "dpo_beta": 0.1, "lora_r": 8}
    options = ui_admin.retrain_options("sft", 20, 3, 5e-5, None, None, 16, False, False, '{"gate": {}}')
    assert options["train"]["max_steps"] == 20 and options["train"]["lora_r"] == 16
    assert options["gate"] == {} and options["auto_promote"] is False
    for steps, epochs, words in ((-1, None, "max steps must be 0"), (0, 500, "sft epochs must be between")):
        with pytest.raises(ValueError, match=words):
            ui_admin.retrain_options("sft", steps, epochs, None, None, None, None, True, False, "")
    with pytest.raises(ValueError, match="must be a JSON object"):
        ui_admin.retrain_options("sft", 0, None, None, None, None, None, True, False, "[1]")


# ---------------------------------------------------------------------------------------------- CLI
def test_admin_cli_promote_rollback_adapters_schedule(tmp_path: Path, tiny_adapters) -> None:
    from assistant.cli import app
    from memory.store import Store

    home = tmp_path / "home"
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, ["admin", *args], env={"ASSISTANT_HOME": str(home)})

    assert run("adapters").output.startswith("serving: the base model; rollback goes to: nothing")
    from assistant.config import Settings

    settings = Settings.load(env={}, home=home)
    settings.ensure_dirs()
    store = Store.open(settings.db_url)
    reg = Registry(settings, store)
    v1 = reg.register(tiny_adapters["alpha"], gate="passed").name
    v2 = reg.register(tiny_adapters["beta"], gate="failed").name
    r = run("promote", v1, "--reason", "first")
    assert r.exit_code == 0 and f"serving {v1} (was the base model)" in r.output
    r = run("promote", v2)
    assert r.exit_code == 1 and "failed the evaluation gate" in r.output and reg.serving() == v1
    assert run("promote", v2, "--force").exit_code == 0 and reg.serving() == v2
    out = run("adapters").output
    assert f"serving: {v2}; rollback goes to: {v1}" in out and f"* {v2}" in out
    assert json.loads(run("adapters", "--json").output)["serving"] == v2
    assert run("rollback").exit_code == 0 and reg.serving() == v1
    assert reg.history()[-1].actor.startswith("cli:")
    assert run("promote", "v0042").exit_code == 1

    r = run("schedule", "--set", "enabled=true", "--set", "mode=interval", "--set", "every_hours=6")
    assert r.exit_code == 0 and "every_hours" in r.output
    s = load_loop_settings(store)
    assert s.enabled and s.mode == "interval" and s.every_hours == 6
    r = run("schedule", "--set", "mode=weekly")
    assert r.exit_code == 2 and "mode" in r.output and load_loop_settings(store).mode == "interval"
    assert run("jobs").output.strip() == "no jobs yet"
    assert run("jobs", "7").exit_code == 1
    store.close()


def test_admin_cli_train_runs_a_recorded_cycle(tmp_path: Path, learnable_tiny_model_dir: Path) -> None:
    from assistant.cli import app
    from memory.store import Store
    from tests.conftest import fast_password_hasher

    home = tmp_path / "home"
    env = {"ASSISTANT_HOME": str(home), "ASSISTANT_MODEL": str(learnable_tiny_model_dir)}
    store = Store.open(f"sqlite:///{home / 'assistant.db'}", password_hasher=fast_password_hasher())
    u = store.create_user("alice", "pw-alice")
    for i in range(24):
        conv = store.create_conversation(u.id, f"q{i}")
        _, a = store.add_turn(conv.id, f"What is {i} plus {i}?", "Hmm.")
        store.add_edit(u.id, a.id, f"{i} plus {i} is {2 * i}.")
    r = CliRunner().invoke(app, ["admin", "train", "--steps", "4", "--train", '{"stages": ["sft"]}',
                                 "--build", '{"replay_ratio": 0}', "--no-promote", "--json"], env=env)
    job = json.loads(r.stdout)
    assert job["trigger"] == "cli" and job["requested_by"].startswith("cli:")
    assert job["status"] == "succeeded", job["error"]
    assert job["result"]["status"] in ("registered", "rejected") and not job["result"]["promoted"]
    r = CliRunner().invoke(app, ["admin", "report", job["result"]["candidate"]], env=env)
    assert r.exit_code == 0 and r.output.startswith(f"# Evaluation: {job['result']['candidate']}")
    store.close()
