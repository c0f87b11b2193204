"""Data hygiene applied to every text before any dataset file is written.

In: plain strings (message contents, teacher questions and answers).
Out:
- `scrub_pii(text) -> Scrubbed`: the text with personal data replaced by placeholders such as
  `[EMAIL]`, plus how many of each kind were replaced. Kinds: e-mail addresses,
  phone numbers (Korean mobile/landline in every common spelling, `+82 ...`, international `+NN ...`,
  North-American), payment card numbers (13-19 digits, spaced or dashed or digit-by-digit, Luhn-checked),
  Korean resident registration numbers, IPv4/IPv6 addresses, API keys and tokens (OpenAI, GitHub, AWS,
  Google, Slack, Hugging Face, Stripe, JWT, private key blocks, `password = ...` style assignments,
  bearer tokens) and credentials inside URLs (`scheme://user:pass@host`, `?api_key=...`). Each kind is
  also found spaced out, spelled out or bracketed (`j o h n . d o e @ example . com`, `john dot doe at
  example dot com`, `0 1 0 - 1 2 3 4 - 5 6 7 8`, `zero one zero ...`, `192[.]168[.]0[.]1`, a zero-width
  space inside a value), without touching ordinary text ("look at this", "a b c", "10 - 20").
- `quality_problem(text, limits) -> str | None`: why a text is unfit (empty, too short, too long, mostly
  non-text, degenerate repetition), or None.
- `Deduplicator`: exact (normalised hash) and near-duplicate (datasketch MinHash LSH over character
  5-gram shingles, so it also works for languages written without spaces) detection over a stream.

Design: the scrubber is deliberately greedy about secrets (a false positive costs one placeholder, a
false negative leaks a credential into model weights) but precise about ordinary numbers: dates,
versions, prices, times and quantities are never touched, because answers full of placeholders are
worse training data. Where a number could be either (a 16-digit run, a dotted quad after "version"),
a validity check decides: Luhn for cards, octet range and context for IPs, a plausible birth date
for resident registration numbers.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from datasketch import MinHashLSH

PLACEHOLDERS = {
    "email": "[EMAIL]",
    "phone": "[PHONE]",
    "card": "[CARD]",
    "rrn": "[RRN]",
    "ip": "[IP]",
    "secret": "[SECRET]",
    "url_credentials": "[CREDENTIALS]",
}


@dataclass(frozen=True)
class Scrubbed:
    text: str
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.counts)


# ------------------------------------------------------------------------------------------ helpers

def luhn_valid(digits: str) -> bool:
    """True when a digit string passes the Luhn checksum used by payment cards."""
    if not digits.isdigit() or not digits:
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


# Alphanumerics on either side mean the match is part of a larger token (an id, a hash, a word).
_NB = r"(?<![A-Za-z0-9_])"  # no word char before
_NA = r"(?![A-Za-z0-9_])"  # no word char after


def _sub(pattern: re.Pattern[str], repl: str | Callable[[re.Match[str]], str], text: str) -> tuple[str, int]:
    return pattern.subn(repl, text)


# ------------------------------------------------------------------------------------------ secrets

_PRIVATE_KEY = re.compile(
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|\Z)",
    re.S,
)
_TOKEN_PATTERNS = [
    r"sk-(?:proj-|ant-(?:api\d\d-)?|svcacct-|admin-)?[A-Za-z0-9_\-]{20,}",  # OpenAI / Anthropic
    r"(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{30,}",  # GitHub classic tokens
    r"github_pat_[A-Za-z0-9_]{22,}",  # GitHub fine-grained
    r"glpat-[A-Za-z0-9_\-]{20,}",  # GitLab
    r"(?:AKIA|ASIA|ABIA|ACCA|AIDA|AROA)[0-9A-Z]{16}",  # AWS access key id
    r"AIza[0-9A-Za-z_\-]{35}",  # Google API key
    r"xox[abposr]-[A-Za-z0-9\-]{10,}",  # Slack
    r"hf_[A-Za-z0-9]{30,}",  # Hugging Face
    r"(?:sk|pk|rk)_(?:live|test)_[A-Za-z0-9]{16,}",  # Stripe
    r"eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}",  # JWT
    r"npm_[A-Za-z0-9]{36}",
]
_TOKENS = re.compile(_NB + "(?:" + "|".join(_TOKEN_PATTERNS) + ")" + r"(?![A-Za-z0-9_\-])")
_BEARER = re.compile(r"(?i)(\b(?:bearer|token|basic)\s+)([A-Za-z0-9_\-.=+/~]{16,})")
# `password = "x"`, `"api_key": "x"`, `AWS_SECRET_ACCESS_KEY=x`, `--token x`: keep the name, drop the value.
_SECRET_NAME = (
    r"(?i)((?:\b|_)(?:api[_\-]?key|apikey|secret(?:[_\-]?(?:access[_\-]?)?key)?|client[_\-]?secret|"
    r"access[_\-]?token|auth[_\-]?token|refresh[_\-]?token|token|password|passwd|pwd|passphrase|"
    r"private[_\-]?key|credentials?)[\"']?"
)
_ASSIGNED = re.compile(
    _SECRET_NAME + r"\s*(?::=|=>|[:=])\s*)(?:(\"|')([^\"'\n]{4,})\2|([^\s\"',;)}\]]{4,}))"
)
# `--password hunter2!`, `token 8f3a9c...`: without a colon or equals sign only values that look
# generated (letters and digits mixed) count, so "token budget" or "password reset" stay prose.
_SPACED = re.compile(_SECRET_NAME + r"\s+)([^\s\"',;)}\]]{6,})")


_CODE_OR_WORD = re.compile(r"[A-Za-z_][A-Za-z_.]*[\[(]?[A-Za-z_.]*")


def _has_letter_and_digit(value: str) -> bool:
    return any(c.isdigit() for c in value) and any(c.isalpha() for c in value)


def _is_placeholder(value: str) -> bool:
    return value.startswith("[") and value.rstrip("]\"'").endswith(("SECRET", "CREDENTIALS"))


def _scrub_assignments(text: str, counts: Counter[str]) -> str:
    def assigned(m: re.Match[str]) -> str:
        quoted = m.group(3)
        value = quoted if quoted is not None else m.group(4)
        # Anything quoted next to such a name is treated as a secret. Unquoted, a bare word
        # ("password: required") is prose and a dotted name or call (`pad_token = tok.eos_token`,
        # `password: Annotated[str`) is code; secrets mix in digits or other symbols.
        if _is_placeholder(value) or (quoted is None and _CODE_OR_WORD.fullmatch(value)):
            return m.group(0)
        counts["secret"] += 1
        q = m.group(2) or ""
        return f"{m.group(1)}{q}{PLACEHOLDERS['secret']}{q}"

    def spaced(m: re.Match[str]) -> str:
        if _is_placeholder(m.group(2)) or not _has_letter_and_digit(m.group(2)):
            return m.group(0)
        counts["secret"] += 1
        return m.group(1) + PLACEHOLDERS["secret"]

    def bearer(m: re.Match[str]) -> str:
        if not (m.group(1).lower().startswith("bearer") or _has_letter_and_digit(m.group(2))):
            return m.group(0)
        counts["secret"] += 1
        return m.group(1) + PLACEHOLDERS["secret"]

    text = _BEARER.sub(bearer, text)
    text = _ASSIGNED.sub(assigned, text)
    return _SPACED.sub(spaced, text)


_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]{1,15}://)([^\s/?#@\"'<>]+)@")
_URL_QUERY_SECRET = re.compile(
    r"(?i)([?&;](?:access_token|token|api_key|apikey|key|secret|password|passwd|pwd|sig|signature|"
    r"auth|client_secret|x-amz-signature|x-amz-credential)=)([^&\s#\"'<>]+)"
)


_SECRET_WORD = re.compile(r"(?i)pass|pwd|secret|token|key|bearer|basic|credential|auth")


def _scrub_secrets(text: str, counts: Counter[str]) -> str:
    # Each pass is gated by a cheap test for a character or word it cannot match without: most chat
    # text has none, and a dataset build scrubs hundreds of thousands of messages.
    if "-----BEGIN" in text:
        text, n = _sub(_PRIVATE_KEY, PLACEHOLDERS["secret"], text)
        counts["secret"] += n
    if "://" in text:
        # URL credentials before e-mails: in `postgres://user:pw@db.example.com` the `pw@db.example.com`
        # part would otherwise be read as an e-mail and the user name would survive.
        text, n = _sub(_URL_USERINFO, lambda m: m.group(1) + PLACEHOLDERS["url_credentials"] + "@", text)
        counts["url_credentials"] += n
    if "=" in text:
        text, n = _sub(_URL_QUERY_SECRET, lambda m: m.group(1) + PLACEHOLDERS["secret"], text)
        counts["secret"] += n
    text, n = _sub(_TOKENS, PLACEHOLDERS["secret"], text)
    counts["secret"] += n
    if _SECRET_WORD.search(text):
        text = _scrub_assignments(text, counts)
    return text


# ------------------------------------------------------------------------------------------ e-mail

_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9][A-Za-z0-9._%+\-]*@[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,24}" + _NA
)
# Spelled-out and spaced forms (`name [at] host [dot] com`, `j o h n @ ...`) are put back together by
# the obfuscation pass at the end of this module, which then runs this pattern on them.


def _scrub_email(text: str, counts: Counter[str]) -> str:
    if "@" in text:
        text, n = _sub(_EMAIL, PLACEHOLDERS["email"], text)
        counts["email"] += n
    return text


# ------------------------------------------------------------------------------------------ RRN

# YYMMDD-GNNNNNN; G is 1-4 for citizens (century and sex), 5-8 for foreign residents. The checksum
# digit is not checked: numbers issued since October 2020 no longer carry one.
_RRN = re.compile(
    r"(?<![\d\-])(\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01]))\s{0,2}[-\u2013\u2010]?\s{0,2}([1-8]\d{6})(?![\d\-])"
)


def _scrub_rrn(text: str, counts: Counter[str]) -> str:
    text, n = _sub(_RRN, PLACEHOLDERS["rrn"], text)
    counts["rrn"] += n
    return text


# ------------------------------------------------------------------------------------------ cards

# A run of digit groups joined by single spaces or dashes; which sub-runs are cards is decided below.
_DIGIT_RUN = re.compile(r"(?<![\d.,])\d+(?:[ \-]\d+)*(?![\d]|[.,]\d)")


def _card_shape(groups: list[str]) -> bool:
    sizes = [len(g) for g in groups]
    total = sum(sizes)
    if not 13 <= total <= 19 or groups[0][0] not in "23456":
        return False
    if len(sizes) == 1:
        return True
    if all(s == 1 for s in sizes):  # typed digit by digit
        return True
    if sizes[:-1] == [4] * (len(sizes) - 1) and 1 <= sizes[-1] <= 4:  # 4-4-4-4(-3)
        return True
    return sizes in ([4, 6, 5], [4, 6, 4])  # Amex, Diners


def _card_spans(text: str) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for run in _DIGIT_RUN.finditer(text):
        base = run.start()
        parts = [(m.group(0), base + m.start(), base + m.end()) for m in re.finditer(r"\d+", run.group(0))]
        i = 0
        while i < len(parts):
            found = None
            # Longest valid window starting at group i wins, so "4111 1111 1111 1111 2024" takes the card only.
            for j in range(len(parts), i, -1):
                groups = [p[0] for p in parts[i:j]]
                if _card_shape(groups) and luhn_valid("".join(groups)):
                    found = j
                    break
            if found is None:
                i += 1
                continue
            spans.append((parts[i][1], parts[found - 1][2]))
            i = found
    return spans


def _scrub_cards(text: str, counts: Counter[str]) -> str:
    for start, end in reversed(_card_spans(text)):
        text = text[:start] + PLACEHOLDERS["card"] + text[end:]
        counts["card"] += 1
    return text


# ------------------------------------------------------------------------------------------ phones

_SEP = r"[\s.\-\u2010\u2013]{0,2}"
_PHONE_PATTERNS = [
    # Korean mobile: 010-1234-5678, 010 1234 5678, 01012345678, +82 10 1234 5678, +82 (0)10-..., 82-10-...
    r"(?:\+?82" + _SEP + r"(?:\(0\)" + _SEP + r")?|\(?0)1[016789]\)?" + _SEP + r"\d{3,4}" + _SEP + r"\d{4}",
    # Korean landline / VoIP: 02-312-4567, 031-123-4567, 070-1234-5678, +82 2 312 4567
    r"(?:\+?82" + _SEP + r"(?:\(0\)" + _SEP + r")?|\(?0)(?:2|[3-6][1-5]|70)\)?[\s.\-]{1,2}\d{3,4}[\s.\-]{1,2}\d{4}",
    # Any number written in international form: +44 20 7946 0958, +1 (415) 555-0132, +81-3-1234-5678
    r"\+[1-9]\d{0,2}" + _SEP + r"(?:\(\d{1,4}\)" + _SEP + r")?\d{1,5}(?:" + _SEP + r"\d{2,5}){1,4}",
    # North-American without country code: (415) 555-0132, 415-555-0132, 415.555.0132
    r"(?:\(\d{3}\)\s?|\d{3}[\-.])\d{3}[\-.]\d{4}",
]
_PHONE = re.compile(r"(?<![\w+.\-])(?:" + "|".join(_PHONE_PATTERNS) + r")(?![\w]|[.\-]\d)")


def _scrub_phones(text: str, counts: Counter[str]) -> str:
    def repl(m: re.Match[str]) -> str:
        digits = re.sub(r"\D", "", m.group(0))
        if not 8 <= len(digits) <= 15:  # E.164 bounds; shorter is an extension or a count
            return m.group(0)
        counts["phone"] += 1
        return PLACEHOLDERS["phone"]

    return _PHONE.sub(repl, text)


# ------------------------------------------------------------------------------------------ IPs

_IPV4 = re.compile(r"(?<![\w.])((?:\d{1,3}\.){3}\d{1,3})(?![\w]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:])((?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?:%\w+)?)(?![\w:])")
_VERSION_CONTEXT = re.compile(r"(?i)\b(?:v|ver\.?|version|release|build)\s*$")
# Not personal, and the product's own docs talk about them.
_KEEP_IPS = {"127.0.0.1", "0.0.0.0", "::1", "::"}


def _scrub_ips(text: str, counts: Counter[str]) -> str:
    def v4(m: re.Match[str]) -> str:
        ip = m.group(1)
        if ip in _KEEP_IPS or _VERSION_CONTEXT.search(text[max(0, m.start() - 12): m.start()]):
            return m.group(0)
        try:
            ipaddress.IPv4Address(ip)
        except ValueError:
            return m.group(0)  # 999.1.2.3 is a version or an outline number, not an address
        counts["ip"] += 1
        return PLACEHOLDERS["ip"]

    def v6(m: re.Match[str]) -> str:
        cand = m.group(1)
        if cand in _KEEP_IPS or (cand.count(":") < 7 and "::" not in cand):
            return m.group(0)  # 12:30:45 is a time
        try:
            ipaddress.IPv6Address(cand.split("%")[0])
        except ValueError:
            return m.group(0)
        counts["ip"] += 1
        return PLACEHOLDERS["ip"]

    if text.count(":") >= 2:
        text = _IPV6.sub(v6, text)
    return _IPV4.sub(v4, text) if "." in text else text


# ------------------------------------------------------------------------------------------ public

_DIGIT = re.compile(r"\d")
_SIX_DIGITS = re.compile(r"\d{6}")  # a resident number starts with its YYMMDD block
_THIRTEEN_DIGITS = re.compile(r"\d(?:[ \-]?\d){12}")  # the shortest card, however it is spaced


def _scrub_plain(text: str, counts: Counter[str]) -> str:
    """Every pattern pass, in order: secrets and URL credentials first (they contain `@` and digits the
    later passes would misread), then e-mail, resident numbers before cards and phones (13 digits), IPs last."""
    out = _scrub_secrets(text, counts)
    out = _scrub_email(out, counts)
    if _DIGIT.search(out):  # everything below needs a digit (IPv6 in hex without one is rare and odd)
        if _SIX_DIGITS.search(out):
            out = _scrub_rrn(out, counts)
        if _THIRTEEN_DIGITS.search(out):
            out = _scrub_cards(out, counts)
        out = _scrub_phones(out, counts)
        out = _scrub_ips(out, counts)
    return out


def scrub_pii(text: str) -> Scrubbed:
    """Replace personal data and secrets in `text` with placeholders.

    The pattern passes run on the text as written, then once more on spaced-out and spelled-out forms
    put back together (`j o h n . d o e @ example . com`, `john dot doe at example dot com`,
    `0 1 0 - 1 2 3 4 - 5 6 7 8`, zero-width characters inside a value): see "Obfuscated forms" below.
    """
    if not isinstance(text, str):
        raise TypeError(f"scrub_pii expects str, got {type(text).__name__}")
    # NFKC folds full-width digits and letters (０１０-１２３４-５６７８) into ASCII so the patterns see them.
    out = unicodedata.normalize("NFKC", text)
    counts: Counter[str] = Counter()
    # Obfuscated forms first: a plain pass could take a piece of one (four digits of a spaced-out
    # token read as a card) and leave the rest behind.
    if any(rx.search(out) for rx in _MAYBE_OBFUSCATED):
        out = _scrub_obfuscated(out, counts)
    out = _scrub_plain(out, counts)
    if not counts or not any(counts.values()):
        # Return the caller's exact text when nothing was found (NFKC may still have changed it).
        return Scrubbed(text, {})
    return Scrubbed(out, {k: v for k, v in counts.items() if v})


# ------------------------------------------------------------------------------------------ obfuscated forms
#
# People space values out or spell their symbols to get past filters: "j o h n . d o e @ example . com",
# "john dot doe at example dot com", "john[at]example[dot]com", "0 1 0 - 1 2 3 4 - 5 6 7 8", "zero one
# zero ...", a zero-width space inside an address. Every pattern above sees only what is written, so
# such forms are put back together first and the same passes run on the result.
#
# The text is cut into chunks at whitespace. Two neighbouring chunks are glued (the whitespace between
# them dropped) only on evidence: one of them is a lone separator ("@", ".", "-", ...), both are single
# letters or digits at the touching ends (letter-spacing), they belong to a run of at least four digit
# words, or between them stands "dot" or "at" with address-like words on both sides that are not
# ordinary words ("the", "home", "least" ...). Bracketed [at]/(dot), zero-width characters and the
# Korean words for @ and "." are read inside a chunk. A plain " at " becomes "@" only when something
# else in the same glued run is obfuscated too, so "sign up at example.com" stays prose.
#
# A glued run is scrubbed with some text of context on either side, and only the part the passes
# changed is replaced in the original: the ordinary text around it is left exactly as written, and a
# run in which nothing personal turns up ("a b c", "10 - 20") is not touched at all.

_BRACKET_AT = r"[\[\(\{<]\s*(?:at|@)\s*[\]\)\}>]"
_BRACKET_DOT = r"[\[\(\{<]\s*(?:dot|\.)\s*[\]\)\}>]"
_KO_AT, _KO_DOT = r"(?<![가-힣])골뱅이(?![가-힣])", r"(?<![가-힣])닷(?![가-힣])"
_FORMAT_CHARS = "\u00ad\u180e\u200b\u200c\u200d\u200e\u200f\u2060\u2061\u2062\u2063\u2064\ufeff"
_INNER = re.compile(rf"(?i)(?P<at>{_BRACKET_AT}|{_KO_AT})|(?P<dot>{_BRACKET_DOT}|{_KO_DOT})|(?P<cf>[{_FORMAT_CHARS}])")
_UNIT = re.compile(rf"(?i)(?:{_BRACKET_AT}|{_BRACKET_DOT}|\S)+|\s+")
_DIGIT_WORDS = {"zero": "0", "oh": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "공": "0", "영": "0", "일": "1", "이": "2", "삼": "3",
                "사": "4", "오": "5", "육": "6", "륙": "6", "칠": "7", "팔": "8", "구": "9"}
_DW = "|".join(sorted(_DIGIT_WORDS, key=len, reverse=True))
_DIGITISH = re.compile(rf"(?i)(?:{_DW}|\d|[\-.+()])+")
_DW_RE = re.compile(rf"(?i){_DW}")
_DIGITISH_FIRST = frozenset("0123456789-.+()" + "".join(w[0] for w in _DIGIT_WORDS))
_KO_DIGIT_RUN = re.compile(r"[공영일이삼사오육륙칠팔구]{8,}")
_SEPARATORS = frozenset("@.-_:/+()=")
_STRONG_SEPARATORS = frozenset("@.")
_PUNCT_AROUND = ",;:!?\"'()[]{}<>"  # a sentence's punctuation next to a spelled-out address (not "." or "-")
_LOCAL_LIKE = re.compile(r"[A-Za-z0-9._%+\-]+")
_LABEL_LIKE = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-]*")
_NOT_ADDRESS = frozenset(
    "a an the this that these those my your his her our their its me you him us them it one all some any no "
    "each every which what who where here there now then home work school office church college university "
    "least most first last once night noon dawn time times look looking looked aim aimed arrive arrived is "
    "are was were be been am best worst risk odds ease stake hand heart sea war peace rest large length will "
    "random face bay fault play lunch dinner breakfast dot at".split())
# Cheap test for anything the glueing could act on; most texts have none and skip the pass.
_EN_DW = "zero|oh|one|two|three|four|five|six|seven|eight|nine"
_KO_DW = "[공영일이삼사오육륙칠팔구]"
# Cheap tests for anything the glueing could act on, cheapest first; most texts match none and skip the
# pass. (One alternation of all of them was slower than the sum of its parts.)
_MAYBE_OBFUSCATED = (
    re.compile(rf"[{_FORMAT_CHARS}]"),
    re.compile(r"\s[@.\-_:/+=()]\s"),
    re.compile(r"\d(?:\s{2,3}|\t)\d"),
    re.compile(r"(?i)\sdot\s|골뱅이|닷"),
    re.compile(rf"{_KO_DW}(?:[\s\-.]{{0,3}}{_KO_DW}){{3}}"),
    re.compile(r"(?<![^\W_])[^\W_]\s{1,3}[^\W_]\s{1,3}[^\W_](?![^\W_])"),
    re.compile(rf"(?i)\b(?:{_EN_DW})\b(?:[\s\-.]{{1,3}}(?:{_EN_DW})\b){{3}}"),
    re.compile(rf"(?i){_BRACKET_AT}|{_BRACKET_DOT}"),
)
_CONTEXT = 32  # characters of the surrounding text the passes see (version numbers, "password =" ...)


@dataclass
class _Chunk:
    start: int
    end: int
    canon: str  # the chunk with [at]/[dot]/zero-width forms read
    spans: list[tuple[int, int]] | None  # per character of canon, the original ones; None: canon is the text
    kind: str  # "sep", "at", "dot", "digits" or "plain"
    evidence: bool = False  # an obfuscation inside the chunk itself
    digit_words: int = 0


def _chunk(text: str, start: int, end: int, inner: bool) -> _Chunk:
    raw = text[start:end]
    canon: list[str] = []
    spans: list[tuple[int, int]] | None = []
    evidence = False
    pos = 0
    for m in _INNER.finditer(raw) if inner else ():
        for k in range(pos, m.start()):
            canon.append(raw[k])
            spans.append((start + k, start + k + 1))
        if m.lastgroup in ("at", "dot"):
            canon.append("@" if m.lastgroup == "at" else ".")
            spans.append((start + m.start(), start + m.end()))
        evidence = True
        pos = m.end()
    if not evidence:
        canon, spans = [raw], None
    else:
        for k in range(pos, len(raw)):
            canon.append(raw[k])
            spans.append((start + k, start + k + 1))
    word = raw.lower()
    text_canon = "".join(canon)
    kind, digit_words = "plain", 0
    if word == "at" or word == "dot":
        kind = word
    elif len(text_canon) == 1 and text_canon in _SEPARATORS:
        kind = "sep"
    elif word[0] in _DIGITISH_FIRST and _DIGITISH.fullmatch(raw):
        kind, digit_words = "digits", len(_DW_RE.findall(raw))
        if digit_words >= 8 and _KO_DIGIT_RUN.fullmatch(raw):
            evidence = True  # one chunk of Korean digit syllables
    return _Chunk(start, end, text_canon, spans, kind, evidence, digit_words)


def _edge_run(s: str, from_end: bool) -> int:
    """Length of the run of letters/digits at one end of `s` (0 when that end is not one)."""
    chars = reversed(s) if from_end else iter(s)
    n = 0
    for ch in chars:
        if not ch.isalnum():
            break
        n += 1
    return n


def _address_word(c: _Chunk, pattern: re.Pattern[str]) -> bool:
    """A word that can be part of an address: "kr," at the end of a sentence counts as "kr"."""
    word = c.canon.strip(_PUNCT_AROUND)
    return c.kind in ("plain", "digits") and bool(pattern.fullmatch(word)) and word.lower() not in _NOT_ADDRESS


@dataclass
class _Glue:
    """What joins chunk i and i+1 in a run put back together."""

    glued: list[bool]
    strong: list[bool]  # the glueing itself is evidence of obfuscation
    by_at: list[bool]  # glued only by a plain " at "
    joiner: list[str]  # what stands between them in the run: "" or, for widened digit groups, " "


def _glue(chunks: list[_Chunk], gaps: list[str | None]) -> _Glue:
    """How the gaps between neighbouring chunks glue (`gaps[i]`: the whitespace, None if too wide)."""
    n = len(chunks)
    glued, strong, by_at = [False] * (n - 1), [False] * (n - 1), [False] * (n - 1)
    joiner = [""] * (n - 1)
    for i in range(n - 1):
        if gaps[i] is None:
            continue
        a, b = chunks[i], chunks[i + 1]
        if a.kind == "sep" or b.kind == "sep":
            glued[i] = True
            strong[i] = a.canon in _STRONG_SEPARATORS or b.canon in _STRONG_SEPARATORS
        elif _edge_run(a.canon, True) == 1 and _edge_run(b.canon, False) == 1:
            glued[i] = strong[i] = True  # letter-spacing: "j o h n"
        elif a.canon[-1:].isdigit() and b.canon[:1].isdigit() and gaps[i] != " ":
            glued[i], joiner[i] = True, " "  # digit groups pushed apart: "010   1234   5678"
    for j in range(1, n - 1):  # "john dot doe", "support at example dot com"
        c = chunks[j]
        if c.kind not in ("at", "dot") or gaps[j - 1] is None or gaps[j] is None:
            continue
        left = _LOCAL_LIKE if c.kind == "at" else _LABEL_LIKE
        if _address_word(chunks[j - 1], left) and _address_word(chunks[j + 1], _LABEL_LIKE):
            for g in (j - 1, j):
                by_at[g] = c.kind == "at" and not glued[g]
                glued[g] = True
                strong[g] = strong[g] or c.kind == "dot"
    i = 0
    while i < n:  # runs of digit words: "zero one zero one two three four ..."
        k = i
        while (k + 1 < n and chunks[k].kind in ("digits", "sep") and chunks[k + 1].kind in ("digits", "sep")
               and gaps[k] is not None):
            k += 1
        words = sum(c.digit_words for c in chunks[i:k + 1])
        if words >= 4 and k > i:
            for g in range(i, k):
                glued[g] = strong[g] = True
                joiner[g] = ""
        i = k + 1
    return _Glue(glued, strong, by_at, joiner)


def _region_canon(chunks: list[_Chunk], joiners: list[str], spoken_digits: bool) -> tuple[str, list[tuple[int, int]]]:
    canon: list[str] = []
    spans: list[tuple[int, int]] = []
    for t, c in enumerate(chunks):
        if t and joiners[t - 1]:
            canon.append(joiners[t - 1])
            spans.append((chunks[t - 1].end, c.start))
        if c.kind == "at" or c.kind == "dot":
            canon.append("@" if c.kind == "at" else ".")
            spans.append((c.start, c.end))
        elif c.kind == "digits" and spoken_digits and c.digit_words:
            for m in re.finditer(rf"(?i){_DW}|.", c.canon):
                canon.append(_DIGIT_WORDS.get(m.group(0).lower(), m.group(0)))
                spans.append((_span(c, m.start())[0], _span(c, m.end() - 1)[1]))
        else:
            canon.append(c.canon)
            spans.extend(c.spans if c.spans is not None else ((k, k + 1) for k in range(c.start, c.end)))
    return "".join(canon), spans


def _span(c: _Chunk, k: int) -> tuple[int, int]:
    return c.spans[k] if c.spans is not None else (c.start + k, c.start + k + 1)


_WINDOW = 80  # characters around each trigger that are cut into chunks (runs extend through triggers)


def _windows(text: str) -> list[tuple[int, int]]:
    """Stretches of `text` around the places the cheap test fires, merged, cut at whitespace.

    Only these are cut into chunks: a long message pays for the few places that may hide something.
    """
    out: list[tuple[int, int]] = []
    hits = sorted((m.start(), m.end()) for rx in _MAYBE_OBFUSCATED for m in rx.finditer(text))
    for m_start, m_end in hits:
        lo, hi = max(0, m_start - _WINDOW), min(len(text), m_end + _WINDOW)
        while 0 < lo < m_start and not text[lo - 1].isspace():
            lo += 1
        while m_end < hi < len(text) and not text[hi].isspace():
            hi -= 1
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _regions(text: str) -> list[tuple[str, list[tuple[int, int]], int, int]]:
    """Glued runs with obfuscation evidence: (canonical text, spans, start, end) in `text`."""
    out = []
    for lo, hi in _windows(text):
        out.extend(_window_regions(text, lo, hi))
    return out


def _window_regions(text: str, lo: int, hi: int) -> list[tuple[str, list[tuple[int, int]], int, int]]:
    inner = _INNER.search(text, lo, hi) is not None
    units = [(m.start(), m.end(), m.group(0).isspace()) for m in _UNIT.finditer(text, lo, hi)]
    chunks: list[_Chunk] = []
    gaps: list[str | None] = []
    prev_space: str | None = None
    for start, end, space in units:
        if space:
            prev_space = text[start:end]
            continue
        if chunks:
            near = prev_space is not None and "\n" not in prev_space and len(prev_space) <= 3
            gaps.append(prev_space if near else None)
        chunks.append(_chunk(text, start, end, inner))
        prev_space = None
    if not chunks:
        return []
    g = _glue(chunks, gaps)
    out = []
    for i, k in _runs(g.glued, 0, len(chunks) - 1):
        if k == i and not chunks[i].evidence:
            continue  # a lone chunk: nothing was put together
        if not (any(c.evidence for c in chunks[i:k + 1]) or any(g.strong[i:k])):
            # Nothing obfuscated but a plain " at ": that alone is prose ("ask john at reception").
            for j in range(i, k):
                g.glued[j] = g.glued[j] and not g.by_at[j]
        for a, b in _runs(g.glued, i, k):
            run = chunks[a:b + 1]
            if b > a or run[0].evidence:
                canon, spans = _region_canon(run, g.joiner[a:b], sum(c.digit_words for c in run) >= 4)
                out.append((canon, spans, run[0].start, run[-1].end))
    return out


def _runs(glued: list[bool], first: int, last: int) -> list[tuple[int, int]]:
    """(i, k) for each maximal run of chunks first..last joined by glued gaps."""
    out = []
    i = first
    while i <= last:
        k = i
        while k < last and glued[k]:
            k += 1
        out.append((i, k))
        i = k + 1
    return out


def _scrub_region(text: str, canon: str, spans: list[tuple[int, int]], start: int, end: int,
                  counts: Counter[str]) -> tuple[int, int, str] | None:
    """(start, end, replacement) in `text` for what the passes find in the run put back together."""
    # Context cut at whitespace, so that no word is cut in half (a long number's tail is not a phone).
    lo = max(0, start - _CONTEXT)
    while 0 < lo < start and not text[lo - 1].isspace():
        lo += 1
    hi = min(len(text), end + _CONTEXT)
    while end < hi < len(text) and not text[hi].isspace():
        hi -= 1
    left, right = text[lo:start], text[end:hi]
    joined = left + canon + right
    found: Counter[str] = Counter()
    scrubbed = _scrub_plain(joined, found)
    if scrubbed == joined:
        return None
    p = 0
    while p < min(len(joined), len(scrubbed)) and joined[p] == scrubbed[p]:
        p += 1
    q = 0
    while q < min(len(joined), len(scrubbed)) - p and joined[-1 - q] == scrubbed[-1 - q]:
        q += 1
    a, b = p, len(joined) - q
    if a >= b:
        return None

    def where(k: int) -> tuple[int, int]:  # a character of `joined` -> its span in `text`
        if k < len(left):
            return start - len(left) + k, start - len(left) + k + 1
        if k < len(left) + len(canon):
            return spans[k - len(left)]
        return end + k - len(left) - len(canon), end + k - len(left) - len(canon) + 1

    counts.update(found)
    return where(a)[0], where(b - 1)[1], scrubbed[p:len(scrubbed) - q]


def _scrub_obfuscated(text: str, counts: Counter[str]) -> str:
    """Replace what the passes find in glued runs; twice more if one replacement reached into another."""
    for _ in range(3):
        limit = len(text) + 1
        touched = skipped = False
        for canon, spans, start, end in reversed(_regions(text)):
            if end > limit:
                skipped = True  # an edit on its right reached into it: look again next round
                continue
            edit = _scrub_region(text, canon, spans, start, end, counts)
            if edit is not None:
                a, b, repl = edit
                text = text[:a] + repl + text[b:]
                limit, touched = a, True
        if not (touched and skipped):
            break
    return text


# ------------------------------------------------------------------------------------------ quality

@dataclass(frozen=True)
class QualityLimits:
    min_chars: int = 2
    max_chars: int = 8000
    min_text_ratio: float = 0.5  # letters, digits, spaces and common punctuation over all characters
    max_repeat_ratio: float = 0.5  # share of repeated word 3-grams; above this it is a generation loop


# Characters that are not letters, digits, whitespace or common punctuation (\w covers every script).
_NOT_TEXTY = re.compile(r"[^\w\s.,;:!?'\"()\-\[\]/%$€₩&+*=#@<>{}`~]")
_LETTER = re.compile(r"[^\W\d_]")


def quality_problem(text: str, limits: QualityLimits = QualityLimits()) -> str | None:
    """Why `text` should not be trained on, or None. Reasons are stable names for the manifest."""
    stripped = text.strip() if isinstance(text, str) else ""
    if not stripped:
        return "empty"
    if len(stripped) < limits.min_chars:
        return "too_short"
    if len(stripped) > limits.max_chars:
        return "too_long"
    odd = sum(1 for _ in _NOT_TEXTY.finditer(stripped))
    if (len(stripped) - odd) / len(stripped) < limits.min_text_ratio or not _LETTER.search(stripped):
        return "non_text"
    words = stripped.lower().split()
    if len(words) >= 12:
        grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
        repeated = len(grams) - len(set(grams))
        if repeated / len(grams) > limits.max_repeat_ratio:
            return "repetitive"
    return None


# ------------------------------------------------------------------------------------------ dedup

_NON_WORD = re.compile(r"[^\w]+", re.UNICODE)


def normalize_for_dedup(text: str) -> str:
    """Lower-case, NFKC, punctuation folded to single spaces: what two copies of one text share."""
    return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


_PRIME = np.uint64((1 << 31) - 1)  # Mersenne; keeps signatures in the affine32 scheme range
_MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: spreads packed 5-byte grams over 64 bits


def shingle_hashes(norm: str, k: int = 5) -> np.ndarray:
    """Sorted unique 32-bit hashes of the UTF-8 byte k-grams of `norm` (k <= 8), vectorised.

    Each k-gram is packed into one integer (exact: no collisions before mixing), mixed, and the top
    32 bits kept. A split multi-byte character in a byte gram does no harm to a hash.
    """
    data = np.frombuffer(norm.encode(), dtype=np.uint8).astype(np.uint64)
    if data.size < k:
        data = np.pad(data, (0, k - data.size))
    windows = np.lib.stride_tricks.sliding_window_view(data, k)
    packed = (windows << (np.arange(k, dtype=np.uint64) * np.uint64(8))).sum(axis=1, dtype=np.uint64)
    return np.unique((packed * _MIX) >> np.uint64(32))


@dataclass(frozen=True)
class _Signature:
    """A MinHash signature as MinHashLSH reads it (`hashvalues`, `len`). datasketch's MinHash class
    draws its permutations again on every construction, even from given hash values; this does not."""

    hashvalues: np.ndarray

    def __len__(self) -> int:
        return len(self.hashvalues)


class Deduplicator:
    """Streaming exact + near-duplicate detector; the first occurrence of a text is kept.

    `check(text)` returns "exact", "near" or None and remembers non-duplicates. Near means a Jaccard
    similarity of the texts' character 5-gram sets (hashed) of at least `threshold`. A datasketch
    MinHash LSH index finds candidates at a lower threshold, then the Jaccard similarity is computed
    exactly on the kept hash sets: banding alone misses pairs just above the threshold, and a
    64-permutation estimate alone would merge some pairs well below it. The MinHash signatures are
    computed with numpy in one shot per text (datasketch's MinHash class was most of a 100k build).
    """

    def __init__(self, threshold: float = 0.85, num_perm: int = 64, seed: int = 1) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.num_perm = num_perm
        self._exact: set[bytes] = set()
        self._lsh = MinHashLSH(threshold=max(0.3, threshold - 0.2), num_perm=num_perm)
        self._sets: list[np.ndarray] = []
        rng = np.random.RandomState(seed)
        # Universal hashing (a*x + b) mod p with x < 2**32 and a, b < 2**31: no uint64 overflow.
        self._a = rng.randint(1, 1 << 31, size=num_perm, dtype=np.uint64)
        self._b = rng.randint(0, 1 << 31, size=num_perm, dtype=np.uint64)

    def _minhash(self, hashes: np.ndarray) -> _Signature:
        return _Signature(((hashes[:, None] * self._a + self._b) % _PRIME).min(axis=0))

    def check(self, text: str) -> str | None:
        norm = normalize_for_dedup(text)
        key = hashlib.blake2b(norm.encode(), digest_size=16).digest()
        if key in self._exact:
            return "exact"
        mine = shingle_hashes(norm)
        m = self._minhash(mine)
        for c in self._lsh.query(m):
            other = self._sets[int(c)]
            inter = np.intersect1d(mine, other, assume_unique=True).size
            if inter / (mine.size + other.size - inter) >= self.threshold:
                return "near"
        self._exact.add(key)
        self._lsh.insert(str(len(self._sets)), m)
        self._sets.append(mine)
        return None
