"""A request cut across replicas: the balancer's water-filling (pure) and the router's parts
(fake replicas): answered in item order as one, failures keep their kind, aborts reach each part."""

from __future__ import annotations

import asyncio
import random
from typing import Optional

import numpy as np
import pytest

from floe.config import settings_from
from floe.errors import ConfigError, OverloadedError, PoisonInputError, ValidationError
from floe.fleet.balance import Balancer, ReplicaLoad
from floe.fleet.link import ReplicaLost
from floe.fleet.router import Router
from floe.protocol import EmbedResult, EncodeOptions, SparseRows, Spans, TokenBatch


def loads(*tokens, healthy=None):
    return [ReplicaLoad(i, True if healthy is None else healthy[i], t) for i, t in enumerate(tokens)]


def covers(parts, n):
    """The parts are consecutive, non-empty and cover every item once."""
    ends = [0]
    for _, a, b in parts:
        assert a == ends[-1] and b > a
        ends.append(b)
    return ends[-1] == n


# --- the balancer's cut ---------------------------------------------------------------------------

def test_an_idle_fleet_shares_a_large_request_evenly():
    parts = Balancer().spread(loads(0, 0), [17] * 512, 256)
    assert covers(parts, 512)
    assert sorted(r for r, _, _ in parts) == [0, 1]
    assert [b - a for _, a, b in parts] == [256, 256]


def test_water_filling_gives_the_busier_replica_less():
    parts = Balancer().spread(loads(1000, 0), [10] * 300, 256)
    share = {r: sum(10 for _ in range(a, b)) for r, a, b in parts}
    # level (3000 + 1000) / 2 = 2000: 1000 more for replica 0, 2000 for replica 1
    assert share == {0: 1000, 1: 2000}


def test_under_steady_load_requests_stay_whole():
    # every replica holds more than the request: each stays busy whether it is cut or not
    assert Balancer().spread(loads(20000, 20400), [17] * 16, 256) == []
    assert Balancer().spread(loads(20000, 20000), [17] * 16, 256) == []
    assert Balancer().spread(loads(12000, 12100), [50] * 16, 256) == []   # 800 tokens
    assert Balancer().spread(loads(9000, 9000), [136] * 16, 256) == []    # 2,176 tokens
    # a request larger than what the least-loaded replica holds is still cut
    assert Balancer().spread(loads(1500, 1600), [136] * 16, 256) != []


def test_a_busy_replica_takes_no_part():
    parts = Balancer().spread(loads(0, 0, 50000), [100] * 40, 256)
    assert covers(parts, 40) and {r for r, _, _ in parts} == {0, 1}


def test_small_requests_single_inputs_and_other_policies_stay_whole():
    assert Balancer().spread(loads(0, 0), [100, 100, 100], 256) == []     # 150 each: too small
    assert Balancer().spread(loads(0, 0), [5000], 256) == []              # one input
    assert Balancer().spread(loads(0, 0), [100] * 100, 0) == []           # turned off
    assert Balancer("round_robin").spread(loads(0, 0), [100] * 100, 256) == []
    assert Balancer("random").spread(loads(0, 0), [100] * 100, 256) == []


def test_unhealthy_replicas_take_no_part():
    assert Balancer().spread(loads(0, 0, healthy=[True, False]), [100] * 100, 256) == []
    parts = Balancer().spread(loads(0, 0, 0, healthy=[True, False, True]), [100] * 100, 256)
    assert {r for r, _, _ in parts} == {0, 2}


def test_a_part_left_small_by_one_long_input_joins_its_neighbour():
    assert Balancer().spread(loads(0, 0), [1000, 10], 256) == []
    parts = Balancer().spread(loads(0, 0, 0), [600, 600, 20], 256)
    assert covers(parts, 3) and len(parts) == 2
    assert all(sum([600, 600, 20][a:b]) >= 256 for _, a, b in parts)


