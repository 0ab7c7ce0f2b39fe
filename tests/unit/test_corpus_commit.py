"""Commits bounded in time (floe/corpus/commit.py, the pieces of writer.py): the policy with an
injected clock, pieces written, read back and cleaned, and the corpus modules' import order."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from floe.corpus.commit import CommitPolicy, OpenShard
from floe.corpus.embed import Tokenized
from floe.corpus.reader import CorpusError, Rows, Shard
from floe.corpus.writer import (CorpusOutput, drop_pieces, part_name, piece_files, read_pieces,
                                write_part, write_piece, schema_for)
from floe.protocol import TokenBatch


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def run_job(policy: CommitPolicy, clock: Clock, batches: list[float], write_s: float = 0.0):
    """Simulates one worker running ``batches`` (durations) back to back; commits are written
    in ``write_s`` after their snapshot, off the worker. Returns (snapshot times, worst loss):
    the loss of a kill at any moment is the time since the last durable snapshot plus the
    compute of the batch that was running at that snapshot before it."""
    start = clock.t
    durable = [(start, start)]      # (time durable, covers compute up to)
    batch_start = start
    snaps = []
    pending = None
    worst = 0.0
    for d in batches:
        end = batch_start + d
        # a kill just before the batch ends, or just before a pending commit becomes durable
        for t in [end] + ([pending[0]] if pending and pending[0] <= end else []):
            covered = max(c for (at, c) in durable if at <= t)
            worst = max(worst, t - covered)
        if pending and pending[0] <= end:
            durable.append(pending)
            policy.committed(write_s)
            pending = None
        clock.t = end
        if policy.batch_done(d):
            snaps.append(end)
            # a snapshot at ``end`` covers every batch finished by then
            pending = (end + write_s, end)
        batch_start = end
    return snaps, worst


@pytest.mark.parametrize("batch_s", [0.05, 0.4, 3.0, 12.0])
def test_a_kill_never_loses_more_than_the_bound(batch_s):
    clock = Clock()
    policy = CommitPolicy(30.0, clock=clock)
    rng = np.random.default_rng(1)
    batches = list(batch_s * rng.uniform(0.5, 1.0, size=int(600 / batch_s)))
    snaps, worst = run_job(policy, clock, batches, write_s=0.5)
    assert worst <= 30.0, worst
    # and it does not commit needlessly often: gaps between commits use most of the bound
    gaps = np.diff(snaps)
    assert len(snaps) >= 2 and gaps.min() >= max(30.0 - 3 * batch_s - 1.5, 0.5 * batch_s) - 1e-9


def test_batches_longer_than_the_bound_are_committed_each():
    clock = Clock()
    policy = CommitPolicy(5.0, clock=clock)
    snaps, _ = run_job(policy, clock, [8.0] * 6)
    assert len(snaps) == 6   # every batch, since each alone is past the bound


def test_no_commit_is_asked_while_one_is_being_written():
    clock = Clock()
    policy = CommitPolicy(1.0, clock=clock)
    clock.t += 2.0
    assert policy.batch_done(0.1) is True
    clock.t += 5.0
    assert policy.batch_done(0.1) is False      # the first is not durable yet
    policy.committed(0.2)
    assert policy.since == 102.0                # the snapshot time, not the time it was written
    assert policy.batch_done(0.1) is True       # 5 s since that snapshot
    policy.failed()
    assert policy.since == 102.0 and policy.batch_done(0.1) is True   # asked again


def test_restart_forgets_idle_time():
    clock = Clock()
    policy = CommitPolicy(10.0, clock=clock)
    clock.t += 60.0          # a Ray actor waiting for its next shard, nothing uncommitted
    policy.restart()
    assert policy.batch_done(0.5) is False
    assert policy.at_risk() == pytest.approx(0.5)
    with pytest.raises(ValueError):
        CommitPolicy(0.0)


# --- pieces ------------------------------------------------------------------------------------

def _tok(n: int, bad=()) -> Tokenized:
    shard = Shard(3, 30, 30 + n)
    good = np.array([i for i in range(n) if i not in bad], dtype=np.int64)
    lengths = np.arange(1, len(good) + 1, dtype=np.int64)
    tokens = TokenBatch(ids=np.ones(int(lengths.sum()), np.int32), lengths=lengths)
    rows = Rows(shard, pa.array(np.arange(30, 30 + n)), ["x"] * n, {i: "bad" for i in bad})
    return Tokenized(rows=rows, good=good, tokens=tokens, bad={i: "bad" for i in bad})


def test_pieces_round_trip_and_a_rerun_embeds_only_the_rest(tmp_path):
    work = str(tmp_path)
    tok = _tok(10, bad=(4,))             # 9 good rows, positions 0-3 and 5-9
    first = OpenShard(tok, 3, work)
    assert first.resumed == 0 and list(first.todo) == list(range(9))
    first.pooled[:] = np.arange(27, dtype=np.float32).reshape(9, 3)
    first.finished(np.array([2, 0]))
    assert first.commit_new() == 2
    first.finished(np.array([5]))
    first.finished(np.array([7]))
    assert first.commit_new() == 2
    assert first.commit_new() == 0       # nothing new: no file
    assert len(piece_files(work)[3]) == 2
    pos, vecs = read_pieces(work, 3, 3)
    assert list(pos) == [0, 2, 6, 8]     # shard positions (tok.good), the bad row skipped
    np.testing.assert_array_equal(vecs, first.pooled[[0, 2, 5, 7]])
    # a second process wrote an overlapping piece (a retried task): each row counts once
    write_piece(work, 3, np.array([8, 9]), first.pooled[[7, 8]])
    again = OpenShard(_tok(10, bad=(4,)), 3, work)
    assert again.resumed == 5 and list(again.todo) == [1, 3, 4, 6]
    np.testing.assert_array_equal(again.pooled[[0, 2, 5, 7, 8]], first.pooled[[0, 2, 5, 7, 8]])
    assert again.n_tokens_todo == int(tok.tokens.lengths[[1, 3, 4, 6]].sum())
    # pieces of another width, or of rows the input does not embed, are refused
    with pytest.raises(CorpusError, match="width"):
        OpenShard(_tok(10, bad=(4,)), 5, work)
    with pytest.raises(CorpusError, match="does not embed"):
        OpenShard(_tok(10, bad=(4, 9)), 3, work)
    drop_pieces(work, 3)
    assert piece_files(work) == {}


def test_open_cleans_pieces_of_finished_shards_and_half_written_ones(tmp_path):
    out = CorpusOutput(str(tmp_path / "o"))
    manifest = {"input": {"path": "x"}, "model": {"name": "m"}, "options": {"output_dtype": "float32"},
                "shards": 2, "rows": 4, "id_type": "int64", "dim": 2}
    assert out.open(manifest) == set()
    write_piece(out.work, 0, np.array([0]), np.ones((1, 2), np.float32))
    write_piece(out.work, 1, np.array([1]), np.ones((1, 2), np.float32))
    table = pa.table({"id": pa.array([0, 1]), "embedding": pa.FixedSizeListArray.from_arrays(
        pa.array(np.zeros(4, np.float32)), 2)})
    write_part(out.work, 0, table, [], schema_for(manifest))   # killed before its pieces went
    open(os.path.join(out.work, "._piece-000001-00ab.parquet.tmp-1-2"), "wb").close()
    assert CorpusOutput(str(tmp_path / "o")).open(manifest) == {0}
    assert sorted(piece_files(out.work)) == [1]
    assert out.piece_rows() == {1: 1}
    assert not [n for n in os.listdir(out.work) if n.startswith(".")]
    assert os.path.exists(os.path.join(out.work, part_name(0)))


def test_the_runners_do_not_import_the_job_module():
    """local.py and ray_pool.py take a Plan (plan.py); job.py imports them, never the reverse."""
    code = ("import sys, floe.corpus.local, floe.corpus.plan; "
            "assert 'floe.corpus.job' not in sys.modules, 'local imports job'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for name in ("local.py", "ray_pool.py"):
        src = open(os.path.join(os.path.dirname(__import__("floe.corpus").corpus.__file__), name)).read()
        assert "floe.corpus.job" not in src, name


# --- a Ray actor's engines (engines.py) -------------------------------------------------------

def _embedder(tuner):
    from floe.config import ModelSettings
    from floe.corpus.embed import CorpusOptions, ShardEmbedder
    from floe.models import load_spec
    from floe.models.source import embedded_model_path
    from floe.tokenize import Tokenizer

    spec = load_spec(ModelSettings(model=embedded_model_path()))
    return ShardEmbedder(spec, Tokenizer(spec), CorpusOptions(), tuner)


def _shard(emb, index: int, n: int, work: str):
    from floe.corpus.commit import ShardInFlight

    rng = np.random.default_rng(index)
    texts = [" ".join(["word"] * int(k)) for k in rng.integers(1, 200, size=n)]
    rows = Rows(Shard(index, index * n, (index + 1) * n), pa.array(np.arange(n)), texts, {})
    return ShardInFlight(emb.tokenize(rows), 384, work)


class _Engine:
    """Rows that say which inputs the engine saw: [length, sum of ids, ...]."""

    def __init__(self, calls: list, fail_at: int = -1, seconds: float = 0.0) -> None:
        self.calls, self.fail_at, self.seconds = calls, fail_at, seconds
        self.n = 0

    def prepare(self, seqs, spans=None):
        return seqs

    def run(self, seqs):
        import threading
        import time

        self.calls.append(threading.get_ident())
        self.n += 1
        if self.n == self.fail_at:   # this engine's n-th batch
            raise RuntimeError("engine died")
        time.sleep(self.seconds)
        out = np.zeros((len(seqs), 384), np.float32)
        out[:, 0] = [len(s) for s in seqs]
        out[:, 1] = [int(s.sum()) for s in seqs]
        return out


def _want(state):
    ids, off = state.tok.tokens.ids, state.tok.tokens.offsets()
    return np.array([[off[i + 1] - off[i], ids[off[i]:off[i + 1]].sum()]
                     for i in range(len(off) - 1)])


@pytest.mark.parametrize("candidates", [(512,), (256, 512)])   # a fixed budget; one measured
def test_engines_share_shards_in_flight_and_fill_every_row(candidates, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from floe.corpus.budget import BudgetTuner
    from floe.corpus.engines import EnginePool

    emb = _embedder(BudgetTuner(candidates=candidates, max_size=16))
    calls: list = []
    pool = EnginePool([_Engine(calls), _Engine(calls)], emb, CommitPolicy(30.0))
    states = [_shard(emb, i, 300, str(tmp_path)) for i in range(3)]
    try:
        with ThreadPoolExecutor(2) as ex:   # two calls at once, as the threaded actor makes
            list(ex.map(pool.embed, states))
    finally:
        pool.close()
    for state in states:
        np.testing.assert_array_equal(state.pooled[state.tok.rows_of(state.todo), :2], _want(state))
    assert len(set(calls)) == 2, "both engines ran batches"
    if len(candidates) > 1:   # the measurement ended with both engines taking batches
        assert emb.tuner.chosen in candidates


def test_a_failed_batch_fails_its_shard_and_the_engines_go_on(tmp_path):
    from floe.corpus.budget import BudgetTuner
    from floe.corpus.engines import EnginePool

    emb = _embedder(BudgetTuner(candidates=(512,), max_size=16))
    calls: list = []
    pool = EnginePool([_Engine(calls, fail_at=3), _Engine(calls)], emb, CommitPolicy(30.0))
    try:
        bad = _shard(emb, 0, 300, str(tmp_path))
        with pytest.raises(RuntimeError, match="engine died"):
            pool.embed(bad)
        good = _shard(emb, 1, 300, str(tmp_path))   # a later shard (a retried call) completes
        pool.embed(good)
    finally:
        pool.close()
    np.testing.assert_array_equal(good.pooled[good.tok.rows_of(good.todo), :2], _want(good))


def test_engines_commit_pieces_of_every_shard_in_flight(tmp_path):
    from floe.corpus.budget import BudgetTuner
    from floe.corpus.engines import EnginePool

    emb = _embedder(BudgetTuner(candidates=(512,), max_size=16))
    calls: list = []
    policy = CommitPolicy(0.05)   # a commit after every batch or two
    pool = EnginePool([_Engine(calls, seconds=0.03)], emb, policy)
    state = _shard(emb, 0, 120, str(tmp_path))
    try:
        pool.embed(state)
    finally:
        pool.close()
    pos, vecs = read_pieces(str(tmp_path), 0, 384)
    assert len(pos) > 0, "pieces were committed while the shard computed"
    np.testing.assert_array_equal(vecs, state.pooled[np.searchsorted(state.keys, pos)])
