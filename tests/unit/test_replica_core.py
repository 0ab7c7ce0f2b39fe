"""ReplicaCore driven in-process with the fake engine (no sockets)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from floe import validate
from floe.config import BatchSettings
from floe.engine.fake import FakeEngine
from floe.errors import CancelledError as FloeCancelled
from floe.errors import (InternalError, OverloadedError, TooLargeError, UnavailableError,
                         ValidationError)
from floe.models.spec import ModelSpec
from floe.protocol import EncodeOptions, TokenBatch
from floe.replica.core import HISTOGRAMS, ReplicaCore
from floe.resolve import CPU_MIN_BATCH_FILL

DIM = 32


def make_spec(normalize: bool = True) -> ModelSpec:
    return ModelSpec(path="", name="fake-model", architecture="BertModel", model_type="bert",
                     hidden_size=DIM, dim=DIM, max_seq_length=64, vocab_size=1000, pooling="mean",
                     normalize=normalize)


class LoggingEngine(FakeEngine):
    """The fake engine, recording what it was asked to do and when (and failing on request)."""

    POISON_RAISE = 999   # a batch holding this id raises in run()
    POISON_NAN = 998     # a row holding this id comes out NaN

    def __init__(self, spec, **kw):
        super().__init__(spec, **kw)
        self.events: list[tuple[str, int, float]] = []
        self.batches: list[list[list[int]]] = []
        self._lock = threading.Lock()
        self._n = 0
        # set: passes run freely; a test clears it to hold every forward pass until it sets it
        self.gate = threading.Event()
        self.gate.set()

    def prepare(self, sequences):
        with self._lock:
            self._n += 1
            n = self._n
            self.events.append(("prepare", n, time.monotonic()))
        return n, super().prepare(sequences)

    def run(self, prepared):
        n, seqs = prepared
        self.events.append(("run_start", n, time.monotonic()))
        self.batches.append([s.tolist() for s in seqs])
        self.gate.wait(timeout=60)
        try:
            if any(self.POISON_RAISE in s for s in seqs):
                raise RuntimeError("simulated engine crash")
            out = super().run(seqs)
            for i, s in enumerate(seqs):
                if self.POISON_NAN in s:
                    out[i, 3] = np.nan
            return out
        finally:
            self.events.append(("run_end", n, time.monotonic()))


def expected_rows(engine: FakeEngine, items: list[list[int]], normalize=True, dims=None):
    out = FakeEngine.run(engine, [np.asarray(x, dtype=np.int64) for x in items])
    if dims:
        out = out[:, :dims]
    if normalize:
        out = out / np.linalg.norm(out, axis=1, keepdims=True)
    return out


@pytest.fixture
def make_core():
    cores = []

    def _make(normalize=True, **batch_kw):
        kw = dict(max_batch_tokens=512, max_batch_size=64, batch_timeout_ms=1.0)
        eng_kw = {k: batch_kw.pop(k) for k in ("seconds_per_batch", "seconds_per_token") if k in batch_kw}
        kw.update(batch_kw)
        engine = LoggingEngine(make_spec(normalize), **eng_kw)
        core = ReplicaCore(engine, BatchSettings(**kw), replica_id="t")
        core.start()
        cores.append(core)
        return core, engine

    yield _make
    for c in cores:
        c.stop(drain_timeout=0.0)


ITEMS = [[101, 7, 8, 9, 102], [101, 5, 102], [101] + list(range(10, 40)) + [102]]


async def test_embeds_and_matches_engine_alone(make_core):
    core, engine = make_core()
    assert core.ready
    r = await core.submit(TokenBatch.from_lists(ITEMS), EncodeOptions(), "r1")
    assert (r.n, r.dim, r.dtype, r.request_id, r.model) == (3, DIM, "float32", "r1", "fake-model")
    np.testing.assert_allclose(r.as_float32(), expected_rows(engine, ITEMS), rtol=1e-6, atol=1e-6)
    assert r.token_counts.tolist() == [5, 3, 32]
    t = r.timings
    assert t.total_s >= t.queue_s >= 0 and t.inference_s >= 0 and t.total_s > 0


async def test_concurrent_requests_batch_and_equal_alone(make_core):
    core, engine = make_core(batch_timeout_ms=20.0)
    reqs = [ITEMS[i % 3: i % 3 + 1] * (1 + i % 2) for i in range(8)]
    results = await asyncio.gather(*(core.submit(TokenBatch.from_lists(x), EncodeOptions(), f"c{i}")
                                     for i, x in enumerate(reqs)))
    for x, r in zip(reqs, results):
        np.testing.assert_allclose(r.as_float32(), expected_rows(engine, x), rtol=1e-6, atol=1e-6)
    # they shared forward passes
    assert len(engine.batches) < len(reqs)


async def test_normalize_dimensions_and_dtypes(make_core):
    core, engine = make_core(normalize=False)
    tb = TokenBatch.from_lists(ITEMS)
    raw = await core.submit(tb, EncodeOptions(), "raw")  # model default: not normalized
    np.testing.assert_allclose(raw.as_float32(), expected_rows(engine, ITEMS, normalize=False),
                               rtol=1e-6)
    assert not np.allclose(np.linalg.norm(raw.as_float32(), axis=1), 1.0)

    norm = await core.submit(tb, EncodeOptions(normalize=True, dimensions=8), "n8")
    assert norm.dim == 8
    np.testing.assert_allclose(norm.as_float32(), expected_rows(engine, ITEMS, dims=8), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(norm.as_float32(), axis=1), 1.0, rtol=1e-5)

    sliced = await core.submit(tb, EncodeOptions(dimensions=8), "s8")  # slice, no renormalize
    np.testing.assert_allclose(sliced.as_float32(), raw.as_float32()[:, :8], rtol=1e-6)

    ref = expected_rows(engine, ITEMS)
    for dtype, tol in (("float16", 1e-3), ("bfloat16", 1e-2)):
        r = await core.submit(tb, EncodeOptions(normalize=True, output_dtype=dtype), dtype)
        assert r.dtype == dtype and len(r.data) == 3 * DIM * 2
        np.testing.assert_allclose(r.as_float32(), ref, atol=tol)


async def test_model_default_normalize(make_core):
    core, engine = make_core(normalize=True)
    r = await core.submit(TokenBatch.from_lists(ITEMS), EncodeOptions(), "d")
    np.testing.assert_allclose(np.linalg.norm(r.as_float32(), axis=1), 1.0, rtol=1e-5)
    off = await core.submit(TokenBatch.from_lists(ITEMS), EncodeOptions(normalize=False), "o")
    np.testing.assert_allclose(off.as_float32(), expected_rows(engine, ITEMS, normalize=False), rtol=1e-6)


# Requests that must never reach the model: the edge (floe/validate.py) refuses each as a client
# error; if one slips past it anyway, the core refuses it as an internal error and keeps serving.
BAD_REQUESTS = [
    ([[1, 2], []], EncodeOptions(), "input\\[1\\] is an empty list of token ids"),
    ([[1, 2000]], EncodeOptions(), "Token id 2000 in input\\[0\\] is out of vocabulary"),
    ([[1, -3]], EncodeOptions(), "Token id -3 in input\\[0\\] is out of vocabulary"),
    ([list(range(1, 70))], EncodeOptions(truncate=False), "maximum context length is 64"),
    ([[1, 2]], EncodeOptions(dimensions=DIM + 1), "dimensions"),
    ([[1, 2]], EncodeOptions(dimensions=-1), "dimensions"),
    ([[1, 2]], EncodeOptions(output_dtype="int4"), "output dtype"),
    ([], EncodeOptions(), "must not be empty"),
]


@pytest.mark.parametrize("items,options,match", BAD_REQUESTS)
def test_edge_validation_refuses_what_the_core_must_not_see(items, options, match):
    limits = validate.Limits.build(make_spec(), max_items=32)
    with pytest.raises(ValidationError, match=match):
        plan = validate.check_options(limits, options)
        validate.check_token_batch(limits, TokenBatch.from_lists(items), plan)


@pytest.mark.parametrize("items,options,match", BAD_REQUESTS)
async def test_broken_invariants_are_internal_errors(make_core, items, options, match, caplog):
    core, engine = make_core()
    with pytest.raises(InternalError, match="without validation"):
        await core.submit(TokenBatch.from_lists(items), options, "bad")
    assert "violates the replica's invariants" in caplog.text
    assert engine.batches == []  # nothing reached the model
    # the replica keeps serving
    r = await core.submit(TokenBatch.from_lists([[1, 2]]), EncodeOptions(), "ok")
    assert r.n == 1


async def test_engine_failure_fails_only_its_batch(make_core, caplog):
    core, engine = make_core(max_batch_size=1)
    bad = core.submit(TokenBatch.from_lists([[1, LoggingEngine.POISON_RAISE]]), EncodeOptions(), "bad")
    good = core.submit(TokenBatch.from_lists([[1, 2, 3]]), EncodeOptions(), "good")
    res = await asyncio.gather(bad, good, return_exceptions=True)
    assert isinstance(res[0], InternalError)
    assert "simulated" not in res[0].message  # no raw exception text for the client
    assert res[1].n == 1
    assert "simulated engine crash" in caplog.text  # but the traceback is logged
    after = await core.submit(TokenBatch.from_lists([[4, 5]]), EncodeOptions(), "after")
    assert after.n == 1 and core.ready
    st = core.stats()
    assert st.failed_requests == 1 and st.requests == 3


async def test_nan_row_fails_only_its_request(make_core):
    core, engine = make_core(batch_timeout_ms=50.0)
    poisoned = core.submit(TokenBatch.from_lists([[1, 2], [1, LoggingEngine.POISON_NAN]]),
                           EncodeOptions(), "nan")
    other = core.submit(TokenBatch.from_lists([[1, 2]]), EncodeOptions(), "other")
    res = await asyncio.gather(poisoned, other, return_exceptions=True)
    assert isinstance(res[0], InternalError) and "input 1" in res[0].message
    assert res[1].n == 1 and np.isfinite(res[1].as_float32()).all()
    assert len(engine.batches) == 1  # they really were in the same forward pass


async def _until(condition, timeout: float = 30.0) -> None:
    """Polls ``condition`` (the core's own state, not a guess of how long things take: this test
    must hold on a loaded machine too)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.002)


