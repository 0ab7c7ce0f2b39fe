"""Chunks against the oracle: each chunk's embedding is sentence-transformers' ``encode`` of the
chunk's own text, and late chunking of a one-chunk document is that document's plain embedding,
on the real default model (torch in float32 and bfloat16, OpenVINO) and on tiny models of other
families (a Dense head, a CLS model, XLM-R's SentencePiece tokenizer).

floe's rows are computed as the replica computes them: Tokenizer.encode_chunked, then
engine.run(engine.prepare(...)) (with spans for late chunking), then Normalize.
"""

from __future__ import annotations

import numpy as np
import pytest

from floe import validate
from floe.chunking import ChunkOptions
from floe.config import ModelSettings
from floe.engine.torch_engine import TorchEngine
from floe.models import load_spec
from floe.textsets import stdlib_paragraphs
from floe.tokenize import Tokenizer

pytestmark = pytest.mark.slow

DOCS = ["\n\n".join(stdlib_paragraphs(40)), "Ceci est une phrase en français: élève, garçon. "
        "¿Números 123? Une deuxième phrase suit la première, puis une troisième.", "Short."]
PLAN = validate.Plan(prompt="", truncate=True, direction="right")


def rows(spec, engine, chunked) -> np.ndarray:
    toks = chunked.tokens
    seqs = [toks.item(i) for i in range(toks.n)]
    if toks.spans is None:
        out = engine.run(engine.prepare(seqs))
    else:
        off = toks.spans.offsets()
        out = engine.run(engine.prepare(seqs, spans=[toks.spans.bounds[off[i]:off[i + 1]]
                                                     for i in range(toks.n)]))
    return out / np.linalg.norm(out, axis=1, keepdims=True) if spec.normalize else out


def cosines(a, b) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def model():
    cache: dict = {}

    def get(path: str, dtype: str = "float32", engine: str = "torch"):
        if (path, dtype, engine) not in cache:
            spec = load_spec(ModelSettings(model=path))
            if engine == "torch":
                eng = TorchEngine(spec, device="cpu", dtype=dtype)
            else:
                from floe.engine.openvino_engine import OpenVINOEngine
                eng = OpenVINOEngine(spec, dtype=dtype)
            cache[(path, dtype, engine)] = (spec, Tokenizer(spec), eng)
        return cache[(path, dtype, engine)]

    return get


@pytest.mark.parametrize("dtype,floor", [("float32", 0.99999),
                                         pytest.param("bfloat16", 0.999, marks=pytest.mark.full)])
def test_each_chunk_equals_encode_of_its_text(minilm_path, model, st_model, dtype, floor):
    spec, tok, engine = model(minilm_path, dtype)
    chunked = tok.encode_chunked(DOCS, PLAN, ChunkOptions(max_tokens=64, overlap=12))
    texts = [DOCS[i][a:b] for i, a, b in zip(chunked.input_index, chunked.start, chunked.end)]
    assert chunked.tokens.lengths.max() <= 64 and chunked.counts[0] > 10
    ours = rows(spec, engine, chunked)
    ref = st_model(minilm_path).encode(texts, convert_to_numpy=True)
    assert cosines(ours, ref).min() >= floor
    # every chunk is at most 64 tokens as the library tokenizes it, too
    assert max(len(t) for t in st_model(minilm_path).tokenize(texts)["input_ids"]) <= 64 or \
        all(int(m.sum()) <= 64 for m in st_model(minilm_path).tokenize(texts)["attention_mask"])


@pytest.mark.parametrize("fixture", ["tiny_bert_dense", "tiny_xlmr"])
def test_chunk_parity_on_other_families(request, fixture, model, st_model):
    path = request.getfixturevalue(fixture)
    spec, tok, engine = model(path)
    n = min(32, spec.max_seq_length)
    chunked = tok.encode_chunked(DOCS, PLAN, ChunkOptions(max_tokens=n, overlap=4))
    texts = [DOCS[i][a:b] for i, a, b in zip(chunked.input_index, chunked.start, chunked.end)]
    ref = st_model(path).encode(texts, convert_to_numpy=True,
                                normalize_embeddings=not spec.is_sentence_transformers)
    assert cosines(rows(spec, engine, chunked), ref).min() >= 0.99999


def test_late_chunking_of_one_chunk_is_the_plain_embedding(minilm_path, model, st_model):
    spec, tok, engine = model(minilm_path)
    docs = ["A single sentence that fits in one chunk.", DOCS[1]]
    late = rows(spec, engine, tok.encode_chunked(docs, PLAN, ChunkOptions(late=True)))
    assert late.shape == (2, spec.dim)
    assert cosines(late, st_model(minilm_path).encode(docs, convert_to_numpy=True)).min() >= 0.99999
    jina = rows(spec, engine, tok.encode_late(["A single sentence ", "that fits in one chunk."], PLAN))
    assert jina.shape == (2, spec.dim)


def test_late_chunks_see_their_document_and_batch_like_alone(minilm_path, model):
    spec, tok, engine = model(minilm_path)
    opts = ChunkOptions(max_tokens=48, overlap=0, late=True)
    together = rows(spec, engine, tok.encode_chunked(DOCS, PLAN, opts))
    alone = np.concatenate([rows(spec, engine, tok.encode_chunked([d], PLAN, opts)) for d in DOCS])
    assert cosines(together, alone).min() >= 0.99999
    plain = rows(spec, engine, tok.encode_chunked(DOCS, PLAN, ChunkOptions(max_tokens=48)))
    c = cosines(together, plain)
    assert c.min() < 0.999 and c.mean() > 0.5   # context changes each chunk, not beyond recognition


def test_openvino_late_chunking_matches_torch(minilm_path, model):
    pytest.importorskip("openvino")
    opts = ChunkOptions(max_tokens=64, overlap=8, late=True)
    spec, tok, torch_engine = model(minilm_path)
    _, _, ov_engine = model(minilm_path, "float32", "openvino")
    chunked = tok.encode_chunked(DOCS, PLAN, opts)
    assert chunked.tokens.n > len(DOCS)   # the long document took several macro-windows
    assert cosines(rows(spec, ov_engine, chunked), rows(spec, torch_engine, chunked)).min() >= 0.9999
