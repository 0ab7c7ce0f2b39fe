"""The replica manager: N replica processes of one model behind one endpoint.

It only wires the parts, each in its own module:

- placement.py (pure) decides where each replica runs (GPU and memory share, or CPU cores);
- supervisor.py owns one slot each: spawn, handshake, watch, probe, restart, give up;
- router.py picks a replica per request (balance.py's pure policy) and retries once;
- client.py is the channel to one replica.

Replicas listen on Unix sockets in a private directory (mode 0700) by default, and each requires
a per-launch token, so only this manager can use them; ``--replica-transport tcp`` binds
replica_host:start_port + i instead (still token-protected).

Lifecycle: ``start()`` returns once one replica is ready (ReplicaStartError if none can be);
``stop()`` sends SIGTERM to every replica (each drains its own in-flight work) and SIGKILL after
the drain timeout. Admission and the front end's drain live in floe/frontend/admission.py.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
import tempfile
from typing import Any, Optional

from floe.config import Settings
from floe.errors import ReplicaStartError
from floe.models.spec import ModelSpec
from floe.proto import floe_pb2
from floe.protocol import EmbedResult, EncodeOptions, TokenBatch
from floe.fleet.balance import Balancer
from floe.fleet.placement import plan_placement, usable_cores, visible_gpus
from floe.fleet.client import CLOSE_GRACE_S, load_fields, replica_info
from floe.fleet.router import Router
from floe.fleet.supervisor import ReplicaSlot
from floe.transport.grpc import grpc_target

log = logging.getLogger("floe.manager")


class ReplicaManager:
    """Starts, routes to and stops the replica processes of one model."""

    def __init__(self, settings: Settings, spec: ModelSpec) -> None:
        self.settings = settings
        self.spec = spec
        r = settings.replicas
        placements = plan_placement(settings, visible_gpus(settings.model.device), usable_cores())
        self._socket_dir: Optional[str] = None
        if r.replica_transport == "unix":
            self._socket_dir = tempfile.mkdtemp(prefix="floe-replicas-")  # mode 0700
            addresses = [f"unix:{self._socket_dir}/replica-{i}.sock" for i in range(r.num_replicas)]
        else:
            addresses = [grpc_target(r.replica_host, r.start_port + i) for i in range(r.num_replicas)]
        self.slots = [ReplicaSlot(i, addresses[i], placements[i], settings, secrets.token_urlsafe(24))
                      for i in range(r.num_replicas)]
        self.router = Router(Balancer(r.load_balancing), self.slots, r.forward_timeout,
                             r.replica_wait)
        self._tasks: list[asyncio.Task] = []
        self._stopped = False

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Starts every replica; returns when one is ready, raises ReplicaStartError if none is."""
        self._tasks = [asyncio.create_task(s.supervise(), name=f"floe-replica-{s.index}")
                       for s in self.slots]
        waits = {asyncio.create_task(s.ready_event.wait()): s for s in self.slots}
        pending = set(waits)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(waits[t].state == "ready" for t in done):
                for t in pending:
                    t.cancel()
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
        for s in self.slots:
            s.stopping = True
            s.healthy = False
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(s.terminate(grace) for s in self.slots))
        for s in self.slots:
            for t in s.io_tasks:
                t.cancel()
            if s.client:
                await s.client.close(grace=CLOSE_GRACE_S)
                s.client = None
            if s.state != "failed":
                s.state = "stopped"
        if self._socket_dir:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    # -- requests -------------------------------------------------------------------------------

    async def encode(self, tokens: TokenBatch, options: EncodeOptions, request_id: str) -> EmbedResult:
        return await self.router.encode(tokens, options, request_id)

    async def abort(self, request_id: str) -> bool:
        return await self.router.abort(request_id)

    # -- introspection --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """A JSON-able summary for /info (behind the API key): every replica's state and why."""
        out = [{
            "index": s.index,
            "pid": s.proc.pid if s.proc and s.proc.returncode is None else None,
            "state": s.state, "healthy": s.healthy, "restarts": s.restarts,
            "last_exit": s.last_exit, "message": s.message,
            "stderr_tail": list(s.stderr_tail) if s.state == "failed" else [],
            **load_fields(s.client),
            "cuda_visible_devices": s.placement.cuda_visible_devices,
            "gpu_memory_fraction": s.placement.gpu_memory_fraction,
            "cpu_cores": s.placement.cpu_cores, "threads": s.placement.threads,
        } for s in self.slots]
        return self.router.status(out, self.ready(), self._stopped)

    async def replica_infos(self) -> list[floe_pb2.ReplicaInfo]:
        """Each replica's own GetReplicaInfo, with the manager's view (restarts, health, why)."""
        def one(s: ReplicaSlot):
            alive = s.proc is not None and s.proc.returncode is None
            return replica_info(s.client, s.index, self.spec.name, running=s.state == "ready",
                                healthy=s.healthy, restarts=s.restarts,
                                pid=s.proc.pid if alive else None, message=s.message)
        return list(await asyncio.gather(*(one(s) for s in self.slots)))