def _started(engine) -> bool:
    """The engine has begun a forward pass."""
    return any(kind == "run_start" for kind, _, _ in engine.events)


async def test_cancelled_task_drops_queued_sequences(make_core):
    core, engine = make_core(max_batch_size=1, seconds_per_batch=1.0)
    first = asyncio.create_task(core.submit(TokenBatch.from_lists([[1, 2]]), EncodeOptions(), "a"))
    await _until(lambda: _started(engine))  # "a" is running
    victim = asyncio.create_task(core.submit(TokenBatch.from_lists([[7, 7, 7]] * 3), EncodeOptions(), "b"))
    await _until(lambda: core.stats().queued_sequences >= 2)
    victim.cancel()
    with pytest.raises(asyncio.CancelledError):
        await victim
    await first
    r = await core.submit(TokenBatch.from_lists([[3, 4]]), EncodeOptions(), "c")
    assert r.n == 1
    ran = [seq for b in engine.batches for seq in b]
    # the second item of "b" may have been formed during "a" (pipelining); the rest never ran
    assert ran.count([7, 7, 7]) <= 1
    st = core.stats()
    assert st.dropped_sequences >= 2
    assert st.queued_sequences == 0 and st.queued_tokens == 0 and st.in_flight_requests == 0


async def test_abort_by_request_id(make_core):
    core, engine = make_core(max_batch_size=1, seconds_per_batch=1.0)
    first = asyncio.create_task(core.submit(TokenBatch.from_lists([[1, 2]]), EncodeOptions(), "a"))
    await _until(lambda: _started(engine))
    victim = asyncio.create_task(core.submit(TokenBatch.from_lists([[7, 7]] * 4), EncodeOptions(), "b"))
    await _until(lambda: core.stats().queued_sequences >= 3)
    assert core.abort("b") is True
    assert core.abort("nope") is False
    with pytest.raises(FloeCancelled):
        await victim
    await first
    assert core.stats().dropped_sequences >= 3


