"""floe's attention kernel (floe/engine/native/): the op against attention computed in numpy on
inputs of every awkward length (1, 15-17, 31-33, 300 tokens, several per row, padding between and
after them), in float32 and bf16; the rewritten graph of a BERT with 32-dimension heads against
the untouched one and sentence-transformers, padded and packed, an input batched equal to itself
alone; a kernel with a reach (a CPU with AMX) given only the batches whose longest input is
within it; and every way it stays off (no compiler, heads of another size, bf16 not run, a CPU
that refuses it), each leaving OpenVINO's attention running.

The kernel is built once per session into the session's engine cache (a few seconds). On a CPU
without AVX-512 BF16 only the refusal tests run. The engines of the module's fixture run every
batch on the kernel, whatever the CPU (its reach set to None), so they test the same on every CPU.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from floe.config import ModelSettings
from floe.engine import native
from floe.engine.native import graph
from floe.engine.openvino_engine import OpenVINOEngine
from floe.models import load_spec
from tests.fixtures import tiny_models
from floe.protocol import EncodeOptions
from floe.tokenize import Tokenizer
from tests.integration.test_families import cosines, long_text

pytestmark = pytest.mark.slow

runs_here = pytest.mark.skipif(native.cpu_refusal() is not None or native._compiler() is None,
                               reason=f"the kernel does not run here: {native.cpu_refusal()}")

HEADS = 3


@pytest.fixture(scope="module")
def kernel(engine_cache_dir) -> str:
    path, why = native.library(engine_cache_dir)
    assert path is not None, why
    return path


@pytest.fixture(scope="module")
def bert32(tmp_path_factory) -> str:
    """A tiny BERT whose heads have 32 dimensions (64 wide, 2 heads), 320 positions."""
    folder = str(tmp_path_factory.mktemp("bert32") / "model")
    return tiny_models.build_tiny_bert(folder, hidden=64, heads=2, max_position=320,
                                       max_seq_length=300, seed=11)


def _segments() -> np.ndarray:
    """(3, 300): one input of 300; inputs of 1, 16, 17, 33, 2, 31 with padding between two of
    them and after; padding only."""
    seg = np.zeros((3, 300), np.int64)
    seg[0] = 1
    at, number = 0, 1
    for n in (1, 16, 17, 33, 2, 31):
        seg[1, at:at + n] = number
        at += n + (5 if number == 3 else 0)
        number += 1
    return seg


def _reference(q, k, v, seg, scale):
    out = np.zeros_like(q)
    for r in range(q.shape[0]):
        for s in set(seg[r].tolist()) - {0}:
            idx = np.flatnonzero(seg[r] == s)
            for h in range(q.shape[2]):
                scores = q[r, idx, h] @ k[r, idx, h].T * scale
                p = np.exp(scores - scores.max(1, keepdims=True))
                out[r, idx, h] = (p / p.sum(1, keepdims=True)) @ v[r, idx, h]
    return out


def _bf16(x: np.ndarray) -> np.ndarray:
    """x rounded to bf16 (to nearest even), as float32."""
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).view(np.float32)


@runs_here
@pytest.mark.parametrize("element", ["f32", "bf16"])
def test_the_kernel_equals_attention_over_each_input(kernel, element):
    import openvino as ov
    import openvino.opset13 as ops

    params = [ops.parameter([-1, -1, HEADS, 32], ov.Type.f32, name=n) for n in "qkv"]
    seg_param = ops.parameter([-1, -1], ov.Type.i64, name="segments")
    args = [p.output(0) if element == "f32" else ops.convert(p, "bf16").output(0) for p in params]
    node = graph._op_class()([*args, seg_param.output(0)], 0.5)
    out = node.output(0) if element == "f32" else ops.convert(node.output(0), "f32").output(0)
    model = ov.Model([out], [*params, seg_param])
    core = ov.Core()
    core.add_extension(kernel)
    folder = os.path.join(os.path.dirname(kernel), f"probe-{element}-{os.getpid()}")
    ov.save_model(model, os.path.join(folder, "model.xml"))
    compiled = core.compile_model(core.read_model(os.path.join(folder, "model.xml")), "CPU",
                                  {"INFERENCE_NUM_THREADS": 2})
    assert _on_kernel(compiled.create_infer_request())
    rng = np.random.default_rng(0)
    seg = _segments()
    q, k, v = (rng.standard_normal((3, 300, HEADS, 32)).astype(np.float32) for _ in range(3))
    got = compiled.create_infer_request().infer([q, k, v, seg])[0]
    want = _reference(_bf16(q * 0.5) / 0.5, _bf16(k), _bf16(v), seg, 0.5)
    real = seg != 0
    assert np.all(got[~real] == 0)                   # padding gets zeros
    # probabilities rounded to bf16 (and the output too, in bf16): a few parts in a thousand
    tolerance = 0.02 if element == "f32" else 0.04
    assert np.abs(got[real] - want[real]).max() < tolerance
    # one token: its own value
    np.testing.assert_allclose(got[1, 0], _bf16(v[1, 0]), atol=1e-2)


def _engine(spec, reach, **kwargs) -> OpenVINOEngine:
    """An engine whose kernel has ``reach`` (None: every batch), whatever this CPU's is."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(native, "reach", lambda flags=None: reach)
        return OpenVINOEngine(spec, dtype="bfloat16", threads=1, **kwargs)


