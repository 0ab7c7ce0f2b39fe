"""The replica manager: N replica processes behind one endpoint.

Lifecycle (each step is documented in docs/replicas.md):

- ``start()`` spawns ``python -m floe.replica`` per replica (replica i on replica_host:start_port+i),
  places it (CUDA_VISIBLE_DEVICES and a GPU memory share, or a disjoint set of CPU cores and a
  matching thread count), and waits for its ``FLOE_REPLICA_READY <port>`` line. It returns once one
  replica is ready and raises ``ReplicaStartError`` if none can be.
- One supervisor task per replica owns that replica's process: it watches the process exit (a dead
  replica leaves rotation as soon as the exit is seen) and probes HealthCheck every health_interval
  (3 failed probes in a row: the replica is killed). A replica that exits is restarted with
  exponential backoff; one that exits max_restarts times within restart_window is given up, and
  ``status()`` says why (exit code or signal, last stderr lines).
- ``encode()`` picks a healthy replica with the balancer and forwards the token ids; when the replica
  fails (not the request), it retries once on another healthy replica.
- ``drain()`` stops admitting, lets in-flight requests finish, then stops the replicas (SIGTERM, then
  SIGKILL at the deadline). Replicas also exit on their own when the manager dies (--parent-pid, and
  a parent-death signal set in the child before it imports anything).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
import time
from typing import Any, Optional

from floe.config import BatchSettings, ModelSettings, Settings, _flag
from floe.errors import ConfigError, FloeError, InternalError, UnavailableError
from floe.models.spec import ModelSpec
from floe.proto import floe_pb2
from floe.protocol import EmbedResult, EncodeOptions, TokenBatch
from floe.router.balance import Balancer, ReplicaLoad
from floe.router.client import ReplicaClient, ReplicaFailedError

log = logging.getLogger("floe.router")

READY_LINE = "FLOE_REPLICA_READY"
PROBE_FAILURES_TO_KILL = 3
BACKOFF_START_S = 0.5
BACKOFF_CAP_S = 10.0
STDERR_TAIL_LINES = 20
# A replica that ran this long before exiting is not crash-looping: its backoff starts over.
STABLE_AFTER_S = 30.0

# The child's first statements, before floe.replica is imported: set its CPU affinity (so torch's
# thread pools are created inside it) and ask the kernel to SIGTERM it when the manager dies. A
# preexec_fn would do the same but is unsafe in a parent that runs gRPC threads.
_LAUNCHER = """\
import os, runpy, signal, sys
cores = os.environ.pop("FLOE_CPU_AFFINITY", "")
if cores:
    os.sched_setaffinity(0, [int(c) for c in cores.split(",")])
parent = int(os.environ.pop("FLOE_PARENT_PID", "0") or 0)
try:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
except Exception:
    pass  # not Linux: --parent-pid polling in the replica still covers this
if parent and os.getppid() != parent:
    sys.exit(0)  # the manager died before the death signal was armed
