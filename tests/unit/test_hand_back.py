"""Handing back: a replica gives queued rows it has not started to an idle one (floe/fleet/router.py).

The scheduler's take (last items first, within the tokens asked), the balancer's choice of donor
(pure), and a real replica core: what it gives, that its answer leaves exactly those rows out,
that a batch prepared but not started is shared too, and what it never gives.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from floe.fleet.balance import Balancer, ReplicaLoad
from floe.protocol import EmbedResult, EncodeOptions, Spans, TokenBatch
from floe.replica.scheduler import Scheduler, Sequence
from tests.unit.test_replica_core import expected_rows, make_core  # noqa: F401 - the fixture


# --- the scheduler ----------------------------------------------------------------------------

def queue(lengths_by_request: dict) -> Scheduler:
    s = Scheduler(4096, 256, 0.0)
    for key, lengths in lengths_by_request.items():
        s.add_many(Sequence(request_key=key, index=i, length=n, arrival=0.0)
                   for i, n in enumerate(lengths))
    return s


def test_take_request_takes_the_last_items_that_fit():
    s = queue({"a": [10, 10, 10, 10], "b": [5]})
    taken = s.take_request("a", 25)
    assert sorted(q.index for q in taken) == [2, 3]
    assert s.queued_tokens == 25 and s.queued_sequences == 3
    # an item too long for what is left is skipped, a shorter earlier one still fits
    s = queue({"a": [4, 30, 30]})
    assert sorted(q.index for q in s.take_request("a", 34)) == [0, 2]
    assert s.take_request("nobody", 100) == []
    # what is left is still batched as before
    batch = s.next_batch(now=10.0)
    assert [q.index for q in batch] == [1]


def test_a_requeued_batch_is_formed_again_without_counting_as_company():
    s = queue({"a": [8, 8]})
    batch = s.next_batch(now=10.0)
    assert len(batch) == 2 and len(s) == 0
    starts, company = s.idle_starts, s.company_starts
    s.requeue(batch)
    assert (s.idle_starts, s.company_starts) == (starts, company)
    assert s.queued_tokens == 16
    assert sorted(q.index for q in s.next_batch(now=10.0)) == [0, 1]


# --- the balancer -----------------------------------------------------------------------------

def loads(*tokens, requests=None, healthy=None):
    return [ReplicaLoad(i, True if healthy is None else healthy[i], t,
                        (1 if t else 0) if requests is None else requests[i])
            for i, t in enumerate(tokens)]


def test_the_busiest_replica_gives_half_its_work_to_an_idle_one():
    assert Balancer().donor(loads(0, 3000, 5000), 0, 512) == (2, 2500)
    assert Balancer().donor(loads(3000, 0), 1, 512) == (0, 1500)


def test_no_hand_back_unless_idle_and_worth_it():
    assert Balancer().donor(loads(10, 3000), 0, 512) is None        # not idle
    assert Balancer().donor(loads(0, 3000, requests=[1, 1]), 0, 512) is None   # a call in flight
    assert Balancer().donor(loads(0, 1000), 0, 512) is None         # under twice the minimum
    assert Balancer().donor(loads(0, 3000), 0, 0) is None           # turned off
    assert Balancer().donor(loads(0, 3000, healthy=[True, False]), 0, 512) is None
    assert Balancer().donor(loads(0, 3000, healthy=[False, True]), 0, 512) is None
    assert Balancer().donor(loads(0), 0, 512) is None
    assert Balancer("round_robin").donor(loads(0, 3000), 0, 512) is None


# --- a replica core ---------------------------------------------------------------------------

ITEM = [101] + list(range(20, 28)) + [102]   # 10 tokens


def items(k: int) -> list[list[int]]:
    return [[101, 30 + i] + ITEM[1:-1] for i in range(k)]   # 10 tokens each, all different


async def until(cond, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)


async def held(make_core, k: int = 8):
    """A core whose engine holds its first batch (request "a") while request "b" of ``k``
    10-token items waits: for 8, one batch of it prepared in the slot and the rest queued; for
    fewer, all queued (a partial batch waits for company while the engine is busy)."""
    core, engine = make_core(max_batch_tokens=64, batch_timeout_ms=0.0)
    engine.gate.clear()
    a = asyncio.ensure_future(core.submit(TokenBatch.from_lists([ITEM]), EncodeOptions(), "a"))
    await until(lambda: any(e[0] == "run_start" for e in engine.events))
    b_items = items(k)
    b = asyncio.ensure_future(core.submit(TokenBatch.from_lists(b_items), EncodeOptions(), "b"))
    if k == 8:
        await until(lambda: sum(e[0] == "prepare" for e in engine.events) == 2)
    await asyncio.sleep(0.05)   # the prepared batch reaches the slot
    return core, engine, a, b, b_items


async def test_a_replica_hands_back_unstarted_rows_and_answers_without_them(make_core):
    core, engine, a, b, b_items = await held(make_core)
    # 80 tokens of "b" wait (60 prepared, 20 queued): half of them, its last items first
    given = await core.hand_back(["b"], max_tokens=1000, min_tokens=1)
    assert [(rid, it.tolist()) for rid, it in given] == [("b", [4, 5, 6, 7])]
    engine.gate.set()
    ra, rb = await a, await b
    assert ra.n == 1 and ra.handed_back is None
    assert rb.n == 4 and rb.handed_back.tolist() == [4, 5, 6, 7]
    assert rb.token_counts.tolist() == [10] * 4
    np.testing.assert_allclose(rb.as_float32(), expected_rows(engine, b_items[:4]),
                               rtol=1e-6, atol=1e-6)
    # the rows handed back were never computed here
    computed = [row for batch in engine.batches for row in batch]
    assert not any(row in computed for row in b_items[4:])
    assert core.stats().queued_tokens == 0 and core.stats().queued_sequences == 0


async def test_a_request_handed_back_whole_is_answered_empty(make_core):
    core, engine, a, b, b_items = await held(make_core, k=2)
    given = await core.hand_back(["b"], max_tokens=1000, min_tokens=1)
    assert [(rid, it.tolist()) for rid, it in given] == [("b", [1])]   # half of 20 tokens
    c = asyncio.ensure_future(core.submit(TokenBatch.from_lists(items(2)), EncodeOptions(), "c"))
    await asyncio.sleep(0.05)
    given = await core.hand_back(["c"], max_tokens=1000, min_tokens=1)
    assert [(rid, it.tolist()) for rid, it in given] == [("c", [1])]
    engine.gate.set()
    rb, rc = await b, await c
    assert (rb.n, rb.handed_back.tolist()) == (1, [1])
    assert (rc.n, rc.handed_back.tolist()) == (1, [1])
    await a


async def test_nothing_is_given_under_the_minimum_or_from_calls_not_named(make_core):
    core, engine, a, b, b_items = await held(make_core)
    assert await core.hand_back(["b"], max_tokens=1000, min_tokens=41) == []   # 40 to give
    assert await core.hand_back(["a", "nobody"], max_tokens=1000, min_tokens=1) == []
    assert await core.hand_back(["b"], max_tokens=5, min_tokens=1) == []   # no item that small
    engine.gate.set()
    rb = await b
    assert rb.n == 8 and rb.handed_back is None
    np.testing.assert_allclose(rb.as_float32(), expected_rows(engine, b_items), rtol=1e-6, atol=1e-6)
    await a


async def test_late_chunking_keeps_its_rows(make_core):
    core, engine = make_core(max_batch_tokens=64, batch_timeout_ms=0.0)
    engine.gate.clear()
    a = asyncio.ensure_future(core.submit(TokenBatch.from_lists([ITEM]), EncodeOptions(), "a"))
    await until(lambda: any(e[0] == "run_start" for e in engine.events))
    tb = TokenBatch.from_lists(items(8))
    tb = TokenBatch(tb.ids, tb.lengths, spans=Spans(counts=np.ones(8, dtype=np.int64),
                                                    bounds=np.tile([0, 10], 8)))
    s = asyncio.ensure_future(core.submit(tb, EncodeOptions(), "s"))
    await asyncio.sleep(0.05)
    before = core.stats().queued_sequences
    assert await core.hand_back(["s"], max_tokens=1000, min_tokens=1) == []
    assert core.stats().queued_sequences == before > 0
    engine.gate.set()
    # (this test's engine does not run late chunking: the request's own outcome is not the point)
    await asyncio.gather(s, return_exceptions=True)
    assert (await a).n == 1


@pytest.mark.parametrize("when", ["dropped", "answered"])
async def test_a_request_gone_gives_nothing(make_core, when):
    core, engine, a, b, _ = await held(make_core)
    if when == "dropped":
        b.cancel()
        await asyncio.sleep(0.05)
    else:
        engine.gate.set()
        await b
    assert await core.hand_back(["b"], max_tokens=1000, min_tokens=1) == []
    engine.gate.set()
    await a


# --- the front end's join (floe/fleet/replica_client.py) ---------------------------------------

def answer(tokens: TokenBatch, request_id: str, keep=None) -> EmbedResult:
    """Each item's row: its first id, twice."""
    firsts = tokens.ids[tokens.offsets()[:-1]].astype(np.float32)
    rows = np.stack([firsts, firsts], axis=1)
    counts = tokens.lengths
    handed = None
    if keep is not None:
        handed = np.setdiff1d(np.arange(tokens.n), keep)
        rows, counts = rows[keep], counts[keep]
    return EmbedResult.from_array(rows, "float32", counts, request_id=request_id, handed_back=handed)


