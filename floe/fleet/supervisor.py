"""Supervision of one replica slot: spawn, handshake, watch, probe, restart with backoff, give up.

A ``ReplicaSlot`` owns one replica process at a time (restarted in place) and everything known
about it; ``supervise()`` is its one task. The router reads a slot through ``client``, ``load()``,
``leave_rotation()`` and ``crashed_under()`` and never changes its lifecycle.

- Spawn: ``python -m floe.replica`` with a ``ReplicaLaunch`` (floe/protocol.py) in the environment:
  the whole settings tree, the slot's address and placement, the parent pid and a per-launch token
  (floe/replica/__main__.py applies the placement before anything heavy is imported).
- Handshake: the replica prints ``FLOE_REPLICA_READY {hello json}`` once it serves; until then a
  process exit or ``startup_timeout`` is a failed start. Exit code 2 before the first ready is the
  replica's "bad configuration or model" answer: it will not change on a restart, so the slot
  gives up at once.
- Watch: a process exit takes the replica out of rotation as soon as it is seen; a health probe
  every ``health_interval`` takes it out while it reports not ready, and kills it after
  ``PROBE_FAILURES_TO_KILL`` failed probes in a row (a hung replica), never for one flap. A
  probe that times out while the replica keeps answering requests is not counted: on a machine
  whose cores the forward pass takes, slow is not hung.
- Restart: exponential backoff from 0.5 s to 10 s, reset after a replica ran 30 s; more than
  ``max_restarts`` within ``restart_window`` and the slot gives up, saying why.
- Logs: the replica writes JSON log lines to stderr; each is re-emitted here at its own level
  under ``floe.replica.<i>``, so a replica's traceback shows at the default log level.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import signal
import sys
import time
from typing import Optional

from floe.config import Settings, settings_to_dict
from floe.errors import FloeError
from floe.protocol import Placement, ReplicaHello, ReplicaLaunch
from floe.fleet.balance import ReplicaLoad
from floe.fleet.client import CLOSE_GRACE_S, ReplicaClient, coalesce_limits

log = logging.getLogger("floe.supervisor")

PROBE_FAILURES_TO_KILL = 3
BACKOFF_START_S = 0.5
BACKOFF_CAP_S = 10.0
STDERR_TAIL_LINES = 20
# A replica that ran this long before exiting is not crash-looping: its backoff starts over.
STABLE_AFTER_S = 30.0



def describe_exit(code: Optional[int]) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class ReplicaSlot:
    """One replica slot: its process, its client, its state, and the task that supervises it."""

    def __init__(self, index: int, address: str, placement: Placement, settings: Settings,
                 token: str) -> None:
        self.index = index
        self.address = address      # "unix:/path" or "host:port"
        self.placement = placement
        self.settings = settings
        self.token = token
        self.proc: Optional[asyncio.subprocess.Process] = None
        self.client: Optional[ReplicaClient] = None
        self.state = "starting"   # starting | ready | restarting | failed | stopped
        self.healthy = False      # in rotation
        self.restarts = 0
        self.restart_times: collections.deque[float] = collections.deque()
        self.last_exit: Optional[str] = None
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self.message = ""
        self.probe_failures = 0
        self.killed_as_hung = False   # this process was killed here after failed probes
        self.started_at = 0.0
        self.ever_ready = False
        self.stopping = False
        self.ready_event = asyncio.Event()   # set when ready or given up (start waits on it)
        self.exited = asyncio.Event()
        self.io_tasks: list[asyncio.Task] = []
        self.replica_log = logging.getLogger(f"floe.replica.{index}")

    # -- what the router reads ------------------------------------------------------------------

    def load(self) -> ReplicaLoad:
        c = self.client
        return ReplicaLoad(self.index, self.healthy and c is not None,
                           c.in_flight_tokens if c else 0, c.in_flight_requests if c else 0)

    def leave_rotation(self) -> None:
        self.healthy = False

    def may_recover(self) -> bool:
        return not self.stopping and self.state in ("starting", "ready", "restarting")

    async def crashed_under(self, client: ReplicaClient, seconds: float) -> bool:
        if self.client is client:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.exited.wait(), seconds)
            if not self.exited.is_set():
                return False
        # exited (or already replaced after exiting): a crash unless it was asked to go
        return not (self.stopping or self.killed_as_hung or self.last_exit == "exit code 0")

    # -- the supervising task -------------------------------------------------------------------

    async def supervise(self) -> None:
        backoff = BACKOFF_START_S
        rs = self.settings.replicas
        while not self.stopping:
            started = await self._spawn()
            if started:
                self.state, self.healthy, self.ever_ready = "ready", True, True
                self.probe_failures = 0
                self.message = ""
                self.ready_event.set()
                log.info("replica %d ready (pid %d)", self.index, self.proc.pid)
                await self._watch()
            self.healthy = False
            if self.client:
                await self.client.close(grace=CLOSE_GRACE_S)
                self.client = None
            if self.stopping:
                return
            tail = " | ".join(list(self.stderr_tail)[-5:])
            if started:
                self.message = f"replica exited ({self.last_exit}); last stderr: {tail or '(empty)'}"
            log.warning("replica %d: %s", self.index, self.message)
            if not self.ever_ready and self.last_exit == "exit code 2":
                self._give_up("refused its configuration")
                return
            now = time.monotonic()
            if started and now - self.started_at >= STABLE_AFTER_S:
                backoff = BACKOFF_START_S
            while self.restart_times and now - self.restart_times[0] > rs.restart_window:
                self.restart_times.popleft()
            if len(self.restart_times) >= rs.max_restarts:
                self._give_up(f"crash-looped: {rs.max_restarts} restarts within "
                              f"{rs.restart_window:g} s")
                return
            self.state = "restarting"
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_CAP_S)
            self.restart_times.append(time.monotonic())
            self.restarts += 1

    def _give_up(self, why: str) -> None:
        self.state = "failed"
        self.healthy = False
        self.message = f"given up: {why}; last failure: {self.message}"
        log.error("replica %d %s", self.index, self.message)
        self.ready_event.set()

    async def _spawn(self) -> bool:
        """Starts the process and waits for its hello; on failure sets self.message, False."""
        rs = self.settings.replicas
        self.state = "starting"
        self.exited = asyncio.Event()
        self.killed_as_hung = False
        self.stderr_tail.clear()
        if self.address.startswith("unix:"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.address[len("unix:"):])  # left behind by a killed replica
        launch = ReplicaLaunch(settings=settings_to_dict(self.settings), index=self.index,
                               address=self.address, parent_pid=os.getpid(), token=self.token,
                               placement=self.placement)
        env = dict(os.environ)
        env[ReplicaLaunch.ENV] = launch.to_json()
        if self.placement.cuda_visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.placement.cuda_visible_devices
        self.started_at = time.monotonic()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "floe.replica", stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
            start_new_session=True)
        hello: asyncio.Future = asyncio.get_running_loop().create_future()
        self.io_tasks = [asyncio.create_task(self._read_stdout(self.proc, hello)),
                         asyncio.create_task(self._read_stderr(self.proc))]
        exit_task = asyncio.create_task(self.proc.wait())
        try:
            done, _ = await asyncio.wait({hello, exit_task}, timeout=rs.startup_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            exit_task.cancel()
            raise
        if hello in done and hello.result() is not None:
            exit_task.cancel()
            h: ReplicaHello = hello.result()
            self.client = ReplicaClient(h.address, self.index, token=self.token,
                                        receive_limit=256 * 1024 * 1024,
                                        **coalesce_limits(self.settings))
            return True
        timed_out = not done
        if not timed_out:
            # stdout closed or the process exited: it is on its way out; collect its status.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(exit_task), 5.0)
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self.last_exit = describe_exit(self.proc.returncode)
        why = (f"not ready within --startup-timeout {rs.startup_timeout:g} s" if timed_out
               else f"{self.last_exit} before becoming ready")
        await asyncio.wait(self.io_tasks, timeout=2.0)  # collect the last stderr lines
        tail = " | ".join(list(self.stderr_tail)[-5:])
        self.message = f"{why}; stderr: {tail or '(empty)'}"
        return False

    async def _read_stdout(self, proc, hello: asyncio.Future) -> None:
        # Keep reading after the hello: a full pipe would block the replica's prints.
        try:
            async for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip()
                parsed = ReplicaHello.from_line(line) if not hello.done() else None
                if parsed is not None:
                    hello.set_result(parsed)
                elif line:
                    self.replica_log.info("%s", line)
        finally:
            if not hello.done():
                hello.set_result(None)

    async def _read_stderr(self, proc) -> None:
        async for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            if not line:
                continue
            self.emit_replica_line(line)

    def emit_replica_line(self, line: str) -> None:
        """Re-emits one stderr line of the replica at its own level (JSON log lines), or at
        WARNING (anything else a process prints to stderr: interpreter errors, native crashes)."""
        record = None
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                record = json.loads(line)
        if isinstance(record, dict) and "message" in record:
            level = logging.getLevelName(str(record.get("level", "INFO")).upper())
            level = level if isinstance(level, int) else logging.INFO
            text = str(record["message"])
            if record.get("exc"):
                text += "\n" + str(record["exc"])
            self.replica_log.log(level, "%s", text)
            if level >= logging.WARNING:
                self.stderr_tail.append(text.splitlines()[0] if text else "")
        else:
            self.replica_log.warning("%s", line)
            self.stderr_tail.append(line)

    async def _watch(self) -> None:
        """Returns when the replica's process has exited (killed here after failed probes)."""
        proc = self.proc
        probe = asyncio.create_task(self._probe())
        try:
            await proc.wait()
        finally:
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probe
        self.healthy = False
        self.exited.set()
        self.last_exit = describe_exit(proc.returncode)
        # The readers end at EOF; bounded in case a grandchild inherited the pipes.
        await asyncio.wait(self.io_tasks, timeout=2.0)

    async def _probe(self) -> None:
        rs = self.settings.replicas
        # generous: a loaded machine must not turn slow answers into kills
        timeout = max(2.0, min(2 * rs.health_interval, 10.0))
        while True:
            await asyncio.sleep(rs.health_interval)
            client = self.client
            if client is None:
                return
            sent = time.monotonic()
            try:
                h = await client.health(timeout=timeout)
            except FloeError as e:
                if client.last_answer > sent:
                    # It answered requests while the probe waited: busy (its cores taken by the
                    # forward pass), not hung. Not counted; a hung replica answers nothing.
                    log.info("replica %d health probe failed while it answers requests (busy, "
                             "not hung): %s", self.index, e.message)
                    continue
                self.probe_failures += 1
                log.warning("replica %d health probe failed (%d/%d): %s", self.index,
                            self.probe_failures, PROBE_FAILURES_TO_KILL, e.message)
                # No answer to anything since the last probe: it makes no progress (hung,
                # stopped, unreachable). Out of rotation now, and the calls waiting on it are
                # failed, so the router retries them elsewhere instead of letting them wait out
                # --forward-timeout; a good probe puts it back.
                self.healthy = False
                self.message = f"unresponsive: {self.probe_failures} health probe(s) failed"
                client.fail_pending(f"replica {self.index} stopped answering")
                if self.probe_failures >= PROBE_FAILURES_TO_KILL:
                    self.message = (f"{PROBE_FAILURES_TO_KILL} health probes failed in a row "
                                    "(hung or unreachable); killed and restarted")
                    log.error("replica %d: %s", self.index, self.message)
                    self.killed_as_hung = True
                    with contextlib.suppress(ProcessLookupError):
                        self.proc.kill()
                    return
                continue
            self.probe_failures = 0
            # A replica may report itself not ready (draining, warming): out of rotation, not dead.
            self.healthy = bool(h.healthy and h.ready) and not self.stopping
            if not self.healthy:
                self.message = f"replica reports not ready: {h.message}"

    # -- shutdown -------------------------------------------------------------------------------

    async def terminate(self, grace: float) -> None:
        """SIGTERM (the replica drains), SIGKILL after ``grace`` seconds."""
        p = self.proc
        if p is None or p.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(p.wait(), grace)
        except asyncio.TimeoutError:
            log.warning("replica %d (pid %d) did not exit within %.1f s; killing it", self.index,
                        p.pid, grace)
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            await p.wait()
