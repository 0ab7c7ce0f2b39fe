"""The link from a front end to one replica: one interface, two transports, one error table.

``open_link(address, ...)`` returns a ``ReplicaLink`` for a replica's address, chosen by its
scheme alone: ``unix:/path`` is the replica's frames socket on this machine
(floe/transport/frames.py), ``host:port`` its gRPC server (a replica reached over TCP: the
ArcticInference-style replica manager's ``--replica-transport tcp``, a remote replica). Both
answer the same four calls (``encode``: token ids and options in, an EmbedResult out;
``health``, ``info``, ``abort``); what travels differs: floe's own messages on frames
(protocol.py ``EncodeCall``, named for a model and kind), the public floe.v1 API over gRPC (a
TCP replica is a public server).

What can go wrong is told apart here, once, for both transports; the router and the supervisor
never see a transport's own exception or status name:

- the replica's own FloeError (validation, too large, overloaded, an engine failure...) arrives
  as exactly that error, its kind, message, param and Retry-After rebuilt from one codec
  (errors.error_fields) whichever transport carried it;
- ``ReplicaLost``: the connection was refused, reset or closed with the call on it (the replica
  died, or was closed by its supervisor): not the request's fault, retried elsewhere;
- ``ReplicaDraining``: the replica answered that it is stopping: retried elsewhere;
- ``ReplicaTimeout``: no answer within the timeout: busy or hung, not dead (the supervisor's
  probes decide which); the call is cancelled on the replica.

Messages of these three name the replica for the log; clients never see them.
"""

from __future__ import annotations

import abc
import asyncio
from typing import Optional

from floe import errors
from floe.errors import ErrorKind, FloeError, UnavailableError
from floe.proto import floe_pb2
from floe.protocol import (AbortCall, EmbedResult, EncodeOptions, Frame, HealthAnswer, HealthCall, InfoCall,
                           TokenBatch, encode_call, request_to_proto, result_from_answer,
                           result_from_proto)


class LinkError(UnavailableError):
    """The link to a replica, not the request, failed."""

    def __init__(self, message: str, replica_index: int) -> None:
        super().__init__(message)
        self.replica_index = replica_index


class ReplicaLost(LinkError):
    """Connection refused, reset or closed with the call on it: safe to retry elsewhere."""


class ReplicaDraining(LinkError):
    """The replica said it is stopping (UNAVAILABLE from the replica itself): retry elsewhere."""


class ReplicaTimeout(LinkError):
    """No answer within the call's timeout: the replica is busy or hung."""


class ReplicaLink(abc.ABC):
    """One replica's four calls. Raises the replica's FloeError, or a LinkError."""

    def __init__(self, address: str, replica_index: int, model: str = "", kind: str = "") -> None:
        self.address = address
        self.replica_index = replica_index
        # what every call says it is meant for (the replica refuses another model's or kind's)
        self.model = model
        self.kind = kind
        self.closed = False

    @abc.abstractmethod
    async def encode(self, request_id: str, tokens: TokenBatch, options: EncodeOptions,
                     timeout: Optional[float]) -> EmbedResult:
        ...

    @abc.abstractmethod
    async def health(self, timeout: float) -> "HealthAnswer | floe_pb2.HealthCheckResponse":
        """``.healthy``, ``.ready``, ``.message``, whichever transport answered."""

    @abc.abstractmethod
    async def info(self, timeout: float) -> floe_pb2.GetReplicaInfoResponse: ...

    @abc.abstractmethod
    async def abort(self, request_id: str, timeout: float) -> bool: ...

    @abc.abstractmethod
    async def close(self, grace: Optional[float] = None) -> None:
        """Closes the link. ``grace``: seconds the calls still on it may take to finish: an exited
        replica's last answers may still sit unread in the socket when its exit is seen."""

    def fail_pending(self, why: str) -> None:
        """Fails every call waiting for an answer as ReplicaLost (the supervisor found the replica
        unresponsive: the calls are retried elsewhere rather than waiting out their timeout)."""

    def _where(self) -> str:
        return f"replica {self.replica_index} ({self.address})"

    def _from_replica(self, err: FloeError) -> FloeError:
        """The replica's own error, except "I am stopping", which is a link outcome."""
        if err.kind is ErrorKind.UNAVAILABLE:
            return ReplicaDraining(f"{self._where()} unavailable: {err.message[:200]}",
                                   self.replica_index)
        return err

    def _timeout(self, timeout: Optional[float]) -> ReplicaTimeout:
        return ReplicaTimeout(f"{self._where()} did not answer within {timeout:g} s" if timeout
                              else f"{self._where()} timed out", self.replica_index)


class FramesLink(ReplicaLink):
    """A replica on this machine: frames on its Unix socket."""

    def __init__(self, address: str, replica_index: int, token: str, receive_limit: int,
                 model: str = "", kind: str = "") -> None:
        super().__init__(address, replica_index, model, kind)
        from floe.transport.frames import FramesConnection

        self._conn = FramesConnection(address[len("unix:"):], token, receive_limit)

    async def _call(self, kind: Frame, msg, timeout: Optional[float]):
        from floe.transport.frames import FramesClosed, FramesTimeout

        try:
            return await self._conn.call(kind, msg, timeout)
        except FramesClosed as e:
            raise ReplicaLost(f"{self._where()} unavailable: {e}", self.replica_index) from None
        except FramesTimeout:
            raise self._timeout(timeout) from None
        except FloeError as e:
            raise self._from_replica(e) from None

    async def encode(self, request_id, tokens, options, timeout):
        call = encode_call(request_id, tokens, options, self.model, self.kind)
        return result_from_answer(await self._call(Frame.ENCODE, call, timeout))

    async def health(self, timeout):
        return await self._call(Frame.HEALTH, HealthCall(), timeout)

    async def info(self, timeout):
        return await self._call(Frame.INFO, InfoCall(), timeout)

    async def abort(self, request_id, timeout):
        try:
            reply = await self._call(Frame.ABORT, AbortCall(request_id=request_id), timeout)
        except FloeError:
            return False
        return reply.success

    def fail_pending(self, why: str) -> None:
        self._conn.fail_pending(why)

    @property
    def in_flight(self) -> int:
        return self._conn.in_flight

    async def close(self, grace=None):
        self.closed = True
        await self._conn.close(grace)


