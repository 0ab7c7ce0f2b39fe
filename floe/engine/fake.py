"""A deterministic stand-in for the torch engine, for fast API, client, CLI and load tests.

Each token id maps to a fixed pseudo-random vector (seeded by the id); an input's embedding is the
position-weighted mean of its tokens' vectors. So the output depends only on the input's own ids
(an input inside a batch equals the same input alone), different texts give different vectors,
and nothing loads torch. ``seconds_per_token`` (env FLOE_FAKE_SECONDS_PER_TOKEN) simulates
compute time so that batching, back-pressure and failover can be exercised under load.

The token vectors span a small subspace (a ``_RANK``-wide table times one fixed projection), so
the mean is taken over ``_RANK`` values per token and projected once per batch: the stand-in for
a device that takes microseconds per input must not cost more per input than the rest of the
server.

The other tasks go through the same table: a cross-encoder's (n, num_labels) scores are that mean
projected onto num_labels columns, with a pair's type-1 tokens (``type_splits``, where the spec
has token types) looked up at other rows, so the split matters as it does to a real BERT; a
SPLADE row is non-zero only at the input's own token ids (vocabulary-folded), each with a fixed
positive weight per id, max-pooled: non-negative, sparse, and as cheap as the embedding.
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional, Sequence

import numpy as np

from floe.engine.base import Engine
from floe.kinds import kind_of
from floe.models.spec import ModelSpec

_TABLE_ROWS = 4096  # ids are folded onto a fixed table so memory stays small for any vocabulary
_RANK = 32          # width of the token table; the projection widens it to the model's dim
_TYPE_OFFSET = 1_000_003  # added to a pair's type-1 ids (before folding onto the table)


class FakeEngine(Engine):
    backend = "fake"

    def __init__(self, spec: ModelSpec, seconds_per_token: float = 0.0,
                 seconds_per_batch: float = 0.0, crash_token_id: Optional[int] = None) -> None:
        """``crash_token_id``: a batch holding it ends the process (``os._exit``), the way an
        input that breaks a kernel takes its replica down."""
        self.spec = spec
        self.crash_token_id = crash_token_id
        self.dtype = "float32"
        self.device = "cpu"
        self.seconds_per_token = seconds_per_token
        self.seconds_per_batch = seconds_per_batch
        rng = np.random.default_rng(1234)
        self._table = rng.standard_normal((_TABLE_ROWS, _RANK)).astype(np.float32)
        # rows over the vocabulary (a SPLADE model's kind keeps them sparse): ids' own columns
        self._sparse = kind_of(spec).keeps_sparse_rows
        if not self._sparse:  # a vocabulary-wide projection would be the largest thing here
            self._projection = rng.standard_normal((_RANK, spec.dim)).astype(np.float32)

    def prepare(self, sequences: Sequence[np.ndarray], type_splits: Optional[np.ndarray] = None,
                spans: Optional[Sequence[np.ndarray]] = None) -> Any:
        seqs = [np.asarray(s, dtype=np.int64) for s in sequences]
        if spans is not None:
            return _Spans(seqs, [np.asarray(b, dtype=np.int64).reshape(-1, 2) for b in spans])
        if type_splits is not None and self.spec.uses_token_types:
            # type-1 tokens read other table rows (new arrays: the caller's ids stay as they are)
            seqs = [np.concatenate([s[:int(k)], s[int(k):] + _TYPE_OFFSET])
                    for s, k in zip(seqs, type_splits)]
        return seqs

    def run(self, prepared: Any) -> np.ndarray:
        if isinstance(prepared, _Spans):
            return self._run_spans(prepared)
        if self.crash_token_id is not None and any((s == self.crash_token_id).any() for s in prepared):
            os._exit(70)
        seqs: list[np.ndarray] = prepared
        padded = max((len(s) for s in seqs), default=0) * len(seqs)
        delay = self.seconds_per_batch + self.seconds_per_token * padded
        if delay > 0:
            time.sleep(delay)
        out = np.zeros((len(seqs), self.spec.dim), dtype=np.float32)
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        used = lengths > 0
        if not used.any():
            return out
        # one gather, one segmented sum and one projection for the whole batch
        ids = np.concatenate([s for s in seqs if len(s)])
        starts = np.zeros(int(used.sum()), dtype=np.int64)
        np.cumsum(lengths[used][:-1], out=starts[1:])
        if self._sparse:
            rows = np.repeat(np.flatnonzero(used), lengths[used])
            weights = np.log1p(np.abs(self._table[(ids * 2654435761) % _TABLE_ROWS, 0]) + 0.1)
            np.maximum.at(out, (rows, ids % self.spec.dim), weights)
            return out
        # position in its own sequence, so that token order matters, like a real encoder
        pos = np.arange(ids.shape[0], dtype=np.int64) - np.repeat(starts, lengths[used])
        weights = (1.0 / (1.0 + pos.astype(np.float32)))[:, None]
        rows = self._table[(ids * 2654435761) % _TABLE_ROWS] * weights
        means = np.add.reduceat(rows, starts, axis=0) / np.add.reduceat(weights, starts, axis=0)
        # einsum, not @: BLAS picks its kernel by the row count, so a row's value would depend on
        # the batch it came in; einsum sums each row the same way whatever the batch
        out[used] = np.einsum("ir,rd->id", means, self._projection)
        return out

    def _run_spans(self, prepared: "_Spans") -> np.ndarray:
        """Late chunking: each span's rows pooled as a whole input's are, from token vectors that
        also carry the whole sequence's mean (the stand-in for attention: a chunk's embedding
        depends on its document). A span covering its whole sequence equals the plain embedding
        of that sequence."""
        out = []
        for seq, bounds in zip(prepared.seqs, prepared.spans):
            whole = self.run([seq])[0]
            for a, b in bounds:
                if a == 0 and b == len(seq):
                    out.append(whole)
                else:
                    part = self.run([seq[a:b]])[0]
                    out.append(0.8 * part + 0.2 * whole)
        return np.asarray(out, dtype=np.float32).reshape(-1, self.spec.dim)


class _Spans:
    """A late-chunking batch of the fake engine: the sequences and their spans."""

    def __init__(self, seqs: list, spans: list) -> None:
        self.seqs = seqs
        self.spans = spans
