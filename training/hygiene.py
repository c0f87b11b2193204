"""Data hygiene applied to every text before any dataset file is written.

In: plain strings (message contents, teacher questions and answers).
Out:
- `scrub_pii(text) -> Scrubbed`: the text with personal data replaced by placeholders such as
  `[EMAIL]`, plus how many of each kind were replaced. Kinds: e-mail addresses (also `a [at] b [dot] c`),
  phone numbers (Korean mobile/landline in every common spelling, `+82 ...`, international `+NN ...`,
  North-American), payment card numbers (13-19 digits, spaced or dashed or digit-by-digit, Luhn-checked),
  Korean resident registration numbers, IPv4/IPv6 addresses, API keys and tokens (OpenAI, GitHub, AWS,
  Google, Slack, Hugging Face, Stripe, JWT, private key blocks, `password = ...` style assignments,
  bearer tokens) and credentials inside URLs (`scheme://user:pass@host`, `?api_key=...`).
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
# Obfuscated forms people type to dodge scrapers: `name [at] host [dot] com`, `name (at) host.com`,
# `name at host dot com`. The last one needs `dot <tld>` so that "look at this" stays untouched.
_AT = r"(?:\s*[\[\(\{<]\s*at\s*[\]\)\}>]\s*|\s+at\s+)"
_DOT = r"(?:\s*[\[\(\{<]\s*dot\s*[\]\)\}>]\s*|\s+dot\s+|\.)"
_EMAIL_OBFUSCATED = re.compile(
    r"(?i)(?<![A-Za-z0-9._%+\-])[A-Za-z0-9][A-Za-z0-9._%+\-]*" + _AT
    + r"[A-Za-z0-9\-]+(?:" + _DOT + r"[A-Za-z0-9\-]+)*" + _DOT
    + r"(?:com|net|org|io|kr|co|edu|gov|ai|dev|me|info|biz|uk|de|jp|fr|us)" + _NA
)


_MAYBE_OBFUSCATED_AT = re.compile(r"(?i)[\[\(\{<]\s*at\s*[\]\)\}>]|\sat\s")


def _scrub_email(text: str, counts: Counter[str]) -> str:
    if "@" in text:
        text, n = _sub(_EMAIL, PLACEHOLDERS["email"], text)
        counts["email"] += n
    if not _MAYBE_OBFUSCATED_AT.search(text):
        return text
    for m in reversed(list(_EMAIL_OBFUSCATED.finditer(text))):
        # "at ... dot com" spelled out in words must still contain a dot-word or bracket to be an address.
        if re.search(r"(?i)[\[\(\{<]\s*at|\sdot\s|[\[\(\{<]\s*dot", m.group(0)) is None:
            continue
        text = text[: m.start()] + PLACEHOLDERS["email"] + text[m.end():]
        counts["email"] += 1
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


def scrub_pii(text: str) -> Scrubbed:
    """Replace personal data and secrets in `text` with placeholders.

    Order matters: secrets and URL credentials first (they contain `@` and digits the later passes
    would misread), then e-mail, resident numbers before cards and phones (13 digits), IPs last.
    """
    if not isinstance(text, str):
        raise TypeError(f"scrub_pii expects str, got {type(text).__name__}")
    # NFKC folds full-width digits and letters (０１０-１２３４-５６７８) into ASCII so the patterns see them.
    out = unicodedata.normalize("NFKC", text)
    counts: Counter[str] = Counter()
    out = _scrub_secrets(out, counts)
    out = _scrub_email(out, counts)
    if _DIGIT.search(out):  # everything below needs a digit (IPv6 in hex without one is rare and odd)
        if _SIX_DIGITS.search(out):
            out = _scrub_rrn(out, counts)
        if _THIRTEEN_DIGITS.search(out):
            out = _scrub_cards(out, counts)
        out = _scrub_phones(out, counts)
        out = _scrub_ips(out, counts)
    if not counts or not any(counts.values()):
        # Return the caller's exact text when nothing was found (NFKC may still have changed it).
        return Scrubbed(text, {})
    return Scrubbed(out, {k: v for k, v in counts.items() if v})


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
