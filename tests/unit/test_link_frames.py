"""The replica link's frames (floe/protocol.py, floe/transport/frames.py) and FramesLink: a real
server and client on a Unix socket, with a stand-in for the replica's backend."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile

import numpy as np
import pytest

from floe.errors import InternalError, OverloadedError, TooLargeError, UnavailableError, ValidationError
from floe.proto import floe_pb2
from floe.protocol import (AbortCall, EmbedResult, EncodeCall, EncodeOptions, HealthCall, InfoCall,
                           LinkOptions, TokenBatch, encode_call)
from floe.fleet.replica_client import ReplicaClient
from floe.fleet.link import ReplicaDraining, ReplicaLost, ReplicaTimeout
from floe.protocol import FRAME_HEADER as HEADER, Frame, frame
from floe.transport.frames import (FramesClosed, FramesConnection, FramesTimeout, split_address,
                                  start_frames_server)

CANCEL, ENCODE, HELLO = Frame.CANCEL, Frame.ENCODE, Frame.HELLO

TOKEN = "launch-token"


def batch(*rows: list[int]) -> TokenBatch:
    return TokenBatch.from_lists([list(r) for r in rows])


def msg(request_id: str, tb: TokenBatch, model: str = "m", kind: str = "embed",
        **options) -> EncodeCall:
    return encode_call(request_id, tb, EncodeOptions(**options), model, kind)


class Replica:
    """encode(): each row's embedding is [first id, length]; `hold` makes a request wait."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.cancelled: list[str] = []
        self.hold: dict[str, asyncio.Event] = {}
        self.fail: dict[str, Exception] = {}
        self.aborted: list[str] = []
        self.ready = True

    def check_key(self, model, kind):
        if (model, kind) != ("m", "embed") and (model, kind) != ("", ""):
            raise InternalError("the request reached a replica of another model")

    async def health(self):
        return floe_pb2.HealthCheckResponse(healthy=True, ready=self.ready, message="ok")

    async def replica_info(self):
        return floe_pb2.GetReplicaInfoResponse(replicas=[floe_pb2.ReplicaInfo(replica_id="7")],
                                               n_replicas=1)

    async def abort(self, request_id):
        self.aborted.append(request_id)
        return request_id in self.hold

    async def encode(self, request_id, texts, tokens, options, model):
        self.calls.append(request_id)
        if request_id in self.fail:
            raise self.fail[request_id]
        if request_id in self.hold:
            try:
                await self.hold[request_id].wait()
            except asyncio.CancelledError:
                self.cancelled.append(request_id)
                raise
        off = tokens.offsets()
        rows = np.array([[tokens.ids[off[i]], tokens.lengths[i]] for i in range(tokens.n)],
                        dtype=np.float32)
        return EmbedResult.from_array(rows, "float32", tokens.lengths, model="m",
                                      request_id=request_id)


class Conn:
    """FramesConnection with an ``encode`` shorthand for the tests below."""

    def __init__(self, conn: FramesConnection) -> None:
        self.conn = conn

    async def encode(self, m, timeout):
        return await self.conn.call(Frame.ENCODE, m, timeout)

    def __getattr__(self, name):
        return getattr(self.conn, name)


@pytest.fixture(params=["unix", "tcp"])
async def served(request):
    """A frames server and a connection to it: on a Unix socket (a replica on this machine) and
    on TCP (``--replica-transport tcp``), the same frames either way. Yields (replica, client,
    the server's address)."""
    d = tempfile.mkdtemp(prefix="floe-link-")
    where = f"unix:{os.path.join(d, 'r.sock')}" if request.param == "unix" else "127.0.0.1:0"
    replica = Replica()
    server = await start_frames_server(where, replica, TOKEN, max_payload=1 << 20)
    client = Conn(FramesConnection(server.address, TOKEN))
    yield replica, client, server.address
    await client.close()
    await server.stop()
    os.rmdir(d) if not os.listdir(d) else None


async def open_raw(address: str):
    """A raw (reader, writer) to a frames server's address."""
    scheme, where, port = split_address(address)
    if scheme == "unix":
        return await asyncio.open_unix_connection(where)
    return await asyncio.open_connection(where, port)


def nobody_at(address: str) -> str:
    """An address of the same kind where nothing accepts connections."""
    if address.startswith("unix:"):
        return address + ".missing"
    with socket.socket() as sock:   # a port just freed: connection refused
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