async def test_admission_limit(make_core):
    # forward passes are held until the test lets them go, so nothing drains while it looks at
    # the queue however slow the machine is
    core, engine = make_core(max_batch_size=1, max_queued_tokens=10)
    engine.gate.clear()
    try:
        with pytest.raises(TooLargeError):
            await core.submit(TokenBatch.from_lists([[1] * 11]), EncodeOptions(), "huge")
        t1 = asyncio.create_task(core.submit(TokenBatch.from_lists([[1] * 4] * 2), EncodeOptions(), "a"))
        # item 1 runs, item 2 sits prepared in the engine's slot
        await _until(lambda: _started(engine))
        t2 = asyncio.create_task(core.submit(TokenBatch.from_lists([[2] * 6]), EncodeOptions(), "b"))
        # "b" (6 tokens) waits in the queue: 6 + 6 > 10
        await _until(lambda: core.stats().queued_tokens >= 6)
        with pytest.raises(OverloadedError) as ei:
            await core.submit(TokenBatch.from_lists([[3] * 6]), EncodeOptions(), "c")
        assert ei.value.retry_after and ei.value.retry_after > 0
    finally:
        engine.gate.set()
    await asyncio.gather(t1, t2)
    # once drained, it admits again
    assert (await core.submit(TokenBatch.from_lists([[3] * 6]), EncodeOptions(), "d")).n == 1


