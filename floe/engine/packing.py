"""Sequence packing: several short inputs share one row of a forward pass.

A padded batch spends its dense layers on every pad position. Where lengths are mixed, the
short inputs can instead fill the room the long ones leave: a packed row of ``width`` tokens
holds one or more inputs one after the other, attention is kept to each input's own tokens
(block-diagonal, from the row's segment numbers), positions restart at each input, and pooling
reads each input's tokens through a matrix of 0/1 weights and a float32 scale. The engine that
packs (floe/engine/openvino_engine.py, BERT-family embedding models) runs a second graph that
takes these inputs.

The layout is a pure function of the batch's lengths in the order given, shared by the replica's
scheduler (floe/replica/scheduler.py forms packed batches under the token budget) and the engine
(which packs the batch it is handed). Both run the same ``Packer`` in the same order, so the
engine's layout is the one the scheduler priced:

* the width is the longest input rounded up to ``align`` (16: the attention kernel's key block,
  floe/engine/aligned_keys.py; a 17-token row already computes 32 keys, so a short input beside
  it adds no attention work), or one or two alignments more where that packs into fewer padded
  tokens (``WIDTHS``);
* best fit: each input goes into the row whose free room is the smallest that holds it, else
  into a new row.

A batch is packed only where that is smaller than padding it (``plan`` returns None otherwise):
inputs of one length pack no better than they pad, and rounding the width up would cost more.

Measured (docs/benchmarks.md section 12, AMD Zen 4): all-MiniLM served over HTTP on the prose
paragraphs (median 17 tokens), 1.06x the tokens per second without packing and 7% fewer CPU
seconds per token; inputs of one length never pack.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

ALIGN = 16   # floe/engine/aligned_keys.py KEY_MULTIPLE
# Row widths a packed batch may take: as wide as its longest input needs, and up to WIDTHS - 1
# alignments wider (room beside a row's first input for short ones). On the prose paragraphs'
# lengths the batcher then forms batches of 1,442 real tokens at fill 0.976, against 1,166 at
# 0.974 with one width (scripts/bench_replica_packing.py --simulate).
WIDTHS = 3
POOLINGS = ("mean", "cls", "last_token", "mean_sqrt_len_tokens")   # what a packed row can pool
# transformers' encoders whose attention takes a 4-D mask and whose embeddings take position ids,
# one layer structure (the torch engine's unpadded forward, floe/engine/unpadded.py, too)
BERT_FAMILIES = ("bert", "roberta", "xlm-roberta")


def width_for(longest: int, align: int) -> int:
    """A packed batch's row width for its longest input."""
    return align * -(-int(longest) // align)


class Packer:
    """Inputs placed best-fit, in the order given, into rows of one ``width``; at most
    ``max_rows`` rows (None: no limit)."""

    __slots__ = ("width", "max_rows", "rows", "real", "_free")

    def __init__(self, width: int, max_rows: Optional[int] = None) -> None:
        self.width = width
        self.max_rows = max_rows
        self.rows: list[list[Any]] = []
        self.real = 0
        self._free: list[tuple[int, int]] = []   # sorted (free room, row), rows with room only

    @property
    def cost(self) -> int:
        """Padded tokens of the packed batch: rows x width."""
        return len(self.rows) * self.width

    @property
    def largest_free(self) -> int:
        """The longest input that fits without a new row."""
        return self._free[-1][0] if self._free else 0

    def fits(self, length: int) -> bool:
        return length <= self.width and (
            length <= self.largest_free or self.max_rows is None or len(self.rows) < self.max_rows)

    def add(self, length: int, item: Any) -> bool:
        """Places ``item`` of ``length`` tokens; False (nothing changed) when it does not fit."""
        if length > self.width or length < 1:
            return False
        at = bisect.bisect_left(self._free, (length, -1))
        if at < len(self._free):
            room, row = self._free.pop(at)
        elif self.max_rows is None or len(self.rows) < self.max_rows:
            room, row = self.width, len(self.rows)
            self.rows.append([])
        else:
            return False
        self.rows[row].append(item)
        self.real += length
        if room > length:
            bisect.insort(self._free, (room - length, row))
        return True


def plan(lengths: Sequence[int], align: int) -> Optional[tuple[list[list[int]], int]]:
    """The packed layout of a batch (input indices per row, and the width), or None when it
    would not be smaller than the padded batch (count x longest). Of the ``WIDTHS`` widths from
    the longest input's up, the one with the fewest padded tokens (the narrowest of equals): the
    scheduler's packed batch used one of them, so the engine's layout never costs more than the
    one the scheduler priced."""
    if len(lengths) < 2:
        return None
    longest = max(lengths)
    base = width_for(longest, align)
    best: Optional[Packer] = None
    for blocks in range(WIDTHS):
        packer = Packer(base + blocks * align)
        for i, n in enumerate(lengths):
            packer.add(int(n), i)
        if best is None or packer.cost < best.cost:
            best = packer
    assert best is not None
    if best.cost >= len(lengths) * longest:
        return None
    return best.rows, best.width


def shape(lengths: Sequence[int], align: Optional[int]) -> tuple[int, int]:
    """(rows, width) of the forward pass that runs a batch: packed where ``align`` is set and
    packing is smaller, else (count, longest)."""
    layout = plan(lengths, align) if align else None
    if layout is None:
        return len(lengths), max(lengths)
    return len(layout[0]), layout[1]


@dataclass(frozen=True)
class PackedFeed:
    """The packed graph's inputs, and where each input's row of the output is."""

    inputs: dict[str, np.ndarray]
    where: np.ndarray   # (n,) int64: input i's row of the (rows x slots, dim) output


def packed_feed(sequences: Sequence[np.ndarray], rows: Sequence[Sequence[int]], width: int,
                pooling: str, pad_token_id: int) -> PackedFeed:
    """The packed graph's five inputs for ``rows`` (indices into ``sequences``) of ``width``:

    * ``input_ids`` (rows, width), pad id where no input is;
    * ``position_ids`` (rows, width): 0, 1, ... within each input (the graph adds a RoBERTa-like's
      offset);
    * ``segments`` (rows, width): 1, 2, ... for the inputs of a row, 0 on padding; a token attends
      to the tokens of its own segment;
    * ``pool_tokens`` (rows, slots, width) float32, 0/1: which tokens each input pools (exact in
      any precision the graph runs);
    * ``pool_scale`` (rows, slots) float32: what the pooled sum is multiplied by (1 / length for
      mean, 1 / sqrt(length) for mean_sqrt_len_tokens, 1 for CLS and last token).
    """
    if pooling not in POOLINGS:
        raise ValueError(f"a packed batch cannot pool {pooling!r}")
    count, slots = len(rows), max(len(r) for r in rows)
    ids = np.full((count, width), pad_token_id, dtype=np.int64)
    positions = np.zeros((count, width), dtype=np.int64)
    segments = np.zeros((count, width), dtype=np.int64)
    tokens = np.zeros((count, slots, width), dtype=np.float32)
    scale = np.zeros((count, slots), dtype=np.float32)
    where = np.empty(len(sequences), dtype=np.int64)
    for r, members in enumerate(rows):
        at = 0
        for slot, i in enumerate(members):
            seq = sequences[i]
            n = len(seq)
            ids[r, at:at + n] = seq
            positions[r, at:at + n] = np.arange(n)
            segments[r, at:at + n] = slot + 1
            if pooling == "cls":
                tokens[r, slot, at] = 1.0
                scale[r, slot] = 1.0
            elif pooling == "last_token":
                tokens[r, slot, at + n - 1] = 1.0
                scale[r, slot] = 1.0
            else:
                tokens[r, slot, at:at + n] = 1.0
                scale[r, slot] = 1.0 / n if pooling == "mean" else 1.0 / math.sqrt(n)
            where[i] = r * slots + slot
            at += n
    return PackedFeed({"input_ids": ids, "position_ids": positions, "segments": segments,
                       "pool_tokens": tokens, "pool_scale": scale}, where)
