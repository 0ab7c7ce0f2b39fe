"""A reranker and a SPLADE model served side by side by one `floe serve` on the real engine
(OpenVINO on a CPU, float32), against sentence-transformers' own CrossEncoder.predict and
SparseEncoder.encode on the same tiny random-weight folders."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.support import floe_serve

pytestmark = pytest.mark.slow

QUERY = "how do foxes hunt in winter"
DOCS = ["foxes listen for mice under the snow and pounce", "the quarterly report is late",
        "winter", "a fox", "red foxes hunt alone at dusk, mostly small rodents and birds"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, bert_reranker, bert_splade):
    with floe_serve("--num-replicas", "1", "--dtype", "float32", "--model", bert_reranker,
                    "--model", bert_splade, tmp_dir=str(tmp_path_factory.mktemp("logs"))) as s:
        yield s


def test_rerank_scores_equal_cross_encoder_predict(server, bert_reranker):
    import torch
    from sentence_transformers import CrossEncoder

    ce = CrossEncoder(bert_reranker, device="cpu")
    pairs = [(QUERY, d) for d in DOCS]
    want = np.asarray(ce.predict(pairs), dtype=np.float32)
    want_raw = np.asarray(ce.predict(pairs, activation_fn=torch.nn.Identity()), dtype=np.float32)
    body = {"query": QUERY, "texts": DOCS}
    got = {r["index"]: r["score"] for r in httpx.post(server.url + "/rerank", json=body).json()}
    raw = {r["index"]: r["score"] for r in httpx.post(
        server.url + "/rerank", json={**body, "raw_scores": True}).json()}
    assert np.abs(np.array([got[i] for i in range(len(DOCS))]) - want).max() <= 1e-4
    assert np.abs(np.array([raw[i] for i in range(len(DOCS))]) - want_raw).max() <= 1e-4
    top = httpx.post(server.url + "/v1/rerank", json={"query": QUERY, "documents": DOCS,
                                                      "top_n": 2}).json()["results"]
    assert [r["index"] for r in top] == list(np.argsort(-want, kind="stable")[:2])


def test_sparse_vectors_equal_sparse_encoder(server, bert_splade):
    from sentence_transformers import SparseEncoder

    se = SparseEncoder(bert_splade, device="cpu")
    want = se.encode(DOCS, convert_to_tensor=True).to_dense().numpy()
    rows = httpx.post(server.url + "/embed_sparse", json={"inputs": DOCS}).json()
    for i, row in enumerate(rows):
        got = np.zeros_like(want[i])
        got[[e["index"] for e in row]] = [e["value"] for e in row]
        # the same non-zero entries; a value within float32 noise of zero (log1p(relu(x)) at
        # x ~ 1e-7) may be present on one side only, and then it is below the tolerance
        assert np.abs(got - want[i]).max() <= 1e-4
        assert ((got > 2e-4) <= (want[i] > 0)).all() and ((want[i] > 2e-4) <= (got > 0)).all()
        assert (got > 0).sum() >= 0.99 * (want[i] > 0).sum()
