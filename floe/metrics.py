"""Every Prometheus metric floe exports, defined once.

Front-end metrics (requests, failures, latency, tokenization, retries) are recorded where they
happen. Replica metrics (batches, padding, queue wait, inference time, memory) are cumulative state
kept inside each replica and shipped over gRPC (GetReplicaInfo -> ReplicaStats); ``render`` turns
the latest snapshot into metric families at scrape time, so no multiprocess directory is needed.
A replica's counters restart from zero when the replica restarts; Prometheus' rate() handles that
as a counter reset.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger("floe.metrics")

# Counters and histograms without their *_created series (timestamps nobody alerts on).
disable_created_metrics()

REGISTRY = CollectorRegistry(auto_describe=True)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# --- front end ---------------------------------------------------------------------------------

REQUESTS = Counter(
    "floe_requests_total", "Requests answered successfully, by endpoint and transport.",
    ["endpoint", "transport"], registry=REGISTRY)
REQUEST_FAILURES = Counter(
    "floe_request_failures_total", "Requests that failed, by endpoint, transport and error type.",
    ["endpoint", "transport", "error"], registry=REGISTRY)
REQUEST_SECONDS = Histogram(
    "floe_request_duration_seconds", "End-to-end request latency in the front end.",
    ["endpoint", "transport"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
HTTP_CONNECTIONS_CLOSED = Counter(
    "floe_http_connections_closed_total",
    "HTTP connections the server closed on its own: headers_timeout, body_timeout, "
    "connection_limit.", ["reason"], registry=REGISTRY)
IN_FLIGHT = Gauge(
    "floe_in_flight_requests", "Requests inside the front end now.", registry=REGISTRY,
    multiprocess_mode="livesum")
RETRIES = Counter(
    "floe_replica_retries", "Requests retried on another replica after their replica failed "
    "(the client saw success).", registry=REGISTRY)
FAILED_RETRIES = Counter(
    "floe_replica_failed_retries", "Requests whose retry replica failed too.", registry=REGISTRY)
POISON_INPUTS = Counter(
    "floe_poison_inputs", "Requests refused because their input made the model's process exit on "
    "two replicas (and later requests with the same input, refused before reaching one).",
    registry=REGISTRY)
SPLIT_REQUESTS = Counter(
    "floe_split_requests", "Requests cut into parts run side by side on several replicas "
    "(--split-min-tokens; one large request would otherwise leave the other replicas idle).",
    registry=REGISTRY)
HANDED_BACK_ROWS = Counter(
    "floe_handed_back_rows", "Queued inputs a replica gave back uncomputed to be run on another "
    "replica that had gone idle (--hand-back-min-tokens; a wave's end).", registry=REGISTRY)
TOKENIZE_SECONDS = Histogram(
    "floe_tokenization_duration_seconds", "Time to tokenize one request in the front end.",
    buckets=LATENCY_BUCKETS, registry=REGISTRY)

# --- replica statistics, shipped over the wire ---------------------------------------------------

# ReplicaStats counter field -> (exported name, help). Names end in _total as counters must.
_REPLICA_COUNTERS = {
    "requests": ("floe_replica_requests", "Requests a replica completed."),
    "failed_requests": ("floe_replica_failed_requests", "Requests that failed inside a replica."),
    "sequences": ("floe_sequences_embedded", "Sequences (inputs) embedded."),
    "tokens": ("floe_tokens_embedded", "Real (non-padding) tokens embedded."),
    "padded_tokens": ("floe_padded_tokens", "Tokens computed including padding; "
                      "tokens_embedded / padded_tokens is the padding fill rate."),
    "batches": ("floe_batches", "Forward passes run."),
    "packed_batches": ("floe_packed_batches", "Forward passes that ran packed: several inputs "
                       "shared a row (--packing; floe/engine/packing.py)."),
    "dropped_sequences": ("floe_dropped_sequences", "Sequences dropped before compute because "
                          "their client went away, the request was aborted or its deadline "
                          "passed."),
    "refused_requests": ("floe_replica_refused_requests", "Requests a replica refused at arrival "
                         "(429 / RESOURCE_EXHAUSTED): predicted to finish past their deadline or "
                         "the latency target, or the queue past its time or token bound."),
    "expired_requests": ("floe_replica_expired_requests", "Requests dropped before compute "
                         "because their own deadline passed while they were queued."),
    "tuning_changes": ("floe_batch_tuning_changes", "Changes the online tuner made to a "
                       "replica's batch wait, token budget or fill floor."),
}
_REPLICA_GAUGES = {
    "in_flight_requests": ("floe_replica_in_flight_requests", "Requests inside a replica now."),
    "queued_sequences": ("floe_replica_queued_sequences", "Sequences waiting for a forward pass."),
    "queued_tokens": ("floe_replica_queued_tokens", "Tokens waiting for a forward pass."),
    "rss_bytes": ("floe_replica_resident_memory_bytes", "Resident memory of the replica process."),
    "device_memory_used_bytes": ("floe_replica_device_memory_used_bytes",
                                 "GPU memory in use by the replica (0 on CPU)."),
    "device_memory_total_bytes": ("floe_replica_device_memory_total_bytes",
                                  "Total memory of the replica's GPU (0 on CPU)."),
    "predicted_wait_seconds": ("floe_replica_predicted_wait_seconds",
                               "The cost model's time to run the work queued in a replica now "
                               "(what a new request would wait)."),
    "cost_fixed_seconds": ("floe_cost_model_fixed_seconds",
                           "Cost model: seconds of a forward pass whatever it carries."),
    "cost_per_token_seconds": ("floe_cost_model_token_seconds",
                               "Cost model: seconds per padded token of a forward pass."),
    "cost_per_token_length_seconds": ("floe_cost_model_token_length_seconds",
                                      "Cost model: seconds per padded token and token of row "
                                      "length (attention of the full-attention layers)."),
    "cost_per_token_window_seconds": ("floe_cost_model_token_window_seconds",
                                      "Cost model: seconds per padded token and key computed on "
                                      "the sliding-window layers (min(row length, key span))."),
    "cost_relative_error": ("floe_cost_model_relative_error",
                            "Moving mean of |measured - predicted| / measured forward time; above "
                            "0.2 admission's predictions are loose."),
    "batch_budget_tokens": ("floe_batch_budget_tokens",
                            "A replica's token budget per forward pass now (tuned)."),
    "batch_timeout_seconds": ("floe_batch_timeout_seconds",
                              "A replica's wait for a batch to fill now (tuned)."),
    "batch_min_fill": ("floe_batch_min_fill", "A replica's fill floor now (tuned)."),
}
_HISTOGRAM_HELP = {
    "batch_size": "Sequences per forward pass.",
    "batch_tokens": "Padded tokens per forward pass (longest sequence x batch size).",
    "padding_efficiency": "Real tokens / padded tokens of each forward pass.",
    "queue_wait_seconds": "Time a sequence waited before its forward pass began.",
    "inference_seconds": "Duration of one forward pass, from its start on the replica's engine "
                         "thread to its rows on the host (forward, the task's head, the copy; "
                         "padding is prepared while the previous batch runs and is not counted).",
}


def replica_families(infos: Iterable[Any]) -> list:
    """Metric families for the replicas' latest ReplicaInfo messages (floe_pb2.ReplicaInfo)."""
    infos = list(infos)
    fams: dict[str, Any] = {}
    # by model too: a server of several models (floe serve --model A --model B) has a replica
    # "0" of each
    labels = ["model", "replica"]
    healthy = GaugeMetricFamily("floe_replica_healthy", "1 when the replica is in rotation.", labels=labels)
    restarts = CounterMetricFamily("floe_replica_restarts", "Restarts of the replica by the manager.",
                                   labels=labels)
    for field, (name, help_) in _REPLICA_COUNTERS.items():
        fams[field] = CounterMetricFamily(name, help_, labels=labels)
    for field, (name, help_) in _REPLICA_GAUGES.items():
        fams[field] = GaugeMetricFamily(name, help_, labels=labels)
    hists: dict[str, HistogramMetricFamily] = {}
    model_info = None
    described: set[str] = set()
    for info in infos:
        rid = [info.model or "?", info.replica_id or "?"]
        healthy.add_metric(rid, 1.0 if info.healthy else 0.0)
        restarts.add_metric(rid, float(info.restarts))
        if info.HasField("stats"):
            stats = info.stats
            for field in _REPLICA_COUNTERS:
                fams[field].add_metric(rid, float(getattr(stats, field)))
            for field in _REPLICA_GAUGES:
                fams[field].add_metric(rid, float(getattr(stats, field)))
            for h in stats.histograms:
                fam = hists.get(h.name)
                if fam is None:
                    fam = hists[h.name] = HistogramMetricFamily(
                        f"floe_{h.name}", _HISTOGRAM_HELP.get(h.name, h.name), labels=labels)
                buckets, running = [], 0
                for bound, count in zip(list(h.bounds) + [float("inf")], h.counts):
                    running += count
                    buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
                fam.add_metric(rid, buckets, sum_value=h.sum)
        if info.model and info.model not in described:
            described.add(info.model)
            if model_info is None:
                model_info = InfoMetricFamily("floe_model", "A served model.")
            model_info.add_metric([], {"name": info.model, "dim": str(info.dim), "dtype": info.dtype,
                                       "device": info.device, "architecture": info.architecture,
                                       "pooling": info.pooling, "task": info.task or "embed"})
    out = [healthy, restarts, *fams.values(), *hists.values()]
    if model_info is not None:
        out.append(model_info)
    return out