sys.argv[0] = "floe.replica"
runpy.run_module("floe.replica", run_name="__main__", alter_sys=True)
"""


class ReplicaStartError(RuntimeError):
    """No replica could be started; the message says why for each (exit status, stderr tail)."""


@dataclasses.dataclass
class Placement:
    """Where one replica runs: environment and extra flags computed by ``plan_placement``."""

    cuda_visible_devices: Optional[str] = None
    gpu_memory_fraction: Optional[float] = None
    cpu_cores: Optional[list[int]] = None
    threads: Optional[int] = None


def visible_gpus(device: str, env: Optional[dict] = None) -> list[str]:
    """GPU ids this process may use, found without importing torch (the front end never does)."""
    env = os.environ if env is None else env
    if device == "cpu":
        return []
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        return [d.strip() for d in cvd.split(",") if d.strip() and d.strip() != "-1"]
    try:
        n = len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        n = 0
    return [str(i) for i in range(n)]


def plan_placement(settings: Settings, gpus: list[str], cores: list[int]) -> list[Placement]:
    """Places every replica (pure: the tests call it with made-up GPUs and cores).

    GPU (when ``gpus`` is non-empty): ``dedicated`` gives replica i GPU gpus[i % num_gpus];
    ``shared`` gives every replica all num_gpus GPUs. Each replica's memory fraction is
    gpu_memory_utilization divided by the number of replicas on its GPU.
    CPU: the cores are split into num_replicas disjoint contiguous sets (when there are fewer cores
    than replicas, replica i gets core i mod cores); threads = cores in the set unless
    threads_per_replica says otherwise.
    """
    r = settings.replicas
    n = r.num_replicas
    out: list[Placement] = []
    if gpus:
        if r.num_gpus > len(gpus):
            raise ConfigError(f"--num-gpus {r.num_gpus} but only {len(gpus)} GPU(s) are visible "
                              f"({','.join(gpus)})")
        use = gpus[: r.num_gpus]
        for i in range(n):
            if r.gpu_assignment == "dedicated":
                sharing = len(range(i % r.num_gpus, n, r.num_gpus))
                out.append(Placement(cuda_visible_devices=use[i % r.num_gpus],
                                     gpu_memory_fraction=r.gpu_memory_utilization / sharing,
                                     threads=r.threads_per_replica))
            else:
                out.append(Placement(cuda_visible_devices=",".join(use),
                                     gpu_memory_fraction=r.gpu_memory_utilization / n,
                                     threads=r.threads_per_replica))
        return out
    cores = sorted(cores) or [0]
    for i in range(n):
        if len(cores) >= n:
            base, extra = divmod(len(cores), n)
            start = i * base + min(i, extra)
            mine = cores[start: start + base + (1 if i < extra else 0)]
        else:
            mine = [cores[i % len(cores)]]
        out.append(Placement(cpu_cores=mine, threads=r.threads_per_replica or len(mine)))
    return out


def replica_command(settings: Settings, index: int, port: int, placement: Placement,
                    parent_pid: int) -> list[str]:
    """The replica's argv: model and batch settings that differ from the defaults, as flags."""
    r = settings.replicas
    argv = [sys.executable, "-c", _LAUNCHER,
            "--model", settings.model.model, "--host", r.replica_host, "--port", str(port),
            "--engine", r.engine, "--replica-id", str(index), "--parent-pid", str(parent_pid),
            "--workers", str(r.workers)]
    for section, cls in (("model", ModelSettings), ("batch", BatchSettings)):
        values = getattr(settings, section)
        for f in dataclasses.fields(cls):
            if f.name == "model":
                continue
            v = getattr(values, f.name)
            if v == f.default:
                continue
            if isinstance(v, bool):
                argv.append(_flag(f) if v else "--no-" + _flag(f)[2:])
            else:
                argv += [_flag(f), str(v)]
    if placement.threads:
        argv += ["--threads", str(placement.threads)]
    if placement.gpu_memory_fraction is not None:
        argv += ["--gpu-memory-fraction", f"{placement.gpu_memory_fraction:.4f}"]
    return argv


def port_in_use(host: str, port: int) -> bool:
    """True when something already listens on host:port (a bind without SO_REUSEPORT fails)."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT of a dead replica is fine
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def describe_exit(code: Optional[int]) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Replica:
    """The manager's record of one replica slot (one process at a time, restarted in place)."""

    def __init__(self, index: int, host: str, port: int, placement: Placement) -> None:
        self.index = index
        self.host = host
        self.port = port
        self.placement = placement
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
        self.started_at = 0.0
        self.ever_ready = False
        self.ready_event = asyncio.Event()   # set when ready or given up (start() waits on it)
        self.exited = asyncio.Event()
        self.io_tasks: list[asyncio.Task] = []

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def load(self) -> ReplicaLoad:
        c = self.client
        return ReplicaLoad(self.index, self.healthy and c is not None,
                           c.in_flight_tokens if c else 0, c.in_flight_requests if c else 0)


