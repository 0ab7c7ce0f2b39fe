"""ReplicaClient against a real in-process frames server on TCP (a replica reached over
``--replica-transport tcp``): error families and exact accounting, and the supervisor's probes."""

import asyncio
import socket

import numpy as np
import pytest

from floe import errors
from floe.engine.fake import FakeEngine
from floe.models.spec import ModelSpec
from floe.protocol import EmbedResult, EncodeOptions, HealthAnswer, TokenBatch
from floe.fleet.replica_client import ReplicaClient
from floe.fleet.link import ReplicaDraining, ReplicaLost, ReplicaTimeout
from floe.transport.frames import start_frames_server

RETRIED = (ReplicaLost, ReplicaDraining)   # the link outcomes the router retries elsewhere

SPEC = ModelSpec(path="", name="t", architecture="BertModel", model_type="bert", hidden_size=8,
                 dim=8, max_seq_length=16, vocab_size=100, pooling="mean")


class Backend:
    """A replica's frames backend embedding with the fake engine; ``mode`` makes it fail the way
    a replica can."""

    def __init__(self):
        self.engine = FakeEngine(SPEC)
        self.mode = "ok"
        self.entered = asyncio.Event()

    def check_key(self, model, kind):
        pass

    async def encode(self, request_id, texts, tokens, options, model):
        self.entered.set()
        fail = {"invalid": errors.ValidationError("token id 999 out of range"),
                "overloaded": errors.OverloadedError("queue full", retry_after=3.0),
                "too_large": errors.TooLargeError("too many tokens"),
                "replica_deadline": errors.DeadlineError("deadline"),
                "internal": errors.InternalError(),
                "draining": errors.UnavailableError("replica draining")}.get(self.mode)
        if fail is not None:
            raise fail
        if self.mode == "hang":
            await asyncio.sleep(30)
        seqs = [tokens.item(i) for i in range(tokens.n)]
        out = self.engine.run(self.engine.prepare(seqs))
        return EmbedResult.from_array(out, "float32", tokens.lengths, request_id=request_id)

    async def health(self):
        if self.mode == "slow_health":   # probes time out; Encode still answers
            await asyncio.sleep(30)
        return HealthAnswer(healthy=True, ready=True)

    async def replica_info(self):
        raise errors.InternalError("not used here")

    async def abort(self, request_id):
        return False


@pytest.fixture
async def server():
    backend = Backend()
    srv = await start_frames_server("127.0.0.1:0", backend, "", max_payload=1 << 20)
    yield backend, srv.address, srv
    await srv.stop()


TOKENS = TokenBatch.from_lists([[1, 2, 3], [4, 5]])


async def connected(addr: str, index: int) -> ReplicaClient:
    """A client whose connection is up: these tests are about what a call answers, and a loaded
    machine can take longer than a call's deadline to connect."""
    c = ReplicaClient(addr, index)
    await asyncio.wait_for(c.link._conn._connection(), 60)
    return c


def assert_idle(c):
    assert c.in_flight_tokens == 0 and c.in_flight_requests == 0


async def test_encode_ok_and_accounting(server):
    backend, addr, _ = server
    c = await connected(addr, 0)
    r = await c.encode(TOKENS, EncodeOptions(), "r1", timeout=5)
    expected = backend.engine.run(backend.engine.prepare([TOKENS.item(0), TOKENS.item(1)]))
    np.testing.assert_array_equal(r.as_float32(), expected)
    assert r.request_id == "r1" and list(r.token_counts) == [3, 2]
    assert_idle(c)
    assert (c.completed, c.failed) == (1, 0)
    assert (await c.health()).healthy
    await c.close()


@pytest.mark.parametrize("mode,exc,retryable", [
    ("invalid", errors.ValidationError, False),
    ("overloaded", errors.OverloadedError, False),
    ("internal", errors.InternalError, False),
    ("too_large", errors.TooLargeError, False),
    ("replica_deadline", errors.DeadlineError, False),
    ("draining", ReplicaDraining, True),   # the replica says it is stopping: retried elsewhere
])
async def test_error_families(server, mode, exc, retryable):
    backend, addr, _ = server
    backend.mode = mode
    c = await connected(addr, 3)
    with pytest.raises(exc) as ei:
        await c.encode(TOKENS, EncodeOptions(), "r", timeout=5)
    assert isinstance(ei.value, RETRIED) == retryable
    if mode == "overloaded":
        assert ei.value.retry_after == 3.0
    if retryable:
        assert ei.value.replica_index == 3
    assert_idle(c)
    assert c.failed == 1
    await c.close()


