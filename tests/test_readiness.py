"""The retrain readiness check: it counts what a build makes, and says in words what is missing."""

from __future__ import annotations

import json

from memory.store import Store
from training.dataset_build import BuildOptions, build_datasets, split_of
from training.readiness import MIN_HELDOUT_ROWS, MIN_TRAIN_ROWS, check_readiness


def _conversations(store: Store, n: int, start: int = 0) -> None:
    """`n` conversations, each with a rated answer and a corrected one (two SFT rows and one DPO pair)."""
    user = store.get_user_by_name("alice") or store.create_user("alice", "pw-alice-123")
    topics = ["printer", "invoice", "garden", "laptop", "train", "recipe", "budget", "holiday", "piano", "bike"]
    for i in range(start, start + n):
        t = topics[i % len(topics)]
        c = store.create_conversation(user.id, f"conv {i}")
        _, a1 = store.add_turn(c.id, f"Question {i} about my {t}: what should I check first (case {i})?",
                               f"For case {i}, check the {t} settings first, then restart it ({i * 7} s).")
        store.add_thumb(user.id, a1.id, 1)
        _, a2 = store.add_turn(c.id, f"Follow-up {i}: and if the {t} still fails?",
                               f"Then for case {i} reinstall the {t} driver version {i}.0.")
        store.add_edit(user.id, a2.id, f"Then, for case {i}, contact support about the {t} (ticket {i * 13}).")


def test_an_empty_store_is_not_ready_and_says_what_to_do(store, settings):
    r = check_readiness(store, settings)
    assert not r.ready and len(r.missing) == 2
    assert r.rows["sft"] == {"train": 0, "validation": 0, "heldout": 0}
    assert f"at least {MIN_TRAIN_ROWS} examples; there are 0" in r.missing[0]
    assert "Rate answers" in r.missing[0]
    assert r.summary.startswith("Not ready to retrain: 0 rated answers")
    for text in (*r.missing, r.summary):  # plain sentences: no option names, paths or exception names
        assert "_" not in text and "/" not in text and "Error" not in text


def test_a_small_first_retrain_is_ready_and_counts_match_the_build(store, settings):
    """Five conversations: the hash alone may put none in test; the small-data rule holds one out."""
    _conversations(store, 5)
    assert {split_of(f"conv:{i}", BuildOptions()) for i in range(1, 6)} == {"train"}  # the rule is needed
    r = check_readiness(store, settings)
    assert r.ready, r.missing
    assert r.feedback["thumbs_up"] == 5 and r.feedback["edits"] == 5 and r.feedback["conversations"] == 5
    heldout = r.rows["sft"]["heldout"] + r.rows["dpo"]["heldout"]
    assert heldout >= MIN_HELDOUT_ROWS
    assert r.summary.startswith("Ready to retrain: 5 rated answers, 5 corrections")

    built = build_datasets(store, settings, BuildOptions(replay_ratio=0.0))
    counts = built.manifest["counts"]
    for kind in ("sft", "dpo"):
        assert counts[kind]["train"] == r.rows[kind]["train"], kind
        assert counts[kind]["validation"] == r.rows[kind]["validation"], kind
        assert counts[kind]["test"] == r.rows[kind]["heldout"], kind
    test_groups = {json.loads(line)["group"] for line in
                   (built.path / "jsonl" / "sft.test.jsonl").read_text(encoding="utf-8").splitlines()}
    assert len(test_groups) >= 1


def test_too_few_conversations_to_hold_one_out_is_refused_with_the_reason(store, settings):
    _conversations(store, 2)
    r = check_readiness(store, settings, {"split_ratios": [0.8, 0.2, 0.0]})
    assert not r.ready
    assert any("never trained on; there are 0" in m for m in r.missing), r.missing