async def test_pipelining_prepares_next_batch_during_forward(make_core):
    core, engine = make_core(max_batch_size=2, seconds_per_batch=0.1)
    r = await core.submit(TokenBatch.from_lists([[i + 1, i + 2] for i in range(6)]), EncodeOptions(), "p")
    assert r.n == 6
    ev = {(kind, n): t for kind, n, t in engine.events}
    assert len(engine.batches) == 3
    for n in (1, 2):
        # batch n+1 was formed and prepared while batch n was still running
        assert ev[("prepare", n + 1)] < ev[("run_end", n)]
        # so the engine had it in hand when it came free (how soon it started is the OS
        # scheduler's business on a loaded machine; the order is the core's)
        assert ev[("run_start", n + 1)] > ev[("run_end", n)]
    # queue time: the request's last sequence waited behind at least one forward pass, and the
    # pass that ran it is not counted as waiting (relations, not wall-clock bounds: a loaded
    # machine stretches every pass)
    assert r.timings.queue_s >= 0.1
    assert r.timings.queue_s <= r.timings.total_s - 0.1
    assert r.timings.inference_s >= 0.29


async def test_stats_counters_and_histograms(make_core):
    # no fill floor: the three lengths (fill 14/24) are to share one batch here
    core, _ = make_core(batch_timeout_ms=30.0, min_batch_fill=0.0)
    await asyncio.gather(
        core.submit(TokenBatch.from_lists([[1] * 4, [1] * 8]), EncodeOptions(), "x"),
        core.submit(TokenBatch.from_lists([[2] * 2]), EncodeOptions(), "y"))
    st = core.stats()
    assert st.requests == 2 and st.failed_requests == 0
    assert st.sequences == 3 and st.tokens == 14
    assert st.batches == 1 and st.padded_tokens == 24
    assert st.rss_bytes > 0
    hist = {h.name: h for h in st.histograms}
    assert set(hist) == set(HISTOGRAMS)
    for h in hist.values():
        assert len(h.counts) == len(h.bounds) + 1 and sum(h.counts) == h.count
    assert hist["batch_size"].count == 1 and hist["batch_size"].sum == 3
    assert hist["padding_efficiency"].sum == pytest.approx(14 / 24)
    assert hist["queue_wait_seconds"].count == 2