class ReplicaManager:
    """Spawns, balances, supervises and drains the replica processes of one model."""

    def __init__(self, settings: Settings, spec: ModelSpec) -> None:
        self.settings = settings
        self.spec = spec
        r = settings.replicas
        self.balancer = Balancer(r.load_balancing)
        gpus = visible_gpus(settings.model.device)
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            list(range(os.cpu_count() or 1))
        placements = plan_placement(settings, gpus, cores)
        self.replicas = [Replica(i, r.replica_host, r.start_port + i, placements[i])
                         for i in range(r.num_replicas)]
        self._supervisors: list[asyncio.Task] = []
        self._draining = False
        self._stopping = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._routes: dict[str, Replica] = {}  # request id -> replica it is running on (for abort)
        self.retries = 0           # requests that succeeded on their retry replica
        self.failed_retries = 0    # requests whose retry failed too

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Starts every replica; returns when one is ready, raises ReplicaStartError if none is."""
        self._supervisors = [asyncio.create_task(self._supervise(r), name=f"floe-replica-{r.index}")
                             for r in self.replicas]
        waits = {asyncio.create_task(r.ready_event.wait()): r for r in self.replicas}
        pending = set(waits)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(waits[t].state == "ready" for t in done):
                for t in pending:
                    t.cancel()
                return
        reasons = "; ".join(f"replica {r.index}: {r.message}" for r in self.replicas)
        await self.stop()
        raise ReplicaStartError(f"no replica could be started: {reasons}")

    def ready(self) -> bool:
        return not self._draining and any(r.healthy for r in self.replicas)

    async def drain(self, timeout: float) -> None:
        """Refuses new requests, waits up to ``timeout`` s for in-flight ones, stops the replicas."""
        self._draining = True
        deadline = time.monotonic() + timeout
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        await self._shutdown(max(2.0, deadline - time.monotonic()))

    async def stop(self) -> None:
        """Stops at once: in-flight requests fail, replicas get SIGTERM (SIGKILL after 5 s)."""
        self._draining = True
        await self._shutdown(5.0)

    async def _shutdown(self, grace: float) -> None:
        self._stopping = True
        for t in self._supervisors:
            t.cancel()
        await asyncio.gather(*self._supervisors, return_exceptions=True)
        procs = [r.proc for r in self.replicas if r.proc and r.proc.returncode is None]
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        if procs:
            _, alive = await asyncio.wait([asyncio.create_task(p.wait()) for p in procs],
                                          timeout=grace)
            if alive:
                for p in procs:
                    if p.returncode is None:
                        log.warning("replica pid %d did not exit within %.1f s; killing it",
                                    p.pid, grace)
                        with contextlib.suppress(ProcessLookupError):
                            p.kill()
                await asyncio.gather(*(p.wait() for p in procs))
        for r in self.replicas:
            for t in r.io_tasks:
                t.cancel()
            if r.client:
                await r.client.close()
                r.client = None
            r.healthy = False
            if r.state != "failed":
                r.state = "stopped"

    # -- supervision ----------------------------------------------------------------------------

    async def _supervise(self, r: Replica) -> None:
        """Owns one replica slot: spawn, handshake, watch, restart with backoff, give up."""
        backoff = BACKOFF_START_S
        rs = self.settings.replicas
        while not self._stopping:
            started = await self._spawn(r)
            if started:
                r.state, r.healthy, r.ever_ready = "ready", True, True
                r.probe_failures = 0
                r.message = ""
                r.ready_event.set()
                log.info("replica %d ready on %s (pid %d)", r.index, r.address, r.proc.pid)
                await self._watch(r)
            r.healthy = False
            if r.client:
                await r.client.close()
                r.client = None
            if self._stopping:
                return
            tail = " | ".join(list(r.stderr_tail)[-5:])
            if started:
                r.message = f"replica exited ({r.last_exit}); last stderr: {tail or '(empty)'}"
            log.warning("replica %d: %s", r.index, r.message)
            if not r.ever_ready and r.last_exit == "exit code 2":
                # Exit code 2 is the replica's "bad configuration or model" answer: it will not
                # change on a restart, so don't spend the crash-loop budget on it.
                self._give_up(r, "refused its configuration")
                return
            now = time.monotonic()
            if started and now - r.started_at >= STABLE_AFTER_S:
                backoff = BACKOFF_START_S
            while r.restart_times and now - r.restart_times[0] > rs.restart_window:
                r.restart_times.popleft()
            if len(r.restart_times) >= rs.max_restarts:
                self._give_up(r, f"crash-looped: {rs.max_restarts} restarts within "
                                 f"{rs.restart_window:g} s")
                return
            r.state = "restarting"
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_CAP_S)
            r.restart_times.append(time.monotonic())
            r.restarts += 1

    def _give_up(self, r: Replica, why: str) -> None:
        r.state = "failed"
        r.healthy = False
        r.message = f"given up: {why}; last failure: {r.message}"
        log.error("replica %d %s", r.index, r.message)
        r.ready_event.set()

    async def _spawn(self, r: Replica) -> bool:
        """Starts the process and waits for its ready line; on failure sets r.message, False."""
        rs = self.settings.replicas
        r.state = "starting"
        r.exited = asyncio.Event()
        r.stderr_tail.clear()
        if port_in_use(r.host, r.port):
            r.last_exit = "not started"
            r.message = (f"port {r.port} on {r.host} is already in use (replica {r.index} listens on "
                         f"--start-port + {r.index}); free it or choose another --start-port")
            return False
        env = dict(os.environ)
        env["FLOE_PARENT_PID"] = str(os.getpid())
        p = r.placement
        if p.cuda_visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = p.cuda_visible_devices
        if p.cpu_cores:
            env["FLOE_CPU_AFFINITY"] = ",".join(map(str, p.cpu_cores))
        argv = replica_command(self.settings, r.index, r.port, p, os.getpid())
        r.started_at = time.monotonic()
        r.proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env, start_new_session=True)
        ready = asyncio.get_running_loop().create_future()
        r.io_tasks = [asyncio.create_task(self._read_stdout(r, r.proc, ready)),
                      asyncio.create_task(self._read_stderr(r, r.proc))]
        exit_task = asyncio.create_task(r.proc.wait())
        try:
            done, _ = await asyncio.wait({ready, exit_task}, timeout=rs.startup_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            exit_task.cancel()
            raise
        if ready in done and ready.result():
            exit_task.cancel()
            r.client = ReplicaClient(r.address, r.index)
            return True
        timed_out = not done
        if not timed_out:
            # stdout closed or the process exited: it is on its way out; collect its status.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(exit_task), 5.0)
        if r.proc.returncode is None:
            r.proc.kill()
            await r.proc.wait()
        r.last_exit = describe_exit(r.proc.returncode)
        if timed_out:
            why = f"not ready within --startup-timeout {rs.startup_timeout:g} s"
        else:
            why = f"{r.last_exit} before becoming ready"
        await asyncio.wait(r.io_tasks, timeout=2.0)  # collect the last stderr lines
        tail = " | ".join(list(r.stderr_tail)[-5:])
        r.message = f"{why}; stderr: {tail or '(empty)'}"
        return False

    async def _read_stdout(self, r: Replica, proc, ready: asyncio.Future) -> None:
        # Keep reading after the ready line: a full pipe would block the replica's prints.
        try:
            async for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip()
                if not ready.done() and line.startswith(READY_LINE):
                    ready.set_result(True)
                elif line:
                    log.debug("replica %d stdout: %s", r.index, line)
        finally:
            if not ready.done():
                ready.set_result(False)

    async def _read_stderr(self, r: Replica, proc) -> None:
        async for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            if line:
                r.stderr_tail.append(line)
                log.debug("replica %d: %s", r.index, line)

    async def _watch(self, r: Replica) -> None:
        """Returns when the replica's process has exited (killed here after failed probes)."""
        proc = r.proc
        probe = asyncio.create_task(self._probe(r))
        try:
            await proc.wait()
        finally:
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probe
        r.healthy = False
        r.exited.set()
        r.last_exit = describe_exit(proc.returncode)
        # The readers end at EOF; bounded in case a grandchild inherited the pipes.
        await asyncio.wait(r.io_tasks, timeout=2.0)

    async def _probe(self, r: Replica) -> None:
        rs = self.settings.replicas
        timeout = max(0.5, min(rs.health_interval, 5.0))
        while True:
            await asyncio.sleep(rs.health_interval)
            client = r.client
            if client is None:
                return
            try:
                h = await client.health(timeout=timeout)
            except FloeError as e:
                r.probe_failures += 1
                log.warning("replica %d health probe failed (%d/%d): %s", r.index,
                            r.probe_failures, PROBE_FAILURES_TO_KILL, e.message)
                if r.probe_failures >= PROBE_FAILURES_TO_KILL:
                    r.healthy = False
                    r.message = f"{PROBE_FAILURES_TO_KILL} health probes failed in a row: {e.message}"
                    log.error("replica %d: %s; killing it", r.index, r.message)
                    with contextlib.suppress(ProcessLookupError):
                        r.proc.kill()
                    return
                continue
            r.probe_failures = 0
            # A replica may report itself not ready (draining, warming): out of rotation, not dead.
            r.healthy = bool(h.healthy and h.ready) and not self._stopping
            if not r.healthy:
                r.message = f"replica reports not ready: {h.message}"

    # -- requests -------------------------------------------------------------------------------

    def _pick(self, exclude: list[int]) -> Optional[Replica]:
        i = self.balancer.pick([r.load() for r in self.replicas], exclude)
        return None if i is None else self.replicas[i]

    async def _process_died(self, r: Replica, client: ReplicaClient, within: float) -> bool:
        """After an INTERNAL error: did the replica's process die (then it was not the request)?"""
        if r.client is not client:
            return True  # already replaced: the process behind this client is gone
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(r.exited.wait(), within)
        return r.exited.is_set()

    async def encode(self, tokens: TokenBatch, options: EncodeOptions, request_id: str) -> EmbedResult:
        """Embeds on one healthy replica; a replica failure is retried once on another one."""
        if self._draining:
            raise UnavailableError("server is draining, retry on another instance")
        self._in_flight += 1
        self._idle.clear()
        try:
            return await self._encode(tokens, options, request_id)
        finally:
            self._routes.pop(request_id, None)
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def _encode(self, tokens: TokenBatch, options: EncodeOptions, request_id: str) -> EmbedResult:
        timeout = self.settings.replicas.forward_timeout
        tried: list[int] = []
        failures: list[str] = []
        for attempt in range(2):
            r = self._pick(tried)
            if r is None:
                if not failures:
                    raise UnavailableError("no healthy replica is available, retry later")
                raise UnavailableError(f"replica failed ({failures[0]}) and no other healthy "
                                       "replica is available, retry later")
            client = r.client
            self._routes[request_id] = r
            try:
                result = await client.encode(tokens, options, request_id, timeout=timeout)
                if attempt:
                    self.retries += 1
                return result
            except ReplicaFailedError as e:
                if e.cause in ("UNAVAILABLE", "CANCELLED") and r.client is client:
                    r.healthy = False  # leave rotation now; the next good probe brings it back
                failures.append(e.message)
            except InternalError as e:
                if not await self._process_died(r, client, 1.0):
                    raise
                failures.append(f"replica {r.index} died during the request ({e.message})")
            tried.append(r.index)
            log.warning("request %s: %s; %s", request_id, failures[-1],
                        "retrying on another replica" if attempt == 0 else "giving up")
        self.failed_retries += 1
        raise InternalError(f"request {request_id} failed on replica {tried[0]} and again on "
                            f"replica {tried[1]} ({failures[1]}); not retried further: the input "
                            "may crash replicas")

    async def abort(self, request_id: str) -> bool:
        """Asks the replica running ``request_id`` to drop its queued sequences."""
        r = self._routes.get(request_id)
        if r is None or r.client is None:
            return False
        return await r.client.abort(request_id)

    # -- introspection --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """A JSON-able summary for /ready and /info: every replica's state and why it is so."""
        out = []
        for r in self.replicas:
            c = r.client
            out.append({
                "index": r.index, "address": r.address,
                "pid": r.proc.pid if r.proc and r.proc.returncode is None else None,
                "state": r.state, "healthy": r.healthy, "restarts": r.restarts,
                "last_exit": r.last_exit, "message": r.message,
                "stderr_tail": list(r.stderr_tail) if r.state == "failed" else [],
                "in_flight_requests": c.in_flight_requests if c else 0,
                "in_flight_tokens": c.in_flight_tokens if c else 0,
                "completed": c.completed if c else 0,
                "cuda_visible_devices": r.placement.cuda_visible_devices,
                "gpu_memory_fraction": r.placement.gpu_memory_fraction,
                "cpu_cores": r.placement.cpu_cores, "threads": r.placement.threads,
            })
        ready = self.ready()
        if ready:
            reason = ""
        elif self._draining:
            reason = "draining"
        else:
            reason = "no healthy replica: " + "; ".join(
                f"replica {r.index} {r.state}" + (f" ({r.message})" if r.message else "")
                for r in self.replicas)
        return {"ready": ready, "reason": reason, "draining": self._draining,
                "load_balancing": self.balancer.policy,
                "healthy_replicas": sum(r.healthy for r in self.replicas),
                "num_replicas": len(self.replicas), "in_flight_requests": self._in_flight,
                "retried_requests": self.retries, "failed_retries": self.failed_retries,
                "replicas": out}

    async def replica_infos(self) -> list[floe_pb2.ReplicaInfo]:
        """Each replica's own GetReplicaInfo, with the manager's view (restarts, health, why)."""
        async def one(r: Replica) -> floe_pb2.ReplicaInfo:
            info = floe_pb2.ReplicaInfo(replica_id=str(r.index), model=self.spec.name)
            if r.client is not None and r.state == "ready":
                with contextlib.suppress(FloeError):
                    reply = await r.client.info(timeout=2.0)
                    if reply.replicas:
                        info = reply.replicas[0]
            info.replica_id = str(r.index)
            info.address = r.address
            info.healthy = r.healthy
            info.ready = info.ready and r.healthy
            info.restarts = r.restarts
            if r.proc and r.proc.returncode is None:
                info.pid = r.proc.pid
            if r.message:
                info.status_message = r.message
            return info
        return list(await asyncio.gather(*(one(r) for r in self.replicas)))