@pytest.fixture(scope="module")
def engines(bert32, kernel):
    spec = load_spec(ModelSettings(model=bert32))
    made = {}
    for name, on in (("kernel", True), ("openvino", False)):
        engine = _engine(spec, None, packing=True, native_attention=on)
        engine.warmup(1024)
        made[name] = engine
    return made


def _on_kernel(request) -> bool:
    """Whether the compiled graph runs floe's op (the plugin runs it as a "Reference" node)."""
    ops = request.get_compiled_model().get_runtime_model().get_ordered_ops()
    return any(op.get_rt_info()["layerType"].astype(str) == "Reference" for op in ops)


def _inputs(spec, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1000, spec.vocab_size, n).astype(np.int32) for n in lengths]


@runs_here
def test_a_bert_with_32_dimension_heads_runs_on_the_kernel(engines, bert32, st_model):
    engine, plain = engines["kernel"], engines["openvino"]
    assert engine.native.startswith("yes"), engine.native
    assert plain.native == "off"
    assert _on_kernel(engine._request) and _on_kernel(engine._packed_request)
    assert not _on_kernel(plain._request) and not _on_kernel(plain._packed_request)
    for lengths, packed in (([40, 3, 17, 1, 9, 30, 12, 5], True), ([290, 270, 300], False)):
        seqs = _inputs(engine.spec, lengths)
        prepared = engine.prepare(seqs)
        assert ("segments" in prepared) is packed
        got, want = engine.run(prepared), plain.run(plain.prepare(seqs))
        assert cosines(got, want).min() > 0.9995
    # the fidelity target against the library's float32, on text of every length to 300 tokens
    texts = ["a", "word " * 60, "word " * 150, long_text(400),
             "another sentence of several words that says a little more"]
    ids = Tokenizer(engine.spec).encode(texts, EncodeOptions())
    got = engine.run(engine.prepare([ids.item(i) for i in range(ids.n)]))
    want = st_model(bert32).encode(texts, convert_to_numpy=True, batch_size=8)
    assert cosines(got, want).min() >= 0.999


@runs_here
def test_a_cross_encoder_with_32_dimension_heads_scores_on_the_kernel(tmp_path_factory, kernel):
    # a reranker's graph (token types, a classifier head) takes the same rewrite
    folder = tiny_models.build_bert_cross_encoder(str(tmp_path_factory.mktemp("ce32") / "model"),
                                                  hidden=64, heads=2, seed=12)
    spec = load_spec(ModelSettings(model=folder))
    # converted (and checked against torch) in float32: this random head's logits are large
    # enough that bf16 misses the conversion's own probe tolerance, kernel or not
    OpenVINOEngine(spec, dtype="float32", threads=1)
    on, off = (_engine(spec, None, native_attention=flag) for flag in (True, False))
    assert on.native.startswith("yes"), on.native
    assert _on_kernel(on._request) and not _on_kernel(off._request)
    seqs = _inputs(spec, [40, 3, 17, 100, 64])
    splits = np.array([20, 2, 9, 50, 30], dtype=np.int64)   # query / passage boundaries
    got = on.run(on.prepare(seqs, type_splits=splits))
    want = off.run(off.prepare(seqs, type_splits=splits))
    np.testing.assert_allclose(got, want, atol=5e-2, rtol=5e-2)
    assert np.abs(want).max() > 1e-3   # scores that say something


