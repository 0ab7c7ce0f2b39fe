"""The Grafana dashboard (deploy/grafana) against a real scrape: every series it queries, and every
label it groups by, is in what `floe serve` exports once it has served and refused a request."""

from __future__ import annotations

import re

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import floe_serve
from tests.unit.test_deploy import dashboard_exprs

pytestmark = pytest.mark.slow

# Labels Prometheus adds at scrape time, and the histogram bucket label.
_ADDED = {"instance", "job", "le"}


def test_dashboard_series_and_labels_are_exported(tmp_path):
    with floe_serve("--engine", "fake", "--num-replicas", "1", "--model", "default",
                    "--max-client-batch-size", "2", tmp_dir=str(tmp_path)) as srv:
        assert httpx.post(srv.url + "/v1/embeddings", json={"input": ["a b c", "d"]},
                          timeout=60).status_code == 200
        assert httpx.post(srv.url + "/embed", json={"inputs": ["a", "b", "c"]},
                          timeout=60).status_code == 413
        text = httpx.get(srv.url + "/metrics", timeout=60).text
    labels: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels.setdefault(s.name, set()).update(s.labels)
    for expr in dashboard_exprs():
        series = re.findall(r"\bfloe_[a-z0-9_]+", expr)
        missing = [m for m in series if m not in labels]
        assert not missing, f"{expr}: not exported: {missing}"
        for group in re.findall(r"by \(([^)]*)\)", expr):
            for label in (x.strip() for x in group.split(",")):
                if label in _ADDED:
                    continue
                assert any(label in labels[m] for m in series), f"{expr}: no label {label!r}"
