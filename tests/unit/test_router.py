"""The router with fake replica clients: what is retried, what is not, and what the client sees."""

from __future__ import annotations

import asyncio
from typing import Optional

import numpy as np
import pytest

from floe.errors import (InternalError, OverloadedError, PoisonInputError, TooLargeError,
                         UnavailableError, ValidationError)
from floe.protocol import EmbedResult, EncodeOptions, TokenBatch
from floe.fleet.balance import Balancer, ReplicaLoad
from floe.fleet.link import ReplicaDraining, ReplicaLost, ReplicaTimeout
from floe.fleet.router import Router

TOKENS = TokenBatch.from_lists([[1, 2, 3]])


class FakeClient:
    def __init__(self, index: int, outcome) -> None:
        self.index, self.outcome, self.calls = index, outcome, 0
        self.address = f"unix:/private/replica-{index}.sock"
        self.alone: list[bool] = []   # per call: sent alone (never merged)?

    async def encode(self, tokens, options, request_id, timeout=None, alone=False):
        self.calls += 1
        self.alone.append(alone)
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return EmbedResult.from_array(np.ones((tokens.n, 4), np.float32), "float32", tokens.lengths)

    async def abort(self, request_id):
        return True


class FakeTarget:
    def __init__(self, index: int, outcome, dies: bool = False) -> None:
        self.index = index
        self.client: Optional[FakeClient] = FakeClient(index, outcome)
        self.healthy = True
        self.dies = dies
        self.recoverable = True   # False: given up, never back in rotation

    def load(self) -> ReplicaLoad:
        return ReplicaLoad(self.index, self.healthy)

    def leave_rotation(self) -> None:
        self.healthy = False

    def may_recover(self) -> bool:
        return self.recoverable

    async def crashed_under(self, client, seconds: float) -> bool:
        return self.dies


def run(router: Router):
    return asyncio.run(router.encode(TOKENS, EncodeOptions(), "r1"))


def router(*targets, replica_wait: float = 0.0) -> Router:
    return Router(Balancer("round_robin"), list(targets), forward_timeout=5.0,
                  replica_wait=replica_wait)


def test_replica_failure_is_retried_once_elsewhere():
    bad = FakeTarget(0, ReplicaLost("replica 0 (unix:/x) unavailable", 0))
    good = FakeTarget(1, None)
    r = router(bad, good)
    assert run(r).n == 1
    assert bad.client.calls == 1 and good.client.calls == 1 and r.retried == 1
    assert not bad.healthy  # out of rotation until its next good probe


def test_two_failures_give_503_without_addresses():
    a = FakeTarget(0, ReplicaLost("replica 0 (unix:/a) unavailable", 0))
    b = FakeTarget(1, ReplicaDraining("replica 1 (127.0.0.1:50101) unavailable", 1))
    with pytest.raises(UnavailableError) as e:
        run(router(a, b))
    assert "unix:" not in e.value.message and "127.0.0.1" not in e.value.message
    assert e.value.retry_after


def test_timeout_is_503_and_not_retried():
    slow = FakeTarget(0, ReplicaTimeout("replica 0 (unix:/a) did not answer within 5 s", 0))
    other = FakeTarget(1, None)
    with pytest.raises(UnavailableError) as e:
        run(router(slow, other))
    assert other.client.calls == 0
    assert e.value.retry_after and "unix:" not in e.value.message
    assert "crash" not in e.value.message


@pytest.mark.parametrize("err", [TooLargeError("too many tokens"), ValidationError("bad")])
def test_request_errors_are_the_answer(err):
    a, b = FakeTarget(0, err), FakeTarget(1, None)
    with pytest.raises(type(err)):
        run(router(a, b))
    assert b.client.calls == 0


