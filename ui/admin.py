"""The admin console: a section of the page for admins to watch and steer the self-improvement loop.

In: the server's services and `get_user(request) -> User | None` (default: the login session's
username looked up in the store). Out: `build_admin_tab(services, get_user)` builds the components
inside the caller's ``gr.Tab`` (ui/app.py's "Admin" tab): data counts and dataset preview, synthetic
generation, start / cancel a retrain (a form of fields with defaults and help) with a live progress
bar (phase n of total, the whole job's ETA) and loss curve (refreshed by a
``gr.Timer`` that runs only while a job runs), job history and logs, two evaluation reports side by
side, the adapter list with promote and roll back, and the schedule settings.

`build_admin_tab` puts together small section builders (`data_section`, `synth_section`,
`retrain_section` with its `retrain_form`, `adapter_section`, `reports_section`, `schedule_section`)
and their `wire_*` functions. The view functions below (`counts_markdown`, `jobs_rows`, `job_view`,
...) are plain functions of (actions, user, inputs) that call `assistant.admin_api.AdminActions`;
every one of them raises PermissionError for a non-admin before reading anything, because a hidden
tab is still callable.
The Gradio wiring turns those errors into an error toast.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

import gradio as gr
import pandas as pd

from assistant.admin_api import AdminActions, require_admin
from memory.types import User
from training.jobs import NotReady
from training.readiness import SMALL_DATA_MIN_GROUPS, Readiness, check_readiness
from training.train_config import TrainConfig
from ui.confirm import confirm_step
from ui.i18n import T, current_language, page_language, speaking, tr
from ui.people import build_people_section, people_frame
from ui.personal import build_personal_section
from ui.sentences import gate_reason, report_markdown, say

GetUser = Callable[[gr.Request], User | None]
PRIVATE = {"api_visibility": "private"}  # the page is the only client; the API is /v1/admin
JOB_COLUMNS = ["id", "outcome", "trigger", "by", "phase", "progress %", "candidate", "why", "created"]
ADAPTER_COLUMNS = ["name", "serving", "gate", "parent", "dataset", "val_loss", "pref_acc", "grounded",
                   "general_ppl", "general_qa", "created", "note"]
# The tables' headings in the page's language (ui/i18n.py keys, in the columns' order).
JOB_HEADINGS = ["jc_id", "jc_outcome", "jc_trigger", "jc_by", "jc_phase", "jc_progress", "jc_candidate", "jc_why",
                "jc_created"]
ADAPTER_HEADINGS = ["ac_name", "ac_serving", "ac_gate", "ac_parent", "ac_dataset", "ac_val_loss", "ac_pref_acc",
                    "ac_grounded", "ac_general_ppl", "ac_general_qa", "ac_created", "ac_note"]


def headings(keys: list[str]) -> list[str]:
    return [tr(k) for k in keys]


# ------------------------------------------------------------------------------------------ view functions
def counts_markdown(actions: AdminActions, user: User | None) -> str:
    c = actions.counts(user)
    active = c.get("active_job")
    rows = [("c_users", c.get("users")), ("c_conversations", c.get("conversations")),
            ("c_messages", c.get("messages")), ("c_thumbs", f"{c.get('thumbs_up')} / {c.get('thumbs_down')}"),
            ("c_edits", c.get("edits")), ("c_pairs", c.get("pairs")), ("c_teacher_pairs", c.get("synthetic_pairs")),
            ("c_new_feedback", c.get("new_feedback_since_last_job")), ("c_datasets", c.get("datasets")),
            ("c_adapters", c.get("adapter_versions")), ("c_serving", c.get("serving") or tr("c_base_model")),
            ("c_running_job", f"#{active['id']} ({active['progress'].get('phase')})" if active else tr("c_none"))]
    return (f"| {tr('c_what')} | {tr('c_how_many')} |\n|---|---|\n"
            + "\n".join(f"| {tr(k)} | {v} |" for k, v in rows))


def readiness_sentences(r: Readiness, stages: tuple[str, ...] = ("sft", "dpo")) -> tuple[str, list[str]]:
    """The readiness check's summary and what is missing, in the page's language: in English its own
    sentences (training/readiness.py, as the API says them); otherwise put together from its counts by the
    same rules."""
    if current_language() == "en":
        return r.summary, list(r.missing)
    train = sum(r.rows[s]["train"] for s in stages if s in r.rows)
    heldout = r.rows["sft"]["heldout"] + r.rows["dpo"]["heldout"]
    f, need_train, need_heldout = r.feedback, r.needs["train_rows"], r.needs["heldout_rows"]
    have = tr("r_have", rated=f["thumbs_up"] + f["thumbs_down"], edits=f["edits"], pairs=f["pairs"],
              teacher=f["teacher_pairs"], conversations=f["conversations"], train=train, heldout=heldout)
    missing = []
    if train < need_train:
        missing.append(tr("r_need_train", need=need_train, have=train))
    if heldout < need_heldout:
        hint = tr("r_hint_few", groups=SMALL_DATA_MIN_GROUPS) if f["conversations"] < 10 else tr("r_hint_more")
        missing.append(tr("r_need_heldout", need=need_heldout, have=heldout,
                          where=tr("r_where_frozen" if r.heldout_frozen else "r_where_aside"), hint=hint))
    summary = tr("r_not_ready", have=have, train=need_train, heldout=need_heldout) if missing \
        else tr("r_ready", have=have)
    return summary, missing


def readiness_markdown(actions: AdminActions, user: User | None) -> str:
    """What a retrain would have now and what it still needs (training/readiness.py), in sentences."""
    require_admin(user)
    r = check_readiness(actions.store, actions.settings, knowledge=actions.services.knowledge)
    summary, missing = readiness_sentences(r)
    lines = [f"**{summary}**", *[f"- {m}" for m in missing], "", tr("r_split_rules")]
    return "\n".join(lines)


def dataset_choices(actions: AdminActions, user: User | None) -> list[str]:
    return [d["name"] for d in actions.list_datasets(user)]


def preview_frame(actions: AdminActions, user: User | None, name: str | None, kind: str, split: str,
                  limit: int = 20) -> tuple[pd.DataFrame, str]:
    if not name:
        require_admin(user)
        return pd.DataFrame(columns=["prompt", "answer", "source", "origin"]), tr("no_dataset")
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
    return pd.DataFrame(rows), tr("preview_note", name=name, kind=kind, split=split, shown=len(rows),
                                  total=p["total"])


def _last(msgs: list[dict], role: str) -> str:
    return next((m.get("content", "") for m in reversed(msgs) if m.get("role") == role), "")


def _content(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(str(m.get("content", "")) for m in value if isinstance(m, dict))
    return "" if value is None else str(value)


# A job that ran to its end "succeeded" in the store whatever the gate decided; read next to a
# "rejected" candidate that looked like a promotion. The page says what happened to the serving model.
OUTCOMES = {"promoted": "o_promoted", "registered": "o_registered", "rejected": "o_rejected",
            "unchanged": "o_unchanged"}  # ui/i18n.py keys


def job_outcome(job: dict[str, Any]) -> str:
    """A job's state in words, the gate's decision included (never just "succeeded")."""
    status = job.get("status")
    if status == "queued":
        return tr("o_cancelling" if job.get("cancel_requested") else "o_waiting")
    if status == "running":
        return tr("o_cancelling" if job.get("cancel_requested") else "o_running")
    if status == "succeeded":
        decision = (job.get("result") or {}).get("status")
        if decision in OUTCOMES:
            return tr(OUTCOMES[decision])
        return tr("o_finished", decision=decision or tr("o_no_decision"))
    if status == "cancelled":
        return tr("o_cancelled")
    return tr("o_failed")


def jobs_rows(actions: AdminActions, user: User | None, limit: int = 30) -> pd.DataFrame:
    rows = []
    for j in actions.list_jobs(user, limit):
        r = j.get("result") or {}
        rows.append([j["id"], job_outcome(j), j["trigger"], j["requested_by"], j["progress"].get("phase"),
                     round(100 * float(j["progress"].get("fraction") or 0)), r.get("candidate"),
                     gate_reason(r.get("reason")) or say(plain_error(j.get("error") or ""))[:160],
                     (j["created_at"] or "")[:19]])
    return pd.DataFrame(rows, columns=headings(JOB_HEADINGS))


_EXCEPTION_NAME = re.compile(r"(^|[:|(]\s*)(?:[A-Za-z_][\w.]*(?:Error|Exception|Failed|Busy|NotFound|Ready)):\s*")
_TRACEBACK = re.compile(r"Traceback \(most recent call last\):\s*\|?\s*")
_PATH = re.compile(r"(?<![\w.])/(?:[\w.-]+/)+([\w.-]+)")


def plain_error(message: str) -> str:
    """An error as a sentence for the page: no exception class names ("ValueError: ..."), no traceback
    header, and a file or folder named by its last part instead of a full path on the server."""
    text = _TRACEBACK.sub("", message or "")
    text = _EXCEPTION_NAME.sub(r"\1", text)
    text = _PATH.sub(r"\1", text).strip()
    return text[:1].upper() + text[1:] if text else ""


def progress_html(fraction: float, label: str) -> str:
    pct = max(0.0, min(100.0, 100 * fraction))
    return (f'<div style="border:1px solid var(--border-color-primary);border-radius:6px;height:22px;'
            f'position:relative"><div style="width:{pct:.1f}%;height:100%;border-radius:6px;'
            f'background:var(--color-accent)"></div><span style="position:absolute;left:8px;top:1px;'
            f'font-size:13px">{pct:.0f}% {label}</span></div>')


PHASE_WORDS = {p: f"ph_{p}" for p in ("starting", "synth", "dataset", "train", "evaluate", "register", "done")}


def job_phases(job: dict[str, Any]) -> list[str]:
    """The phases this job goes through, in order (the teacher's only when it was asked for)."""
    synth = bool((job.get("params") or {}).get("synth"))
    return [p for p in ("synth", "dataset", "train", "evaluate", "register") if p != "synth" or synth]


def job_eta_s(job: dict[str, Any], now: datetime | None = None) -> float | None:
    """Seconds left for the whole job, from the time it has run and the share of the work done; None
    until there is enough to go on (5 s and 2 %). The phases' shares are estimates (training.loop.PHASES)."""
    fraction = float((job.get("progress") or {}).get("fraction") or 0)
    started = job.get("started_at")
    if job.get("status") != "running" or not started or fraction < 0.02 or fraction >= 1:
        return None
    began = datetime.fromisoformat(started)
    elapsed = ((now or datetime.now(UTC)) - (began if began.tzinfo else began.replace(tzinfo=UTC))).total_seconds()
    if elapsed < 5:
        return None
    return elapsed * (1 - fraction) / fraction


def duration_words(seconds: float) -> str:
    if seconds < 90:
        return tr("p_seconds", n=f"{max(5, round(seconds / 5) * 5):.0f}")
    if seconds < 90 * 60:
        return tr("p_minutes", n=f"{seconds / 60:.0f}")
    return tr("p_hours", n=f"{seconds / 3600:.1f}")


def progress_text(job: dict[str, Any], now: datetime | None = None) -> str:
    """Where a running job is, as one line: "Phase 3 of 4: training (sft, step 12 of 40); about 2 min left
    for the whole job"."""
    p = job.get("progress") or {}
    phases = job_phases(job)
    phase = p.get("phase") or "starting"
    words = tr(PHASE_WORDS[phase]) if phase in PHASE_WORDS else phase
    head = tr("p_phase", n=phases.index(phase) + 1, total=len(phases), words=words) if phase in phases \
        else words[:1].upper() + words[1:]
    detail = ""
    if phase == "train" and p.get("step") is not None and p.get("max_steps"):
        detail = tr("p_train", stage=p.get("stage") or "train", step=p["step"], total=p["max_steps"])
    elif phase == "dataset" and p.get("total"):
        detail = tr("p_dataset", done=p.get("done"), total=p["total"])
    elif phase == "synth" and p.get("total"):
        detail = tr("p_synth", done=p.get("done"), total=p["total"])
    elif phase == "evaluate" and p.get("check"):
        detail = tr("p_evaluate", model=p.get("model") or "model", check=p["check"])
    eta = job_eta_s(job, now)
    tail = tr("p_eta", eta=duration_words(eta)) if eta is not None else ""
    return head + detail + tail


def job_view(actions: AdminActions, user: User | None, job_id: int | None) -> dict[str, Any]:
    """Everything the progress panel shows for one job (the newest one when `job_id` is None)."""
    if job_id is None:
        jobs = actions.list_jobs(user, 1)
        if not jobs:
            return {"job": None, "bar": progress_html(0, tr("j_no_job")), "status": "", "curve": _curve([]), "log": ""}
        job_id = jobs[0]["id"]
    d = actions.job_detail(user, int(job_id), log_lines=80)
    j, p = d["job"], d["job"]["progress"]
    outcome = job_outcome(j)
    if j["status"] == "running" and not j.get("cancel_requested"):
        label = tr("j_running", id=j["id"], progress=progress_text(j))
    else:
        label = tr("j_label", id=j["id"], outcome=outcome)
    by = tr("j_schedule") if j["trigger"] == "schedule" else (j["requested_by"] or "-")
    lines = [tr("j_head", id=j["id"], outcome=outcome, by=by)]
    if j["status"] == "running" and not j.get("cancel_requested"):
        lines.append(progress_text(j))
    if isinstance(p.get("loss"), int | float):
        lines.append(tr("j_val_loss", loss=f"{p['loss']:.4f}", val=f"{p['eval_loss']:.4f}")
                     if isinstance(p.get("eval_loss"), int | float) else tr("j_loss", loss=f"{p['loss']:.4f}"))
    if j.get("error") and j["status"] != "cancelled":
        lines.append(tr("j_why", why=say(plain_error(j["error"]))))
    r = j.get("result") or {}
    if r:
        lines.append(tr("j_result", candidate=r.get("candidate"), reason=gate_reason(r.get("reason"))))
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


GATE_WORDS = {"passed": "gs_passed", "failed": "gs_failed", "skipped": "gs_skipped"}  # ui/i18n.py keys


def adapters_view(actions: AdminActions, user: User | None) -> tuple[pd.DataFrame, str, list[str]]:
    a = actions.list_adapters(user)
    rows = []
    for v in a["versions"]:
        m = v["metrics"]
        gate = tr(GATE_WORDS[v["gate"]]) if v["gate"] in GATE_WORDS else v["gate"]
        rows.append([v["name"], tr("ac_serving") if v["serving"] else "", gate, v["parent"] or "",
                     v["dataset"] or "",
                     m.get("val_loss"), m.get("pref_accuracy"), m.get("grounded"), m.get("general_ppl"),
                     m.get("general_qa"), v["created_at"][:19], gate_reason(v["note"])[:100]])
    back = (a["rollback_target"] or tr("a_base")) if a["can_roll_back"] else tr("a_nothing")
    summary = tr("a_summary", serving=a["serving"] or tr("a_base"), back=back)
    if a["history"]:
        h = a["history"][-1]
        summary += tr("a_last_change", action=h["action"], version=h["version"] or tr("a_base"),
                      actor=h["actor"] or "-", when=h["created_at"][:19])
    return pd.DataFrame(rows, columns=headings(ADAPTER_HEADINGS)), summary, [v["name"] for v in a["versions"]]


def report_view(actions: AdminActions, user: User | None, name: str | None) -> tuple[str, str | None]:
    if not name:
        require_admin(user)
        return tr("a_pick_version"), None
    r = actions.report(user, name)
    return report_markdown(r["markdown"]) or tr("a_no_report", name=name), r["plot"]


def schedule_values(actions: AdminActions, user: User | None) -> tuple[dict[str, Any], str]:
    s = actions.get_schedule(user)
    state = tr("s_state", due=tr("s_due" if s["due"] else "s_not_due"), reason=s["reason"])
    if not s["scheduler_running"]:
        state += tr("s_not_running")
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
    return tr("s_saved", state=tr("s_on" if saved["enabled"] else "s_off"), mode=saved["mode"])


# The retrain form: the settings a first-time admin may want to change, each with its default (read
# from TrainConfig, so the form follows the code) and a sentence of help. Everything else keeps the
# defaults; experts can still pass any override as JSON in the closed "Expert options" box.
STAGE_CHOICES = [("admin_stages_both", "sft,dpo"), ("admin_stages_sft", "sft"), ("admin_stages_dpo", "dpo")]
RETRAIN_FIELDS = ("stages", "max_steps", "sft_epochs", "sft_learning_rate", "dpo_learning_rate", "dpo_beta",
                  "lora_r", "auto_promote", "synth", "extra")


def train_default(name: str) -> Any:
    """The default of a TrainConfig field (what a retrain uses when the form is left alone)."""
    return next(f.default for f in fields(TrainConfig) if f.name == name)


def _number(value: Any, name: str, kind: type, low: float, high: float) -> Any:
    """A form number, checked: empty means the default; out of range is a sentence, not a traceback."""
    if value is None or value == "":
        return train_default(name)
    number = kind(value)
    if not low <= number <= high:
        raise ValueError(f"{name.replace('_', ' ')} must be between {low:g} and {high:g}; it was {value:g}")
    return number


def start_job(actions: AdminActions, user: User | None, *values: Any) -> dict[str, Any]:
    """Start a retrain from the form's values (RETRAIN_FIELDS order)."""
    require_admin(user)
    return actions.start_retrain(user, retrain_options(*values))


def retrain_options(stages: str | None, max_steps: float | None, sft_epochs: float | None, sft_lr: float | None,
                    dpo_lr: float | None, dpo_beta: float | None, lora_r: float | None, auto_promote: bool,
                    synth: bool, extra_json: str = "") -> dict[str, Any]:
    """The retrain's options from the form (RETRAIN_FIELDS order); ValueError says which field is wrong.
    The expert options (JSON) go on top of the fields."""
    extra: dict[str, Any] = json.loads(extra_json) if extra_json and extra_json.strip() else {}
    if not isinstance(extra, dict):
        raise ValueError("the expert options must be a JSON object, like {\"gate\": {}}")
    train = {
        "stages": [s for s in (stages or "sft,dpo").split(",") if s],
        "sft_epochs": _number(sft_epochs, "sft_epochs", float, 0.1, 50),
        "sft_learning_rate": _number(sft_lr, "sft_learning_rate", float, 1e-7, 1e-2),
        "dpo_learning_rate": _number(dpo_lr, "dpo_learning_rate", float, 1e-8, 1e-2),
        "dpo_beta": _number(dpo_beta, "dpo_beta", float, 0.01, 10),
        "lora_r": _number(lora_r, "lora_r", int, 1, 256),
    }
    steps = 0 if max_steps is None else int(max_steps)
    if steps < 0:
        raise ValueError(f"max steps must be 0 (run the epochs) or more; it was {steps}")
    if steps:
        train["max_steps"] = steps
    return {**extra, "train": {**train, **(extra.get("train") or {})},
            "auto_promote": bool(auto_promote), "synth": bool(synth)}


# ------------------------------------------------------------------------------------------ the tab
def _default_get_user(services: Any) -> GetUser:
    def get(request: gr.Request) -> User | None:
        name = getattr(request, "username", None)
        return services.store.get_user_by_name(name) if name else None
    return get


Guard = Callable[[Callable[..., Any]], Callable[..., Any]]


def make_guard(who: GetUser) -> Guard:
    """Wrap a view function for Gradio: resolve the admin, run it; a refusal or bad input is a toast."""
    def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
        # The request comes first: Gradio injects it by the annotation at its position and passes the
        # inputs after it. (No functools.wraps: Gradio would then read `fn`'s signature instead.)
        def run(request: gr.Request, *args: Any) -> Any:
            try:
                # Every console action is admin-only: refuse before looking at the inputs. What it writes
                # is in the page's language.
                with speaking(page_language(request)):
                    return fn(require_admin(who(request)), *args)
            except PermissionError as e:
                raise gr.Error(say(str(e), page_language(request)), print_exception=False) from e
            except (ValueError, LookupError, RuntimeError) as e:
                raise gr.Error(say(plain_error(str(e)), page_language(request)), print_exception=False) from e
        run.__name__ = f"admin_{fn.__name__}"
        return run
    return guarded


def ask_first(guarded: Guard, button: gr.Button, row: gr.Row, no_btn: gr.Button) -> None:
    """The first click only shows the question; "no" hides it again (admins only, like the rest)."""
    def show_question(_user: User) -> gr.Row:
        return gr.Row(visible=True)

    def hide_question(_user: User) -> gr.Row:
        return gr.Row(visible=False)

    button.click(guarded(show_question), None, [row], **PRIVATE)
    no_btn.click(guarded(hide_question), None, [row], **PRIVATE)


@dataclass
class DataSection:
    counts: gr.Markdown
    datasets: gr.Dropdown
    kind: gr.Dropdown
    split: gr.Dropdown
    build: gr.Button
    note: gr.Markdown
    preview: gr.Dataframe


def data_section() -> DataSection:
    with gr.Row(elem_classes="admin-form"):
        with gr.Column(scale=1, min_width=260):
            gr.Markdown(T("admin_data"))
            counts = gr.Markdown(elem_classes="admin-table")
        with gr.Column(scale=2, min_width=260):
            gr.Markdown(T("admin_datasets"))
            with gr.Row(elem_classes="admin-form"):
                datasets = gr.Dropdown(label=T("admin_snapshot"), choices=[], interactive=True, min_width=140)
                kind = gr.Dropdown(["sft", "dpo", "kto"], value="sft", label=T("admin_kind"), min_width=100)
                split = gr.Dropdown(["train", "validation", "test", "heldout"], value="train",
                                    label=T("admin_split"), min_width=120)
                build = gr.Button(T("admin_build"), min_width=140)
            note = gr.Markdown()
            preview = gr.Dataframe(wrap=True, max_height=300, interactive=False, elem_classes="admin-table")
    return DataSection(counts, datasets, kind, split, build, note, preview)


def wire_data(actions: AdminActions, guarded: Guard, d: DataSection) -> None:
    def show_preview(user, name, kind, split):
        return preview_frame(actions, user, name, kind, split)

    for comp in (d.datasets, d.kind, d.split):
        comp.change(guarded(show_preview), [d.datasets, d.kind, d.split], [d.preview, d.note], **PRIVATE)

    def build(user):
        made = actions.build_dataset(user, {})
        names = dataset_choices(actions, user)
        return gr.Dropdown(choices=names, value=made["name"]), counts_markdown(actions, user)

    d.build.click(guarded(build), None, [d.datasets, d.counts], **PRIVATE)


def synth_section(actions: AdminActions, guarded: Guard) -> None:
    with gr.Accordion(T("admin_synth"), open=False):
        with gr.Row(elem_classes="admin-form"):
            chunks = gr.Number(8, label=T("admin_synth_chunks"), precision=0, min_width=120)
            questions = gr.Number(2, label=T("admin_synth_questions"), precision=0, min_width=120)
            docs = gr.Textbox(label=T("admin_synth_docs"), min_width=200)
            go = gr.Button(T("admin_synth_go"), min_width=120)
        out = gr.Markdown()

    def synth(user, n_chunks, n_questions, folder):
        r = actions.synth(user, int(n_chunks or 8), int(n_questions or 2), folder.strip() or None)
        return tr("synth_done", pairs=r["pairs"], chunks=r["chunks"], accepted=r["accepted"], dpo=r["dpo_pairs"],
                  seconds=f"{r['seconds']:.0f}")

    go.click(guarded(synth), [chunks, questions, docs], [out], **PRIVATE)


@dataclass
class RetrainSection:
    form: list[gr.components.Component]  # RETRAIN_FIELDS order
    readiness: gr.Markdown
    start: gr.Button
    cancel: gr.Button
    job_id: gr.Number
    confirm: tuple[gr.Row, gr.Button, gr.Button]
    bar: gr.HTML
    status: gr.Markdown
    curve: gr.LinePlot
    log: gr.Textbox
    timer: gr.Timer
    jobs: gr.Dataframe

    @property
    def watch_outputs(self) -> list[Any]:
        return [self.bar, self.status, self.curve, self.log, self.timer, self.jobs]


def retrain_form() -> list[gr.components.Component]:
    """The retrain settings as fields with defaults and help (RETRAIN_FIELDS order)."""
    with gr.Row(elem_classes="admin-form"):
        stages = gr.Radio([(T(key), value) for key, value in STAGE_CHOICES], value="sft,dpo",
                          label=T("admin_stages"), info=T("admin_stages_info"),
                          elem_id="retrain-stages", min_width=260)
        max_steps = gr.Number(0, label=T("admin_max_steps"), info=T("admin_max_steps_info"), precision=0,
                              minimum=0, elem_id="retrain-max-steps", min_width=200)
        epochs = gr.Number(train_default("sft_epochs"), label=T("admin_epochs"), info=T("admin_epochs_info"),
                           minimum=0.1, elem_id="retrain-epochs", min_width=200)
    with gr.Row(elem_classes="admin-form"):
        sft_lr = gr.Number(train_default("sft_learning_rate"), label=T("admin_sft_lr"), info=T("admin_lr_info"),
                           elem_id="retrain-sft-lr", min_width=200)
        dpo_lr = gr.Number(train_default("dpo_learning_rate"), label=T("admin_dpo_lr"),
                           info=T("admin_dpo_lr_info"), elem_id="retrain-dpo-lr", min_width=200)
        beta = gr.Number(train_default("dpo_beta"), label=T("admin_beta"), info=T("admin_beta_info"),
                         elem_id="retrain-beta", min_width=200)
        rank = gr.Number(train_default("lora_r"), label=T("admin_rank"), info=T("admin_rank_info"), precision=0,
                         elem_id="retrain-rank", min_width=200)
    with gr.Row(elem_classes="admin-form"):
        auto = gr.Checkbox(True, label=T("admin_auto_promote"), info=T("admin_auto_promote_info"),
                           elem_id="retrain-auto", min_width=240)
        synth = gr.Checkbox(False, label=T("admin_synth_first"), info=T("admin_synth_first_info"),
                            elem_id="retrain-synth", min_width=240)
    with gr.Accordion(T("admin_expert"), open=False):
        extra = gr.Textbox(label=T("admin_expert_json"), placeholder='{"gate": {}, "build": {}}',
                           elem_id="retrain-extra")
    return [stages, max_steps, epochs, sft_lr, dpo_lr, beta, rank, auto, synth, extra]


def retrain_section() -> RetrainSection:
    gr.Markdown(T("admin_retrain"))
    form = retrain_form()
    readiness = gr.Markdown(elem_id="readiness")
    with gr.Row(elem_classes="admin-form"):
        start = gr.Button(T("admin_start"), variant="primary", elem_id="retrain-start", min_width=160)
        cancel = gr.Button(T("admin_cancel"), variant="stop", elem_id="retrain-cancel", min_width=160)
        job_id = gr.Number(None, label=T("admin_job"), precision=0, interactive=True, min_width=120)
    confirm = confirm_step(T("admin_cancel_q"), T("admin_cancel_yes"), T("admin_cancel_no"), "cancel")
    bar = gr.HTML(progress_html(0, ""), elem_id="job-bar")
    status = gr.Markdown(elem_id="job-status")
    curve = gr.LinePlot(None, x="step", y="value", color="series", title=T("admin_loss_title"), height=260)
    log = gr.Textbox(label=T("admin_log"), lines=8, max_lines=16, autoscroll=True, elem_id="job-log")
    timer = gr.Timer(2.0, active=False)
    jobs = gr.Dataframe(headers=JOB_COLUMNS, label=T("admin_jobs"), interactive=False, wrap=True,
                        elem_id="jobs-table", elem_classes="admin-table")
    return RetrainSection(form, readiness, start, cancel, job_id, confirm, bar, status, curve, log, timer, jobs)


def watch(actions: AdminActions, user: User, jid: float | None) -> tuple:
    """The progress panel's outputs (RetrainSection.watch_outputs) for one job."""
    view = job_view(actions, user, int(jid) if jid else None)
    running = bool(view["job"] and view["job"]["status"] in ("queued", "running"))
    return (view["bar"], view["status"], view["curve"], view["log"], gr.Timer(active=running),
            jobs_rows(actions, user) if not running else gr.skip())


def wire_retrain(actions: AdminActions, guarded: Guard, r: RetrainSection, who: GetUser) -> None:
    def start(user, *values):
        try:
            job = start_job(actions, user, *values)
        except NotReady as e:  # refused up front: say why where the job's status would be
            skip = gr.skip()
            return (skip, skip, tr("not_started", why=" ".join(readiness_sentences(e.readiness)[1]) or say(str(e))),
                    skip, skip, skip, skip,
                    readiness_markdown(actions, user))
        return (job["id"], *watch(actions, user, job["id"])[:4], gr.Timer(active=True), jobs_rows(actions, user),
                readiness_markdown(actions, user))

    r.start.click(guarded(start), r.form, [r.job_id, *r.watch_outputs, r.readiness], **PRIVATE)

    def cancel(user, jid):
        if not jid:
            raise ValueError("no job selected")
        actions.cancel_job(user, int(jid))
        return (*watch(actions, user, jid), gr.Row(visible=False))

    row, yes, no = r.confirm
    ask_first(guarded, r.cancel, row, no)
    yes.click(guarded(cancel), [r.job_id], [*r.watch_outputs, row], **PRIVATE)

    def watch_job(user, jid):
        return watch(actions, user, jid)

    watch_job.__name__ = "watch"
    r.timer.tick(guarded(watch_job), [r.job_id], r.watch_outputs, **PRIVATE)

    def pick_job_event(frame: pd.DataFrame, evt: gr.SelectData, request: gr.Request):
        try:
            user = require_admin(who(request))
        except PermissionError as e:
            raise gr.Error(say(str(e), page_language(request)), print_exception=False) from e
        jid = int(frame.iloc[evt.index[0], 0])
        with speaking(page_language(request)):
            return (jid, *watch(actions, user, jid))

    r.jobs.select(pick_job_event, [r.jobs], [r.job_id, *r.watch_outputs], **PRIVATE)


@dataclass
class AdapterSection:
    summary: gr.Markdown
    table: gr.Dataframe
    version: gr.Dropdown


def adapter_section(actions: AdminActions, guarded: Guard) -> AdapterSection:
    gr.Markdown(T("admin_adapters"))
    summary = gr.Markdown()
    table = gr.Dataframe(headers=ADAPTER_COLUMNS, interactive=False, wrap=True, elem_classes="admin-table")
    with gr.Row(elem_classes="admin-form"):
        version = gr.Dropdown(label=T("admin_version"), choices=[], interactive=True, min_width=160)
        force = gr.Checkbox(False, label=T("admin_force"), min_width=160)
        reason = gr.Textbox(label=T("admin_reason"), min_width=200)
        promote_btn = gr.Button(T("admin_promote"), variant="primary", elem_id="promote", min_width=120)
        rollback_btn = gr.Button(T("admin_rollback"), variant="stop", elem_id="rollback", min_width=120)
    promote_row, promote_yes, promote_no = confirm_step(
        T("admin_promote_q"), T("admin_promote_yes"), T("admin_not_now"), "promote")
    rollback_row, rollback_yes, rollback_no = confirm_step(
        T("admin_rollback_q"), T("admin_rollback_yes"), T("admin_not_now"), "rollback")
    swap = gr.Markdown()

    def swapped(user, r: dict[str, Any]):
        adf, asum, _ = adapters_view(actions, user)
        return (tr("a_swapped", serving=r["serving"] or tr("a_base"), previous=r["previous"] or tr("a_base"),
                   seconds=f"{r['seconds']:.2f}"), adf, asum, gr.Row(visible=False))

    def promote(user, name, forced, why):
        if not name:
            raise ValueError("pick a version to promote")
        return swapped(user, actions.promote(user, name, bool(forced), why or None))

    def rollback(user, why):
        return swapped(user, actions.rollback(user, why or None))

    ask_first(guarded, promote_btn, promote_row, promote_no)
    ask_first(guarded, rollback_btn, rollback_row, rollback_no)
    promote_yes.click(guarded(promote), [version, force, reason], [swap, table, summary, promote_row], **PRIVATE)
    rollback_yes.click(guarded(rollback), [reason], [swap, table, summary, rollback_row], **PRIVATE)
    return AdapterSection(summary, table, version)


def reports_section(actions: AdminActions, guarded: Guard) -> tuple[gr.Dropdown, gr.Dropdown]:
    gr.Markdown(T("admin_reports"))

    def show_report(user, name):
        md, plot = report_view(actions, user, name)
        return plot, md

    pickers = []
    with gr.Row(elem_classes="admin-form"):
        for key in ("admin_report_a", "admin_report_b"):
            with gr.Column(min_width=280):
                pick = gr.Dropdown(label=T(key), choices=[], interactive=True)
                img = gr.Image(type="filepath", show_label=False, interactive=False)
                md = gr.Markdown()
            pick.change(guarded(show_report), [pick], [img, md], **PRIVATE)
            pickers.append(pick)
    return pickers[0], pickers[1]


def schedule_section(actions: AdminActions, guarded: Guard) -> tuple[list[gr.components.Component], gr.Markdown]:
    gr.Markdown(T("admin_schedule"))
    with gr.Row(elem_classes="admin-form"):
        enabled = gr.Checkbox(label=T("admin_s_enabled"), min_width=160)
        mode = gr.Radio([(T(f"admin_s_mode_{m}"), m) for m in ("feedback", "daily", "interval")],
                        label=T("admin_s_mode"), min_width=240)
        min_fb = gr.Number(label=T("admin_s_min_feedback"), precision=0, min_width=160)
        interval = gr.Number(label=T("admin_s_interval"), min_width=160)
    with gr.Row(elem_classes="admin-form"):
        daily = gr.Textbox(label=T("admin_s_daily"), min_width=160)
        every = gr.Number(label=T("admin_s_every"), min_width=140)
        auto = gr.Checkbox(label=T("admin_auto_promote"), min_width=140)
        keep = gr.Number(label=T("admin_s_keep"), precision=0, min_width=140)
        synth = gr.Checkbox(label=T("admin_synth_first"), min_width=160)
    with gr.Row(elem_classes="admin-form"):
        save_btn = gr.Button(T("admin_s_save"), min_width=140)
        state = gr.Markdown()
    inputs = [enabled, mode, min_fb, interval, daily, every, auto, keep, synth]

    def save(user, *values):
        msg = save_schedule(actions, user, *values)
        return f"{msg} {schedule_values(actions, user)[1]}"

    save_btn.click(guarded(save), inputs, [state], **PRIVATE)
    return inputs, state


def build_admin_tab(services: Any, get_user: GetUser | None = None) -> None:
    """Build the console inside the current Blocks context (ui/app.py calls it inside its Admin tab)."""
    if services.admin is None:
        services.admin = AdminActions(services)
    actions: AdminActions = services.admin
    who = get_user or _default_get_user(services)
    guarded = make_guard(who)

    gr.Markdown(T("admin_heading"))
    refresh = gr.Button(T("admin_refresh"), size="sm")
    data = data_section()
    wire_data(actions, guarded, data)
    synth_section(actions, guarded)
    retrain = retrain_section()
    wire_retrain(actions, guarded, retrain, who)
    adapters = adapter_section(actions, guarded)
    rep_a, rep_b = reports_section(actions, guarded)
    schedule_inputs, schedule_state = schedule_section(actions, guarded)
    people_df = build_people_section(services, guarded)
    build_personal_section(services, guarded)  # ui/personal.py: per-user adapters with disk use

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

    outputs = [data.counts, retrain.readiness, data.datasets, data.preview, data.note, retrain.jobs, retrain.job_id,
               retrain.bar, retrain.status, retrain.curve, retrain.log, retrain.timer, adapters.table,
               adapters.summary, rep_a, rep_b, adapters.version, *schedule_inputs, schedule_state, people_df]
    refresh.click(guarded(load_all), [retrain.job_id], outputs, **PRIVATE)
    tab = gr.context.Context.block
    if isinstance(tab, gr.Tab):  # load when an admin opens the tab (ui/app.py builds us inside it)
        tab.select(guarded(load_all), [retrain.job_id], outputs, **PRIVATE)
