"""The front end's merging of concurrent requests into one replica call (floe/fleet/coalesce.py):
each request gets exactly its own rows, failures keep their kind per request, cancellation and
abort leave the other members alone."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from floe.errors import CancelledError as FloeCancelled, ErrorKind, OverloadedError
from floe.protocol import EmbedResult, EncodeOptions, TokenBatch
from floe.fleet.link import ReplicaLost
from floe.fleet.coalesce import Coalescer, split

DIM = 4


def rows_for(tokens: TokenBatch) -> np.ndarray:
    """A stand-in replica: each item's row depends only on its own ids."""
    off = tokens.offsets()
    out = np.zeros((tokens.n, DIM), np.float32)
    for i in range(tokens.n):
        ids = tokens.ids[off[i]:off[i + 1]].astype(np.float32)
        out[i] = [ids.sum(), ids[0], ids[-1], len(ids)]
    return out


class FakeReplica:
    def __init__(self, fail: BaseException | None = None, hold: bool = False) -> None:
        self.calls: list[tuple[TokenBatch, EncodeOptions, str]] = []
        self.fail = fail
        self.release = asyncio.Event()
        if not hold:
            self.release.set()
        self.cancelled = 0

    async def __call__(self, tokens, options, request_id, timeout):
        self.calls.append((tokens, options, request_id))
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.fail is not None:
            raise self.fail
        return EmbedResult.from_array(rows_for(tokens), options.output_dtype, tokens.lengths,
                                      request_id=request_id)


def batch(*items: list[int]) -> TokenBatch:
    return TokenBatch.from_lists([list(x) for x in items])


def test_one_turn_becomes_one_call_and_each_request_gets_its_own_rows():
    async def main():
        replica = FakeReplica()
        c = Coalescer(replica, max_tokens=1000)
        reqs = [batch([i, i + 1, i + 2]) if i % 2 else batch([i + 5], [i, 7, 9, 11]) for i in range(1, 9)]
        results = await asyncio.gather(*(c.submit(t, EncodeOptions(), f"r{i}")
                                         for i, t in enumerate(reqs)))
        assert len(replica.calls) == 1 and c.calls == 1
        for i, (t, r) in enumerate(zip(reqs, results)):
            assert r.request_id == f"r{i}" and r.n == t.n
            np.testing.assert_array_equal(r.as_float32(), rows_for(t))
            np.testing.assert_array_equal(r.token_counts, t.lengths)
    asyncio.run(main())


def test_different_options_and_the_token_cap_make_separate_calls():
    async def main():
        replica = FakeReplica()
        c = Coalescer(replica, max_tokens=10)
        half = EncodeOptions(output_dtype="float16")
        jobs = [c.submit(batch([1, 2, 3]), EncodeOptions(), "a"),
                c.submit(batch([4, 5, 6]), EncodeOptions(), "b"),
                c.submit(batch([7, 8]), half, "c"),
                c.submit(batch([9, 9, 9, 9, 9]), EncodeOptions(), "d"),   # over 10 with a and b
                c.submit(batch(list(range(1, 12))), EncodeOptions(), "big")]  # alone: over the cap
        results = await asyncio.gather(*jobs)
        sizes = sorted(t.total_tokens for t, _, _ in replica.calls)
        assert sizes == [2, 5, 6, 11]
        assert {o.output_dtype for _, o, _ in replica.calls} == {"float32", "float16"}
        assert results[2].dtype == "float16"
        np.testing.assert_array_equal(results[3].as_float32(), rows_for(batch([9, 9, 9, 9, 9])))
    asyncio.run(main())


def test_off_sends_every_request_alone():
    async def main():
        replica = FakeReplica()
        c = Coalescer(replica, max_tokens=0)
        await asyncio.gather(*(c.submit(batch([i]), EncodeOptions(), str(i)) for i in range(1, 5)))
        assert [rid for _, _, rid in replica.calls] == ["1", "2", "3", "4"]
    asyncio.run(main())


@pytest.mark.parametrize("err", [ReplicaLost("replica 0 reset", 0),
                                 OverloadedError("queue is full", retry_after=1.0)],
                         ids=["replica-failed", "overloaded"])
