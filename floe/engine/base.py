"""The engine interface: a model runner for one replica.

A replica's batcher thread calls ``prepare`` (ids to device tensors) for batch N+1 while the
engine thread runs ``forward`` (the model and its kind's head) on batch N and the finisher thread
runs ``finish`` (the output to host rows) on batch N-1: three stages, each on its own thread.
Per-request steps (Normalize, Matryoshka slicing, output dtype) are applied by the replica after
``forward``, because one batch mixes requests with different options; a cross-encoder's activation
is applied by the front end (a request may ask for raw scores).

What ``run`` returns depends on the model's kind (floe/kinds/, ``Kind.torch_head``): an embedding
model's pooled and Dense-projected rows, not normalized (one per span for late chunking); a
cross-encoder's logits, (n, num_labels), no activation; SPLADE rows, (n, vocab_size),
non-negative and mostly zero.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from floe.kinds import kind_of
from floe.models.spec import ModelSpec


class Engine(abc.ABC):
    spec: ModelSpec
    dtype: str      # "float32" | "bfloat16" | "float16"
    device: str     # "cpu" | "cuda:0" ...
    backend: str = ""  # "torch" | "openvino" | "fake": what runs the forward pass
    # Whether floe's attention kernel runs, and if not why, in `floe info`'s words (the OpenVINO
    # engine: floe/engine/native/); "" for an engine that has no such choice.
    attention: str = ""
    # The row width's multiple where the engine packs several short inputs into one row of a
    # forward pass (floe/engine/packing.py), None where it only pads. The replica's scheduler
    # forms packed batches for it, priced as the engine will run them.
    packing: Optional[int] = None

    @abc.abstractmethod
    def prepare(self, sequences: Sequence[np.ndarray], type_splits: Optional[np.ndarray] = None,
                spans: Optional[Sequence[np.ndarray]] = None) -> Any:
        """Pads int32 id arrays into whatever ``run`` consumes (or packs them several to a row,
        where the engine has ``packing``: floe/engine/packing.py). Called off the engine thread.

        ``type_splits`` (int array, one per sequence, or None): where token type 1 starts in each
        sequence (a cross-encoder pair's second segment); ``len(sequence)`` when it is all type 0.
        Honoured where ``spec.uses_token_types``; ignored otherwise (those backbones have one type).

        ``spans`` (late chunking; an embedding model): per sequence, a (k, 2) array of [start, end)
        token ranges. ``run`` then returns one row per span, in order (sum of k rows): the
        backbone's token states pooled over the span (``span_weights``), then the Dense layers.
        """

    @abc.abstractmethod
    def run(self, prepared: Any) -> np.ndarray:
        """Returns an (n, spec.dim) float32 array: see the module docstring for each task.
        The forward and finish stages in one call (what the bench and the corpus job use)."""

    def forward(self, prepared: Any) -> Any:
        """The forward pass alone, on the replica's engine thread; its result goes to ``finish``
        on the finisher thread. Default: all of ``run`` (the host rows are ready at once). An
        engine whose output lives on a device returns it there, so that the copy of batch N
        overlaps the forward of batch N+1."""
        return self.run(prepared)

    def finish(self, output: Any) -> np.ndarray:
        """``forward``'s output as (n, spec.dim) float32 host rows (finisher thread)."""
        return output

    def warmup(self, max_batch_tokens: int) -> None:
        """Runs a forward pass at the full token budget so that it is proven to fit at start-up."""

    def memory(self) -> tuple[int, int]:
        """(device bytes used, device bytes total); (0, 0) on CPU."""
        return (0, 0)


def span_weights(spec: ModelSpec, width: int, spans: Sequence[np.ndarray]) -> np.ndarray:
    """(n, most spans, width) float32 pooling weights of late chunking: row (i, j) pools span j of
    sequence i from its token states (rows past a sequence's own spans are zero). The mean for
    mean and CLS models (a CLS position stands for the whole input, not a chunk of it), the
    span's last token for last-token models, 1 / sqrt(length) for mean_sqrt_len_tokens; see
    floe/validate.py LATE_POOLINGS."""
    most = max(len(b) for b in spans)
    w = np.zeros((len(spans), most, width), dtype=np.float32)
    for i, bounds in enumerate(spans):
        for j, (a, b) in enumerate(np.asarray(bounds, dtype=np.int64).reshape(-1, 2)):
            if spec.pooling == "last_token":
                w[i, j, b - 1] = 1.0
            elif spec.pooling == "mean_sqrt_len_tokens":
                w[i, j, a:b] = 1.0 / np.sqrt(b - a)
            else:
                w[i, j, a:b] = 1.0 / (b - a)
    return w


def span_rows(spans: Sequence[np.ndarray]) -> np.ndarray:
    """(n, most spans) bool: which rows of ``span_weights`` are real spans."""
    counts = np.fromiter((len(b) for b in spans), dtype=np.int64, count=len(spans))
    return np.arange(int(counts.max()))[None, :] < counts[:, None]


def head_summary(spec: ModelSpec) -> str:
    """The model's head in a few words, for log lines."""
    return kind_of(spec).summary(spec)


@dataclass(frozen=True)
class Padded:
    """A right-padded batch as int64 host arrays (what the torch and OpenVINO engines feed)."""

    input_ids: np.ndarray                  # (n, longest), padded with the model's pad id
    attention_mask: np.ndarray             # (n, longest), 1 on real tokens
    lengths: np.ndarray                    # (n,)
    token_type_ids: Optional[np.ndarray]   # (n, longest): 1 from the split to the end of the real
                                           # tokens; None when the spec has no token types or no
                                           # splits were given

    @property
    def uniform(self) -> bool:
        """All rows the same length: no padding at all."""
        return bool(self.lengths.min() == self.input_ids.shape[1])


def right_pad(spec: ModelSpec, sequences: Sequence[np.ndarray],
              type_splits: Optional[np.ndarray] = None) -> Padded:
    """Right-pads id arrays with ``spec.pad_token_id``; builds token types from ``type_splits``
    where ``spec.uses_token_types`` (see ``Engine.prepare``)."""
    n = len(sequences)
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=n)
    if n == 0 or lengths.min() <= 0:
        raise ValueError("prepare() needs at least one sequence, each with at least one id")
    width = int(lengths.max())
    ids = np.full((n, width), spec.pad_token_id, dtype=np.int64)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = s
    cols = np.arange(width)[None, :]
    mask = (cols < lengths[:, None]).astype(np.int64)
    types = None
    if type_splits is not None and spec.uses_token_types:
        splits = np.asarray(type_splits, dtype=np.int64)
        if splits.shape != (n,):
            raise ValueError(f"type_splits has shape {splits.shape}, expected ({n},)")
        types = ((cols >= splits[:, None]) & (cols < lengths[:, None])).astype(np.int64)
    return Padded(ids, mask, lengths, types)

