"""Replica statistics shipped over the wire become Prometheus families with the right values."""

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from floe.metrics import _Snapshot, replica_families
from floe.proto import floe_pb2


def scrape(infos):
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Snapshot(replica_families(infos)))
    text = generate_latest(reg).decode()
    return {s.name + repr(sorted(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_replica_stats_become_labelled_metrics():
    eff = floe_pb2.Histogram(name="padding_efficiency", bounds=[0.5, 0.9], counts=[1, 2, 3], sum=4.2, count=6)
    info = floe_pb2.ReplicaInfo(
        replica_id="1", model="m", dim=8, dtype="bfloat16", device="cpu", healthy=True,
        stats=floe_pb2.ReplicaStats(tokens=70, padded_tokens=100, batches=6, queued_tokens=5,
                                    rss_bytes=123, histograms=[eff]))
    m = scrape([info])
    r = "[('model', 'm'), ('replica', '1')]"
    assert m["floe_tokens_embedded_total" + r] == 70
    assert m["floe_padded_tokens_total" + r] == 100
    assert m["floe_replica_queued_tokens" + r] == 5
    assert m["floe_replica_resident_memory_bytes" + r] == 123
    assert m["floe_replica_healthy" + r] == 1
    # buckets are cumulative
    assert m["floe_padding_efficiency_bucket[('le', '0.5'), ('model', 'm'), ('replica', '1')]"] == 1
    assert m["floe_padding_efficiency_bucket[('le', '0.9'), ('model', 'm'), ('replica', '1')]"] == 3
    assert m["floe_padding_efficiency_bucket[('le', '+Inf'), ('model', 'm'), ('replica', '1')]"] == 6
    assert m["floe_padding_efficiency_count" + r] == 6
    assert any(k.startswith("floe_model_info") and "bfloat16" in k for k in m)


def test_unhealthy_replica_without_stats_still_reports_health():
    m = scrape([floe_pb2.ReplicaInfo(replica_id="0", healthy=False)])
    assert m["floe_replica_healthy[('model', '?'), ('replica', '0')]"] == 0


def test_replicas_of_several_models_are_told_apart():
    infos = [floe_pb2.ReplicaInfo(replica_id="0", model=name, healthy=True, task=task)
             for name, task in (("emb", "embed"), ("rr", "score"))]
    m = scrape(infos)
    assert m["floe_replica_healthy[('model', 'emb'), ('replica', '0')]"] == 1
    assert m["floe_replica_healthy[('model', 'rr'), ('replica', '0')]"] == 1
    assert sum(1 for k in m if k.startswith("floe_model_info")) == 2