@pytest.mark.parametrize("seed", range(40))
def test_random_cuts_hold_their_invariants(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 300)
    lengths = [rng.randint(1, 512) for _ in range(n)]
    fleet = [ReplicaLoad(i, rng.random() > 0.2, rng.choice([0, 0, rng.randint(0, 20000)]))
             for i in range(rng.randint(1, 5))]
    floor = rng.choice([1, 64, 256, 1024])
    parts = Balancer().spread(fleet, lengths, floor)
    if not parts:
        return
    assert covers(parts, n) and len(parts) >= 2
    replicas = [r for r, _, _ in parts]
    assert len(set(replicas)) == len(replicas)                        # one part per replica
    assert all(fleet[r].healthy for r in replicas)
    assert all(sum(lengths[a:b]) >= floor for _, a, b in parts)


# --- the data: a part of a batch, the answers joined ------------------------------------------------

def test_take_keeps_type_splits_and_spans_with_their_items():
    tb = TokenBatch(ids=np.arange(10), lengths=[3, 3, 4], type_splits=[1, 3, 2],
                    spans=Spans(counts=[1, 2, 1], bounds=[[0, 3], [0, 1], [1, 3], [0, 4]]))
    part = tb.take(1, 3)
    assert part.ids.tolist() == list(range(3, 10)) and part.lengths.tolist() == [3, 4]
    assert part.type_splits.tolist() == [3, 2]
    assert part.spans.counts.tolist() == [2, 1]
    assert part.spans.bounds.tolist() == [[0, 1], [1, 3], [0, 4]]


def test_concat_is_the_inverse_of_a_cut():
    arr = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    whole = EmbedResult.from_array(arr, "bfloat16", [1, 2, 3, 4, 5], model="m")
    parts = [EmbedResult.from_array(arr[:2], "bfloat16", [1, 2], model="m"),
             EmbedResult.from_array(arr[2:], "bfloat16", [3, 4, 5], model="m")]
    parts[1].timings.queue_s = 0.5
    joined = EmbedResult.concat(parts, "r")
    assert joined.data == whole.data and joined.token_counts.tolist() == [1, 2, 3, 4, 5]
    assert joined.request_id == "r" and joined.timings.queue_s == 0.5
    sparse = [EmbedResult(n=1, dim=9, dtype="float32", data=b"", token_counts=[2],
                          sparse=SparseRows(counts=[2], indices=[1, 4], values=[0.5, 1.0])),
              EmbedResult(n=2, dim=9, dtype="float32", data=b"", token_counts=[1, 1],
                          sparse=SparseRows(counts=[1, 0], indices=[8], values=[2.0]))]
    s = EmbedResult.concat(sparse).sparse
    assert s.counts.tolist() == [2, 1, 0] and s.indices.tolist() == [1, 4, 8]


def test_the_setting_is_validated():
    with pytest.raises(ConfigError, match="split-min-tokens"):
        settings_from(env={}, replicas={"split_min_tokens": -1})
    assert settings_from(env={}).replicas.split_min_tokens == 256


# --- the router's parts -----------------------------------------------------------------------------

