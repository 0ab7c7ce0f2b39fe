"""The sliding-window families on both engines, at lengths beyond the window, against
sentence-transformers (the oracle runs transformers' own masks and full attention on every key).

Tiny stand-ins (tests/fixtures/families.py): embeddinggemma with a window of 16 (radius 8, key span
24 on the banded path) and ModernBERT with a local window of 8 (radius 4, span 16). The inputs
cover the three regimes of floe's forward (floe/engine/attention.py): within the radius (no band
at all), beyond the radius but within the span (the dense band mask), and beyond the span (the
banded path: blocks of keys, and on OpenVINO the second graph), alone and padded together.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from floe.config import ModelSettings
from floe.engine import create_engine
from floe.engine.window import window_of
from floe.models import load_spec
from floe.protocol import EncodeOptions
from floe.tokenize import Tokenizer
from tests.fixtures import families
from tests.integration.test_families import cosines, long_text
from tests.support import ModuleMemo

FP32_MIN_COS = 0.99999
BF16_MIN_COS = 0.999
NAMES = ["embeddinggemma", "modernbert-embed"]
# Words per text: a few tokens, ~20 (beyond gemma's radius, within its span), 40-60, ~100, and
# one cut at max_seq_length.
TEXTS = [long_text(n) for n in (2, 9, 17, 30, 45, 70, 600)] + ["a"]

_memo = ModuleMemo()
_get = _memo.get
_clear_memo = _memo.clear_fixture()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("windowed"))


def folder(root: str, name: str) -> str:
    return _get(("dir", name), lambda: families.FAMILIES[name](os.path.join(root, name)))


def spec_of(root: str, name: str):
    return _get(("spec", name), lambda: load_spec(ModelSettings(model=folder(root, name))))


def engine(root: str, name: str, kind: str, dtype: str):
    def make():
        eng = create_engine(spec_of(root, name), kind, device="cpu", dtype=dtype)
        assert eng.backend == kind  # OpenVINO converted: no silent fallback to torch
        return eng
    return _get(("engine", name, kind, dtype), make)


def ids_of(root: str, name: str, texts) -> list[np.ndarray]:
    tok = _get(("tok", name), lambda: Tokenizer(spec_of(root, name)))
    batch = tok.encode(list(texts), EncodeOptions())
    return [batch.item(i) for i in range(batch.n)]


def st_embed(st_model, root: str, name: str, texts) -> np.ndarray:
    return _get(("st", name, tuple(texts)), lambda: st_model(folder(root, name)).encode(
        list(texts), convert_to_numpy=True, batch_size=16))


def check(eng, root: str, name: str, dtype: str, st_model) -> None:
    ids = ids_of(root, name, TEXTS)
    window = window_of(spec_of(root, name).backbone_path)
    lengths = [len(x) for x in ids]
    # every regime is exercised: within the radius, dense band, banded (also 40-60 tokens)
    assert min(lengths) <= window.radius + 1
    assert any(window.radius + 1 < n <= window.span for n in lengths)
    assert any(40 <= n <= 60 and window.banded(n) for n in lengths)
    assert max(lengths) == spec_of(root, name).max_seq_length
    limit = FP32_MIN_COS if dtype == "float32" else BF16_MIN_COS
    together = eng.run(eng.prepare(ids))            # one batch as wide as the longest: banded
    alone = np.concatenate([eng.run(eng.prepare([x])) for x in ids])
    want = st_embed(st_model, root, name, TEXTS)
    assert cosines(together, want).min() >= limit, cosines(together, want)
    assert cosines(alone, want).min() >= limit, cosines(alone, want)
    assert cosines(together, alone).min() >= limit
    # the model is not degenerate: different texts give clearly different embeddings
    assert cosines(together[:1].repeat(len(ids), 0), together)[1:].max() < 0.999


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", NAMES)
def test_torch_engine_beyond_the_window(root, name, dtype, st_model):
    eng = engine(root, name, "torch", dtype)
    assert eng._windowed is not None  # floe's forward, not transformers' mask functions
    check(eng, root, name, dtype, st_model)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["embeddinggemma",
                                  pytest.param("modernbert-embed", marks=pytest.mark.full)])
def test_openvino_engine_beyond_the_window(root, name, dtype, st_model):
    eng = engine(root, name, "openvino", dtype)
    assert eng._band_request is not None  # the banded graph, for batches wider than the span
    assert os.path.isfile(os.path.join(eng.model_dir, "band.xml"))
    check(eng, root, name, dtype, st_model)


def test_auto_picks_openvino_for_the_windowed_families(root):
    from floe.engine.choice import choose_engine

    for name in NAMES:
        choice = choose_engine("auto", spec_of(root, name), "cpu", "auto", have_openvino=lambda: True)
        assert choice.kind == "openvino", choice


def test_the_cache_key_follows_floe_forward(root, tiny_bert, monkeypatch):
    """A change in floe's windowed forward (its source) changes the converted graph's key; a model
    without sliding layers keeps its key."""
    from floe.engine import openvino_convert as ov

    spec, bert = spec_of(root, "embeddinggemma"), load_spec(ModelSettings(model=tiny_bert))
    before, bert_before = ov.cache_key(spec, versions={}), ov.cache_key(bert, versions={})
    monkeypatch.setattr(ov, "_forward_digest", lambda: "changed")
    assert ov.cache_key(spec, versions={}) != before
    assert ov.cache_key(bert, versions={}) == bert_before


@pytest.mark.slow
def test_openvino_bf16_keeps_far_positions(root):
    """Rotary angles come from a float32 table (attention.RotaryTable): computed in the graph at
    bf16, positions above 256 are not exact and a long input's embedding drifts (0.9989 at 1,285
    tokens on the embeddinggemma-300m shape). Here: the tiny embeddinggemma at 600 tokens, OpenVINO
    bf16 against the torch engine's float32 (itself checked against sentence-transformers above)."""
    spec = load_spec(ModelSettings(model=folder(root, "embeddinggemma"), max_seq_length=600))
    ov = create_engine(spec, "openvino", device="cpu", dtype="bfloat16")
    assert ov.backend == "openvino"
    ref = engine(root, "embeddinggemma", "torch", "float32")
    rng = np.random.default_rng(7)
    ids = [rng.integers(5, spec.vocab_size, n).astype(np.int32) for n in (600, 450, 300)]
    cos = cosines(ov.run(ov.prepare(ids)), ref.run(ref.prepare(ids)))
    assert cos.min() >= BF16_MIN_COS, cos


