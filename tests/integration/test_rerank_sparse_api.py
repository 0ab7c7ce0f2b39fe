"""One `floe serve` with three models (an embedder, a reranker, a SPLADE model; fake engine, real
tokenizers, real replica processes): the rerank, sparse and compact-output routes, which model
answers which request, the Cohere SDK against /v1/rerank and /v2/rerank, gRPC Rerank and sparse
Encode, and the hostile inputs of reliability.md on every new route."""

from __future__ import annotations

import base64

import grpc
import httpx
import numpy as np
import pytest

from floe.proto import floe_pb2, floe_pb2_grpc
from tests.support import floe_serve

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory, bert_reranker, bert_splade):
    with floe_serve("--engine", "fake", "--num-replicas", "1", "--model", "default",
                    "--model", bert_reranker, "--model", bert_splade,
                    "--max-client-batch-size", "64", "--max-input-chars", "20000",
                    tmp_dir=str(tmp_path_factory.mktemp("logs"))) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def names(http):
    info = http.get("/info").json()
    return {m["task"]: m["model_id"] for m in info["models"]}


def error(resp, status, param=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    if param is not None:
        assert err["param"] == param, err
    return err


DOCS = ["a fox is a small wild animal", "the stock market fell today", "foxes live in dens",
        "red fox", "quantum chromodynamics"]


def test_every_model_is_listed_with_its_task(http, names):
    assert set(names) == {"embed", "score", "sparse"}
    listed = [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert listed == ["all-MiniLM-L6-v2", names["score"], names["sparse"]]
    info = http.get("/info").json()
    assert info["model_id"] == "all-MiniLM-L6-v2"   # the default model, TEI's shape
    metrics = http.get("/metrics").text
    for name in names.values():
        assert f'floe_replica_healthy{{model="{name}",replica="0"}} 1.0' in metrics


def test_tei_rerank_is_sorted_and_matches_raw_scores(http):
    resp = http.post("/rerank", json={"query": "what is a fox", "texts": DOCS, "return_text": True})
    assert resp.status_code == 200, resp.text
    rows = resp.json()
    assert sorted(r["index"] for r in rows) == list(range(len(DOCS)))
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 < s < 1.0 for s in scores)   # the model's Sigmoid
    assert all(r["text"] == DOCS[r["index"]] for r in rows)
    raw = http.post("/rerank", json={"query": "what is a fox", "texts": DOCS,
                                     "raw_scores": True}).json()
    by_index = {r["index"]: r["score"] for r in raw}
    for r in rows:
        assert r["score"] == pytest.approx(1 / (1 + np.exp(-by_index[r["index"]])), abs=1e-6)
    # a document's score does not depend on the others in its request
    alone = http.post("/rerank", json={"query": "what is a fox", "texts": [DOCS[2]]}).json()
    assert alone[0]["score"] == pytest.approx(next(r["score"] for r in rows if r["index"] == 2),
                                              abs=1e-6)


def test_cohere_shape_with_top_n_and_documents(http, names):
    body = {"model": names["score"], "query": "fox", "top_n": 2, "return_documents": True,
            "documents": [{"text": d, "id": i} for i, d in enumerate(DOCS)]}
    for path in ("/v1/rerank", "/v2/rerank", "/rerank"):
        resp = http.post(path, json=body)
        assert resp.status_code == 200, resp.text
        out = resp.json()
        assert len(out["results"]) == 2 and out["model"] == names["score"]
        first = out["results"][0]
        assert first["document"] == {"text": DOCS[first["index"]]}
        assert out["results"][0]["relevance_score"] >= out["results"][1]["relevance_score"]
        assert out["usage"]["total_tokens"] > 0


def test_cohere_sdk_reranks_against_floe(server, names):
    cohere = pytest.importorskip("cohere")
    v2 = cohere.ClientV2(api_key="unused", base_url=server.url)
    res = v2.rerank(model=names["score"], query="what is a fox", documents=DOCS, top_n=3)
    assert len(res.results) == 3
    direct = httpx.post(server.url + "/v1/rerank", json={"query": "what is a fox",
                                                          "documents": DOCS}).json()["results"]
    assert [r.index for r in res.results] == [r["index"] for r in direct[:3]]
    assert res.results[0].relevance_score == pytest.approx(direct[0]["relevance_score"], abs=1e-6)
    v1 = cohere.Client(api_key="unused", base_url=server.url)
    res1 = v1.rerank(model=names["score"], query="what is a fox", documents=DOCS, top_n=2)
    assert [r.index for r in res1.results] == [r["index"] for r in direct[:2]]


def test_sparse_embeddings(http):
    resp = http.post("/embed_sparse", json={"inputs": ["a red fox", "markets"]})
    assert resp.status_code == 200, resp.text
    rows = resp.json()
    assert len(rows) == 2
    for row in rows:
        assert row, "a SPLADE vector has entries"
        idx = [e["index"] for e in row]
        assert idx == sorted(idx) and len(set(idx)) == len(idx)
        assert all(e["value"] > 0 for e in row)
    again = http.post("/embed_sparse", json={"inputs": "a red fox"}).json()
    assert again[0] == rows[0]


def test_compact_embeddings_agree_with_the_float_ones(http):
    texts = ["hello world", "a red fox", "stock markets"]
    full = np.array([d["embedding"] for d in http.post(
        "/v1/embeddings", json={"input": texts}).json()["data"]], np.float32)
    ub = http.post("/v1/embeddings", json={"input": texts, "embedding_type": "ubinary",
                                          "encoding_format": "base64"}).json()["data"]
    packed = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), np.uint8) for d in ub])
    assert np.array_equal(packed, np.packbits(full > 0, axis=-1))
    b = http.post("/v1/embeddings", json={"input": texts, "embedding_type": "binary"}).json()["data"]
    assert np.array_equal(np.array([d["embedding"] for d in b]) + 128, packed)
    i8 = np.array([d["embedding"] for d in http.post(
        "/v1/embeddings", json={"input": texts, "embedding_type": "int8"}).json()["data"]])
    assert i8.shape == (3, 384) and i8.min() >= -128 and i8.max() <= 127
    info = http.get("/info").json()
    ranges = info["int8_calibration"]["384"]
    lo, hi = np.array(ranges["min"], np.float32), np.array(ranges["max"], np.float32)
    step = (hi - lo) / 255
    want = (np.clip(np.floor((full - lo) / step), 0, 255) - 128).astype(np.int8)
    assert np.abs(i8 - want).max() <= 1   # the JSON floats vs the replica's float32 bits
    u8 = np.array(http.post("/embed", json={"inputs": texts, "embedding_type": "uint8"}).json())
    assert np.array_equal(u8.astype(np.int16) - 128, i8)
    # the same ranges for a later request: a text's codes never depend on its request
    again = http.post("/v1/embeddings", json={"input": texts[:1], "embedding_type": "int8"}).json()
    assert again["data"][0]["embedding"] == i8[0].tolist()


