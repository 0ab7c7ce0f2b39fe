"""`floe bench` end to end: against a small OpenAI-compatible HTTP server started here, a small
floe.v1.Embedder gRPC server started here, a real `python -m floe.replica --engine fake`, and
sentence-transformers in-process. Every server binds 127.0.0.1 on an ephemeral port."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures

import numpy as np
import pytest

from floe.protocol import ReplicaHello
from fastapi import Request  # module level: the handler's annotation is resolved from globals

from floe.bench import main
from floe.bench.workload import BenchTokenizer, load_model_spec

DIM = 8


@pytest.fixture(scope="module")
def tok() -> BenchTokenizer:
    return BenchTokenizer(load_model_spec("default"))


def _embed(n: int) -> np.ndarray:
    return np.arange(n * DIM, dtype=np.float32).reshape(n, DIM) / 100.0


# --- a tiny OpenAI-compatible server -----------------------------------------------------------

class OpenAIStub:
    """/v1/embeddings returning deterministic vectors and, unless told not to, usage counted with
    the model's tokenizer; every ``fail_every``-th request gets HTTP 429."""

    def __init__(self, tok: BenchTokenizer, report_usage: bool = True, fail_every: int = 0) -> None:
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse

        app = FastAPI()
        self.calls, self.models_seen, self.formats = 0, set(), set()

        @app.get("/health")
        async def health():
            return {}

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": "stub-model", "object": "model"}]}

        @app.post("/v1/embeddings")
        async def embeddings(req: Request):
            body = await req.json()
            self.calls += 1
            self.models_seen.add(body.get("model"))
            self.formats.add(body.get("encoding_format"))
            if fail_every and self.calls % fail_every == 0:
                return JSONResponse({"error": {"message": "slow down"}}, status_code=429)
            inputs = body["input"]
            counts = [len(x) for x in inputs] if inputs and isinstance(inputs[0], list) else \
                [len(ids) for ids in tok.encode(inputs)]
            vecs = _embed(len(inputs))
            b64 = body.get("encoding_format") == "base64"
            data = [{"object": "embedding", "index": i,
                     "embedding": base64.b64encode(v.tobytes()).decode() if b64 else v.tolist()}
                    for i, v in enumerate(vecs)]
            out = {"object": "list", "data": data, "model": "stub-model"}
            if report_usage:
                out["usage"] = {"prompt_tokens": sum(counts), "total_tokens": sum(counts)}
            return out

        self.app = app

    def __enter__(self) -> str:
        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.server.started
        return f"127.0.0.1:{sock.getsockname()[1]}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def _report(tmp_path, argv: list[str], expect_rc: int = 0) -> dict:
    out = tmp_path / "report.json"
    rc = main(argv + ["--output-json", str(out), "--progress", "off"])
    assert rc == expect_rc
    return json.loads(out.read_text())


