"""The front end's connection to one replica process (floe.v1.Embedder over one grpc.aio channel).

``ReplicaClient.encode`` turns the replica's status back into exactly the FloeError the replica
raised (its kind travels in trailing metadata, see floe/errors.py), and marks the two outcomes the
router treats specially:

- ``ReplicaFailedError``: the replica, not the request, failed (connection refused or reset, the
  replica is shutting down). Embedding is idempotent, so the router retries once elsewhere.
- ``ReplicaTimeoutError``: the replica did not answer within forward_timeout. It is busy or hung,
  not dead: the request is answered 503 with Retry-After and not retried (that would double the
  load on an overloaded server); the supervisor's health probes decide whether it is hung.

Messages of these two name the replica's address for the log; clients never see them.
In-flight accounting (tokens and requests, read by the least_loaded balancer) is done here in one
try/finally, so it is exact whether the call succeeds, fails or is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Optional

import grpc

from floe import errors
from floe.errors import FloeError, UnavailableError
from floe.proto import floe_pb2, floe_pb2_grpc
from floe.protocol import EmbedResult, EncodeOptions, TokenBatch, request_to_proto, result_from_proto
from floe.fleet.coalesce import Coalescer
from floe.transport.grpc import channel_options
from floe.transport.hop import HopClient, HopClosedError, HopTimeoutError

# INTERNAL statuses whose details show a broken transport rather than an error the replica chose
# to report (gRPC reports a stream reset by a dying peer as INTERNAL on some paths).
_TRANSPORT_HINTS = ("rst_stream", "stream removed", "socket closed", "connection reset",
                    "broken pipe", "goaway", "eof")


# Seconds an exited replica's channel is kept open for the answers it sent before exiting.
CLOSE_GRACE_S = 2.0


class ReplicaFailedError(UnavailableError):
    """The replica failed to answer (not the request's fault); safe to retry on another replica."""

    def __init__(self, message: str, replica_index: int, cause: str = "") -> None:
        super().__init__(message)
        self.replica_index = replica_index
        self.cause = cause  # the gRPC code name


class ReplicaTimeoutError(UnavailableError):
    """The replica did not answer within forward_timeout."""

    def __init__(self, message: str, replica_index: int) -> None:
        super().__init__(message)
        self.replica_index = replica_index


def _has_kind(err: grpc.aio.AioRpcError) -> bool:
    return any(k == errors.KIND_METADATA_KEY for k, _ in (err.trailing_metadata() or ()))


class ReplicaClient:
    """One channel to one replica. Cheap to create; the supervisor makes one per (re)start."""

    def __init__(self, address: str, replica_index: int, token: str = "",
                 receive_limit: int = 256 * 1024 * 1024, coalesce_tokens: int = 0,
                 coalesce_items: int = 256, hop: str = "") -> None:
        self.address = address
        self.replica_index = replica_index
        # Encode calls go as frames on the replica's hop socket when it has one
        # (floe/transport/hop.py); health, info and abort always use gRPC
        self.hop = hop
        self._hop = HopClient(hop, token, receive_limit) if hop else None
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
        self._channel = grpc.aio.insecure_channel(address, options=options)
        self._stub = floe_pb2_grpc.EmbedderStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.in_flight_tokens = 0
        self.in_flight_requests = 0
        self.calls_in_flight = 0   # Encode calls on the wire (a merged call carries several requests)
        self.completed = 0   # calls that returned an embedding
        self.failed = 0      # calls that raised (any reason, cancellation included)
        # monotonic time of the last Encode the replica answered (an embedding or an error of its
        # own): proof of life that the supervisor weighs against a missed health probe
        self.last_answer = 0.0
        self.closed = False
        # requests sent in the same event-loop turn share one call (floe/fleet/coalesce.py)
        self._coalescer = Coalescer(self._call, coalesce_tokens, coalesce_items)

    def map_error(self, err: grpc.aio.AioRpcError, timeout: Optional[float]) -> FloeError:
        """The FloeError a failed call becomes."""
        code = err.code()
        details = err.details() or ""
        where = f"replica {self.replica_index} ({self.address})"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and not _has_kind(err):
            return ReplicaTimeoutError(f"{where} did not answer within {timeout:g} s"
                                       if timeout else f"{where} timed out", self.replica_index)
        if code == grpc.StatusCode.UNAVAILABLE or (
                code == grpc.StatusCode.CANCELLED and not _has_kind(err)):
            # CANCELLED from the server side (our own cancellation raises asyncio.CancelledError
            # instead): the replica is shutting down.
            return ReplicaFailedError(f"{where} unavailable: {details[:200]}", self.replica_index,
                                      code.name)
        if not _has_kind(err) and code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) and any(
                h in details.lower() for h in _TRANSPORT_HINTS):
            return ReplicaFailedError(f"{where} connection failed: {details[:200]}",
                                      self.replica_index, code.name)
        return errors.from_grpc_status(code.name, details, err.trailing_metadata())

    async def encode(self, tokens: TokenBatch, options: EncodeOptions, request_id: str,
                     timeout: Optional[float] = None) -> EmbedResult:
        """Embeds token ids on this replica, maybe inside a call merged with other requests of the
        same event-loop turn; raises FloeError."""
        n_tokens = tokens.total_tokens
        self.in_flight_tokens += n_tokens
        self.in_flight_requests += 1
        ok = False
        try:
            result = await self._coalescer.submit(tokens, options, request_id, timeout)
            ok = True
            return result
        finally:
            self.in_flight_tokens -= n_tokens
            self.in_flight_requests -= 1
            if ok:
                self.completed += 1
            else:
                self.failed += 1

    async def _call(self, tokens: TokenBatch, options: EncodeOptions, request_id: str,
                    timeout: Optional[float]) -> EmbedResult:
        """One Encode call; maps its failure to the FloeError it stands for."""
        msg = request_to_proto(request_id, options, tokens=tokens)
        if self._hop is not None:
            return await self._hop_call(msg, timeout)
        self.calls_in_flight += 1
        try:
            reply = await self._stub.Encode(msg, timeout=timeout, metadata=self._metadata)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self.closed and not (task and task.cancelling()):
                # Not the caller's cancellation: the supervisor closed this channel because the
                # replica exited, which cancels the calls still on it. The replica failed, not
                # the request: retried elsewhere like a reset connection.
                raise ReplicaFailedError(
                    f"replica {self.replica_index} ({self.address}) exited with the call in "
                    "flight", self.replica_index, "CANCELLED") from None
            raise
        except grpc.aio.AioRpcError as e:
            if _has_kind(e):
                self.last_answer = time.monotonic()
            raise self.map_error(e, timeout) from None
        finally:
            self.calls_in_flight -= 1
        self.last_answer = time.monotonic()
        return result_from_proto(reply)

    async def _hop_call(self, msg, timeout: Optional[float]) -> EmbedResult:
        """``_call`` over the hop socket: the same outcomes as over gRPC, the same errors."""
        self.calls_in_flight += 1
        try:
            reply = await self._hop.encode(msg, timeout)
        except HopClosedError as e:
            # refused, reset or closed under the call: the replica failed, not the request
            raise ReplicaFailedError(f"{self._where} unavailable: {e}", self.replica_index,
                                     "UNAVAILABLE") from None
        except HopTimeoutError:
            raise ReplicaTimeoutError(f"{self._where} did not answer within {timeout:g} s" if timeout
                                      else f"{self._where} timed out", self.replica_index) from None
        except FloeError as e:
            self.last_answer = time.monotonic()
            if e.kind is errors.ErrorKind.UNAVAILABLE:
                # a draining or stopping replica: retried elsewhere, as gRPC's UNAVAILABLE is
                raise ReplicaFailedError(f"{self._where} unavailable: {e.message[:200]}",
                                         self.replica_index, "UNAVAILABLE") from None
            raise
        finally:
            self.calls_in_flight -= 1
        self.last_answer = time.monotonic()
        return result_from_proto(reply)

    @property
    def _where(self) -> str:
        """The replica in error messages (logged; clients never see them)."""
        return f"replica {self.replica_index} ({self.hop or self.address})"

    @property
    def queued_requests(self) -> int:
        """Requests waiting for the end of this event-loop turn to be sent (merged or alone)."""
        return self._coalescer.queued

    async def health(self, timeout: float = 1.0) -> floe_pb2.HealthCheckResponse:
        """The replica's HealthCheck; raises a FloeError when it does not answer in time."""
        try:
            return await self._stub.HealthCheck(floe_pb2.HealthCheckRequest(), timeout=timeout,
                                                metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            raise self.map_error(e, timeout) from None

    async def info(self, timeout: float = 5.0) -> floe_pb2.GetReplicaInfoResponse:
        try:
            return await self._stub.GetReplicaInfo(floe_pb2.GetReplicaInfoRequest(), timeout=timeout,
                                                   metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            raise self.map_error(e, timeout) from None

    async def abort(self, request_id: str, timeout: float = 1.0) -> bool:
        if self._coalescer.abort(request_id):
            return True   # it was (part of) a merged call: failed here, the others go on
        try:
            reply = await self._stub.Abort(floe_pb2.AbortRequest(request_id=request_id),
                                           timeout=timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError:
            return False
        return reply.success

    async def close(self, grace: Optional[float] = None) -> None:
        """Closes the channel. ``grace``: seconds the calls still on it may take to finish: an
        exited replica's last answers may still sit unread in the socket when its exit is seen,
        and closing at once would cut them (a drained request reported as a replica failure)."""
        self.closed = True
        if self._hop is not None:
            await self._hop.close(grace)
        await self._channel.close(grace=grace)


def coalesce_limits(settings) -> dict:
    """ReplicaClient's merge limits from the settings tree: --coalesce-tokens, kept within one
    forward pass of the replica (its batch token budget and --max-batch-size)."""
    tokens = settings.replicas.coalesce_tokens
    if settings.batch.max_batch_tokens is not None:
        tokens = min(tokens, settings.batch.max_batch_tokens)
    return {"coalesce_tokens": tokens, "coalesce_items": settings.batch.max_batch_size}


def load_fields(client: Optional[ReplicaClient]) -> dict:
    """A replica's in-flight and completed counts as its router's channel sees them."""
    return {"in_flight_requests": client.in_flight_requests if client else 0,
            "in_flight_tokens": client.in_flight_tokens if client else 0,
            "completed": client.completed if client else 0}


async def replica_info(client: Optional[ReplicaClient], index: int, model: str, *, running: bool,
                       healthy: bool, restarts: int, pid: Optional[int], message: str
                       ) -> floe_pb2.ReplicaInfo:
    """One replica's own GetReplicaInfo (when it is running and answers within 2 s), overlaid
    with what its supervisor knows (health, restarts, pid, why); never its internal address."""
    info = floe_pb2.ReplicaInfo(replica_id=str(index), model=model)
    if client is not None and running:
        with contextlib.suppress(FloeError):
            reply = await client.info(timeout=2.0)
            if reply.replicas:
                info = reply.replicas[0]
    info.replica_id = str(index)
    info.address = ""   # internal: never shown to clients
    info.healthy = healthy
    info.ready = info.ready and healthy
    info.restarts = restarts
    if pid:
        info.pid = pid
    if message:
        info.status_message = message
    return info
