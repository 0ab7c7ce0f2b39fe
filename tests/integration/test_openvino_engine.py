"""The OpenVINO engine against sentence-transformers, the oracle, on every family floe serves.

MiniLM with its real weights and the tiny random-weight stand-ins of the verified architectures
(BERT with CLS + Dense, XLM-R, arctic-embed, Qwen3-Embedding, bge-m3, embeddinggemma, ModernBERT)
go through the converted graph: cosine >= 0.99999 in f32 and >= 0.999 in bf16 against ST's float32
embedding; an input inside a padded batch equals the same input alone (the sliding-window families
at lengths beyond their window: tests/integration/test_windowed_engines.py). A conversion that
fails falls back to torch with a WARNING. Then the cache (a second start converts nothing and
imports no torch; replicas starting together convert once) and `floe info`.

Conversions go to the session's engine cache (tests/conftest.py), so each model converts once per
session however many tests use it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from floe.config import ModelSettings
from floe.engine import create_engine
from floe.engine.hardware import cpu_has_amx, cpu_has_fast_bf16
from floe.engine.openvino_convert import cache_key, openvino_dir
from floe.engine.openvino_engine import OpenVINOEngine
from floe.models import load_spec
from floe.protocol import EncodeOptions
from floe.tokenize import Tokenizer
from tests.fixtures import families, tiny_models
from tests.integration.test_families import cosines, long_text
from tests.support import ModuleMemo

pytestmark = pytest.mark.slow

FP32_MIN_COS = 0.99999
BF16_MIN_COS = 0.999
MODELS = ["minilm", "tiny_bert_dense", "tiny_xlmr", "arctic-embed-m", "qwen3-embedding", "bge-m3",
          "embeddinggemma", "modernbert-embed"]
# The default tier converts a BERT (arctic-embed's tiny stand-in: the default model's architecture
# and tokenizer); the rest, the decoder family and MiniLM's real weights included, is the full tier.
DEFAULT_TIER = ("arctic-embed-m",)
TIERED = [n if n in DEFAULT_TIER else pytest.param(n, marks=pytest.mark.full) for n in MODELS]
TEXTS = families.TEXTS + [long_text()]  # the long one is cut at max_seq_length

_memo = ModuleMemo()
_get = _memo.get
_clear_memo = _memo.clear_fixture()


@pytest.fixture(scope="module")
def folder(request, tmp_path_factory):
    """``folder(name)``: the model folder, built on first use (a tier that skips a model never
    pays for building it)."""
    root = str(tmp_path_factory.mktemp("ov_families"))
    fixtures = {"minilm": "minilm_path", "tiny_bert_dense": "tiny_bert_dense", "tiny_xlmr": "tiny_xlmr"}

    def get(name: str) -> str:
        if name in fixtures:
            return request.getfixturevalue(fixtures[name])
        return _get(("dir", name), lambda: families.FAMILIES[name](os.path.join(root, name)))

    return get


def spec_of(path: str):
    return _get(("spec", path), lambda: load_spec(ModelSettings(model=path)))


def ov_engine(path: str, dtype: str) -> OpenVINOEngine:
    def make():
        engine = create_engine(spec_of(path), "openvino", device="cpu", dtype=dtype)
        assert engine.backend == "openvino"  # not a silent fallback to torch
        return engine
    return _get(("ov", path, dtype), make)


def ids_of(path: str, texts) -> list[np.ndarray]:
    tok = _get(("tok", path), lambda: Tokenizer(spec_of(path)))
    batch = tok.encode(list(texts), EncodeOptions())
    return [batch.item(i) for i in range(batch.n)]


def embed(engine, path: str, texts) -> np.ndarray:
    return engine.run(engine.prepare(ids_of(path, texts)))


def st_embed(st_model, path: str, texts) -> np.ndarray:
    return st_model(path).encode(list(texts), convert_to_numpy=True, batch_size=8)


# --- parity, every family -------------------------------------------------------------------------

@pytest.mark.parametrize("name", TIERED)
def test_float32_equals_sentence_transformers(name, folder, st_model):
    path = folder(name)
    engine = ov_engine(path, "float32")
    assert engine.dtype == "float32"
    got = embed(engine, path, TEXTS)
    assert got.shape == (len(TEXTS), spec_of(path).dim) and got.dtype == np.float32
    cos = cosines(got, st_embed(st_model, path, TEXTS))
    assert cos.min() >= FP32_MIN_COS, cos
    # Different texts give clearly different embeddings, so the threshold above can fail (the tiny
    # CLS-pooled BERT + tanh Dense and XLM-R saturate: their texts differ too little for this).
    if name not in ("tiny_bert_dense", "tiny_xlmr"):
        assert cosines(got[:1].repeat(len(TEXTS), 0), got)[1:].max() < 0.999


@pytest.mark.parametrize("name", TIERED)
def test_bfloat16_equals_sentence_transformers(name, folder, st_model):
    path = folder(name)
    engine = ov_engine(path, "bfloat16")
    if cpu_has_fast_bf16():
        assert engine.dtype == "bfloat16"
    cos = cosines(embed(engine, path, TEXTS), st_embed(st_model, path, TEXTS))
    assert cos.min() >= BF16_MIN_COS, cos


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", TIERED)
def test_an_input_in_a_batch_equals_the_same_input_alone(name, dtype, folder):
    path = folder(name)
    engine = ov_engine(path, dtype)
    texts = [long_text(), "a", long_text(37), "hello world", long_text(900), "x y"]
    lengths = [len(x) for x in ids_of(path, texts)]
    assert max(lengths) == spec_of(path).max_seq_length and min(lengths) < 8
    together = embed(engine, path, texts)
    alone = np.concatenate([embed(engine, path, [t]) for t in texts])
    limit = FP32_MIN_COS if dtype == "float32" else BF16_MIN_COS
    assert cosines(together, alone).min() >= limit


@pytest.mark.full
@pytest.mark.parametrize("pooling", ["max", "weightedmean"])
def test_other_pooling_modes_equal_sentence_transformers(pooling, tmp_path_factory, st_model):
    path = tiny_models.build_tiny_bert(os.path.join(tmp_path_factory.mktemp("ov_pool"), pooling),
                                       pooling=pooling, normalize=False, seed=5)
    engine = ov_engine(path, "float32")
    cos = cosines(embed(engine, path, TEXTS), st_embed(st_model, path, TEXTS))
    assert cos.min() >= FP32_MIN_COS, cos


# --- the converted-model cache --------------------------------------------------------------------

def test_second_start_converts_nothing_and_imports_no_torch(tiny_bert, tmp_path):
    cache = str(tmp_path / "cache")
    spec = load_spec(ModelSettings(model=tiny_bert))
    first = OpenVINOEngine(spec, dtype="float32", cache_dir=cache)
    assert first.converted
    graph = os.path.join(openvino_dir(cache), cache_key(spec))
    assert first.model_dir == graph
    assert {"model.xml", "model.bin", "floe.json"} <= set(os.listdir(graph))
    assert not [n for n in os.listdir(openvino_dir(cache)) if n.startswith(".")]  # no temp left
    ids = ids_of(tiny_bert, TEXTS)
    want = first.run(first.prepare(ids))

    second = OpenVINOEngine(spec, dtype="float32", cache_dir=cache)
    assert not second.converted
    # Compiled from the cached IR rather than the in-memory graph: same numbers up to rounding.
    np.testing.assert_allclose(second.run(second.prepare(ids)), want, rtol=1e-5, atol=1e-6)

    # A new process with the cache: auto picks OpenVINO, logs why, and never imports torch.
    code = (
        "import json, logging, sys\n"
        "logging.basicConfig(level=logging.INFO, stream=sys.stderr)\n"
        "from floe.config import ModelSettings\n"
        "from floe.engine import create_engine\n"
        "from floe.models import load_spec\n"
        f"e = create_engine(load_spec(ModelSettings(model={tiny_bert!r})), 'auto', device='cpu')\n"
        "print(json.dumps({'backend': e.backend, 'converted': e.converted,\n"
        "                  'torch': 'torch' in sys.modules, 'transformers': 'transformers' in sys.modules}))\n"
    )
    env = dict(os.environ, FLOE_ENGINE_CACHE_DIR=cache)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {
        "backend": "openvino", "converted": False, "torch": False, "transformers": False}
    assert "engine: openvino (auto: CPU, and OpenVINO conversion is verified for bert)" in out.stderr


@pytest.mark.full  # two fresh processes importing torch and converting: a minute and a half
def test_replicas_starting_together_convert_once(tiny_bert, tmp_path):
    cache = str(tmp_path / "cache")
    code = (
        "import json\n"
        "from floe.config import ModelSettings\n"
        "from floe.engine.openvino_engine import OpenVINOEngine\n"
        "from floe.models import load_spec\n"
        f"e = OpenVINOEngine(load_spec(ModelSettings(model={tiny_bert!r})), dtype='float32', "
        f"cache_dir={cache!r}, threads=1)\n"
        "print(json.dumps({'converted': e.converted, 'out': e.run(e.prepare([[101, 7592, 102]])).tolist()}))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(r["converted"] for r in results) == [False, True]
    np.testing.assert_allclose(results[0]["out"], results[1]["out"], rtol=1e-5, atol=1e-6)
    assert len([n for n in os.listdir(openvino_dir(cache)) if not n.endswith((".lock", "compiled"))]) == 1


# --- fallback and `floe info` ---------------------------------------------------------------------

def test_every_verified_architecture_is_tested_and_no_other(folder):
    from floe.engine.choice import OPENVINO_MODEL_TYPES

    assert {spec_of(folder(n)).model_type for n in MODELS} == OPENVINO_MODEL_TYPES


@pytest.mark.parametrize("name", ["embeddinggemma"])
def test_a_model_that_does_not_convert_falls_back_to_torch(name, folder, tmp_path, caplog,
                                                          monkeypatch):
    from floe.engine import openvino_engine

    def fails(*args, **kwargs):
        raise openvino_engine.ConversionError("openvino.convert_model failed: (a stand-in)")

    monkeypatch.setattr(openvino_engine, "convert", fails)
    spec = load_spec(ModelSettings(model=folder(name)))
    cache = str(tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="floe.engine"):
        engine = create_engine(spec, "openvino", device="cpu", dtype="float32", cache_dir=cache)
    assert engine.backend == "torch"
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning and "falling back to the torch engine" in warning[-1].getMessage()
    assert os.path.isfile(os.path.join(openvino_dir(cache), cache_key(spec) + ".failed"))
    # The torch engine it fell back to serves the model.
    out = engine.run(engine.prepare(ids_of(folder(name), ["hello world"])))
    assert out.shape == (1, spec.dim) and np.isfinite(out).all()


@pytest.mark.full  # three `floe info` processes; the choice itself is tests/unit/test_engine_choice.py
def test_floe_info_names_the_engine(tiny_bert, tmp_path):
    cache = str(tmp_path / "cache")
    env = dict(os.environ, FLOE_ENGINE_CACHE_DIR=cache)
    env.pop("FLOE_ENGINE", None)  # the default (auto), not the tests' torch (tests/conftest.py)

    def info(*flags: str) -> dict:
        out = subprocess.run([sys.executable, "-m", "floe", "info", tiny_bert, "--json", *flags],
                             env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout)

    before = info("--device", "cpu")
    assert before["engine"] == "openvino" and "verified" in before["engine_reason"]
    assert before["engine_cache"].startswith("converted at first start")
    OpenVINOEngine(load_spec(ModelSettings(model=tiny_bert)), dtype="float32", cache_dir=cache)
    assert info("--device", "cpu")["engine_cache"].startswith("converted graph cached in")
    torch_info = info("--device", "cpu", "--engine", "torch")
    assert torch_info["engine"] == "torch" and "engine_cache" not in torch_info


def test_qwen3_bf16_keeps_far_positions(folder):
    """Qwen3's rotations come from a float32 table (openvino_convert._float32_rotation): computed
    in the graph at the bf16 hint, position x frequency is not exact above 256 and a long input
    drifted (this tiny Qwen3: cosine 0.993 at 300 tokens, 0.964 at 700). OpenVINO bf16 against
    the torch engine's float32 (itself checked against sentence-transformers above), past the
    fixture's 128 tokens."""
    spec = load_spec(ModelSettings(model=folder("qwen3-embedding"), max_seq_length=800))
    ov = create_engine(spec, "openvino", device="cpu", dtype="bfloat16")
    assert ov.backend == "openvino"
    ref = create_engine(spec, "torch", device="cpu", dtype="float32")
    rng = np.random.default_rng(7)
    ids = [rng.integers(5, spec.vocab_size - 1, n).astype(np.int32) for n in (800, 700, 300, 60)]
    cos = cosines(ov.run(ov.prepare(ids)), ref.run(ref.prepare(ids)))
    assert cos.min() >= BF16_MIN_COS, cos