def test_a_handed_back_answer_interleaves_into_item_order():
    from floe.fleet.replica_client import interleave

    full = np.arange(5 * 3, dtype=np.float32).reshape(5, 3)
    counts = np.array([10, 11, 12, 13, 14])
    rest_items = np.array([1, 4])
    kept_items = np.array([0, 2, 3])
    kept = EmbedResult.from_array(full[kept_items], "bfloat16", counts[kept_items],
                                  handed_back=rest_items)
    rest = EmbedResult.from_array(full[rest_items], "bfloat16", counts[rest_items])
    joined = interleave(kept, rest, rest_items)
    assert joined.handed_back is None
    assert joined.n == 5 and joined.token_counts.tolist() == counts.tolist()
    assert joined.data == EmbedResult.from_array(full, "bfloat16", counts).data
    with pytest.raises(ValueError, match="does not fit"):
        interleave(kept, rest, np.array([1]))   # rows and items disagree
    with pytest.raises(ValueError, match="does not fit"):
        interleave(kept, rest, np.array([1, 5]))   # an item past the call


class HandingLink:
    """A replica's link whose calls wait for ``release``; ``hand_back`` gives the last ``give``
    items of the newest call it is asked about (or, ``lost``, takes them but its answer is lost)."""

    def __init__(self, give: int = 2, lost: bool = False) -> None:
        self.give, self.lost = give, lost
        self.release = asyncio.Event()
        self.handed: dict[str, np.ndarray] = {}
        self.calls: list[tuple[str, list[int]]] = []   # (request id, first ids) per call
        self.closed = False

    async def encode(self, request_id, tokens, options, timeout):
        self.calls.append((request_id, tokens.ids[tokens.offsets()[:-1]].tolist()))
        if not request_id.endswith("/back"):
            await self.release.wait()
        given = self.handed.get(request_id)
        keep = None if given is None else np.setdiff1d(np.arange(tokens.n), given)
        return answer(tokens, request_id, keep)

    async def hand_back(self, request_ids, max_tokens, min_tokens, timeout):
        from floe.fleet.link import ReplicaTimeout

        rid = request_ids[0]
        n = next(len(ids) for r, ids in self.calls if r == rid)
        self.handed[rid] = np.arange(n - self.give, n)
        if self.lost:
            raise ReplicaTimeout("no answer", 0)
        return [(rid, self.handed[rid])]


