"""How a page event answers when it cannot go on, in the page's language.

`page_user` is the logged-in user behind an event, or Gradio's error toast asking to log in again;
`error_text` is a refusal's sentence (`ui.handlers.UiError` and the like) as the page shows it, through
`ui.sentences.say`. Every tab's wiring uses these two, so a refusal reads the same in every tab.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from memory.types import User
from ui.handlers import NotLoggedIn, resolve_user
from ui.i18n import page_language
from ui.sentences import say


def error_text(message: str, request: Any) -> str:
    """A refusal's sentence in the language of the page that sent `request`."""
    return say(message, page_language(request))


def page_user(services: Any, request: gr.Request) -> User:
    """The user logged in on the page that sent `request`; an error toast when there is none."""
    try:
        return resolve_user(services, request.username)
    except NotLoggedIn as e:
        raise gr.Error(error_text(e.message, request)) from e