def test_each_route_refuses_a_model_of_another_kind(http, names):
    err = error(http.post("/v1/embeddings", json={"input": "x", "model": names["score"]}), 400, "model")
    assert "/rerank" in err["message"]
    error(http.post("/rerank", json={"query": "q", "texts": ["d"], "model": names["sparse"]}), 400, "model")
    error(http.post("/embed_sparse", json={"inputs": "x", "model": "all-MiniLM-L6-v2"}), 400, "model")
    # an unknown name goes to the route's model (no --strict-model-name)
    assert http.post("/rerank", json={"query": "q", "texts": ["d"], "model": "nope"}).status_code == 200


@pytest.mark.parametrize("body, status, param", [
    ({"query": "", "texts": ["d"]}, 400, "query"),
    ({"query": "   ", "documents": ["d"]}, 400, "query"),
    ({"texts": ["d"]}, 400, "query"),
    ({"query": ["q"], "texts": ["d"]}, 400, "query"),
    ({"query": "q", "texts": []}, 400, "texts"),
    ({"query": "q", "documents": ["d"] * 10_000}, 413, "documents"),
    ({"query": "q", "documents": ["d"], "top_n": 0}, 400, "top_n"),
    ({"query": "q", "documents": ["d"], "top_n": -1}, 400, "top_n"),
    ({"query": "q", "documents": ["d"], "top_n": "3"}, 400, "top_n"),
    ({"query": "q", "documents": ["d"], "top_n": 2.5}, 400, "top_n"),
    ({"query": "q", "documents": [None]}, 400, None),
    ({"query": "q", "texts": ["x" * 1_000_000], "truncate": False}, 413, "texts[0]"),
    ({"query": "q", "texts": ["d"], "truncation_direction": "middle"}, 400, "truncation_direction"),
])
def test_hostile_rerank_requests(http, body, status, param):
    error(http.post("/rerank", json=body), status, param)