# --- the graph's tailoring (openvino_convert.tailored) --------------------------------------------

@pytest.mark.parametrize("mode", ["cls", "last_token", "mean", "mean_sqrt_len_tokens"])
def test_pooling_as_a_matmul_equals_the_pooling(mode):
    import torch

    from floe.engine.torch_engine import Prepared
    from floe.kinds.embed import pool

    lengths = torch.tensor([7, 1, 4])
    mask = (torch.arange(7).unsqueeze(0) < lengths.unsqueeze(1)).to(torch.int64)
    hidden = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(0))
    batch = Prepared(torch.zeros(3, 7, dtype=torch.int64), mask, lengths, uniform=False)
    want = pool(mode, hidden, batch)
    got = pool(mode, hidden, batch, as_matmul=True)
    assert torch.allclose(got, want, atol=1e-6), (got - want).abs().max()


def test_folding_the_query_scale_keeps_the_output(folder):
    import torch

    from floe.engine.openvino_convert import fold_query_scale
    from floe.engine.torch_engine import TorchEngine

    path = folder("arctic-embed-m")
    engine = TorchEngine(spec_of(path), device="cpu", dtype="float32", unpad=False)
    batch = engine.prepare(ids_of(path, TEXTS[:4]))
    want = engine.run(batch)
    layers = engine.model.config.num_hidden_layers
    assert fold_query_scale(engine.model) == layers
    assert all(m.scaling == 1.0 for m in engine.model.modules() if hasattr(m, "query"))
    np.testing.assert_allclose(engine.run(batch), want, rtol=1e-5, atol=1e-6)
    assert fold_query_scale(engine.model) == 0   # folded once only
    with torch.no_grad():
        engine.model.encoder.layer[0].attention.self.query.weight.mul_(2.0)
    assert np.abs(engine.run(batch) - want).max() > 1e-3   # the check can fail


