"""The cost model, deadline-aware admission and the online tuner: pure policies, driven here with
hand-made measurements, an injected clock and injected cost models (no engine, no threads)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from floe.replica.admission import MIN_RETRY_AFTER_S, AdmissionPolicy
from floe.replica.cost import (CostModel, Coefficients, calibrate, calibration_shapes, fit,
                               key_span, load_or_calibrate)
from floe.replica.scheduler import Scheduler, Sequence
from floe.replica.tuning import MIN_BATCHES, Knobs, Tuner, Window

TRUE = Coefficients(fixed_s=0.002, per_token_s=4e-6, per_token_length_s=2e-9)
SHAPES = [(1, 16), (64, 16), (16, 64), (4, 256), (1, 512), (8, 256), (32, 32)]


def _rows(coeffs: Coefficients, shapes=SHAPES, noise: float = 0.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [(c, n, coeffs.seconds(c, n) * (1 + noise * rng.standard_normal())) for c, n in shapes]


# --- cost model -------------------------------------------------------------------------------

def test_fit_recovers_the_coefficients_of_exact_measurements():
    got = fit(*zip(*_rows(TRUE)))
    assert got.fixed_s == pytest.approx(TRUE.fixed_s, rel=1e-6)
    assert got.per_token_s == pytest.approx(TRUE.per_token_s, rel=1e-6)
    assert got.per_token_length_s == pytest.approx(TRUE.per_token_length_s, rel=1e-5)


def test_fit_is_never_negative_and_stays_close_under_noise():
    # a model with no attention term, measured with 5% noise: no coefficient goes negative
    flat = Coefficients(fixed_s=0.001, per_token_s=5e-6)
    got = fit(*zip(*_rows(flat, noise=0.05, seed=3)))
    assert min(got.fixed_s, got.per_token_s, got.per_token_length_s) >= 0
    for c, n in SHAPES:
        assert got.seconds(c, n) == pytest.approx(flat.seconds(c, n), rel=0.15)


def test_fit_of_nothing_knows_nothing():
    assert not fit([], [], []).known
    assert not CostModel().calibrated
    assert CostModel().seconds(10, 100) == 0.0


def test_online_observations_move_the_model_to_what_the_machine_does_now():
    model = CostModel(_rows(TRUE), refit_every=8)
    slower = Coefficients(TRUE.fixed_s * 2, TRUE.per_token_s * 2, TRUE.per_token_length_s * 2)
    before = model.seconds(16, 128)
    for _ in range(200):
        for c, n in [(16, 128), (64, 32), (2, 256)]:
            model.observe(c, n, slower.seconds(c, n))
    after = model.seconds(16, 128)
    assert before == pytest.approx(TRUE.seconds(16, 128), rel=1e-3)
    # the recent batches weigh twice the start-up passes and outnumber them
    assert after > 1.6 * before
    assert model.observed == 600


def test_relative_error_tracks_the_predictions_miss():
    model = CostModel(_rows(TRUE), refit_every=10 ** 9)   # never refit: the error stays visible
    for _ in range(200):
        model.observe(8, 64, TRUE.seconds(8, 64) * 1.5)
    assert model.error == pytest.approx(1 / 3, rel=0.05)


def test_drain_seconds_counts_whole_batches_at_the_measured_fill():
    model = CostModel([(1, 1, 1.0), (2, 1, 1.0), (1, 2, 1.0)])   # 1 s a pass, whatever it holds
    assert model.seconds(50, 200) == pytest.approx(1.0, rel=1e-6)
    # 100 inputs of 50 tokens at fill 0.5 -> rows of 100 padded tokens, 10 a batch of 1000
    assert model.drain_seconds(5000, 100, budget=1000, max_batch_size=256, fill=0.5) == \
        pytest.approx(10.0, rel=1e-6)
    # the size cap binds: 4 a batch -> 25 passes
    assert model.drain_seconds(5000, 100, budget=1000, max_batch_size=4, fill=1.0) == \
        pytest.approx(25.0, rel=1e-6)
    assert model.drain_seconds(0, 0, 1000, 256, 1.0) == 0.0


def test_calibration_shapes_span_short_long_lone_and_full():
    shapes = calibration_shapes(budget=2048, max_len=512, max_batch_size=256)
    lengths = {n for _, n in shapes}
    assert lengths == {16, 64, 256, 512}
    assert (1, 16) in shapes and (128, 16) in shapes and (4, 512) in shapes
    assert all(c * n <= 2048 for c, n in shapes)
    assert calibration_shapes(budget=64, max_len=8, max_batch_size=2) == [(1, 8), (2, 8)]


# A model with sliding-window layers (embeddinggemma's shape: a key span of 640): the windowed
# layers' attention grows as tokens x min(length, span), the full layers' as tokens x length.
SPAN = 640
WINDOWED = Coefficients(fixed_s=0.009, per_token_s=1e-3, per_token_length_s=7e-8,
                        per_token_window_s=3.3e-7, span=SPAN)


def test_a_sliding_window_term_fits_both_sides_of_the_span():
    shapes = calibration_shapes(budget=2048, max_len=2048, max_batch_size=64, span=SPAN)
    rows = _rows(WINDOWED, shapes)
    got = fit(*zip(*rows), span=SPAN)
    assert got.span == SPAN
    assert got.per_token_length_s == pytest.approx(WINDOWED.per_token_length_s, rel=1e-5)
    assert got.per_token_window_s == pytest.approx(WINDOWED.per_token_window_s, rel=1e-5)
    # one quadratic term, fitted to the same passes, misses lengths between the span and the end
    # (the error measured on the embeddinggemma-300m shape: 12% too little at 640-900 tokens)
    quadratic = fit(*zip(*rows))
    assert quadratic.per_token_window_s == 0 and quadratic.span == 0
    for c, n in [(4, 384), (3, 640), (2, 768), (2, 1024), (1, 1536)]:
        truth = WINDOWED.seconds(c, n)
        assert got.seconds(c, n) == pytest.approx(truth, rel=1e-6)
    worst = max(abs(quadratic.seconds(c, n) / WINDOWED.seconds(c, n) - 1)
                for c, n in [(3, 640), (2, 768), (1, 900)])
    assert worst > 0.05


def test_without_a_pass_past_the_span_the_window_term_stays_zero():
    # every calibration row within the span: both attention columns are the same numbers, and
    # the fit keeps the one term it needs instead of splitting it arbitrarily
    shapes = calibration_shapes(budget=2048, max_len=512, max_batch_size=64, span=SPAN)
    assert {n for _, n in shapes} == {16, 64, 256, 512}
    got = fit(*zip(*_rows(TRUE, shapes)), span=SPAN)
    assert got.per_token_window_s == 0
    assert got.per_token_length_s == pytest.approx(TRUE.per_token_length_s, rel=1e-5)


def test_calibration_adds_rows_of_the_span_and_twice_it_for_a_windowed_model():
    plain = calibration_shapes(budget=2048, max_len=2048, max_batch_size=64)
    windowed = calibration_shapes(budget=2048, max_len=2048, max_batch_size=64, span=SPAN)
    assert {n for _, n in plain} == {16, 64, 256, 2048}
    assert {n for _, n in windowed} == {16, 64, 256, 640, 1280, 2048}
    assert set(plain) < set(windowed) and all(c * n <= 2048 for c, n in windowed)
    # twice the span past the model's length is clipped to it
    assert {n for _, n in calibration_shapes(4096, 1000, 64, span=SPAN)} == {16, 64, 256, 640, 1000}


def test_online_refits_keep_the_window_term():
    model = CostModel(_rows(WINDOWED, calibration_shapes(2048, 2048, 64, SPAN)), span=SPAN,
                      refit_every=4)
    for _ in range(8):
        for c, n in [(2, 1024), (8, 128)]:
            model.observe(c, n, WINDOWED.seconds(c, n))
    assert model.coefficients.span == SPAN
    assert model.seconds(1, 1792) == pytest.approx(WINDOWED.seconds(1, 1792), rel=1e-6)
    assert model.summary()["per_token_window_s"] == pytest.approx(WINDOWED.per_token_window_s,
                                                                  rel=1e-5)


def _folder(tmp_path, config: dict):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return type("Spec", (), {"backbone_path": str(tmp_path)})()


def test_key_span_is_the_windowed_forwards_and_zero_without_local_layers(tmp_path):
    gemma = {"model_type": "gemma3_text", "use_bidirectional_attention": True,
             "sliding_window": 512, "num_hidden_layers": 6}
    # radius 256, query blocks of 128: each block attends to 128 + 2 x 256 keys
    assert key_span(_folder(tmp_path, gemma)) == 640
    assert key_span(_folder(tmp_path, {"model_type": "bert", "num_hidden_layers": 6})) == 0
    assert key_span(type("Spec", (), {})()) == 0


def test_calibrate_keeps_each_shapes_fastest_pass():
    clock = [0.0]
    calls = []

    def run(count, length):
        calls.append((count, length))
        # the first pass of each shape is slow (a noisy neighbour), the second is the model
        clock[0] += TRUE.seconds(count, length) * (3.0 if len(calls) % 2 else 1.0)

    rows = calibrate(run, SHAPES, repeats=2, clock=lambda: clock[0])
    assert len(calls) == 2 * len(SHAPES)
    for (c, n, t), (c2, n2) in zip(rows, SHAPES):
        assert (c, n) == (c2, n2) and t == pytest.approx(TRUE.seconds(c, n))


class _TimedEngine:
    """Just what calibration touches: a spec, prepare/forward/finish, and a fake clock's cost."""

    backend = "test"
    dtype = "float32"
    device = "cpu"

    class spec:   # noqa: N801 - stands in for a ModelSpec
        name, path, architecture, max_seq_length, vocab_size = "m", "", "BertModel", 128, 1000

    def __init__(self):
        self.passes = 0

    def prepare(self, ids):
        return ids

    def forward(self, ids):
        self.passes += 1
        return ids

    def finish(self, out):
        return out


