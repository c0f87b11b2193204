"""A new conversation's title: a few words from its first question, made without a model call.

In: the first question and (used only when the question gives no words, e.g. it is only code) the
first answer. Out: a title of at most `MAX_WORDS` words and `MAX_CHARS` characters, e.g. "How do I
reset my password?" -> "How do I reset my password", "Hi! Can you explain Python decorators to me
with an example please?" -> "Explain Python decorators to me with an…". Deterministic and quick
(microseconds), so every way in (the page, the API, the command line) gets the same title for the
same question; `assistant.chat` calls it when it creates the conversation.
"""

from __future__ import annotations

import re

MAX_WORDS = 7
MAX_CHARS = 48
FALLBACK = "New chat"

_CODE = re.compile(r"```.*?(```|$)|`[^`]*`", re.S)
_URL = re.compile(r"https?://\S+")
_MARKUP = re.compile(r"[*_#>\[\]()|~]+")
# Greetings and requests that say nothing about the subject, at the start of the question.
_OPENERS = re.compile(
    r"^(?:(?:(?:hi|hello|hey)(?: there)?|hiya|good (?:morning|afternoon|evening)|안녕하세요|안녕)\b[\s,.!~]*)?"
    r"(?:(?:can|could|would|will) you (?:please )?|i (?:want|would like|need) (?:you )?to (?:know )?)?",
    re.I)
_KOREAN_ASKS = re.compile(r"(?<=\S)(?:을|를)?\s*(?:좀\s*)?"  # "...방법을 알려주세요" -> "...방법"
                          r"(?:알려\s?주세요|알려\s?줘|알려\s?주실래요|설명해\s?주세요|설명해\s?줘)$")
_SENTENCE_END = re.compile(r"(?<=[.!?。？！])\s+|\n+")


def _words(text: str) -> str:
    """The first sentence that says something, without code, links, markup or an opening greeting."""
    text = _MARKUP.sub(" ", _URL.sub(" ", _CODE.sub(" ", text or "")))
    for sentence in _SENTENCE_END.split(text):
        s = " ".join(sentence.split())
        rest = _OPENERS.sub("", s, count=1).strip()
        s = rest if len(rest.split()) > 1 else s  # "Can you help?" stays as it is
        s = _KOREAN_ASKS.sub("", s).strip(" \t.,;:!?。？！-") or s.strip(" \t.,;:!?。？！-")
        if any(ch.isalnum() for ch in s) and not _only_greeting(sentence):
            return s
    return ""


def _only_greeting(sentence: str) -> bool:
    return not _OPENERS.sub("", " ".join(sentence.split()), count=1).strip(" \t.,;:!?~")


def _shorten(text: str) -> str:
    words = text.split()
    out = " ".join(words[:MAX_WORDS])
    if len(out) > MAX_CHARS:
        out = out[:MAX_CHARS].rsplit(" ", 1)[0] if " " in out[:MAX_CHARS] else out[:MAX_CHARS]
    if out != " ".join(words):
        out = out.rstrip(" ,;:-") + "…"
    return out[:1].upper() + out[1:]


def conversation_title(question: str, answer: str = "") -> str:
    """A short title for a conversation that starts with `question` (and `answer`)."""
    words = _words(question)
    if words:
        return _shorten(words)
    plain = " ".join(_CODE.sub(" ", question or "").split()).strip(" \t.,;:!?~")
    if any(ch.isalnum() for ch in plain):  # only a greeting: that is what it was
        return _shorten(plain)
    words = _words(answer)  # only code or symbols: the answer says what it is about
    if words:
        return _shorten(words)
    plain = " ".join((question or "").split())
    return _shorten(plain) if plain else FALLBACK
