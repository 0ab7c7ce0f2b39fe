"""scripts/bench_peers.py's wrk driver (scripts/bench_peers.lua) against a real `floe serve
--engine fake`: every request body is sent exactly once, and a pass with a failed request is
void. Needs wrk: installed from Debian's package when missing, as the benchmark does (skipped only
where that cannot be done)."""

from __future__ import annotations

import os
import sys

import pytest

from tests.support import floe_serve

SCRIPTS = os.path.join(os.path.dirname(__file__), "..", "..", "scripts")


@pytest.fixture(scope="module")
def bench_peers():
    sys.path.insert(0, os.path.abspath(SCRIPTS))
    try:
        import bench_peers
        if bench_peers.install_wrk() is None:
            pytest.skip("wrk is not installed and apt-get could not install it")
        yield bench_peers
    finally:
        sys.path.remove(os.path.abspath(SCRIPTS))


def test_wrk_sends_each_body_once_and_voids_a_failed_pass(bench_peers):
    # 60 requests of varied lengths over 8 connections, answered at once by the fake engine: a
    # body skipped or sent twice (wrk calls the script's request() once before it connects, and
    # a connection asks for its next body some time after it was told to go on) would change the
    # tokens the server counts
    texts, lengths = bench_peers.make_texts(240, "16-64", seed=3)
    with floe_serve("--engine", "fake", "--num-replicas", "1", "--model", "default") as srv:
        url = srv.url + "/v1/embeddings"
        real0, _ = bench_peers.padding_counters(url)
        # a miscount would leave the pass waiting for an answer that never comes: 60 s, not 30 min
        seconds, p50, cpu = bench_peers.drive_wrk(url, texts, per_request=4, concurrency=8,
                                                  give_up_s=60)
        real1, _ = bench_peers.padding_counters(url)
        assert real1 - real0 == sum(lengths)
        assert 0 < p50 <= seconds and cpu >= 0
        with pytest.raises(RuntimeError, match="60 failed of 60"):
            bench_peers.drive_wrk(srv.url + "/v1/nowhere", texts, per_request=4, concurrency=8,
                                  give_up_s=60)
