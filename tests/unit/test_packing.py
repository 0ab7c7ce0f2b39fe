"""Sequence packing's layout (floe/engine/packing.py) and the scheduler's packed batches."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from floe.engine.packing import Packer, packed_feed, plan, shape, width_for
from floe.replica.scheduler import Scheduler, Sequence


def test_width_rounds_up_to_the_alignment():
    assert [width_for(n, 16) for n in (1, 16, 17, 32, 33)] == [16, 16, 32, 32, 48]


def test_best_fit_takes_the_tightest_row_and_respects_the_row_limit():
    p = Packer(32, max_rows=2)
    assert p.add(20, "a") and p.add(25, "b")   # two rows, free 12 and 7
    assert p.add(7, "c")                       # best fit: the row with 7 free, not 12
    assert p.rows == [["a"], ["b", "c"]]
    assert p.largest_free == 12 and p.fits(12) and not p.fits(13)
    assert not p.add(13, "d")                  # no third row
    assert p.rows == [["a"], ["b", "c"]] and p.real == 52 and p.cost == 64
    assert not p.add(33, "e") and not Packer(8).add(0, "empty")


def test_plan_packs_mixed_lengths_and_declines_uniform_ones():
    assert plan([20, 20, 20], 16) is None          # 3 x 32 packed > 3 x 20 padded
    assert plan([7], 16) is None
    rows, width = plan([40, 7, 12, 30, 3, 9, 25, 5], 16)
    assert width == 48
    assert sorted(i for r in rows for i in r) == list(range(8))
    lengths = [40, 7, 12, 30, 3, 9, 25, 5]
    assert all(sum(lengths[i] for i in r) <= width for r in rows)
    assert shape(lengths, 16) == (len(rows), 48) and len(rows) * 48 < 8 * 40
    assert shape(lengths, None) == (8, 40) and shape([20, 20], 16) == (2, 20)


@pytest.mark.parametrize("pooling", ["mean", "cls", "last_token", "mean_sqrt_len_tokens"])
def test_packed_feed_lays_out_ids_positions_segments_and_pooling(pooling):
    seqs = [np.array([11, 12, 13]), np.array([21, 22]), np.array([31, 32, 33, 34])]
    feed = packed_feed(seqs, [[2, 1], [0]], 8, pooling, pad_token_id=1)
    x = feed.inputs
    assert x["input_ids"].tolist() == [[31, 32, 33, 34, 21, 22, 1, 1], [11, 12, 13, 1, 1, 1, 1, 1]]
    assert x["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 0, 0], [0, 1, 2, 0, 0, 0, 0, 0]]
    assert x["segments"].tolist() == [[1, 1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]]
    assert x["pool_tokens"].shape == (2, 2, 8) and x["pool_scale"].shape == (2, 2)
    # input i's output row: row x slots + slot
    assert feed.where.tolist() == [2, 1, 0]
    tokens, scale = x["pool_tokens"], x["pool_scale"]
    first = {"mean": [1, 1, 1, 1, 0, 0, 0, 0], "mean_sqrt_len_tokens": [1, 1, 1, 1, 0, 0, 0, 0],
             "cls": [1, 0, 0, 0, 0, 0, 0, 0], "last_token": [0, 0, 0, 1, 0, 0, 0, 0]}[pooling]
    assert tokens[0, 0].tolist() == first
    want = {"mean": 1 / 4, "mean_sqrt_len_tokens": 1 / math.sqrt(4)}.get(pooling, 1.0)
    assert scale[0, 0] == pytest.approx(want)
    assert tokens[1, 1].sum() == 0 and scale[1, 1] == 0   # an empty slot pools nothing
    with pytest.raises(ValueError):
        packed_feed(seqs, [[0, 1, 2]], 16, "max", pad_token_id=0)


def seq(key, length, arrival=0.0, priority=0, group=0):
    return Sequence(request_key=key, index=0, length=length, arrival=arrival, priority=priority,
                    group=group)


def prose_like(rng: random.Random, n: int) -> list[int]:
    """Lengths like short paragraphs: mostly 5-30 tokens, some up to 120."""
    return [rng.randint(5, 30) if rng.random() < 0.8 else rng.randint(31, 120) for _ in range(n)]


def test_a_mixed_queue_gets_packed_batches_fuller_than_padded_ones():
    rng = random.Random(0)
    lengths = prose_like(rng, 400)
    fills = {}
    for align in (None, 16):
        s = Scheduler(2048, 256, 0.0, min_fill=0.95, pack_align=align)
        for i, n in enumerate(lengths):
            s.add(seq(i, n, arrival=float(i)))
        real = padded = batches = 0
        while len(s):
            b = s.next_batch(now=1e6)
            rows, width = shape([x.length for x in b], align)
            assert rows * width <= 2048
            real += sum(x.length for x in b)
            padded += rows * width
            batches += 1
        fills[align] = (real / padded, batches)
    # packing fills the batches better and needs fewer passes for the same inputs
    assert fills[16][0] > fills[None][0] + 0.01
    assert fills[16][1] < fills[None][1]


def test_inputs_of_one_length_stay_padded():
    s = Scheduler(2048, 256, 0.0, min_fill=0.95, pack_align=16)
    for i in range(150):
        s.add(seq(i, 20))
    b = s.next_batch(now=0.0)
    assert len(b) == 2048 // 20 and shape([x.length for x in b], 16) == (len(b), 20)


def test_packed_batches_keep_every_rule_under_random_queues():
    """Nothing lost or doubled, the oldest input in every batch, the budget and size cap kept
    in the layout the engine will run (the engine packs the batch in the order given)."""
    for trial in range(30):
        rng = random.Random(trial)
        budget = rng.choice([128, 512, 2048])
        cap = rng.choice([4, 64, 256])
        s = Scheduler(budget, cap, 0.0, min_fill=rng.choice([0.0, 0.8, 0.95]), pack_align=16)
        queued = {}
        clock = 0.0
        handed: list[int] = []
        for step in range(60):
            for _ in range(rng.randint(0, 12)):
                n = rng.randint(1, min(budget, 128))
                key = len(queued)
                queued[key] = (n, clock)
                s.add(seq(key, n, arrival=clock, priority=rng.choice([0, 0, 1])))
            clock += 1.0
            if step % 3 == 0 or step > 50:
                while len(s):
                    oldest = min(k for k in queued if k not in handed)
                    b = s.next_batch(now=clock)
                    lengths = [x.length for x in b]
                    rows, width = shape(lengths, 16)
                    assert len(b) <= cap
                    assert rows * width <= budget or len(b) == 1
                    if clock - queued[oldest][1] >= 1.0:   # past max_wait_s: it anchors
                        assert b[0].request_key == oldest
                    handed += [x.request_key for x in b]
        assert sorted(handed) == sorted(queued) and len(set(handed)) == len(handed)


def test_the_oldest_input_anchors_a_packed_batch():
    s = Scheduler(512, 256, 0.0, pack_align=16)
    s.add(seq("old", 3, arrival=0.0))
    for i in range(50):
        s.add(seq(i, 25 + i % 7, arrival=1.0 + i))
    b = s.next_batch(now=100.0)
    assert b[0].request_key == "old"


def test_late_chunking_batches_are_never_packed():
    s = Scheduler(2048, 256, 0.0, pack_align=16)
    for i, n in enumerate([60] + [5] * 30):
        s.add(seq(i, n, group=1))
    b = s.next_batch(now=0.0)
    # padded at the floor of 0 would take all 31 at 60 wide; the point is that the batch is the
    # padded walk's, not a packed layout (which the span graph cannot run)
    assert len(b) == 31


@pytest.mark.parametrize("cost", [None, lambda rows, width: 0.01 + 1e-6 * rows * width,
                                  lambda rows, width: rows * width * width])
def test_the_cheaper_candidate_per_real_token_is_handed_out(cost):
    """Of the padded and the packed candidate around the same anchor, the one the cost model
    (padded tokens without one) prices lower per real token, each priced as the engine runs it."""
    price = cost or (lambda rows, width: rows * width)
    for trial in range(20):
        rng = random.Random(trial)
        s = Scheduler(2048, 256, 0.0, min_fill=rng.choice([0.0, 0.9]), pack_align=16, cost=cost)
        for i, n in enumerate(prose_like(rng, 300)):
            s.add(seq(i, n, arrival=float(i)))
        anchor = s._anchor(100.0)
        padded, _ = s._form_padded(anchor)
        candidates = [s._form_packed(anchor, blocks) for blocks in range(s.pack_widths)]
        got = s.next_batch(now=100.0)

        def each(batch):
            lengths = [x.length for x in batch]
            return price(*shape(lengths, 16)) / sum(lengths)

        want, lowest = padded, each(padded)
        for packed in candidates:
            if packed is None:
                continue
            batch, _, rows, width, real = packed
            assert width == 16 * -(-anchor.length // 16) + 16 * candidates.index(packed)
            # the engine's layout (its plan tries this width too) is never larger than the
            # packer's rows the scheduler priced
            engine_rows, engine_width = shape([x.length for x in batch], 16)
            assert engine_rows * engine_width <= rows * width
            if real >= s.min_fill * rows * width and price(rows, width) / real < lowest:
                want, lowest = batch, price(rows, width) / real
        assert [x.seq_id for x in got] == [x.seq_id for x in want]
        assert each(got) <= each(padded) + 1e-12
