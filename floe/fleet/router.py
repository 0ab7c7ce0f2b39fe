"""The router: pick a replica, send the request, retry once elsewhere when the replica failed.

It knows replicas only through the small ``Target`` interface (a supervisor slot in production,
a fake in the unit tests), and decides by the kind of error:

- ``ReplicaFailedError`` (connection lost, replica shutting down), an OverloadedError from a
  replica's own queue, or an InternalError after which the replica's process is seen to exit:
  nothing useful was computed, so the request goes once to another healthy replica;
- ``ReplicaTimeoutError``: 503 with Retry-After, not retried (the replica is busy or hung; the
  supervisor finds out which) and the input is not blamed;
- anything else (validation, too large, an engine error the replica survived) is the answer.

When no healthy replica can take an attempt but one may come back (it is starting or
restarting, or a failed call took it out of rotation until its next good probe), the request
waits up to ``replica_wait`` seconds for it instead of failing at once: on a loaded machine a
single replica misses a probe or a connection handshake, and a client indexing a corpus should
not see that as a 503. A replica given up (crash loop) or stopping is not waited for. The
replica a failed attempt left, once back in rotation, may take the retry: with one replica
there is nowhere else to go.

Client-facing messages never name replica addresses; the log line does.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Optional, Protocol, Sequence

from floe import metrics
from floe.errors import FloeError, InternalError, OverloadedError, UnavailableError
from floe.protocol import EmbedResult, EncodeOptions, TokenBatch
from floe.fleet.balance import Balancer, ReplicaLoad
from floe.fleet.client import ReplicaClient, ReplicaFailedError, ReplicaTimeoutError

log = logging.getLogger("floe.router")


class Target(Protocol):
    index: int

    @property
    def client(self) -> Optional[ReplicaClient]: ...

    def load(self) -> ReplicaLoad: ...

    def leave_rotation(self) -> None:
        """Takes the replica out of rotation until its next good health probe."""

    def may_recover(self) -> bool:
        """True while the replica, if not in rotation now, may come back (starting, restarting,
        or out of rotation after a failed call); False once given up or stopping."""

    async def died_within(self, client: ReplicaClient, seconds: float) -> bool:
        """True when the process behind ``client`` exits within ``seconds``."""


# How often a request waiting for a replica to come back looks again: the balancer's pick is a
# few comparisons, and a tenth of a second is small next to a restart or a probe interval.
WAIT_POLL_S = 0.1


class Router:
    def __init__(self, balancer: Balancer, targets: Sequence[Target], forward_timeout: float,
                 replica_wait: float) -> None:
        self.balancer = balancer
        self.targets = list(targets)
        self.forward_timeout = forward_timeout
        self.replica_wait = replica_wait
        self._routes: dict[str, Target] = {}   # request id -> replica running it (for abort)
        self.retried = 0          # requests that succeeded on their retry replica
        self.failed_retries = 0   # requests whose retry failed too

    def _pick(self, exclude: list[int]) -> Optional[Target]:
        i = self.balancer.pick([t.load() for t in self.targets], exclude)
        return None if i is None else self.targets[i]

    async def _next_target(self, exclude: list[int]) -> Optional[Target]:
        """A healthy replica not in ``exclude``, waiting up to ``replica_wait`` seconds for one
        that may come back; None when there is none to wait for or the wait ran out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.replica_wait
        while True:
            target = self._pick(exclude)
            if target is not None and target.client is not None:
                return target
            if loop.time() >= deadline or not any(
                    t.may_recover() for t in self.targets if t.index not in exclude):
                return None
            await asyncio.sleep(WAIT_POLL_S)

    async def encode(self, tokens: TokenBatch, options: EncodeOptions, request_id: str) -> EmbedResult:
        tried: list[int] = []
        exclude: list[int] = []   # tried replicas the retry must not go back to
        last: Optional[FloeError] = None
        died = 0
        try:
            for attempt in range(2):
                target = await self._next_target(exclude)
                if target is None:
                    break
                client = target.client
                self._routes[request_id] = target
                comes_back = False   # this replica may take the retry once back in rotation
                try:
                    result = await client.encode(tokens, options, request_id,
                                                 timeout=self.forward_timeout)
                except ReplicaTimeoutError as e:
                    log.warning("request %s: %s; answered 503", request_id, e.message)
                    raise UnavailableError(
                        f"the model did not answer within {self.forward_timeout:g} s; the server "
                        "is busy, retry later") from None
                except ReplicaFailedError as e:
                    if e.cause in ("UNAVAILABLE", "CANCELLED") and target.client is client:
                        target.leave_rotation()
                        comes_back = True
                    last = e
                except OverloadedError as e:
                    last = e
                except InternalError as e:
                    if not await target.died_within(client, 1.0):
                        raise
                    died += 1
                    comes_back = True   # as its restarted process
                    last = e
                else:
                    if attempt:
                        self.retried += 1
                        metrics.RETRIES.inc()
                    return result
                tried.append(target.index)
                if not comes_back:
                    exclude.append(target.index)
                log.warning("request %s failed on replica %d (%s); %s", request_id, target.index,
                            last.message if last else "?",
                            "retrying" if attempt == 0 else "giving up")
        finally:
            self._routes.pop(request_id, None)
        if tried:
            if len(tried) > 1:
                self.failed_retries += 1
                metrics.FAILED_RETRIES.inc()
        if died == 2:
            raise InternalError("the request failed twice, and each time the replica running it "
                                "exited; it is not retried further")
        if isinstance(last, OverloadedError):
            raise OverloadedError("every replica tried is at its queue limit, retry later",
                                  retry_after=last.retry_after or 1.0)
        raise UnavailableError("no healthy replica could take the request, retry later")

    def status(self, replicas: list[dict], ready: bool, stopping: bool) -> dict:
        """The /info summary of the replicas behind this router (``replicas``: one dict each,
        with at least ``index``, ``state`` and ``healthy``), with the router's own counters."""
        reason = "" if ready else ("stopping" if stopping else "no healthy replica: " + "; ".join(
            f"replica {r['index']} {r['state']}" for r in replicas))
        return {"ready": ready, "reason": reason, "load_balancing": self.balancer.policy,
                "healthy_replicas": sum(bool(r["healthy"]) for r in replicas),
                "num_replicas": len(replicas), "retried_requests": self.retried,
                "failed_retries": self.failed_retries, "replicas": replicas}

    async def abort(self, request_id: str) -> bool:
        """Asks the replica running ``request_id`` to drop its queued sequences."""
        target = self._routes.get(request_id)
        if target is None or target.client is None:
            return False
        return await target.client.abort(request_id)