def _front_end_registry() -> CollectorRegistry:
    """This process' metrics, or with several front-end processes (``--frontend-workers``) the
    sum over all of them from prometheus_client's multiprocess files, so any one answers."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    from prometheus_client import multiprocess

    merged = CollectorRegistry(auto_describe=False)
    multiprocess.MultiProcessCollector(merged)
    return merged


class _Snapshot:
    def __init__(self, families: list) -> None:
        self.families = families

    def collect(self):
        return iter(self.families)


async def render(services: Any, timeout: float = 2.0, accept: str = "") -> tuple[bytes, str]:
    """The /metrics body: front-end metrics plus the replicas' shipped statistics of every served
    model (``services``: one EmbedService or a list), in the Prometheus text format, or
    OpenMetrics when the scraper asks for it (``accept``)."""
    services = list(services) if isinstance(services, (list, tuple)) else [services]
    if "application/openmetrics-text" in accept:
        from prometheus_client.openmetrics import exposition as om
        generate, content_type = om.generate_latest, om.CONTENT_TYPE_LATEST
    else:
        generate, content_type = generate_latest, CONTENT_TYPE_LATEST
    body = generate(_front_end_registry())
    infos: list = []
    for service in services:
        try:
            infos += await asyncio.wait_for(service.router.replica_infos(), timeout)
        except Exception:  # a scrape must never fail because a replica is slow or down
            log.warning("replica statistics of %s unavailable for this scrape",
                        service.model_name, exc_info=True)
    snapshot = CollectorRegistry(auto_describe=False)
    snapshot.register(_Snapshot(replica_families(infos)))
    ready = GaugeMetricFamily("floe_ready", "1 when the endpoint accepts requests.")
    ready.add_metric([], 1.0 if all(s.ready() for s in services) else 0.0)
    snapshot.register(_Snapshot([ready]))
    if generate is generate_latest:
        return body + generate(snapshot), content_type
    # OpenMetrics ends with one "# EOF": join the two registries' bodies around it
    return body.replace(b"# EOF\n", b"") + generate(snapshot), content_type