# gRPC INTERNAL/UNKNOWN statuses whose details show a broken transport rather than an error the
# replica chose to report (gRPC reports a stream reset by a dying peer as INTERNAL on some paths).
_TRANSPORT_HINTS = ("rst_stream", "stream removed", "socket closed", "connection reset",
                    "broken pipe", "goaway", "eof")


class GrpcLink(ReplicaLink):
    """A replica reached over TCP: its floe.v1.Embedder gRPC server."""

    def __init__(self, address: str, replica_index: int, token: str, receive_limit: int,
                 model: str = "", kind: str = "") -> None:
        super().__init__(address, replica_index, model, kind)
        import grpc

        from floe.proto import floe_pb2_grpc
        from floe.transport.grpc import channel_options

        options = channel_options(receive_limit) + [
            # A restarted replica must be reachable again within a health interval, not after
            # gRPC's default reconnect backoff (up to 120 s).
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
            # Our own policy decides what is retried, and where; no transparent gRPC retries.
            ("grpc.enable_retries", 0),
            # A channel of its own: gRPC otherwise shares connections between channels to the same
            # target, and a restarted replica's new channel inherits the dead one's connection in
            # backoff, so its first calls fail with the old "connect failed" until the next retry.
            ("grpc.use_local_subchannel_pool", 1),
        ]
        self._grpc = grpc
        self._channel = grpc.aio.insecure_channel(address, options=options)
        self._stub = floe_pb2_grpc.EmbedderStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._calls: set[asyncio.Task] = set()
        self._failed_tasks: set[asyncio.Task] = set()

    def _map(self, err, timeout: Optional[float]) -> FloeError:
        """The one place a gRPC status becomes a FloeError or a link outcome."""
        code = err.code().name
        details = err.details() or ""
        md = err.trailing_metadata() or ()
        from_floe = any(k == errors.KIND_METADATA_KEY for k, _ in md)
        if from_floe:
            return self._from_replica(errors.from_grpc_status(code, details, md))
        if code == "DEADLINE_EXCEEDED":
            return self._timeout(timeout)
        if code in ("UNAVAILABLE", "CANCELLED") or (
                code in ("INTERNAL", "UNKNOWN") and any(h in details.lower() for h in _TRANSPORT_HINTS)):
            # CANCELLED from the server side (our own cancellation raises CancelledError): the
            # replica is shutting down
            return ReplicaLost(f"{self._where()} unavailable: {details[:200]}", self.replica_index)
        return errors.from_grpc_status(code, details, md)

    async def _call(self, method, msg, timeout: Optional[float]):
        task = asyncio.current_task()
        if task is not None:
            self._calls.add(task)
        try:
            return await method(msg, timeout=timeout, metadata=self._metadata)
        except asyncio.CancelledError:
            if task is not None and task in self._failed_tasks:
                task.uncancel()   # our cancellation, turned into this error: not the caller's
                raise ReplicaLost(f"{self._where()} stopped answering with the call in flight",
                                  self.replica_index) from None
            if self.closed and not (task and task.cancelling()):
                # Not the caller's cancellation: the channel was closed because the replica
                # exited, which cancels the calls still on it. Retried elsewhere.
                raise ReplicaLost(f"{self._where()} exited with the call in flight",
                                  self.replica_index) from None
            raise
        except self._grpc.aio.AioRpcError as e:
            raise self._map(e, timeout) from None
        finally:
            if task is not None:
                self._calls.discard(task)
                self._failed_tasks.discard(task)

    async def encode(self, request_id, tokens, options, timeout):
        # a TCP replica is a public server: floe.v1 (its model named as the public API does)
        msg = request_to_proto(request_id, options, tokens=tokens, model=self.model)
        return result_from_proto(await self._call(self._stub.Encode, msg, timeout))

    async def health(self, timeout):
        return await self._call(self._stub.HealthCheck, floe_pb2.HealthCheckRequest(), timeout)

    async def info(self, timeout):
        return await self._call(self._stub.GetReplicaInfo, floe_pb2.GetReplicaInfoRequest(), timeout)

    async def abort(self, request_id, timeout):
        try:
            reply = await self._call(self._stub.Abort, floe_pb2.AbortRequest(request_id=request_id),
                                     timeout)
        except FloeError:
            return False
        return reply.success

    def fail_pending(self, why: str) -> None:
        for task in list(self._calls):
            self._failed_tasks.add(task)
            task.cancel()

    @property
    def in_flight(self) -> int:
        return len(self._calls)

    async def close(self, grace=None):
        self.closed = True
        await self._channel.close(grace=grace)


def open_link(address: str, replica_index: int, token: str = "",
              receive_limit: int = 256 * 1024 * 1024, model: str = "", kind: str = "") -> ReplicaLink:
    """The link for ``address``: frames for ``unix:/path``, gRPC for ``host:port``; its calls
    are meant for ``model`` of ``kind`` (empty: whatever the replica serves)."""
    if address.startswith("unix:"):
        return FramesLink(address, replica_index, token, receive_limit, model, kind)
    return GrpcLink(address, replica_index, token, receive_limit, model, kind)
