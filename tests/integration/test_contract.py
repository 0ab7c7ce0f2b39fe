"""The request contract through a real `floe serve` (fake engine): limits, admission, errors
across the hop, connections, auth, malformed messages. docs/operations.md states each point."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time

import grpc
import httpx
import pytest

from floe.proto import floe_pb2, floe_pb2_grpc
from tests.support import floe_serve

pytestmark = pytest.mark.slow


def raw_http(port: int, data: bytes, read_for: float = 2.0) -> bytes:
    """Sends raw bytes on one connection; returns everything read until close or ``read_for`` s."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_for) as s:
        s.sendall(data)
        out = b""
        deadline = time.monotonic() + read_for
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            out += chunk
        return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # short deadlines so the slow-client tests are quick; the body's leaves room for the 8-20 MB
    # bodies other tests post (a loaded machine has read them in over 1 s)
    with floe_serve("--engine", "fake", "--num-replicas", "1", "--max-client-batch-size", "16",
                    "--http-header-timeout", "1", "--http-body-timeout", "5",
                    "--max-connections", "40", "--max-batch-tokens", "4096",
                    "--max-queued-tokens", "2000",
                    tmp_dir=str(tmp_path_factory.mktemp("contract"))) as srv:
        yield srv


def post(server, path: str, body, **kw) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=30, **kw)


def test_huge_prompt_is_refused_before_tokenizing(server):
    r = post(server, "/v1/embeddings", {"input": ["a", "b", "c", "d"], "prompt": "p" * 1_000_000})
    assert r.status_code == 413
    assert r.json()["error"]["param"] == "prompt"
    assert post(server, "/v1/embeddings", {"input": "still serving"}).status_code == 200


