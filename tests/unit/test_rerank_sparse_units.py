"""The pure pieces of reranking, sparse output, compact output and several served models:
quantization against sentence-transformers, the wire forms, pair tokenization, the rerank
bodies, and which served model a request goes to."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

from floe import compact, validate
from floe.errors import ModelNotFoundError, TooLargeError, ValidationError
from floe.fleet.coalesce import split
from floe.frontend import schemas
from floe.frontend.models import ServedModels
from floe.frontend.service import EmbedService, Scores
from floe.kinds.score import activation as _activation
from floe.protocol import EmbedResult, EncodeOptions, SparseRows, TokenBatch, row_bytes
from floe.proto.convert import (request_to_proto, result_from_proto, result_to_proto,
                                tokens_from_proto)


# --- compact output ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["int8", "uint8", "binary", "ubinary"])
def test_quantize_equals_sentence_transformers(dtype):
    from sentence_transformers.quantization import quantize_embeddings

    rng = np.random.default_rng(0)
    calib = rng.standard_normal((300, 45)).astype(np.float32)
    emb = rng.standard_normal((7, 45)).astype(np.float32) * 1.3   # some outside the ranges
    want = quantize_embeddings(emb, precision=dtype, calibration_embeddings=calib)
    got = compact.quantize(emb, dtype, compact.ranges_of(calib))
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(got, want)
    assert got.shape[1] * got.shape[0] == 7 * row_bytes(dtype, 45)


def test_int8_needs_ranges_and_compact_dtypes_are_checked():
    with pytest.raises(ValueError):
        compact.quantize(np.zeros((2, 4), np.float32), "int8")
    with pytest.raises(ValueError):
        compact.quantize(np.zeros((2, 4), np.float32), "float32")
    with pytest.raises(ValueError):
        compact.ranges_of(np.zeros((1, 4), np.float32))


def test_compact_result_sizes():
    r = EmbedResult(n=2, dim=12, dtype="binary", data=b"\0" * 4, token_counts=[1, 1])
    assert r.n == 2
    with pytest.raises(ValueError):
        EmbedResult(n=2, dim=12, dtype="binary", data=b"\0" * 3, token_counts=[1, 1])
    with pytest.raises(ValueError):
        r.as_float32()


def test_embedding_type_field():
    limits = validate.Limits.build(SimpleNamespace(max_seq_length=16, vocab_size=100, dim=8,
                                                   prompts={}, default_prompt_name=None, name="m"),
                                   max_items=4)
    req = schemas.parse_openai(limits, b'{"input": "a", "embedding_type": "ubinary"}')
    assert req.options.output_dtype == "ubinary"
    assert schemas.parse_openai(limits, b'{"input": "a"}').options.output_dtype == "float32"
    with pytest.raises(ValidationError) as e:
        schemas.parse_openai(limits, b'{"input": "a", "embedding_type": "int4"}')
    assert e.value.param == "embedding_type"


# --- the wire ----------------------------------------------------------------------------------

def test_sparse_result_round_trips_and_splits():
    dense = np.zeros((3, 50), np.float32)
    dense[0, [3, 7]] = [0.5, 1.5]
    dense[2, [1, 49, 20]] = [2.0, 0.25, 1.0]
    rows = SparseRows.from_dense(dense)
    assert rows.counts.tolist() == [2, 0, 3]
    assert rows.indices.tolist() == [3, 7, 1, 20, 49]
    r = EmbedResult(n=3, dim=50, dtype="float32", data=b"", token_counts=[4, 5, 6], sparse=rows)
    back = result_from_proto(result_to_proto(r))
    assert back.sparse.counts.tolist() == [2, 0, 3]
    assert back.sparse.indices.tolist() == rows.indices.tolist()
    assert np.array_equal(back.sparse.values, rows.values)
    a, b = split(back, [2, 1])
    assert a.sparse.counts.tolist() == [2, 0] and a.sparse.indices.tolist() == [3, 7]
    assert b.sparse.counts.tolist() == [3] and b.sparse.values.tolist() == [2.0, 1.0, 0.25]
    body = schemas.sparse_response(a)
    assert body == [[{"index": 3, "value": 0.5}, {"index": 7, "value": 1.5}], []]


def test_type_splits_cross_the_wire_and_are_checked():
    tokens = TokenBatch(ids=np.arange(7), lengths=[3, 4], type_splits=[2, 4])
    back = tokens_from_proto(request_to_proto("r", EncodeOptions(), tokens=tokens))
    assert back.type_splits.tolist() == [2, 4] and back.lengths.tolist() == [3, 4]
    plain = tokens_from_proto(request_to_proto("r", EncodeOptions(),
                                               tokens=TokenBatch(ids=[1, 2], lengths=[2])))
    assert plain.type_splits is None
    with pytest.raises(ValidationError):
        TokenBatch(ids=np.arange(3), lengths=[3], type_splits=[4])


def _limits(pairs: bool, max_len: int = 4) -> validate.Limits:
    spec = SimpleNamespace(max_seq_length=max_len, vocab_size=100, dim=1, prompts={},
                           default_prompt_name=None, name="m", task="score" if pairs else "embed")
    return validate.Limits.build(spec, max_items=8)


def test_token_batch_truncation_moves_the_split():
    tokens = TokenBatch(ids=np.arange(1, 7), lengths=[6], type_splits=[3])
    plan = validate.Plan(prompt="", truncate=True, direction="right")
    cut = validate.check_token_batch(_limits(True), tokens, plan)
    assert cut.ids.tolist() == [1, 2, 3, 4] and cut.type_splits.tolist() == [3]
    left = validate.check_token_batch(_limits(True), tokens,
                                      validate.Plan(prompt="", truncate=True, direction="left"))
    assert left.ids.tolist() == [3, 4, 5, 6] and left.type_splits.tolist() == [1]
    with pytest.raises(ValidationError) as e:
        validate.check_token_batch(_limits(False), tokens, plan)
    assert e.value.param == "type_splits"


# --- pairs -------------------------------------------------------------------------------------

def test_pairs_tokenize_as_the_transformers_tokenizer_does(minilm_path):
    from transformers import AutoTokenizer

    from floe.models import load_spec
    from floe.config import ModelSettings
    from floe.tokenize import Tokenizer

    spec = load_spec(ModelSettings(model=minilm_path))
    tok = Tokenizer(spec)
    hf = AutoTokenizer.from_pretrained(minilm_path)
    query, docs = "what is a fox", ["a fox is an animal", "dogs bark", "x " * 5]
    plan = validate.Plan(prompt="", truncate=True, direction="right")
    batch = tok.encode_pairs(query, docs, plan)
    off = batch.offsets()
    for i, d in enumerate(docs):
        want = hf(query, d)
        assert batch.ids[off[i]:off[i + 1]].tolist() == want["input_ids"]
        types = want["token_type_ids"]
        assert batch.type_splits[i] == types.index(1)


def test_pair_truncation_cuts_the_document_not_the_query(minilm_path):
    from floe.models import load_spec
    from floe.config import ModelSettings
    from floe.tokenize import Tokenizer

    spec = load_spec(ModelSettings(model=minilm_path, max_seq_length=16))
    tok = Tokenizer(spec)
    plan = validate.Plan(prompt="", truncate=True, direction="right")
    query = "alpha beta gamma"
    batch = tok.encode_pairs(query, ["one two three four five six seven eight nine ten " * 3], plan)
    assert batch.lengths.tolist() == [16]
    q_ids = tok.encode_plan([query], validate.Plan(prompt="", truncate=False, direction="right")).ids
    assert batch.ids[: len(q_ids)].tolist() == q_ids.tolist()   # [CLS] query [SEP] kept whole
    long_query = "word " * 40   # over the max length alone: cut too, still scored
    assert tok.encode_pairs(long_query, ["doc"], plan).lengths.tolist() == [16]
    with pytest.raises(ValidationError):
        tok.encode_pairs(query, ["one two " * 20], validate.Plan(prompt="", truncate=False,
                                                                   direction="right"))


# --- rerank bodies -----------------------------------------------------------------------------

LIMITS = _limits(True, max_len=64)


def test_rerank_bodies_of_both_shapes():
    tei = schemas.parse_rerank(LIMITS, b'{"query": "q", "texts": ["a", "b", "c"], "return_text": true}')
    assert not tei.cohere and tei.documents == ["a", "b", "c"] and tei.return_documents
    co = schemas.parse_rerank(LIMITS, b'{"query": "q", "documents": ["a", {"text": "b", "id": 3}, "c"],'
                                      b' "top_n": 1, "model": "m"}')
    assert co.cohere and co.documents == ["a", "b", "c"] and co.top_n == 1 and co.model == "m"
    scored = Scores(scores=np.array([0.1, 0.9, 0.9], np.float32),
                    result=EmbedResult(n=3, dim=1, dtype="float32", data=b"\0" * 12,
                                       token_counts=[3, 3, 3]))
    assert scored.ranked().tolist() == [1, 2, 0] and scored.ranked(2).tolist() == [1, 2]
    body = schemas.rerank_response(tei, scored, "m", "rid")
    assert [r["index"] for r in body] == [1, 2, 0] and body[0]["text"] == "b"
    body = schemas.rerank_response(co, scored, "m", "rid")
    assert [r["index"] for r in body["results"]] == [1] and "document" not in body["results"][0]
    assert body["usage"]["total_tokens"] == 9 and body["model"] == "m"


@pytest.mark.parametrize("body, param", [
    (b'{"texts": ["a"]}', "query"),
    (b'{"query": "q"}', "documents"),
    (b'{"query": "q", "texts": ["a"], "documents": ["a"]}', "documents"),
    (b'{"query": "q", "texts": []}', "texts"),
    (b'{"query": "q", "documents": ["a"], "top_n": 0}', "top_n"),
    (b'{"query": "q", "documents": ["a"], "top_n": -3}', "top_n"),
    (b'{"query": "q", "documents": ["a"], "top_n": "two"}', "top_n"),
    (b'{"query": "q", "documents": [{"title": "no text"}]}', None),
    (b'{"query": "q", "documents": [3]}', None),
    (b'{"query": "q", "texts": ["a"], "truncation_direction": "up"}', "truncation_direction"),
])
def test_bad_rerank_bodies_are_400s_naming_the_field(body, param):
    with pytest.raises(ValidationError) as e:
        schemas.parse_rerank(LIMITS, body)
    if param is not None:
        assert e.value.param == param


def test_too_many_documents_is_413():
    docs = b",".join([b'"d"'] * 9)
    with pytest.raises(TooLargeError):
        schemas.parse_rerank(LIMITS, b'{"query": "q", "texts": [' + docs + b"]}")


def test_query_checks():
    plan = validate.Plan(prompt="", truncate=False, direction="right")
    for bad in ("", "   ", 3, None, ["q"]):
        with pytest.raises(ValidationError) as e:
            validate.check_query(LIMITS, bad, plan)
        assert e.value.param == "query"
    with pytest.raises(TooLargeError):
        validate.check_query(LIMITS, "q" * (LIMITS.max_input_chars + 1), plan)
    cut = validate.check_query(LIMITS, "q" * (LIMITS.max_input_chars + 1),
                               validate.Plan(prompt="", truncate=True, direction="right"))
    assert len(cut) == LIMITS.max_input_chars


def test_activations_match_torch():
    import torch

    x = np.array([[-2.0, 0.0, 3.5]], np.float32)
    for name in ("Sigmoid", "Tanh", "ReLU", "Identity"):
        want = getattr(torch.nn, name)()(torch.from_numpy(x)).numpy()
        assert np.allclose(_activation(name, x), want, atol=1e-6)
    want = torch.nn.Softmax(dim=1)(torch.from_numpy(x)).numpy()
    assert np.allclose(_activation("Softmax", x), want, atol=1e-6)


# --- which model answers -----------------------------------------------------------------------

def _service(name: str, task: str, aliases=()):
    svc = EmbedService.__new__(EmbedService)
    svc.spec = SimpleNamespace(task=task)
    svc.model_name = name
    svc.limits = SimpleNamespace(served_names=(name, *aliases))
    return svc


def test_requests_go_to_the_model_of_their_kind():
    emb, rr, sp = _service("emb", "embed", ("e2",)), _service("rr", "score"), _service("sp", "sparse")
    models = ServedModels([emb, rr, sp])
    assert models.names == ["emb", "e2", "rr", "sp"]
    assert models.for_request("embed", "") is emb
    assert models.for_request("embed", "e2") is emb
    assert models.for_request("embed", "unknown") is emb      # its edge decides (strict or not)
    assert models.for_request("score", None) is rr
    assert models.for_request("score", "whatever") is rr
    assert models.for_request("sparse", "sp") is sp
    assert models.for_request("encode", "sp") is sp            # gRPC Encode serves sparse too
    assert models.for_request("encode", "") is emb
    with pytest.raises(ValidationError) as e:
        models.for_request("score", "emb")
    assert e.value.param == "model" and "/v1/embeddings" in e.value.message
    with pytest.raises(ModelNotFoundError) as e:
        ServedModels([emb]).for_request("score", "")
    assert "/rerank" in e.value.message


def test_a_pair_request_on_an_embedding_model_is_refused():
    limits = _limits(False, max_len=16)
    tokens = TokenBatch(ids=[1, 2, 3], lengths=[3], type_splits=[1])
    with pytest.raises(ValidationError):
        validate.check_token_batch(limits, tokens, validate.Plan("", True, "right"))
    assert asyncio.iscoroutinefunction(EmbedService.rerank)


def test_a_long_query_is_cut_once_to_what_truncation_keeps(minilm_path):
    from floe.models import load_spec
    from floe.config import ModelSettings
    from floe.tokenize import Tokenizer

    tok = Tokenizer(load_spec(ModelSettings(model=minilm_path, max_seq_length=16)))
    words = " ".join(f"w{i}" for i in range(300))
    for direction in ("right", "left"):
        plan = validate.Plan(prompt="", truncate=True, direction=direction)
        cut = tok._bound_query(words, plan)
        assert len(cut) < len(words) // 5
        # the pair is what longest-first truncation of the whole query gives
        assert tok.encode_pairs(words, ["doc"], plan).ids.tolist() == \
            tok._trunc[direction].encode(words, "doc").ids
    assert tok._bound_query("short", plan) == "short"
    with pytest.raises(ValidationError) as e:
        tok.encode_pairs(words, ["doc"], validate.Plan(prompt="", truncate=False, direction="right"))
    assert e.value.param == "query"


async def test_compact_output_is_refused_where_nothing_packs_it():
    from floe.edge import Edge

    tokens = TokenBatch.from_lists([[1, 2, 3]])
    with pytest.raises(ValidationError) as e:
        await Edge(_limits(False, 16)).prepare(None, tokens, EncodeOptions(output_dtype="binary"))
    assert e.value.param == "output_dtype"
    packed = await Edge(_limits(False, 16), compact_output=True).prepare(
        None, tokens, EncodeOptions(output_dtype="binary"))
    assert packed.tokens.n == 1


def test_a_long_list_of_string_documents_is_refused_on_its_raw_bytes(monkeypatch):
    many = b'{"query": "q", "texts": [' + b",".join([b'""'] * 5000) + b"]}"
    monkeypatch.setattr(schemas, "decode_body", lambda *a: pytest.fail("decoded before counted"))
    with pytest.raises(TooLargeError) as e:
        schemas.parse_rerank(LIMITS, many)
    assert e.value.param == "texts"


def test_documents_at_the_limit_with_the_other_fields_after_them_pass():
    docs = b",".join([b'"d \\" x"'] * LIMITS.max_items)
    body = (b'{"documents": [' + docs + b'], "query": "q", "model": "m", "top_n": 2, '
            b'"return_documents": true, "raw_scores": false, "truncate": true, '
            b'"truncation_direction": "left", "max_chunks_per_doc": 3}')
    req = schemas.parse_rerank(LIMITS, body)
    assert len(req.documents) == LIMITS.max_items and req.cohere
