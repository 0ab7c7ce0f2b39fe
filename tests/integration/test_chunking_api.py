"""Documents of any length over HTTP and gRPC: chunking and late chunking (issue: "Documents of
any length") against a real `floe serve` (fake engine, real tokenizer, real replica process).

The fake engine's embedding depends only on an input's own ids, so a chunk embedded here equals
the plain embedding of that chunk's text: the chunk parity with sentence-transformers' encode
runs on a real model in tests/integration/test_chunking_parity.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from floe.errors import FloeError
from floe.textsets import stdlib_paragraphs
# the same server as the HTTP API tests (fake engine, 64 inputs per request), one per module
from tests.integration.test_http_api import assert_error, http, server  # noqa: F401

pytestmark = pytest.mark.slow

DOC = "\n\n".join(stdlib_paragraphs(300))         # real prose: the standard library's docstrings


def plain(http, texts: list[str]) -> np.ndarray:
    r = http.post("/v1/embeddings", json={"input": texts})
    assert r.status_code == 200, r.text
    return np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)


def tokens_of(http, text: str) -> int:
    r = http.post("/tokenize", json={"inputs": text})
    assert r.status_code == 200, r.text
    return len(r.json()[0])


def test_chunks_cover_the_document_in_order_and_each_equals_its_own_text(http):
    r = http.post("/v1/embeddings", json={"input": [DOC[:6000], "", "one short line."],
                                          "chunking": {"max_tokens": 64, "overlap": 8}})
    assert r.status_code == 200, r.text
    body = r.json()
    data = body["data"]
    counts = body["chunk_counts"]
    assert counts[1] == 0 and counts[2] == 1 and counts[0] > 10   # the empty input: zero chunks
    assert len(data) == sum(counts) and [d["index"] for d in data] == list(range(len(data)))
    first = [d for d in data if d["input_index"] == 0]
    assert [d["chunk"] for d in first] == list(range(counts[0]))
    # in order, overlapping or touching, covering every word of the document
    assert first[0]["start"] == 0 and first[-1]["end"] == len(DOC[:6000].rstrip())
    for a, b in zip(first, first[1:]):
        assert a["start"] < b["start"] <= a["end"]
    texts = [DOC[d["start"]:d["end"]] for d in first]
    assert all(tokens_of(http, t) <= 64 for t in texts)
    got = np.array([d["embedding"] for d in first], dtype=np.float32)
    want = plain(http, texts)
    assert np.allclose(got, want, atol=1e-5)
    # a cut falls on a word boundary: no chunk starts or ends inside a word here
    for d in first:
        s, e = d["start"], d["end"]
        assert s == 0 or not (DOC[s - 1].isalnum() and DOC[s].isalnum())
        assert e >= len(DOC[:6000]) or not (DOC[e - 1].isalnum() and DOC[e].isalnum())


def test_embed_route_chunks_with_offsets_and_late_mode(http):
    body = {"inputs": [DOC[:3000]], "chunking": {"max_tokens": 48, "overlap": 0}}
    r = http.post("/embed", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["chunk_counts"] == [len(out["chunks"])]
    spans = [(c["start"], c["end"]) for c in out["chunks"]]
    late = http.post("/embed", json={**body, "chunking": {**body["chunking"], "late": True}}).json()
    # the same cuts, other vectors (each late chunk sees its document)
    assert [(c["start"], c["end"]) for c in late["chunks"]] == spans
    a = np.array([c["embedding"] for c in out["chunks"]])
    b = np.array([c["embedding"] for c in late["chunks"]])
    assert a.shape == b.shape and not np.allclose(a, b)
    assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)


def test_late_chunking_of_one_chunk_equals_the_plain_embedding(http):
    text = "A single sentence that fits in one chunk."
    r = http.post("/v1/embeddings", json={"input": [text], "late_chunking": True})
    assert r.status_code == 200, r.text
    late = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
    assert np.allclose(late, plain(http, [text]), atol=1e-5)
    r = http.post("/embed", json={"inputs": text, "chunking": {"late": True}})
    assert np.allclose(np.array(r.json()["chunks"][0]["embedding"]), late[0], atol=1e-5)


def test_jina_late_chunking_one_embedding_per_chunk_in_order(http):
    chunks = ["The first part of a document. ", "Its second part, which refers to it. ",
              "And a third part."]
    r = http.post("/v1/embeddings", json={"input": chunks, "late_chunking": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [d["index"] for d in body["data"]] == [0, 1, 2] and "chunk_counts" not in body
    late = np.array([d["embedding"] for d in body["data"]])
    assert not np.allclose(late, plain(http, chunks), atol=1e-3)


def test_document_past_the_max_length_is_covered_by_windows(http):
    doc = DOC[:20000]   # several times all-MiniLM's 256 tokens
    r = http.post("/v1/embeddings", json={"input": doc, "chunking": {"max_tokens": 128,
                                                                      "overlap": 16, "late": True}})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert len(data) > 20 and data[-1]["end"] == len(doc.rstrip())
    assert np.isfinite(np.array([d["embedding"] for d in data])).all()


def test_openai_shape_is_unchanged_without_chunking(http):
    body = http.post("/v1/embeddings", json={"input": ["hello"]}).json()
    assert set(body) == {"object", "data", "model", "usage"}
    assert set(body["data"][0]) == {"object", "index", "embedding"}


@pytest.mark.parametrize("chunking,param", [
    ({"max_tokens": 4}, "chunking.max_tokens"),
    ({"max_tokens": 100000}, "chunking.max_tokens"),
    ({"max_tokens": 32, "overlap": 32}, "chunking.overlap"),
    ({"max_tokens": 32, "overlap": 40}, "chunking.overlap"),
    ({"max_tokens": 32, "overlap": -1}, "chunking.overlap"),
    ({"max_tokens": "many"}, "chunking.max_tokens"),
    ({"max_tokens": True}, "chunking.max_tokens"),
    ({"late": "yes"}, "chunking.late"),
    ({"size": 10}, "chunking"),
])
def test_bad_chunking_is_a_400_naming_the_parameter(http, chunking, param):
    r = http.post("/v1/embeddings", json={"input": "some text", "chunking": chunking})
    assert_error(r, 400)
    assert r.json()["error"]["param"].startswith(param), r.json()
    assert http.get("/health").status_code == 200


def test_hostile_chunking_requests(http):
    # token ids cannot be cut at character offsets
    assert_error(http.post("/v1/embeddings", json={"input": [[1, 2, 3]], "chunking": {}}), 400,
                 param="chunking")
    # both kinds of late chunking at once
    assert_error(http.post("/v1/embeddings", json={"input": ["a"], "late_chunking": True,
                                                   "chunking": {"late": True}}), 400,
                 param="late_chunking")
    # an empty chunk in a late-chunked document
    assert_error(http.post("/v1/embeddings", json={"input": ["a b c", ""],
                                                   "late_chunking": True}), 400, param="input[1]")
    # a document that expands past the item limit (64 here) is a 413, counted in chunks
    assert_error(http.post("/v1/embeddings", json={"input": DOC, "chunking": {"max_tokens": 16}}),
                 413, param="input")
    # a prompt that leaves no room for text in a chunk
    assert_error(http.post("/v1/embeddings", json={"input": "text", "prompt": "word " * 40,
                                                   "chunking": {"max_tokens": 16}}), 400)
    # a chunked answer is JSON
    r = http.post("/embed", json={"inputs": "text", "chunking": {}},
                  headers={"accept": "application/octet-stream"})
    assert_error(r, 400, param="chunking")
    # only empty documents: zero chunks, answered without a replica
    r = http.post("/v1/embeddings", json={"input": ["", "   "], "chunking": {}})
    assert r.status_code == 200, r.text
    assert r.json()["data"] == [] and r.json()["chunk_counts"] == [0, 0]
    assert http.get("/health").status_code == 200


def test_compact_output_and_dimensions_apply_per_chunk(http):
    r = http.post("/v1/embeddings", json={"input": DOC[:2000], "dimensions": 64,
                                          "embedding_type": "int8",
                                          "chunking": {"max_tokens": 64}})
    assert r.status_code == 200, r.text
    rows = [d["embedding"] for d in r.json()["data"]]
    assert len(rows) > 1 and all(len(x) == 64 and all(isinstance(v, int) for v in x) for x in rows)


def test_grpc_chunking_and_client(server):
    import floe

    with floe.Client(f"127.0.0.1:{server.grpc_port}", protocol="grpc") as c:
        got = c.embed_chunks([DOC[:3000], ""], max_tokens=64, overlap=8)
    with floe.Client(server.url, protocol="http") as h:
        via_http = h.embed_chunks([DOC[:3000], ""], max_tokens=64, overlap=8)
    assert got.counts.tolist() == via_http.counts.tolist() and got.counts[1] == 0
    assert np.array_equal(got.start, via_http.start) and np.array_equal(got.end, via_http.end)
    assert np.allclose(got.embeddings, via_http.embeddings, atol=1e-6)
    assert got.embeddings.shape == (int(got.counts.sum()), 384)
    with floe.Client(f"127.0.0.1:{server.grpc_port}", protocol="grpc") as c:
        with pytest.raises(FloeError) as err:
            c.embed_chunks(["x"], max_tokens=3)
    assert err.value.kind.name == "VALIDATION" and err.value.param == "chunking.max_tokens"


def test_floe_embed_cli_chunks_documents(server, tmp_path):
    import json

    from tests.support import floe_cli

    doc = DOC[:2500]
    r = floe_cli("embed", "--server", server.url, "--chunk-tokens", "48", "--chunk-overlap", "8",
                 doc, "second document.")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert {x["input_index"] for x in lines} == {0, 1}
    first = [x for x in lines if x["input_index"] == 0]
    assert [x["chunk"] for x in first] == list(range(len(first))) and len(first) > 3
    assert all(x["text"] == doc[x["start"]:x["end"]] and len(x["embedding"]) == 384 for x in first)
    npy = tmp_path / "c.npy"
    r = floe_cli("embed", "--server", server.url, "--chunk-tokens", "48", "--late-chunking",
                 "-o", str(npy), doc)
    assert r.returncode == 0, r.stderr
    assert np.load(npy).shape[1] == 384
