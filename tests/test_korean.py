"""Korean through retrieval: BM25 terms for Hangul, and hybrid search that does not let the English-only
embedded embedder bury what BM25 found (bench/retrieval.py quality --korean measures the labelled set)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from assistant.config import Settings
from memory.knowledge import KnowledgeBase, latin_share
from memory.lexical import query_terms, terms
from memory.types import User

DOCS = Path(__file__).parent / "data" / "retrieval" / "docs"
ALICE = User(1, "alice", "user", datetime.now(UTC))


def test_hangul_is_indexed_as_words_and_character_bigrams() -> None:
    got = terms("출장비 정산은 귀국 후 30일 이내에")
    assert {"출장비", "출장", "장비", "정산은", "정산", "이내에", "이내", "30일"} <= set(got)
    # a question with a particle attached still shares bigrams with the document's words
    assert {"정산", "기한"} <= set(query_terms("정산 기한은?"))


@pytest.mark.parametrize(("text", "share"), [("연차 휴가는 며칠인가요?", 0.0), ("VPN 오류", 0.6),
                                             ("Zürich travel", 1.0), ("2026", 1.0)])
def test_latin_share(text: str, share: float) -> None:
    assert latin_share(text) == pytest.approx(share)


def test_fusion_weighs_the_dense_ranking_by_what_the_embedder_can_read() -> None:
    dense = [("wrong:0", 0.9), ("right:0", 0.1)]
    lexical = [("right:0", 7.0), ("wrong:0", 0.5)]
    assert KnowledgeBase._fuse(dense, lexical, "hybrid", 0.0)[0][0] == "right:0"
    even = KnowledgeBase._fuse(dense, lexical, "hybrid", 1.0)
    assert even[0][1] == pytest.approx(even[1][1])  # first and second in one ranking each: a tie


@pytest.fixture
def kb(settings: Settings, tiny_embedder_dir: Path):
    k = KnowledgeBase(settings.model_copy(update={"embedder": str(tiny_embedder_dir)}))
    yield k
    k.close()


def test_korean_questions_find_korean_passages(kb: KnowledgeBase) -> None:
    for name in ("휴가_규정.txt", "출장_규정.txt", "보안_수칙.md", "복리후생_안내.txt"):
        kb.ingest_path(ALICE, DOCS / name, scope="private")
    asked = {"출장 가면 하루에 일비 얼마 나와요?": "하루 5만 원의 일비",
             "비밀번호 변경 주기": "90일마다 변경해야",
             "결혼하면 휴가를 며칠 받나요?": "경조 휴가 5일"}
    for question, evidence in asked.items():
        hits = kb.search(ALICE, question, k=3, mode="lexical")
        assert any(evidence in " ".join(h.text.split()) for h in hits), (question, [h.text[:40] for h in hits])
