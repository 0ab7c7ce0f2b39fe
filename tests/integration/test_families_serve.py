"""`floe serve --model DIR` on every tiny family stand-in; embeddinggemma and Qwen3-Embedding in depth: /v1/embeddings
(and, for embeddinggemma, gRPC Encode) with `prompt_name`, `prompt` and `dimensions`, and
`--default-prompt-name`, equal to
sentence-transformers (prompt applied, Matryoshka slice renormalized). `floe info` shows the
prompts and Matryoshka dimensions. Few tests: each server start imports torch in a replica."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import numpy as np
import pytest

from tests.fixtures import families
from tests.support import floe_serve

# Full tier: every family's parity is in test_families.py in-process, and `floe serve` on a real
# model is test_http_real_model.py; these add a process per family (a minute each on 2 cores).
pytestmark = [pytest.mark.slow, pytest.mark.full]

TEXTS = families.TEXTS[:4] + [" ".join(["long input"] * 400)]  # the last one hits max_seq_length


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("families_serve")
    return {name: families.FAMILIES[name](str(root / name))
            for name in ("embeddinggemma", "qwen3-embedding")}


def st_reference(folder: str, prompt: str | None, dims: int | None = None) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(folder, device="cpu")
    emb = st.encode(TEXTS, prompt=prompt, convert_to_numpy=True)
    if dims:  # floe's Matryoshka: slice, then renormalize (the model normalizes)
        emb = emb[:, :dims]
        emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    return emb


def embed(server, **body) -> np.ndarray:
    resp = httpx.post(server.url + "/v1/embeddings", json={"input": TEXTS, **body}, timeout=60)
    assert resp.status_code == 200, resp.text
    return np.array([d["embedding"] for d in resp.json()["data"]], dtype=np.float32)


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.min() >= 0.99999, cos
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)


def test_embeddinggemma_served_with_prompts_dimensions_default(built, tmp_path):
    folder = built["embeddinggemma"]
    prompts = families.EMBEDDINGGEMMA_PROMPTS
    with floe_serve("--model", folder, "--num-replicas", "1", "--dtype", "float32",
                    "--default-prompt-name", "document", tmp_dir=str(tmp_path)) as server:
        default = embed(server)
        query32 = embed(server, prompt_name="query", dimensions=32)
        clustering16 = embed(server, prompt_name="Clustering", dimensions=16)
        explicit = embed(server, prompt="task: search result | query: ")
        info = httpx.get(server.url + "/info", timeout=10).json()
        from floe.client import Client

        with Client(server.grpc_address, protocol="grpc") as grpc_client:
            grpc_query16 = grpc_client.embed(TEXTS, prompt_name="query", dimensions=16)
            grpc_default = grpc_client.embed(TEXTS)
        bad = httpx.post(server.url + "/v1/embeddings",
                         json={"input": "x", "prompt_name": "nope"}, timeout=10)
    assert_close(default, st_reference(folder, prompts["document"]))
    assert_close(query32, st_reference(folder, prompts["query"], 32))
    assert_close(clustering16, st_reference(folder, prompts["Clustering"], 16))
    assert_close(explicit, st_reference(folder, prompts["query"]))
    assert_close(grpc_query16, st_reference(folder, prompts["query"], 16))
    assert_close(grpc_default, default)
    assert bad.status_code == 400 and "nope" in bad.text
    assert info["matryoshka_dimensions"] == [32, 16, 8]
    assert info["default_prompt_name"] == "document"
    assert info["prompts"]["query"] == prompts["query"]


def test_embeddinggemma_float16_refused_at_start(built, tmp_path):
    with pytest.raises(RuntimeError, match="float16"):
        with floe_serve("--model", built["embeddinggemma"], "--num-replicas", "1",
                        "--dtype", "float16", tmp_dir=str(tmp_path), ready_timeout=60):
            pass


def test_qwen3_served_with_instruction_prompt_and_dimensions(built, tmp_path):
    folder = built["qwen3-embedding"]
    with floe_serve("--model", folder, "--num-replicas", "1", "--dtype", "float32",
                    tmp_dir=str(tmp_path)) as server:
        plain = embed(server)
        query16 = embed(server, prompt_name="query", dimensions=16)
        document = embed(server, prompt_name="document")
    assert_close(plain, st_reference(folder, None))
    assert_close(query16, st_reference(folder, families.QWEN3_PROMPTS["query"], 16))
    assert_close(document, st_reference(folder, None))  # the document prompt is ""


def test_floe_info_shows_prompts_and_matryoshka(built):
    out = subprocess.run([sys.executable, "-m", "floe", "info", built["embeddinggemma"], "--json"],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["matryoshka_dims"] == [32, 16, 8]
    assert info["prompts"] == families.EMBEDDINGGEMMA_PROMPTS
    assert info["float16_refused"] is True
    assert info["architecture"] == "Gemma3TextModel" and info["pooling"] == "mean"


@pytest.mark.parametrize("name", ["arctic-embed-m", "bge-m3", "modernbert-embed"])
def test_other_families_served_equal_sentence_transformers(name, tmp_path):
    """Each remaining family through a real `floe serve`: plain input and, where the model has
    prompts, its query prompt by name (plus a Matryoshka slice where it declares dimensions)."""
    from floe.config import ModelSettings
    from floe.models import load_spec

    folder = families.FAMILIES[name](str(tmp_path / name))
    spec = load_spec(ModelSettings(model=folder))
    with floe_serve("--model", folder, "--num-replicas", "1", "--dtype", "float32",
                    tmp_dir=str(tmp_path)) as server:
        plain = embed(server)
        query = embed(server, prompt_name="query") if "query" in spec.prompts else None
        dims = spec.matryoshka_dims[-1] if spec.matryoshka_dims else None
        sliced = embed(server, dimensions=dims) if dims else None
    assert_close(plain, st_reference(folder, None))
    if query is not None:
        assert_close(query, st_reference(folder, spec.prompts["query"]))
    if sliced is not None:
        assert_close(sliced, st_reference(folder, None, dims))
