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
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.ray_cluster, pytest.mark.full, pytest.mark.slow]

from floe.bench.ray_cluster import (HEAD_IP, PORT, ClusterUnavailable, TwoNodes,  # noqa: E402
                                    problem)

@pytest.fixture
def cluster():
    why = problem()
    if why:
        pytest.skip(why)
    # the embedding actors' simulated compute (the fake engine reads the settings tree from the
    # environment of the raylet that starts them)
    c = TwoNodes(env={"FLOE_FAKE_SECONDS_PER_BATCH": "0.3"})
    try:
        try:
            c.make_network()
        except RuntimeError as exc:
            pytest.skip(f"cannot make the two network namespaces here: {exc}")
        try:
            c.start_ray()
        except ClusterUnavailable as exc:
            pytest.skip(str(exc))
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
