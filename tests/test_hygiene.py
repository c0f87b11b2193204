"""PII scrubbing, quality filters and duplicate detection (training/hygiene.py), on the planted catalogue.

The dataset-level guarantee (no planted value in any written file) is in test_dataset_build.py; here each
case is checked on its own so a failure names the exact pattern that leaked.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from training.hygiene import (
    PLACEHOLDERS,
    Deduplicator,
    QualityLimits,
    luhn_valid,
    quality_problem,
    scrub_pii,
)

CATALOGUE = json.loads((Path(__file__).parent / "data" / "pii_catalogue.json").read_text(encoding="utf-8"))


def test_catalogue_is_big_and_varied():
    kinds = Counter(case["kind"] for case in CATALOGUE["pii"])
    assert len(CATALOGUE["pii"]) >= 30
    assert set(kinds) == set(PLACEHOLDERS)  # every kind the scrubber knows is planted at least once
    tricky = [c for c in CATALOGUE["pii"] if "code" in c["id"] or "spaces" in c["id"] or "digit-by-digit" in c["id"]]
    assert len(tricky) >= 5
    assert len(CATALOGUE["keep"]) >= 10


@pytest.mark.parametrize("case", CATALOGUE["pii"], ids=[c["id"] for c in CATALOGUE["pii"]])
def test_planted_pii_is_scrubbed(case):
    out = scrub_pii(case["text"])
    for value in case["forbidden"]:
        assert value not in out.text, f"{value!r} survived in {out.text!r}"
    assert out.counts.get(case["kind"], 0) >= 1, out.counts
    assert PLACEHOLDERS[case["kind"]] in out.text


@pytest.mark.parametrize("case", CATALOGUE["keep"], ids=[c["id"] for c in CATALOGUE["keep"]])
def test_ordinary_numbers_survive(case):
    out = scrub_pii(case["text"])
    assert out.text == case["text"], f"changed: {out.counts} -> {out.text!r}"
    for value in case["keep"]:
        assert value in out.text


def test_scrub_is_idempotent_and_keeps_surrounding_text():
    text = "Ask kim@example.com or call 010-1234-5678 about release 3.11.7 on 2024-05-12."
    once = scrub_pii(text)
    assert once.text == "Ask [EMAIL] or call [PHONE] about release 3.11.7 on 2024-05-12."
    assert once.counts == {"email": 1, "phone": 1}
    twice = scrub_pii(once.text)
    assert twice.text == once.text and not twice.changed


def test_card_needs_luhn_and_a_card_shape():
    assert luhn_valid("4111111111111111")
    assert not luhn_valid("4111111111111112")
    assert not luhn_valid("")
    assert scrub_pii("pay 4111111111111112 now").text == "pay 4111111111111112 now"
    # A card followed by a year in the same digit run: only the card goes.
    assert scrub_pii("card 4111 1111 1111 1111 2024 renewal").text == "card [CARD] 2024 renewal"


def test_several_kinds_in_one_message_all_go():
    text = ("Hi, I'm Minsu (minsu.kim@example.kr, 010-2222-3333). My RRN is 900101-1234567, card "
            "5555 5555 5555 4444, server 198.51.100.7, key ghp_ZZZZzzzz1111222233334444555566667777.")
    out = scrub_pii(text)
    assert out.counts == {"email": 1, "phone": 1, "rrn": 1, "card": 1, "ip": 1, "secret": 1}
    for gone in ("minsu.kim", "2222-3333", "1234567", "4444", "198.51", "ghp_"):
        assert gone not in out.text


def test_scrub_rejects_non_text():
    with pytest.raises(TypeError):
        scrub_pii(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("   \n ", "empty"),
        ("k", "too_short"),
        ("x" * 9000, "too_long"),
        ("@@@@ #### $$$$ ^^^^ ~~~~ |||| \x00\x01\x02\x03\x04\x05\x06\x07\x08 ▒▒▒▒▒▒▒▒", "non_text"),
        ("1234 5678 9012", "non_text"),
        ("the model the model the model " * 8, "repetitive"),
        ("Paris is the capital of France.", None),
        ("서울은 한국의 수도입니다.", None),
        ("```python\nprint(sum(range(10)))\n```", None),
    ],
)
def test_quality_reasons(text, reason):
    assert quality_problem(text, QualityLimits(min_chars=2, max_chars=8000)) == reason


def test_dedup_exact_near_and_distinct():
    d = Deduplicator(threshold=0.8)
    base = ("To reset the Lumen Desk sync token, open Settings, choose Accounts, press Reset and confirm "
            "with your admin password; the desk app reconnects within a minute.")
    assert d.check(base) is None
    assert d.check(base.upper().replace(",", " ,")) == "exact"  # case and punctuation do not matter
    near = base.replace("within a minute", "within one minute")
    assert d.check(near) == "near"
    other = "Lumen Desk invoices are sent on the first business day of each month by e-mail."
    assert d.check(other) is None
    assert d.check(other) == "exact"


def test_dedup_threshold_is_validated():
    with pytest.raises(ValueError):
        Deduplicator(threshold=0)


# ------------------------------------------------------------------------------------------ obfuscated forms
# Every kind the scrubber knows, spaced out, spelled out, bracketed or split by invisible characters
# (issue 21: "j o h n . d o e @ example . com" survived into every dataset file). Each case names the
# kind it must be found as and pieces of the value that must not survive.
OBFUSCATED = [
    ("email", "mail j o h n . d o e @ example . com please", ["j o h n", "example . com"]),
    ("email", "write to john dot doe at example dot com today", ["john dot doe", "example dot com"]),
    ("email", "john[at]example[dot]com", ["john", "example"]),
    ("email", "reach me: john (at) example (dot) com", ["john", "example"]),
    ("email", "contact: john(at)example.com", ["john(at)", "example.com"]),
    ("email", "john {at} example {dot} com", ["john", "example"]),
    ("email", "john <at> example <dot> com", ["john", "example"]),
    ("email", "john [ at ] example [ dot ] com", ["john", "example"]),
    ("email", "john @ example . com", ["john", "example"]),
    ("email", "JOHN AT EXAMPLE DOT COM", ["JOHN", "EXAMPLE"]),
    ("email", "john\u200b@\u200bexample.com", ["john", "example"]),
    ("email", "mail john_doe at mail dot example dot co dot kr", ["john_doe", "example dot co"]),
    ("email", "메일은 john 골뱅이 example 닷 com 입니다", ["john", "example"]),
    ("phone", "call 0 1 0 1 2 3 4 5 6 7 8 now", ["1 2 3 4", "5 6 7 8"]),
    ("phone", "call 0 1 0 - 1 2 3 4 - 5 6 7 8 now", ["1 2 3 4", "5 6 7 8"]),
    ("phone", "call 010 - 1234 - 5678 now", ["1234", "5678"]),
    ("phone", "call 010   1234   5678 now", ["1234", "5678"]),
    ("phone", "zero one zero one two three four five six seven eight", ["five six seven eight"]),
    ("phone", "번호는 공일공 일이삼사 오육칠팔", ["일이삼사", "오육칠팔"]),
    ("phone", "+ 8 2 1 0 1 2 3 4 5 6 7 8", ["1 2 3 4", "5 6 7 8"]),
    ("phone", "( 4 1 5 ) 5 5 5 - 0 1 3 2", ["5 5 5", "0 1 3 2"]),
    ("phone", "010\u200b1234\u200b5678", ["1234", "5678"]),
    ("card", "card 4 1 1 1 - 1 1 1 1 - 1 1 1 1 - 1 1 1 1", ["1 1 1 1"]),
    ("card", "card 4111 - 1111 - 1111 - 1111", ["1111"]),
    ("card", "four one one one one one one one one one one one one one one one", ["four one one"]),
    ("rrn", "rrn 9 0 0 1 0 1 - 1 2 3 4 5 6 7", ["9 0 0 1 0 1", "1 2 3 4 5 6 7"]),
    ("ip", "server 192 . 168 . 0 . 10", ["192 . 168"]),
    ("ip", "server 192[.]168[.]0[.]10", ["192[.]168"]),
    ("ip", "server 10 dot 20 dot 30 dot 40", ["10 dot 20"]),
    ("secret", "key s k - p r o j - A b C d E f G h I j K l M n O p Q r S t U v", ["A b C d E f"]),
    ("secret", "p a s s w o r d = h u n t e r 2 2", ["h u n t e r"]),
    ("secret", "g h p _ Z Z Z Z z z z z 1 1 1 1 2 2 2 2 3 3 3 3 4 4 4 4 5 5 5 5 6 6 6 6 7 7 7 7", ["Z Z Z Z"]),
    ("url_credentials", "postgres://admin:hunter22 @ db.example.com/app", ["admin", "hunter22"]),
]

# Ordinary text with "at", "dot", single letters, spaced digits and lone separators: all of it must
# come back exactly as written.
ORDINARY = [
    "Look at this example.", "Sign up at example.com for updates.", "We met at 5 p.m. at the station.",
    "I was at the dot com party in 1999.", "Connect the dots, then press a, b or c.",
    "He said dot dot dot and left.", "Options a b c d are all fine.", "Rate it 1 2 3 4 5 stars.",
    "Steps 1. 2. 3. 4. are listed.", "Release 2 . 0 . 1 . 4 is out.", "The price is 10 - 20 dollars at most.",
    "Meet me at home at 7.", "Email is at the top of the page.",
    "He is at one with nature; one two three four is a count.", "x y z are axes", "A B C D E F G",
    "At last, at least, at most.", "the dot-com era", "Q & A at 3 pm", "C + + is a language",
    "Room 4 0 4 is at the end of the hall.", "저는 오늘 회사에서 일이 많았어요.", "이 일 사 오 분 걸려요",
    "Ask john at reception.", "Call me at 5 5 5 1 2 3 4.", "a - b - c", "Send it to Kim at Acme dot",
    "The score was 3 - 1 at half time.", "I am at work, see you at noon.", "Polka dot dress at the store",
    "Version 3 . 11 . 7 of Python", "Use a : b ratio of 1 : 2", "Time 12 : 30 : 45 today",
    "Press Ctrl + C to copy", "one two three four five six seven eight nine ten",
    "def f(a, b): return a + b", "x = a if b else c", "The formula is y = m x + b.",
    "Meet at the cafe at 10 : 30 tomorrow.", "Dots: . . . and dashes: - - -", "1 + 1 = 2 and 2 + 2 = 4",
    "Pages 12 - 18 and 20 - 25", "e . g . this is an example", "U S A at the Olympics",
    "oh one more thing", "Wait   for   it", "a = 1; b = 2; c = a + b", "Sizes S M L XL are in stock",
]


@pytest.mark.parametrize(("kind", "text", "gone"), OBFUSCATED, ids=[f"{k}:{t[:30]}" for k, t, _ in OBFUSCATED])
def test_obfuscated_personal_data_is_scrubbed(kind, text, gone):
    out = scrub_pii(text)
    assert out.counts.get(kind, 0) >= 1, (out.text, out.counts)
    assert PLACEHOLDERS[kind] in out.text
    for piece in gone:
        assert piece not in out.text, f"{piece!r} survived in {out.text!r}"


def test_every_kind_has_obfuscated_cases():
    assert {k for k, _, _ in OBFUSCATED} == set(PLACEHOLDERS)


@pytest.mark.parametrize("text", ORDINARY)
def test_ordinary_text_with_at_dot_and_spacing_survives(text):
    out = scrub_pii(text)
    assert out.text == text and not out.changed, f"changed: {out.counts} -> {out.text!r}"


def test_obfuscated_value_is_replaced_but_the_sentence_around_it_is_kept():
    text = "Hi! Write to j o h n . d o e @ example . com or call 0 1 0 - 1 2 3 4 - 5 6 7 8, thanks a lot."
    out = scrub_pii(text)
    assert out.text == "Hi! Write to [EMAIL] or call [PHONE], thanks a lot.", out.text
    assert out.counts == {"email": 1, "phone": 1}
    assert scrub_pii(out.text).text == out.text  # idempotent
