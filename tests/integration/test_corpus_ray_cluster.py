"""floe on a real two-node Ray cluster, and what happens when a node dies.

The cluster: a Ray head and a Ray worker node in two network namespaces this test creates,
joined by a veth pair whose two private addresses exist only inside those namespaces (nothing in
them can reach the host's network or any other address). Both nodes run on this machine, with
their own raylet, object store and temp folder; they share the file system, which stands in for
the shared storage a real cluster needs for its input and output.

* ``floe embed-corpus --ray HEAD:6379`` runs across both nodes (one embedding actor on each);
  the worker node's raylet is SIGKILLed mid-job. The job completes, and its output is identical
  to the local path's: every row once, in order, the same bytes. The time lost is printed.
* Ray Serve with two floe replicas, one on each node, behind floe's ingress on the head: the
  worker node's raylet is SIGKILLed while requests flow to both, and every request is answered,
  with the same embeddings: those in flight on the lost replica are called again on the one left
  (FloeIngress; Serve's proxy alone answers them 500).

Marked ``ray_cluster`` and ``full`` (FLOE_TEST_FULL=1). Skips, saying why, without Ray, without
root, or where network namespaces cannot be made. Every process this test starts lives in one of
its namespaces; it stops them by their ids (``ip netns pids``), never ``ray stop`` (which would
stop every Ray on the machine).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.ray_cluster, pytest.mark.full, pytest.mark.slow]

HEAD_IP, WORKER_IP, PORT = "10.77.0.1", "10.77.0.2", 6379
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")
START_TIMEOUT = 600   # a busy 2-core machine can take minutes to start Ray's processes


def _run(*cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()[:500]}")
    return r


def _problem() -> str | None:
    if importlib.util.find_spec("ray") is None or not os.path.exists(RAY):
        return 'Ray is not installed (FLOE_EXTRAS=test,ray bash scripts/install.sh)'
    if os.geteuid() != 0:
        return "network namespaces need root: the two-node cluster cannot be made"
    if not shutil.which("ip"):
        return "ip (iproute2) is missing: the two-node cluster cannot be made"
    return None


class TwoNodes:
    """Two network namespaces joined by a veth pair, a Ray head in one, a worker in the other."""

    def __init__(self) -> None:
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
            RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
            # the embedding actors' simulated compute (the fake engine reads the settings tree
            # from the environment of the raylet that starts them)
            FLOE_FAKE_SECONDS_PER_BATCH="0.3")

    # --- network ---------------------------------------------------------------------------------

    def make_network(self) -> None:
        for ns in self.ns.values():
            _run("ip", "netns", "add", ns)
            self.made.append(ns)
        _run("ip", "link", "add", self.veth["head"], "type", "veth", "peer", "name", self.veth["worker"])
        for side in ("head", "worker"):
            _run("ip", "link", "set", self.veth[side], "netns", self.ns[side])
            self.exec(side, "ip", "addr", "add", f"{self.ip[side]}/30", "dev", self.veth[side])
            self.exec(side, "ip", "link", "set", self.veth[side], "up")
            self.exec(side, "ip", "link", "set", "lo", "up")

    def exec(self, side: str, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return _run("ip", "netns", "exec", self.ns[side], *cmd, timeout=timeout)

    def popen(self, side: str, cmd: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.ns[side], *cmd], env=self.env,
                                cwd=REPO, **kw)

    # --- Ray -------------------------------------------------------------------------------------

    def start_ray(self) -> None:
        common = ["--object-store-memory", str(150 << 20), "--disable-usage-stats",
                  "--include-log-monitor", "false"]
        head = [RAY, "start", "--head", "--node-ip-address", HEAD_IP, "--port", str(PORT),
                "--num-cpus", "2", "--include-dashboard", "false",
                "--temp-dir", os.path.join(self.root, "h"), *common]
        worker = [RAY, "start", "--address", f"{HEAD_IP}:{PORT}", "--node-ip-address", WORKER_IP,
                  "--num-cpus", "1", "--temp-dir", os.path.join(self.root, "w"), *common]
        for side, cmd in (("head", head), ("worker", worker)):
            p = self.popen(side, cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            try:
                out, _ = p.communicate(timeout=START_TIMEOUT)
            except subprocess.TimeoutExpired:
                p.kill()
                pytest.skip(f"the Ray {side} node did not start within {START_TIMEOUT} s here")
            if p.returncode != 0:
                raise RuntimeError(f"ray start ({side}) failed: {out[-2000:]}")

    def pids(self, side: str) -> list[int]:
        r = _run("ip", "netns", "pids", self.ns[side], check=False)
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
            _run("ip", "netns", "del", self.ns[side], check=False)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def cluster():
    problem = _problem()
    if problem:
        pytest.skip(problem)
    c = TwoNodes()
    try:
        try:
            c.make_network()
        except RuntimeError as exc:
            pytest.skip(f"cannot make the two network namespaces here: {exc}")
        c.start_ray()
        yield c
    finally:
        c.close()


def _wait(cond, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended (rc {proc.returncode}) before {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# --- embed-corpus ----------------------------------------------------------------------------------

# the exact command docs/scale-out.md shows: node address, actors, threads, the commit bound
def embed_corpus_cmd(inp: str, out: str) -> list[str]:
    return [sys.executable, "-m", "floe", "embed-corpus", inp, "-o", out,
            "--ray", f"{HEAD_IP}:{PORT}", "--workers", "2", "--threads", "1",
            "--commit-seconds", "1", "--engine", "fake", "--shard-rows", "10",
            "--batch-tokens", "64", "--text-column", "body", "--id-column", "doc"]


def test_embed_corpus_survives_losing_the_worker_node(cluster, tmp_path):
    from tests.integration.test_corpus import _cli, emb, make_texts, write_corpus

    n = 160
    inp = write_corpus(tmp_path / "c.jsonl", make_texts(n, seed=11), "jsonl")
    local = str(tmp_path / "local.parquet")
    r = _cli(inp, "-o", local, "--engine", "fake", "--shard-rows", "10", "--batch-tokens", "64",
             "--text-column", "body", "--id-column", "doc")
    assert r.returncode == 0, r.stderr
    out = str(tmp_path / "ray.parquet")
    work = out + ".parts"
    log_path = tmp_path / "driver.log"
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        driver = cluster.popen("head", embed_corpus_cmd(inp, out), stdout=log, stderr=subprocess.STDOUT)
    try:
        def parts() -> int:
            return sum(n.startswith("part-") for n in os.listdir(work)) if os.path.isdir(work) else 0
        # mid-job: an embedding actor runs on the worker node and shards are being written
        _wait(lambda: cluster.procs("worker", "_EmbedActor") and parts() >= 2, 600,
              "an embedding actor on the worker node and two shards written", driver)
        assert parts() < n // 10, "the job finished before the node could be killed"
        killed_at = cluster.kill_node("worker")
        written_at_kill = parts()
        rc = driver.wait(600)
    finally:
        if driver.poll() is None:
            driver.kill()
    wall = time.monotonic() - t0
    text = log_path.read_text()
    assert rc == 0, text[-4000:]
    got, want = pq.read_table(out), pq.read_table(local)
    assert got.column("id").to_pylist() == want.column("id").to_pylist() == [f"id-{i}" for i in range(n)]
    np.testing.assert_array_equal(emb(got), emb(want))
    assert not os.path.exists(work)
    summary = re.search(r"embedded (\d+) rows.*", text)
    cost = re.search(r"Ray fixed cost: .*", text)
    kept = n - int(summary.group(1)) if summary else "?"
    print(f"\nNODE LOSS (embed-corpus): worker raylet SIGKILLed {killed_at - t0:.1f} s into the job "
          f"with {written_at_kill}/{n // 10} shards written; job done {wall - (killed_at - t0):.1f} s "
          f"later, {wall:.1f} s in all; {kept} row(s) the lost actor had committed (pieces, or a "
          f"part whose status it did not return) were not embedded again. {cost.group(0) if cost else ''} | {summary.group(0) if summary else ''}")


# --- Ray Serve -------------------------------------------------------------------------------------

SERVE_CLIENT = r"""
import json, sys, time, threading
import httpx, ray
from ray import serve
from floe.ray.serve import FloeEmbeddings, FloeIngress

head, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])  # argv[4]: clients
ray.init(address=f"{head}:6379", logging_level="WARNING")
serve.start(http_options={"host": head, "port": port, "location": "HeadOnly"})
# build_app's two deployments, placed for this cluster: the replicas one to a node, the ingress
# beside the head-only proxy (Ray's head node resource)
# (each forward pass 0.2 s: a replica lost always has requests in flight)
replicas = FloeEmbeddings.options(num_replicas=2, ray_actor_options={"num_cpus": 1}).bind(
    model="default", engine="fake", fake_seconds_per_batch=0.2)
ingress = FloeIngress.options(ray_actor_options={
    "num_cpus": 0, "resources": {"node:__internal_head__": 0.001}})
serve.run(ingress.bind(replicas, 16_000_000), name="floe", route_prefix="/")
texts = ["hello ray serve", "node loss is a normal day on a cluster"]
url = f"http://{head}:{port}/v1/embeddings"
with httpx.Client(timeout=120) as c:
    first = c.post(url, json={"input": texts}).json()["data"]
print("READY", flush=True)
codes, errors, same = [], [], True
lock = threading.Lock()
def loop():
    global same
    end = time.monotonic() + seconds
    with httpx.Client(timeout=120) as c:
        while time.monotonic() < end:
            try:
                r = c.post(url, json={"input": texts})
                ok = r.status_code == 200 and r.json()["data"] == first
                with lock:
                    codes.append(r.status_code)
                    same = same and (ok or r.status_code != 200)
                    if r.status_code != 200:
                        errors.append(r.text[:200])
            except httpx.HTTPError as exc:
                with lock:
                    codes.append(0)
                    errors.append(repr(exc)[:200])
