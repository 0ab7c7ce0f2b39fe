"""Model runners. ``create_engine`` picks one (``choice.choose_engine``); each backend is imported
only when asked for, so the fake engine (API, client and load tests) never pays for importing
torch, and the OpenVINO engine with a cached graph does not either."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional

from floe.engine.base import Engine
from floe.engine.choice import EngineChoice, choose_engine
from floe.models.spec import ModelSpec

__all__ = ["Engine", "EngineChoice", "choose_engine", "create_engine", "engine_for"]

if TYPE_CHECKING:
    from floe.config import ReplicaSetSettings

log = logging.getLogger(__name__)


def create_engine(spec: ModelSpec, kind: str = "auto", device: str = "auto", dtype: str = "auto",
                  threads: Optional[int] = None, cache_dir: Optional[str] = None,
                  share_cores: bool = False, packing: bool = False,
                  native_attention: bool = False) -> Engine:
    """Builds the engine for ``spec``: "auto", "torch", "openvino" or "fake".

    ``auto`` logs which backend it picked and why. When OpenVINO cannot convert the model (or the
    conversion differs from the torch model), the replica falls back to torch with a WARNING.
    ``cache_dir`` holds converted models (default: ``openvino_convert.default_cache_dir()``).
    ``share_cores``: other engines run in this process too, so none may pin its threads to cores.
    ``packing``: let the engine pack short inputs into shared rows where it can
    (floe/engine/packing.py; OpenVINO only). ``native_attention``: run attention on floe's own
    kernel where it applies (floe/engine/native/; OpenVINO only).

    Raises ConfigError for an unknown kind or an impossible device/dtype, ModelLoadError when the
    weights cannot be loaded.
    """
    choice = choose_engine(kind, spec, device, dtype)
    if kind == "auto":
        log.info("engine: %s (%s)", choice.kind, choice.reason)
    if choice.kind == "fake":
        from floe.engine.fake import FakeEngine

        return FakeEngine(spec)
    if choice.kind == "openvino":
        from floe.engine.openvino_convert import ConversionError
        from floe.engine.openvino_engine import OpenVINOEngine

        try:
            return OpenVINOEngine(spec, dtype=dtype, threads=threads, cache_dir=cache_dir,
                                  pin_threads=not share_cores, packing=packing,
                                  native_attention=native_attention)
        except ConversionError as exc:
            log.warning("engine: OpenVINO cannot run %s (%s): falling back to the torch engine",
                        spec.name, exc)
    from floe.engine.torch_engine import TorchEngine

    return TorchEngine(spec, device=device, dtype=dtype, threads=threads)


def engine_for(spec: ModelSpec, replicas: "ReplicaSetSettings", device: str = "auto",
               dtype: str = "auto", threads: Optional[int] = None,
               share_cores: bool = False) -> Engine:
    """The engine a settings section asks for (a replica, an offline job): ``replicas.engine``
    with its ``engine_cache_dir``, and for the fake engine its simulated costs and crash token.
    ``device`` and ``dtype`` are the model section's (an offline job's worker names its GPU)."""
    if replicas.engine == "fake":
        from floe.engine.fake import FakeEngine

        return FakeEngine(spec, seconds_per_token=replicas.fake_seconds_per_token,
                          seconds_per_batch=replicas.fake_seconds_per_batch,
                          crash_token_id=replicas.fake_crash_token_id)
    return create_engine(spec, replicas.engine, device=device, dtype=dtype, threads=threads,
                         cache_dir=replicas.engine_cache_dir, share_cores=share_cores,
                         packing=replicas.packing, native_attention=replicas.native_attention)
