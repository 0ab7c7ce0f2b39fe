"""The replica link's frames on a Unix socket: the replica's server and the front end's connection.

The frame format, its call types and its error codec are declared in floe/protocol.py (``Frame``);
this module only moves them over asyncio sockets. Why not gRPC on one machine: with a fake engine
(a device that costs nothing) gRPC's aio layer was the largest single cost on both sides of the
link (py-spy, docs/benchmarks-history.md): about half of a replica's GIL time and a fifth of the
front end's, per call, for messages that never leave the machine. Here a call is one ``write`` of a
frame and one future, and the messages are floe's own (protocol.py: ``EncodeCall`` and the rest),
not the public API's.

A frame larger than the receiver's limit, an unknown type or a bad HELLO is a protocol error: the
connection is closed (the client's calls on it fail as a lost replica and are retried).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from typing import Any, Optional, Protocol

from floe.errors import FloeError, InternalError, ValidationError
from floe.proto import floe_pb2
from floe.protocol import (FRAME_CALLS, MAX_CALL_ID, AbortAnswer, Frame, FrameReader, HealthAnswer,
                           decode_message, encode_answer, encode_message, error_from_frame,
                           error_to_frame, frame, hand_back_answer, options_from_link,
                           tokens_from_call)

log = logging.getLogger("floe.frames")


class FramesBackend(Protocol):
    """What the replica's frames server calls (floe/replica/main.py ``ReplicaBackend``)."""

    async def encode(self, request_id: str, texts, tokens, options, model: str) -> Any: ...

    def check_key(self, model: str, kind: str) -> None:
        """Raises InternalError when a call names another model or kind than this replica's."""

    async def health(self) -> floe_pb2.HealthCheckResponse: ...

    async def replica_info(self) -> floe_pb2.GetReplicaInfoResponse: ...

    async def abort(self, request_id: str) -> bool: ...

    async def hand_back(self, request_ids: list[str], max_tokens: int,
                        min_tokens: int) -> list[tuple[str, Any]]: ...


# --- the replica's side ---------------------------------------------------------------------------

class _ServerConnection(asyncio.Protocol):
    def __init__(self, backend: FramesBackend, token: Optional[str], max_payload: int,
                 connections: set) -> None:
        self._backend = backend
        self._token = token or ""
        self._reader = FrameReader(max_payload)
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
                if kind == Frame.HELLO and hmac.compare_digest(payload, self._token.encode()):
                    self._authed = True
                    continue
                self._protocol_error("the connection did not start with the launch token")
                return
            if kind in FRAME_CALLS:
                task = asyncio.get_running_loop().create_task(self._call(Frame(kind), call_id, payload))
                self._calls[call_id] = task
                task.add_done_callback(lambda _t, c=call_id: self._calls.pop(c, None))
            elif kind == Frame.CANCEL:
                task = self._calls.get(call_id)
                if task is not None:
                    task.cancel()
            elif kind != Frame.HELLO:
                self._protocol_error(f"unknown frame type {kind}")
                return

    def _protocol_error(self, why: str) -> None:
        log.warning("frames: closing a connection: %s", why)
        if self.transport is not None:
            self.transport.abort()

    async def _answer(self, kind: Frame, call_id: int, payload: bytes) -> bytes:
        msg = decode_message(FRAME_CALLS[kind][0], payload)
        backend = self._backend
        if kind == Frame.ENCODE:
            backend.check_key(msg.model, msg.kind)
            tokens, options = tokens_from_call(msg), options_from_link(msg.options)
            request_id = msg.request_id or f"link-{call_id}"
            result = await backend.encode(request_id, None, tokens, options, msg.model)
            result.request_id = result.request_id or request_id
            return encode_message(encode_answer(result))
        if kind == Frame.HEALTH:
            h = await backend.health()
            return encode_message(HealthAnswer(healthy=h.healthy, ready=h.ready, message=h.message))
        if kind == Frame.INFO:
            return encode_message(await backend.replica_info())
        if kind == Frame.HAND_BACK:
            given = await backend.hand_back(msg.request_ids, msg.max_tokens, msg.min_tokens)
            return encode_message(hand_back_answer(given))
        ok = await backend.abort(msg.request_id)
        return encode_message(AbortAnswer(success=ok, message="aborted" if ok else
                                          "no such request in flight"))

    async def _call(self, kind: Frame, call_id: int, payload: bytes) -> None:
        try:
            out = frame(Frame.RESULT, call_id, await self._answer(kind, call_id, payload))
        except asyncio.CancelledError:
            return   # cancelled by the caller, or the connection is gone: nothing to answer
        except FloeError as e:
            out = frame(Frame.ERROR, call_id, error_to_frame(e))
        except Exception:  # noqa: BLE001 - the caller gets a generic error, the log the traceback
            log.exception("unhandled error in a %s call", kind.name)
            out = frame(Frame.ERROR, call_id, error_to_frame(InternalError()))
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()   # flushes what is written, then closes


