"""A two-node Ray cluster on one machine, for the tests and the benchmarks that need one.

A Ray head and a Ray worker node in two network namespaces, joined by a veth pair whose two
private addresses exist only inside those namespaces (nothing in them can reach the host's network
or any other address). Both nodes run on this machine, with their own raylet, object store and
temp folder; they share the file system, which stands in for the shared storage a real cluster
needs for its input and output. Needs root, iproute2 and Ray. Every process it starts lives in
one of its namespaces; ``close`` stops them by their ids (``ip netns pids``), never ``ray stop``
(which would stop every Ray on the machine).
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional


class ClusterUnavailable(RuntimeError):
    """The cluster cannot be made or started here (the reason is the message)."""


HEAD_IP, WORKER_IP, PORT = "10.77.0.1", "10.77.0.2", 6379
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")
START_TIMEOUT = 600   # a busy 2-core machine can take minutes to start Ray's processes


def run(*cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()[:500]}")
    return r


def problem() -> Optional[str]:
    """Why the cluster cannot be made here, or None."""
    if importlib.util.find_spec("ray") is None or not os.path.exists(RAY):
        return 'Ray is not installed (FLOE_EXTRAS=test,ray bash scripts/install.sh)'
    if os.geteuid() != 0:
        return "network namespaces need root: the two-node cluster cannot be made"
    if not shutil.which("ip"):
        return "ip (iproute2) is missing: the two-node cluster cannot be made"
    return None


class TwoNodes:
    """Two network namespaces joined by a veth pair, a Ray head in one, a worker in the other."""

    def __init__(self, head_cpus: int = 2, worker_cpus: int = 1,
                 env: Optional[dict] = None) -> None:
        self.cpus = {"head": head_cpus, "worker": worker_cpus}
        tag = f"{os.getpid() % 100000}"
        self.ns = {"head": f"floe-h{tag}", "worker": f"floe-w{tag}"}
        self.veth = {"head": f"fh{tag}", "worker": f"fw{tag}"}
        self.ip = {"head": HEAD_IP, "worker": WORKER_IP}
        # short: Ray's Unix socket paths live under it (a path may not pass 107 bytes)
        self.root = tempfile.mkdtemp(prefix="floe-rc-", dir="/tmp")
        self.made: list[str] = []
        self.env = dict(
            os.environ, HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0",
            RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", RAY_agent_register_timeout_ms="600000",
            RAY_raylet_start_wait_time_s="600", RAY_worker_niceness="0",
            # the head finds a dead node in about 3 s (default: 5 failures of 3 s checks)
            RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3",
            RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S="60", RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S="60",
            # Serve's proxy (on the head) prefers what runs on its own node while it keeps up:
            # route between both nodes, so that the lost node's replica has requests in flight
            RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING="0",
            # token authentication on every node and client of this cluster, with a token of its
            # own (Ray turns it on for a head that finds ~/.ray/auth_token; a worker told the
            # address does not look there)
            RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
        # the caller's: the raylets pass it to the processes they start (the fake engine reads
        # the settings tree from it)
        self.env.update(env or {})

    # --- network ---------------------------------------------------------------------------------

    def make_network(self) -> None:
        for ns in self.ns.values():
            run("ip", "netns", "add", ns)
            self.made.append(ns)
        run("ip", "link", "add", self.veth["head"], "type", "veth", "peer", "name", self.veth["worker"])
        for side in ("head", "worker"):
            run("ip", "link", "set", self.veth[side], "netns", self.ns[side])
            self.exec(side, "ip", "addr", "add", f"{self.ip[side]}/30", "dev", self.veth[side])
            self.exec(side, "ip", "link", "set", self.veth[side], "up")
            self.exec(side, "ip", "link", "set", "lo", "up")

    def exec(self, side: str, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return run("ip", "netns", "exec", self.ns[side], *cmd, timeout=timeout)

    def popen(self, side: str, cmd: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.ns[side], *cmd], env=self.env,
                                cwd=REPO, **kw)

    # --- Ray -------------------------------------------------------------------------------------

    def start_ray(self) -> None:
        common = ["--object-store-memory", str(150 << 20), "--disable-usage-stats",
                  "--include-log-monitor", "false"]
        head = [RAY, "start", "--head", "--node-ip-address", HEAD_IP, "--port", str(PORT),
                "--num-cpus", str(self.cpus["head"]), "--include-dashboard", "false",
                "--temp-dir", os.path.join(self.root, "h"), *common]
        worker = [RAY, "start", "--address", f"{HEAD_IP}:{PORT}", "--node-ip-address", WORKER_IP,
                  "--num-cpus", str(self.cpus["worker"]), "--temp-dir", os.path.join(self.root, "w"), *common]
        for side, cmd in (("head", head), ("worker", worker)):
            p = self.popen(side, cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            try:
                out, _ = p.communicate(timeout=START_TIMEOUT)
            except subprocess.TimeoutExpired:
                p.kill()
                raise ClusterUnavailable(
                    f"the Ray {side} node did not start within {START_TIMEOUT} s here") from None
            if p.returncode != 0:
                raise RuntimeError(f"ray start ({side}) failed: {out[-2000:]}")

    def pids(self, side: str) -> list[int]:
        r = run("ip", "netns", "pids", self.ns[side], check=False)
        return [int(x) for x in r.stdout.split()]

    def procs(self, side: str, word: str) -> list[int]:
        """Processes in ``side``'s namespace whose command line holds ``word``."""
        out = []
        for pid in self.pids(side):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if word.encode() in f.read():
                        out.append(pid)
            except OSError:
                pass
        return out

    def raylet(self, side: str) -> int:
        for pid in self.pids(side):
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip() == "raylet":
                        return pid
            except OSError:
                pass
        raise RuntimeError(f"no raylet in the {side} namespace")

    def kill_node(self, side: str) -> float:
        """SIGKILLs the raylet of ``side``; returns when (monotonic)."""
        pid = self.raylet(side)
        os.kill(pid, signal.SIGKILL)
        return time.monotonic()

    def close(self) -> None:
        for side in ("worker", "head"):
            if self.ns[side] not in self.made:
                continue
            for _ in range(3):
                pids = self.pids(side)
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.5)
            run("ip", "netns", "del", self.ns[side], check=False)
        shutil.rmtree(self.root, ignore_errors=True)


