"""Latency you can promise, through a real `floe serve` (fake engine, a known cost per pass):
admission against the latency target, a request's own deadline over gRPC and HTTP, the cost
model in /info and /metrics. docs/operations.md ("Latency targets and deadlines")."""

from __future__ import annotations

import asyncio
import re
import time

import grpc
import httpx
import pytest

from floe.proto import floe_pb2, floe_pb2_grpc
from tests.support import floe_serve

pytestmark = pytest.mark.slow

PASS_S = 0.25        # the fake engine's cost of every forward pass
TARGET_MS = 1500
INPUTS = 4           # inputs per request = --max-batch-size: one request, one pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with floe_serve("--engine", "fake", "--num-replicas", "1", "--fake-seconds-per-batch",
                    str(PASS_S), "--max-batch-size", str(INPUTS), "--latency-target-ms",
                    str(TARGET_MS), tmp_dir=str(tmp_path_factory.mktemp("latency"))) as srv:
        yield srv


def _metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    values = [float(m.group(1)) for m in re.finditer(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M)]
    assert values, f"{name} not exported"
    return sum(values)


def _body(tag: int) -> dict:
    return {"input": [f"request {tag} input {i}" for i in range(INPUTS)]}


async def _flood(server, n: int, headers=None) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60) as client:
        return await asyncio.gather(*(client.post(server.url + "/v1/embeddings", json=_body(i),
                                                  headers=headers) for i in range(n)))


def test_the_cost_model_is_in_info_and_metrics(server):
    info = httpx.get(server.url + "/info", timeout=10).json()
    batching = info["batching"]
    assert batching["latency_target_ms"] == TARGET_MS and batching["tuning"] is True
    (replica,) = batching["replicas"]
    assert replica["cost_model"]["fixed_s"] == pytest.approx(PASS_S, rel=0.05)
    assert replica["max_batch_tokens"] > 0
    assert _metric(server, "floe_cost_model_fixed_seconds") == pytest.approx(PASS_S, rel=0.05)
    # the fake engine's model has no sliding-window layers: no window term, and it says so
    assert replica["cost_model"]["per_token_window_s"] == 0
    assert replica["cost_model"]["window_span"] == 0
    assert _metric(server, "floe_cost_model_token_window_seconds") == 0


def _early(server) -> int:
    """Requests the front end refused without a replica's round trip (Router.early_refusal)."""
    return httpx.get(server.url + "/info", timeout=10).json()["replicas"]["early_refused_requests"]


def test_overload_is_refused_at_once_and_what_is_admitted_is_computed(server):
    refused_before = _metric(server, "floe_replica_refused_requests_total")
    early_before = _early(server)
    embedded_before = _metric(server, "floe_sequences_embedded_total")
    answers = asyncio.run(_flood(server, 24))
    codes = [r.status_code for r in answers]
    assert set(codes) <= {200, 429}, codes
    ok = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code == 429]
    # 24 passes of 0.25 s against a 1.5 s target: most are refused, some are served
    assert ok and refused
    for r in refused:
        assert r.json()["error"]["type"] == "rate_limit_error"
        message = r.json()["error"]["message"]
        # the replica's own refusal, or the front end's while every replica's last one holds
        assert "latency target" in message or "moments ago" in message, message
        assert int(r.headers["retry-after"]) >= 1
    by_replicas = _metric(server, "floe_replica_refused_requests_total") - refused_before
    assert by_replicas >= 1
    assert by_replicas + _early(server) - early_before == len(refused)
    # nothing refused was computed, nothing admitted was lost
    assert _metric(server, "floe_sequences_embedded_total") - embedded_before == INPUTS * len(ok)


def test_a_grpc_deadline_behind_a_full_queue_is_refused_within_it(server):
    async def scenario():
        refused_before = _metric(server, "floe_replica_refused_requests_total")
        early_before = _early(server)
        embedded_before = _metric(server, "floe_sequences_embedded_total")
        background = asyncio.create_task(_flood(server, 6))
        # wait until the replica's queue holds work (its predicted wait is over the deadline)
        deadline = time.monotonic() + 30
        while _metric(server, "floe_replica_predicted_wait_seconds") < 0.5:
            assert time.monotonic() < deadline, "the queue never filled"
            await asyncio.sleep(0.02)
        async with grpc.aio.insecure_channel(server.grpc_address) as ch:
            stub = floe_pb2_grpc.EmbedderStub(ch)
            t0 = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Encode(floe_pb2.EncodeRequest(texts=["one query"]), timeout=0.2)
            elapsed = time.monotonic() - t0
        answers = await background
        return e.value, elapsed, answers, refused_before, embedded_before, early_before

    err, elapsed, answers, refused_before, embedded_before, early_before = asyncio.run(scenario())
    assert err.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()   # refused, not timed out
    assert "deadline" in err.details()
    assert elapsed < 0.2 + 0.5   # the refusal itself; generous for a loaded machine
    ok = sum(r.status_code == 200 for r in answers)
    refused = sum(r.status_code == 429 for r in answers)
    assert ok + refused == len(answers)
    by_replicas = _metric(server, "floe_replica_refused_requests_total") - refused_before
    assert by_replicas + _early(server) - early_before == refused + 1
    # no forward pass was spent on the refused call
    assert _metric(server, "floe_sequences_embedded_total") - embedded_before == INPUTS * ok


def test_the_http_deadline_header(server):
    bad = httpx.post(server.url + "/v1/embeddings", json=_body(0),
                     headers={"x-request-timeout-ms": "soon"}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "x-request-timeout-ms"
    for raw in ("0", "-5", "nan", "inf"):
        r = httpx.post(server.url + "/v1/embeddings", json=_body(0),
                       headers={"x-request-timeout-ms": raw}, timeout=30)
        assert r.status_code == 400, raw
    # a pass takes 0.25 s: 100 ms cannot be met even on an idle server
    tight = httpx.post(server.url + "/v1/embeddings", json=_body(0),
                       headers={"x-request-timeout-ms": "100"}, timeout=30)
    assert tight.status_code == 429 and "deadline" in tight.json()["error"]["message"]
    assert "retry-after" in tight.headers
    # a generous one overrides the 1.5 s target: with a queue of 2-3 s it is still admitted
    answers = asyncio.run(_flood(server, 10, headers={"x-request-timeout-ms": "60000"}))
    assert all(r.status_code == 200 for r in answers), [r.status_code for r in answers]