async def test_stop_drains_then_refuses(make_core):
    core, _ = make_core(seconds_per_batch=0.1)
    task = asyncio.create_task(core.submit(TokenBatch.from_lists([[1, 2]]), EncodeOptions(), "a"))
    await _until(lambda: core.stats().in_flight_requests >= 1)
    drained = await asyncio.to_thread(core.stop, 2.0)
    assert drained
    assert (await task).n == 1
    assert not core.ready
    with pytest.raises(UnavailableError):
        await core.submit(TokenBatch.from_lists([[1, 2]]), EncodeOptions(), "late")


async def test_stop_without_drain_fails_in_flight(make_core):
    core, engine = make_core(max_batch_size=1, seconds_per_batch=1.0)
    tasks = [asyncio.create_task(core.submit(TokenBatch.from_lists([[i + 1]]), EncodeOptions(), f"r{i}"))
             for i in range(3)]
    await _until(lambda: _started(engine))
    assert not await asyncio.to_thread(core.stop, 0.0)
    res = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    assert any(isinstance(x, UnavailableError) for x in res)


async def test_fill_floor_defaults_by_device_and_splits_scattered_lengths(make_core):
    core, _ = make_core(batch_timeout_ms=30.0)   # CPU engine, no floor asked: CPU's default
    assert core.min_fill == CPU_MIN_BATCH_FILL == 0.95
    # the floor's own rule: a queue this short would otherwise run as one batch wherever that is
    # cheaper (the scheduler's drain, tests/unit/test_scheduler.py)
    core._sched.drain = False
    await asyncio.gather(
        core.submit(TokenBatch.from_lists([[1] * 4, [1] * 8]), EncodeOptions(), "x"),
        core.submit(TokenBatch.from_lists([[2] * 2]), EncodeOptions(), "y"))
    st = core.stats()
    assert st.sequences == 3 and st.batches == 3 and st.padded_tokens == st.tokens == 14


async def test_sparse_rows_keep_the_models_top_k():
    import dataclasses

    spec = dataclasses.replace(make_spec(normalize=False), task="sparse", dim=1000,
                               vocab_size=1000, pooling="", max_active_dims=2)
    core = ReplicaCore(FakeEngine(spec), BatchSettings(max_batch_tokens=4096))
    core.start()
    try:
        tokens = TokenBatch.from_lists([[5, 9, 17, 33], [7]])
        result = await core.submit(tokens, EncodeOptions(normalize=False), "r")
        full_spec = dataclasses.replace(spec, max_active_dims=0)
        dense = FakeEngine(full_spec).run(FakeEngine(full_spec).prepare([np.array([5, 9, 17, 33]),
                                                                          np.array([7])]))
    finally:
        core.stop()
    rows = result.sparse
    assert result.data == b"" and rows.counts.tolist() == [min(2, (dense[0] > 0).sum()), 1]
    first = rows.indices[: rows.counts[0]]
    assert sorted(first.tolist()) == first.tolist()
    top = np.sort(np.argsort(dense[0])[-2:])
    assert first.tolist() == top.tolist()
    assert np.allclose(rows.values[: rows.counts[0]], dense[0][top])


# --- latency: admission by the cost model, deadlines, tuning (floe/replica/admission.py) -------

def _fixed_cost(seconds: float):
    """A cost model whose every pass takes ``seconds`` (whatever it holds)."""
    from floe.replica.cost import CostModel

    return CostModel([(1, 1, seconds), (2, 1, seconds), (1, 2, seconds)], refit_every=10 ** 9)


