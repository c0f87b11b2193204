"""Sentences other layers write, shown in the page's language: errors (the model's, the stores', the page's
own), the evaluation gate's reasons and its reports.

In: an English sentence as the action layer, the chat service, a store or the training layer wrote it (their
own words stay English: the API and the CLI show them as they are). Out: the same sentence in the page's
language. A known sentence (a pattern below) is filled into its `ui/i18n.py` text, its values (names,
numbers) kept; anything else comes back unchanged, so a sentence added later shows in English rather than
not at all.

`say(message, lang)` is for an error or a refusal; `gate_reason(text, lang)` for the gate's decision as the
job table, a job's result and a version's note give it; `report_markdown(md, lang)` for a whole evaluation
report (training/gate_report.py's report.md). Without `lang`, the page's language of the current event
(`ui.i18n.speaking`).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ui.i18n import current_language, tr

Pattern = re.Pattern[str]


def _p(text: str) -> Pattern:
    return re.compile(text, re.IGNORECASE | re.DOTALL)


# An error sentence (whole, a final full stop optional) -> the ui/i18n.py key of its text; the pattern's named
# groups fill the text's {places}. First match wins.
ERRORS: list[tuple[Pattern, str]] = [
    # the page and its login
    (_p(r"please log in again|log in first"), "e_log_in"),
    (_p(r"this needs an admin account"), "e_admin_only"),
    (_p(r"choose a conversation first"), "e_pick_conversation"),
    (_p(r"(?:assistant message \d+|answer) not found"), "e_answer_not_found"),
    (_p(r"conversation(?: \d+)? not found"), "e_conversation_not_found"),
    (_p(r"the new title is empty"), "e_title_empty"),
    (_p(r"the title is (?P<n>\d+) characters; the limit is (?P<limit>\d+)"), "e_title_long"),
    (_p(r"choose an answer first"), "e_pick_answer"),
    (_p(r"rating must be thumbs up or thumbs down"), "e_rating"),
    (_p(r"reason must be one of (?P<tags>.+)"), "e_reason_tag"),
    (_p(r"the comment is (?P<n>\d+) characters; the limit is (?P<limit>\d+)"), "e_comment_long"),
    (_p(r"the corrected answer is empty"), "e_correction_empty"),
    (_p(r"the corrected answer is (?P<n>\d+) characters; the limit is (?P<limit>\d+)"), "e_correction_long"),
    (_p(r"that answer was already replaced; compare from the current one"), "e_replaced"),
    (_p(r"there is nothing to choose between yet"), "nothing_to_choose"),
    (_p(r"choose one of the two answers"), "e_choose_one"),
    (_p(r"that file was not uploaded here in this session; upload it again"), "e_upload_again"),
    # the chat service and the model
    (_p(r"the model failed while answering: (?P<error>.+)"), "e_model_failed"),
    (_p(r"message is (?P<n>\d+) characters; the limit is (?P<limit>\d+)"), "e_message_long"),
    (_p(r"message must not be empty \(it has no visible characters\)"), "e_message_empty"),
    (_p(r"message contains a NUL character"), "e_message_nul"),
    (_p(r"message contains an unpaired surrogate, which is not valid Unicode"), "e_message_surrogate"),
    (_p(r"model (?P<model>'[^']*') does not exist; available: (?P<names>.*)"), "e_model_missing"),
    (_p(r"adapter (?P<adapter>'[^']*') is not loaded"), "e_adapter_not_loaded"),
    (_p(r"(?P<n>\d+) requests are already waiting for the model \(limit (?P<limit>\d+)\)"), "e_busy_queue"),
    (_p(r"waited (?P<seconds>[\d.]+) s for the model; try again later"), "e_busy_waited"),
    (_p(r"that answer has no question to regenerate from"), "e_no_question"),
    # documents and memory
    (_p(r"documents are not available on this server"), "e_no_documents"),
    (_p(r"memory is not available on this server"), "e_no_memory"),
    (_p(r"choose one or more files first|no files were sent"), "e_pick_files"),
    (_p(r"choose who may see the documents"), "e_pick_scope"),
    (_p(r"choose a document first"), "e_pick_document"),
    (_p(r"choose a memory first"), "e_pick_memory"),
    (_p(r"document (?P<id>\S+) not found"), "e_document_not_found"),
    (_p(r"memory (?P<id>\S+) not found"), "e_memory_not_found"),
    (_p(r"only admins add team documents; yours stay private"), "e_team_admins_only"),
    (_p(r"(?P<file>'.+') is already in the (?P<scope>\w+) documents as (?P<title>'.+')"), "e_doc_already"),
    (_p(r"(?P<file>'.+') is empty"), "e_file_empty"),
    (_p(r"(?P<file>'.+') is (?P<size>[\d.]+ ?[KMGT]?i?B); the upload limit is (?P<limit>[\d.]+ ?[KMGT]?i?B)"),
     "e_file_too_large"),
    (_p(r"(?P<file>'.+'): unsupported file type (?P<suffix>\S+); supported: (?P<kinds>.+)"), "e_file_type"),
    (_p(r"(?P<file>'.+') contains no text(?P<hint>.*)"), "e_file_no_text"),
    # accounts
    (_p(r"the current password is not right"), "pw_wrong"),
    (_p(r"the two (?:new )?passwords are not the same"), "pw_differ"),
    (_p(r"the (?:new )?password needs at least (?P<n>\d+) characters"), "e_password_short"),
    (_p(r"username (?P<name>'[^']*') is already taken"), "e_name_taken"),
    (_p(r"username may contain only letters, digits and _ \. @ \+ -"), "e_name_chars"),
    (_p(r"you cannot (?P<what>[\w ]+) your own account; ask another admin"), "e_own_account"),
    (_p(r"cannot (?P<what>[\w ]+) the last enabled admin"), "e_last_admin"),
    # the admin console and My assistant
    (_p(r"(?P<field>[\w ]+) must be between (?P<low>\S+) and (?P<high>\S+); it was (?P<value>\S+)"), "e_out_of_range"),
    (_p(r"the expert options must be a JSON object, like .*"), "e_expert_json"),
    (_p(r"max steps must be 0 \(run the epochs\) or more; it was (?P<value>\S+)"), "e_max_steps"),
    (_p(r"no job selected"), "e_no_job"),
    (_p(r"pick a version to promote"), "a_pick_version"),
    (_p(r"adapter (?P<name>\S+) failed the evaluation gate; promote it with force=True if you are sure"),
     "e_gate_failed_force"),
    (_p(r"nothing to roll back to: the base model is serving and has no predecessor"), "e_nothing_to_roll_back"),
    (_p(r"(?P<name>'[^']*') is the serving adapter; promote or roll back to another one first"), "e_adapter_serving"),
    (_p(r"adapter version (?P<name>'[^']*') does not exist.*"), "e_no_version"),
    (_p(r"there are no documents to generate pairs from"), "e_no_synth_documents"),
    (_p(r"personal adapters are off for this installation.*"), "my_off"),
]

# The gate's reason (training/gate_decision.py, training/loop.py) -> its text's key. The parts inside (check
# names, metric names, numbers) are technical names and stay as they are.
GATE_REASONS: list[tuple[Pattern, str]] = [
    (_p(r"gate passed: (?P<reason>.+)"), "g_passed"),
    (_p(r"nothing new to learn: the data, the training options, the starting adapter and the gate are those of "
        r"(?P<name>\S+), which the gate refused \((?P<reason>.*)\)"), "g_unchanged"),
    (_p(r"regression: (?P<checks>.+)"), "g_regression"),
    (_p(r"no target metric could be measured on the held-out set"), "g_nothing_measured"),
    (_p(r"declined to decide: held-out grounding cannot be judged \((?P<short>.+)\), so a candidate that lost "
        r"grounding could not be told apart"), "g_declined_grounding"),
    (_p(r"declined to decide: no gain metric has enough held-out data \((?P<what>.*)\)"), "g_declined_data"),
    (_p(r"no gain above its minimum on (?P<metrics>.+)"), "g_no_gain_min"),
    (_p(r"gain above its minimum on (?P<metrics>.+); no regression beyond tolerance"), "g_gain_min"),
    (_p(r"no significant gain on (?P<metrics>.+)"), "g_no_gain"),
    (_p(r"significant gain on (?P<metrics>.+); no regression beyond tolerance"), "g_gain"),
]


def _fill(table: list[tuple[Pattern, str]], text: str, lang: str,
          inner: Callable[[str, str], str] | None = None) -> str | None:
    stripped = text.strip()
    body = stripped[:-1] if stripped.endswith(".") else stripped
    for pattern, key in table:
        m = pattern.fullmatch(body) or pattern.fullmatch(stripped)
        if m:
            values = {k: (v or "") for k, v in m.groupdict().items()}
            if inner is not None and "reason" in values:
                values["reason"] = inner(values["reason"], lang)
            return tr(key, lang, **values)
    return None


def say(message: str, lang: str | None = None) -> str:
    """An error the page shows, in the page's language (unknown sentences as they are)."""
    lang = lang or current_language()
    if lang != "ko" or not message:
        return message
    return _fill(ERRORS, message, lang) or message


