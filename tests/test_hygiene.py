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
