"""The OpenVINO engine's packed batches (floe/engine/packing.py, packed_graph.py): several inputs
in one row give each input's own embedding, on every pooling and the RoBERTa positions; which
models and settings refuse it; a packed graph that fails its checks leaves the engine padding;
and a replica forms packed batches of mixed lengths and answers as the engine does alone."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest

from floe.config import BatchSettings, ModelSettings
from floe.engine import packed_graph
from floe.engine.openvino_convert import ConversionError, cache_key, openvino_dir
from floe.engine.openvino_engine import OpenVINOEngine
from floe.models import load_spec
from floe.protocol import EncodeOptions, TokenBatch
from tests.fixtures import tiny_models

pytestmark = pytest.mark.slow

LENGTHS = [30, 7, 12, 3, 22, 9, 1, 16, 5, 28]


def _inputs(spec, lengths=LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    low = min(5, spec.vocab_size - 1)
    return [rng.integers(low, spec.vocab_size, min(n, spec.max_seq_length)).astype(np.int32)
            for n in lengths]


def _engine(path, dtype="float32", **kw):
    engine = OpenVINOEngine(load_spec(ModelSettings(model=path)), dtype=dtype, threads=1,
                            packing=True, **kw)
    engine.warmup(256)
    return engine


def _check_packed_equals_alone(engine, rtol=2e-5, atol=2e-5):
    seqs = _inputs(engine.spec)
    prepared = engine.prepare(seqs)
    assert "segments" in prepared, "the batch was not packed"
    assert prepared["input_ids"].shape[0] < len(seqs)   # several inputs share rows
    got = engine.run(prepared)
    alone = np.stack([engine.run(engine.prepare([s]))[0] for s in seqs])
    np.testing.assert_allclose(got, alone, rtol=rtol, atol=atol)
    return got, alone


@pytest.mark.parametrize("name", ["tiny_bert", "tiny_bert_dense", "tiny_xlmr"])
def test_packed_rows_equal_each_input_alone(name, tiny_bert, tiny_bert_dense, tiny_xlmr):
    # mean pooling; mean and Dense; CLS with RoBERTa-like positions (offset by the pad id)
    path = {"tiny_bert": tiny_bert, "tiny_bert_dense": tiny_bert_dense, "tiny_xlmr": tiny_xlmr}[name]
    engine = _engine(path)
    assert engine.packing == 16
    _check_packed_equals_alone(engine)


@pytest.mark.full
@pytest.mark.parametrize("pooling", ["lasttoken", "mean_sqrt_len_tokens"])
def test_every_packable_pooling(pooling, tmp_path):
    path = tiny_models.build_tiny_bert(str(tmp_path / pooling), pooling=pooling)
    _check_packed_equals_alone(_engine(path))


@pytest.mark.full
def test_minilm_packed_in_bfloat16_and_against_sentence_transformers(minilm_path, st_model):
    from floe.engine.hardware import cpu_has_fast_bf16

    engine = _engine(minilm_path, dtype="float32")
    got, _ = _check_packed_equals_alone(engine)
    seqs = _inputs(engine.spec)
    from floe.engine.torch_engine import TorchEngine

    torch_rows = TorchEngine(engine.spec, device="cpu", dtype="float32", unpad=False)
    want = torch_rows.run(torch_rows.prepare(seqs))
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.99999
    if cpu_has_fast_bf16():
        bf16 = _engine(minilm_path, dtype="bfloat16")
        packed = bf16.run(bf16.prepare(seqs))
        cos = (packed * want).sum(1) / np.linalg.norm(packed, axis=1) / np.linalg.norm(want, axis=1)
        assert cos.min() >= 0.999
        alone = np.stack([bf16.run(bf16.prepare([s]))[0] for s in seqs])
        cos = (packed * alone).sum(1) / np.linalg.norm(packed, axis=1) / np.linalg.norm(alone, axis=1)
        assert cos.min() >= 0.9999   # a batched input equals it alone


def test_packing_is_refused_where_it_cannot_run(tiny_bert, bert_reranker):
    off = OpenVINOEngine(load_spec(ModelSettings(model=tiny_bert)), dtype="float32", threads=1)
    off.warmup(256)
    assert off.packing is None and "segments" not in off.prepare(_inputs(off.spec))
    spec = load_spec(ModelSettings(model=bert_reranker))
    assert "reranker" in packed_graph.packable(spec)
    reranker = OpenVINOEngine(spec, dtype="float32", threads=1, packing=True)
    reranker.warmup(256)
    assert reranker.packing is None
    # `floe info` says so, and why
    from floe.models.describe import describe

    assert describe(spec, device="cpu")["packing"].startswith("no: a reranker")
    assert describe(off.spec, device="cpu", dtype="int8")["packing"].startswith("no: int8")
    assert describe(off.spec, device="cpu")["packing"].startswith("yes: packed graph")


def test_a_packed_graph_that_fails_its_check_leaves_the_engine_padding(tiny_bert, monkeypatch,
                                                                         tmp_path, caplog):
    def broken(spec, threads):
        raise ConversionError("packed rows differ from the same inputs run alone")

    monkeypatch.setattr(packed_graph, "convert", broken)
    cache = str(tmp_path / "cache")
    engine = _engine(tiny_bert, cache_dir=cache)
    assert engine.packing is None
    assert "packing off" in caplog.text
    spec = engine.spec
    failed = os.path.join(openvino_dir(cache), cache_key(spec, packed=True) + ".failed")
    assert "differ" in open(failed, encoding="utf-8").read()
    # the batch still runs, padded
    rows = engine.run(engine.prepare(_inputs(spec)))
    assert rows.shape == (len(LENGTHS), spec.dim) and np.isfinite(rows).all()
    # the next start reads the record and does not convert again; `floe info` shows it
    monkeypatch.setattr(packed_graph, "convert", lambda *a: pytest.fail("converted again"))
    assert _engine(tiny_bert, cache_dir=cache).packing is None
    from floe.models.describe import describe

    state = describe(spec, device="cpu", engine_cache_dir=cache)["packing"]
    assert state.startswith("no: the packed graph failed") and ".failed" in state


def test_a_replica_runs_packed_batches_and_answers_as_the_engine_alone(tiny_bert):
    from floe.replica.core import ReplicaCore

    engine = _engine(tiny_bert)
    layouts = []
    prepare = engine.prepare

    def recording(sequences, *args, **kw):
        out = prepare(sequences, *args, **kw)
        layouts.append(("segments" in out, len(sequences)))
        return out

    engine.prepare = recording
    core = ReplicaCore(engine, BatchSettings(max_batch_tokens=256, max_batch_size=64,
                                             batch_timeout_ms=30.0, min_batch_fill=0.9))
    core.start()
    try:
        requests = [_inputs(engine.spec, LENGTHS[i:] + LENGTHS[:i], seed=i) for i in range(6)]

        async def run():
            return await asyncio.gather(*(
                core.submit(TokenBatch.from_lists([s.tolist() for s in seqs]), EncodeOptions(),
                            f"r{i}") for i, seqs in enumerate(requests)))

        results = asyncio.run(run())
        engine.prepare = prepare
        assert any(packed for packed, _ in layouts), layouts
        for seqs, result in zip(requests, results):
            alone = np.stack([engine.run(engine.prepare([s]))[0] for s in seqs])
            if engine.spec.normalize:
                alone /= np.linalg.norm(alone, axis=1, keepdims=True)
            np.testing.assert_allclose(result.as_float32(), alone, rtol=2e-5, atol=2e-5)
        stats = core.stats()
        real = sum(len(s) for seqs in requests for s in seqs)
        assert stats.tokens == real
        # packed: the passes ran fewer padded tokens than the inputs padded to their longest
        assert stats.padded_tokens < stats.sequences * max(LENGTHS)
        assert stats.padded_tokens / stats.tokens < 1.25
        assert stats.batch_packing_align == 16
        assert stats.packed_batches == sum(packed for packed, _ in layouts) > 0
    finally:
        core.stop(drain_timeout=0.0)


def test_any_failure_of_the_packed_graph_leaves_the_replica_serving(tiny_bert, monkeypatch,
                                                                    tmp_path):
    """Not only a ConversionError: whatever the packed graph's conversion raises, the engine
    starts and pads (packing is optional)."""
    def broken(spec, threads):
        raise ValueError("an unexpected shape")

    monkeypatch.setattr(packed_graph, "convert", broken)
    engine = _engine(tiny_bert, cache_dir=str(tmp_path / "cache"))
    assert engine.packing is None and "unexpected" in engine._pack_refused
    rows = engine.run(engine.prepare(_inputs(engine.spec)))
    assert rows.shape == (len(LENGTHS), engine.spec.dim)
