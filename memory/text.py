"""What counts as acceptable text from a client, checked in one place for every way in.

In: any value a client sent as text (a chat message, a title, a comment, an edited answer).
Out: `text_problem(value) -> str | None` (why it cannot be stored, or None) and `check_text`, which
raises ValueError with that reason. The store, the chat service and the HTTP schemas all call these,
so a rule holds for the API, the page and the terminal alike.

The rules close three classes of bad input that used to pass the schema and fail deeper down:
- a NUL character (PostgreSQL refuses it in text, and it is never meant);
- an unpaired UTF-16 surrogate (`"\\ud800"` is valid JSON but not Unicode: SQLite and the tokenizer
  raise on it, which surfaced as a 500);
- text with nothing visible in it (spaces, zero-width and other format characters, the Hangul and
  Braille blanks), which `str.strip()` does not see.
"""

from __future__ import annotations

import unicodedata
from typing import Any

# Letters or symbols that render as nothing, outside the Unicode categories checked below.
_BLANK_GRAPHICS = frozenset("\u115f\u1160\u3164\uffa0\u2800")
# Unassigned code points (Cn) count as visible: an emoji newer than this Python's Unicode tables is one.
_INVISIBLE_CATEGORIES = frozenset({"Zs", "Zl", "Zp", "Cc", "Cf", "Mn", "Me"})


def has_surrogate(text: str) -> bool:
    """True when `text` holds a lone surrogate code point (cannot be encoded as UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def is_visible(ch: str) -> bool:
    return ch not in _BLANK_GRAPHICS and unicodedata.category(ch) not in _INVISIBLE_CATEGORIES


def has_visible(text: str) -> bool:
    """Whether any character of `text` would show on screen."""
    return any(is_visible(ch) for ch in text)


def text_problem(value: Any, *, allow_nul: bool = False, allow_blank: bool = False) -> str | None:
    """Why `value` is not acceptable text, as a phrase to follow the field's name; None when it is."""
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if not allow_nul and "\x00" in value:
        return "contains a NUL character"
    if has_surrogate(value):
        return "contains an unpaired surrogate, which is not valid Unicode"
    if not allow_blank and not has_visible(value):
        return "must not be empty (it has no visible characters)"
    return None


def check_text(value: Any, what: str, max_len: int | None = None, *, strip: bool = True) -> str:
    """`value` (stripped of surrounding whitespace) if acceptable, else ValueError naming `what`."""
    problem = text_problem(value)
    if problem is not None:
        raise ValueError(f"{what} {problem}")
    if strip:
        value = value.strip()
    if max_len is not None and len(value) > max_len:
        raise ValueError(f"{what} is longer than {max_len} characters")
    return value
