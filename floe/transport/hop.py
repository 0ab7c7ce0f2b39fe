"""The front end -> replica hop for Encode: length-prefixed frames on a Unix socket of its own.

Why not gRPC for this one call: with the fake engine (a device that costs nothing), gRPC's aio
layer was the largest single cost on both sides of the hop (py-spy, docs/benchmarks.md): about
half of a replica's GIL time and a fifth of the front end's, per call, for a message that never
leaves the machine. Here a call is one ``write`` of a frame and one future; the messages are the
same protobufs gRPC carries (``floe.v1.EncodeRequest`` / ``EncodeResponse``), so nothing about a
request's meaning changes with the transport. Health, info and abort stay on gRPC: they are rare,
and standalone replicas and tools speak them.

A frame is a 9-byte header ``<payload length u32><call id u32><type u8>`` (little-endian), then
the payload. Many calls share one connection; answers come back in any order, matched by call id.

- HELLO (client first, once): the replica's launch token; a connection that does not start with
  the right one is closed.
- ENCODE: an EncodeRequest. Answered by RESULT (an EncodeResponse) or ERROR.
- ERROR: JSON ``{"kind", "message", "param", "retry_after"}``: the FloeError the replica raised,
  kind included, so it is rebuilt as exactly that error on the other side.
- CANCEL (empty): the caller gave up (its timeout, its own cancellation); the replica drops the
  call's queued work, as a gRPC deadline or cancellation would.

A frame larger than the receiver's limit, an unknown type or a bad HELLO is a protocol error: the
connection is closed (the client's calls on it fail as a replica failure and are retried).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import struct
from typing import Any, Awaitable, Callable, Optional

from google.protobuf.message import DecodeError

from floe.errors import ErrorKind, FloeError, InternalError, ValidationError, error_of_kind
from floe.proto import floe_pb2
from floe.protocol import encode_call_from_proto, result_to_proto

log = logging.getLogger("floe.hop")

HEADER = struct.Struct("<IIB")
HELLO, ENCODE, RESULT, ERROR, CANCEL = 1, 2, 3, 4, 5
_MAX_CALL_ID = 2 ** 32 - 1


def frame(kind: int, call_id: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(len(payload), call_id, kind) + payload


def error_payload(err: FloeError) -> bytes:
    return json.dumps({"kind": err.kind.name.lower(), "message": err.message, "param": err.param,
                       "retry_after": err.retry_after}).encode()


def error_from_payload(payload: bytes) -> FloeError:
    """The FloeError an ERROR frame carries (an unreadable one is an InternalError)."""
    try:
        d = json.loads(payload)
        kind = ErrorKind.__members__[str(d["kind"]).upper()]
        err = error_of_kind(kind, str(d.get("message") or ""), param=d.get("param"))
    except (ValueError, KeyError, TypeError):
        return InternalError("the replica sent an unreadable error")
    retry_after = d.get("retry_after")
    if kind in (ErrorKind.OVERLOADED, ErrorKind.UNAVAILABLE) and isinstance(retry_after, (int, float)):
        err.retry_after = float(retry_after)
    return err


class _FrameReader:
    """Splits a byte stream into frames; ``feed`` returns the complete ones."""

    def __init__(self, max_payload: int) -> None:
        self.max_payload = max_payload
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        """(type, call id, payload) of each complete frame. Raises ValueError on a frame larger
        than the limit."""
        buf = self._buf
        buf += data
        frames, pos, size = [], 0, len(buf)
        while size - pos >= HEADER.size:
            length, call_id, kind = HEADER.unpack_from(buf, pos)
            if length > self.max_payload:
                raise ValueError(f"a {length}-byte frame, over the {self.max_payload}-byte limit")
            end = pos + HEADER.size + length
            if end > size:
                break
            frames.append((kind, call_id, bytes(buf[pos + HEADER.size:end])))
            pos = end
        if pos:
            del buf[:pos]
        return frames


# --- the replica's side ---------------------------------------------------------------------------

EncodeFn = Callable[..., Awaitable[Any]]   # backend.encode(request_id, texts, tokens, options, model)


class _ServerConnection(asyncio.Protocol):
    def __init__(self, encode: EncodeFn, token: Optional[str], max_payload: int,
                 connections: set) -> None:
        self._encode = encode
        self._token = token or ""
        self._reader = _FrameReader(max_payload)
        self._authed = not token
        self._calls: dict[int, asyncio.Task] = {}
        self._connections = connections
        self.transport: Optional[asyncio.Transport] = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._connections.add(self)

    def connection_lost(self, exc) -> None:
        self._connections.discard(self)
        for task in self._calls.values():   # the front end is gone: nobody waits for these
            task.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._reader.feed(data)
        except ValueError as e:
            self._protocol_error(str(e))
            return
        for kind, call_id, payload in frames:
            if not self._authed:
                if kind == HELLO and hmac.compare_digest(payload, self._token.encode()):
                    self._authed = True
                    continue
                self._protocol_error("the connection did not start with the launch token")
                return
            if kind == ENCODE:
                task = asyncio.get_running_loop().create_task(self._call(call_id, payload))
                self._calls[call_id] = task
                task.add_done_callback(lambda _t, c=call_id: self._calls.pop(c, None))
            elif kind == CANCEL:
                task = self._calls.get(call_id)
                if task is not None:
                    task.cancel()
            elif kind != HELLO:
                self._protocol_error(f"unknown frame type {kind}")
                return

    def _protocol_error(self, why: str) -> None:
        log.warning("hop: closing a connection: %s", why)
        if self.transport is not None:
            self.transport.abort()

    async def _call(self, call_id: int, payload: bytes) -> None:
        try:
            try:
                msg = floe_pb2.EncodeRequest.FromString(payload)
            except (DecodeError, ValueError, RuntimeError):
                raise ValidationError("the request is not a valid floe.v1.EncodeRequest message") from None
            request_id, texts, tokens, options, model = encode_call_from_proto(msg)
            result = await self._encode(request_id or f"hop-{call_id}", texts, tokens, options, model)
            result.request_id = result.request_id or request_id
            out = frame(RESULT, call_id, result_to_proto(result).SerializeToString())
        except asyncio.CancelledError:
            return   # cancelled by the caller, or the connection is gone: nothing to answer
        except FloeError as e:
            out = frame(ERROR, call_id, error_payload(e))
        except Exception:  # noqa: BLE001 - the caller gets a generic error, the log the traceback
            log.exception("unhandled error in a hop call")
            out = frame(ERROR, call_id, error_payload(InternalError()))
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()   # flushes what is written, then closes


class HopServer:
    """The replica's hop listener. ``stop`` closes it once the replica has drained."""

    def __init__(self, server: asyncio.AbstractServer, connections: set) -> None:
        self._server = server
        self._connections = connections

    async def stop(self) -> None:
        self._server.close()
        for conn in list(self._connections):
            conn.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 2.0)