def test_late_chunking_beyond_the_window_on_both_engines(root):
    """Late chunking of a document longer than the tiny embeddinggemma's key span: the OpenVINO
    engine's span graph (the banded one, for windows wider than the key span) equals torch's, and
    a one-chunk document is its plain embedding."""
    from floe import validate
    from floe.chunking import ChunkOptions

    spec = spec_of(root, "embeddinggemma")
    tok = _get(("tok", "embeddinggemma"), lambda: Tokenizer(spec))
    plan = validate.Plan(prompt="", truncate=True, direction="right")
    doc = " ".join(f"word{i % 37} and more text." for i in range(40))
    chunked = tok.encode_chunked([doc], plan, ChunkOptions(max_tokens=24, overlap=4, late=True))
    toks = chunked.tokens
    assert toks.lengths.max() > 40   # wider than the tiny model's key span: banded
    off = toks.spans.offsets()
    seqs = [toks.item(i) for i in range(toks.n)]
    spans = [toks.spans.bounds[off[i]:off[i + 1]] for i in range(toks.n)]
    got = {kind: engine(root, "embeddinggemma", kind, "float32").run(
        engine(root, "embeddinggemma", kind, "float32").prepare(seqs, spans=spans))
        for kind in ("torch", "openvino")}
    cos = (got["torch"] * got["openvino"]).sum(1) / np.linalg.norm(got["torch"], axis=1) / \
        np.linalg.norm(got["openvino"], axis=1)
    assert got["torch"].shape == (chunked.rows, spec.dim) and cos.min() >= 0.9999
    one = tok.encode_chunked(["a short text."], plan, ChunkOptions(late=True)).tokens
    eng = engine(root, "embeddinggemma", "openvino", "float32")
    late = eng.run(eng.prepare([one.item(0)], spans=[one.spans.bounds]))
    plain = eng.run(eng.prepare([one.item(0)]))
    assert (late * plain).sum() / np.linalg.norm(late) / np.linalg.norm(plain) >= 0.99999


def test_the_replicas_cost_model_has_the_window_term(root, tmp_path):
    """A serving replica of a windowed model calibrates rows of its key span and twice it, and
    its fit carries the sliding layers' attention apart from the full layers'."""
    from floe.replica.cost import calibration_shapes, for_replica

    spec = spec_of(root, "embeddinggemma")
    span = window_of(spec.backbone_path).span
    assert 0 < span < spec.max_seq_length
    eng = engine(root, "embeddinggemma", "torch", "float32")
    budget = max(2048, spec.max_seq_length)
    model = for_replica(eng, budget, 64, str(tmp_path))
    assert model.coefficients.span == span and model.calibrated
    lengths = {n for _, n in calibration_shapes(budget, spec.max_seq_length, 64, span)}
    assert {span, min(2 * span, spec.max_seq_length)} <= lengths
    # the stored passes are read back with the same term
    again = for_replica(eng, budget, 64, str(tmp_path))
    assert again.coefficients == model.coefficients