def _attention_inputs(length: int, mask_kind: str, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(3, 2, length, 8, generator=g) for _ in range(3))
    lengths = torch.tensor([length, max(1, length - 5), 1])
    keep = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1))[:, None, None, :]
    mask = {"none": None, "bool": keep,
            "float": torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)}[mask_kind]
    return q, k, v, mask


@pytest.mark.parametrize("mask_kind", ["bool", "float", "none"])
@pytest.mark.parametrize("length", [1, 15, 16, 17, 33])
def test_aligned_keys_attention_equals_sdpa(mask_kind, length):
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from floe.engine.aligned_keys import aligned_attention

    module = torch.nn.Module()
    module.is_causal = False
    q, k, v, mask = _attention_inputs(length, mask_kind)
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    got, _ = aligned_attention(module, q, k, v, mask, scaling=0.3)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-6), (got - want).abs().max()
    if length % 16:   # the padded keys must be masked: unmasked zero keys change the output
        pad = 16 - length % 16
        zeros = k.new_zeros(3, 2, pad, 8)
        unmasked, _ = sdpa_attention_forward(module, q, torch.cat([k, zeros], 2),
                                             torch.cat([v, zeros], 2), None, scaling=0.3)
        assert not torch.allclose(unmasked, want, atol=1e-3)


