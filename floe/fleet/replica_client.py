"""The front end's handle on one replica: its link, its in-flight accounting, merged calls.

``ReplicaClient`` wraps one ``ReplicaLink`` (floe/fleet/link.py: frames on this machine, gRPC over
TCP; the errors and link outcomes are told apart there, once). Here:

- in-flight accounting (tokens and requests, read by the least_loaded balancer) in one
  try/finally, exact whether the call succeeds, fails or is cancelled;
- ``last_answer``: when the replica last answered an Encode (an embedding or an error of its
  own), the proof of life the supervisor weighs against a missed health probe;
- requests sent to the replica in the same event-loop turn share one call (coalesce.py), except
  a request sent ``alone`` (a retry after a replica died under it: it must not take innocent
  requests down with it a second time);
- handing back (``hand_back``, floe/fleet/router.py): the replica gives back queued rows of its
  calls that it has not started, another replica computes them (``Rehome``), and the call's
  answer is joined here (``interleave``), so the coalescer and the router above see
  a whole answer. Where the rows cannot be computed elsewhere, this replica gets them back in a
  call of their own: rows handed back are never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Optional

import numpy as np

from floe.errors import FloeError, InternalError, PoisonInputError
from floe.proto import floe_pb2
from floe.protocol import EmbedResult, EncodeOptions, HealthAnswer, Timings, TokenBatch, row_bytes
from floe.fleet.coalesce import Coalescer
from floe.fleet.link import LinkError, ReplicaLink, ReplicaLost, open_link

# Seconds an exited replica's link is kept open for the answers it sent before exiting.
CLOSE_GRACE_S = 2.0
# Seconds a replica has to answer a hand-back (it only takes rows out of its queue).
HAND_BACK_TIMEOUT_S = 2.0

log = logging.getLogger("floe.router")

# Computes handed-back rows on another replica: (tokens, options, request id, timeout).
Rehome = Callable[[TokenBatch, EncodeOptions, str, Optional[float]], Awaitable[EmbedResult]]


@dataclass(eq=False)
class _Call:
    """A call on the wire, as a hand-back needs it."""

    tokens: TokenBatch
    options: EncodeOptions
    timeout: Optional[float]
    handed: bool = False   # named in a hand-back already: its rows are asked for once
    rest: Optional[asyncio.Task] = None   # its handed-back rows, computed elsewhere


def link_key(spec) -> tuple[str, str]:
    """(model, kind) the calls to a model's replicas name (protocol.py EncodeCall)."""
    from floe.kinds import kind_of

    return spec.name, kind_of(spec).name