def gate_reason(text: str | None, lang: str | None = None) -> str:
    """The gate's decision in words, in the page's language (unknown reasons as they are)."""
    lang = lang or current_language()
    if lang != "ko" or not text:
        return text or ""
    return _fill(GATE_REASONS, text, lang, gate_reason) or say(text, lang)


# ---- an evaluation report (training/gate_report.py render_markdown), line by line
_VERDICTS = {"PROMOTE": "rv_promote", "REJECT": "rv_reject", "DECLINED": "rv_declined"}
_METRIC_LABELS = {
    "held-out loss (nats/token)": "rm_val_loss", "held-out perplexity": "rm_val_ppl",
    "preference accuracy (liked, all held-out pairs)": "rm_pref_accuracy",
    "liked-and-correct (pairs whose chosen answer its passages support)": "rm_liked_correct",
    "mean log-prob margin": "rm_pref_margin",
    "answers nearer the user's choice than what they turned down (held-out, -1 to 1)": "rm_edit_match",
    "grounded answers, held-out questions (decides)": "rm_grounded",
    "grounded answers, trained questions (shown beside)": "rm_grounded_trained",
    "general-text perplexity": "rm_general_ppl", "general questions": "rm_general_qa",
}
_CELLS = {"lower": "rc_lower", "higher": "rc_higher", "pass": "rc_pass", "no gain": "rc_no_gain", "FAIL": "rc_fail",
          "base model": "a_base"}
