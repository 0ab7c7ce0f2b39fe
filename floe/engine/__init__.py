"""Model runners. ``create_engine`` picks one; the torch backend is imported only when asked for,
so the fake engine (API, client and load tests) never pays for importing torch."""

from __future__ import annotations

from typing import Optional

from floe.engine.base import Engine
from floe.errors import ConfigError
from floe.models.spec import ModelSpec

__all__ = ["Engine", "create_engine"]


def create_engine(spec: ModelSpec, kind: str = "torch", device: str = "auto", dtype: str = "auto",
                  threads: Optional[int] = None) -> Engine:
    """Builds the engine for ``spec``: "torch" (the real model) or "fake" (deterministic stand-in).

    Raises ConfigError for an unknown kind or an impossible device/dtype, ModelLoadError when the
    weights cannot be loaded.
    """
    if kind == "fake":
        from floe.engine.fake import FakeEngine

        return FakeEngine(spec)
    if kind == "torch":
        from floe.engine.torch_engine import TorchEngine

        return TorchEngine(spec, device=device, dtype=dtype, threads=threads)
    raise ConfigError(f"unknown engine {kind!r} (expected torch or fake)")