def client_with(link):
    from floe.fleet.replica_client import ReplicaClient

    return ReplicaClient("unix:/nowhere", 0, link=link)


TEN = TokenBatch.from_lists([[100 + i, 7, 7] for i in range(10)])


@pytest.mark.parametrize("rehome_fails", [False, True])
async def test_the_client_joins_the_rows_computed_elsewhere_in_item_order(rehome_fails):
    from floe.errors import OverloadedError

    link = HandingLink(give=3)
    client = client_with(link)
    elsewhere = []

    async def rehome(tokens, options, request_id, timeout):
        elsewhere.append(request_id)
        if rehome_fails:
            raise OverloadedError("the other replica refused", retry_after=1.0)
        return answer(tokens, request_id)

    call = asyncio.ensure_future(client.encode(TEN, EncodeOptions(), "r"))
    await asyncio.sleep(0.01)
    assert await client.hand_back(1000, 1, rehome) == 3
    link.release.set()
    result = await call
    assert result.handed_back is None
    np.testing.assert_array_equal(result.as_float32()[:, 0], np.arange(100, 110))
    assert result.token_counts.tolist() == [3] * 10
    assert elsewhere == ["r/rest"]
    # the other replica's refusal sends the rows back here, in a call of their own
    assert [c[0] for c in link.calls] == (["r", "r/back"] if rehome_fails else ["r"])
    assert client.in_flight_requests == 0 and client.in_flight_tokens == 0


