"""The replica manager: N replica processes of one model behind one endpoint.

It only wires the parts, each in its own module:

- placement.py (pure) decides where each replica runs (GPU and memory share, or CPU cores);
- replica_slot.py: one ``ReplicaSlot`` per replica, which owns that replica's process, state,
  client and rotation (the lifecycle itself is floe/child_process.py's ``ChildProcess``);
- router.py picks a replica per request (balance.py's pure policy) and retries once;
- replica_client.py is the channel to one replica.

Replicas listen on Unix sockets in a private directory (mode 0700) by default, and each requires
a per-launch token, so only this manager can use them; ``--replica-transport tcp`` binds
replica_host:start_port + i instead (still token-protected).

Lifecycle: ``start()`` returns once one replica is ready (ReplicaStartError if none can be);
``stop()`` asks every slot to stop (SIGTERM: each replica drains its own in-flight work; SIGKILL
after the drain timeout). The manager never writes a slot's state; it reads it, and serializes
it once (``table()``) for the front-end workers, who get it from ``tables()``: on every change a
slot reports and at least every health interval. Admission and the front end's drain live in
floe/frontend/admission.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import shutil
import tempfile
from typing import Any, AsyncIterator, Optional

from floe.config import Settings
from floe.errors import ReplicaStartError
from floe.models.spec import ModelSpec
from floe.proto import floe_pb2
from floe.protocol import ReplicaTable
from floe.resolve import Hardware, resolve_batch
from floe.fleet.balance import Balancer
from floe.fleet.placement import plan_placement
from floe.fleet.replica_client import link_key, load_fields, replica_info
from floe.fleet.router import Routed, Router
from floe.fleet.replica_slot import ReplicaSlot
from floe.transport.grpc import grpc_target

log = logging.getLogger("floe.manager")


class ReplicaManager(Routed):
    """Starts, routes to and stops the replica processes of one model."""

    def __init__(self, settings: Settings, spec: ModelSpec,
                 hardware: Optional[Hardware] = None) -> None:
        hardware = hardware or Hardware.detect(settings.model.device)
        # the replicas receive a settled batch section (floe serve resolved it already: then
        # this is the same tree); they decide no default of their own
        batch = resolve_batch(settings.batch, hardware.on_gpu, spec.max_seq_length)
        if batch is not settings.batch:
            settings = dataclasses.replace(settings, batch=batch)
        self.settings = settings
        self.spec = spec
        r = settings.replicas
        placements = plan_placement(settings, list(hardware.gpus), list(hardware.cores))
        self._socket_dir: Optional[str] = None
        if r.replica_transport == "unix":
            self._socket_dir = tempfile.mkdtemp(prefix="floe-replicas-")  # mode 0700
            addresses = [f"unix:{self._socket_dir}/replica-{i}.sock" for i in range(r.num_replicas)]
        else:
            addresses = [grpc_target(r.replica_host, r.start_port + i) for i in range(r.num_replicas)]
        self._changed = asyncio.Event()   # set by any slot's change; cleared by tables()
        key = link_key(spec)
        self.slots = [ReplicaSlot(i, addresses[i], placements[i], settings,
                                  secrets.token_urlsafe(24), on_change=self._changed.set, key=key)
                      for i in range(r.num_replicas)]
        self.router = Router(Balancer(r.load_balancing), self.slots, r.forward_timeout,
                             r.replica_wait, r.split_min_tokens,
                             r.hand_back_min_tokens)
        self._stopped = False

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Starts every replica; returns when one is ready, raises ReplicaStartError if none is."""
        for s in self.slots:
            s.start()
        # each slot's ready_event: ready, or given up (then the next one is awaited)
        for outcome in asyncio.as_completed([s.ready_event.wait() for s in self.slots]):
            await outcome
            if any(s.state == "ready" for s in self.slots):
                return
        reasons = "; ".join(f"replica {s.index}: {s.message}" for s in self.slots)
        await self.stop()
        raise ReplicaStartError(f"no replica could be started: {reasons}")

    def ready(self) -> bool:
        return not self._stopped and any(s.healthy for s in self.slots)

    async def stop(self, grace: Optional[float] = None) -> None:
        """Stops supervision and the replicas: SIGTERM, SIGKILL after ``grace`` seconds
        (default: the drain timeout, which is how long a replica drains)."""
        if grace is None:
            grace = self.settings.server.drain_timeout + 2.0
        self._stopped = True
        await asyncio.gather(*(s.stop(grace) for s in self.slots))
        if self._socket_dir:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    def table(self) -> ReplicaTable:
        """Every slot as the front-end workers' routers need it (floe/fleet/remote.py), keyed by
        this model's name (a worker serving several models routes each to its own)."""
        return ReplicaTable(tuple(dataclasses.replace(s.endpoint(), model=self.spec.name)
                                  for s in self.slots))

    async def tables(self, every: float) -> AsyncIterator[ReplicaTable]:
        """The table now, then after every change a slot reports and at least every ``every``
        seconds (a worker's own out-of-rotation marks are lifted by the next healthy table).
        One reader: it clears the change event."""
        while True:
            self._changed.clear()
            yield self.table()
            # a change made while the table was being sent sets the event: sent again at once
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), every)

    # -- introspection --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """A JSON-able summary for /info (behind the API key): every replica's state and why."""
        out = [{
            "index": s.index,
            "pid": s.pid,
            "state": s.state, "healthy": s.healthy, "restarts": s.restarts,
            "last_exit": s.last_exit, "message": s.message,
            "stderr_tail": list(s.stderr_tail) if s.state == "failed" else [],
            **load_fields(s.client),
            "cuda_visible_devices": s.placement.cuda_visible_devices,
            "gpu_memory_fraction": s.placement.gpu_memory_fraction,
            "cpu_cores": s.placement.cpu_cores, "threads": s.placement.threads,
            **s.runs,   # engine, dtype, device, attention: what its hello said
        } for s in self.slots]
        return self.router.status(out, self.ready(), self._stopped)

    async def replica_infos(self) -> list[floe_pb2.ReplicaInfo]:
        """Each replica's own GetReplicaInfo, with the manager's view (restarts, health, why)."""
        def one(s: ReplicaSlot):
            return replica_info(s.client, s.index, self.spec.name, running=s.state == "ready",
                                healthy=s.healthy, restarts=s.restarts, pid=s.pid,
                                message=s.message)
        return list(await asyncio.gather(*(one(s) for s in self.slots)))