def test_http_fixed_lengths_and_server_token_counts(tok, tmp_path, capsys):
    stub = OpenAIStub(tok)
    with stub as addr:
        rep = _report(tmp_path, ["--protocol", "http", "--server", addr, "--batch-sizes", "1,4",
                                 "--requests", "25", "--concurrency", "5", "--prompt-length", "20",
                                 "--warmup", "3"])
    assert stub.calls == 2 * (25 + 3)
    assert stub.models_seen == {"stub-model"} and stub.formats == {"base64"}
    assert rep["schema"] == 1 and rep["config"]["loop"] == "closed"
    assert rep["target"]["mode"] == "http" and "stub-model" in rep["target"]["description"]
    assert set(rep["machine"]) >= {"cpu", "cores", "platform", "python"}
    for row, bs in zip(rep["results"], (1, 4)):
        assert row["batch_size"] == bs and row["requests"] == 25 and row["success_rate"] == 1.0
        # exact lengths: the server's own count is 20 tokens per input, every input
        assert row["token_source"] == "server"
        assert row["sequences"] == 25 * bs and row["tokens"] == 25 * bs * 20 == row["client_tokens"]
        assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["elapsed_s"])
        lat = row["latency_s"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert row["errors"] == {}
    table = capsys.readouterr().out
    assert "tok/s" in table and "p99 ms" in table


@pytest.mark.full  # error accounting is also checked over gRPC in the default tier
def test_http_errors_float_format_and_client_count_fallback(tok, tmp_path, capsys):
    stub = OpenAIStub(tok, report_usage=False, fail_every=5)
    with stub as addr:
        rep = _report(tmp_path, ["--protocol", "http", "--server", f"http://{addr}",
                                 "--batch-sizes", "8", "--requests", "50", "--concurrency", "4",
                                 "--prompt-length", "32", "--distribution", "uniform",
                                 "--encoding-format", "float", "--served-model-name", "x",
                                 "--warmup", "0", "--seed", "3"])
    row = rep["results"][0]
    assert stub.formats == {"float"} and stub.models_seen == {"x"}
    assert row["requests"] == 50 and row["failed"] == 10 and row["errors"] == {"http:429": 10}
    assert row["success_rate"] == pytest.approx(0.8)
    assert row["token_source"] == "client"  # the server reported no usage
    assert 1 <= row["mean_sequences_per_request"] <= 8
    assert "client" in capsys.readouterr().out


def test_http_open_loop_with_token_ids(tok, tmp_path):
    stub = OpenAIStub(tok)
    with stub as addr:
        rep = _report(tmp_path, ["--protocol", "http", "--server", addr, "--batch-sizes", "2",
                                 "--requests", "30", "--rate", "200", "--prompt-length", "10",
                                 "--send-token-ids", "--warmup", "0"])
    row = rep["results"][0]
    assert rep["config"]["loop"] == "open" and rep["config"]["rate"] == 200
    assert row["successful"] == 30 and row["tokens"] == 30 * 2 * 10
    # 30 Poisson arrivals at 200/s take ~0.15 s to send (bounded loosely: a loaded machine is slow
    # to start 30 connections, and the open loop itself is asserted by the config above)
    assert row["elapsed_s"] < 30


# --- a tiny floe.v1.Embedder server ------------------------------------------------------------

def _grpc_stub_server(tok: BenchTokenizer, fail_code=None):
    import grpc

    from floe.proto import floe_pb2, floe_pb2_grpc

    class Servicer(floe_pb2_grpc.EmbedderServicer):
        calls = 0
        token_id_requests = 0

        def HealthCheck(self, request, context):
            return floe_pb2.HealthCheckResponse(healthy=True, ready=True, message="ok")

        def GetReplicaInfo(self, request, context):
            return floe_pb2.GetReplicaInfoResponse(
                replicas=[floe_pb2.ReplicaInfo(model="stub", architecture="none", dtype="float32",
                                               device="cpu", max_seq_length=256)],
                n_replicas=1, n_healthy_replicas=1)

        def Encode(self, request, context):
            Servicer.calls += 1
            if fail_code is not None and Servicer.calls % 4 == 0:
                context.abort(fail_code, "busy")
            if request.lengths:
                Servicer.token_id_requests += 1
                counts = list(request.lengths)
            else:
                counts = [len(x) for x in tok.encode(list(request.texts))]
            n = len(counts)
            return floe_pb2.EncodeResponse(request_id=request.request_id, n=n, dim=DIM,
                                           embeddings=_embed(n).tobytes(), token_counts=counts)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    floe_pb2_grpc.add_EmbedderServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port, Servicer


def test_grpc_texts_errors_and_token_ids(tok, tmp_path):
    import grpc

    server, port, servicer = _grpc_stub_server(tok, fail_code=grpc.StatusCode.RESOURCE_EXHAUSTED)
    try:
        rep = _report(tmp_path, ["--server", f"127.0.0.1:{port}", "--batch-sizes", "3",
                                 "--requests", "40", "--concurrency", "4", "--prompt-length", "12",
                                 "--warmup", "0"])
        row = rep["results"][0]
        assert rep["target"]["mode"] == "grpc" and "stub" in rep["target"]["description"]
        assert row["errors"] == {"grpc:RESOURCE_EXHAUSTED": 10} and row["successful"] == 30
        assert row["token_source"] == "server" and row["tokens"] == 30 * 3 * 12
        assert servicer.token_id_requests == 0
    finally:
        server.stop(0)
    server, port, servicer = _grpc_stub_server(tok)
    try:
        rep = _report(tmp_path, ["--server", f"127.0.0.1:{port}", "--batch-sizes", "2",
                                 "--requests", "8", "--prompt-length", "5", "--warmup", "0",
                                 "--send-token-ids"])
        assert servicer.token_id_requests == 8
        assert rep["results"][0]["tokens"] == 8 * 2 * 5 and rep["config"]["send_token_ids"]
    finally:
        server.stop(0)


# --- a real replica with the fake engine -------------------------------------------------------

@pytest.fixture
def replica():
    proc = subprocess.Popen(
        [sys.executable, "-m", "floe.replica", "--engine", "fake", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        port = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            hello = ReplicaHello.from_line(line.rstrip("\n"))
            if hello is not None:
                port = int(hello.address.rsplit(":", 1)[1])
                break
        if port is None:
            proc.kill()
            pytest.fail(f"replica did not start: {proc.stderr.read()[-2000:]}")
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.mark.full  # the gRPC client is checked against a stub in the default tier
def test_grpc_against_fake_replica(replica, tmp_path):
    for extra in ([], ["--send-token-ids"]):
        rep = _report(tmp_path, ["--server", f"127.0.0.1:{replica}", "--batch-sizes", "1,16",
                                 "--requests", "20", "--concurrency", "8", "--prompt-length", "50",
                                 "--warmup", "2"] + extra)
        for row, bs in zip(rep["results"], (1, 16)):
            assert row["success_rate"] == 1.0 and row["token_source"] == "server"
            # the replica tokenizes (or takes the ids) itself: its count equals the exact target
            assert row["tokens"] == 20 * bs * 50
        assert "all-MiniLM-L6-v2" in rep["target"]["description"]


# --- sentence-transformers in-process ----------------------------------------------------------

@pytest.mark.slow
@pytest.mark.full  # the library baseline of `floe bench`; imports sentence-transformers in a process
def test_in_process_sentence_transformers(tmp_path):
    rep = _report(tmp_path, ["--in-process", "--batch-sizes", "4", "--requests", "6",
                             "--prompt-length", "16", "--st-batch-size", "4", "--warmup", "1",
                             "--device", "cpu"])
    row = rep["results"][0]
    assert rep["target"]["mode"] == "in-process" and rep["config"]["concurrency"] == 1
    assert "sentence-transformers" in rep["target"]["description"]
    assert row["successful"] == 6 and row["tokens"] == 6 * 4 * 16 and row["token_source"] == "client"