def test_item_count_checked_first(server):
    body = b'{"input": [' + b",".join([b"[1]"] * 2_000_000) + b"]}"
    r = httpx.post(server.url + "/v1/embeddings", content=body,
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413
    assert "limit of 16" in r.json()["error"]["message"]


def test_lone_surrogate_names_its_item(server):
    body = b'{"input": ["a", "b", "c", "x\\ud800"]}'
    r = httpx.post(server.url + "/v1/embeddings", content=body,
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "input[3]"


def test_too_large_from_the_replica_stays_too_large(server):
    # 16 inputs of 200 ids = 3,200 tokens: within the front end's limits, over the replica's
    # queue (--max-queued-tokens 2000), which answers "too large", never "overloaded".
    r = post(server, "/v1/embeddings", {"input": [[5] * 200] * 16})
    assert r.status_code == 413, r.text
    assert "retry-after" not in r.headers
    with grpc.insecure_channel(server.grpc_address) as ch:
        stub = floe_pb2_grpc.EmbedderStub(ch)
        ids = (b"\x05\x00\x00\x00" * 200) * 16
        with pytest.raises(grpc.RpcError) as e:
            stub.Encode(floe_pb2.EncodeRequest(token_ids=ids, lengths=[200] * 16), timeout=30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        md = dict(e.value.trailing_metadata())
        assert md.get("floe-error-kind") == "too_large" and "retry-after" not in md


def test_malformed_protobuf_is_invalid_argument(server):
    with grpc.insecure_channel(server.grpc_address) as ch:
        call = ch.unary_unary("/floe.v1.Embedder/Encode", request_serializer=lambda b: b,
                              response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as e:
            call(b"\xff\xff\xff\xff\x0f", timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "Error" not in e.value.details() and "Traceback" not in e.value.details()
    assert "Traceback" not in server.log()


def test_content_length_with_transfer_encoding_closes_the_connection(server):
    smuggled = (b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    body = b"0\r\n\r\n" + smuggled
    req = (b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(body)) + body
    out = raw_http(server.port, req)
    assert out.startswith(b"HTTP/1.1 400")
    assert out.count(b"HTTP/1.1 ") == 1   # the request behind it is never served
    dup = (b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 20\r\n"
           b"\r\n{}")
    out = raw_http(server.port, dup)
    assert out.startswith(b"HTTP/1.1 400") and out.count(b"HTTP/1.1 ") == 1


def test_slow_and_idle_connections_are_closed(server):
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n")   # headers never finish
        assert s.recv(100) == b""                                    # closed by the server
    assert time.monotonic() - t0 < 8
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        assert s.recv(100) == b""                                    # never used: closed too
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"inp")                # body never finishes
        data = s.recv(1000)
        while data:
            data = s.recv(1000)
    assert post(server, "/v1/embeddings", {"input": "fine"}).status_code == 200


def _idle_keep_alive_connection(port: int) -> socket.socket:
    """A connection that made one request and now sits idle under the keep-alive timeout (the
    1 s header deadline of this server no longer applies to it, so it stays open)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    got = b""
    while b"\r\n\r\n" not in got or not got.endswith(b"}"):
        chunk = s.recv(4096)
        assert chunk, got
        got += chunk
    assert got.startswith(b"HTTP/1.1 200"), got
    return s


def test_connection_cap(server):
    held = [_idle_keep_alive_connection(server.port) for _ in range(40)]
    try:
        out = raw_http(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 503") and b"retry-after" in out.lower(), out
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 30
    while httpx.get(server.url + "/health", timeout=10).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_empty_api_key_is_refused_at_start():
    proc = subprocess.run([sys.executable, "-m", "floe", "serve", "--engine", "fake", "--api-key", ""],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "api-key" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    """One request at a time, each taking ~6 s (long enough that a test still holds it on a
    loaded machine)."""
    with floe_serve("--engine", "fake", "--num-replicas", "1", "--max-concurrent-requests", "1",
                    "--fake-seconds-per-batch", "6", "--forward-timeout", "30",
                    "--api-key", "s3cret", "--batch-timeout-ms", "0",
                    tmp_dir=str(tmp_path_factory.mktemp("slow"))) as srv:
        yield srv


AUTH = {"authorization": "bearer s3cret"}   # scheme case-insensitive (RFC 6750)


def _hold(server, results: list) -> threading.Thread:
    def go():
        results.append(post(server, "/v1/embeddings", {"input": "held"}, headers=AUTH))
    t = threading.Thread(target=go)
    t.start()
    deadline = time.monotonic() + 30
    while True:   # until the held request is admitted
        if "floe_in_flight_requests 1.0" in httpx.get(server.url + "/metrics", timeout=10).text:
            return t
        assert time.monotonic() < deadline, "the held request was never admitted"
        time.sleep(0.05)


def test_admission_before_the_body(slow_server):
    results: list = []
    t = _hold(slow_server, results)
    # A declared 15 MB body that is never sent: refused from its headers alone.
    req = (b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n"
           b"Content-Type: application/json\r\nContent-Length: 15000000\r\n\r\n")
    out = raw_http(slow_server.port, req, read_for=1.0)
    assert out.startswith(b"HTTP/1.1 429"), out[:200]
    assert b"retry-after" in out.lower()
    r = post(slow_server, "/tokenize", {"inputs": "x"}, headers=AUTH)   # /tokenize is admitted too
    assert r.status_code == 429
    t.join()
    assert results[0].status_code == 200


def test_vanished_http_client_is_cancelled(slow_server):
    before = httpx.get(slow_server.url + "/metrics", timeout=10).text
    with socket.create_connection(("127.0.0.1", slow_server.port)) as s:
        body = json.dumps({"input": ["gone"] * 4}).encode()
        s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n"
                  b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        deadline = time.monotonic() + 30
        while "floe_in_flight_requests 1.0" not in httpx.get(slow_server.url + "/metrics",
                                                              timeout=10).text:
            assert time.monotonic() < deadline, "the request was never admitted"
            time.sleep(0.05)
        # admitted and queued behind nothing but its own 6 s forward pass: now the client goes


    def cancelled(text: str) -> float:
        for line in text.splitlines():
            if line.startswith("floe_request_failures_total{") and 'error="cancelled"' in line \
                    and "/v1/embeddings" in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        after = httpx.get(slow_server.url + "/metrics", timeout=10).text
        if cancelled(after) > cancelled(before):
            break
        time.sleep(0.2)
    assert cancelled(after) == cancelled(before) + 1
    log = slow_server.log()
    assert "client disconnected" in log
    assert "Traceback" not in log


def test_timeout_under_load_is_503_not_500(tmp_path):
    """Requests queued behind a busy replica past --forward-timeout: 503 + Retry-After, never a
    500 naming replicas, not retried on another replica, and the replica is not restarted."""
    with floe_serve("--engine", "fake", "--num-replicas", "1", "--max-batch-size", "1",
                    "--batch-timeout-ms", "0", "--fake-seconds-per-batch", "1.0",
                    "--forward-timeout", "3.5", tmp_dir=str(tmp_path)) as srv:
        # one forward pass at a time, 1 s each: the first answers well within the timeout even on
        # a loaded machine, the sixth waits at least 5 s (past it) whatever the machine
        async def burst():
            async with httpx.AsyncClient(timeout=60) as c:
                return await asyncio.gather(*(
                    c.post(srv.url + "/v1/embeddings", json={"input": f"t{i}"}) for i in range(6)))
        responses = asyncio.run(burst())
        codes = sorted(r.status_code for r in responses)
        assert 200 in codes and 503 in codes and 500 not in codes, codes
        for r in responses:
            if r.status_code == 503:
                assert r.headers.get("retry-after")
                msg = r.json()["error"]["message"]
                assert "unix:" not in msg and "127.0.0.1" not in msg and "crash" not in msg
        status = httpx.get(srv.url + "/ready", timeout=10)
        assert status.status_code == 200
        assert "killed" not in srv.log()


def test_auth_everywhere(slow_server):
    assert httpx.get(slow_server.url + "/openapi.json", timeout=10).status_code == 401
    assert httpx.get(slow_server.url + "/openapi.json", headers=AUTH, timeout=10).status_code == 200
    assert httpx.get(slow_server.url + "/health", timeout=10).status_code == 200
    r = post(slow_server, "/v1/embeddings", {"input": "x"},
             headers={"authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with grpc.insecure_channel(slow_server.grpc_address) as ch:
        stub = floe_pb2_grpc.EmbedderStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Encode(floe_pb2.EncodeRequest(texts=["x"]), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = stub.Encode(floe_pb2.EncodeRequest(texts=["x"]),
                         metadata=(("authorization", "BEARER   s3cret"),), timeout=20)
        assert ok.n == 1
