"""Ask before a destructive action: a hidden row with the question, a "yes" and a "no" button.

The first click on the action's button only shows the question; the action runs from "yes" (whose
handler hides the row again), and "no" hides it. Used for deleting a document or a memory, and in the
admin console for cancelling a job, promoting and rolling back. Server-side, so it holds without
JavaScript and the browser test can press the buttons.
"""

from __future__ import annotations

from typing import Any

import gradio as gr


def confirm_step(question: Any, yes: Any, no: Any, name: str) -> tuple[gr.Row, gr.Button, gr.Button]:
    """The row (hidden) and its two buttons; element ids are `<name>-ask`, `<name>-yes`, `<name>-no`."""
    with gr.Row(visible=False, elem_id=f"{name}-ask", elem_classes="confirm-row") as row:
        gr.Markdown(question)
        yes_btn = gr.Button(yes, variant="stop", size="sm", elem_id=f"{name}-yes")
        no_btn = gr.Button(no, size="sm", elem_id=f"{name}-no")
    return row, yes_btn, no_btn


def shown() -> gr.Row:
    return gr.Row(visible=True)


def hidden() -> gr.Row:
    return gr.Row(visible=False)
