"""Parity with sentence-transformers, the oracle: tokens, embeddings, batching, prompts.

floe's embedding is computed as the replica computes it: Tokenizer.encode, then
engine.run(engine.prepare(...)), then Normalize when the model ends in one (the replica's
per-request step, done here with numpy).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from floe.config import ModelSettings
from floe.engine.torch_engine import TorchEngine
from floe.models import load_spec
from floe.protocol import EncodeOptions, TokenBatch
from floe.tokenize import Tokenizer
from tests.fixtures import tiny_models

pytestmark = pytest.mark.slow

TEXTS = [
    "Hello world",
    "A much longer sentence about embedding servers, dynamic batching and token budgets.",
    "",
    "Ceci est une phrase en français: élève, garçon, où. ¿Números 123?",
    "the quick brown fox jumps over the lazy dog " * 30,  # longer than every max_seq_length
    "   leading and trailing whitespace   ",
]

MODELS = ["minilm", "tiny_bert", "tiny_bert_dense", "tiny_xlmr", "plain_bert"]


@pytest.fixture(scope="module")
def model_paths(minilm_path, tiny_bert, tiny_bert_dense, tiny_xlmr, plain_bert) -> dict[str, str]:
    return {"minilm": minilm_path, "tiny_bert": tiny_bert, "tiny_bert_dense": tiny_bert_dense,
            "tiny_xlmr": tiny_xlmr, "plain_bert": plain_bert}


@pytest.fixture(scope="module")
def floe_model():
    cache: dict = {}

    def get(path: str, dtype: str = "float32"):
        if (path, dtype) not in cache:
            spec = load_spec(ModelSettings(model=path))
            cache[(path, dtype)] = (spec, Tokenizer(spec), TorchEngine(spec, device="cpu", dtype=dtype))
        return cache[(path, dtype)]

    return get


def floe_encode(model, texts, options=EncodeOptions()) -> np.ndarray:
    spec, tok, engine = model
    batch = tok.encode(texts, options)
    out = engine.run(engine.prepare([batch.item(i) for i in range(batch.n)]))
    if spec.normalize:
        out = out / np.linalg.norm(out, axis=1, keepdims=True)
    return out


def st_encode(st, spec, texts, **kw) -> np.ndarray:
    # A plain transformers folder is served with Normalize; ST loads it without one.
    return st.encode(texts, convert_to_numpy=True, normalize_embeddings=not spec.is_sentence_transformers,
                     **kw)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def st_token_lists(st, texts) -> list[list[int]]:
    f = st.tokenize(texts)
    return [[int(t) for t, m in zip(ids, mask) if m] for ids, mask in zip(f["input_ids"], f["attention_mask"])]


@pytest.mark.parametrize("name", MODELS)
def test_tokens_match_sentence_transformers(name, model_paths, floe_model, st_model):
    path = model_paths[name]
    st = st_model(path)
    _, tok, _ = floe_model(path)
    batch = tok.encode(TEXTS, EncodeOptions())
    assert [batch.item(i).tolist() for i in range(batch.n)] == st_token_lists(st, TEXTS)
    assert batch.lengths.max() == st.max_seq_length == tok.max_seq_length


@pytest.mark.parametrize("name", MODELS)
def test_float32_embeddings_match(name, model_paths, floe_model, st_model):
    path = model_paths[name]
    model = floe_model(path, "float32")
    ours = floe_encode(model, TEXTS)
    ref = st_encode(st_model(path), model[0], TEXTS)
    assert ours.shape == ref.shape == (len(TEXTS), model[0].dim)
    assert cosines(ours, ref).min() >= 0.99999
    if model[0].normalize:  # same vector, not only the same direction
        np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("name", [  # MiniLM's real weights in bf16 are the full tier; the tiny ones here
    pytest.param(n, marks=pytest.mark.full) if n == "minilm" else n for n in MODELS])
def test_bfloat16_embeddings_match_float32_oracle(name, model_paths, floe_model, st_model):
    path = model_paths[name]
    model = floe_model(path, "bfloat16")
    assert model[2].dtype == "bfloat16"
    assert cosines(floe_encode(model, TEXTS), st_encode(st_model(path), model[0], TEXTS)).min() >= 0.999


@pytest.mark.parametrize("name", ["minilm", "tiny_xlmr", "tiny_bert_dense"])
@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.full)])
def test_an_input_in_a_batch_equals_the_same_input_alone(name, dtype, model_paths, floe_model):
    model = floe_model(model_paths[name], dtype)
    together = floe_encode(model, TEXTS)
    alone = np.stack([floe_encode(model, [t])[0] for t in TEXTS])
    tol = 0.99999 if dtype == "float32" else 0.999
    assert cosines(together, alone).min() >= tol


def test_inputs_at_max_length_match(minilm_path, floe_model, st_model):
    model = floe_model(minilm_path)
    tok = model[1]
    exact = "hello " * (tok.max_seq_length - 2)
    texts = [exact, exact + "world", "short"]
    assert tok.encode(texts, EncodeOptions()).lengths.tolist()[:2] == [256, 256]
    ref = st_encode(st_model(minilm_path), model[0], texts)
    assert cosines(floe_encode(model, texts), ref).min() >= 0.99999


def test_prompts_are_applied_like_sentence_transformers(tiny_bert_dense, floe_model, st_model):
    st = st_model(tiny_bert_dense)
    model = floe_model(tiny_bert_dense)
    texts = TEXTS[:4]
    for name in ("query", "passage"):
        ours = floe_encode(model, texts, EncodeOptions(prompt_name=name))
        ref = st_encode(st, model[0], texts, prompt_name=name)
        assert cosines(ours, ref).min() >= 0.99999
        batch = model[1].encode(texts, EncodeOptions(prompt_name=name))
        assert [batch.item(i).tolist() for i in range(batch.n)] == \
            st_token_lists(st, [st.prompts[name] + t for t in texts])
    plain = model[1].encode(texts, EncodeOptions())
    prompted = model[1].encode(texts, EncodeOptions(prompt_name="query"))
    assert (prompted.lengths > plain.lengths).all()
    assert not np.allclose(floe_encode(model, texts), floe_encode(model, texts, EncodeOptions(prompt_name="query")),
                           atol=1e-6)


def test_token_id_input_equals_text_input(minilm_path, floe_model):
    model = floe_model(minilm_path)
    spec, tok, engine = model
    batch = tok.encode(TEXTS, EncodeOptions())
    ids = tok.validate_ids(TokenBatch.from_lists([batch.item(i).tolist() for i in range(batch.n)]))
    via_ids = engine.run(engine.prepare([ids.item(i) for i in range(ids.n)]))
    via_ids /= np.linalg.norm(via_ids, axis=1, keepdims=True)
    np.testing.assert_allclose(via_ids, floe_encode(model, TEXTS), atol=1e-6)


@pytest.mark.parametrize("pooling", ["max", "lasttoken", "mean_sqrt_len_tokens", "weightedmean"])
def test_other_pooling_modes_match(pooling, tmp_path_factory, st_model):
    path = tiny_models.build_tiny_bert(os.path.join(tmp_path_factory.mktemp("pool"), pooling),
                                       pooling=pooling, normalize=False, seed=5)
    spec = load_spec(ModelSettings(model=path))
    model = (spec, Tokenizer(spec), TorchEngine(spec, device="cpu", dtype="float32"))
    ours = floe_encode(model, TEXTS)
    ref = st_encode(st_model(path), spec, TEXTS)
    assert cosines(ours, ref).min() >= 0.99999
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


def test_warmup_runs_the_full_budget(tiny_bert, floe_model):
    spec, _, engine = floe_model(tiny_bert)
    engine.warmup(max_batch_tokens=4 * spec.max_seq_length)
    engine.warmup(max_batch_tokens=1)  # below one row: still one full-length row
    assert engine.memory() == (0, 0)
