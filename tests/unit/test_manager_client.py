"""ReplicaClient over a GrpcLink against a real in-process grpc.aio server (a replica reached over
TCP): error families and exact accounting."""

import asyncio

import grpc
import numpy as np
import pytest

from floe import errors
from floe.engine.fake import FakeEngine
from floe.models.spec import ModelSpec
from floe.proto import floe_pb2, floe_pb2_grpc
from floe.protocol import EmbedResult, EncodeOptions, TokenBatch, result_to_proto, tokens_from_proto
from floe.fleet.replica_client import ReplicaClient
from floe.fleet.link import ReplicaDraining, ReplicaLost, ReplicaTimeout

RETRIED = (ReplicaLost, ReplicaDraining)   # the link outcomes the router retries elsewhere

SPEC = ModelSpec(path="", name="t", architecture="BertModel", model_type="bert", hidden_size=8,
                 dim=8, max_seq_length=16, vocab_size=100, pooling="mean")


class Servicer(floe_pb2_grpc.EmbedderServicer):
    """Embeds with the fake engine; ``mode`` makes it fail the way a replica can."""

    def __init__(self):
        self.engine = FakeEngine(SPEC)
        self.mode = "ok"
        self.entered = asyncio.Event()

    async def Encode(self, request, context):
        self.entered.set()
        if self.mode == "invalid":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "token id 999 out of range")
        if self.mode == "overloaded":
            context.set_trailing_metadata((("retry-after", "3"),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        if self.mode == "too_large":  # a floe replica names the kind: not "overloaded"
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many tokens",
                                trailing_metadata=errors.grpc_trailing_metadata(
                                    errors.TooLargeError("too many tokens")))
        if self.mode == "replica_deadline":  # the replica's own deadline, not our timeout
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline",
                                trailing_metadata=errors.grpc_trailing_metadata(
                                    errors.DeadlineError("deadline")))
        if self.mode == "internal":
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        if self.mode == "draining":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "replica draining")
        if self.mode == "hang":
            await asyncio.sleep(30)
        tb = tokens_from_proto(request)
        seqs = [tb.item(i) for i in range(tb.n)]
        out = self.engine.run(self.engine.prepare(seqs))
        return result_to_proto(EmbedResult.from_array(out, "float32", tb.lengths,
                                                      request_id=request.request_id))

    async def HealthCheck(self, request, context):
        if self.mode == "slow_health":   # probes time out; Encode still answers
            await asyncio.sleep(30)
        return floe_pb2.HealthCheckResponse(healthy=True, ready=True)


@pytest.fixture
async def server():
    srv = grpc.aio.server()
    servicer = Servicer()
    floe_pb2_grpc.add_EmbedderServicer_to_server(servicer, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    await srv.start()
    yield servicer, f"127.0.0.1:{port}", srv
    await srv.stop(None)


TOKENS = TokenBatch.from_lists([[1, 2, 3], [4, 5]])


async def connected(addr: str, index: int) -> ReplicaClient:
    """A client whose connection is up: these tests are about what a call answers, and a loaded
    machine can take longer than a call's deadline to finish the HTTP/2 handshake."""
    c = ReplicaClient(addr, index)
    await asyncio.wait_for(c.link._channel.channel_ready(), 60)
    return c


def assert_idle(c):
    assert c.in_flight_tokens == 0 and c.in_flight_requests == 0


async def test_encode_ok_and_accounting(server):
    servicer, addr, _ = server
    c = await connected(addr, 0)
    r = await c.encode(TOKENS, EncodeOptions(), "r1", timeout=5)
    expected = servicer.engine.run(servicer.engine.prepare([TOKENS.item(0), TOKENS.item(1)]))
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
    ("draining", ReplicaLost, True),   # a bare UNAVAILABLE (no floe kind): the transport's
])
async def test_error_families(server, mode, exc, retryable):
    servicer, addr, _ = server
    servicer.mode = mode
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
    servicer, addr, _ = server
    servicer.mode = "hang"
    c = await connected(addr, 1)
    with pytest.raises(ReplicaTimeout, match="within 0.2 s") as ei:
        await c.encode(TOKENS, EncodeOptions(), "r", timeout=0.2)
    assert not isinstance(ei.value, RETRIED)
    assert ei.value.kind == errors.ErrorKind.UNAVAILABLE and ei.value.replica_index == 1
    assert_idle(c)
    assert c.failed == 1
    await c.close()


async def test_cancellation_keeps_accounting_exact(server):
    servicer, addr, _ = server
    servicer.mode = "hang"
    c = await connected(addr, 0)
    tasks = [asyncio.create_task(c.encode(TOKENS, EncodeOptions(), f"r{i}", timeout=10))
             for i in range(5)]
    await asyncio.wait_for(servicer.entered.wait(), 30)
    assert c.in_flight_requests == 5 and c.in_flight_tokens == 5 * TOKENS.total_tokens
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert_idle(c)
    assert c.failed == 5
    await c.close()


async def test_dead_replica_is_replica_failure():
    # Nothing listens on this port any more: connection refused -> UNAVAILABLE -> retryable.
    srv = grpc.aio.server()
    port = srv.add_insecure_port("127.0.0.1:0")
    await srv.start()
    await srv.stop(None)
    c = ReplicaClient(f"127.0.0.1:{port}", 2)
    with pytest.raises(ReplicaLost):
        await c.encode(TOKENS, EncodeOptions(), "r", timeout=2)
    with pytest.raises(ReplicaLost):
        await c.health(timeout=1)
    assert_idle(c)
    await c.close()


async def test_server_killed_mid_call_is_replica_failure(server):
    servicer, addr, srv = server
    servicer.mode = "hang"
    c = await connected(addr, 0)
    task = asyncio.create_task(c.encode(TOKENS, EncodeOptions(), "r", timeout=10))
    await asyncio.wait_for(servicer.entered.wait(), 30)
    await srv.stop(None)  # no grace: in-flight calls are cut off like a dying process
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

    servicer, address, _ = server
    servicer.mode = "slow_health"
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
    servicer, addr, _ = server
    servicer.mode = "hang"
    c = await connected(addr, 2)
    call = asyncio.get_running_loop().create_task(c.encode(TOKENS, EncodeOptions(), "r", timeout=20))
    await asyncio.wait_for(servicer.entered.wait(), 10)
    await c.close()
    with pytest.raises(ReplicaLost) as ei:
        await call
    assert ei.value.replica_index == 2
    assert_idle(c)