async def test_timeout_is_its_own_error_not_a_replica_failure(server):
    # A timeout is answered 503 and not retried: it must not look like a dead replica.
    backend, addr, _ = server
    backend.mode = "hang"
    c = await connected(addr, 1)
    with pytest.raises(ReplicaTimeout, match="within 0.2 s") as ei:
        await c.encode(TOKENS, EncodeOptions(), "r", timeout=0.2)
    assert not isinstance(ei.value, RETRIED)
    assert ei.value.kind == errors.ErrorKind.UNAVAILABLE and ei.value.replica_index == 1
    assert_idle(c)
    assert c.failed == 1
    await c.close()


async def test_cancellation_keeps_accounting_exact(server):
    backend, addr, _ = server
    backend.mode = "hang"
    c = await connected(addr, 0)
    tasks = [asyncio.create_task(c.encode(TOKENS, EncodeOptions(), f"r{i}", timeout=10))
             for i in range(5)]
    await asyncio.wait_for(backend.entered.wait(), 30)
    assert c.in_flight_requests == 5 and c.in_flight_tokens == 5 * TOKENS.total_tokens
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert_idle(c)
    assert c.failed == 5
    await c.close()


async def test_dead_replica_is_replica_failure():
    # Nothing listens on this port any more: connection refused -> retryable.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    c = ReplicaClient(f"127.0.0.1:{port}", 2)
    with pytest.raises(ReplicaLost):
        await c.encode(TOKENS, EncodeOptions(), "r", timeout=2)
    with pytest.raises(ReplicaLost):
        await c.health(timeout=1)
    assert_idle(c)
    await c.close()


async def test_server_killed_mid_call_is_replica_failure(server):
    backend, addr, srv = server
    backend.mode = "hang"
    c = await connected(addr, 0)
    task = asyncio.create_task(c.encode(TOKENS, EncodeOptions(), "r", timeout=10))
    await asyncio.wait_for(backend.entered.wait(), 30)
    await srv.stop()   # its connections close with the call on them, like a dying process
    with pytest.raises(ReplicaLost):
        await task
    assert_idle(c)
    await c.close()


class FakeProcess:
    def __init__(self):
        self.killed = False

    def kill(self):
        self.killed = True


async def test_a_busy_replica_that_misses_probes_is_not_killed_a_silent_one_is(server):
    from floe.config import ReplicaSetSettings, Settings
    from floe.protocol import Placement
    from floe.fleet.replica_slot import PROBE_FAILURES_TO_KILL, ReplicaSlot

    backend, address, _ = server
    backend.mode = "slow_health"
    settings = Settings(replicas=ReplicaSetSettings(health_interval=0.1))
    slot = ReplicaSlot(0, address, Placement(), settings, token="")
    slot.client, slot.proc = ReplicaClient(address, 0), FakeProcess()
    probe = asyncio.get_running_loop().create_task(slot._probe())
    try:
        # answering requests the whole time: every probe times out (2 s) but none is counted
        loop = asyncio.get_running_loop()
        until = loop.time() + 5.0
        while loop.time() < until:
            await slot.client.encode(TOKENS, EncodeOptions(), "busy")
            await asyncio.sleep(0.05)
        assert slot.probe_failures == 0 and not slot.proc.killed and not probe.done()
        # silent: probes fail and are counted until the replica is killed as hung
        await asyncio.wait_for(probe, 3 * (PROBE_FAILURES_TO_KILL + 1) * 2.5)
        assert slot.proc.killed and slot.probe_failures == PROBE_FAILURES_TO_KILL
    finally:
        probe.cancel()
        await slot.client.close()


async def test_a_call_cut_by_closing_the_channel_is_a_replica_failure(server):
    # the supervisor closes a dead replica's channel; the calls still on it must come back as a
    # replica failure (retried elsewhere), not as a cancellation of the caller's request
    backend, addr, _ = server
    backend.mode = "hang"
    c = await connected(addr, 2)
    call = asyncio.get_running_loop().create_task(c.encode(TOKENS, EncodeOptions(), "r", timeout=20))
    await asyncio.wait_for(backend.entered.wait(), 10)
    await c.close()
    with pytest.raises(ReplicaLost) as ei:
        await call
    assert ei.value.replica_index == 2
    assert_idle(c)
