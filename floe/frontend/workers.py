"""Extra front-end processes: ``floe serve --frontend-workers N``.

The main process runs the replica manager (placement, supervision, probes) and one front end;
this module starts the other N - 1 front ends (``python -m floe.frontend.worker``), keeps them
running and tells them where the replicas are. Every front end serves the same public ports:

- HTTP: one socket, bound by the main process (floe/frontend/server.py ``bind_http``) and
  inherited by every worker; the kernel hands each new connection to one of the processes
  waiting in accept, and a worker that dies leaves the queue of pending connections intact.
- gRPC: every process binds the same port with SO_REUSEPORT (``share_port`` in
  floe/transport/grpc.py, only when there are several front ends), and the kernel spreads new
  connections over them.

Each worker routes to every replica with its own channels and its own in-flight counts
(floe/fleet/remote.py); its balancer starts at its own index, so idle-time requests of
different workers do not all land on replica 0. The replica table (floe/protocol.py
``ReplicaTable``) goes to each worker's stdin at start, on every change and every health
interval; stdin closing tells a worker the main process is gone.

Lifecycle: ``start()`` returns when every worker said hello (a worker that cannot start is a
start-up error, with its stderr); a worker that exits later is restarted after a backoff; on
SIGTERM the main process calls ``begin_drain()`` at once (every front end drains in parallel)
and ``stop()`` after its own drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from typing import Optional

from floe.config import Settings, settings_to_dict
from floe.errors import WorkerStartError
from floe.protocol import FrontendHello, FrontendLaunch, ReplicaEndpoint, ReplicaTable

log = logging.getLogger("floe.frontend.workers")

_BACKOFF_START_S, _BACKOFF_CAP_S = 0.5, 10.0


def replica_table(slots) -> ReplicaTable:
    """The supervisor's view of its replica slots (floe/fleet/supervisor.py), for the workers."""
    out = []
    for s in slots:
        proc, client = s.proc, s.client
        alive = proc is not None and proc.returncode is None
        out.append(ReplicaEndpoint(
            index=s.index, address=client.address if client else s.address, token=s.token,
            generation=proc.pid if alive else 0, healthy=bool(s.healthy and client is not None),
            state=s.state, restarts=s.restarts, message=s.message,
            pid=proc.pid if alive else None))
    return ReplicaTable(tuple(out))


class FrontendWorker:
    """One extra front-end process: spawn, handshake, restart."""

    def __init__(self, index: int, launch: FrontendLaunch, http_socket: Optional[socket.socket]) -> None:
        self.index = index
        self.launch = launch
        self.http_socket = http_socket
        self.proc: Optional[asyncio.subprocess.Process] = None
        self.restarts = 0
        self.stopping = False
        self.ready = asyncio.Event()

    async def spawn(self, startup_timeout: float, table_line: bytes) -> None:
        env = dict(os.environ)
        env[FrontendLaunch.ENV] = self.launch.to_json()
        fds = (self.http_socket.fileno(),) if self.http_socket is not None else ()
        self.ready = asyncio.Event()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "floe.frontend.worker", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=None, env=env, pass_fds=fds,
            start_new_session=True)
        # the worker serves once it knows the replicas: the table goes first
        assert self.proc.stdin is not None
        self.proc.stdin.write(table_line)
        hello = asyncio.create_task(self._read_hello(self.proc))
        exit_task = asyncio.create_task(self.proc.wait())
        done, _ = await asyncio.wait({hello, exit_task}, timeout=startup_timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if hello in done and hello.result():
            exit_task.cancel()
            self.ready.set()
            return
        hello.cancel()
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()
        why = (f"not ready within {startup_timeout:g} s" if not done
               else f"exited with status {self.proc.returncode} before becoming ready")
        raise WorkerStartError(f"front-end worker {self.index} {why} (its log lines are above)")

    async def _read_hello(self, proc) -> bool:
        async for raw in proc.stdout:
            if FrontendHello.from_line(raw.decode(errors="replace").strip()) is not None:
                # keep draining stdout so a print in the worker can never block it
                asyncio.create_task(self._drain(proc))
                return True
        return False

    @staticmethod
    async def _drain(proc) -> None:
        with contextlib.suppress(Exception):
            async for _ in proc.stdout:
                pass

    async def send(self, line: bytes) -> None:
        p = self.proc
        if p is None or p.returncode is not None or p.stdin is None or not self.ready.is_set():
            return
        try:
            p.stdin.write(line)
            await asyncio.wait_for(p.stdin.drain(), 5.0)
        except (ConnectionError, asyncio.TimeoutError, RuntimeError):
            pass   # the worker is exiting; its supervision restarts it

    def signal(self, sig: int) -> None:
        p = self.proc
        if p is not None and p.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)


