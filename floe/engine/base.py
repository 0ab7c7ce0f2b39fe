"""The engine interface: a model runner for one replica.

A replica's batcher thread calls ``prepare`` (ids to device tensors: the "pre" stage) for batch
N+1 while the engine thread runs ``run`` (forward, pooling, Dense: "core" and "post") on batch N.
Per-request steps (Normalize, Matryoshka slicing, output dtype) are applied by the replica after
``run``, because one batch mixes requests with different options.
"""

from __future__ import annotations

import abc
from typing import Any, Sequence

import numpy as np

from floe.models.spec import ModelSpec


class Engine(abc.ABC):
    spec: ModelSpec
    dtype: str      # "float32" | "bfloat16" | "float16"
    device: str     # "cpu" | "cuda:0" ...
    backend: str = ""  # "torch" | "openvino" | "fake": what runs the forward pass

    @abc.abstractmethod
    def prepare(self, sequences: Sequence[np.ndarray]) -> Any:
        """Pads int32 id arrays into whatever ``run`` consumes. Called off the engine thread."""

    @abc.abstractmethod
    def run(self, prepared: Any) -> np.ndarray:
        """Returns an (n, spec.dim) float32 array: pooled and Dense-projected, not normalized."""

    def warmup(self, max_batch_tokens: int) -> None:
        """Runs a forward pass at the full token budget so that it is proven to fit at start-up."""

    def memory(self) -> tuple[int, int]:
        """(device bytes used, device bytes total); (0, 0) on CPU."""
        return (0, 0)