@pytest.fixture
def make_timed_core():
    cores = []

    def _make(pass_s: float, **batch_kw):
        kw = dict(max_batch_tokens=512, max_batch_size=1, batch_timeout_ms=0.0, tuning=False)
        kw.update(batch_kw)
        engine = LoggingEngine(make_spec())
        core = ReplicaCore(engine, BatchSettings(**kw), replica_id="t", cost=_fixed_cost(pass_s))
        core.start()
        cores.append(core)
        return core, engine

    yield _make
    for c in cores:
        c.engine.gate.set()
        c.stop(drain_timeout=0.0)


async def test_the_latency_target_refuses_what_would_finish_late(make_timed_core):
    # each pass is predicted to take 10 s; the target is 15 s (admitted against 85% of it)
    core, engine = make_timed_core(10.0, latency_target_ms=15_000)
    engine.gate.clear()
    first = asyncio.create_task(core.submit(TokenBatch.from_lists([[1, 2]]), EncodeOptions(), "a"))
    await _until(lambda: _started(engine))
    t0 = time.monotonic()
    with pytest.raises(OverloadedError) as ei:
        await core.submit(TokenBatch.from_lists([[3, 4]]), EncodeOptions(), "b")
    assert time.monotonic() - t0 < 1.0            # refused at once, not after waiting
    assert "latency target" in ei.value.message
    # retry after the predicted excess: about 10 + 10 - 12.75 s
    assert 3.0 < ei.value.retry_after < 8.0
    engine.gate.set()
    await first
    stats = core.stats()
    assert stats.refused_requests == 1 and stats.cost_fixed_seconds == pytest.approx(10.0)
    assert all(3 not in b[0] for b in engine.batches)   # no forward pass was spent on it


async def test_a_deadline_too_close_is_refused_before_any_compute(make_timed_core):
    from floe.protocol import deadline_after

    core, engine = make_timed_core(0.5)
    with pytest.raises(OverloadedError) as ei:
        await core.submit(TokenBatch.from_lists([[5, 6]]), EncodeOptions(deadline=deadline_after(0.2)),
                          "d")
    assert "deadline" in ei.value.message and ei.value.retry_after > 0
    assert engine.batches == []


async def test_a_queued_request_whose_deadline_passes_is_dropped_before_compute(make_timed_core):
    from floe.errors import DeadlineError
    from floe.protocol import deadline_after

    core, engine = make_timed_core(0.0)   # predicts nothing: the deadline is admitted
    engine.gate.clear()
    running = asyncio.create_task(core.submit(TokenBatch.from_lists([[1, 1]]), EncodeOptions(), "r"))
    await _until(lambda: _started(engine))
    slot = asyncio.create_task(core.submit(TokenBatch.from_lists([[2, 2]]), EncodeOptions(), "s"))
    await _until(lambda: core._slot is not None)
    t0 = time.monotonic()
    with pytest.raises(DeadlineError):
        await core.submit(TokenBatch.from_lists([[7, 7, 7]]),
                          EncodeOptions(deadline=deadline_after(0.3)), "late")
    waited = time.monotonic() - t0
    assert 0.25 < waited < 5.0     # answered when its deadline passed, not when the engine freed
    engine.gate.set()
    await asyncio.gather(running, slot)
    assert all(7 not in b[0] for b in engine.batches)
    stats = core.stats()
    assert stats.expired_requests == 1 and stats.dropped_sequences == 1
    assert stats.queued_tokens == 0 and stats.queued_sequences == 0


async def test_without_a_target_the_queue_is_bounded_in_time(make_timed_core):
    # 0.6 s a pass, one input a pass, a 1 s bound: running + prepared = 1.2 s ahead -> refused
    core, engine = make_timed_core(0.6, max_queue_ms=1000)
    engine.gate.clear()
    running = asyncio.create_task(core.submit(TokenBatch.from_lists([[1, 1]]), EncodeOptions(), "r"))
    await _until(lambda: _started(engine))
    slot = asyncio.create_task(core.submit(TokenBatch.from_lists([[2, 2]]), EncodeOptions(), "s"))
    await _until(lambda: core._slot is not None)
    with pytest.raises(OverloadedError) as ei:
        await core.submit(TokenBatch.from_lists([[3, 3]]), EncodeOptions(), "q")
    assert "queue" in ei.value.message
    assert core.stats().predicted_wait_seconds > 1.0
    engine.gate.set()
    await asyncio.gather(running, slot)


