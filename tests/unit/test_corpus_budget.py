"""The offline job's batch-budget measurement (floe/corpus/budget.py), with made-up timings."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from floe.corpus.budget import BudgetTuner, plan_batches, tuner_for


def _lengths(n=20_000, seed=0):
    return np.random.default_rng(seed).integers(5, 160, n)


def _run(tuner, lengths, seconds_for):
    """Drives ``cut`` as one worker would: every batch recorded right after it is cut."""
    seen = []
    for b in tuner.cut(lengths):
        width = int(lengths[b.idx].max())
        seen.append(b)
        tuner.record(b, width, seconds_for(b, width))
    return seen


def _cost_time(speed):
    """Seconds for a batch: its modelled cost at ``speed[budget]`` units per second."""
    def seconds(b, width):
        return None if b.trial is None else len(b.idx) * width * (1 + width / 2304) / speed[b.trial]
    return seconds


def test_the_fastest_candidate_is_chosen_and_every_row_runs_exactly_once():
    lengths = _lengths()
    tuner = BudgetTuner(candidates=(2048, 4096, 8192, 16384), max_size=256)
    speed = {2048: 0.97, 4096: 1.0, 8192: 0.93, 16384: 0.9}
    batches = _run(tuner, lengths, _cost_time(speed))
    assert tuner.chosen == 4096
    rows = np.concatenate([b.idx for b in batches])
    assert sorted(rows.tolist()) == list(range(len(lengths)))      # exactly once, none lost
    trials = [b for b in batches if b.trial is not None]
    assert {b.trial for b in trials} == {2048, 4096, 8192, 16384}
    for b in batches:   # every batch within its budget (or a lone over-long row) and the cap
        budget = b.trial or tuner.chosen
        assert len(b.idx) <= 256
        assert len(b.idx) == 1 or len(b.idx) * lengths[b.idx].max() <= budget
    # after the trial every batch is cut at the choice
    assert all(b.trial is None for b in batches[len(trials):])


def test_trial_is_taken_around_the_token_median_and_is_at_most_half_the_shard():
    lengths = _lengths()
    tuner = BudgetTuner(candidates=(2048, 4096), max_size=256)
    batches = _run(tuner, lengths, _cost_time({2048: 1.0, 4096: 2.0}))
    trial_rows = np.concatenate([b.idx for b in batches if b.trial is not None])
    # the median by tokens (where most of the job's compute is), not by rows
    srt = np.sort(lengths)
    med = srt[np.searchsorted(np.cumsum(srt), srt.sum() / 2)]
    assert abs(np.median(lengths[trial_rows]) - med) <= 10
    assert lengths[trial_rows].sum() <= lengths.sum() / 2
    assert tuner.chosen == 4096


def test_rate_is_compared_by_modelled_cost_so_longer_segments_are_not_penalized():
    # Every candidate equally fast per unit of modelled cost: whichever is chosen, the rates
    # must come out equal within rounding, although later segments hold longer rows.
    lengths = _lengths()
    tuner = BudgetTuner(candidates=(2048, 4096, 8192), max_size=256)
    _run(tuner, lengths, _cost_time({2048: 1.0, 4096: 1.0, 8192: 1.0}))
    rates = list(tuner.rates.values())
    assert max(rates) / min(rates) == pytest.approx(1.0, abs=1e-9)


def test_a_shard_too_small_to_measure_uses_the_fallback_and_the_next_one_measures():
    tuner = BudgetTuner(candidates=(2048, 4096), max_size=256, fallback=4096)
    small = _lengths(100)
    batches = _run(tuner, small, _cost_time({2048: 2.0, 4096: 1.0}))
    assert all(b.trial is None for b in batches) and tuner.chosen is None
    assert sorted(np.concatenate([b.idx for b in batches]).tolist()) == list(range(100))
    _run(tuner, _lengths(), _cost_time({2048: 2.0, 4096: 1.0}))
    assert tuner.chosen == 2048


def test_a_fixed_budget_never_measures():
    tuner = BudgetTuner(fixed=1000, max_size=64)
    lengths = _lengths()
    batches = list(tuner.cut(lengths))
    assert all(b.trial is None for b in batches)
    assert [b.idx.tolist() for b in batches] == [x.tolist() for x in plan_batches(lengths, 1000, 64)]


def test_a_failed_trial_batch_falls_back_instead_of_waiting_forever():
    tuner = BudgetTuner(candidates=(2048, 4096), max_size=256, fallback=4096)
    lengths = _lengths()
    batches = _run(tuner, lengths, lambda b, w: None if b.trial == 2048 else 0.01)
    assert tuner.chosen == 4096
    assert sorted(np.concatenate([b.idx for b in batches]).tolist()) == list(range(len(lengths)))


def test_the_cut_waits_for_trial_batches_run_on_other_threads():
    """The local pipeline: the main thread cuts, workers run and record later."""
    tuner = BudgetTuner(candidates=(2048, 4096), max_size=256)
    lengths = _lengths()
    gen = tuner.cut(lengths)
    first = next(gen)
    n_trials = sum(t.left for t in tuner._tally.values())
    trials = [first] + [next(gen) for _ in range(n_trials - 1)]
    assert all(b.trial is not None for b in trials)
    # every trial batch is out; the next cut waits for their records (made on "workers")
    rest: list = []
    consumer = threading.Thread(target=lambda: rest.extend(gen))
    consumer.start()
    consumer.join(0.2)
    assert consumer.is_alive() and not rest     # waiting for the measurement, not guessing
    for b in trials:
        tuner.record(b, int(lengths[b.idx].max()), 0.01 * (1 if b.trial == 4096 else 2))
    consumer.join(5)
    assert not consumer.is_alive() and tuner.chosen == 4096
    rows = np.concatenate([b.idx for b in trials + rest])
    assert sorted(rows.tolist()) == list(range(len(lengths)))


def test_abandon_releases_a_waiting_cut():
    tuner = BudgetTuner(candidates=(2048, 4096), max_size=256, fallback=2048)
    gen = tuner.cut(_lengths())
    first = next(gen)
    assert first.trial is not None
    tuner.abandon()
    rest = list(gen)        # the job stopped: the cut finishes at the fallback, no hang
    assert rest and tuner.chosen == 2048


def test_tuner_for_gpu_and_explicit_budgets():
    class Spec:
        hidden_size = 384

    assert tuner_for(Spec, 1234, 64, gpu=False).chosen == 1234
    assert tuner_for(Spec, None, 64, gpu=True).chosen == 16384
    cpu = tuner_for(Spec, None, 64, gpu=False)
    assert cpu.chosen is None and cpu.attention_scale == 6 * 384
