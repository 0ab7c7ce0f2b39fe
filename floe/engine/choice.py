"""Which backend runs a model: ``--engine auto|torch|openvino|fake`` resolved against the device,
the dtype and the model's architecture.

``auto`` picks OpenVINO on CPU for the architectures whose conversion has been verified against
sentence-transformers (``OPENVINO_MODEL_TYPES``; tests/integration/test_openvino_engine.py checks
each), and torch everywhere else: on GPUs, for float16, for any other architecture. The choice
never imports torch when no GPU driver is present (a CPU machine), so a replica that runs a cached
OpenVINO model does not pay for importing torch at all.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Optional

from floe.errors import ConfigError
from floe.kinds import kind_of
from floe.kinds.embed import EMBED
from floe.models.spec import ModelSpec

# config.json model_types whose OpenVINO conversion is verified, per model kind: each kind declares
# its own (floe/kinds/: ``Kind.openvino_model_types``, with the test that checks each), and
# --dtype int8's (``Kind.int8_model_types``: its quality gate runs at first start; the
# sliding-window families' banded graph is not quantized yet).
OPENVINO_MODEL_TYPES = EMBED.openvino_model_types   # the embedding models'
INT8_MODEL_TYPES = EMBED.int8_model_types

KINDS = ("auto", "torch", "openvino", "fake")
INT8_NEEDS_OPENVINO = ("--dtype int8 runs on the OpenVINO engine on a CPU (--engine openvino, or "
                       "auto on a CPU)")

# Device nodes a GPU driver creates (NVIDIA CUDA, AMD ROCm). Without any of them no GPU can be
# used, which settles "auto" without importing torch.
_GPU_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd")


@dataclass(frozen=True)
class EngineChoice:
    kind: str     # "torch" | "openvino" | "fake"
    reason: str   # one line for the log and for `floe info`


def gpu_available() -> bool:
    """True when torch can use a GPU here; imports torch only where a GPU driver is present."""
    if not any(os.path.exists(p) for p in _GPU_NODES):
        return False
    import torch

    return bool(torch.cuda.is_available())


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def choose_engine(kind: str, spec: ModelSpec, device: str = "auto", dtype: str = "auto", *,
                  gpu: Optional[Callable[[], bool]] = None,
                  have_openvino: Optional[Callable[[], bool]] = None) -> EngineChoice:
    """Resolves ``kind`` for ``spec`` on ``device`` at ``dtype``.

    ``gpu`` and ``have_openvino`` stand in for the machine in tests. Raises ConfigError for an
    unknown kind and for ``openvino`` where it cannot run (a GPU device, float16).
    """
    gpu = gpu_available if gpu is None else gpu
    have_openvino = openvino_installed if have_openvino is None else have_openvino
    if kind not in KINDS:
        raise ConfigError(f"unknown engine {kind!r} (expected one of {', '.join(KINDS)})")
    model_kind = kind_of(spec)   # the model's request kind (floe/kinds/), not the engine kind
    int8 = INT8_NEEDS_OPENVINO
    if kind == "torch" and dtype == "int8":
        raise ConfigError(int8 + "; the torch engine runs float32, bfloat16 and float16")
    if kind in ("torch", "fake"):
        return EngineChoice(kind, f"--engine {kind}")
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise ConfigError(f"--device {device!r} is not one of auto, cpu, cuda")
    on_cpu = device == "cpu" or (device == "auto" and not gpu())
    if kind == "openvino":
        if not on_cpu:
            raise ConfigError(f"--engine openvino runs on the CPU; use --device cpu or --engine torch "
                              f"for --device {device}")
        if dtype == "float16":
            raise ConfigError("--engine openvino runs bfloat16 or float32 on the CPU; "
                              "use --dtype bfloat16, float32 or auto")
        if not have_openvino():
            raise ConfigError("--engine openvino needs the openvino package (pip install openvino)")
        return EngineChoice("openvino", "--engine openvino")
    if dtype == "int8":
        if not on_cpu:
            raise ConfigError(int8 + f"; --device {device} runs torch (use --dtype bfloat16)")
        if spec.model_type not in model_kind.int8_model_types:
            raise ConfigError(int8 + f", for the embedding architectures it is verified for "
                              f"({', '.join(sorted(INT8_MODEL_TYPES))}); not for this "
                              f"{spec.model_type} {model_kind.name} model")
        if not have_openvino():
            raise ConfigError("--dtype int8 needs the openvino package (pip install openvino)")
        return EngineChoice("openvino", "auto: --dtype int8 runs on the OpenVINO engine")
    if not on_cpu:
        return EngineChoice("torch", "auto: a GPU is present, and GPUs run the torch engine")
    if dtype == "float16":
        return EngineChoice("torch", "auto: float16 on the CPU is run by the torch engine only")
    verified = model_kind.openvino_model_types
    if spec.model_type not in verified:
        what = "" if model_kind is EMBED else f" {model_kind.name}"
        return EngineChoice("torch", f"auto: OpenVINO conversion is not verified for{what} model_type "
                                     f"{spec.model_type!r} (verified: "
                                     f"{', '.join(sorted(verified))})")
    if not have_openvino():
        return EngineChoice("torch", "auto: the openvino package is not installed")
    return EngineChoice("openvino", f"auto: CPU, and OpenVINO conversion is verified for "
                                    f"{spec.model_type}")
