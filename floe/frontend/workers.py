"""Extra front-end processes: ``floe serve --frontend-workers N``.

The main process runs the replica manager (placement, supervision, probes) and one front end;
this module keeps the other N - 1 front ends (``python -m floe.frontend.worker``) running and
tells them where the replicas are. Every front end serves the same public ports:

- HTTP: one socket, bound by the main process (floe/frontend/server.py ``bind_http``) and
  inherited by every worker; the kernel hands each new connection to one of the processes
  waiting in accept, and a worker that dies leaves the queue of pending connections intact.
- gRPC: every process binds the same port with SO_REUSEPORT (``share_port`` in
  floe/transport/grpc.py, only when there are several front ends), and the kernel spreads new
  connections over them.

Each worker routes to every replica with its own channels and its own in-flight counts
(floe/fleet/remote.py); its balancer starts at its own index, so idle-time requests of
different workers do not all land on replica 0.

Who owns what: each ``FrontendWorker`` is a ``ChildProcess`` (floe/child_process.py: spawn with
a ``FrontendLaunch`` and the HTTP socket, ``FrontendHello`` handshake, its JSON log lines
re-emitted, restart with the replicas' backoff, given up after --max-restarts in
--restart-window while floe serve keeps serving with the others). Only the worker's stdin is
its own: the replica table (floe/protocol.py ``ReplicaTable``, serialized once by the manager)
goes first at every spawn, then from ``FrontendWorkers``' one publisher on every change the
manager reports and every health interval (``ReplicaManager.tables``); stdin closing tells a
worker the main process is gone. A dead worker's live gauges are dropped from the shared metrics.

Lifecycle: ``start()`` returns when every worker said hello (a worker that cannot start is a
start-up error, with its exit status and stderr); on SIGTERM the main process calls
``begin_drain()`` at once (every front end drains in parallel) and ``stop()`` after its own drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
from typing import Any, Callable, Optional, Sequence

from floe.config import Settings, settings_to_dict
from floe.errors import WorkerStartError
from floe.protocol import FrontendHello, FrontendLaunch, ReplicaTable
from floe.child_process import ChildProcess, Command

log = logging.getLogger("floe.frontend.workers")


class FrontendWorker(ChildProcess):
    """One extra front-end process, fed the replica table on its stdin."""

    HELLO = FrontendHello

    def __init__(self, launch: FrontendLaunch, http_socket: Optional[socket.socket],
                 settings: Settings, table_line: Callable[[], bytes]) -> None:
        super().__init__(f"front-end worker {launch.index}", settings.replicas,
                         f"floe.frontend.worker.{launch.index}")
        self.launch = launch
        self.http_socket = http_socket
        self._table_line = table_line

    def _command(self) -> Command:
        env = {**os.environ, FrontendLaunch.ENV: self.launch.to_json()}
        fds = (self.http_socket.fileno(),) if self.http_socket is not None else ()
        # the worker serves once it knows the replicas: the table goes first
        return Command([sys.executable, "-m", "floe.frontend.worker"], env, fds,
                       stdin=self._table_line())

    def _refusal(self) -> Optional[str]:
        # a worker that never started is floe serve's start-up error, not a restart loop
        return "could not start"

    async def _on_exit(self) -> None:
        _mark_dead(self.launch.metrics_dir, self.proc.pid)

    async def send(self, line: bytes) -> None:
        p = self.proc
        if p is None or p.returncode is not None or p.stdin is None:
            return
        try:
            p.stdin.write(line)
            await asyncio.wait_for(p.stdin.drain(), 5.0)
        except (ConnectionError, asyncio.TimeoutError, RuntimeError):
            pass   # the worker is exiting; its supervision restarts it


class FrontendWorkers:
    """The extra front-end processes and the one publisher of the replica table to them."""

    def __init__(self, models: Sequence[tuple[Settings, Any]], http_socket: Optional[socket.socket],
                 count: int, metrics_dir: Optional[str]) -> None:
        """``models``: each served model's resolved settings and replica manager, the first
        being ``--model``'s (its settings govern the workers)."""
        self.settings = settings = models[0][0]
        self.managers = [m for _, m in models]
        trees = tuple(settings_to_dict(s) for s, _ in models) if len(models) > 1 else ()
        self.workers = [
            FrontendWorker(FrontendLaunch(settings=settings_to_dict(settings), index=i,
                                          frontends=count + 1, parent_pid=os.getpid(),
                                          http_fd=http_socket.fileno() if http_socket else None,
                                          metrics_dir=metrics_dir, models=trees),
                           http_socket, settings, self._table_line)
            for i in range(1, count + 1)]
        self._tables = [m.table() for m in self.managers]   # each model's latest
        self._publishers: list[asyncio.Task] = []

    def _table_line(self) -> bytes:
        """Every model's replicas in one table (each row keyed by its model)."""
        self._tables = [m.table() for m in self.managers]
        return self._line()

    def _line(self) -> bytes:
        rows = tuple(e for t in self._tables for e in t.replicas)
        return (ReplicaTable(rows).to_line() + "\n").encode()

    async def start(self) -> None:
        for w in self.workers:
            w.start()
        self._publishers = [asyncio.create_task(self._publish(k), name=f"floe-frontend-publish-{k}")
                            for k in range(len(self.managers))]
        await asyncio.gather(*(w.ready_event.wait() for w in self.workers))
        failed = [w for w in self.workers if w.state == "failed"]
        if failed:
            await self.stop(grace=2.0)
            raise WorkerStartError("; ".join(f"{w.name} {w.message}" for w in failed))
        log.info("%d front-end worker processes ready (pids %s)", len(self.workers),
                 ", ".join(str(w.pid) for w in self.workers))

    async def _publish(self, k: int) -> None:
        """Model k's table on every change and health interval, sent with the others' latest."""
        async for table in self.managers[k].tables(self.settings.replicas.health_interval):
            self._tables[k] = table
            line = self._line()
            await asyncio.gather(*(w.send(line) for w in self.workers))

    def begin_drain(self) -> None:
        """SIGTERM to every worker: each turns unready and drains its own in-flight requests."""
        for w in self.workers:
            w.begin_stop()

    async def stop(self, grace: Optional[float] = None) -> None:
        if grace is None:
            grace = self.settings.server.drain_timeout + 2.0
        # the publisher goes last: a draining worker still follows the replicas
        await asyncio.gather(*(w.stop(grace) for w in self.workers))
        for task in self._publishers:
            task.cancel()
        await asyncio.gather(*self._publishers, return_exceptions=True)


def _mark_dead(metrics_dir: Optional[str], pid: int) -> None:
    """Drops a dead worker's live gauges from the shared metrics (its counters stay counted)."""
    if metrics_dir:
        from prometheus_client import multiprocess

        with contextlib.suppress(Exception):
            multiprocess.mark_process_dead(pid, metrics_dir)