def test_overloaded_replica_is_retried_elsewhere():
    full = FakeTarget(0, OverloadedError("queue full", retry_after=2.0))
    good = FakeTarget(1, None)
    assert run(router(full, good)).n == 1
    both = router(FakeTarget(0, OverloadedError("full", retry_after=2.0)),
                  FakeTarget(1, OverloadedError("full", retry_after=2.0)))
    with pytest.raises(OverloadedError) as e:
        run(both)
    assert e.value.retry_after == 2.0


def test_internal_error_retried_only_when_the_replica_died():
    lived = FakeTarget(0, InternalError("inference failed for this batch"))
    other = FakeTarget(1, None)
    with pytest.raises(InternalError):
        run(router(lived, other))
    assert other.client.calls == 0
    died = FakeTarget(0, InternalError("x"), dies=True)
    assert run(router(died, FakeTarget(1, None))).n == 1



@pytest.mark.parametrize("first,second", [
    (InternalError("x"), InternalError("x")),
    (ReplicaLost("replica 0 lost", 0), ReplicaLost("replica 1 lost", 1)),
])
def test_an_input_that_crashes_two_replicas_is_refused_and_remembered(first, second):
    a, b = FakeTarget(0, first, dies=True), FakeTarget(1, second, dies=True)
    r = router(a, b)
    with pytest.raises(PoisonInputError) as e:
        run(r)
    err = e.value
    assert errors_http(err) == 422 and err.retry_after is None and err.param == "input"
    assert "made the model's process exit on two replicas" in err.message and "unix:" not in err.message
    assert a.client.alone == [False] and b.client.alone == [True]   # the retry went alone
    # the same input again: refused before any replica sees it
    calls = a.client.calls + b.client.calls
    with pytest.raises(PoisonInputError, match="refused without being sent again"):
        run(r)
    assert a.client.calls + b.client.calls == calls and r.poisoned == 2
    # another input still goes through (the replicas came back)
    a.client.outcome = b.client.outcome = None
    a.healthy = b.healthy = True   # their next good probes
    other = TokenBatch.from_lists([[4, 5]])
    assert asyncio.run(r.encode(other, EncodeOptions(), "r2")).n == 1


def test_a_lost_replica_that_did_not_crash_is_no_suspect():
    # stopped or drained (not a crash): retried, merged as usual, nobody is blamed
    a, b = FakeTarget(0, ReplicaLost("replica 0 lost", 0)), FakeTarget(1, None)
    assert run(router(a, b)).n == 1 and b.client.alone == [False]


def test_crash_suspects_retry_one_at_a_time():
    # every request on a crashed replica is a suspect; their retries are serialized, so that a
    # second crash is pinned on one of them only
    class Slow(FakeClient):
        live = peak = 0

        async def encode(self, tokens, options, request_id, timeout=None, alone=False):
            Slow.live += alone
            Slow.peak = max(Slow.peak, Slow.live)
            await asyncio.sleep(0.02)
            Slow.live -= alone
            return await super().encode(tokens, options, request_id, timeout, alone)

    class Crashing(FakeClient):
        async def encode(self, *a, **kw):
            await asyncio.sleep(0.01)   # several requests are on it when it goes
            return await super().encode(*a, **kw)

    crashed = FakeTarget(0, ReplicaLost("replica 0 lost", 0), dies=True)
    crashed.client = Crashing(0, ReplicaLost("replica 0 lost", 0))
    good = FakeTarget(1, None)
    good.client = Slow(1, None)
    r = router(crashed, good)

    async def burst():
        return await asyncio.gather(*(r.encode(TokenBatch.from_lists([[i + 1]]), EncodeOptions(),
                                               f"q{i}") for i in range(6)))

    crashed.recoverable = True
    results = asyncio.run(burst())
    assert all(x.n == 1 for x in results) and Slow.peak == 1
    assert good.client.alone.count(True) == crashed.client.calls >= 2   # every suspect, alone


def errors_http(err) -> int:
    from floe.errors import HTTP_STATUS
    return HTTP_STATUS[err.kind]


def test_no_healthy_replica():
    t = FakeTarget(0, None)
    t.healthy = False
    with pytest.raises(UnavailableError):
        run(router(t))


