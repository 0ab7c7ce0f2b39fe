"""Engine choice (``--engine auto|torch|openvino|fake``) and the converted-model cache key.

The machine is injected (GPU present or not, openvino installed or not, CPU flags), so these run
in milliseconds and import neither torch nor openvino.
"""

from __future__ import annotations

import os
import sys
import subprocess

import pytest

from floe.engine.choice import OPENVINO_MODEL_TYPES, choose_engine
from floe.engine import openvino_convert
from floe.engine.openvino_convert import cache_key, cached_state, default_cache_dir, openvino_dir
from floe.engine.openvino_engine import pick_precision
from floe.errors import ConfigError
from floe.models.spec import DenseSpec, ModelSpec

VERSIONS = {"openvino": "2026.4.1", "transformers": "5.23.0", "torch": "2.13.0"}
AMX = {"avx512f", "amx_bf16", "amx_tile", "avx512_bf16"}
ZEN = {"avx512f", "avx512_bf16"}
OLD = {"avx2", "fma"}


def make_spec(folder: str, model_type: str = "bert", pooling: str = "mean", **kw) -> ModelSpec:
    return ModelSpec(path=folder, name="m", architecture="BertModel", model_type=model_type,
                     hidden_size=8, dim=8, max_seq_length=16, vocab_size=100, pooling=pooling, **kw)