async def until(cond, seconds: float = 30.0) -> None:
    """Waits for ``cond()`` (a few ms when the machine is quiet); fails after ``seconds``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not cond():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def rows(reply) -> np.ndarray:
    return np.frombuffer(reply.data, "<f4").reshape(reply.n, reply.dim)


async def test_concurrent_calls_each_get_their_own_answer(served):
    replica, client, _ = served
    replica.hold["slow"] = asyncio.Event()
    slow = asyncio.create_task(client.encode(msg("slow", batch([7, 7, 7])), timeout=10))
    fast = await asyncio.gather(*(client.encode(msg(f"r{k}", batch([k, 1], [k + 100])), timeout=10)
                                  for k in range(20)))
    for k, reply in enumerate(fast):   # answered while "slow" waits: matched by call id
        assert reply.request_id == f"r{k}"
        np.testing.assert_array_equal(rows(reply), [[k, 2], [k + 100, 1]])
    replica.hold["slow"].set()
    assert rows(await slow).tolist() == [[7, 3]]
    assert client.in_flight == 0


async def test_errors_keep_their_kind_and_fields(served):
    replica, client, _ = served
    replica.fail = {"o": OverloadedError("queue full", retry_after=2.5),
                    "t": TooLargeError("too many tokens", param="input"),
                    "u": UnavailableError("draining"),
                    "x": RuntimeError("a bug")}
    with pytest.raises(OverloadedError) as e:
        await client.encode(msg("o", batch([1])), timeout=10)
    assert e.value.retry_after == 2.5 and e.value.message == "queue full"
    with pytest.raises(TooLargeError) as e:
        await client.encode(msg("t", batch([1])), timeout=10)
    assert e.value.param == "input"
    with pytest.raises(UnavailableError, match="draining"):
        await client.encode(msg("u", batch([1])), timeout=10)
    with pytest.raises(InternalError) as e:   # no traceback or exception text crosses
        await client.encode(msg("x", batch([1])), timeout=10)
    assert "a bug" not in e.value.message
    # the connection still serves
    assert rows(await client.encode(msg("ok", batch([5])), timeout=10)).tolist() == [[5, 1]]


async def test_a_malformed_call_is_a_validation_error_and_a_misrouted_one_is_not_computed(served):
    replica, client, _ = served
    bad = EncodeCall(request_id="e", model="m", kind="embed", ids=b"\x01\x00\x00",
                     lengths=b"\x01\x00\x00\x00", options=LinkOptions())
    with pytest.raises(ValidationError, match="not whole int32s"):
        await client.encode(bad, timeout=10)
    with pytest.raises(ValidationError, match="not a valid EncodeCall"):
        await client.encode(AbortCall(request_id="not an encode call"), timeout=10)
    for model, kind in (("another-model", "embed"), ("m", "score")):
        with pytest.raises(InternalError, match="another model"):
            await client.encode(msg("misrouted", batch([1]), model=model, kind=kind), timeout=10)
    assert "e" not in replica.calls and "misrouted" not in replica.calls


async def test_timeout_and_cancellation_cancel_the_call_on_the_replica(served):
    replica, client, _ = served
    replica.hold["late"] = asyncio.Event()
    replica.hold["gone"] = asyncio.Event()
    with pytest.raises(FramesTimeout):
        await client.encode(msg("late", batch([1])), timeout=0.2)
    task = asyncio.create_task(client.encode(msg("gone", batch([1])), timeout=10))
    await until(lambda: "gone" in replica.calls)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await until(lambda: sorted(replica.cancelled) == ["gone", "late"])
    assert client.in_flight == 0


async def test_a_wrong_token_is_refused(served):
    _, _, path = served
    other = Conn(FramesConnection(path, "not-the-token"))
    with pytest.raises(FramesClosed):
        await other.encode(msg("a", batch([1])), timeout=10)
    await other.close()


async def test_malformed_and_oversized_frames_close_only_that_connection(served):
    replica, client, path = served
    for junk in (frame(HELLO, 0, TOKEN.encode()) + frame(ENCODE, 1, b"\xff\xff not protobuf"),
                 frame(HELLO, 0, TOKEN.encode()) + HEADER.pack(1 << 30, 2, ENCODE),
                 frame(HELLO, 0, TOKEN.encode()) + frame(99, 3),
                 b"\x00" * 3):   # half a header, then the client goes away
        r, w = await open_raw(path)
        w.write(junk)
        await w.drain()
        if len(junk) < HEADER.size:
            w.close()
            continue
        data = await asyncio.wait_for(r.read(1 << 16), 5)
        if not junk.endswith(b"not protobuf"):
            assert data == b""   # the replica closed this connection
        else:
            # a bad message is the request's error, answered on the connection
            length, call_id, kind = HEADER.unpack_from(data)
            assert (call_id, kind) == (1, Frame.ERROR) and b"validation" in data
            w.write(frame(CANCEL, 1))   # harmless: nothing left to cancel
        w.close()
    assert rows(await client.encode(msg("after", batch([3, 3])), timeout=10)).tolist() == [[3, 2]]


async def test_a_lost_replica_fails_the_calls_on_it_and_a_new_one_is_reached(served):
    replica, client, path = served
    replica.hold["stuck"] = asyncio.Event()
    task = asyncio.create_task(client.encode(msg("stuck", batch([1])), timeout=10))
    await until(lambda: "stuck" in replica.calls)
    # the replica process dies: its connections close
    conn = client.conn._conn
    conn.transport.abort()
    with pytest.raises(FramesClosed):
        await task
    # the next call opens a new connection
    assert rows(await client.encode(msg("next", batch([4])), timeout=10)).tolist() == [[4, 1]]


async def test_nothing_listening_is_a_closed_connection():
    d = tempfile.mkdtemp(prefix="floe-link-")
    path = os.path.join(d, "none.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)   # a socket file nobody accepts on
    s.close()
    client = Conn(FramesConnection(path, TOKEN))
    with pytest.raises(FramesClosed):
        await client.encode(msg("a", batch([1])), timeout=5)
    await client.close()
    os.unlink(path)
    os.rmdir(d)


async def test_close_with_grace_lets_answers_in_flight_arrive(served):
    replica, client, _ = served
    replica.hold["last"] = asyncio.Event()
    task = asyncio.create_task(client.encode(msg("last", batch([9])), timeout=10))
    await until(lambda: "last" in replica.calls)
    asyncio.get_running_loop().call_later(0.2, replica.hold["last"].set)
    await client.close(grace=5.0)
    assert rows(await task).tolist() == [[9, 1]]
    with pytest.raises(FramesClosed):
        await client.encode(msg("after-close", batch([1])), timeout=5)


async def test_health_info_and_abort_travel_as_frames(served):
    replica, client, _ = served
    h = await client.conn.call(Frame.HEALTH, HealthCall(), 5)
    assert h.healthy and h.ready and h.message == "ok"
    info = await client.conn.call(Frame.INFO, InfoCall(), 5)
    assert info.replicas[0].replica_id == "7"
    replica.hold["a"] = asyncio.Event()
    a = await client.conn.call(Frame.ABORT, AbortCall(request_id="a"), 5)
    b = await client.conn.call(Frame.ABORT, AbortCall(request_id="nope"), 5)
    assert a.success and not b.success and replica.aborted == ["a", "nope"]


async def test_replica_client_over_frames_maps_every_outcome(served):
    replica, _, path = served
    rc = ReplicaClient(path, 3, token=TOKEN, model="m", kind="embed")
    replica.fail = {"d": UnavailableError("replica is draining"),
                    "t": TooLargeError("too many tokens", param="input"),
                    "o": OverloadedError("queue full", retry_after=2.5)}
    replica.hold["h"] = asyncio.Event()
    replica.hold["stuck"] = asyncio.Event()
    try:
        got = await rc.encode(batch([2, 2]), EncodeOptions(), "a")
        assert got.as_float32().tolist() == [[2, 2]] and rc.last_answer > 0
        with pytest.raises(ReplicaDraining) as e:   # draining: retried elsewhere
            await rc.encode(batch([1]), EncodeOptions(), "d")
        assert e.value.replica_index == 3
        with pytest.raises(TooLargeError) as e:     # the replica's own error: param kept
            await rc.encode(batch([1]), EncodeOptions(), "t")
        assert e.value.param == "input" and e.value.retry_after is None
        with pytest.raises(OverloadedError) as e:
            await rc.encode(batch([1]), EncodeOptions(), "o")
        assert e.value.retry_after == 2.5
        with pytest.raises(ReplicaTimeout, match="did not answer within 0.2 s"):
            await rc.encode(batch([1]), EncodeOptions(), "h", timeout=0.2)
        # the supervisor finds the replica unresponsive: calls waiting on it fail as lost now
        task = asyncio.create_task(rc.encode(batch([1]), EncodeOptions(), "stuck", timeout=30))
        await until(lambda: "stuck" in replica.calls)
        rc.fail_pending("replica 3 stopped answering")
        with pytest.raises(ReplicaLost, match="stopped answering"):
            await task
        assert rc.calls_in_flight == 0 and rc.in_flight_requests == 0
        assert (await rc.health(5)).ready and (await rc.info(5)).replicas[0].replica_id == "7"
    finally:
        await rc.close()
    gone = ReplicaClient(nobody_at(path), 0, token=TOKEN)
    with pytest.raises(ReplicaLost):
        await gone.encode(batch([1]), EncodeOptions(), "z")
    await gone.close()