def test_load_or_calibrate_measures_once_then_reads_the_cache(tmp_path):
    eng = _TimedEngine()
    first = load_or_calibrate(eng, budget=512, max_batch_size=64, cache_dir=str(tmp_path))
    n = eng.passes
    # two timed passes of every calibration shape
    assert n == 2 * len(calibration_shapes(512, 128, 64))
    files = list((tmp_path / "cost").glob("*.json"))
    assert len(files) == 1 and "passes" in json.loads(files[0].read_text())
    again = load_or_calibrate(eng, budget=512, max_batch_size=64, cache_dir=str(tmp_path))
    assert eng.passes == n   # no new pass: read from the cache
    assert again.coefficients == first.coefficients
    # another budget is another calibration
    load_or_calibrate(eng, budget=1024, max_batch_size=64, cache_dir=str(tmp_path))
    assert eng.passes > n and len(list((tmp_path / "cost").glob("*.json"))) == 2
    # an unreadable cache file is measured over, not trusted
    files[0].write_text("{not json")
    before = eng.passes
    load_or_calibrate(eng, budget=512, max_batch_size=64, cache_dir=str(tmp_path))
    assert eng.passes == before + n


# --- admission --------------------------------------------------------------------------------

def test_target_admits_what_is_predicted_to_finish_in_time():
    policy = AdmissionPolicy(target_s=1.0, max_queue_s=30.0, safety=0.85)
    ok = policy.decide(now=100.0, ahead_s=0.5, own_s=0.2)
    assert ok.admit and ok.limit_s == 1.0 and ok.predicted_s == pytest.approx(0.7)
    no = policy.decide(now=100.0, ahead_s=0.8, own_s=0.2)
    assert not no.admit and no.reason == "target"
    # after that long the queue has drained enough for the same request
    assert no.retry_after_s == pytest.approx(1.0 - 0.85)