class ReplicaClient:
    """One link to one replica. Cheap to create; the supervisor makes one per (re)start."""

    def __init__(self, address: str, replica_index: int, token: str = "",
                 receive_limit: int = 256 * 1024 * 1024, coalesce_tokens: int = 0,
                 coalesce_items: int = 256, link: Optional[ReplicaLink] = None, model: str = "",
                 kind: str = "") -> None:
        self.address = address
        self.replica_index = replica_index
        self.link = link or open_link(address, replica_index, token, receive_limit, model, kind)
        self.in_flight_tokens = 0
        self.in_flight_requests = 0
        self.calls_in_flight = 0   # Encode calls on the wire (a merged call carries several requests)
        self.completed = 0   # requests that returned an embedding
        self.failed = 0      # requests that raised (any reason, cancellation included)
        self.last_answer = 0.0
        self._coalescer = Coalescer(self._call, coalesce_tokens, coalesce_items)
        self._calls: dict[str, _Call] = {}   # by request id, in the order sent
        self._handing: Optional[asyncio.Future] = None   # the hand-back on the wire

    @property
    def closed(self) -> bool:
        return self.link.closed

    async def encode(self, tokens: TokenBatch, options: EncodeOptions, request_id: str,
                     timeout: Optional[float] = None, alone: bool = False) -> EmbedResult:
        """Embeds token ids on this replica, inside a call merged with other requests of the same
        event-loop turn unless ``alone``; raises the replica's FloeError or a LinkError."""
        n_tokens = tokens.total_tokens
        self.in_flight_tokens += n_tokens
        self.in_flight_requests += 1
        ok = False
        try:
            if alone:
                result = await self._call(tokens, options, request_id, timeout, alone=True)
            else:
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
                    timeout: Optional[float], alone: bool = False) -> EmbedResult:
        call = _Call(tokens, options, timeout)
        named = not alone and tokens.spans is None and request_id not in self._calls
        if named:   # a hand-back may name it (an id already in flight here never is)
            self._calls[request_id] = call
        self.calls_in_flight += 1
        try:
            try:
                result = await self.link.encode(request_id, tokens, options, timeout)
            except LinkError:
                raise
            except FloeError:
                self.last_answer = time.monotonic()   # the replica's own answer: it is alive
                raise
            finally:
                self.calls_in_flight -= 1
            self.last_answer = time.monotonic()
            if result.handed_back is not None:
                result = await self._join(call, named, result, request_id)
            return result
        finally:
            if named:
                self._calls.pop(request_id, None)
            if call.rest is not None and not call.rest.done():
                call.rest.cancel()   # the call failed or was withdrawn: so is its rest

    async def _join(self, call: "_Call", named: bool, kept: EmbedResult,
                    request_id: str) -> EmbedResult:
        """The call's whole answer from the replica's and its handed-back rows'. A call this
        client never named (another in flight had its id) gets them here."""
        items = kept.handed_back
        if named and call.rest is None and self._handing is not None:
            await asyncio.shield(self._handing)   # its hand-back's answer is on the wire
        if call.rest is None:   # that answer was lost, or never meant for this call: here
            call.rest = asyncio.ensure_future(self._call(
                call.tokens.pick(items), call.options, request_id + "/back", call.timeout, True))
        rest = await call.rest
        try:
            return interleave(kept, rest, items)
        except ValueError as e:
            raise InternalError(f"joining a handed-back call failed: {e}") from None

    async def hand_back(self, max_tokens: int, min_tokens: int, rehome: Rehome) -> int:
        """Asks the replica for up to ``max_tokens`` of its queued, unstarted rows of this
        client's calls (the most recent first), and has ``rehome`` compute them; returns how
        many rows it gave. One at a time."""
        if self._handing is not None:
            return 0
        named = [rid for rid, c in reversed(self._calls.items()) if not c.handed]
        if not named:
            return 0
        for rid in named:
            self._calls[rid].handed = True
        self._handing = asyncio.get_running_loop().create_future()
        try:
            given = await self.link.hand_back(named, max_tokens, min_tokens, HAND_BACK_TIMEOUT_S)
            rows = 0
            for rid, items in given:
                call = self._calls.get(rid)
                if call is None or call.rest is not None:
                    continue   # gone (its join falls back), or a reply naming it twice
                call.rest = asyncio.ensure_future(self._rest(call, rid, items, rehome))
                rows += len(items)
            return rows
        finally:
            self._handing.set_result(None)
            self._handing = None

    async def _rest(self, call: "_Call", request_id: str, items: np.ndarray,
                    rehome: Rehome) -> EmbedResult:
        """A call's handed-back rows, computed on another replica; on this one again if that
        fails for any reason but the call's own withdrawal."""
        tokens = call.tokens.pick(items)
        try:
            return await rehome(tokens, call.options, request_id + "/rest", call.timeout)
        except PoisonInputError as e:
            # one of these rows crashed two replicas: the call's own requests are the suspects,
            # each retried alone by the router as after a crash (never all answered as poison)
            raise ReplicaLost(f"handed-back rows crashed the model ({e.message})",
                              self.replica_index) from None
        except FloeError as e:
            log.warning("handed-back rows of %s: %s; computing them on replica %d", request_id,
                        e.message, self.replica_index)
        return await self._call(tokens, call.options, request_id + "/back", call.timeout, True)

    @property
    def queued_requests(self) -> int:
        """Requests waiting for the end of this event-loop turn to be sent (merged or alone)."""
        return self._coalescer.queued

    async def health(self, timeout: float = 1.0) -> HealthAnswer:
        """The replica's HealthCheck; raises a FloeError when it does not answer in time."""
        return await self.link.health(timeout)

    async def info(self, timeout: float = 5.0) -> floe_pb2.GetReplicaInfoResponse:
        return await self.link.info(timeout)

    async def abort(self, request_id: str, timeout: float = 1.0) -> bool:
        if self._coalescer.abort(request_id):
            return True   # it was (part of) a merged call: failed here, the others go on
        return await self.link.abort(request_id, timeout)

    def fail_pending(self, why: str) -> None:
        """The replica stopped answering: its calls in flight fail now as ReplicaLost."""
        self.link.fail_pending(why)

    async def close(self, grace: Optional[float] = None) -> None:
        await self.link.close(grace)


def interleave(kept: EmbedResult, rest: EmbedResult, rest_items: np.ndarray) -> EmbedResult:
    """One call's answer from a replica's (``kept``: every item but ``rest_items``, in item
    order) and the answer for the items it handed back (``rest``, in ``rest_items``'s order).
    Timings are the longer of the two."""
    n = kept.n + rest.n
    rest_items = np.asarray(rest_items, dtype=np.int64)
    if kept.sparse is not None or rest.sparse is not None or rest.n != rest_items.size \
            or (kept.dim, kept.dtype) != (rest.dim, rest.dtype) or \
            (rest_items.size and (rest_items.min() < 0 or rest_items.max() >= n)):
        raise ValueError("the handed-back answer does not fit the replica's")
    mine = np.ones(n, dtype=bool)
    mine[rest_items] = False
    size = row_bytes(kept.dtype, kept.dim)
    out = np.empty((n, size), dtype=np.uint8)
    out[mine] = np.frombuffer(kept.data, dtype=np.uint8).reshape(kept.n, size)
    out[rest_items] = np.frombuffer(rest.data, dtype=np.uint8).reshape(rest.n, size)
    counts = np.empty(n, dtype=np.int64)
    counts[mine] = kept.token_counts
    counts[rest_items] = rest.token_counts
    return EmbedResult(n=n, dim=kept.dim, dtype=kept.dtype, data=out.tobytes(),
                       token_counts=counts, model=kept.model, request_id=kept.request_id,
                       timings=Timings(*(max(getattr(kept.timings, f), getattr(rest.timings, f))
                                         for f in ("tokenize_s", "queue_s", "inference_s",
                                                   "total_s"))))


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
