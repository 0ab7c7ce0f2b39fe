"""Compact embedding output: int8, uint8, binary and ubinary, as sentence-transformers'
``quantize_embeddings`` defines them, packed in the front end from a replica's float32 rows.

- **int8 / uint8**: each dimension scaled into 256 buckets between a per-dimension start and end
  (``ranges``: row 0 the minimum, row 1 the maximum), ``floor((x - start) / step)`` clipped to
  0..255, then minus 128 for int8. The ranges are the server's, not the request's: a request's own
  minimum and maximum would give the same text different codes in different requests. They come
  from ``calibrate`` on the calibration texts (a fixed set shipped with floe, see
  ``CALIBRATION_TEXTS``), once per model and dimension count, and /info states them.
- **binary / ubinary**: the sign bit of each dimension (``x > 0``), 8 dimensions per byte,
  most significant bit first (``np.packbits``); binary is the packed byte minus 128 as int8.

Search libraries read these directly: FAISS binary indexes and usearch take ubinary / binary,
and int8 is what Cohere's and Infinity's int8 embeddings carry.
"""

from __future__ import annotations

import numpy as np

from floe.protocol import COMPACT_DTYPES

# How many calibration texts set the int8 / uint8 ranges (stdlib docstring paragraphs,
# floe/textsets.py: real prose of many lengths, available offline everywhere Python is).
CALIBRATION_TEXTS = 1000


def ranges_of(embeddings: np.ndarray) -> np.ndarray:
    """The (2, dim) per-dimension [min; max] of calibration embeddings (quantize_embeddings'
    own rule for ``calibration_embeddings``)."""
    arr = np.asarray(embeddings, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[0] < 2:
        raise ValueError("calibration needs at least two embeddings")
    return np.vstack((arr.min(axis=0), arr.max(axis=0))).astype(np.float32)


def quantize(embeddings: np.ndarray, dtype: str, ranges: np.ndarray | None = None) -> np.ndarray:
    """(n, dim) float32 -> the compact form: (n, dim) int8/uint8 or (n, ceil(dim / 8)) packed."""
    if dtype not in COMPACT_DTYPES:
        raise ValueError(f"{dtype!r} is not a compact dtype ({', '.join(COMPACT_DTYPES)})")
    x = np.asarray(embeddings, dtype=np.float32)
    if dtype == "ubinary":
        return np.packbits(x > 0, axis=-1)
    if dtype == "binary":
        return (np.packbits(x > 0, axis=-1).astype(np.int16) - 128).astype(np.int8)
    if ranges is None or ranges.shape != (2, x.shape[1]):
        raise ValueError(f"{dtype} needs (2, {x.shape[1]}) ranges")
    starts = ranges[0].astype(np.float32)
    steps = (ranges[1].astype(np.float32) - starts) / 255
    steps = np.where(steps == 0, 1, steps)
    buckets = np.clip(np.floor((x - starts) / steps), 0, 255)
    if dtype == "uint8":
        return buckets.astype(np.uint8)
    return (buckets - 128).astype(np.int8)