def test_a_failed_call_fails_every_member_with_its_kind(err):
    async def main():
        c = Coalescer(FakeReplica(fail=err), max_tokens=100)
        outcomes = await asyncio.gather(*(c.submit(batch([i, 2]), EncodeOptions(), str(i))
                                          for i in range(1, 4)), return_exceptions=True)
        for o in outcomes:
            assert type(o) is type(err) and o.kind == err.kind
        assert len({id(o) for o in outcomes}) == 3   # one error object per request
        if isinstance(err, ReplicaLost):
            assert all(o.replica_index == 0 for o in outcomes)
    asyncio.run(main())


def test_cancelled_member_leaves_the_others_and_the_last_one_out_cancels_the_call():
    async def main():
        replica = FakeReplica(hold=True)
        c = Coalescer(replica, max_tokens=100)
        tasks = [asyncio.create_task(c.submit(batch([i, 3]), EncodeOptions(), str(i)))
                 for i in range(1, 4)]
        await asyncio.sleep(0.01)
        assert len(replica.calls) == 1
        tasks[0].cancel()
        await asyncio.sleep(0.01)
        assert replica.cancelled == 0          # two members still wait for it
        replica.release.set()
        got = await asyncio.gather(*tasks[1:])
        np.testing.assert_array_equal(got[0].as_float32(), rows_for(batch([2, 3])))
        with pytest.raises(asyncio.CancelledError):
            await tasks[0]

        replica2 = FakeReplica(hold=True)
        c2 = Coalescer(replica2, max_tokens=100)
        tasks = [asyncio.create_task(c2.submit(batch([i, 3]), EncodeOptions(), str(i)))
                 for i in range(1, 3)]
        await asyncio.sleep(0.01)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0.01)
        assert replica2.cancelled == 1         # nobody wanted the answer: the call was cancelled
    asyncio.run(main())


def test_abort_fails_one_member_only():
    async def main():
        replica = FakeReplica(hold=True)
        c = Coalescer(replica, max_tokens=100)
        tasks = [asyncio.create_task(c.submit(batch([i, 3]), EncodeOptions(), f"id{i}"))
                 for i in range(1, 3)]
        await asyncio.sleep(0.01)
        assert c.abort("id1") and not c.abort("unknown")
        replica.release.set()
        first, second = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(first, FloeCancelled) and first.kind == ErrorKind.CANCELLED
        np.testing.assert_array_equal(second.as_float32(), rows_for(batch([2, 3])))
    asyncio.run(main())


def test_split_keeps_bytes_and_counts():
    arr = np.arange(5 * DIM, dtype=np.float32).reshape(5, DIM)
    whole = EmbedResult.from_array(arr, "bfloat16", [1, 2, 3, 4, 5])
    parts = split(whole, [2, 0, 3])
    assert [p.n for p in parts] == [2, 0, 3]
    assert b"".join(p.data for p in parts) == whole.data
    np.testing.assert_array_equal(parts[2].token_counts, [3, 4, 5])


def test_a_merged_call_holds_at_most_one_forward_pass():
    async def main():
        replica = FakeReplica()
        c = Coalescer(replica, max_tokens=1000, max_items=3)
        await asyncio.gather(*(c.submit(batch([i]), EncodeOptions(), str(i)) for i in range(1, 8)))
        assert sorted(t.n for t, _, _ in replica.calls) == [1, 3, 3]
        alone = FakeReplica()
        await asyncio.gather(*(Coalescer(alone, 1000, max_items=1).submit(batch([i]), EncodeOptions(), str(i))
                               for i in range(1, 4)))
        assert [t.n for t, _, _ in alone.calls] == [1, 1, 1]
    asyncio.run(main())


def test_merge_limits_follow_the_batch_settings():
    from floe.config import BatchSettings, ReplicaSetSettings, Settings
    from floe.fleet.replica_client import coalesce_limits

    s = Settings(batch=BatchSettings(max_batch_tokens=2048, max_batch_size=1),
                 replicas=ReplicaSetSettings(coalesce_tokens=4096))
    assert coalesce_limits(s) == {"coalesce_tokens": 2048, "coalesce_items": 1}
    s = Settings(replicas=ReplicaSetSettings(coalesce_tokens=1000))
    assert coalesce_limits(s) == {"coalesce_tokens": 1000, "coalesce_items": 256}
