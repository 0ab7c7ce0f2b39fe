"""The faults the front end -> replica boundary must survive, as a user of `floe serve` sees them.

Each test runs a real `floe serve` (fake engine) and breaks something the way production does:
a replica that stops making progress (SIGSTOP), one that is killed again and again as it starts,
replicas that cannot start at all, clients that go away while their request waits, and requests
whose headers are out of bounds. Nothing here is timed for speed; the bounds are the contract's
(docs/operations.md, docs/replicas.md).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import httpx
import numpy as np
import pytest

from floe.proto import floe_pb2, floe_pb2_grpc
from tests.support import floe_serve, free_port


def info(server) -> dict:
    return httpx.get(server.url + "/info", timeout=10).json()["replicas"]


def wait_for(cond, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {seconds} s: {what}"
        time.sleep(0.05)


def metric(server, name: str, **labels) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            head = line.split(" ")[0]
            if head == name or head.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
    return total


def embed(server, inputs, **kw) -> httpx.Response:
    return httpx.post(server.url + "/v1/embeddings", json={"input": inputs}, timeout=60, **kw)


def test_a_replica_that_makes_no_progress_leaves_rotation_within_5_s(tmp_path):
    """SIGSTOP: no answers, no probes. At the default health interval the replica is out of
    rotation within 5 s, every request still succeeds (the calls waiting on it are retried on the
    other replica), and it is killed and restarted after three failed probes."""
    with floe_serve("--engine", "fake", "--num-replicas", "2", "--fake-seconds-per-batch", "0.01",
                    tmp_dir=str(tmp_path)) as srv:
        victim = info(srv)["replicas"][0]["pid"]
        results: list[int] = []
        stop = threading.Event()

        def load():
            k = 0
            while not stop.is_set():
                results.append(embed(srv, [f"text {k}", f"other {k}"]).status_code)
                k += 1

        workers = [threading.Thread(target=load) for _ in range(4)]
        for w in workers:
            w.start()
        wait_for(lambda: len(results) > 20, 60, "load running")
        os.kill(victim, signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            wait_for(lambda: not info(srv)["replicas"][0]["healthy"], 10, "out of rotation")
            out_after = time.monotonic() - t0
            n_then = len(results)
            wait_for(lambda: len(results) > n_then + 20, 60, "requests served by the other replica")
        finally:
            os.kill(victim, signal.SIGCONT)
            stop.set()
            for w in workers:
                w.join(timeout=120)
        print(f"SIGSTOP: out of rotation after {out_after:.2f} s")
        assert out_after < 5.0, out_after
        assert results and set(results) == {200}, sorted(set(results))
        # killed as hung after its third failed probe (or back in rotation if it answered first),
        # and serving again either way
        r0 = wait_for(lambda: (lambda r: r if r["healthy"] else None)(info(srv)["replicas"][0]),
                      60, "replica 0 back in rotation")
        assert r0["pid"] != victim or r0["restarts"] == 0


def test_a_replica_killed_at_start_up_again_and_again_is_given_up_while_the_other_serves(tmp_path):
    with floe_serve("--engine", "fake", "--num-replicas", "2", "--max-restarts", "2",
                    "--restart-window", "120", tmp_dir=str(tmp_path)) as srv:
        seen: set[int] = set()

        def kill_replica_1():
            r1 = info(srv)["replicas"][1]
            if r1["state"] == "failed":
                return r1
            pid = r1["pid"]
            if pid and pid not in seen:
                seen.add(pid)
                os.kill(pid, signal.SIGKILL)
            return None

        r1 = wait_for(kill_replica_1, 120, "replica 1 given up")
        assert r1["restarts"] == 2 and not r1["healthy"]
        assert "given up: crash-looped" in r1["message"] and "SIGKILL" in r1["message"], r1
        assert embed(srv, ["still serving"]).status_code == 200
        assert info(srv)["ready"] and info(srv)["healthy_replicas"] == 1
        log = srv.log()
        assert "replica 1 given up" in log


def test_when_no_replica_can_start_floe_serve_exits_nonzero_with_the_replica_error(tmp_path):
    blockers: list = []
    for _ in range(50):   # replicas on tcp bind start_port + i: take two adjacent ports
        start = free_port()
        try:
            for port in (start, start + 1):
                s = socket.socket()
                blockers.append(s)
                s.bind(("127.0.0.1", port))
                s.listen()
            break
        except OSError:
            for s in blockers:
                s.close()
            blockers = []
    assert blockers, "no two adjacent free ports"
    try:
        cmd = [sys.executable, "-m", "floe", "serve", "--engine", "fake", "--num-replicas", "2",
               "--replica-transport", "tcp", "--start-port", str(start), "--max-restarts", "2",
               "--port", str(free_port()), "--grpc-port", str(free_port())]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        took = time.monotonic() - t0
    finally:
        for s in blockers:
            s.close()
    assert proc.returncode != 0
    assert took < 60, took
    assert f"cannot bind 127.0.0.1:{start}" in proc.stderr, proc.stderr[-2000:]
    assert "no replica could be started" in proc.stderr


@pytest.fixture(scope="module")
def queued_server(tmp_path_factory):
    """One replica, one sequence per forward pass of 2 s: a second request waits in its queue."""
    with floe_serve("--engine", "fake", "--num-replicas", "1", "--max-batch-size", "1",
                    "--fake-seconds-per-batch", "2", "--batch-timeout-ms", "0",
                    "--forward-timeout", "60", tmp_dir=str(tmp_path_factory.mktemp("q"))) as srv:
        yield srv


def _hold_the_engine(server) -> threading.Thread:
    t = threading.Thread(target=lambda: embed(server, ["holds the engine"]))
    t.start()
    wait_for(lambda: metric(server, "floe_in_flight_requests") >= 1, 30, "first request admitted")
    return t


def test_an_http_client_gone_while_queued_has_its_work_dropped_before_compute(queued_server):
    srv = queued_server
    holder = _hold_the_engine(srv)
    dropped = metric(srv, "floe_dropped_sequences_total")
    cancelled = metric(srv, "floe_request_failures_total", error="cancelled", transport="http")
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        body = json.dumps({"input": ["a", "b", "c", "d", "e"]}).encode()
        s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        wait_for(lambda: metric(srv, "floe_in_flight_requests") >= 2, 30, "queued")
    # the client is gone with its 5 inputs queued behind a 2 s forward pass
    wait_for(lambda: metric(srv, "floe_dropped_sequences_total") >= dropped + 4, 30,
             "the queued sequences dropped (one may already be in the next forward)")
    wait_for(lambda: metric(srv, "floe_request_failures_total", error="cancelled",
                            transport="http") == cancelled + 1, 30, "counted as cancelled")
    holder.join(timeout=60)
    assert embed(srv, ["after"]).status_code == 200


def test_a_grpc_client_gone_while_queued_has_its_work_dropped_before_compute(queued_server):
    srv = queued_server
    holder = _hold_the_engine(srv)
    dropped = metric(srv, "floe_dropped_sequences_total")
    cancelled = metric(srv, "floe_request_failures_total", error="cancelled", transport="grpc")
    with grpc.insecure_channel(srv.grpc_address) as ch:
        stub = floe_pb2_grpc.EmbedderStub(ch)
        call = stub.Encode.future(floe_pb2.EncodeRequest(texts=["a", "b", "c", "d", "e"]),
                                  timeout=60)
        wait_for(lambda: metric(srv, "floe_in_flight_requests") >= 2, 30, "queued")
        call.cancel()
    wait_for(lambda: metric(srv, "floe_dropped_sequences_total") >= dropped + 4, 30,
             "the queued sequences dropped")
    wait_for(lambda: metric(srv, "floe_request_failures_total", error="cancelled",
                            transport="grpc") == cancelled + 1, 30, "counted as cancelled")
    holder.join(timeout=60)


def test_a_client_gone_from_a_request_cut_across_replicas_has_every_part_dropped(tmp_path):
    """A request cut across two replicas (--split-min-tokens 1: parts of any size), each replica
    computing one sequence per 1 s pass: the client goes away, and both parts' queued sequences
    are dropped before compute; the server answers the next request, cut again, in item order."""
    with floe_serve("--engine", "fake", "--num-replicas", "2", "--max-batch-size", "1",
                    "--fake-seconds-per-batch", "1", "--batch-timeout-ms", "0",
                    "--split-min-tokens", "1", "--forward-timeout", "60",
                    tmp_dir=str(tmp_path)) as srv:
        # the server answers once one replica is ready; a request is cut only across healthy ones
        wait_for(lambda: info(srv)["healthy_replicas"] == 2, 60, "both replicas healthy")
        dropped = metric(srv, "floe_dropped_sequences_total")
        with socket.create_connection(("127.0.0.1", srv.port)) as s:
            body = json.dumps({"input": [f"input {k}" for k in range(10)]}).encode()
            s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body) + body)
            wait_for(lambda: metric(srv, "floe_split_requests_total") >= 1, 30, "cut")
            wait_for(lambda: sum(r["in_flight_requests"] for r in info(srv)["replicas"]) == 2,
                     30, "both parts on their replicas")
        # 10 inputs, 5 on each replica, at most 2 of each computed or in a pass by now
        wait_for(lambda: metric(srv, "floe_dropped_sequences_total") >= dropped + 6, 30,
                 "both parts' queued sequences dropped")
        wait_for(lambda: sum(r["in_flight_requests"] for r in info(srv)["replicas"]) == 0, 30,
                 "nothing left in flight")
        r = embed(srv, ["after one", "after two"])
        assert r.status_code == 200
        got = np.array([d["embedding"] for d in r.json()["data"]])
        alone: dict[int, list] = {}
        threads = [threading.Thread(target=lambda k=k, t=t: alone.__setitem__(
            k, embed(srv, [t]).json()["data"][0]["embedding"]))
            for k, t in enumerate(["after one", "after two"])]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        np.testing.assert_allclose(got, np.array([alone[0], alone[1]]), rtol=1e-6, atol=1e-6)
        assert not np.allclose(got[0], got[1])
        assert metric(srv, "floe_split_requests_total") >= 2


def _raw(server, head: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.settimeout(30)
        body = b'{"input": "hi"}'
        s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n" % len(body) + head + b"\r\n" + body)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            out += chunk
            if b"\r\n\r\n" in out:
                header, _, rest = out.partition(b"\r\n\r\n")
                length = [int(x.split(b":")[1]) for x in header.split(b"\r\n")
                          if x.lower().startswith(b"content-length")]
                if length and len(rest) >= length[0]:
                    break
    status = int(out.split(b" ", 2)[1]) if out.startswith(b"HTTP/1.1") else 0
    return status, out.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize("head,what", [
    (b"".join(b"X-Extra-%d: v\r\n" % i for i in range(120)), "more than 100 headers"),
    (b"X-Big: " + b"a" * 40_000 + b"\r\n", "larger than 32768 bytes"),
    (b"".join(b"X-Wide-%d: %s\r\n" % (i, b"b" * 500) for i in range(90)), "larger than 32768 bytes"),
])
def test_headers_out_of_bounds_are_431_before_any_work(queued_server, head, what):
    srv = queued_server
    requests_before = metric(srv, "floe_requests_total")
    status, body = _raw(srv, head)
    assert status == 431
    err = json.loads(body)["error"]
    assert err["code"] == "headers_too_large" and what in err["message"]
    assert metric(srv, "floe_requests_total") == requests_before   # nothing reached the app
    # within bounds is served, and the server is still serving
    ok, _ = _raw(srv, b"".join(b"X-Fine-%d: v\r\n" % i for i in range(90)))
    assert ok == 200
    np.testing.assert_equal(embed(srv, ["after"]).status_code, 200)


CRASH_ID = 4242   # the fake engine's process exits on a forward pass that holds this id


def test_an_input_that_kills_two_replicas_is_a_422_naming_it_and_never_sent_again(tmp_path):
    with floe_serve("--engine", "fake", "--num-replicas", "2", "--health-interval", "0.2",
                    "--fake-crash-token-id", str(CRASH_ID), "--coalesce-tokens", "0",
                    tmp_dir=str(tmp_path)) as server:
        assert embed(server, ["warm up"]).status_code == 200
        poison = [[101, 2054, CRASH_ID, 102]]
        resp = embed(server, poison)
        assert resp.status_code == 422, resp.text
        err = resp.json()["error"]
        assert err["code"] == "unprocessable" and err["param"] == "input"
        assert "made the model's process exit on two replicas" in err["message"]
        assert "retry-after" not in resp.headers
        # the replicas come back (restarted), and innocent requests are served meanwhile
        wait_for(lambda: info(server)["healthy_replicas"] == 2, 60, "both replicas back")
        restarts = sum(r["restarts"] for r in info(server)["replicas"])
        assert restarts == 2
        assert embed(server, ["an innocent text"]).status_code == 200
        # sent again: refused at the front end, no replica dies for it a third time
        t0 = time.monotonic()
        again = embed(server, poison)
        assert again.status_code == 422 and "refused without being sent again" in again.text
        assert time.monotonic() - t0 < 5
        assert embed(server, [[101, 2054, 102]]).status_code == 200
        assert sum(r["restarts"] for r in info(server)["replicas"]) == restarts
        assert info(server)["poisoned_requests"] == 2
        assert metric(server, "floe_poison_inputs_total") >= 1
