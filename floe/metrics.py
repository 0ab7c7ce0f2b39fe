"""Every Prometheus metric floe exports, defined once.

Front-end metrics (requests, failures, latency, tokenization) are recorded where they happen.
Replica metrics (batches, padding, queue wait, inference time, memory) are cumulative state kept
inside each replica and shipped over gRPC (GetReplicaInfo -> ReplicaStats); ``render`` turns the
latest snapshot into metric families at scrape time, so no multiprocess directory is needed.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

REQUESTS = Counter(
    "floe_requests_total", "Requests answered successfully, by endpoint and transport.",
    ["endpoint", "transport"], registry=REGISTRY)
REQUEST_FAILURES = Counter(
    "floe_request_failures_total", "Requests that failed, by endpoint, transport and error type.",
    ["endpoint", "transport", "error"], registry=REGISTRY)
REQUEST_SECONDS = Histogram(
    "floe_request_duration_seconds", "End-to-end request latency in the front end.",
    ["endpoint", "transport"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
TOKENIZE_SECONDS = Histogram(
    "floe_tokenization_duration_seconds", "Time to tokenize one request in the front end.",
    buckets=LATENCY_BUCKETS, registry=REGISTRY)


async def render(service: Any) -> tuple[bytes, str]:
    """The /metrics body: front-end metrics plus the replicas' shipped statistics."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
