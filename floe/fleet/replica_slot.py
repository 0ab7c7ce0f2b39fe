"""A replica slot: one replica process under the shared supervisor, its client and its rotation.

``ReplicaSlot`` is a ``ChildProcess`` (floe/child_process.py: spawn, hello, logs, restart with
backoff, give up, stop; its state is owned there) with what only a replica has:

- Launch: ``python -m floe.replica`` with a ``ReplicaLaunch`` (floe/protocol.py) in the
  environment: the whole settings tree, the slot's address and placement, the parent pid and a
  per-launch token (floe/replica/__main__.py applies the placement before anything heavy is
  imported). Its hello is ``ReplicaHello``; exit code 2 before the first ready is the replica's
  "bad configuration or model" answer, which a restart will not change: given up at once.
- Client and rotation: the slot owns the ``ReplicaClient`` of the current process (made at its
  hello, closed at its exit) and ``healthy`` (in rotation). The router (floe/fleet/router.py)
  reads a slot through ``client``, ``load()``, ``leave_rotation()``, ``may_recover()`` and
  ``crashed_under()`` and never changes its lifecycle; the manager ends it with ``stop()``.
- Probes: every ``health_interval`` a health probe takes the replica out of rotation while it
  reports not ready, and kills it after ``PROBE_FAILURES_TO_KILL`` failed probes in a row (a hung
  replica), never for one flap. A probe that times out while the replica keeps answering
  requests is not counted: on a machine whose cores the forward pass takes, slow is not hung.

Every change of state, health or client calls ``on_change`` (the manager publishes the replica
table to the front-end workers on it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from typing import Callable, Optional

from floe.config import Settings, settings_to_dict
from floe.errors import FloeError
from floe.protocol import Placement, ReplicaEndpoint, ReplicaHello, ReplicaLaunch
from floe.fleet.balance import ReplicaLoad
from floe.fleet.replica_client import CLOSE_GRACE_S, ReplicaClient, coalesce_limits
from floe.child_process import ChildProcess, Command

log = logging.getLogger("floe.supervisor")

PROBE_FAILURES_TO_KILL = 3


class ReplicaSlot(ChildProcess):
    """One replica slot: its process (restarted in place), its client and its rotation."""

    HELLO = ReplicaHello

    def __init__(self, index: int, address: str, placement: Placement, settings: Settings,
                 token: str, on_change: Optional[Callable[[], None]] = None,
                 key: tuple[str, str] = ("", "")) -> None:
        super().__init__(f"replica {index}", settings.replicas, f"floe.replica.{index}", on_change)
        self.index = index
        self.address = address      # "unix:/path" or "host:port"
        self.placement = placement
        self.settings = settings
        self.token = token
        self.key = key   # (model, kind) every call on its link is meant for
        self.client: Optional[ReplicaClient] = None
        self._healthy = False
        self.probe_failures = 0
        self.killed_as_hung = False   # this process was killed here after failed probes
        self.runs: dict[str, str] = {}   # engine, dtype, device, attention, from the latest hello

    @property
    def healthy(self) -> bool:
        """In rotation."""
        return self._healthy

    @healthy.setter
    def healthy(self, value: bool) -> None:
        if value != self._healthy:
            self._healthy = value
            self._changed()

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

    # -- what the front-end workers read --------------------------------------------------------

    def endpoint(self) -> ReplicaEndpoint:
        """This slot as a front-end worker's router needs it (floe/fleet/remote.py)."""
        client, pid = self.client, self.pid
        return ReplicaEndpoint(
            index=self.index, address=client.address if client else self.address,
            token=self.token, generation=pid or 0, healthy=bool(self.healthy and client),
            state=self.state, restarts=self.restarts, message=self.message, pid=pid)

    # -- the supervisor's hooks -----------------------------------------------------------------

    def begin_stop(self) -> None:
        self.healthy = False
        super().begin_stop()

    def _command(self) -> Command:
        self.killed_as_hung = False   # a new process
        if self.address.startswith("unix:"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.address[len("unix:"):])  # left behind by a killed replica
        launch = ReplicaLaunch(settings=settings_to_dict(self.settings), index=self.index,
                               address=self.address, parent_pid=os.getpid(), token=self.token,
                               placement=self.placement)
        env = {**os.environ, ReplicaLaunch.ENV: launch.to_json()}
        if self.placement.cuda_visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.placement.cuda_visible_devices
        return Command([sys.executable, "-m", "floe.replica"], env)

    def _refusal(self) -> Optional[str]:
        return "refused its configuration" if self.last_exit == "exit code 2" else None

    def _on_ready(self, hello: ReplicaHello) -> None:
        self.client = ReplicaClient(hello.address, self.index, token=self.token,
                                    receive_limit=256 * 1024 * 1024, model=self.key[0],
                                    kind=self.key[1], **coalesce_limits(self.settings))
        self.probe_failures = 0
        self.runs = {"engine": hello.engine, "dtype": hello.dtype, "device": hello.device,
                     "attention": hello.attention}
        self.healthy = True

    async def _on_exit(self) -> None:
        # out of rotation as soon as the exit is seen; the calls still on it fail as lost
        self.healthy = False
        client, self.client = self.client, None
        if client is not None:
            await client.close(grace=CLOSE_GRACE_S)

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
                self.message = f"unresponsive: {self.probe_failures} health probe(s) failed"
                self.healthy = False
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
            if not (h.healthy and h.ready):
                self.message = f"replica reports not ready: {h.message}"
            self.healthy = bool(h.healthy and h.ready) and not self.stopping
