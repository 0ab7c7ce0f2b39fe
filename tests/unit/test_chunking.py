"""Where documents are cut (floe/chunking.py): pure functions over token offsets."""

from __future__ import annotations

import numpy as np
import pytest

from floe import chunking


def words(text: str):
    """Word-level "tokens": each word and each punctuation mark, with character offsets."""
    import re

    return [(m.start(), m.end()) for m in re.finditer(r"\w+|[^\w\s]", text)]


TEXT = ("The first sentence is here. A second one follows, longer than the first! "
        "Third?\nA new line starts a fourth sentence; then a clause. Last words")


def test_boundaries_mark_sentences_and_words():
    offs = words(TEXT)
    sentence, word = chunking.boundaries(TEXT, offs)
    starts = [TEXT[a:b] for (a, b), s in zip(offs, sentence) if s]
    assert starts == ["The", "A", "Third", "A", "then", "Last"]
    assert not word[[i for i, (a, b) in enumerate(offs) if TEXT[a:b] == "."][0]]   # "here."
    assert word.sum() > sentence.sum()


def test_bpe_style_offsets_with_the_space_inside_the_token():
    text = "one two. three"
    offs = [(0, 3), (3, 7), (7, 8), (8, 14)]      # " two" and " three" carry their space
    sentence, word = chunking.boundaries(text, offs)
    assert word.tolist() == [True, True, False, True]
    assert sentence.tolist() == [True, False, False, True]


def test_cjk_full_stop_starts_a_sentence_without_a_space():
    text = "今日は晴れ。明日は雨"
    offs = [(i, i + 1) for i in range(len(text))]
    sentence, _ = chunking.boundaries(text, offs)
    assert sentence[text.index("明")]


@pytest.mark.parametrize("budget,overlap", [(8, 0), (8, 3), (12, 5), (5, 4), (1, 0)])
def test_split_covers_in_order_within_budget(budget, overlap):
    offs = words(TEXT)
    sentence, word = chunking.boundaries(TEXT, offs)
    spans = chunking.split(len(offs), budget, overlap, sentence, word)
    assert spans[0][0] == 0 and spans[-1][1] == len(offs)
    assert all(0 < b - a <= budget for a, b in spans)
    for (a0, b0), (a1, b1) in zip(spans, spans[1:]):
        assert a0 < a1 <= b0 < b1               # progress, overlapping or touching, no gap
        assert b0 - a1 <= overlap               # never more overlap than asked


def test_split_prefers_sentence_then_word_boundaries():
    offs = words(TEXT)
    sentence, word = chunking.boundaries(TEXT, offs)
    spans = chunking.split(len(offs), 10, 0, sentence, word)
    ends = [b for _, b in spans[:-1]]
    # each cut falls where a sentence starts when one lies in the chunk's second half
    assert all(sentence[e] or word[e] for e in ends)
    assert sentence[ends[0]]


def test_split_without_boundaries_uses_token_windows():
    n = 23
    flags = np.zeros(n, bool)
    flags[0] = True
    assert chunking.split(n, 10, 2, flags, flags) == [(0, 10), (8, 18), (16, 23)]


def test_split_refuses_an_overlap_as_large_as_the_budget():
    flags = np.ones(5, bool)
    with pytest.raises(ValueError):
        chunking.split(5, 3, 3, flags, flags)
    assert chunking.split(0, 3, 0, flags[:0], flags[:0]) == []


def test_cover_holds_every_span_whole_in_few_windows():
    spans = [(i, min(i + 10, 100)) for i in range(0, 100, 8)]
    windows = chunking.cover(spans, 100, 30)
    seen = []
    for ws, we, members in windows:
        assert we - ws == 30 and 0 <= ws and we <= 100
        for k in members:
            a, b = spans[k]
            assert ws <= a and b <= we
        seen += members
    assert seen == list(range(len(spans)))
    assert len(windows) <= 7                    # not one window per span
    assert chunking.cover(spans[:2], 18, 30) == [(0, 18, [0, 1])]
    with pytest.raises(ValueError):
        chunking.cover([(0, 40)], 100, 30)


def test_split_and_cover_invariants_on_random_documents():
    rng = np.random.default_rng(7)
    for _ in range(300):
        n = int(rng.integers(0, 400))
        word = rng.random(n) < rng.random()
        sentence = word & (rng.random(n) < 0.2)
        if n:
            word[0] = sentence[0] = True
        budget = int(rng.integers(1, 80))
        overlap = int(rng.integers(0, budget))
        spans = chunking.split(n, budget, overlap, sentence, word)
        if not n:
            assert spans == []
            continue
        assert spans[0][0] == 0 and spans[-1][1] == n
        for (a0, b0), (a1, b1) in zip(spans, spans[1:]):
            assert a0 < a1 <= b0 < b1 and b0 - a1 <= overlap
        assert all(0 < b - a <= budget for a, b in spans)
        window = budget + int(rng.integers(0, 300))
        held = [k for ws, we, members in chunking.cover(spans, n, window) for k in members
                if ws <= spans[k][0] and spans[k][1] <= we and we - ws <= window]
        assert held == list(range(len(spans)))