def test_a_requests_own_deadline_overrides_the_target_both_ways():
    policy = AdmissionPolicy(target_s=1.0, max_queue_s=30.0, safety=1.0)
    short = policy.decide(now=10.0, ahead_s=0.3, own_s=0.0, deadline=10.2)
    assert not short.admit and short.reason == "deadline" and short.limit_s == pytest.approx(0.2)
    long = policy.decide(now=10.0, ahead_s=3.0, own_s=0.5, deadline=15.0)
    assert long.admit
    past = policy.decide(now=10.0, ahead_s=0.0, own_s=0.001, deadline=9.0)
    assert not past.admit and past.retry_after_s >= MIN_RETRY_AFTER_S


def test_without_a_target_the_queue_is_bounded_in_time():
    policy = AdmissionPolicy(target_s=None, max_queue_s=5.0)
    assert policy.decide(0.0, ahead_s=4.9, own_s=100.0).admit   # its own size is not the bound
    no = policy.decide(0.0, ahead_s=6.5, own_s=0.1)
    assert not no.admit and no.reason == "queue" and no.retry_after_s == pytest.approx(1.5)


def test_an_uncalibrated_model_admits_everything():
    policy = AdmissionPolicy(target_s=0.1, max_queue_s=1.0)
    assert policy.decide(0.0, ahead_s=0.0, own_s=0.0).admit


@pytest.mark.parametrize("kw", [dict(target_s=0), dict(target_s=-1), dict(max_queue_s=0),
                                dict(safety=0), dict(safety=1.5)])
def test_admission_refuses_nonsense_settings(kw):
    args = dict(target_s=1.0, max_queue_s=1.0)
    args.update(kw)
    with pytest.raises(ValueError):
        AdmissionPolicy(**args)


# --- deadlines in the scheduler ---------------------------------------------------------------

