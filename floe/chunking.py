"""Documents of any length: where a document is cut into chunks, and which windows cover them.

Pure functions over token offsets (the ``(start, end)`` character range of each token, as the
``tokenizers`` library reports it): no tokenizer, no numpy beyond arrays, no clock. The edge
(floe/edge.py) calls them once per document, in the front end; tests drive them directly.

Splitting (``split``)
---------------------
A document's content tokens (no special tokens, no prompt) are cut into chunks of at most
``budget`` tokens, consecutive chunks sharing about ``overlap`` tokens. Each cut falls, in order of
preference, on

1. a sentence boundary: a token that follows sentence-ending punctuation (``. ! ? ;`` and their
   CJK forms) and whitespace, or a line break;
2. a word boundary: a token preceded by whitespace;
3. the budget itself (a plain token window), when no boundary lies in the chunk's second half.

A boundary is only taken in the second half of the budget, so a chunk is never cut to a sliver
because a sentence happened to end early. The next chunk starts ``overlap`` tokens before the cut,
moved forward to the first word boundary inside the overlap (so a chunk never starts mid-word when
it can avoid it), and always at least one token after the previous start (progress is guaranteed
whatever the text). Chunks are in order and together cover every content token.

Macro-windows (``cover``)
-------------------------
Late chunking embeds a whole document in one pass and pools each chunk from the document's own
token states. A document longer than the model's context is covered by overlapping windows of at
most ``window`` tokens, each chunk pooled inside a window that holds it whole, with context on
both sides: a new window is opened at the first chunk the current window cannot hold, with a
quarter of the room the chunk leaves before it and three quarters after (so it also holds the
chunks that follow), and takes every following chunk it holds whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

# The smallest chunk a client may ask for, special tokens included. Below it, a chunk holds a few
# words: an embedding of that is noise, and the request would expand to one row per few tokens.
MIN_CHUNK_TOKENS = 16
_CJK_END = frozenset("\u3002\uff01\uff1f\uff1b")
_SENTENCE_END = frozenset(".!?;") | _CJK_END


@dataclass(frozen=True)
class ChunkOptions:
    """A request's chunking: ``max_tokens`` per chunk (special tokens and prompt included, as the
    model sees a chunk embedded alone), ``overlap`` tokens shared by consecutive chunks, and
    ``late``: pool each chunk from the whole document's token states (late chunking) instead of
    embedding it alone. ``max_tokens`` None: the model's max length."""

    max_tokens: Optional[int] = None
    overlap: int = 0
    late: bool = False
    # Jina's ``late_chunking``: the request's texts are one document's chunks, already cut by the
    # client; each is pooled from the document's token states (max_tokens and overlap unused)
    late_inputs: bool = False