_HEADINGS = {"## Metrics": "rh_metrics", "## Checks": "rh_checks", "## What these checks can see": "rh_power",
             "## Sample answers": "rh_samples", "## Gate configuration": "rh_gate"}
_TABLE_HEADS = {"| check | result | candidate | reference | threshold | detail |": "rt_checks",
                "| model | answer |": "rt_samples", "| setting | value |": "rt_gate"}
_TITLE = re.compile(r"# Evaluation: (?P<candidate>.+) vs (?P<baseline>.+)")
_DECISION = re.compile(r"\*\*Decision: (?P<verdict>[A-Z]+)\*\* — (?P<reason>.*)")
_ABOUT = re.compile(r"Base model (?P<base>`[^`]*`); held-out set (?P<set>`[^`]*`) \((?P<sizes>.*)\); "
                    r"evaluated in (?P<seconds>[\d.]+) s on (?P<when>.+)\.")
_NOT_MEASURED = re.compile(r"Not measured \(no held-out rows\): (?P<what>.*)\.")
_NOT_JUDGED = re.compile(r"Not judged \(too little held-out data\): (?P<what>.*)\.")
_SERVING = re.compile(r"serving \((?P<name>.*)\)")
_CANDIDATE = re.compile(r"candidate \((?P<name>.*)\)")


