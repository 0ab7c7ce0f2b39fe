"""`floe serve --frontend-workers 2`: two front-end processes behind the same HTTP and gRPC ports,
sharing the replicas that the main process supervises (fake engine, real processes)."""

from __future__ import annotations

import os
import signal
import time

import grpc
import httpx
import numpy as np
import pytest

from floe.proto import floe_pb2, floe_pb2_grpc
from tests.support import floe_serve

pytestmark = pytest.mark.slow

ARGS = ("--engine", "fake", "--num-replicas", "2", "--frontend-workers", "2",
        "--health-interval", "0.5", "--log-level", "info")


def _frontend_pids(url: str, connections: int = 60) -> set[int]:
    """The front-end pids that answer /info, each on a fresh connection."""
    pids = set()
    for _ in range(connections):
        with httpx.Client(base_url=url, timeout=30) as c:   # a new connection each time
            pids.add(c.get("/info").json()["frontend"]["pid"])
        if len(pids) >= 2:
            break
    return pids


def _embed(url: str, texts: list[str]) -> np.ndarray:
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/embeddings", json={"input": texts})
        assert r.status_code == 200, r.text
        return np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def test_two_front_ends_share_ports_replicas_and_metrics(tmp_path):
    # one replica: both front ends route to the same process
    args = tuple("1" if i and ARGS[i - 1] == "--num-replicas" else a for i, a in enumerate(ARGS))
    with floe_serve(*args, tmp_dir=str(tmp_path)) as srv:
        info = httpx.get(srv.url + "/info", timeout=30).json()
        assert info["frontend"]["processes"] == 2
        # both processes accept on the one HTTP port
        pids = _frontend_pids(srv.url)
        assert len(pids) == 2, (pids, srv.log())
        assert srv.proc.pid in pids

        # the same input gets the same embedding whichever front end and replica answers
        texts = ["front ends share the replicas", "second text"]
        first = _embed(srv.url, texts)
        for _ in range(8):
            np.testing.assert_array_equal(_embed(srv.url, texts), first)

        # gRPC on the shared port: every connection is answered, by both processes over time
        for _ in range(6):
            with grpc.insecure_channel(srv.grpc_address) as ch:
                stub = floe_pb2_grpc.EmbedderStub(ch)
                reply = stub.Encode(floe_pb2.EncodeRequest(texts=texts), timeout=30)
                got = np.frombuffer(reply.embeddings, dtype="<f4").reshape(2, -1)
                np.testing.assert_allclose(got, first, atol=1e-6)

        # /metrics from either process counts the requests of both
        want = 9 + 6
        deadline = time.monotonic() + 10
        while True:
            counts = {_metric(srv.url, "floe_requests_total") for _ in range(6)}
            if counts and min(counts) >= want:
                break
            assert time.monotonic() < deadline, (counts, want)
            time.sleep(0.5)


def test_front_end_workers_serve_several_models(tmp_path, bert_reranker):
    """--frontend-workers with several --model: every front end routes each model's requests to
    that model's replicas (the replica table is keyed by model)."""
    args = tuple("1" if i and ARGS[i - 1] == "--num-replicas" else a for i, a in enumerate(ARGS))
    with floe_serve(*args, "--model", "default", "--model", bert_reranker,
                    tmp_dir=str(tmp_path)) as srv:
        assert len(_frontend_pids(srv.url)) == 2, srv.log()
        texts = ["several models", "behind every front end"]
        first = _embed(srv.url, texts)
        docs = ["a fox is a small wild animal", "the stock market fell today"]
        ranked = None
        pids = set()
        # new connections until both front ends have answered (the kernel spreads connections
        # over the two listeners by a hash, not in turn: a dozen can all land on one)
        for attempt in range(60):
            if attempt >= 12 and len(pids) == 2:
                break
            with httpx.Client(base_url=srv.url, timeout=60) as c:   # a new connection each time
                np.testing.assert_array_equal(_embed(srv.url, texts), first)
                r = c.post("/rerank", json={"query": "what is a fox", "texts": docs})
                assert r.status_code == 200, r.text
                ranked = ranked or r.json()
                assert r.json() == ranked
                info = c.get("/info").json()
                pids.add(info["frontend"]["pid"])
                assert {m["task"] for m in info["models"]} == {"embed", "score"}
        assert len(pids) == 2, pids


@pytest.mark.full
def test_worker_and_replica_deaths_lose_nothing(tmp_path):
    with floe_serve(*ARGS, tmp_dir=str(tmp_path)) as srv:
        pids = _frontend_pids(srv.url)
        assert len(pids) == 2, srv.log()
        worker = next(p for p in pids if p != srv.proc.pid)

        # a killed front-end worker: the other front end keeps answering, the worker comes back
        os.kill(worker, signal.SIGKILL)
        for _ in range(10):
            _embed(srv.url, ["still served"])
        deadline = time.monotonic() + 60
        while True:
            now = _frontend_pids(srv.url)
            if len(now) == 2 and worker not in now:
                break
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.5)

        # a killed replica: the supervisor restarts it, and the worker routes to the new process
        replicas = httpx.get(srv.url + "/info", timeout=30).json()["replicas"]["replicas"]
        os.kill(replicas[0]["pid"], signal.SIGKILL)
        for _ in range(20):
            _embed(srv.url, ["after a replica died"])
        deadline = time.monotonic() + 60
        while True:
            seen = []
            for _ in range(20):
                with httpx.Client(base_url=srv.url, timeout=30) as c:
                    r = c.get("/info").json()
                seen.append((r["frontend"]["index"], r["replicas"]["replicas"][0]))
            restarted = {idx for idx, rep in seen if rep["restarts"] >= 1 and rep["healthy"]}
            if restarted == {0, 1}:
                break
            assert time.monotonic() < deadline, (seen, srv.log())
            time.sleep(0.5)
        for _ in range(20):
            _embed(srv.url, ["both replicas again"])

        # SIGTERM: every front end drains and exits with the main process
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(timeout=60) == 0
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in now) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in now)


@pytest.mark.full
def test_a_crash_looping_worker_is_given_up_and_the_others_serve(tmp_path):
    with floe_serve(*ARGS, "--max-restarts", "1", "--restart-window", "120",
                    tmp_dir=str(tmp_path)) as srv:
        killed: set[int] = set()
        deadline = time.monotonic() + 120
        while "front-end worker 1 given up" not in srv.log():
            assert time.monotonic() < deadline, srv.log()
            for pid in _frontend_pids(srv.url, connections=20) - {srv.proc.pid} - killed:
                killed.add(pid)
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        assert len(killed) == 2   # the first process and its one restart
        assert "given up: crash-looped: 1 restarts within 120 s" in srv.log()
        for _ in range(5):
            _embed(srv.url, ["served by the main front end"])
        assert _frontend_pids(srv.url, connections=10) == {srv.proc.pid}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False
