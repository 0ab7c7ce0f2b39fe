"""One supervised child process: spawn, handshake, watch, restart with backoff, give up, stop.

Both kinds of child that ``floe serve`` keeps running are a ``ChildProcess``: the replicas
(floe/fleet/replica_slot.py ``ReplicaSlot``) and the extra front-end workers
(floe/frontend/workers.py ``FrontendWorker``). A ``ChildProcess`` owns its process and its
lifecycle state, and nothing else writes them: its owner calls ``start()`` once, may call
``begin_stop()`` (SIGTERM now, no restart) and ends it with ``stop(grace)``.

- State: ``starting`` -> ``ready`` -> (the process exits) ``restarting`` -> ``starting`` ...;
  ``failed`` (given up) and ``stopped`` are final. Every change of what the child reports calls
  ``on_change``, so an observer hears of it at once instead of polling.
- Spawn: ``_command()`` (the subclass) gives argv, environment, inherited descriptors and the
  first bytes for its stdin (else /dev/null). A new session: a signal sent to the parent's
  terminal group does not reach the child; only its supervisor stops it.
- Handshake: the child prints one typed hello line on stdout (``HELLO``, a ``_HelloLine`` of
  floe/protocol.py) once it serves; until then its exit or ``startup_timeout`` is a failed start.
- Logs: each stderr line is re-emitted under ``logger_name`` at its own level (the child writes
  JSON log lines; anything else, e.g. a native crash, at WARNING); the last warnings are kept
  as ``stderr_tail`` for /info and the failure message. Other stdout lines are logged at INFO.
- Restart: one policy for every child: backoff from 0.5 s doubling to 10 s, reset once a
  process ran 30 s; more than ``max_restarts`` restarts within ``restart_window`` and the child
  is given up, its message saying why with the last failure (exit status and stderr tail). A
  failure before the first ready that a restart will not change (``_refusal()``) gives up at once.
- Stop: SIGTERM (the child drains), SIGKILL after the grace.

Hooks for subclasses: ``_command`` (required), ``_on_ready(hello)`` when the hello arrives,
``_probe()`` which runs while the child is ready (cancelled when it exits), ``_on_exit()``
once a process is gone, ``_refusal()``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import signal
import time
from dataclasses import dataclass
from typing import Callable, Optional

from floe.config import ReplicaSetSettings

log = logging.getLogger("floe.supervisor")

BACKOFF_START_S = 0.5
BACKOFF_CAP_S = 10.0
# A process that ran this long before exiting is not crash-looping: its backoff starts over.
STABLE_AFTER_S = 30.0
STDERR_TAIL_LINES = 20


def describe_exit(code: Optional[int]) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


@dataclass
class Command:
    """How to start the next process of a child."""
    argv: list[str]
    env: dict[str, str]
    pass_fds: tuple[int, ...] = ()
    stdin: Optional[bytes] = None   # written first to a stdin pipe; None: stdin is /dev/null


class ChildProcess:
    """One child kept running: its process, its state and the task that supervises it."""

    HELLO: type   # the child's hello line (floe/protocol.py ``_HelloLine``)

    def __init__(self, name: str, limits: ReplicaSetSettings, logger_name: str,
                 on_change: Optional[Callable[[], None]] = None) -> None:
        self.name = name                  # "replica 0": the subject of every log line
        self.limits = limits              # startup_timeout, max_restarts, restart_window
        self.on_change = on_change
        self.proc: Optional[asyncio.subprocess.Process] = None
        self.state = "starting"           # starting | ready | restarting | failed | stopped
        self.restarts = 0
        self.last_exit: Optional[str] = None
        self.message = ""                 # why it is not ready (or was given up)
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self.started_at = 0.0
        self.ever_ready = False
        self.ready_event = asyncio.Event()   # set once ready, given up or stopped
        self.exited = asyncio.Event()        # the current process has exited (one per process)
        self._restart_times: collections.deque[float] = collections.deque()
        self._stopping = False
        self._stop_asked = asyncio.Event()   # ends a backoff at once
        self._task: Optional[asyncio.Task] = None
        self._io: list[asyncio.Task] = []
        self._child_log = logging.getLogger(logger_name)

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def pid(self) -> Optional[int]:
        p = self.proc
        return p.pid if p is not None and p.returncode is None else None

    # -- hooks ----------------------------------------------------------------------------------

    def _command(self) -> Command:
        raise NotImplementedError

    def _on_ready(self, hello) -> None:
        pass

    async def _probe(self) -> None:
        pass

    async def _on_exit(self) -> None:
        pass

    def _refusal(self) -> Optional[str]:
        """Why a failure before the first ready is final (no restart), or None."""
        return None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"floe-supervise-{self.name}")

    def begin_stop(self) -> None:
        """SIGTERM now (the child drains) and no restart after it exits; ``stop`` waits for it."""
        if self._stopping:
            return
        self._stopping = True
        self._stop_asked.set()
        self._signal(signal.SIGTERM)

    async def stop(self, grace: float) -> None:
        """Stops the child for good: SIGTERM, SIGKILL after ``grace`` seconds; returns once its
        supervision has ended."""
        self.begin_stop()
        if self._task is not None:
            done, _ = await asyncio.wait({self._task}, timeout=grace)
            if not done:
                if self._signal(signal.SIGKILL):
                    log.warning("%s did not exit within %.1f s; killed it", self.name, grace)
                await self._task
        self._stopped()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def _set_state(self, state: str) -> None:
        self.state = state
        self._changed()

    def _signal(self, sig: int) -> bool:
        p = self.proc
        if p is None or p.returncode is not None:
            return False
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(sig)
        return True

    def _stopped(self) -> None:
        if self.state != "failed":
            self._set_state("stopped")
        self.ready_event.set()

    def _give_up(self, why: str) -> None:
        self.message = f"given up: {why}; last failure: {self.message}"
        log.error("%s %s", self.name, self.message)
        self._set_state("failed")
        self.ready_event.set()

    async def _run(self) -> None:
        try:
            await self._supervise()
        except Exception as e:  # noqa: BLE001 - e.g. the OS refused the spawn: say so, never hang
            log.exception("%s: supervision failed", self.name)
            self._signal(signal.SIGKILL)
            self._give_up(f"supervision failed: {e!r}")

    async def _supervise(self) -> None:
        backoff = BACKOFF_START_S
        lim = self.limits
        while True:
            started = await self._spawn()
            if started:
                self.ever_ready, self.message = True, ""
                self._set_state("ready")
                self.ready_event.set()
                log.info("%s ready (pid %d)", self.name, self.proc.pid)
                await self._watch()
            if self._stopping:
                return self._stopped()
            if started:
                self.message = f"process exited ({self.last_exit}); last stderr: {self._tail()}"
            log.warning("%s: %s", self.name, self.message)
            refusal = None if self.ever_ready else self._refusal()
            if refusal:
                return self._give_up(refusal)
            now = time.monotonic()
            if started and now - self.started_at >= STABLE_AFTER_S:
                backoff = BACKOFF_START_S
            while self._restart_times and now - self._restart_times[0] > lim.restart_window:
                self._restart_times.popleft()
            if len(self._restart_times) >= lim.max_restarts:
                return self._give_up(f"crash-looped: {lim.max_restarts} restarts within "
                                     f"{lim.restart_window:g} s")
            self._set_state("restarting")
            # a timer, not a poll: stop() wakes it at once
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop_asked.wait(), backoff)
            if self._stopping:
                return self._stopped()
            backoff = min(backoff * 2, BACKOFF_CAP_S)
            self._restart_times.append(time.monotonic())
            self.restarts += 1

    def _tail(self) -> str:
        return " | ".join(list(self.stderr_tail)[-5:]) or "(empty)"

    async def _spawn(self) -> bool:
        """One process up to its hello: True once ready; else False, ``message`` saying why."""
        cmd = self._command()
        self.exited = asyncio.Event()
        self.stderr_tail.clear()
        self.started_at = time.monotonic()
        self.proc = proc = await asyncio.create_subprocess_exec(
            *cmd.argv, env=cmd.env, pass_fds=cmd.pass_fds, start_new_session=True,
            stdin=asyncio.subprocess.DEVNULL if cmd.stdin is None else asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        if cmd.stdin is not None:
            proc.stdin.write(cmd.stdin)
        if self._stopping:
            self._signal(signal.SIGTERM)   # asked to stop while it was being spawned
        self._set_state("starting")        # with the new pid
        hello: asyncio.Future = asyncio.get_running_loop().create_future()
        self._io = [asyncio.create_task(self._read_stdout(proc, hello)),
                    asyncio.create_task(self._read_stderr(proc))]
        # a stop meanwhile needs no wait of its own: its SIGTERM (SIGKILL after the grace) ends it
        exit_task = asyncio.create_task(proc.wait())
        done, _ = await asyncio.wait({hello, exit_task}, timeout=self.limits.startup_timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if hello.done() and hello.result() is not None:
            exit_task.cancel()
            self._on_ready(hello.result())
            return True
        timed_out = not done
        if not timed_out:
            # stdout closed or the process exited: it is on its way out; collect its status
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(exit_task), 5.0)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await self._reap()
        why = (f"not ready within --startup-timeout {self.limits.startup_timeout:g} s"
               if timed_out else f"{self.last_exit} before becoming ready")
        self.message = f"{why}; stderr: {self._tail()}"
        return False

    async def _watch(self) -> None:
        """Returns when the ready process has exited (a probe may have killed it)."""
        probe = asyncio.create_task(self._probe())
        try:
            await self.proc.wait()
        finally:
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probe
        await self._reap()

    async def _reap(self) -> None:
        """After the process exited: its status, the subclass's clean-up, the last log lines."""
        self.last_exit = describe_exit(self.proc.returncode)
        self.exited.set()
        await self._on_exit()
        # The readers end at EOF; bounded in case a grandchild inherited the pipes.
        _, late = await asyncio.wait(self._io, timeout=2.0)
        for t in late:
            t.cancel()
        if self.proc.stdin is not None:
            self.proc.stdin.close()

    async def _read_stdout(self, proc, hello: asyncio.Future) -> None:
        # Keep reading after the hello: a full pipe would block the child's prints.
        try:
            async for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip()
                parsed = None if hello.done() else self.HELLO.from_line(line)
                if parsed is not None:
                    hello.set_result(parsed)
                elif line:
                    self._child_log.info("%s", line)
        finally:
            if not hello.done():
                hello.set_result(None)

    async def _read_stderr(self, proc) -> None:
        async for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self._emit_stderr_line(line)

    def _emit_stderr_line(self, line: str) -> None:
        """A JSON log line at its own level (floe/logs.py ``JsonFormatter``); anything else at
        WARNING (interpreter errors, native crashes). Warnings and above go to the tail."""
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
            self._child_log.log(level, "%s", text)
            if level >= logging.WARNING:
                self.stderr_tail.append(text.splitlines()[0] if text else "")
        else:
            self._child_log.warning("%s", line)
            self.stderr_tail.append(line)
