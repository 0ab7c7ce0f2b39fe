"""A front-end worker's view of replicas that another process supervises.

With ``--frontend-workers N`` the main process of ``floe serve`` spawns, probes and restarts the
replicas (floe/fleet/replica_slot.py) and runs one front end; each extra front-end worker routes
to the same replicas through this class. It has the replica manager's request interface (encode,
abort, ready, status, replica_infos), so the EmbedService and the transports do not know which
kind of process they run in.

What it knows comes from ``ReplicaTable`` messages (floe/protocol.py) that the main process sends
at start, on every change and at least every health interval. The worker keeps its own channel
to each replica (a new one when the replica's generation changes), its own in-flight counts for
least-loaded balancing, and a local out-of-rotation mark after a failed call, lifted by the next
table that still says the replica is healthy (the supervisor probed it since).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Optional

from floe.config import Settings
from floe.models.spec import ModelSpec
from floe.proto import floe_pb2
from floe.protocol import ReplicaEndpoint, ReplicaTable
from floe.fleet.balance import Balancer, ReplicaLoad
from floe.fleet.replica_client import (ReplicaClient, coalesce_limits, link_key, load_fields,
                                       replica_info)
from floe.fleet.router import Routed, Router


class RemoteReplica:
    """One replica for the router (the ``Target`` of floe/fleet/router.py)."""

    def __init__(self, index: int, receive_limit: int, coalesce: Optional[dict] = None,
                 key: tuple[str, str] = ("", "")) -> None:
        self.index = index
        self.key = key   # (model, kind) every call on its link is meant for
        self.endpoint: Optional[ReplicaEndpoint] = None
        self.client: Optional[ReplicaClient] = None
        self.out_of_rotation = False
        self.closed = False   # the worker is stopping
        self._receive_limit = receive_limit
        self._coalesce = coalesce or {}
        self.changed = asyncio.Event()   # set (and replaced) on every table that touches it

    @property
    def healthy(self) -> bool:
        e = self.endpoint
        return bool(e and e.healthy and self.client is not None and not self.out_of_rotation)

    def load(self) -> ReplicaLoad:
        c = self.client
        return ReplicaLoad(self.index, self.healthy, c.in_flight_tokens if c else 0,
                           c.in_flight_requests if c else 0)

    def leave_rotation(self) -> None:
        self.out_of_rotation = True

    def may_recover(self) -> bool:
        e = self.endpoint
        return (not self.closed and e is not None
                and e.state in ("starting", "ready", "restarting"))

    async def crashed_under(self, client: ReplicaClient, seconds: float) -> bool:
        """True when the supervisor reports, within ``seconds``, that the process behind
        ``client`` is gone (a new generation, or the replica out of the ready state) and not
        because it was stopped."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while True:
            e = self.endpoint
            if self.client is not client or e is None or e.state != "ready":
                return not self.closed and (e is None or e.state != "stopped")
            left = deadline - loop.time()
            if left <= 0:
                return False
            waiter = self.changed
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(waiter.wait(), left)

    async def apply(self, e: ReplicaEndpoint) -> None:
        old, self.endpoint = self.endpoint, e
        stale = old is None or (old.generation, old.address, old.token) != (
            e.generation, e.address, e.token)
        if (stale or e.state != "ready") and self.client is not None:
            client, self.client = self.client, None
            await client.close()
        if e.state == "ready" and self.client is None:
            self.client = ReplicaClient(e.address, e.index, e.token,
                                        receive_limit=self._receive_limit, model=self.key[0],
                                        kind=self.key[1], **self._coalesce)
        if e.healthy:
            self.out_of_rotation = False
        self.changed.set()
        self.changed = asyncio.Event()

    async def close(self) -> None:
        self.closed = True
        if self.client is not None:
            client, self.client = self.client, None
            await client.close()


class RemoteReplicas(Routed):
    """The replica manager's request interface over replicas supervised elsewhere."""

    def __init__(self, settings: Settings, spec: ModelSpec, worker_index: int = 0) -> None:
        self.settings = settings
        self.spec = spec
        # the key of this model's rows in the replica table (no spec: every row is ours)
        self.model = spec.name if spec is not None else ""
        r = settings.replicas
        limit = 256 * 1024 * 1024
        key = link_key(spec) if spec is not None else ("", "")
        self.targets = [RemoteReplica(i, limit, coalesce_limits(settings), key)
                        for i in range(r.num_replicas)]
        self.router = Router(Balancer(r.load_balancing, start=worker_index), self.targets,
                             r.forward_timeout, r.replica_wait, r.split_min_tokens,
                             r.hand_back_min_tokens)
        self._stopped = False

    async def apply(self, table: ReplicaTable) -> None:
        for e in table.replicas:
            if e.model and self.model and e.model != self.model:
                continue   # another served model's replica
            if 0 <= e.index < len(self.targets):
                await self.targets[e.index].apply(e)

    def ready(self) -> bool:
        return not self._stopped and any(t.healthy for t in self.targets)

    async def stop(self) -> None:
        self._stopped = True
        for t in self.targets:
            await t.close()

    def status(self) -> dict[str, Any]:
        out = [{
            "index": t.index, "pid": t.endpoint.pid if t.endpoint else None,
            "state": t.endpoint.state if t.endpoint else "unknown", "healthy": t.healthy,
            "restarts": t.endpoint.restarts if t.endpoint else 0,
            "message": t.endpoint.message if t.endpoint else "",
            **load_fields(t.client),
        } for t in self.targets]
        return self.router.status(out, self.ready(), self._stopped)

    async def replica_infos(self) -> list[floe_pb2.ReplicaInfo]:
        def one(t: RemoteReplica):
            e = t.endpoint
            return replica_info(t.client, t.index, self.spec.name,
                                running=e is not None and e.state == "ready", healthy=t.healthy,
                                restarts=e.restarts if e else 0, pid=e.pid if e else None,
                                message=e.message if e else "")
        return list(await asyncio.gather(*(one(t) for t in self.targets)))