def test_no_healthy_replica_waits_for_one_that_comes_back():
    t = FakeTarget(0, None)
    t.healthy = False

    async def scenario():
        async def back_later():
            await asyncio.sleep(0.3)
            t.healthy = True
        asyncio.get_running_loop().create_task(back_later())
        return await router(t, replica_wait=5.0).encode(TOKENS, EncodeOptions(), "r1")

    assert asyncio.run(scenario()).n == 1
    assert t.client.calls == 1


def test_the_wait_is_bounded_and_skipped_for_replicas_given_up():
    t = FakeTarget(0, None)
    t.healthy = False

    async def timed(r: Router) -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(UnavailableError):
            await r.encode(TOKENS, EncodeOptions(), "r1")
        return loop.time() - start

    assert 0.3 <= asyncio.run(timed(router(t, replica_wait=0.3))) < 3.0
    t.recoverable = False
    assert asyncio.run(timed(router(t, replica_wait=30.0))) < 1.0
    assert t.client.calls == 0


def test_a_single_replica_takes_the_retry_once_back_in_rotation():
    # a failed connection takes the only replica out of rotation; its next good probe puts it
    # back, and the retry goes to it rather than failing with no replica to go to
    t = FakeTarget(0, ReplicaLost("replica 0 (unix:/a) unavailable", 0))

    async def scenario():
        async def probed_healthy():
            while t.healthy:
                await asyncio.sleep(0.01)
            t.client.outcome = None
            await asyncio.sleep(0.2)
            t.healthy = True
        asyncio.get_running_loop().create_task(probed_healthy())
        r = router(t, replica_wait=5.0)
        return r, await r.encode(TOKENS, EncodeOptions(), "r1")

    r, result = asyncio.run(scenario())
    assert result.n == 1 and t.client.calls == 2 and r.retried == 1


def test_an_overloaded_replica_is_not_retried_on_itself():
    t = FakeTarget(0, OverloadedError("queue full", retry_after=2.0))
    with pytest.raises(OverloadedError):
        run(router(t, replica_wait=5.0))
    assert t.client.calls == 1


def test_while_every_replica_refused_a_request_like_it_the_next_is_refused_without_a_trip(monkeypatch):
    from floe.fleet import router as router_module

    clock = [100.0]
    monkeypatch.setattr(router_module.time, "monotonic", lambda: clock[0])
    a = FakeTarget(0, OverloadedError("past the target", retry_after=0.5))
    b = FakeTarget(1, OverloadedError("past the target", retry_after=0.8))
    r = router(a, b)
    assert r.early_refusal() is None          # nothing refused yet: try the replicas
    with pytest.raises(OverloadedError) as e:
        run(r)
    assert e.value.retry_after == 0.5 and a.client.calls == b.client.calls == 1
    early = r.early_refusal()                 # both refused: the next waits for the sooner
    assert isinstance(early, OverloadedError) and early.retry_after == pytest.approx(0.5)
    assert r.early_refused == 1 and r.status([], True, False)["early_refused_requests"] == 1
    clock[0] += 0.6                           # replica 0's Retry-After has passed
    assert r.early_refusal() is None
    a.client.outcome = None                   # and it admits: its mark is cleared
    assert run(r).n == 1
    clock[0] -= 0.6
    assert r.early_refusal() is None          # one replica with room is enough
    # an unhealthy replica's mark does not keep requests away from a healthy one
    b.healthy = False
    assert r.early_refusal() is None


def test_a_refusal_for_a_requests_own_deadline_marks_nothing():
    from floe.protocol import deadline_after

    a = FakeTarget(0, OverloadedError("past its deadline", retry_after=3.0))
    r = router(a)
    with pytest.raises(OverloadedError):
        asyncio.run(r.encode(TOKENS, EncodeOptions(deadline=deadline_after(0.1)), "d"))
    assert r.early_refusal() is None   # a request without that deadline may well fit