@pytest.fixture
def folder(tmp_path) -> str:
    d = tmp_path / "model"
    (d / "1_Pooling").mkdir(parents=True)
    (d / "config.json").write_text('{"model_type": "bert"}')
    (d / "model.safetensors").write_bytes(b"\0" * 64)
    (d / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    return str(d)


def no_gpu() -> bool:
    return False


def with_gpu() -> bool:
    return True


def installed() -> bool:
    return True


def not_installed() -> bool:
    return False


# --- choice ---------------------------------------------------------------------------------------

def choose(kind, spec, device="auto", dtype="auto", gpu=no_gpu, have=installed):
    return choose_engine(kind, spec, device, dtype, gpu=gpu, have_openvino=have)


def test_auto_picks_openvino_on_cpu_for_verified_architectures(folder):
    for model_type in sorted(OPENVINO_MODEL_TYPES):
        choice = choose("auto", make_spec(folder, model_type))
        assert choice.kind == "openvino", model_type
        assert model_type in choice.reason
    assert choose("auto", make_spec(folder), device="cpu", gpu=with_gpu).kind == "openvino"


def test_auto_keeps_torch_on_gpus_for_float16_and_for_unverified_architectures(folder):
    spec = make_spec(folder)
    gpu = choose("auto", spec, gpu=with_gpu)
    assert gpu.kind == "torch" and "GPU" in gpu.reason
    assert choose("auto", spec, device="cuda", gpu=with_gpu).kind == "torch"
    fp16 = choose("auto", spec, dtype="float16")
    assert fp16.kind == "torch" and "float16" in fp16.reason
    other = choose("auto", make_spec(folder, "t5"))
    assert other.kind == "torch" and "'t5'" in other.reason and "not verified" in other.reason
    missing = choose("auto", spec, have=not_installed)
    assert missing.kind == "torch" and "not installed" in missing.reason


def test_explicit_kinds(folder):
    spec = make_spec(folder, "t5")
    assert choose("torch", spec, gpu=with_gpu).kind == "torch"
    assert choose("fake", spec).kind == "fake"
    assert choose("openvino", spec, device="cpu").kind == "openvino"  # asked for: tried anyway
    with pytest.raises(ConfigError, match="runs on the CPU"):
        choose("openvino", spec, device="cuda", gpu=with_gpu)
    with pytest.raises(ConfigError, match="runs on the CPU"):
        choose("openvino", spec, gpu=with_gpu)
    with pytest.raises(ConfigError, match="bfloat16 or float32"):
        choose("openvino", spec, dtype="float16")
    with pytest.raises(ConfigError, match="needs the openvino package"):
        choose("openvino", spec, have=not_installed)
    with pytest.raises(ConfigError, match="unknown engine 'onnx'"):
        choose("onnx", spec)


def test_precision_follows_cpu_flags():
    assert pick_precision("auto", AMX) == "bfloat16"
    assert pick_precision("auto", ZEN) == "bfloat16"
    assert pick_precision("auto", OLD) == "float32"
    assert pick_precision("float32", AMX) == "float32"
    assert pick_precision("bfloat16", OLD) == "bfloat16"  # asked for: honoured (with a warning)
    with pytest.raises(ConfigError, match="float16"):
        pick_precision("float16", AMX)


def test_settings_accept_every_engine_kind():
    from floe.config import settings_from

    for kind in ("auto", "torch", "openvino", "fake"):
        assert settings_from(env={"FLOE_ENGINE": kind}).replicas.engine == kind
    assert settings_from(env={}).replicas.engine == "auto"
    s = settings_from(env={"FLOE_ENGINE_CACHE_DIR": "/somewhere"})
    assert s.replicas.engine_cache_dir == "/somewhere"
    with pytest.raises(ConfigError):
        settings_from(env={"FLOE_ENGINE": "onnx"})


# --- cache directory and key ----------------------------------------------------------------------

def test_default_cache_dir_precedence():
    assert default_cache_dir({"FLOE_ENGINE_CACHE_DIR": "/a", "XDG_CACHE_HOME": "/b"}) == "/a"
    assert default_cache_dir({"XDG_CACHE_HOME": "/b"}) == os.path.join("/b", "floe")
    assert default_cache_dir({}) == os.path.join(os.path.expanduser("~"), ".cache", "floe")


def test_cache_key_is_stable_and_follows_files_options_and_versions(folder):
    spec = make_spec(folder)
    key = cache_key(spec, VERSIONS)
    assert key == cache_key(make_spec(folder), VERSIONS) and len(key) == 32
    assert cache_key(make_spec(folder, pooling="cls"), VERSIONS) != key
    assert cache_key(make_spec(folder, pad_token_id=1), VERSIONS) != key
    dense = DenseSpec(path=os.path.join(folder, "1_Pooling"), in_features=8, out_features=4)
    assert cache_key(make_spec(folder, dense=(dense,)), VERSIONS) != key
    assert cache_key(spec, {**VERSIONS, "openvino": "2026.5.0"}) != key
    assert cache_key(spec, {**VERSIONS, "transformers": "5.24.0"}) != key
    with pytest.MonkeyPatch.context() as patch:   # the graph with gate and up merged (AMX) is another
        merged = not openvino_convert.merges_gate_up()
        patch.setattr(openvino_convert, "merges_gate_up", lambda flags=None: merged)
        assert cache_key(spec, VERSIONS) != key

    weights = os.path.join(folder, "model.safetensors")
    st = os.stat(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched
    touched = cache_key(spec, VERSIONS)
    assert touched != key
    with open(weights, "ab") as f:  # new weights, new size
        f.write(b"\1")
    grown = cache_key(spec, VERSIONS)
    assert grown not in (key, touched)
    with open(os.path.join(folder, "1_Pooling", "extra.json"), "w") as f:  # a file in a module folder
        f.write("{}")
    assert cache_key(spec, VERSIONS) not in (key, touched, grown)


def test_cached_state_sees_a_converted_graph_and_a_recorded_failure(folder, tmp_path):
    spec = make_spec(folder)
    cache = str(tmp_path / "cache")
    root = openvino_dir(cache)
    state, where = cached_state(spec, cache)
    assert state == "absent"
    os.makedirs(where)
    with open(os.path.join(where, "model.xml"), "w") as f:
        f.write("<net/>")
    assert cached_state(spec, cache) == ("converted", where)
    os.remove(os.path.join(where, "model.xml"))
    with open(where + ".failed", "w") as f:
        f.write("openvino.convert_model failed: boom\n")
    assert cached_state(spec, cache) == ("failed", "openvino.convert_model failed: boom")
    assert os.path.dirname(where) == root


def test_choosing_an_engine_imports_neither_torch_nor_openvino():
    code = ("import sys\n"
            "from floe.engine.choice import choose_engine\n"
            "from floe.engine.openvino_convert import cache_key\n"
            "from floe.models.spec import ModelSpec\n"
            "s = ModelSpec(path='.', name='m', architecture='BertModel', model_type='bert', hidden_size=8,"
            " dim=8, max_seq_length=8, vocab_size=10, pooling='mean')\n"
            "choose_engine('auto', s, 'cpu', 'auto')\n"
            "assert 'torch' not in sys.modules and 'openvino' not in sys.modules, "
            "[m for m in sys.modules if m in ('torch', 'openvino')]\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
