"""scripts/bench_packing.py's packing: every row placed once, no packed row past its width, and
the graph's inputs (segments, positions, pooling weights) describe exactly the rows placed."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

SCRIPTS = os.path.join(os.path.dirname(__file__), "..", "..", "scripts")


@pytest.fixture(scope="module")
def bench_packing():
    sys.path.insert(0, os.path.abspath(SCRIPTS))
    try:
        import bench_packing
        yield bench_packing
    finally:
        sys.path.remove(os.path.abspath(SCRIPTS))


def test_pack_places_every_row_once_within_its_width(bench_packing):
    lengths = list(np.random.default_rng(0).integers(1, 200, 500))
    packed = bench_packing.pack(lengths, 16)
    placed = sorted(i for _, members in packed for i in members)
    assert placed == list(range(len(lengths)))
    for width, members in packed:
        assert width % 16 == 0
        assert sum(lengths[i] for i in members) <= width
        # the packed row is as wide as its first (longest) row rounded up, no wider
        assert width == 16 * -(-lengths[members[0]] // 16)
        assert lengths[members[0]] == max(lengths[i] for i in members)
    # short rows fill what long ones leave: fewer packed rows than rows
    assert len(packed) < len(lengths)


def test_packed_feed_describes_each_row(bench_packing):
    rows = [np.arange(1, n + 1) for n in (5, 3, 7, 1)]
    packed = [[2, 0], [1, 3]]    # 7 + 5 and 3 + 1 in rows of 12
    feed, where = bench_packing.packed_feed(rows, packed, 12)
    assert feed["input_ids"].shape == (2, 12) and feed["pool"].shape == (2, 2, 12)
    for i, b, slot in where:
        seg = feed["segments"][b] == slot + 1
        assert seg.sum() == len(rows[i])
        np.testing.assert_array_equal(feed["input_ids"][b][seg], rows[i])
        np.testing.assert_array_equal(feed["position_ids"][b][seg], np.arange(len(rows[i])))
        assert feed["pool"][b, slot][seg] == pytest.approx(1 / len(rows[i]))
        assert feed["pool"][b, slot][~seg].sum() == 0
    # what no row took is padding: segment 0, no pooling weight
    assert (feed["segments"][0, 12:] == 0).all() and (feed["segments"][1, 4:] == 0).all()
    assert feed["pool"][1][:, 4:].sum() == 0
