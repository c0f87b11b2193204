"""Does an answer state a fact that its passages do not hold?

In: an answer, the passages it was given (or the chat messages that carry them in their `<data>` block,
as `assistant/prompt.py` renders a served turn) and the question. Out: the answer's numbers and codes that
neither the passages nor the question contain.

Why only numbers and codes: they are the facts a small model gets wrong while sounding right ("15 dollars"
where the passage says 8, "assembly point A" for B, channel 72 for 16), and they can be checked word for
word without a model. A wrong name or a wrong noun is not caught. Used where a wrong fact must not be
learnt: the dataset builder keeps a liked answer or a style edit as an SFT target only when it states no
fact its passages lack (`training/dataset_build.py`), and the gate's liked-and-correct measure counts only
held-out preference pairs whose chosen answer passes (`training/gate_metrics.py`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from training.teacher import content_words

_DOCUMENTS = re.compile(r"<documents>\n(.*?)\n</documents>", re.S)
_NUMBER = re.compile(r"\d+(?:[.,:]\d+)*")
_CODE = re.compile(r"\b[A-Za-z]+(?:[-_/.][A-Za-z0-9]+)*[-_]\d[\w-]*\b|\b[A-Z]{2,}\d[\w-]*\b")
_LETTER = re.compile(r"(?<=[a-z] )[A-Z]\b(?!['’])")  # "assembly point A", "gate B"; not "I" or a first word
_WORD_NUMBERS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                 "seven": "7", "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12",
                 "fifteen": "15", "twenty": "20", "thirty": "30", "forty": "40", "fifty": "50", "hundred": "100"}
# "[2]": a citation of the second passage, as the served prompt asks for (assistant/prompt.py), not a fact.
_CITATION = re.compile(r"\[\d+\]")
_WORD_NUMBER = re.compile(r"\b(" + "|".join(_WORD_NUMBERS) + r")\b", re.I)


def passages_of(messages: Sequence[dict]) -> str:
    """The document passages quoted in the last user turn (empty when it carried none), '> ' marks removed."""
    users = [m for m in messages if m.get("role") == "user" and isinstance(m.get("content"), str)]
    if not users:
        return ""
    found = _DOCUMENTS.search(users[-1]["content"])
    if not found:
        return ""
    return "\n".join(line[2:] if line.startswith("> ") else line.lstrip(">") for line in found.group(1).splitlines())


def question_of(messages: Sequence[dict]) -> str:
    """The user's own words of the last turn (after "My question: " when the turn carries data)."""
    users = [m for m in messages if m.get("role") == "user" and isinstance(m.get("content"), str)]
    if not users:
        return ""
    text = users[-1]["content"]
    return text.rsplit("My question: ", 1)[-1]


def facts_of(text: str) -> set[str]:
    """Numbers (digits or number words, separators dropped), codes (ERR-4312, CAL-HX-12) and lone capital
    letters that name something ("point B")."""
    text = _WORD_NUMBER.sub(lambda m: _WORD_NUMBERS[m.group(1).lower()], text)
    facts = {re.sub(r"[.,]", "", n) for n in _NUMBER.findall(text)}
    facts |= {c.lower() for c in _CODE.findall(text)}
    facts |= {"letter:" + x for x in _LETTER.findall(text)}
    return facts


def _covered(fact: str, source_facts: set[str], source_text: str) -> bool:
    if fact in source_facts:
        return True
    if fact.startswith("letter:"):
        return False
    # A code or number that the source holds inside a longer token ("4312" of ERR-4312).
    return re.search(r"(?<![0-9a-z])" + re.escape(fact) + r"(?![0-9a-z])", source_text.lower()) is not None


def unsupported_facts(answer: str, passages: str, question: str = "") -> list[str]:
    """The answer's numbers, codes and named letters that neither the passages nor the question hold."""
    source = passages + "\n" + question
    source_facts = facts_of(source)
    claimed = facts_of(_CITATION.sub(" ", answer))
    return sorted(f.removeprefix("letter:") for f in claimed if not _covered(f, source_facts, source))


# An honest answer to a question the documents cannot answer says so; anything else states something invented.
# The loop bench (bench/loop.py) judges unanswerable questions with these patterns, and the dataset builder's
# "not in the documents" rows (training/passage_rows.py) answer `ABSTAIN_ANSWER`, which they match.
ABSTAINS = re.compile(
    r"\b(?:(?:do|does|did)(?: not|n't) (?:know|say|mention|specify|state|contain|include|cover|have|list)|"
    r"not (?:mentioned|stated|specified|listed|given|included|covered|available|sure|in the (?:documents?|passages?|"
    r"data|text))|no (?:information|mention|details?|data)|(?:can ?not|can't|couldn't|could not|unable to) "
    r"(?:find|tell|say|answer|determine)|unknown|isn't (?:mentioned|stated|specified)|i'm not sure|"
    r"i am not sure)\b", re.I)
ABSTAIN_ANSWER = "The documents I have do not say."


def abstains(answer: str) -> bool:
    """The answer says that it does not know, or that the documents do not say."""
    return bool(ABSTAINS.search(answer))


def contradicts(answer: str, passages: str, question: str = "") -> bool:
    """True when there are passages and the answer states a number, code or named letter they do not hold."""
    return bool(passages.strip()) and bool(unsupported_facts(answer, passages, question))


# Words an answer uses to hand the question back ("Your question: ...", "You asked about ..."): they add nothing.
_ECHO_WORDS = frozenset({"question", "ask", "answer", "quer", "query"})


def echoes_question(answer: str, question: str) -> bool:
    """True when the answer only repeats its question: every content word it has is the question's (or a word
    that hands it back, like "Your question: ..."). Such an answer states nothing, so it is no SFT target even
    when a user liked it (a short answer that names the product pleases some). An answer with no content words
    ("No.") is not an echo."""
    words = content_words(answer)
    asked = set(content_words(question)) | _ECHO_WORDS
    return bool(words) and all(w in asked for w in words)


def contradicts_prompt(answer: str, messages: Sequence[dict]) -> bool:
    """`contradicts` for an answer to a served prompt (its passages and question read from the messages)."""
    return contradicts(answer, passages_of(messages), question_of(messages))