def test_aligned_keys_leave_causal_attention_alone():
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from floe.engine.aligned_keys import aligned_attention

    module = torch.nn.Module()
    module.is_causal = True
    q, k, v, _ = _attention_inputs(17, "none")
    want, _ = sdpa_attention_forward(module, q, k, v, None)
    got, _ = aligned_attention(module, q, k, v, None)
    assert torch.equal(got, want)


def test_aligning_the_keys_keeps_the_output(folder):
    from floe.engine import aligned_keys
    from floe.engine.torch_engine import TorchEngine

    path = folder("arctic-embed-m")
    engine = TorchEngine(spec_of(path), device="cpu", dtype="float32", unpad=False)
    batch = engine.prepare(ids_of(path, TEXTS[:4]))   # padded rows of several lengths
    want = engine.run(batch)
    assert aligned_keys.install(engine.model)
    assert engine.model.config._attn_implementation == aligned_keys.IMPLEMENTATION
    np.testing.assert_allclose(engine.run(batch), want, rtol=1e-5, atol=1e-6)
    eager = TorchEngine(spec_of(path), device="cpu", dtype="float32", unpad=False)
    eager.model.config._attn_implementation = "eager"
    assert not aligned_keys.install(eager.model)   # only a model on SDPA attention


def test_converted_graph_aligns_its_keys(folder):
    """Each layer's keys and values reach the attention through a concatenation with zeros."""
    path = folder("arctic-embed-m")
    engine = ov_engine(path, "float32")
    with open(os.path.join(spec_of(path).backbone_path, "config.json"), encoding="utf-8") as f:
        layers = json.load(f)["num_hidden_layers"]
    model = engine._core.read_model(os.path.join(engine.model_dir, "model.xml"))
    cats = [op for op in model.get_ordered_ops()
            if op.get_type_name() == "Concat" and "attention" in op.get_friendly_name()
            and "aten::cat" in op.get_friendly_name()]
    # keys and values: (batch, heads, length, head dim), the head dim static; the masks' (the
    # converter may share one between layers) end in the dynamic key length
    kv = [op for op in cats if op.get_output_partial_shape(0)[3].is_static]
    assert len(kv) == 2 * layers, [op.get_friendly_name() for op in cats]
    assert len(cats) > len(kv)   # and the mask is widened to match