async def test_tuning_drops_the_batch_wait_at_light_load(make_timed_core, monkeypatch):
    from floe.replica import core as core_module

    monkeypatch.setattr(core_module, "TUNE_WINDOW_S", 0.05)
    core, engine = make_timed_core(0.001, tuning=True, batch_timeout_ms=5.0, max_batch_size=64)
    assert core.stats().batch_timeout_seconds == pytest.approx(0.005)
    for i in range(3):
        await asyncio.sleep(0.1)   # an idle engine: light load
        await core.submit(TokenBatch.from_lists([[1, 2, 3]]), EncodeOptions(), f"l{i}")
    stats = core.stats()
    assert stats.batch_timeout_seconds == 0.0 and stats.tuning_changes >= 1
    assert core.knobs.batch_timeout_s == 0.0 and core._sched.batch_timeout_s == 0.0


async def test_a_pass_longer_than_the_tuning_window_counts_as_busy(make_timed_core, monkeypatch):
    # windows in which no pass ended are still busy while a pass runs (a slow model's long
    # passes must not flip the tuner to light load and back)
    from floe.replica import core as core_module

    monkeypatch.setattr(core_module, "TUNE_WINDOW_S", 0.05)
    core, engine = make_timed_core(0.001, tuning=True, batch_timeout_ms=5.0, max_batch_size=1)
    engine.gate.clear()
    tasks = [asyncio.create_task(core.submit(TokenBatch.from_lists([[1, 2, 3]]), EncodeOptions(),
                                             "held"))]
    await _until(lambda: _started(engine))
    for i in range(8):   # each arrival wakes the batcher, which looks at the load
        await asyncio.sleep(0.06)
        tasks.append(asyncio.create_task(core.submit(TokenBatch.from_lists([[4, 5, i + 6]]),
                                                     EncodeOptions(), f"w{i}")))
    await _until(lambda: core.tuner.changes or len(core._sched) > 0)
    await asyncio.sleep(0.1)
    assert core.tuner.level == "busy"
    assert core.knobs.batch_timeout_s == pytest.approx(0.005)
    engine.gate.set()
    await asyncio.gather(*tasks)


async def test_a_client_that_waits_for_each_answer_gets_no_batch_wait(monkeypatch):
    # one request at a time keeps the engine busy (passes of 30 ms) but never brings company:
    # the tuner drops the wait; two requests sent together each time keep it
    from floe.replica import core as core_module

    monkeypatch.setattr(core_module, "TUNE_WINDOW_S", 0.25)   # about 7 passes a window

    async def client(core, together: int, requests: int, until=lambda: False) -> None:
        for i in range(requests):
            await asyncio.gather(*(core.submit(TokenBatch.from_lists([[1, 2, i % 50 + 3]]),
                                               EncodeOptions(), f"r{i}-{k}")
                                   for k in range(together)))
            if until():
                return

    for together in (1, 2):
        engine = FakeEngine(make_spec(), seconds_per_batch=0.03)
        core = ReplicaCore(engine, BatchSettings(max_batch_tokens=512, max_batch_size=64,
                                                 batch_timeout_ms=5.0, tuning=True),
                           replica_id="t", cost=_fixed_cost(0.03))
        core.start()
        try:
            if together == 1:
                await client(core, 1, 300, until=lambda: core.knobs.batch_timeout_s == 0.0)
                assert core.knobs.batch_timeout_s == 0.0 and core.tuner.level == "busy"
                assert core._sched.company_starts == 0 and core._sched.idle_starts >= 4
            else:
                await client(core, 2, 50)
                assert core.knobs.batch_timeout_s == pytest.approx(0.005)
                assert core._sched.company_starts >= 0.9 * core._sched.idle_starts
        finally:
            core.stop(drain_timeout=0.0)