@runs_here
def test_a_kernel_with_a_reach_runs_only_the_batches_within_it(bert32, kernel):
    spec = load_spec(ModelSettings(model=bert32))
    engine = _engine(spec, {"padded": 20, "packed": 30}, packing=True, native_attention=True)
    engine.warmup(1024)
    assert engine.native.startswith("yes") and "20 tokens or shorter (packed: 30" in engine.native, \
        engine.native
    # both graphs of each layout kept: the untouched ones, and the kernel's beside them
    assert not _on_kernel(engine._request) and not _on_kernel(engine._packed_request)
    assert _on_kernel(engine._short["padded"]) and _on_kernel(engine._short["packed"])

    def alone(request, prepared, packed):
        feed = {k: v for k, v in prepared.items() if k not in ("packed_where", "longest_input")}
        request.infer(feed, share_inputs=True)
        out = np.array(request.get_output_tensor(0).data, dtype=np.float32)
        out = out.reshape(-1, out.shape[-1])
        return out[prepared["packed_where"]] if packed else out

    for lengths, packed, within in (([20, 18, 19], False, True), ([21, 20, 19], False, False),
                                    ([30, 3, 5, 1, 9, 2], True, True),
                                    ([31, 3, 5, 1, 9, 2, 7, 11], True, False)):
        prepared = engine.prepare(_inputs(spec, lengths))
        assert ("segments" in prepared) is packed
        layout = "packed" if packed else "padded"
        untouched = engine._packed_request if packed else engine._request
        expected = alone(engine._short[layout] if within else untouched, prepared, packed)
        np.testing.assert_array_equal(engine.run(prepared), expected)
        other = alone(untouched if within else engine._short[layout], prepared, packed)
        # the two graphs agree, as checked at start, and differ in their last bits: which ran shows
        assert cosines(expected, other).min() > 0.9995 and not np.array_equal(expected, other)


@runs_here
def test_an_input_batched_equals_itself_alone_on_the_kernel(engines):
    engine = engines["kernel"]
    seqs = _inputs(engine.spec, [120, 7, 64, 33, 16, 250])
    for batch in (seqs, seqs[:1] + seqs[2:3], seqs[1:2] * 5):
        got = engine.run(engine.prepare(batch))
        alone = np.stack([engine.run(engine.prepare([s]))[0] for s in batch])
        np.testing.assert_allclose(got, alone, atol=2e-3)
        assert cosines(got, alone).min() > 0.99999


@runs_here
def test_without_a_compiler_openvinos_attention_runs(bert32, tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    spec = load_spec(ModelSettings(model=bert32))
    engine = OpenVINOEngine(spec, dtype="bfloat16", threads=1, cache_dir=str(tmp_path / "a"),
                            native_attention=True)
    assert engine.native.startswith("no: building it failed"), engine.native
    assert np.isfinite(engine.run(engine.prepare(_inputs(spec, [30, 4])))).all()


def test_a_build_that_fails_is_recorded_and_not_retried(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "cpu_refusal", lambda flags=None: None)
    monkeypatch.setenv("CXX", "false")        # a "compiler" that exits 1
    path, why = native.library(str(tmp_path))
    assert path is None and why.startswith("false exited 1"), why
    path, again = native.library(str(tmp_path))
    assert path is None and again.startswith("its build failed before"), again


@runs_here
def test_heads_of_another_size_keep_openvinos_attention(tiny_bert, kernel):
    spec = load_spec(ModelSettings(model=tiny_bert))   # 4 heads of 8
    engine = OpenVINOEngine(spec, dtype="bfloat16", threads=1, native_attention=True)
    assert engine.native.startswith("no: no attention of 32-dimension heads"), engine.native
    again = OpenVINOEngine(spec, dtype="bfloat16", threads=1, native_attention=True)
    assert again.native == engine.native                 # the refusal is recorded, not redone
    assert np.isfinite(engine.run(engine.prepare(_inputs(spec, [20, 3])))).all()


@runs_here
def test_float32_does_not_take_the_kernel(bert32):
    engine = OpenVINOEngine(load_spec(ModelSettings(model=bert32)), dtype="float32", threads=1,
                            native_attention=True)
    assert engine.native.startswith("no: the kernel computes in bf16")


def test_which_cpus_take_the_kernel():
    assert native.cpu_refusal({"avx512f", "avx512_bf16"}) is None
    assert native.cpu_refusal({"avx512_bf16", "amx_bf16", "amx_tile"}) is None
    assert "AVX-512 BF16" in native.cpu_refusal({"avx2", "fma"})
    # with AMX, OpenVINO's attention overtakes the kernel on long inputs
    assert native.reach({"avx512f", "avx512_bf16"}) is None
    assert native.reach({"avx512_bf16", "amx_bf16", "amx_tile"}) == {"padded": 64, "packed": 192}


@runs_here
def test_floe_info_says_whether_attention_runs_on_the_kernel(tiny_bert, bert32, kernel, engine_cache_dir):
    from floe.models import describe

    assert describe(load_spec(ModelSettings(model=bert32)), engine="openvino",
                    engine_cache_dir=engine_cache_dir)["attention"].startswith("yes: floe's kernel")
    assert describe(load_spec(ModelSettings(model=tiny_bert)), engine="openvino")["attention"] == \
        "no: heads of 8 dimensions (the kernel takes 32)"
    assert describe(load_spec(ModelSettings(model=bert32)), engine="openvino", dtype="float32")[
        "attention"].startswith("no: the kernel computes in bf16")
    assert describe(load_spec(ModelSettings(model=bert32)), engine="openvino",
                    native_attention=False)["attention"] == "no: --no-native-attention"
