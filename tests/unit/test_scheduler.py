"""The pure batcher, driven with an injected clock."""

from __future__ import annotations

import random
import sys

import pytest

from floe.replica.scheduler import Scheduler, Sequence, padded_tokens


def seq(key, length, arrival=0.0, priority=0, index=0):
    return Sequence(request_key=key, index=index, length=length, arrival=arrival, priority=priority)


def drain(s: Scheduler, now: float) -> list[list[Sequence]]:
    out = []
    for _ in range(100_000):
        b = s.next_batch(now, engine_idle=True)
        if b is None:
            break
        out.append(b)
    return out


def test_imports_no_torch_grpc_asyncio():
    import subprocess
    code = ("import sys, floe.replica.scheduler; "
            "bad = [m for m in ('torch', 'grpc', 'asyncio') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_budget_counts_padded_tokens():
    s = Scheduler(max_batch_tokens=100, max_batch_size=1000, batch_timeout_s=0.0)
    # one long (50) and many short (10): 50 x 3 = 150 would break the budget, 50 x 2 fits
    s.add(seq("long", 50))
    for i in range(20):
        s.add(seq(f"s{i}", 10))
    batches = drain(s, now=1.0)
    assert sum(len(b) for b in batches) == 21
    for b in batches:
        assert padded_tokens(b) <= 100
    # shorts are grouped together at the budget: 10 of length 10
    assert any(len(b) == 10 and padded_tokens(b) == 100 for b in batches)


def test_size_cap():
    s = Scheduler(max_batch_tokens=10_000, max_batch_size=4, batch_timeout_s=0.0)
    for i in range(10):
        s.add(seq(i, 5))
    batches = drain(s, now=0.0)
    assert [len(b) for b in batches] == [4, 4, 2]


def test_sequence_longer_than_budget_runs_alone():
    s = Scheduler(max_batch_tokens=32, max_batch_size=8, batch_timeout_s=0.0)
    s.add(seq("huge", 100, arrival=0.0))
    s.add(seq("small", 4, arrival=0.1))
    b1 = s.next_batch(1.0)
    assert [x.request_key for x in b1] == ["huge"]
    assert [x.request_key for x in s.next_batch(1.0)] == ["small"]


def test_length_sorting_reduces_padding_vs_fifo():
    rng = random.Random(7)
    lengths = [rng.choice([rng.randint(4, 16), rng.randint(100, 128)]) for _ in range(400)]
    budget, cap = 2048, 64
    s = Scheduler(max_batch_tokens=budget, max_batch_size=cap, batch_timeout_s=0.0)
    for i, n in enumerate(lengths):
        s.add(seq(i, n, arrival=0.0))
    ours = sum(padded_tokens(b) for b in drain(s, now=0.0))

    # FIFO under the same budget rule
    fifo, cur = 0, []
    for n in lengths:
        if cur and (len(cur) + 1 > cap or (len(cur) + 1) * max(max(cur), n) > budget):
            fifo += max(cur) * len(cur)
            cur = []
        cur.append(n)
    fifo += max(cur) * len(cur)
    real = sum(lengths)
    assert ours < fifo
    assert real / ours > 0.85  # length bucketing keeps padding small
    assert real / fifo < 0.7


def test_timeout_waits_for_partial_batch_only_while_filling():
    s = Scheduler(max_batch_tokens=1000, max_batch_size=8, batch_timeout_s=0.005)
    s.add(seq("a", 10, arrival=1.000))
    assert s.next_batch(1.001) is None
    assert s.next_deadline(1.001) == pytest.approx(1.005)
    s.add(seq("b", 10, arrival=1.003))
    # the deadline follows the oldest sequence, not the newest
    assert s.next_deadline(1.004) == pytest.approx(1.005)
    b = s.next_batch(1.005)
    assert sorted(x.request_key for x in b) == ["a", "b"]
    assert s.next_deadline(1.006) is None


def test_full_batch_is_formed_without_waiting():
    s = Scheduler(max_batch_tokens=40, max_batch_size=100, batch_timeout_s=10.0)
    for i in range(4):
        s.add(seq(i, 10, arrival=0.0))
    b = s.next_batch(0.0)
    assert b is not None and len(b) == 4


def test_busy_engine_gets_only_full_batches():
    s = Scheduler(max_batch_tokens=40, max_batch_size=100, batch_timeout_s=0.0)
    for i in range(3):
        s.add(seq(i, 10, arrival=0.0))
    # partial batch and engine busy: wait, even with the timeout long past
    assert s.next_batch(5.0, engine_idle=False) is None
    s.add(seq(3, 10, arrival=5.0))
    b = s.next_batch(5.0, engine_idle=False)
    assert b is not None and len(b) == 4
    s.add(seq(4, 10, arrival=5.0))
    assert s.next_batch(5.0, engine_idle=False) is None
    assert len(s.next_batch(5.0, engine_idle=True)) == 1


def test_zero_timeout_runs_at_once():
    s = Scheduler(max_batch_tokens=1000, max_batch_size=8, batch_timeout_s=0.0)
    s.add(seq("a", 3, arrival=2.0))
    assert len(s.next_batch(2.0)) == 1


def test_no_starvation_of_long_sequence_under_short_stream():
    # budget fits one long alone, or many shorts; shorts arrive continually
    s = Scheduler(max_batch_tokens=256, max_batch_size=64, batch_timeout_s=0.0)
    s.add(seq("long", 200, arrival=0.0))
    now = 0.0
    for i in range(64):
        s.add(seq(f"short{i}", 4, arrival=now))
    for step in range(50):
        now += 0.001
        for j in range(64):
            s.add(seq(f"x{step}-{j}", 4, arrival=now))
        b = s.next_batch(now)
        assert b is not None
        if any(x.request_key == "long" for x in b):
            break
    else:
        pytest.fail("long sequence starved")
    assert step == 0  # the oldest sequence anchors the very first batch


def test_priority_first_but_bounded():
    s = Scheduler(max_batch_tokens=10, max_batch_size=1, batch_timeout_s=0.0, max_wait_s=0.5)
    s.add(seq("low", 5, arrival=0.0, priority=0))
    now = 0.0
    order = []
    for step in range(20):
        now += 0.1
        s.add(seq(f"high{step}", 5, arrival=now, priority=5))
        b = s.next_batch(now)
        order.append(b[0].request_key)
        if b[0].request_key == "low":
            break
    # high priority jumps the queue ...
    assert order[0] == "high0"
    # ... but the low priority sequence runs once it has waited max_wait_s
    assert order[-1] == "low"
    assert now >= 0.5 and now < 0.5 + 0.1 + 1e-9


def test_fill_prefers_higher_priority():
    s = Scheduler(max_batch_tokens=1000, max_batch_size=2, batch_timeout_s=0.0)
    s.add(seq("anchor", 10, arrival=0.0, priority=1))
    s.add(seq("low-same-len", 10, arrival=0.0, priority=0))
    s.add(seq("high-other-len", 30, arrival=0.0, priority=1))
    b = s.next_batch(0.0)
    assert {x.request_key for x in b} == {"anchor", "high-other-len"}


def test_cancellation_removes_queued_sequences():
    s = Scheduler(max_batch_tokens=1000, max_batch_size=100, batch_timeout_s=0.0)
    for i in range(5):
        s.add(seq("gone", 7, index=i))
    s.add(seq("kept", 3))
    assert s.queued_tokens == 38
    assert s.remove_request("gone") == 5
    assert s.remove_request("gone") == 0
    assert s.queued_sequences == 1 and s.queued_tokens == 3
    b = s.next_batch(0.0)
    assert [x.request_key for x in b] == ["kept"]
    assert s.next_batch(0.0) is None


def test_rejects_empty_sequence():
    s = Scheduler(max_batch_tokens=10, max_batch_size=1, batch_timeout_s=0.0)
    with pytest.raises(ValueError):
        s.add(seq("e", 0))


@pytest.mark.parametrize("seed", range(12))
def test_random_workload_schedules_each_sequence_exactly_once(seed):
    rng = random.Random(seed)
    budget = rng.choice([64, 256, 1024])
    cap = rng.choice([1, 3, 16, 256])
    timeout = rng.choice([0.0, 0.002, 0.01])
    min_fill = rng.choice([0.0, 0.0, 0.5, 0.9, 1.0])
    s = Scheduler(max_batch_tokens=budget, max_batch_size=cap, batch_timeout_s=timeout,
                  max_wait_s=rng.choice([0.0, 0.05, 1.0]), min_fill=min_fill)
    now = 0.0
    added: dict[tuple, Sequence] = {}
    removed_keys: set = set()
    scheduled: list[Sequence] = []
    max_len = rng.choice([8, 128, 2000])
    for step in range(300):
        now += rng.random() * 0.003
        for _ in range(rng.randint(0, 6)):
            key = f"r{step}-{rng.randint(0, 1)}"
            if key in removed_keys:
                continue
            x = seq(key, rng.randint(1, max_len), arrival=now, priority=rng.choice([0, 0, 1, 3]),
                    index=len(added))
            added[(key, x.index)] = x
            s.add(x)
        if rng.random() < 0.05 and added:
            victim = rng.choice(list(added.values())).request_key
            s.remove_request(victim)
            removed_keys.add(victim)
        b = s.next_batch(now, engine_idle=rng.random() < 0.7)
        if b:
            scheduled.extend(b)
            assert len(b) <= cap
            assert len(b) == 1 or padded_tokens(b) <= budget
            assert sum(x.length for x in b) >= min_fill * padded_tokens(b) - 1e-9
    scheduled.extend(x for b in drain(s, now + 10.0) for x in b)
    ids = [id(x) for x in scheduled]
    assert len(ids) == len(set(ids)), "a sequence was scheduled twice"
    expected = {id(x) for x in scheduled} | {id(x) for x in added.values()
                                             if x.request_key in removed_keys}
    assert expected == {id(x) for x in added.values()}
    assert s.queued_sequences == 0 and s.queued_tokens == 0


def test_fill_floor_keeps_each_batch_full_enough():
    # a short anchor among scattered lengths: without a floor it pads every row to the longest
    lengths = [30, 31, 33, 45, 60, 90, 120]
    plain = Scheduler(max_batch_tokens=4096, max_batch_size=256, batch_timeout_s=0.0)
    floored = Scheduler(max_batch_tokens=4096, max_batch_size=256, batch_timeout_s=0.0, min_fill=0.9)
    for s in (plain, floored):
        for i, n in enumerate(lengths):
            s.add(seq(i, n, arrival=i * 0.001))
    assert len(plain.next_batch(1.0)) == len(lengths)
    first = floored.next_batch(1.0)
    assert [x.length for x in first] == [30, 31, 33]   # the anchor (oldest) and its close lengths
    batches = [first] + drain(floored, 1.0)
    assert sorted(x.length for b in batches for x in b) == lengths
    for b in batches:
        assert sum(x.length for x in b) >= 0.9 * padded_tokens(b)


def test_fill_floor_batch_is_full_while_the_engine_is_busy():
    # the floor left sequences out: waiting would not add them, so a busy engine's next batch is
    # formed now (pipelining), not when the engine goes idle
    s = Scheduler(max_batch_tokens=4096, max_batch_size=256, batch_timeout_s=10.0, min_fill=0.9)
    s.add(seq("a", 20, arrival=0.0))
    s.add(seq("b", 200, arrival=0.0))
    assert [x.length for x in s.next_batch(0.0, engine_idle=False)] == [20]
    # a lone sequence with nothing held back still waits for company while the engine is busy
    assert s.next_batch(0.0, engine_idle=False) is None


def test_fill_floor_out_of_range_is_refused():
    with pytest.raises(ValueError):
        Scheduler(max_batch_tokens=64, max_batch_size=4, batch_timeout_s=0.0, min_fill=1.5)


# --- draining a short queue in one batch ----------------------------------------------------------

def fixed(per_pass: float):
    """A cost with a pass's fixed part, as the replica's cost model has (floe/replica/cost.py)."""
    return lambda rows, width: per_pass + rows * width


SCATTERED = [30, 31, 33, 45, 60, 90, 120]


def test_a_short_queue_runs_in_one_batch_where_the_floors_passes_cost_more():
    s = Scheduler(max_batch_tokens=4096, max_batch_size=256, batch_timeout_s=0.01, min_fill=0.9,
                  cost=fixed(400.0))
    for i, n in enumerate(SCATTERED):
        s.add(seq(i, n, arrival=0.0))
    # one batch: 400 + 7 x 120 = 1,240 against five passes of 400 + 414 padded tokens
    assert s.next_batch(0.0, engine_idle=False) is None     # not full: waits for an idle engine
    assert s.next_batch(0.0) is None                          # and for the bounded wait
    s.add(seq("late", 50, arrival=0.005))                    # which may bring company
    batch = s.next_batch(0.02)
    assert sorted(x.length for x in batch) == sorted(SCATTERED + [50]) and len(s) == 0


def test_without_a_fixed_cost_the_floors_batches_stay():
    s = Scheduler(max_batch_tokens=4096, max_batch_size=256, batch_timeout_s=0.0, min_fill=0.9,
                  cost=fixed(0.0))
    for i, n in enumerate(SCATTERED):
        s.add(seq(i, n))
    assert [x.length for x in s.next_batch(1.0)] == [30, 31, 33]


def test_a_queue_longer_than_one_batch_keeps_the_floor():
    s = Scheduler(max_batch_tokens=256, max_batch_size=256, batch_timeout_s=0.0, min_fill=0.9,
                  cost=fixed(10_000.0))
    for i, n in enumerate(SCATTERED):   # 409 real tokens: more than one batch holds
        s.add(seq(i, n))
    batches = drain(s, 1.0)
    assert [[x.length for x in b] for b in batches] == [[30, 31, 33], [45], [60], [90, 120]]
    # while more waited than one batch holds, the floor held; then the last two (210 real
    # tokens, 240 padded) drained in one pass
    assert all(sum(x.length for x in b) >= 0.9 * padded_tokens(b) for b in batches[:3])


def test_a_packing_engines_short_queue_drains_packed_within_the_budget():
    from floe.engine.packing import shape

    lengths = [12, 25, 40, 8, 17, 33, 60, 21]   # a request of prose paragraphs
    s = Scheduler(max_batch_tokens=2048, max_batch_size=256, batch_timeout_s=0.0, min_fill=0.95,
                  pack_align=16, cost=fixed(300.0))
    for i, n in enumerate(lengths):
        s.add(seq("r", n, index=i))
    batch = s.next_batch(1.0)
    assert len(batch) == len(lengths) and len(s) == 0
    rows, width = shape([x.length for x in batch], 16)
    assert rows * width <= 2048 and rows < len(lengths)   # several to a row


def test_mixed_priorities_and_groups_are_not_drained_together():
    for second in (dict(priority=1), dict(group=1)):
        s = Scheduler(max_batch_tokens=4096, max_batch_size=256, batch_timeout_s=0.0,
                      min_fill=0.9, cost=fixed(10_000.0))
        s.add(Sequence("a", 0, 20, 0.0))
        s.add(Sequence("b", 0, 200, 0.0, **second))
        assert len(s.next_batch(1.0)) == 1


def test_the_drain_decision_is_priced_once_per_queue_state(monkeypatch):
    s = Scheduler(max_batch_tokens=4096, max_batch_size=256, batch_timeout_s=10.0, min_fill=0.9,
                  cost=fixed(400.0))
    for i, n in enumerate(SCATTERED):
        s.add(seq(i, n))
    calls = []
    real = Scheduler._plan_cost
    monkeypatch.setattr(Scheduler, "_plan_cost", lambda self, live: calls.append(1) or real(self, live))
    for _ in range(5):
        assert s.next_batch(0.0, engine_idle=False) is None
    assert len(calls) == 1
    s.add(seq("x", 70))
    assert s.next_batch(0.0, engine_idle=False) is None and len(calls) == 2


# --- company: whether waiting for a batch to fill pays (read by the tuner) ------------------------

def test_a_partial_batch_that_a_second_request_joined_during_the_wait_had_company():
    s = Scheduler(max_batch_tokens=1000, max_batch_size=64, batch_timeout_s=0.01)
    s.add(seq("a", 10, arrival=0.0))
    assert s.next_batch(now=0.005) is None          # waiting for company
    s.add(seq("b", 10, arrival=0.006))              # it came
    batch = s.next_batch(now=0.011)
    assert {x.request_key for x in batch} == {"a", "b"}
    assert (s.idle_starts, s.company_starts) == (1, 1)


def test_a_lone_start_counts_the_next_arrival_within_the_configured_wait_only():
    s = Scheduler(max_batch_tokens=1000, max_batch_size=64, batch_timeout_s=0.01)
    s.batch_timeout_s = 0.0                         # tuned down: a lone request runs at once
    s.add(seq("a", 10, arrival=0.0))
    assert [x.request_key for x in s.next_batch(now=0.0)] == ["a"]
    s.add(seq("b", 10, arrival=0.004))              # the configured wait would have held "a" for it
    assert [x.request_key for x in s.next_batch(now=0.004)] == ["b"]
    assert (s.idle_starts, s.company_starts) == (2, 1)
    s.add(seq("c", 10, arrival=0.5))                # "b" alone, and nothing near it
    assert (s.idle_starts, s.company_starts) == (2, 1)
    s.add(seq("d", 10, arrival=0.5001))
    assert [x.request_key for x in s.next_batch(now=0.5001)] == ["c", "d"]
    assert (s.idle_starts, s.company_starts) == (3, 2)


def test_full_batches_and_a_busy_engine_say_nothing_about_company():
    s = Scheduler(max_batch_tokens=40, max_batch_size=64, batch_timeout_s=0.01)
    for k in range(8):
        s.add(seq(k, 10, arrival=0.0))
    assert s.next_batch(now=0.0, engine_idle=False) is not None   # full: formed at once
    s.add(seq("late", 5, arrival=0.001))
    assert s.next_batch(now=0.001, engine_idle=True) is not None   # full again
    assert (s.idle_starts, s.company_starts) == (0, 0)
