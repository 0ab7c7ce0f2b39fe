"""A deterministic stand-in for the torch engine, for fast API, client, CLI and load tests.

Each token id maps to a fixed pseudo-random vector (seeded by the id); an input's embedding is the
mean of its tokens' vectors. So the output depends only on the input's own ids (an input inside a
batch equals the same input alone), different texts give different vectors, and nothing loads
torch. ``seconds_per_token`` (env FLOE_FAKE_SECONDS_PER_TOKEN) simulates compute time so that
batching, back-pressure and failover can be exercised under load.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from floe.engine.base import Engine
from floe.models.spec import ModelSpec

_TABLE_ROWS = 4096  # ids are folded onto a fixed table so memory stays small for any vocabulary


class FakeEngine(Engine):
    backend = "fake"

    def __init__(self, spec: ModelSpec, seconds_per_token: float = 0.0,
                 seconds_per_batch: float = 0.0) -> None:
        self.spec = spec
        self.dtype = "float32"
        self.device = "cpu"
        self.seconds_per_token = seconds_per_token
        self.seconds_per_batch = seconds_per_batch
        rng = np.random.default_rng(1234)
        self._table = rng.standard_normal((_TABLE_ROWS, spec.dim)).astype(np.float32)

    def prepare(self, sequences: Sequence[np.ndarray]) -> Any:
        return [np.asarray(s, dtype=np.int64) for s in sequences]

    def run(self, prepared: Any) -> np.ndarray:
        seqs: list[np.ndarray] = prepared
        padded = max((len(s) for s in seqs), default=0) * len(seqs)
        delay = self.seconds_per_batch + self.seconds_per_token * padded
        if delay > 0:
            time.sleep(delay)
        out = np.zeros((len(seqs), self.spec.dim), dtype=np.float32)
        for i, s in enumerate(seqs):
            if len(s):
                rows = self._table[(s * 2654435761) % _TABLE_ROWS]
                # position-sensitive so that token order matters, like a real encoder
                weights = 1.0 / (1.0 + np.arange(len(s), dtype=np.float32))[:, None]
                out[i] = (rows * weights).sum(axis=0) / weights.sum()
        return out
