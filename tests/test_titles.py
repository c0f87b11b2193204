"""Conversation titles made from the first question (assistant/titles.py): pure and quick."""

from __future__ import annotations

import pytest

from assistant.titles import FALLBACK, MAX_CHARS, conversation_title


@pytest.mark.parametrize(("question", "answer", "title"), [
    ("How do I reset my password?", "", "How do I reset my password"),
    ("Hi! Can you explain how refunds work for the Pro plan in Europe?", "", "Explain how refunds work for the Pro…"),
    ("hello there, what is the capital of France?", "", "What is the capital of France"),
    ("I want to know the refund policy for the Pro plan in Europe.", "", "The refund policy for the Pro plan…"),
    ("**What** is _RAG_?", "", "What is RAG"),
    ("Summarize https://example.com/a-long-page for me.", "", "Summarize for me"),
    ("Can you help?", "", "Can you help"),  # nothing left after the opener: kept as it is
    ("Please rate me", "", "Please rate me"),
    ("파이썬에서 리스트를 정렬하는 방법을 알려주세요", "", "파이썬에서 리스트를 정렬하는 방법"),
    ("환불 정책 좀 알려줘", "", "환불 정책"),
    ("안녕하세요", "안녕하세요! 무엇을 도와드릴까요?", "안녕하세요"),  # only a greeting: the greeting
    ("hi", "Hello! How can I help you today?", "Hi"),
    ("```\nprint(1/0)\n```", "This code divides by zero. It raises ZeroDivisionError.",
     "This code divides by zero"),  # only code: the answer's first sentence
    ("   ", "", FALLBACK),
])
def test_title_from_the_first_question(question, answer, title):
    assert conversation_title(question, answer) == title


def test_titles_are_short_and_deterministic():
    long = "word" * 40 + " and more words after it"
    t = conversation_title(long)
    assert len(t) <= MAX_CHARS + 1 and t.endswith("…")
    assert conversation_title("What is RAG?", "one answer") == conversation_title("What is RAG?", "another")
