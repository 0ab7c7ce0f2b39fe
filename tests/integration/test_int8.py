"""--dtype int8: the OpenVINO graph quantized once, measured against float32, served or refused.

The default tier runs the recipe on a tiny random BERT with the gate's targets moved (so both
verdicts, their cache and their messages are exercised in seconds); the full tier runs the real
all-MiniLM-L6-v2 against the real targets and sentence-transformers.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from floe.config import ModelSettings
from floe.engine import int8
from floe.engine.choice import choose_engine
from floe.errors import ConfigError
from floe.models import load_spec

pytestmark = pytest.mark.slow


def _engine(spec, cache):
    from floe.engine.openvino_engine import OpenVINOEngine

    return OpenVINOEngine(spec, dtype="int8", threads=2, cache_dir=cache)


def _texts():
    return ["The quick brown fox jumps over the lazy dog.", "Return the sum of a and b.",
            "Open a file and return a stream.", "x"]


def test_int8_is_built_once_measured_and_served(tiny_bert, tmp_path, monkeypatch):
    from floe.engine.openvino_engine import OpenVINOEngine

    spec = load_spec(ModelSettings(model=tiny_bert))
    cache = str(tmp_path)
    monkeypatch.setattr(int8, "MIN_TOP10_OVERLAP", 0.0)   # a random model: the recipe, not quality
    engine = _engine(spec, cache)
    assert engine.dtype == "int8"
    report = int8.read_quality(engine.model_dir)
    assert report["passed"] and report["eval_texts"] == int8.EVAL_TEXTS
    # tiny BERT's two feed-forward down-projections and the pooling matmul
    assert report["kept_float"] == 3
    assert 0.0 < report["mean_cosine"] <= 1.0 and 0.0 <= report["top10_overlap"] <= 1.0
    batch = [np.arange(5, 5 + n, dtype=np.int32) for n in (7, 3, 12)]
    got = engine.run(engine.prepare(batch))
    want = OpenVINOEngine(spec, dtype="float32", threads=2, cache_dir=cache).run(engine.prepare(batch))
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert got.shape == want.shape and np.isfinite(got).all() and cos.min() > 0.9
    # batched equals alone holds for int8 too (the quantized kernels are per-row)
    alone = engine.run(engine.prepare(batch[1:2]))
    assert np.abs(alone[0] - got[1]).max() < 1e-3 * max(1.0, float(np.abs(got[1]).max()))
    # a later start reads the cached graph and verdict: no NNCF at all
    monkeypatch.setattr(int8, "_build", lambda *a, **k: pytest.fail("quantized again"))
    assert _engine(spec, cache).dtype == "int8"


def test_int8_below_the_targets_is_refused_and_the_verdict_cached(tiny_bert, tmp_path, monkeypatch):
    spec = load_spec(ModelSettings(model=tiny_bert))
    monkeypatch.setattr(int8, "MIN_MEAN_COSINE", 1.01)    # no model can pass
    with pytest.raises(int8.Int8Refused) as e:
        _engine(spec, str(tmp_path))
    msg = str(e.value)
    assert "--dtype int8 is refused" in msg and "mean cosine" in msg and "bfloat16" in msg
    folder = os.path.join(str(tmp_path), "openvino")
    reports = [os.path.join(r, "quality.json") for r, _, files in os.walk(folder)
               if "quality.json" in files]
    assert len(reports) == 1 and json.load(open(reports[0]))["passed"] is False
    monkeypatch.setattr(int8, "_build", lambda *a, **k: pytest.fail("quantized again"))
    with pytest.raises(int8.Int8Refused):
        _engine(spec, str(tmp_path))


def test_int8_is_refused_where_it_cannot_run(tiny_bert, bert_reranker):
    spec = load_spec(ModelSettings(model=tiny_bert))
    for kind, device in (("torch", "cpu"), ("auto", "cuda")):
        with pytest.raises(ConfigError, match="OpenVINO"):
            choose_engine(kind, spec, device, "int8", gpu=lambda: True, have_openvino=lambda: True)
    assert choose_engine("auto", spec, "cpu", "int8", have_openvino=lambda: True).kind == "openvino"
    with pytest.raises(ConfigError, match="score"):
        choose_engine("auto", load_spec(ModelSettings(model=bert_reranker)), "cpu", "int8",
                      have_openvino=lambda: True)


def test_neighbour_overlap_and_the_gate():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((300, 16)).astype(np.float32)
    queries = np.arange(0, 300, 10)
    assert int8.neighbour_overlap(ref, ref, queries) == 1.0
    assert int8.neighbour_overlap(ref, rng.standard_normal((300, 16)), queries) < 0.2
    assert int8.gate(0.995, 0.96) and not int8.gate(0.98, 0.99) and not int8.gate(0.999, 0.94)


@pytest.mark.full
def test_minilm_int8_meets_the_targets_against_sentence_transformers(minilm_path, tmp_path, st_model):
    spec = load_spec(ModelSettings(model=minilm_path))
    engine = _engine(spec, str(tmp_path))
    report = int8.read_quality(engine.model_dir)
    assert report["passed"], report
    assert report["mean_cosine"] >= 0.99 and report["top10_overlap"] >= 0.95
    from floe.protocol import EncodeOptions
    from floe.tokenize import Tokenizer

    batch = Tokenizer(spec).encode(_texts(), EncodeOptions())
    off = batch.offsets()
    got = engine.run(engine.prepare([batch.ids[off[i]:off[i + 1]] for i in range(batch.n)]))
    got /= np.linalg.norm(got, axis=1, keepdims=True)
    want = st_model(minilm_path).encode(_texts(), normalize_embeddings=True)
    assert ((got * want).sum(1) >= 0.99).all()


@pytest.mark.full
@pytest.mark.parametrize("name", ["embeddinggemma", "modernbert-embed"])
def test_int8_quantizes_and_gates_both_graphs_of_a_sliding_window_model(name, tmp_path, monkeypatch):
    """A sliding-window model whose inputs outgrow its key span has a banded graph for them: int8
    quantizes it too, on documents joined past the span, and gates it on its own inputs."""
    from floe.engine.openvino_engine import OpenVINOEngine
    from tests.fixtures import families

    spec = load_spec(ModelSettings(model=families.FAMILIES[name](str(tmp_path / name)),
                                   max_seq_length=600))
    monkeypatch.setattr(int8, "MIN_TOP10_OVERLAP", 0.0)   # a random model: the recipe, not quality
    monkeypatch.setattr(int8, "MIN_MEAN_COSINE", 0.9)
    for const, value in (("CALIBRATION_TEXTS", 64), ("EVAL_TEXTS", 256), ("EVAL_QUERIES", 32),
                         ("LONG_CALIBRATION", 8), ("LONG_EVAL", 8)):   # the recipe in seconds
        monkeypatch.setattr(int8, const, value)
    cache = str(tmp_path / "cache")
    engine = _engine(spec, cache)
    assert engine.dtype == "int8" and engine._window is not None
    report = int8.read_quality(engine.model_dir)
    band = report["band"]
    assert report["passed"] and band["eval_texts"] == int8.LONG_EVAL
    assert band["tokens"] > engine._window.span and 0.0 < band["mean_cosine"] <= 1.0
    assert os.path.isfile(os.path.join(engine.model_dir, "int8", "band.xml"))
    rng = np.random.default_rng(3)
    batch = [rng.integers(5, spec.vocab_size - 1, n).astype(np.int32)
             for n in (600, engine._window.span + 7, 40)]   # the banded graph's inputs
    got = engine.run(engine.prepare(batch))
    want = OpenVINOEngine(spec, dtype="float32", threads=2, cache_dir=cache).run(engine.prepare(batch))
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert np.isfinite(got).all() and cos.min() > 0.95, cos
    # below the long documents' target: refused, with their figure
    monkeypatch.setattr(int8, "MIN_MEAN_COSINE", band["mean_cosine"] + 1e-6)
    monkeypatch.setattr(int8, "_read_report", lambda *a, **k: None)   # measure again
    with pytest.raises(int8.Int8Refused, match="longer than its key span"):
        _engine(spec, str(tmp_path / "cache2"))
