"""The device/dtype picker (hardware injected) and the engine factory."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from floe.config import ModelSettings
from floe.engine import create_engine
from floe.engine.fake import FakeEngine
from floe.engine.torch_engine import cpu_has_fast_bf16, pick_device_and_dtype
from floe.errors import ConfigError
from floe.models import load_spec

AMX = {"avx512f", "amx_bf16", "amx_tile"}
ZEN4 = {"avx512f", "avx512_bf16"}
OLD = {"avx2", "fma"}


@pytest.fixture(scope="module")
def spec():
    return load_spec(ModelSettings())


@pytest.fixture(scope="module")
def gemma_like(spec):
    return dataclasses.replace(spec, model_type="gemma3_text", refuse_float16=True)


def test_cpu_bf16_detection():
    assert cpu_has_fast_bf16(AMX) and cpu_has_fast_bf16(ZEN4) and not cpu_has_fast_bf16(OLD)


@pytest.mark.parametrize("flags,expected", [(AMX, "bfloat16"), (ZEN4, "bfloat16"), (OLD, "float32")])
def test_auto_on_cpu(spec, flags, expected):
    assert pick_device_and_dtype("auto", "auto", spec, cuda_available=False, flags=flags) == ("cpu", expected)


def test_explicit_dtypes_on_cpu_are_honoured(spec):
    assert pick_device_and_dtype("cpu", "float32", spec, flags=AMX) == ("cpu", "float32")
    assert pick_device_and_dtype("cpu", "bfloat16", spec, flags=OLD) == ("cpu", "bfloat16")  # slow, logged


@pytest.mark.parametrize("cap,expected", [((9, 0), "bfloat16"), ((8, 0), "bfloat16"), ((7, 5), "float16")])
def test_auto_on_gpu(spec, cap, expected):
    assert pick_device_and_dtype("auto", "auto", spec, cuda_available=True, cuda_capability=cap) == \
        ("cuda:0", expected)


def test_fp16_refusing_model_gets_fp32_on_old_gpus_and_refuses_explicit_fp16(gemma_like):
    assert pick_device_and_dtype("cuda", "auto", gemma_like, cuda_available=True,
                                 cuda_capability=(7, 5)) == ("cuda:0", "float32")
    with pytest.raises(ConfigError, match="float16 is refused"):
        pick_device_and_dtype("cuda", "float16", gemma_like, cuda_available=True, cuda_capability=(9, 0))


def test_impossible_requests_are_config_errors(spec):
    with pytest.raises(ConfigError, match="no CUDA device"):
        pick_device_and_dtype("cuda", "auto", spec, cuda_available=False)
    with pytest.raises(ConfigError, match="--dtype"):
        pick_device_and_dtype("cpu", "int8", spec, cuda_available=False)
    with pytest.raises(ConfigError, match="--device"):
        pick_device_and_dtype("tpu", "auto", spec, cuda_available=False)


def test_factory_kinds(spec):
    assert isinstance(create_engine(spec, "fake"), FakeEngine)
    with pytest.raises(ConfigError, match="unknown engine"):
        create_engine(spec, "onnx")


def test_fake_engine_path_never_imports_torch():
    code = ("import sys\n"
            "from floe.config import ModelSettings\n"
            "from floe.models import load_spec\n"
            "from floe.engine import create_engine\n"
            "e = create_engine(load_spec(ModelSettings()), 'fake')\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_fake_engine_row_does_not_depend_on_its_batch(spec):
    # the API and failover tests compare merged, split and retried answers bit for bit with the
    # same input embedded alone: the stand-in must give exactly that, whatever the batch size
    import numpy as np

    engine = FakeEngine(spec)
    rng = np.random.default_rng(7)
    seqs = [rng.integers(0, 30000, size=int(n)) for n in rng.integers(1, 40, size=300)]
    alone = np.stack([engine.run(engine.prepare([s]))[0] for s in seqs])
    for size in (2, 3, 17, 64, 300):
        for start in (0, 300 - size):
            got = engine.run(engine.prepare(seqs[start:start + size]))
            np.testing.assert_array_equal(got, alone[start:start + size])
