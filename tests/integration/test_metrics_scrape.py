"""A known workload through a real `floe serve`, then /metrics: request, token and batch counts and
the padding efficiency equal what we compute by hand from the batches the scheduler must form."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import floe_serve

pytestmark = pytest.mark.slow

# Sent one at a time, each request's inputs arrive together and fit one batch (budget 2048
# padded tokens, at most 64 sequences), so every request is exactly one forward pass.
WORKLOAD = [
    [3, 5],          # padded 2 x 5 = 10, real 8
    [4, 4, 4],       # padded 12, real 12
    [2, 10, 6, 6],   # padded 40, real 24
    [7],             # padded 7, real 7
]


def grpc_encode(address: str, items: list[list[int]]) -> list[int]:
    import grpc

    from floe.proto import floe_pb2_grpc
    from floe.protocol import EncodeOptions, TokenBatch
    from floe.proto.convert import request_to_proto

    with grpc.insecure_channel(address) as channel:
        stub = floe_pb2_grpc.EmbedderStub(channel)
        resp = stub.Encode(request_to_proto("m1", EncodeOptions(), tokens=TokenBatch.from_lists(items)),
                           timeout=30)
    return list(resp.token_counts)


def samples(text: str) -> dict[str, float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name + "".join(f"|{k}={v}" for k, v in sorted(s.labels.items()))
            out[key] = s.value
    return out


def test_metrics_match_the_workload(tmp_path):
    with floe_serve("--engine", "fake", "--num-replicas", "1", "--max-batch-tokens", "4096",
                    "--max-batch-size", "64", "--batch-timeout-ms", "1",
                    # each request one batch, padded to its longest input: no fill floor
                    "--min-batch-fill", "0", tmp_dir=str(tmp_path)) as server:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            for lengths in WORKLOAD:
                ids = [[1000 + j for j in range(n)] for n in lengths]
                r = http.post("/v1/embeddings", json={"input": ids})
                assert r.status_code == 200, r.text
                assert r.json()["usage"]["prompt_tokens"] == sum(lengths)
            assert http.post("/v1/embeddings", json={"input": []}).status_code == 400
            # one gRPC request: counted under its own transport, and one more batch of 3 + 5 tokens
            grpc_tokens = grpc_encode(server.grpc_address, [[1000, 1001, 1002], [1000] * 5])
            assert grpc_tokens == [3, 5]
            m = samples(http.get("/metrics").text)

    assert m["floe_requests_total|endpoint=Encode|transport=grpc"] == 1
    workload = WORKLOAD + [[3, 5]]
    real = sum(sum(x) for x in workload)
    padded = sum(max(x) * len(x) for x in workload)
    sequences = sum(len(x) for x in workload)
    r0 = "|model=all-MiniLM-L6-v2|replica=0"
    assert m["floe_requests_total|endpoint=/v1/embeddings|transport=http"] == len(WORKLOAD)
    assert m["floe_request_failures_total|endpoint=/v1/embeddings|error=validation|transport=http"] == 1
    assert m["floe_tokens_embedded_total" + r0] == real
    assert m["floe_padded_tokens_total" + r0] == padded
    assert m["floe_sequences_embedded_total" + r0] == sequences
    assert m["floe_batches_total" + r0] == len(workload)
    assert m["floe_batch_size_count" + r0] == len(workload)
    assert m["floe_batch_size_sum" + r0] == sequences
    assert m["floe_batch_tokens_sum" + r0] == padded
    # padding efficiency per batch: 0.8, 1.0, 0.6, 1.0, 0.8
    per_batch = [sum(x) / (max(x) * len(x)) for x in workload]
    assert m["floe_padding_efficiency_count" + r0] == len(workload)
    assert m["floe_padding_efficiency_sum" + r0] == pytest.approx(sum(per_batch))
    assert m["floe_padding_efficiency_bucket|le=0.6" + r0] == 1
    assert m["floe_padding_efficiency_bucket|le=0.8" + r0] == 3
    assert m["floe_replica_healthy" + r0] == 1
    assert m["floe_ready"] == 1
    assert any(k.startswith("floe_model_info") for k in m)
    assert m["floe_request_duration_seconds_count|endpoint=/v1/embeddings|transport=http"] == len(WORKLOAD) + 1