def _cell(text: str, lang: str) -> str:
    cell = text.strip()
    if cell in _CELLS:
        return tr(_CELLS[cell], lang)
    if cell in _METRIC_LABELS:
        return tr(_METRIC_LABELS[cell], lang)
    if m := _SERVING.fullmatch(cell):
        return tr("rc_serving", lang, name=_cell(m["name"], lang))
    if m := _CANDIDATE.fullmatch(cell):
        return tr("rc_candidate", lang, name=m["name"])
    return cell


def _row(line: str, lang: str, cells: int) -> str:
    """A table row with its first `cells` cells translated (the rest are values)."""
    parts = line.strip().strip("|").split(" | ")
    parts = [_cell(p, lang) if i < cells else p.strip() for i, p in enumerate(parts)]
    return "| " + " | ".join(parts) + " |"


def _report_line(line: str, lang: str, section: str) -> str:
    if line in _HEADINGS:
        return tr(_HEADINGS[line], lang)
    if line in _TABLE_HEADS:
        return tr(_TABLE_HEADS[line], lang)
    if m := _TITLE.fullmatch(line):
        baseline = tr("a_base", lang) if m["baseline"] == "the base model" else m["baseline"]
        return tr("r_title", lang, candidate=m["candidate"], baseline=baseline)
    if m := _DECISION.fullmatch(line):
        verdict = tr(_VERDICTS[m["verdict"]], lang) if m["verdict"] in _VERDICTS else m["verdict"]
        return tr("r_decision", lang, verdict=verdict, reason=gate_reason(m["reason"], lang))
    if m := _ABOUT.fullmatch(line):
        return tr("r_about", lang, **m.groupdict())
    if m := _NOT_MEASURED.fullmatch(line):
        return tr("r_not_measured", lang, what=m["what"])
    if m := _NOT_JUDGED.fullmatch(line):
        return tr("r_not_judged", lang, what=m["what"])
    if line.startswith("| metric | better |"):
        return "| " + " | ".join([tr("rc_metric", lang), tr("rc_better", lang),
                                  *(_cell(c, lang) for c in line.strip().strip("|").split(" | ")[2:])]) + " |"
    if line.startswith("| ") and not line.startswith("|---"):
        if section == "rh_metrics":
            return _row(line, lang, 2)  # the metric's name and which way is better
        if section == "rh_checks":
            parts = line.strip().strip("|").split(" | ")
            if len(parts) > 1:
                parts[1] = _cell(parts[1], lang)  # pass / no gain / FAIL
            return "| " + " | ".join(p.strip() for p in parts) + " |"
        if section == "rh_samples":
            return _row(line, lang, 1)  # which model answered
    return line


def report_markdown(markdown: str | None, lang: str | None = None) -> str:
    """An evaluation report in the page's language: its headings, the decision and its reason, the
    tables' headings and fixed words; names, numbers, questions and answers as they are."""
    lang = lang or current_language()
    if lang != "ko" or not markdown:
        return markdown or ""
    out, section = [], ""
    for line in markdown.split("\n"):
        if line in _HEADINGS:
            section = _HEADINGS[line]
        out.append(_report_line(line, lang, section))
    return "\n".join(out)


# Keys the tables above name (tests/test_i18n.py checks each has both languages).
KEYS = {key for _, key in ERRORS} | {key for _, key in GATE_REASONS} | set(_VERDICTS.values()) \
    | set(_METRIC_LABELS.values()) | set(_CELLS.values()) | set(_HEADINGS.values()) | set(_TABLE_HEADS.values()) \
    | {"rc_serving", "rc_candidate", "rc_metric", "rc_better", "r_title", "r_decision", "r_about", "r_not_measured",
       "r_not_judged"}