async def start_hop_server(path: str, encode: EncodeFn, token: Optional[str],
                           max_payload: int) -> HopServer:
    """Listens on Unix socket ``path`` and answers ENCODE frames with ``encode``."""
    connections: set = set()
    loop = asyncio.get_running_loop()
    server = await loop.create_unix_server(
        lambda: _ServerConnection(encode, token, max_payload, connections), path)
    return HopServer(server, connections)


# --- the front end's side -------------------------------------------------------------------------

class HopClosedError(Exception):
    """The connection to the replica could not be opened, or was lost with the call on it."""


class HopTimeoutError(Exception):
    """The replica did not answer within the call's timeout (the call was cancelled there)."""


class _ClientConnection(asyncio.Protocol):
    def __init__(self, max_payload: int) -> None:
        self._reader = _FrameReader(max_payload)
        self.pending: dict[int, asyncio.Future] = {}
        self.transport: Optional[asyncio.Transport] = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        why = f"the replica's hop connection was lost ({exc or 'closed'})"
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(HopClosedError(why))
        self.pending.clear()
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._reader.feed(data)
        except ValueError as e:
            log.warning("hop: closing the connection to a replica: %s", e)
            self.transport.abort()
            return
        for kind, call_id, payload in frames:
            fut = self.pending.pop(call_id, None)
            if fut is None or fut.done():
                continue   # an answer to a call given up on
            fut.set_result((kind, payload))

    @property
    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()


class HopClient:
    """The front end's connection to one replica's hop socket (opened on first use, reopened
    after a loss). ``encode`` sends one EncodeRequest and returns the EncodeResponse."""

    def __init__(self, path: str, token: str = "", max_payload: int = 256 * 1024 * 1024) -> None:
        self.path = path
        self._token = token
        self._max_payload = max_payload
        self._conn: Optional[_ClientConnection] = None
        self._connecting: Optional[asyncio.Lock] = None
        self._next_id = 0
        self.closed = False

    async def _connection(self) -> _ClientConnection:
        conn = self._conn
        if conn is not None and conn.usable:
            return conn
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            conn = self._conn
            if conn is not None and conn.usable:
                return conn
            if self.closed:
                raise HopClosedError("the connection to the replica is closed")
            loop = asyncio.get_running_loop()
            try:
                _t, conn = await loop.create_unix_connection(
                    lambda: _ClientConnection(self._max_payload), self.path)
            except OSError as e:
                raise HopClosedError(f"cannot connect to the replica's hop socket: {e}") from None
            conn.transport.write(frame(HELLO, 0, self._token.encode()))
            self._conn = conn
            return conn

    async def encode(self, msg: floe_pb2.EncodeRequest, timeout: Optional[float]) -> floe_pb2.EncodeResponse:
        """Raises HopClosedError, HopTimeoutError or the FloeError the replica answered."""
        conn = await self._connection()
        self._next_id = self._next_id % _MAX_CALL_ID + 1
        call_id = self._next_id
        fut = asyncio.get_running_loop().create_future()
        conn.pending[call_id] = fut
        conn.transport.write(frame(ENCODE, call_id, msg.SerializeToString()))
        try:
            async with asyncio.timeout(timeout):
                kind, payload = await fut
        except TimeoutError:
            self._cancel(conn, call_id)
            raise HopTimeoutError() from None
        except asyncio.CancelledError:
            self._cancel(conn, call_id)
            raise
        if kind == RESULT:
            try:
                return floe_pb2.EncodeResponse.FromString(payload)
            except (DecodeError, ValueError, RuntimeError):
                raise InternalError("the replica sent an unreadable answer") from None
        if kind == ERROR:
            raise error_from_payload(payload)
        raise InternalError(f"the replica answered with frame type {kind}")

    @staticmethod
    def _cancel(conn: _ClientConnection, call_id: int) -> None:
        conn.pending.pop(call_id, None)
        if conn.usable:
            conn.transport.write(frame(CANCEL, call_id))

    @property
    def in_flight(self) -> int:
        return len(self._conn.pending) if self._conn is not None else 0

    async def close(self, grace: Optional[float] = None) -> None:
        """Closes the connection; with ``grace``, first waits up to that long for the calls on it
        (an exited replica's last answers may still be unread in the socket)."""
        self.closed = True
        conn, self._conn = self._conn, None
        if conn is None or conn.transport is None:
            return
        if grace and conn.pending:
            await asyncio.wait(set(conn.pending.values()), timeout=grace)   # cancels none
        conn.transport.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(conn.lost), 1.0)