class FrontendWorkers:
    """Starts, feeds, restarts and stops the extra front-end processes."""

    def __init__(self, settings: Settings, manager, http_socket: Optional[socket.socket],
                 count: int, metrics_dir: Optional[str]) -> None:
        self.settings = settings
        self.manager = manager
        self.http_socket = http_socket
        self.workers = [
            FrontendWorker(i, FrontendLaunch(settings=settings_to_dict(settings), index=i,
                                             frontends=count + 1, parent_pid=os.getpid(),
                                             http_fd=http_socket.fileno() if http_socket else None,
                                             metrics_dir=metrics_dir), http_socket)
            for i in range(1, count + 1)]
        self._tasks: list[asyncio.Task] = []
        self._last_line: bytes = b""
        self._stopping = False

    async def start(self) -> None:
        timeout = self.settings.replicas.startup_timeout
        try:
            line = self._table_line()
            await asyncio.gather(*(w.spawn(timeout, line) for w in self.workers))
        except WorkerStartError:
            await self.stop(grace=2.0)
            raise
        self._tasks = [asyncio.create_task(self._publish(), name="floe-frontend-publish")]
        self._tasks += [asyncio.create_task(self._supervise(w), name=f"floe-frontend-{w.index}")
                        for w in self.workers]
        log.info("%d front-end worker processes ready (pids %s)", len(self.workers),
                 ", ".join(str(w.proc.pid) for w in self.workers if w.proc))

    def _table_line(self) -> bytes:
        return (replica_table(self.manager.slots).to_line() + "\n").encode()

    async def _publish(self) -> None:
        # on change at once (checked 10 times a second), and every health interval regardless,
        # so a worker's local out-of-rotation mark is lifted after the supervisor's next probe
        every = max(0.1, self.settings.replicas.health_interval)
        loop = asyncio.get_running_loop()
        last_sent = loop.time()
        while True:
            await asyncio.sleep(0.1)
            line = self._table_line()
            if line != self._last_line or loop.time() - last_sent >= every:
                self._last_line, last_sent = line, loop.time()
                for outcome in await asyncio.gather(*(w.send(line) for w in self.workers),
                                                    return_exceptions=True):
                    if isinstance(outcome, Exception):
                        log.warning("replica table not delivered to a front-end worker: %r", outcome)

    async def _supervise(self, w: FrontendWorker) -> None:
        backoff = _BACKOFF_START_S
        while not self._stopping:
            assert w.proc is not None
            code = await w.proc.wait()
            if self._stopping or w.stopping:
                return
            log.warning("front-end worker %d (pid %d) exited with status %s; restarting in %.1f s",
                        w.index, w.proc.pid, code, backoff)
            _mark_dead(w.launch.metrics_dir, w.proc.pid)
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, _BACKOFF_CAP_S)
            try:
                await w.spawn(self.settings.replicas.startup_timeout, self._table_line())
            except WorkerStartError as e:
                log.error("%s", e)
                continue
            w.restarts += 1
            backoff = _BACKOFF_START_S

    def begin_drain(self) -> None:
        """SIGTERM to every worker: each turns unready and drains its own in-flight requests."""
        self._stopping = True
        for w in self.workers:
            w.stopping = True
            w.signal(signal.SIGTERM)

    async def stop(self, grace: Optional[float] = None) -> None:
        if grace is None:
            grace = self.settings.server.drain_timeout + 2.0
        self.begin_drain()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

        async def reap(w: FrontendWorker) -> None:
            if w.proc is None:
                return
            try:
                await asyncio.wait_for(w.proc.wait(), grace)
            except asyncio.TimeoutError:
                log.warning("front-end worker %d did not exit within %.1f s; killing it",
                            w.index, grace)
                w.signal(signal.SIGKILL)
                await w.proc.wait()
            if w.proc.stdin is not None:
                w.proc.stdin.close()
        await asyncio.gather(*(reap(w) for w in self.workers))

    def status(self) -> list[dict]:
        return [{"index": w.index, "pid": w.proc.pid if w.proc and w.proc.returncode is None else None,
                 "restarts": w.restarts} for w in self.workers]


def _mark_dead(metrics_dir: Optional[str], pid: int) -> None:
    """Drops a dead worker's live gauges from the shared metrics (its counters stay counted)."""
    if metrics_dir:
        from prometheus_client import multiprocess

        with contextlib.suppress(Exception):
            multiprocess.mark_process_dead(pid, metrics_dir)
