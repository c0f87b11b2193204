"""The admin console: a section of the page for admins to watch and steer the self-improvement loop.

In: the server's services and `get_user(request) -> User | None` (default: the login session's
username looked up in the store). Out: `build_admin_tab(services, get_user)` builds the components
inside the caller's ``gr.Tab`` (ui/app.py's "Admin" tab): data counts and dataset preview, synthetic
generation, start / cancel a retrain with a live progress bar and loss curve (refreshed by a
``gr.Timer`` that runs only while a job runs), job history and logs, two evaluation reports side by
side, the adapter list with promote and roll back, and the schedule settings.

The view functions below (`counts_markdown`, `jobs_rows`, `job_view`, ...) are plain functions of
(actions, user, inputs) that call `assistant.admin_api.AdminActions`; every one of them raises
PermissionError for a non-admin before reading anything, because a hidden tab is still callable.
The Gradio wiring turns those errors into an error toast.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import gradio as gr
import pandas as pd

from assistant.admin_api import AdminActions, require_admin
from memory.types import User
from training.jobs import NotReady
from training.readiness import check_readiness
from ui.confirm import confirm_step
from ui.people import build_people_section, people_frame

GetUser = Callable[[gr.Request], User | None]
PRIVATE = {"api_visibility": "private"}  # the page is the only client; the API is /v1/admin
JOB_COLUMNS = ["id", "outcome", "trigger", "by", "phase", "progress %", "candidate", "why", "created"]
ADAPTER_COLUMNS = ["name", "serving", "gate", "parent", "dataset", "val_loss", "pref_acc", "grounded",
                   "general_ppl", "general_qa", "created", "note"]


# ------------------------------------------------------------------------------------------ view functions
def counts_markdown(actions: AdminActions, user: User | None) -> str:
    c = actions.counts(user)
    active = c.get("active_job")
    rows = [("users", c.get("users")), ("conversations", c.get("conversations")), ("messages", c.get("messages")),
            ("thumbs up / down", f"{c.get('thumbs_up')} / {c.get('thumbs_down')}"), ("edits", c.get("edits")),
            ("regenerate-and-choose pairs", c.get("pairs")), ("teacher pairs", c.get("synthetic_pairs")),
            ("new feedback since the last job", c.get("new_feedback_since_last_job")),
            ("dataset snapshots", c.get("datasets")), ("adapter versions", c.get("adapter_versions")),
            ("serving", c.get("serving") or "base model"),
            ("running job", f"#{active['id']} ({active['progress'].get('phase')})" if active else "none")]
    return "| what | how many |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


SPLIT_RULES = (
    "How examples are used: whole conversations go to training (8 in 10), to validation (1 in 10, to stop "
    "training before it overfits) or to testing (1 in 10, never trained on). With only a few conversations, "
    "one in ten, and at least one once three have feedback, is kept for testing. When 20 test examples "
    "exist they are frozen as the held-out set that every later model is judged on.")


def readiness_markdown(actions: AdminActions, user: User | None) -> str:
    """What a retrain would have now and what it still needs (training/readiness.py), in sentences."""
    require_admin(user)
    r = check_readiness(actions.store, actions.settings, knowledge=actions.services.knowledge)
    lines = [f"**{r.summary}**", *[f"- {m}" for m in r.missing], "", SPLIT_RULES]
    return "\n".join(lines)


def dataset_choices(actions: AdminActions, user: User | None) -> list[str]:
    return [d["name"] for d in actions.list_datasets(user)]


def preview_frame(actions: AdminActions, user: User | None, name: str | None, kind: str, split: str,
                  limit: int = 20) -> tuple[pd.DataFrame, str]:
    if not name:
        require_admin(user)
        return pd.DataFrame(columns=["prompt", "answer", "source", "origin"]), "No dataset yet: build one."
    p = actions.preview_dataset(user, name, kind, split, int(limit))
    rows = []
    for r in p["rows"]:
        if kind == "sft":
            msgs = r.get("messages") or []
            rows.append({"prompt": _last(msgs, "user"), "answer": _last(msgs, "assistant"), "source": r.get("source"),
                         "origin": r.get("origin")})
        elif kind == "dpo":
            rows.append({"prompt": _last(r.get("prompt") or [], "user"), "chosen": _content(r.get("chosen")),
                         "rejected": _content(r.get("rejected")), "source": r.get("source")})
        else:
            rows.append({"prompt": _last(r.get("prompt") or [], "user"), "completion": _content(r.get("completion")),
                         "label": r.get("label"), "source": r.get("source")})
    return pd.DataFrame(rows), f"{name} {kind}/{split}: showing {len(rows)} of {p['total']} rows"


def _last(msgs: list[dict], role: str) -> str:
    return next((m.get("content", "") for m in reversed(msgs) if m.get("role") == role), "")


def _content(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(str(m.get("content", "")) for m in value if isinstance(m, dict))
    return "" if value is None else str(value)


# A job that ran to its end "succeeded" in the store whatever the gate decided; read next to a
# "rejected" candidate that looked like a promotion. The page says what happened to the serving model.
OUTCOMES = {
    "promoted": "finished: the new model passed the evaluation and now serves",
    "registered": "finished: the new model passed the evaluation; promote it below to serve it",
    "rejected": "finished: the new model did worse in the evaluation and was not used; nothing changed",
}


def job_outcome(job: dict[str, Any]) -> str:
    """A job's state in words, the gate's decision included (never just "succeeded")."""
    status = job.get("status")
    if status == "queued":
        return "cancelling…" if job.get("cancel_requested") else "waiting to start"
    if status == "running":
        return "cancelling…" if job.get("cancel_requested") else "running"
    if status == "succeeded":
        decision = (job.get("result") or {}).get("status")
        return OUTCOMES.get(decision, f"finished: {decision or 'no decision'}")
    if status == "cancelled":
        return "cancelled; nothing changed"
    return "failed; nothing changed"


def jobs_rows(actions: AdminActions, user: User | None, limit: int = 30) -> pd.DataFrame:
    rows = []
    for j in actions.list_jobs(user, limit):
        r = j.get("result") or {}
        rows.append([j["id"], job_outcome(j), j["trigger"], j["requested_by"], j["progress"].get("phase"),
                     round(100 * float(j["progress"].get("fraction") or 0)), r.get("candidate"),
                     r.get("reason") or plain_error(j.get("error") or "")[:160], (j["created_at"] or "")[:19]])
    return pd.DataFrame(rows, columns=JOB_COLUMNS)


def plain_error(message: str) -> str:
    """An error as a sentence for the page: no leading exception class name ("ValueError: ...")."""
    text = re.sub(r"^\s*(?:[A-Za-z_][\w.]*(?:Error|Exception|Failed|Busy|NotFound|Ready)):\s*", "", message or "")
    return text[:1].upper() + text[1:] if text else ""


def progress_html(fraction: float, label: str) -> str:
    pct = max(0.0, min(100.0, 100 * fraction))
    return (f'<div style="border:1px solid var(--border-color-primary);border-radius:6px;height:22px;'
            f'position:relative"><div style="width:{pct:.1f}%;height:100%;border-radius:6px;'
            f'background:var(--color-accent)"></div><span style="position:absolute;left:8px;top:1px;'
            f'font-size:13px">{pct:.0f}% {label}</span></div>')


def job_view(actions: AdminActions, user: User | None, job_id: int | None) -> dict[str, Any]:
    """Everything the progress panel shows for one job (the newest one when `job_id` is None)."""
    if job_id is None:
        jobs = actions.list_jobs(user, 1)
        if not jobs:
            return {"job": None, "bar": progress_html(0, "no job yet"), "status": "", "curve": _curve([]), "log": ""}
        job_id = jobs[0]["id"]
    d = actions.job_detail(user, int(job_id), log_lines=80)
    j, p = d["job"], d["job"]["progress"]
    step = f"step {p.get('step')}/{p.get('max_steps')} ({p.get('stage')})" if p.get("step") is not None else ""
    eta = f", about {p['eta_s']:.0f} s left in this stage" if isinstance(p.get("eta_s"), int | float) else ""
    outcome = job_outcome(j)
    label = f"job #{j['id']} running: {p.get('phase', '')} {step}" if j["status"] == "running" \
        else f"job #{j['id']} {outcome}"
    lines = [f"**Job #{j['id']}**: {outcome} ({j['trigger']}, by {j['requested_by'] or '-'}){eta}"]
    if isinstance(p.get("loss"), int | float):
        lines.append(f"loss {p['loss']:.4f}" + (f", eval loss {p['eval_loss']:.4f}"
                                                  if isinstance(p.get("eval_loss"), int | float) else ""))
    if j.get("error"):
        lines.append(f"Why: {plain_error(j['error'])}")
    r = j.get("result") or {}
    if r:
        lines.append(f"New model {r.get('candidate')}: {r.get('reason')}")
    return {"job": j, "bar": progress_html(float(p.get("fraction") or 0), label), "status": "\n\n".join(lines),
            "curve": _curve(d["loss_curve"]), "log": d["log"]}


def _curve(points: list[dict]) -> pd.DataFrame | None:
    """The loss points as the plot's frame; None (an empty plot) until there are any.

    Not an empty DataFrame: Gradio 6.31's LinePlot that first received an empty frame draws no lines
    for later frames of the same session (seen in Chromium), while one that starts from None does.
    """
    if not points:
        return None
    return pd.DataFrame([{"step": p["step"], "value": p["value"], "series": p["series"]} for p in points])


def adapters_view(actions: AdminActions, user: User | None) -> tuple[pd.DataFrame, str, list[str]]:
    a = actions.list_adapters(user)
    rows = []
    for v in a["versions"]:
        m = v["metrics"]
        rows.append([v["name"], "serving" if v["serving"] else "", v["gate"], v["parent"] or "", v["dataset"] or "",
                     m.get("val_loss"), m.get("pref_accuracy"), m.get("grounded"), m.get("general_ppl"),
                     m.get("general_qa"), v["created_at"][:19], (v["note"] or "")[:100]])
    back = (a["rollback_target"] or "the base model") if a["can_roll_back"] else "nothing"
    summary = f"Serving **{a['serving'] or 'the base model'}**; roll back goes to **{back}**."
    if a["history"]:
        h = a["history"][-1]
        summary += (f" Last change: {h['action']} to {h['version'] or 'base'} by {h['actor'] or '-'} "
                    f"({h['created_at'][:19]}).")
    return pd.DataFrame(rows, columns=ADAPTER_COLUMNS), summary, [v["name"] for v in a["versions"]]


def report_view(actions: AdminActions, user: User | None, name: str | None) -> tuple[str, str | None]:
    if not name:
        require_admin(user)
        return "Pick a version.", None
    r = actions.report(user, name)
    return r["markdown"] or f"{name} has no evaluation report.", r["plot"]


def schedule_values(actions: AdminActions, user: User | None) -> tuple[dict[str, Any], str]:
    s = actions.get_schedule(user)
    state = f"Now: **{'due' if s['due'] else 'not due'}** — {s['reason']}."
    if not s["scheduler_running"]:
        state += " (The scheduler thread is not running in this process.)"
    return s["settings"], state


SCHEDULE_FIELDS = ("enabled", "mode", "min_new_feedback", "min_interval_hours", "daily_at", "every_hours",
                   "auto_promote", "keep_last", "synth")


def save_schedule(actions: AdminActions, user: User | None, *values: Any) -> str:
    changes = dict(zip(SCHEDULE_FIELDS, values, strict=True))
    for k in ("min_new_feedback", "keep_last"):
        changes[k] = int(changes[k])
    for k in ("min_interval_hours", "every_hours"):
        changes[k] = float(changes[k])
    saved = actions.set_schedule(user, changes)
    return f"Saved: {'on' if saved['enabled'] else 'off'}, mode {saved['mode']}."


def start_job(actions: AdminActions, user: User | None, steps: float | None, auto_promote: bool, synth: bool,
              extra_json: str) -> dict[str, Any]:
    options: dict[str, Any] = json.loads(extra_json) if extra_json and extra_json.strip() else {}
    if not isinstance(options, dict):
        raise ValueError("extra options must be a JSON object")
    options.setdefault("train", {})
    if steps:
        options["train"]["max_steps"] = int(steps)
    options.update(auto_promote=bool(auto_promote), synth=bool(synth))
    return actions.start_retrain(user, options)


# ------------------------------------------------------------------------------------------ the tab
def _default_get_user(services: Any) -> GetUser:
    def get(request: gr.Request) -> User | None:
        name = getattr(request, "username", None)
        return services.store.get_user_by_name(name) if name else None
    return get


def build_admin_tab(services: Any, get_user: GetUser | None = None) -> None:
    """Build the console inside the current Blocks context (ui/app.py calls it inside its Admin tab)."""
    if services.admin is None:
        services.admin = AdminActions(services)
    actions: AdminActions = services.admin
    who = get_user or _default_get_user(services)

    def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
        """Resolve the user, run the view function; a refusal or bad input becomes an error toast.

        The request comes first: Gradio injects it by the annotation at its position and passes the
        inputs after it. (No functools.wraps: Gradio would then read `fn`'s signature instead.)
        """
        def run(request: gr.Request, *args: Any) -> Any:
            try:
                # Every console action is admin-only: refuse before looking at the inputs.
                return fn(require_admin(who(request)), *args)
            except PermissionError as e:
                raise gr.Error(str(e), print_exception=False) from e
            except (ValueError, LookupError, RuntimeError) as e:
                raise gr.Error(plain_error(str(e)), print_exception=False) from e
        run.__name__ = f"admin_{fn.__name__}"
        return run

    def show_question(_user: User) -> gr.Row:
        return gr.Row(visible=True)

    def hide_question(_user: User) -> gr.Row:
        return gr.Row(visible=False)

    def ask(button: gr.Button, row: gr.Row, no_btn: gr.Button) -> None:
        """The first click only shows the question; "no" hides it again (admins only, like the rest)."""
        button.click(guarded(show_question), None, [row], **PRIVATE)
        no_btn.click(guarded(hide_question), None, [row], **PRIVATE)

    gr.Markdown("## Self-improvement loop")
    refresh = gr.Button("Refresh", size="sm")
    with gr.Row():
        with gr.Column(scale=1):
            gr.Markdown("### Data")
            counts_md = gr.Markdown()
        with gr.Column(scale=2):
            gr.Markdown("### Datasets")
            with gr.Row():
                ds_dd = gr.Dropdown(label="Snapshot", choices=[], interactive=True)
                kind_dd = gr.Dropdown(["sft", "dpo", "kto"], value="sft", label="Kind")
                split_dd = gr.Dropdown(["train", "validation", "test", "heldout"], value="train", label="Split")
                build_btn = gr.Button("Build a new snapshot")
            preview_note = gr.Markdown()
            preview_df = gr.Dataframe(wrap=True, max_height=300, interactive=False)
    with gr.Accordion("Synthetic pairs from documents (teacher)", open=False):
        with gr.Row():
            syn_chunks = gr.Number(8, label="Chunks at most", precision=0)
            syn_q = gr.Number(2, label="Questions per chunk", precision=0)
            syn_docs = gr.Textbox(label="Documents folder on the server (empty: the knowledge base)")
            syn_btn = gr.Button("Generate")
        syn_out = gr.Markdown()

    gr.Markdown("### Retrain")
    with gr.Row():
        steps = gr.Number(0, label="Max steps per stage (0: run the configured epochs)", precision=0)
        auto = gr.Checkbox(True, label="Promote if the gate passes")
        synth_cb = gr.Checkbox(False, label="Generate synthetic pairs first")
        extra = gr.Textbox(label="More options (JSON: train / gate / build overrides)", placeholder='{"gate": {}}')
    ready_md = gr.Markdown(elem_id="readiness")
    with gr.Row():
        start_btn = gr.Button("Start retrain", variant="primary", elem_id="retrain-start")
        cancel_btn = gr.Button("Cancel", variant="stop", elem_id="retrain-cancel")
        job_id = gr.Number(None, label="Job", precision=0, interactive=True)
    cancel_row, cancel_yes, cancel_no = confirm_step(
        "Cancel this retrain? It stops within seconds and the serving model stays as it is.",
        "Yes, cancel it", "Keep it running", "cancel")
    bar = gr.HTML(progress_html(0, ""))
    status_md = gr.Markdown(elem_id="job-status")
    curve = gr.LinePlot(None, x="step", y="value", color="series", title="Training loss", height=260)
    log_box = gr.Textbox(label="Log (tail)", lines=8, max_lines=16, autoscroll=True)
    timer = gr.Timer(2.0, active=False)
    jobs_df = gr.Dataframe(headers=JOB_COLUMNS, label="Job history (select a row to watch it)", interactive=False)

    gr.Markdown("### Adapters")
    adapters_md = gr.Markdown()
    adapters_df = gr.Dataframe(headers=ADAPTER_COLUMNS, interactive=False, wrap=True)
    with gr.Row():
        version_dd = gr.Dropdown(label="Version", choices=[], interactive=True)
        force = gr.Checkbox(False, label="Force (gate failed)")
        reason = gr.Textbox(label="Reason (recorded)")
        promote_btn = gr.Button("Promote", variant="primary", elem_id="promote")
        rollback_btn = gr.Button("Roll back", variant="stop", elem_id="rollback")
    promote_row, promote_yes, promote_no = confirm_step(
        "Serve the chosen version to everyone now? Roll back returns to the current one.",
        "Yes, promote it", "Not now", "promote")
    rollback_row, rollback_yes, rollback_no = confirm_step(
        "Go back to the previous version for everyone now?", "Yes, roll back", "Not now", "rollback")
    swap_md = gr.Markdown()

    gr.Markdown("### Evaluation reports side by side")
    with gr.Row():
        with gr.Column():
            rep_a = gr.Dropdown(label="Report A", choices=[], interactive=True)
            rep_a_img = gr.Image(type="filepath", show_label=False, interactive=False)
            rep_a_md = gr.Markdown()
        with gr.Column():
            rep_b = gr.Dropdown(label="Report B", choices=[], interactive=True)
            rep_b_img = gr.Image(type="filepath", show_label=False, interactive=False)
            rep_b_md = gr.Markdown()

    gr.Markdown("### Schedule")
    with gr.Row():
        s_enabled = gr.Checkbox(label="Retrain automatically")
        s_mode = gr.Radio(["feedback", "daily", "interval"], label="When")
        s_min_fb = gr.Number(label="New feedback needed", precision=0)
        s_interval = gr.Number(label="Least hours between retrains")
    with gr.Row():
        s_daily = gr.Textbox(label="Daily at (HH:MM, UTC)")
        s_every = gr.Number(label="Every N hours")
        s_auto = gr.Checkbox(label="Auto-promote")
        s_keep = gr.Number(label="Versions kept", precision=0)
        s_synth = gr.Checkbox(label="Synthetic pairs first")
    with gr.Row():
        s_save = gr.Button("Save schedule")
        s_state = gr.Markdown()
    schedule_inputs = [s_enabled, s_mode, s_min_fb, s_interval, s_daily, s_every, s_auto, s_keep, s_synth]
    people_df = build_people_section(services, guarded)

    # ---------------------------------------------------------------- events
    def load_all(user: User | None, current_job: float | None):
        names = dataset_choices(actions, user)
        frame, note = preview_frame(actions, user, names[0] if names else None, "sft", "train")
        adf, asum, versions = adapters_view(actions, user)
        settings, state = schedule_values(actions, user)
        view = job_view(actions, user, int(current_job) if current_job else None)
        running = bool(view["job"] and view["job"]["status"] in ("queued", "running"))
        return (counts_markdown(actions, user), readiness_markdown(actions, user),
                gr.Dropdown(choices=names, value=names[0] if names else None),
                frame, note, jobs_rows(actions, user), view["job"]["id"] if view["job"] else None, view["bar"],
                view["status"], view["curve"], view["log"], gr.Timer(active=running), adf, asum,
                gr.Dropdown(choices=versions, value=versions[0] if versions else None),
                gr.Dropdown(choices=versions, value=versions[1] if len(versions) > 1 else None),
                gr.Dropdown(choices=versions, value=versions[0] if versions else None),
                *[settings[k] for k in SCHEDULE_FIELDS], state, people_frame(services, user))

    all_outputs = [counts_md, ready_md, ds_dd, preview_df, preview_note, jobs_df, job_id, bar, status_md, curve,
                   log_box, timer, adapters_df, adapters_md, rep_a, rep_b, version_dd, *schedule_inputs, s_state,
                   people_df]
    refresh.click(guarded(load_all), [job_id], all_outputs, **PRIVATE)
    tab = gr.context.Context.block
    if isinstance(tab, gr.Tab):  # load when an admin opens the tab (ui/app.py builds us inside it)
        tab.select(guarded(load_all), [job_id], all_outputs, **PRIVATE)

    def show_preview(user, name, kind, split):
        return preview_frame(actions, user, name, kind, split)

    for comp in (ds_dd, kind_dd, split_dd):
        comp.change(guarded(show_preview), [ds_dd, kind_dd, split_dd], [preview_df, preview_note], **PRIVATE)

    def build(user):
        made = actions.build_dataset(user, {})
        names = dataset_choices(actions, user)
        return gr.Dropdown(choices=names, value=made["name"]), counts_markdown(actions, user)

    build_btn.click(guarded(build), None, [ds_dd, counts_md], **PRIVATE)

    def synth(user, chunks, questions, docs):
        r = actions.synth(user, int(chunks or 8), int(questions or 2), docs.strip() or None)
        return (f"{r['pairs']} pairs from {r['chunks']} chunks, {r['accepted']} accepted "
                f"({r['dpo_pairs']} with a rejected answer), {r['seconds']:.0f} s.")

    syn_btn.click(guarded(synth), [syn_chunks, syn_q, syn_docs], [syn_out], **PRIVATE)

    def watch(user, jid):
        view = job_view(actions, user, int(jid) if jid else None)
        running = bool(view["job"] and view["job"]["status"] in ("queued", "running"))
        return (view["bar"], view["status"], view["curve"], view["log"], gr.Timer(active=running),
                jobs_rows(actions, user) if not running else gr.skip())

    watch_outputs = [bar, status_md, curve, log_box, timer, jobs_df]

    def start(user, n, auto_promote, with_synth, more):
        try:
            job = start_job(actions, user, n, auto_promote, with_synth, more)
        except NotReady as e:  # refused up front: say why where the job's status would be
            skip = gr.skip()
            return (skip, skip, "**Not started.** " + str(e), skip, skip, skip, skip,
                    readiness_markdown(actions, user))
        return (job["id"], *watch(user, job["id"])[:4], gr.Timer(active=True), jobs_rows(actions, user),
                readiness_markdown(actions, user))

    start_btn.click(guarded(start), [steps, auto, synth_cb, extra], [job_id, *watch_outputs, ready_md], **PRIVATE)

    def cancel(user, jid):
        if not jid:
            raise ValueError("no job selected")
        actions.cancel_job(user, int(jid))
        return (*watch(user, jid), gr.Row(visible=False))

    ask(cancel_btn, cancel_row, cancel_no)
    cancel_yes.click(guarded(cancel), [job_id], [*watch_outputs, cancel_row], **PRIVATE)
    timer.tick(guarded(watch), [job_id], watch_outputs, **PRIVATE)

    def pick_job(user, frame: pd.DataFrame, evt: gr.SelectData):
        require_admin(user)
        jid = int(frame.iloc[evt.index[0], 0])
        return (jid, *watch(user, jid))

    def pick_job_event(frame: pd.DataFrame, evt: gr.SelectData, request: gr.Request):
        try:
            return pick_job(require_admin(who(request)), frame, evt)
        except PermissionError as e:
            raise gr.Error(str(e), print_exception=False) from e

    jobs_df.select(pick_job_event, [jobs_df], [job_id, *watch_outputs], **PRIVATE)

    def show_report(user, name):
        md, plot = report_view(actions, user, name)
        return plot, md

    rep_a.change(guarded(show_report), [rep_a], [rep_a_img, rep_a_md], **PRIVATE)
    rep_b.change(guarded(show_report), [rep_b], [rep_b_img, rep_b_md], **PRIVATE)

    def swapped(user, r: dict[str, Any]):
        adf, asum, _ = adapters_view(actions, user)
        return (f"Now serving **{r['serving'] or 'the base model'}** (was {r['previous'] or 'the base model'}), "
                f"switched in {r['seconds']:.2f} s.", adf, asum)

    def promote(user, name, forced, why):
        if not name:
            raise ValueError("pick a version to promote")
        return swapped(user, actions.promote(user, name, bool(forced), why or None))

    def rollback(user, why):
        return swapped(user, actions.rollback(user, why or None))

    def hide(fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(user, *args):
            return (*fn(user, *args), gr.Row(visible=False))
        run.__name__ = fn.__name__
        return run

    ask(promote_btn, promote_row, promote_no)
    ask(rollback_btn, rollback_row, rollback_no)
    promote_yes.click(guarded(hide(promote)), [version_dd, force, reason],
                      [swap_md, adapters_df, adapters_md, promote_row], **PRIVATE)
    rollback_yes.click(guarded(hide(rollback)), [reason], [swap_md, adapters_df, adapters_md, rollback_row],
                       **PRIVATE)

    def save(user, *values):
        msg = save_schedule(actions, user, *values)
        return f"{msg} {schedule_values(actions, user)[1]}"

    s_save.click(guarded(save), schedule_inputs, [s_state], **PRIVATE)