def test_expire_drops_whole_requests_whose_deadline_passed_and_nothing_else():
    s = Scheduler(max_batch_tokens=1000, max_batch_size=100, batch_timeout_s=10.0)
    s.add_many([Sequence("late", i, 5, arrival=0.0, deadline=1.0) for i in range(3)])
    s.add(Sequence("later", 0, 5, arrival=0.0, deadline=2.0))
    s.add(Sequence("none", 0, 5, arrival=0.0))
    assert s.next_expiry() == 1.0
    assert s.expire(0.99) == []
    assert s.expire(1.0) == [("late", 3)]
    assert s.queued_sequences == 2 and s.queued_tokens == 10
    assert s.next_expiry() == 2.0
    assert s.expire(5.0) == [("later", 1)]
    assert s.next_expiry() is None and s.expire(100.0) == []
    batch = s.next_batch(now=100.0)
    assert [q.request_key for q in batch] == ["none"]


def test_an_expired_request_removed_earlier_is_not_expired_again():
    s = Scheduler(max_batch_tokens=1000, max_batch_size=100, batch_timeout_s=0.0)
    s.add(Sequence("a", 0, 5, arrival=0.0, deadline=1.0))
    assert s.remove_request("a") == 1
    assert s.next_expiry() is None and s.expire(2.0) == []


# --- tuning -----------------------------------------------------------------------------------

BASE = Knobs(max_batch_tokens=2048, batch_timeout_s=0.002, min_fill=0.9)


def _window(load: float, batches: int = 20, fill: float = 0.95, seq_len: int = 64,
            seconds: float = 1.0, **kw) -> Window:
    seqs = batches * 8
    padded = seqs * seq_len
    return Window(seconds=seconds, busy_s=load * seconds, batches=batches, sequences=seqs,
                  real_tokens=int(padded * fill), padded_tokens=padded, **kw)


def _tuner(**kw) -> Tuner:
    args = dict(min_budget=256, max_budget=16384, max_batch_size=256, cooldown=2)
    args.update(kw)
    return Tuner(BASE, **args)


CPU_COST = CostModel([(c, n, Coefficients(3e-4, 6e-5, 1e-8).seconds(c, n)) for c, n in SHAPES])
# a GPU's cost: a large fixed cost per pass, little per token
GPU_COST = CostModel([(c, n, Coefficients(8e-3, 2e-7, 0.0).seconds(c, n)) for c, n in SHAPES])


def test_light_load_runs_at_once_and_busy_load_waits_for_company():
    t = _tuner()
    changes = t.step(_window(0.05), CPU_COST)
    assert t.level == "light" and t.knobs.batch_timeout_s == 0.0
    assert [c.knob for c in changes] == ["batch_timeout_s"] and "light" in changes[0].reason
    for _ in range(3):
        t.step(_window(0.9), CPU_COST)
    assert t.level == "busy" and t.knobs.batch_timeout_s == BASE.batch_timeout_s


def test_busy_load_without_company_runs_at_once():
    # a client that sends one request and waits for its answer: the replica is busy, but no
    # second request ever came within the wait
    t = _tuner(cooldown=0)
    changes = t.step(_window(0.6, idle_starts=30, company_starts=1), CPU_COST)
    assert t.level == "busy" and t.knobs.batch_timeout_s == 0.0
    assert "no company" in changes[0].reason and "29 of the 30" in changes[0].reason
    # company comes (a second client): the configured wait again
    t.step(_window(0.6, idle_starts=30, company_starts=6), CPU_COST)
    assert t.knobs.batch_timeout_s == BASE.batch_timeout_s
    # too few idle starts to tell (a queue always full): as configured
    t.step(_window(0.9, idle_starts=MIN_BATCHES - 1, company_starts=0), CPU_COST)
    assert t.knobs.batch_timeout_s == BASE.batch_timeout_s


def test_load_between_the_thresholds_keeps_the_level_it_had():
    t = _tuner(cooldown=0)
    t.step(_window(0.1), CPU_COST)
    assert t.level == "light"
    for load in (0.25, 0.35, 0.3, 0.39):   # inside the band: no flapping
        assert t.step(_window(load), CPU_COST) == [] and t.level == "light"
    t.step(_window(0.45), CPU_COST)
    assert t.level == "busy"
    for load in (0.35, 0.21, 0.3):
        assert t.step(_window(load), CPU_COST) == [] and t.level == "busy"


def test_a_changed_knob_stays_put_for_the_cooldown():
    t = _tuner(cooldown=3)
    t.step(_window(0.05), CPU_COST)          # -> light, timeout 0
    assert t.step(_window(0.9), CPU_COST) == []   # busy, but the wait just changed
    assert t.step(_window(0.9), CPU_COST) == []
    changes = t.step(_window(0.9), CPU_COST)
    assert [c.knob for c in changes] == ["batch_timeout_s"]