@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="the bf16 hint needs a bf16 CPU")
def test_bf16_graph_runs_its_residual_stream_in_bf16(folder):
    """With pooling as a matmul, the CPU plugin's float32 tail ends at the pooling: the layer
    norms and residual adds run in bf16, and no pass multiplies the keys by the scale."""
    engine = ov_engine(folder("arctic-embed-m"), "bfloat16")
    ops = [(op.get_rt_info()["layerType"].astype(str),
            op.get_rt_info()["runtimePrecision"].astype(str),
            op.get_rt_info()["originalLayersNames"].astype(str))
           for op in engine._compiled.get_runtime_model().get_ordered_ops()]
    norms = [prec for kind, prec, _ in ops if kind == "MVN"]
    assert norms and set(norms) == {"bf16"}, norms
    residual = [prec for kind, prec, names in ops if kind == "Eltwise" and "output/aten::add" in names]
    assert residual and set(residual) == {"bf16"}, residual
    # the attention decomposition's own scale multiply (a float node named Multiply_<n>): gone
    # (integer ones compute the aligned keys' padding from the length)
    assert not [names for kind, prec, names in ops
                if kind == "Eltwise" and names.startswith("Multiply_") and prec in ("bf16", "f32")]


# A child process: a crash of OpenVINO's compile is then a failed test, not a dead test run.
_ONE_THREAD_BF16 = """
import json, sys
import numpy as np
from floe.config import ModelSettings
from floe.engine import openvino_convert
from floe.engine.openvino_engine import OpenVINOEngine
from floe.models import load_spec
if sys.argv[2] == "merged":   # as on a CPU with AMX, whatever this one is
    openvino_convert.merges_gate_up = lambda flags=None: True
engine = OpenVINOEngine(load_spec(ModelSettings(model=sys.argv[1])), dtype="bfloat16", threads=1)
out = engine.run(engine.prepare([np.arange(5, 45, dtype=np.int32), np.arange(5, 9, dtype=np.int32)]))
names = [op.get_friendly_name() for op in engine._core.read_model(
    engine.model_dir + "/model.xml").get_ordered_ops() if op.get_type_name() == "MatMul"]
print(json.dumps({"finite": bool(np.isfinite(out).all()), "matmuls": names}))
"""


@pytest.mark.parametrize("form", ["this-cpu", "merged"])
@pytest.mark.parametrize("name", ["embeddinggemma", pytest.param("qwen3", marks=pytest.mark.full)])
def test_a_gated_mlp_runs_on_one_thread_in_bf16(tmp_path, name, form):
    # On a CPU with AMX in bf16, OpenVINO fuses a gated MLP's separate gate and up projections
    # into its LLM MLP kernel, which dies of SIGFPE on one thread (a replica's); there the
    # conversion gives them one matmul (openvino_convert.merge_gate_up), elsewhere it keeps the
    # faster separate form. "merged" forces the AMX form on any CPU, so its conversion (checked
    # against float32) and its run are tested everywhere. embeddinggemma's hidden 96 /
    # intermediate 128 and the tiny Qwen3's 64 / 128 are sizes OpenVINO fuses.
    model = (families.build_embeddinggemma(str(tmp_path / name), hidden=96, intermediate=128)
             if name == "embeddinggemma" else families.build_qwen3_embedding(str(tmp_path / name)))
    done = subprocess.run([sys.executable, "-c", _ONE_THREAD_BF16, model, form], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["finite"]
    mlp = [n for n in result["matmuls"] if ".mlp." in n]
    layers = 6 if name == "embeddinggemma" else 2
    if form == "merged" or cpu_has_amx():
        assert len(mlp) == 2 * layers and sum(".gate_up" in n for n in mlp) == layers, mlp
        assert not any("gate_proj" in n or "up_proj" in n for n in mlp), mlp
    else:
        assert len(mlp) == 3 * layers and not any(".gate_up" in n for n in mlp), mlp
        assert sum("gate_proj" in n for n in mlp) == sum("up_proj" in n for n in mlp) == layers, mlp
