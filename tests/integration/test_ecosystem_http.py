"""What TEI and OpenAI-ecosystem clients expect of the HTTP surface, through a real floe serve."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.support import floe_serve

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with floe_serve("--engine", "fake", "--num-replicas", "1",
                    "--served-model-name", "minilm,text-embedding-3-small",
                    tmp_dir=str(tmp_path_factory.mktemp("eco"))) as srv:
        yield srv


def test_tei_root_route_equals_embed(server):
    a = httpx.post(server.url + "/", json={"inputs": ["hello", "world"]}, timeout=30)
    b = httpx.post(server.url + "/embed", json={"inputs": ["hello", "world"]}, timeout=30)
    assert a.status_code == b.status_code == 200
    assert np.array_equal(np.array(a.json()), np.array(b.json()))


def test_head_health_and_ready(server):
    assert httpx.head(server.url + "/health", timeout=10).status_code == 200
    assert httpx.head(server.url + "/ready", timeout=10).status_code == 200


def test_model_names(server):
    ids = [m["id"] for m in httpx.get(server.url + "/v1/models", timeout=10).json()["data"]]
    assert ids == ["minilm", "text-embedding-3-small"]
    assert httpx.get(server.url + "/v1/models/text-embedding-3-small", timeout=10).json()["id"] \
        == "text-embedding-3-small"
    missing = httpx.get(server.url + "/v1/models/nope", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    for name in ("minilm", "text-embedding-3-small", "text-embedding-ada-002"):
        r = httpx.post(server.url + "/v1/embeddings", json={"input": "x", "model": name}, timeout=30)
        assert r.status_code == 200 and r.json()["model"] == "minilm"
    log = server.log()
    assert log.count("'text-embedding-ada-002'") == 1   # logged once


def test_strict_model_name(tmp_path):
    with floe_serve("--engine", "fake", "--num-replicas", "1", "--strict-model-name",
                    "--no-accept-token-ids", tmp_dir=str(tmp_path)) as srv:
        r = httpx.post(srv.url + "/v1/embeddings", json={"input": "x", "model": "ada"}, timeout=30)
        assert r.status_code == 404 and r.json()["error"]["param"] == "model"
        r = httpx.post(srv.url + "/v1/embeddings", json={"input": [[101, 2023, 102]]}, timeout=30)
        assert r.status_code == 400
        assert "check_embedding_ctx_length=False" in r.json()["error"]["message"]


def test_openmetrics_and_no_created_series(server):
    om = httpx.get(server.url + "/metrics", headers={"accept": "application/openmetrics-text"},
                   timeout=10)
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    assert om.text.rstrip().endswith("# EOF") and om.text.count("# EOF") == 1
    plain = httpx.get(server.url + "/metrics", timeout=10)
    assert plain.headers["content-type"].startswith("text/plain")
    assert "_created" not in plain.text


def test_docs_page_needs_no_cdn(server):
    page = httpx.get(server.url + "/docs", timeout=10)
    # every asset from this server, none from a CDN (test_docs_page.py watches a browser load it)
    assert page.status_code == 200 and "://" not in page.text
    for asset in ("swagger-ui.css", "swagger-ui-bundle.js"):
        r = httpx.get(server.url + "/docs/static/" + asset, timeout=10)
        assert r.status_code == 200 and len(r.content) > 10_000
    served = httpx.get(server.url + "/openapi.json", timeout=10).json()
    assert "/v1/embeddings" in served["paths"]


def test_every_response_carries_a_request_id(server):
    for method, path in (("GET", "/health"), ("GET", "/metrics"), ("GET", "/nope"),
                         ("GET", "/v1/models"), ("POST", "/v1/embeddings")):
        r = httpx.request(method, server.url + path, headers={"x-request-id": "trace-1"},
                          json={"input": "x"} if method == "POST" else None, timeout=30)
        assert r.headers["x-request-id"] == "trace-1", (path, r.status_code)
    assert len(httpx.get(server.url + "/health", timeout=10).headers["x-request-id"]) == 32