def test_the_cpu_budget_stays_where_the_model_says_more_buys_nothing():
    t = _tuner()
    t.step(_window(0.9), CPU_COST)
    assert t.knobs.max_batch_tokens == BASE.max_batch_tokens


def test_a_gpu_like_fixed_cost_raises_the_budget_under_load_only():
    t = _tuner()
    t.step(_window(0.05), GPU_COST)
    assert t.knobs.max_batch_tokens == BASE.max_batch_tokens   # light: left alone
    t = _tuner()
    t.step(_window(0.9), GPU_COST)
    assert t.knobs.max_batch_tokens > BASE.max_batch_tokens
    # the smallest budget within 3% of the best throughput, not simply the largest
    best = t.best_budget(GPU_COST, 64.0)
    rate = lambda b: GPU_COST.seconds(b // 64, 64) / b   # noqa: E731
    assert rate(best) <= 1.03 * rate(16384)
    assert best == 16384 or rate(best // 2) > 1.03 * rate(16384)


def test_the_latency_target_caps_a_pass_at_a_quarter_of_it():
    slow = CostModel([(c, n, Coefficients(0.0, 1e-4, 0.0).seconds(c, n)) for c, n in SHAPES])
    t = _tuner(target_s=0.1)
    # 1e-4 s a token: a pass of 0.025 s holds 250 tokens, below the configured 2048
    t.step(_window(0.9), slow)
    assert t.knobs.max_batch_tokens == 256
    assert t.knobs.batch_timeout_s <= 0.1 / 20


def test_gpu_memory_above_90_percent_halves_the_budget():
    t = _tuner()
    t.step(_window(0.9, device_used=95, device_total=100), GPU_COST)
    assert t.knobs.max_batch_tokens == BASE.max_batch_tokens // 2


def test_the_fill_floor_follows_the_measured_padding():
    t = Tuner(Knobs(16384, 0.002, 0.0), min_budget=256, max_budget=16384, max_batch_size=256,
              cooldown=0)
    t.step(_window(0.9, fill=0.5), GPU_COST)
    assert t.knobs.min_fill == pytest.approx(0.1)
    t.step(_window(0.9, fill=0.6), GPU_COST)
    assert t.knobs.min_fill == pytest.approx(0.2)
    t.step(_window(0.9, fill=0.8), GPU_COST)      # inside the band: stays
    assert t.knobs.min_fill == pytest.approx(0.2)
    t.step(_window(0.9, fill=0.97), GPU_COST)
    assert t.knobs.min_fill == pytest.approx(0.1)
    t.step(_window(0.9, fill=0.97), GPU_COST)
    t.step(_window(0.9, fill=0.97), GPU_COST)
    assert t.knobs.min_fill == 0.0                # never below the configured floor
    # too few batches say nothing about padding
    t.step(_window(0.9, batches=2, fill=0.2), GPU_COST)
    assert t.knobs.min_fill == 0.0


def test_every_change_says_what_and_why_and_is_counted():
    t = _tuner()
    changes = t.step(_window(0.05), CPU_COST)
    c = changes[0]
    assert (c.knob, c.old, c.new) == ("batch_timeout_s", 0.002, 0.0) and c.reason
    assert t.changes == 1
    assert not math.isnan(t.knobs.batch_timeout_s)


# --- the wall factor: queue drain slower than the passes add up to -----------------------------

def test_wall_factor_follows_how_much_slower_the_queue_drains_than_predicted():
    from floe.replica.admission import wall_factor

    f = 1.0
    for _ in range(30):   # 1 s windows, never idle, passes priced at 0.5 s: the queue drains at half
        f = wall_factor(f, seconds=1.0, idle_s=0.0, predicted_s=0.5)
    assert f == pytest.approx(2.0, rel=0.01)
    # idle time is not the model's fault: 0.5 s busy for 0.5 s predicted is on time
    g = 2.0
    for _ in range(30):
        g = wall_factor(g, seconds=1.0, idle_s=0.5, predicted_s=0.5)
    assert g == pytest.approx(1.0, rel=0.01)
    # a window with little work says nothing
    assert wall_factor(1.7, seconds=1.0, idle_s=0.95, predicted_s=0.05) == 1.7
    # bounded both ways
    for _ in range(60):
        f = wall_factor(f, seconds=1.0, idle_s=0.0, predicted_s=0.2)
    assert f <= 5.0 + 1e-9
    assert wall_factor(1.0, 1.0, 0.0, 100.0) >= 0.5