def boundaries(text: str, offsets: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per token: (a sentence starts here, a word starts here). Token 0 is both.

    A word starts where whitespace separates the token from the previous one: between their
    offsets (WordPiece drops spaces) or at the head of the token itself (BPE and SentencePiece
    tokens carry their leading space). A sentence starts at a word start whose previous token
    ends in sentence-ending punctuation, or whose gap holds a line break; after CJK full stops,
    which take no space, a sentence starts at the next token directly."""
    n = len(offsets)
    sentence = np.zeros(n, dtype=bool)
    word = np.zeros(n, dtype=bool)
    if n == 0:
        return sentence, word
    sentence[0] = word[0] = True
    for t in range(1, n):
        prev_end = offsets[t - 1][1]
        start, stop = offsets[t]
        head = start
        while head < stop and text[head].isspace():
            head += 1
        gap = text[min(prev_end, start):head]
        last = text[prev_end - 1] if prev_end > 0 else ""
        if any(c.isspace() for c in gap):
            word[t] = True
            sentence[t] = "\n" in gap or last in _SENTENCE_END
        elif last in _CJK_END:
            sentence[t] = word[t] = True
    return sentence, word


def split(n_tokens: int, budget: int, overlap: int, sentence: np.ndarray,
          word: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) token ranges of the chunks of a document of ``n_tokens`` content tokens (see
    the module docstring). ``budget`` >= 1 and 0 <= ``overlap`` < ``budget``."""
    if budget < 1 or not 0 <= overlap < budget:
        raise ValueError("need budget >= 1 and 0 <= overlap < budget")
    out: list[tuple[int, int]] = []
    start = prev_end = 0
    while start < n_tokens:
        end = min(start + budget, n_tokens)
        if end < n_tokens:
            # a cut in the chunk's second half, and past the previous chunk's end (each chunk
            # must reach new text, whatever the overlap)
            lo = max(start + max(1, budget // 2), prev_end + 1)
            cut = (_last(sentence, lo, end) or _last(word, lo, end)) if lo <= end else 0
            if cut:
                end = cut
        prev_end = end
        out.append((start, end))
        if end >= n_tokens:
            break
        nxt = max(end - overlap, start + 1)
        if nxt < end:
            w = _first(word, nxt, end)
            if w is not None:
                nxt = w
        start = nxt
    return out


def _last(flags: np.ndarray, lo: int, hi: int) -> int:
    """The last index in [lo, hi] whose flag is set (a cut before that token), or 0."""
    hits = np.flatnonzero(flags[lo:hi + 1])
    return int(lo + hits[-1]) if hits.size else 0


def _first(flags: np.ndarray, lo: int, hi: int) -> Optional[int]:
    hits = np.flatnonzero(flags[lo:hi])
    return int(lo + hits[0]) if hits.size else None


def cover(spans: Sequence[tuple[int, int]], n_tokens: int,
          window: int) -> list[tuple[int, int, list[int]]]:
    """Windows ``(start, end, chunk indices)`` over ``n_tokens`` that hold every span whole
    (late chunking's macro-windows; see the module docstring). Every span must be at most
    ``window`` tokens long."""
    if n_tokens <= window:
        return [(0, n_tokens, list(range(len(spans))))]
    out: list[tuple[int, int, list[int]]] = []
    for i, (a, b) in enumerate(spans):
        if b - a > window:
            raise ValueError(f"span {i} has {b - a} tokens, more than the window of {window}")
        if out and out[-1][0] <= a and b <= out[-1][1]:
            out[-1][2].append(i)
            continue
        # the opening chunk gets a quarter of the spare room as context before it, three
        # quarters after, so the window also holds the chunks that follow (fewer windows)
        ws = max(0, min(a - (window - (b - a)) // 4, n_tokens - window))
        out.append((ws, ws + window, [i]))
    return out


def budget_error(limit: int, overhead: int, overlap: int) -> None:
    """Raises the 400 for a chunk budget that leaves no room for text past the overlap."""
    from floe.errors import ValidationError

    if limit - overhead < 1:
        raise ValidationError(
            f"a chunk of {limit} tokens has no room for text: the model's special tokens and the "
            f"prompt take {overhead}; raise chunking.max_tokens or use a shorter prompt",
            param="chunking.max_tokens")
    raise ValidationError(
        f"chunking.overlap is {overlap} tokens but a chunk of {limit} tokens holds only "
        f"{limit - overhead} tokens of text (special tokens and prompt take {overhead}): the "
        "overlap must be smaller than that", param="chunking.overlap")


@dataclass
class Chunked:
    """A chunked request as the model runs it: ``tokens`` (one sequence per chunk, or per
    macro-window with ``tokens.spans`` for late chunking), and per output row (chunk) its
    text's index, its position in that text's chunks and its characters [start, end).
    ``counts[i]``: the chunks of text i (0 for a text without tokens)."""

    tokens: Any
    input_index: np.ndarray
    chunk: np.ndarray
    start: np.ndarray
    end: np.ndarray
    counts: np.ndarray

    @property
    def rows(self) -> int:
        return int(self.input_index.shape[0])

    @classmethod
    def concat(cls, parts: Sequence["Chunked"]) -> "Chunked":
        from floe.protocol import Spans, TokenBatch

        if len(parts) == 1:
            return parts[0]
        toks = [p.tokens for p in parts]
        spans = None
        if any(t.spans is not None for t in toks):
            spans = Spans(counts=np.concatenate([t.spans.counts for t in toks]),
                          bounds=np.concatenate([t.spans.bounds for t in toks]))
        tokens = TokenBatch(ids=np.concatenate([t.ids for t in toks]),
                            lengths=np.concatenate([t.lengths for t in toks]), spans=spans)
        cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
        return cls(tokens, cat("input_index"), cat("chunk"), cat("start"), cat("end"),
                   cat("counts"))


class ChunkedBuilder:
    """Collects documents' chunks and sequences in order, then builds one ``Chunked``."""

    def __init__(self) -> None:
        self._seqs: list[list[int]] = []
        self._spans: list[list[tuple[int, int]]] = []
        self._rows: list[tuple[int, int, int, int]] = []
        self._counts: list[int] = []

    def add_document(self, index: int, chars: Sequence[tuple[int, int]]) -> None:
        self._counts.append(len(chars))
        self._rows.extend((index, k, a, b) for k, (a, b) in enumerate(chars))

    def add_sequence(self, ids: Sequence[int], spans: Optional[Sequence[tuple[int, int]]] = None) -> None:
        self._seqs.append(list(ids))
        if spans is not None:
            self._spans.append(list(spans))

    def build(self) -> Chunked:
        from floe.protocol import Spans, TokenBatch

        lengths = np.fromiter((len(s) for s in self._seqs), dtype=np.int64, count=len(self._seqs))
        ids = np.fromiter((t for s in self._seqs for t in s), dtype=np.int32,
                          count=int(lengths.sum()))
        spans = None
        if self._spans:
            spans = Spans(counts=[len(s) for s in self._spans],
                          bounds=np.array([b for s in self._spans for b in s],
                                          dtype=np.int64).reshape(-1, 2))
        rows = np.array(self._rows, dtype=np.int64).reshape(-1, 4)
        return Chunked(TokenBatch(ids=ids, lengths=lengths, spans=spans), rows[:, 0], rows[:, 1],
                       rows[:, 2], rows[:, 3], np.asarray(self._counts, dtype=np.int64))