def split_address(address: str) -> tuple[str, str, int]:
    """("unix", path, 0) for ``unix:/path`` (or a bare absolute path), ("tcp", host, port) for
    ``host:port`` / ``[v6]:port``; ValueError for anything else."""
    if address.startswith("unix:"):
        return "unix", address[len("unix:"):], 0
    if address.startswith("/"):
        return "unix", address, 0
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"not a frames address: {address!r} (unix:/path or host:port)")
    return "tcp", host.strip("[]"), int(port)


class FramesServer:
    """A replica's frames listener. ``stop`` closes it once the replica has drained;
    ``address`` is where it listens (a TCP port 0 resolved)."""

    def __init__(self, server: asyncio.AbstractServer, connections: set, address: str) -> None:
        self._server = server
        self._connections = connections
        self.address = address

    async def stop(self) -> None:
        self._server.close()
        for conn in list(self._connections):
            conn.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 2.0)


async def start_frames_server(address: str, backend: FramesBackend, token: Optional[str],
                              max_payload: int) -> FramesServer:
    """Listens on ``address`` (a Unix socket, or host:port for a replica another host reaches:
    the same frames, behind the same launch token) and answers call frames with ``backend``."""
    connections: set = set()
    loop = asyncio.get_running_loop()
    scheme, where, port = split_address(address)

    def factory():
        return _ServerConnection(backend, token, max_payload, connections)

    if scheme == "unix":
        server = await loop.create_unix_server(factory, where)
        return FramesServer(server, connections, f"unix:{where}")
    server = await loop.create_server(factory, where, port)
    bound = server.sockets[0].getsockname()[1]
    host = f"[{where}]" if ":" in where else where
    return FramesServer(server, connections, f"{host}:{bound}")


# --- the front end's side -------------------------------------------------------------------------

class FramesClosed(Exception):
    """The connection could not be opened, or was lost (or closed) with the call on it."""


class FramesTimeout(Exception):
    """No answer within the call's timeout (the call was cancelled on the replica)."""


class _ClientConnection(asyncio.Protocol):
    def __init__(self, max_payload: int) -> None:
        self._reader = FrameReader(max_payload)
        self.pending: dict[int, asyncio.Future] = {}
        self.transport: Optional[asyncio.Transport] = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.fail_pending(f"the replica's connection was lost ({exc or 'closed'})")
        if not self.lost.done():
            self.lost.set_result(None)

    def fail_pending(self, why: str) -> None:
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(FramesClosed(why))
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._reader.feed(data)
        except ValueError as e:
            log.warning("frames: closing the connection to a replica: %s", e)
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


class FramesConnection:
    """The front end's connection to one replica's socket (opened on first use, reopened after a
    loss). ``call`` sends one request message and returns the answer's message."""

    def __init__(self, address: str, token: str = "", max_payload: int = 256 * 1024 * 1024) -> None:
        self.address = address
        self._where = split_address(address)
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
                raise FramesClosed("the connection to the replica is closed")
            loop = asyncio.get_running_loop()
            scheme, where, port = self._where
            try:
                if scheme == "unix":
                    _t, conn = await loop.create_unix_connection(
                        lambda: _ClientConnection(self._max_payload), where)
                else:
                    _t, conn = await loop.create_connection(
                        lambda: _ClientConnection(self._max_payload), where, port)
            except OSError as e:
                raise FramesClosed(f"cannot connect to the replica's socket: {e}") from None
            conn.transport.write(frame(Frame.HELLO, 0, self._token.encode()))
            self._conn = conn
            return conn

    async def call(self, kind: Frame, msg: Any, timeout: Optional[float]) -> Any:
        """Raises FramesClosed, FramesTimeout or the FloeError the replica answered."""
        conn = await self._connection()
        self._next_id = self._next_id % MAX_CALL_ID + 1
        call_id = self._next_id
        fut = asyncio.get_running_loop().create_future()
        conn.pending[call_id] = fut
        conn.transport.write(frame(kind, call_id, encode_message(msg)))
        try:
            async with asyncio.timeout(timeout):
                answer, payload = await fut
        except TimeoutError:
            self._cancel(conn, call_id)
            raise FramesTimeout() from None
        except asyncio.CancelledError:
            self._cancel(conn, call_id)
            raise
        if answer == Frame.RESULT:
            try:
                return decode_message(FRAME_CALLS[kind][1], payload)
            except ValidationError:
                raise InternalError("the replica sent an unreadable answer") from None
        if answer == Frame.ERROR:
            raise error_from_frame(payload)
        raise InternalError(f"the replica answered with frame type {answer}")

    @staticmethod
    def _cancel(conn: _ClientConnection, call_id: int) -> None:
        conn.pending.pop(call_id, None)
        if conn.usable:
            conn.transport.write(frame(Frame.CANCEL, call_id))

    @property
    def in_flight(self) -> int:
        return len(self._conn.pending) if self._conn is not None else 0

    def fail_pending(self, why: str) -> None:
        """Fails every call waiting on this connection as lost (the replica stopped answering);
        the connection stays open for the calls that follow."""
        if self._conn is not None:
            self._conn.fail_pending(why)

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