def test_a_million_character_document_is_truncated_and_scored(http):
    resp = http.post("/v1/rerank", json={"query": "q", "documents": ["fox " * 250_000, "fox"]})
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["results"]) == 2


def test_hostile_sparse_requests(http):
    error(http.post("/embed_sparse", json={"inputs": []}), 400, "inputs")
    error(http.post("/embed_sparse", json={"inputs": ["x"] * 10_000}), 413, "inputs")
    error(http.post("/embed_sparse", content=b"{not json"), 400)


def test_still_serving_after_the_hostile_requests(http):
    assert http.get("/ready").status_code == 200
    assert http.post("/rerank", json={"query": "q", "texts": ["d"]}).status_code == 200
    assert http.post("/embed_sparse", json={"inputs": "x"}).status_code == 200
    assert http.post("/v1/embeddings", json={"input": "x"}).status_code == 200


def test_grpc_rerank_and_sparse_encode(server, names, http):
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = floe_pb2_grpc.EmbedderStub(channel)
        reply = stub.Rerank(floe_pb2.RerankRequest(query="what is a fox", documents=DOCS, top_n=3,
                                                   return_documents=True), timeout=30)
        tei = http.post("/rerank", json={"query": "what is a fox", "texts": DOCS}).json()
        assert [r.index for r in reply.results] == [r["index"] for r in tei[:3]]
        assert reply.results[0].score == pytest.approx(tei[0]["score"], abs=1e-6)
        assert reply.results[0].document == DOCS[reply.results[0].index]
        assert reply.model == names["score"] and reply.tokens > 0
        with pytest.raises(grpc.RpcError) as e:
            stub.Rerank(floe_pb2.RerankRequest(query="", documents=["d"]), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as e:
            stub.Rerank(floe_pb2.RerankRequest(query="q", documents=["d"],
                                               model="all-MiniLM-L6-v2"), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        sparse = stub.Encode(floe_pb2.EncodeRequest(model=names["sparse"],
                                                    texts=["a red fox", "markets"]), timeout=30)
        assert sparse.embeddings == b"" and len(sparse.sparse_counts) == 2
        indices = np.frombuffer(sparse.sparse_indices, "<i4")
        values = np.frombuffer(sparse.sparse_values, "<f4")
        assert len(indices) == sum(sparse.sparse_counts) == len(values)
        http_rows = http.post("/embed_sparse", json={"inputs": ["a red fox", "markets"]}).json()
        assert indices[: sparse.sparse_counts[0]].tolist() == [e["index"] for e in http_rows[0]]

        packed = stub.Encode(floe_pb2.EncodeRequest(
            texts=["hello"], options=floe_pb2.EncodeOptions(output_dtype=floe_pb2.UBINARY)), timeout=30)
        assert packed.dtype == floe_pb2.UBINARY and len(packed.embeddings) == 384 // 8


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_python_client_reranks_and_embeds_sparse(server, names, http, protocol):
    import asyncio

    import floe

    target = server.url if protocol == "http" else f"127.0.0.1:{server.grpc_port}"
    tei = http.post("/rerank", json={"query": "what is a fox", "texts": DOCS}).json()
    rows = http.post("/embed_sparse", json={"inputs": ["a red fox", "markets"]}).json()
    with floe.Client(target, protocol=protocol) as c:
        ranked = c.rerank("what is a fox", DOCS, top_n=3)
        sparse = c.embed_sparse(["a red fox", "markets"], model=names["sparse"])
    assert [i for i, _ in ranked] == [r["index"] for r in tei[:3]]
    assert ranked[0][1] == pytest.approx(tei[0]["score"], abs=1e-6)
    assert [idx.tolist() for idx, _ in sparse] == [[e["index"] for e in r] for r in rows]
    assert np.allclose(sparse[0][1], [e["value"] for e in rows[0]], atol=1e-6)

    async def run_async():
        async with floe.AsyncClient(target, protocol=protocol) as c:
            return await c.rerank("what is a fox", DOCS)
    assert [i for i, _ in asyncio.run(run_async())] == [r["index"] for r in tei]