class Replica:
    """A fake replica client: each row is its input's first token id; an optional outcome (an
    error to raise, or an event to wait on) for the first call."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.in_flight_tokens = 0
        self.seen: list[tuple[str, list[int]]] = []
        self.fail: Optional[Exception] = None
        self.hold: Optional[asyncio.Event] = None
        self.cancelled = 0
        self.aborted: list[str] = []

    async def encode(self, tokens, options, request_id, timeout=None, alone=False):
        self.seen.append((request_id, tokens.lengths.tolist()))
        self.in_flight_tokens += tokens.total_tokens
        try:
            if self.hold is not None:
                await self.hold.wait()
            if self.fail is not None:
                raise self.fail
            rows = np.array([[tokens.item(i)[0], i] for i in range(tokens.n)], np.float32)
            return EmbedResult.from_array(rows, "float32", tokens.lengths, model="m")
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_flight_tokens -= tokens.total_tokens

    async def abort(self, request_id):
        self.aborted.append(request_id)
        return True


class Target:
    def __init__(self, index: int) -> None:
        self.index = index
        self.client: Optional[Replica] = Replica(index)
        self.healthy = True

    def load(self) -> ReplicaLoad:
        return ReplicaLoad(self.index, self.healthy, self.client.in_flight_tokens if self.client else 0)

    def leave_rotation(self) -> None:
        self.healthy = False

    def may_recover(self) -> bool:
        return False

    async def crashed_under(self, client, seconds: float) -> bool:
        return False


def fleet(n=2, split=256):
    targets = [Target(i) for i in range(n)]
    return Router(Balancer("least_loaded"), targets, forward_timeout=5.0, replica_wait=0.0,
                  split_min_tokens=split), targets


def batch(n=64, length=20):
    return TokenBatch.from_lists([[1000 + i] + [7] * (length - 1) for i in range(n)])


def test_a_split_request_is_answered_in_item_order_on_every_replica():
    router, targets = fleet(3)
    tb = batch(90)
    out = asyncio.run(router.encode(tb, EncodeOptions(), "big"))
    assert out.n == 90 and out.request_id == "big"
    assert out.as_float32()[:, 0].tolist() == [1000 + i for i in range(90)]
    assert out.token_counts.tolist() == [20] * 90
    assert all(t.client.seen for t in targets) and router.split == 1
    assert sorted(rid for t in targets for rid, _ in t.client.seen) == ["big/0", "big/1", "big/2"]


def test_small_requests_and_a_disabled_split_go_whole():
    router, targets = fleet()
    asyncio.run(router.encode(batch(4), EncodeOptions(), "small"))
    router2, targets2 = fleet(split=0)
    asyncio.run(router2.encode(batch(90), EncodeOptions(), "big"))
    for ts in (targets, targets2):
        assert sorted(len(t.client.seen) for t in ts) == [0, 1]
    assert router.split == router2.split == 0


def test_a_failed_part_fails_the_request_with_its_kind_and_withdraws_the_others():
    router, targets = fleet()
    targets[0].client.fail = ValidationError("bad input", param="input")
    targets[1].client.hold = asyncio.Event()   # never set: its part is still running

    async def go():
        with pytest.raises(ValidationError, match="bad input"):
            await router.encode(batch(64), EncodeOptions(), "r")
    asyncio.run(go())
    assert targets[1].client.cancelled == 1 and targets[1].client.in_flight_tokens == 0
    assert router._parts == {} and router._routes == {}


def test_a_part_whose_replica_is_lost_is_retried_on_another():
    router, targets = fleet()
    targets[0].client.fail = ReplicaLost("replica 0 (unix:/x) unavailable", 0)
    out = asyncio.run(router.encode(batch(64), EncodeOptions(), "r"))
    assert out.as_float32()[:, 0].tolist() == [1000 + i for i in range(64)]
    assert router.retried == 1 and not targets[0].healthy
    assert len(targets[1].client.seen) == 2   # its own part and the retried one


def test_an_overloaded_part_refuses_the_whole_request():
    router, targets = fleet()
    for t in targets:
        t.client.fail = OverloadedError("queue full", retry_after=2.0)
    with pytest.raises(OverloadedError):
        asyncio.run(router.encode(batch(64), EncodeOptions(), "r"))


def test_an_abort_reaches_every_part():
    router, targets = fleet()
    for t in targets:
        t.client.hold = asyncio.Event()

    async def go():
        task = asyncio.create_task(router.encode(batch(64), EncodeOptions(), "r"))
        while sum(len(t.client.seen) for t in targets) < 2:
            await asyncio.sleep(0)
        assert await router.abort("r")
        task.cancel()   # the caller goes away, as the front end's request does
        with pytest.raises(asyncio.CancelledError):
            await task
    asyncio.run(go())
    assert sorted(a for t in targets for a in t.client.aborted) == ["r/0", "r/1"]
    assert all(t.client.cancelled == 1 and t.client.in_flight_tokens == 0 for t in targets)


def test_a_poisoned_part_makes_the_whole_request_refused_when_sent_again():
    router, targets = fleet()
    targets[0].client.fail = PoisonInputError("it crashed twice", param="input")
    tb = batch(64)
    with pytest.raises(PoisonInputError):
        asyncio.run(router.encode(tb, EncodeOptions(), "r"))
    targets[0].client.fail = None
    calls = sum(len(t.client.seen) for t in targets)
    with pytest.raises(PoisonInputError, match="refused without being sent again"):
        asyncio.run(router.encode(tb, EncodeOptions(), "again"))
    assert sum(len(t.client.seen) for t in targets) == calls
