"""The HTTP API of a real `floe serve` (fake engine, real tokenizer, real replica process).

Covers the OpenAI and TEI routes, the official openai client, and the hostile inputs of
reliability.md: each gets a clear error in the OpenAI envelope and the server keeps serving.
"""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest

from tests.support import floe_serve

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with floe_serve("--engine", "fake", "--num-replicas", "1", "--max-client-batch-size", "64",
                    "--payload-limit", "1000000", tmp_dir=str(tmp_path_factory.mktemp("logs"))) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def embeddings(resp) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    return np.array([d["embedding"] for d in resp.json()["data"]], dtype=np.float32)


_KIND_OF_STATUS = {400: "validation", 401: "auth", 404: "not_found", 413: "too_large",
                   415: "unsupported_media", 429: "overloaded", 503: "unavailable", 500: "internal"}


def assert_error(resp, status: int, param=None, contains=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert err["code"] is None or isinstance(err["code"], str)   # OpenAI sends a string or null
    if status in _KIND_OF_STATUS:
        assert err["code"] == _KIND_OF_STATUS[status]
    assert resp.headers.get("x-request-id")
    if param is not None:
        assert err["param"] == param, err
    if contains is not None:
        assert contains in err["message"], err
    assert len(resp.content) < 4096


def test_openai_route_returns_one_normalized_embedding_per_input(http):
    resp = http.post("/v1/embeddings", json={"input": ["hello", "world"]})
    arr = embeddings(resp)
    body = resp.json()
    assert arr.shape == (2, 384)
    assert np.allclose(np.linalg.norm(arr, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(arr[0], arr[1])
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1]
    # "hello" and "world" are one word-piece each, plus [CLS] and [SEP]
    assert body["usage"] == {"prompt_tokens": 6, "total_tokens": 6}
    assert float(resp.headers["x-total-time"]) > 0 and resp.headers["x-compute-tokens"] == "6"


def test_alias_route_and_single_string(http):
    a = embeddings(http.post("/embeddings", json={"input": "hello"}))
    b = embeddings(http.post("/v1/embeddings", json={"input": ["hello"]}))
    assert np.array_equal(a, b)


def test_openai_client_float_and_base64_agree(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    texts = ["a quick brown fox", "jumps over", "the lazy dog"]
    f = client.embeddings.create(model=client_model(server), input=texts, encoding_format="float")
    b = client.embeddings.create(model=client_model(server), input=texts, encoding_format="base64")
    fa = np.array([d.embedding for d in f.data], dtype=np.float32)
    ba = np.array([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") if isinstance(d.embedding, str)
                   else d.embedding for d in b.data], dtype=np.float32)
    assert fa.shape == (3, 384)
    assert np.array_equal(fa, ba)
    assert f.usage.prompt_tokens > 3


def client_model(server) -> str:
    return httpx.get(server.url + "/v1/models").json()["data"][0]["id"]


def test_token_id_input_equals_text_input(http):
    ids = http.post("/tokenize", json={"inputs": ["hello world"]}).json()[0]
    token_ids = [t["id"] for t in ids]
    assert token_ids[0] == 101 and token_ids[-1] == 102  # [CLS] ... [SEP]
    by_text = embeddings(http.post("/v1/embeddings", json={"input": "hello world"}))
    by_ids = embeddings(http.post("/v1/embeddings", json={"input": token_ids}))
    by_ids_list = embeddings(http.post("/v1/embeddings", json={"input": [token_ids, token_ids]}))
    assert np.array_equal(by_text[0], by_ids[0])
    assert np.array_equal(by_ids_list[0], by_ids_list[1])


def test_embed_octet_stream_equals_json_bit_for_bit(http):
    payload = {"inputs": ["one", "two", "three"]}
    js = np.array(http.post("/embed", json=payload).json(), dtype=np.float32)
    raw = http.post("/embed", json=payload, headers={"accept": "application/octet-stream"})
    assert raw.status_code == 200 and raw.headers["content-type"] == "application/octet-stream"
    arr = np.frombuffer(raw.content, dtype="<f4").reshape(int(raw.headers["x-embedding-count"]),
                                                           int(raw.headers["x-embedding-dim"]))
    assert np.array_equal(arr, js)


def test_dimensions_truncates_and_renormalizes(http):
    full = embeddings(http.post("/v1/embeddings", json={"input": "matryoshka"}))[0]
    short = embeddings(http.post("/v1/embeddings", json={"input": "matryoshka", "dimensions": 64}))[0]
    assert short.shape == (64,)
    assert abs(np.linalg.norm(short) - 1) < 1e-5
    expect = full[:64] / np.linalg.norm(full[:64])
    assert np.allclose(short, expect, atol=1e-6)


def test_embed_normalize_false_is_not_unit_norm(http):
    raw = np.array(http.post("/embed", json={"inputs": "x y z", "normalize": False}).json()[0])
    assert abs(np.linalg.norm(raw) - 1) > 1e-3


def test_health_ready_info_models(http, server):
    assert http.get("/health").status_code == 200
    assert http.get("/ready").json()["status"] == "ready"
    info = http.get("/info").json()
    assert info["dim"] == 384 and info["max_input_length"] == 256 and info["pooling"] == "mean"
    models = http.get("/v1/models").json()
    assert models["data"][0]["id"] == info["model_id"]


@pytest.mark.parametrize("payload,status,param", [
    ({"input": []}, 400, "input"),
    ({"input": 123}, 400, "input"),
    ({"input": [1.5]}, 400, "input[0]"),
    ({"input": [{"a": 1}]}, 400, "input[0]"),
    ({"input": None}, 400, "input"),
    ({"input": ["a", 3]}, 400, "input[1]"),
    ({}, 400, "input"),
    ({"input": "x", "dimensions": 0}, 400, "dimensions"),
    ({"input": "x", "dimensions": -1}, 400, "dimensions"),
    ({"input": "x", "dimensions": 1.5}, 400, "dimensions"),
    ({"input": "x", "dimensions": 100000}, 400, "dimensions"),
    ({"input": "x", "encoding_format": "bogus"}, 400, "encoding_format"),
    ({"input": [[101, 999999999, 102]]}, 400, None),
    ({"input": [[101, -5, 102]]}, 400, None),
    ({"input": [[101, 2 ** 70, 102]]}, 400, None),
    ({"input": ["x"] * 65}, 413, "input"),
    ({"input": "word " * 1000, "truncate": False}, 400, None),
])
def test_bad_requests_get_clear_errors(http, payload, status, param):
    assert_error(http.post("/v1/embeddings", json=payload), status, param)


def test_hostile_bodies(http):
    assert_error(http.post("/v1/embeddings", content=b'{"input": ["abc"', headers={"content-type": "application/json"}), 400)
    assert_error(http.post("/v1/embeddings", content=b"hello", headers={"content-type": "text/plain"}), 415)
    assert_error(http.post("/v1/embeddings", content=b'{"input": "\xff\xfe"}',
                           headers={"content-type": "application/json"}), 400)
    assert_error(http.post("/v1/embeddings", content=b'{"input": "\\ud800"}',
                           headers={"content-type": "application/json"}), 400)
    deep = b'{"input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert_error(http.post("/v1/embeddings", content=deep, headers={"content-type": "application/json"}), 400)
    big = json.dumps({"input": ["x" * 2_000_000]}).encode()
    assert_error(http.post("/v1/embeddings", content=big, headers={"content-type": "application/json"}), 413)

    def chunks():
        for _ in range(30):
            yield b"x" * 100_000
    assert_error(http.post("/v1/embeddings", content=chunks(), headers={"content-type": "application/json"}), 413)
    # the item count is checked before any item is looked at: one comparison refuses it
    many = json.dumps({"input": [1.5] * 100_000}).encode()
    assert_error(http.post("/v1/embeddings", content=many, headers={"content-type": "application/json"}),
                 413, param="input", contains="limit of 64")
    few = json.dumps({"input": [1.5] * 3}).encode()
    assert_error(http.post("/v1/embeddings", content=few, headers={"content-type": "application/json"}),
                 400, param="input[0]")


def test_errors_carry_the_request_id(http):
    resp = http.post("/v1/embeddings", json={"input": []}, headers={"x-request-id": "my-req-7"})
    assert_error(resp, 400)
    assert resp.headers["x-request-id"] == "my-req-7"
    resp = http.post("/v1/embeddings", json={"input": "x", "dimensions": 0})
    assert_error(resp, 400)
    assert len(resp.headers["x-request-id"]) == 32  # generated when the client sent none
    assert_error(resp := http.get("/v2/nothing"), 404)
    assert resp.headers["x-request-id"]


def test_api_description_is_public_without_a_key(http):
    spec = http.get("/openapi.json")
    assert spec.status_code == 200 and "/v1/embeddings" in spec.json()["paths"]
    assert http.get("/docs").status_code == 200


def test_empty_string_is_embedded_without_nan(http):
    arr = embeddings(http.post("/v1/embeddings", json={"input": ["", "   "]}))
    assert np.isfinite(arr).all()


def test_long_input_is_truncated_visibly_by_default(http):
    resp = http.post("/v1/embeddings", json={"input": "word " * 1000})
    assert resp.status_code == 200
    assert resp.json()["usage"]["prompt_tokens"] == 256


def test_unknown_route_and_method_use_the_envelope(http):
    assert_error(http.get("/v2/nothing"), 404)
    assert_error(http.get("/v1/embeddings"), 405)


def test_still_serving_after_the_abuse(http):
    assert embeddings(http.post("/v1/embeddings", json={"input": "still here"})).shape == (1, 384)
