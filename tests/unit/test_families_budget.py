"""The batcher costs long-context families at their padded size: embeddinggemma's 2048-token inputs
(and Qwen3-Embedding's longer ones) are never batched as if they were short."""

from __future__ import annotations

import pytest

from floe.resolve import CPU_BATCH_TOKENS, GPU_BATCH_TOKENS, batch_budget, batch_fill_floor
from floe.replica.scheduler import Scheduler, Sequence, padded_tokens


def drain(sched: Scheduler, now: float) -> list[list[Sequence]]:
    batches = []
    for _ in range(10_000):  # bounded: each call removes at least one sequence
        batch = sched.next_batch(now, engine_idle=True)
        if batch is None:
            break
        batches.append(batch)
    assert len(sched) == 0
    return batches


@pytest.mark.parametrize("on_gpu", [False, True], ids=["cpu", "gpu"])
def test_embeddinggemma_max_length_inputs_respect_the_default_budget(on_gpu):
    budget = batch_budget(None, on_gpu, 2048)   # 2048 on CPU, 16384 on a GPU
    assert budget == (GPU_BATCH_TOKENS if on_gpu else CPU_BATCH_TOKENS)
    rows = budget // 2048
    sched = Scheduler(budget, max_batch_size=256, batch_timeout_s=0.0)
    # Twenty 2048-token inputs (embeddinggemma's max_seq_length) among 200 short ones, all at once.
    seqs = [Sequence(request_key=i, index=0, length=2048 if i % 11 == 0 else 12, arrival=0.0)
            for i in range(220)]
    sched.add_many(seqs)
    batches = drain(sched, now=1.0)
    assert sum(len(b) for b in batches) == 220
    for b in batches:
        assert padded_tokens(b) <= budget
        if max(s.length for s in b) == 2048:
            assert len(b) <= rows  # a short input rides along at 2048 cost
    long_batches = [b for b in batches if max(s.length for s in b) == 2048]
    assert len(long_batches) == -(-20 // rows)  # the long inputs are grouped, not spread


def test_input_longer_than_the_budget_runs_alone():
    """Qwen3-Embedding allows 32768 tokens, twice the default budget: such an input runs alone
    (its cost is what it is), and never drags other inputs into an over-budget batch."""
    budget = 16384
    sched = Scheduler(budget, max_batch_size=64, batch_timeout_s=0.0)
    sched.add_many([Sequence(request_key="long", index=0, length=32768, arrival=0.0)] +
                   [Sequence(request_key="short", index=i, length=20, arrival=0.1) for i in range(5)])
    batches = drain(sched, now=1.0)
    assert [len(b) for b in batches] == [1, 5]
    assert padded_tokens(batches[0]) == 32768 and padded_tokens(batches[1]) == 100


def test_the_default_budget_follows_the_device_and_the_model():
    assert batch_budget(None, False, 256) == CPU_BATCH_TOKENS
    assert batch_budget(None, False, 8192) == 8192            # bge-m3: its longest input batches
    assert batch_budget(None, False, 32768) == GPU_BATCH_TOKENS  # Qwen3: capped, max length lowered
    assert batch_budget(None, True, 256) == GPU_BATCH_TOKENS
    assert batch_budget(1000, False, 256) == batch_budget(1000, True, 256) == 1000


def test_the_default_fill_floor_follows_the_device():
    assert batch_fill_floor(None, False) == 0.95
    assert batch_fill_floor(None, True) == 0.0
    assert batch_fill_floor(0.5, True) == batch_fill_floor(0.5, False) == 0.5
    assert batch_fill_floor(0.0, False) == 0.0
