"""The link from a front end to one replica it manages: one interface, one error table.

``open_link(address, ...)`` returns a ``ReplicaLink`` for a replica's address: frames
(floe/transport/frames.py) on ``unix:/path``, the replica's socket on this machine, or on
``host:port`` (``--replica-transport tcp``: a replica another host reaches, behind the same
launch token). It answers four calls (``encode``: token ids and options in, an EmbedResult out;
``health``, ``info``, ``abort``) with floe's own messages (protocol.py ``EncodeCall``, named for
a model and kind); the public floe.v1 API is the front end's, and a standalone replica's.

What can go wrong is told apart here, once; the router and the supervisor never see a
transport's own exception:

- the replica's own FloeError (validation, too large, overloaded, an engine failure...) arrives
  as exactly that error, its kind, message, param and Retry-After rebuilt from one codec
  (errors.error_fields);
- ``ReplicaLost``: the connection was refused, reset or closed with the call on it (the replica
  died, or was closed by its supervisor): not the request's fault, retried elsewhere;
- ``ReplicaDraining``: the replica answered that it is stopping: retried elsewhere;
- ``ReplicaTimeout``: no answer within the timeout: busy or hung, not dead (the supervisor's
  probes decide which); the call is cancelled on the replica.

Messages of these three name the replica for the log; clients never see them.
"""

from __future__ import annotations

import abc
from typing import Optional

import numpy as np

from floe.errors import ErrorKind, FloeError, UnavailableError
from floe.proto import floe_pb2
from floe.protocol import (AbortCall, EmbedResult, EncodeOptions, Frame, HandBackCall, HealthAnswer,
                           HealthCall, InfoCall, TokenBatch, encode_call, handed_from_answer,
                           result_from_answer)


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
    async def health(self, timeout: float) -> HealthAnswer: ...

    @abc.abstractmethod
    async def info(self, timeout: float) -> floe_pb2.GetReplicaInfoResponse: ...

    @abc.abstractmethod
    async def abort(self, request_id: str, timeout: float) -> bool: ...

    @abc.abstractmethod
    async def hand_back(self, request_ids: list[str], max_tokens: int, min_tokens: int,
                        timeout: float) -> list[tuple[str, np.ndarray]]:
        """The replica's queued rows of these calls it gave back (HandBackCall): (request id,
        items) per call."""

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
    """A managed replica: frames on its Unix socket, or on TCP (host:port)."""

    def __init__(self, address: str, replica_index: int, token: str, receive_limit: int,
                 model: str = "", kind: str = "") -> None:
        super().__init__(address, replica_index, model, kind)
        from floe.transport.frames import FramesConnection

        self._conn = FramesConnection(address, token, receive_limit)

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

    async def hand_back(self, request_ids, max_tokens, min_tokens, timeout):
        reply = await self._call(Frame.HAND_BACK, HandBackCall(request_ids, max_tokens, min_tokens),
                                 timeout)
        return handed_from_answer(reply)

    def fail_pending(self, why: str) -> None:
        self._conn.fail_pending(why)

    @property
    def in_flight(self) -> int:
        return self._conn.in_flight

    async def close(self, grace=None):
        self.closed = True
        await self._conn.close(grace)


def open_link(address: str, replica_index: int, token: str = "",
              receive_limit: int = 256 * 1024 * 1024, model: str = "", kind: str = "") -> ReplicaLink:
    """The link to the managed replica at ``address`` (``unix:/path`` or ``host:port``); its
    calls are meant for ``model`` of ``kind`` (empty: whatever the replica serves)."""
    return FramesLink(address, replica_index, token, receive_limit, model, kind)