async def test_rows_handed_back_whose_answer_was_lost_go_back_to_the_same_replica():
    link = HandingLink(give=4, lost=True)
    client = client_with(link)

    async def rehome(tokens, options, request_id, timeout):
        raise AssertionError("nothing is known to have been handed back")

    call = asyncio.ensure_future(client.encode(TEN, EncodeOptions(), "r"))
    await asyncio.sleep(0.01)
    with pytest.raises(Exception, match="no answer"):
        await client.hand_back(1000, 1, rehome)
    link.release.set()
    result = await call
    np.testing.assert_array_equal(result.as_float32()[:, 0], np.arange(100, 110))
    assert [c for c in link.calls if c[0] == "r/back"] == [("r/back", [106, 107, 108, 109])]


async def test_a_call_is_named_in_one_hand_back_only_and_withdrawn_with_its_rest():
    link = HandingLink(give=2)
    client = client_with(link)
    started = asyncio.Event()

    async def rehome(tokens, options, request_id, timeout):
        started.set()
        await asyncio.sleep(60)

    call = asyncio.ensure_future(client.encode(TEN, EncodeOptions(), "r"))
    await asyncio.sleep(0.01)
    assert await client.hand_back(1000, 1, rehome) == 2
    assert await client.hand_back(1000, 1, rehome) == 0   # nothing left to name
    await started.wait()
    rest = client._calls["r"].rest
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await asyncio.sleep(0)
    assert rest.cancelled() or rest.done()
    assert client._calls == {}


async def test_rows_that_crash_the_model_elsewhere_make_the_call_a_crash_suspect():
    from floe.errors import PoisonInputError
    from floe.fleet.link import ReplicaLost

    link = HandingLink(give=2)
    client = client_with(link)

    async def rehome(tokens, options, request_id, timeout):
        raise PoisonInputError("the input made the model's process exit on two replicas")

    call = asyncio.ensure_future(client.encode(TEN, EncodeOptions(), "r"))
    await asyncio.sleep(0.01)
    assert await client.hand_back(1000, 1, rehome) == 2
    link.release.set()
    # not the poison answer for every request of the call: the router retries each alone
    with pytest.raises(ReplicaLost, match="crashed the model"):
        await call
    assert [c[0] for c in link.calls] == ["r"]


async def test_an_id_two_live_requests_share_gives_nothing_and_a_stopping_core_neither(make_core):
    # a client may send its own request id twice: which request a hand-back named is unknown
    core, engine, a, b, b_items = await held(make_core)
    twin = asyncio.ensure_future(core.submit(TokenBatch.from_lists(items(8)), EncodeOptions(), "b"))
    await asyncio.sleep(0.05)
    assert await core.hand_back(["b"], max_tokens=1000, min_tokens=1) == []
    engine.gate.set()
    assert (await b).n == 8 and (await twin).n == 8
    await a
    core.stop(drain_timeout=0.0)
    assert await core.hand_back(["b"], max_tokens=1000, min_tokens=1) == []


async def test_rows_left_out_of_a_call_this_client_never_named_are_computed_here():
    # another call with the same id was in flight: the replica's answer still comes back whole
    link = HandingLink(give=3)
    client = client_with(link)

    async def rehome(tokens, options, request_id, timeout):
        raise AssertionError("not named: nothing goes elsewhere")

    first = asyncio.ensure_future(client.encode(TEN, EncodeOptions(), "r"))
    await asyncio.sleep(0.01)
    second = asyncio.ensure_future(client.encode(TEN, EncodeOptions(), "r", alone=True))
    await asyncio.sleep(0.01)
    link.handed["r"] = np.array([7, 8, 9])   # the replica took the twin's rows, unasked
    link.release.set()
    for result in await asyncio.gather(first, second):
        np.testing.assert_array_equal(result.as_float32()[:, 0], np.arange(100, 110))
    assert ("r/back", [107, 108, 109]) in link.calls