threads = [threading.Thread(target=loop) for _ in range(int(sys.argv[4]))]
for t in threads: t.start()
for t in threads: t.join()
print("RESULT", json.dumps({"codes": codes, "errors": errors[:5], "same": same}), flush=True)
serve.shutdown()
"""


CLIENTS = 4   # requests in flight at once


def test_ray_serve_answers_every_request_when_a_replica_node_dies(cluster, tmp_path):
    script = tmp_path / "serve_client.py"
    script.write_text(SERVE_CLIENT)
    proc = cluster.popen("head", [sys.executable, str(script), HEAD_IP, "8000", "25", str(CLIENTS)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("READY"):
                break
        assert lines and lines[-1].startswith("READY"), "".join(lines)[-4000:]
        # Serve spread its two replicas: one on each node
        assert len(cluster.procs("worker", "FloeEmbeddings")) == 1, cluster.procs("worker", "ray::")
        assert len(cluster.procs("head", "FloeEmbeddings")) == 1
        time.sleep(5)   # requests flowing to both replicas
        cluster.kill_node("worker")
        # the worker node's replica had its share of them (Serve's access log of handle calls,
        # on that node)
        logs = sorted({os.path.realpath(p) for p in glob.glob(os.path.join(
            cluster.root, "w", "session_*", "logs", "serve", "replica_*.log"))})
        served = sum(len(re.findall(r"CALL embed_body OK ", open(p, errors="replace").read()))
                     for p in logs)
        assert served > 0, ("the worker node's replica served nothing before it was lost: "
                            + "".join(open(p, errors="replace").read()[-1500:] for p in logs))
        rest, _ = proc.communicate(timeout=600)
        lines += rest.splitlines(keepends=True)
    finally:
        if proc.poll() is None:
            proc.kill()
    # calls FloeIngress made again because their replica died under them (its warnings, in the
    # head's logs: the worker processes' stderr)
    head_logs = {os.path.realpath(p) for p in glob.glob(os.path.join(
        cluster.root, "h", "session_*", "logs", "**", "*"), recursive=True) if os.path.isfile(p)}
    again = sum(open(p, errors="replace").read().count("died under a call") for p in head_logs)
    text = "".join(lines)
    result = [line for line in lines if line.startswith("RESULT")]
    assert proc.returncode == 0 and result, text[-4000:]
    res = json.loads(result[0].split(" ", 1)[1])
    codes = res["codes"]
    print(f"\nNODE LOSS (Serve): {len(codes)} requests, {codes.count(200)} answered 200, "
          f"others {sorted(set(codes) - {200})}; first errors {res['errors']}; the lost node's "
          f"replica had logged {served} request(s); {again} call(s) made again on the replica left")
    assert codes and set(codes) == {200}, res
    assert res["same"]
    assert again > 0, "no request was in flight on the lost replica: the retry was not exercised"
