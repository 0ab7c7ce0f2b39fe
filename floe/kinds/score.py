"""A cross-encoder's relevance scores (``task: score``): (query, document) pairs -> logits.

Front end: the documents are tokenized as pairs with the query (token types where the backbone
has them); normalize, dimensions and the output dtypes do not apply; the activation the model's
CrossEncoder applies by default (``ModelSpec.score_activation``) is applied here, after the
replica, where a request's ``raw_scores`` is known. Replica: the logits as float32 rows, nothing
per request. Engine: ``*ForSequenceClassification``'s logits, no activation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from floe.kinds.base import Kind
from floe.protocol import EncodeOptions


class ScoreKind(Kind):
    name = "score"
    title = "a reranker (cross-encoder)"
    routes = "/rerank or /v1/rerank"
    route_kinds = ("score",)
    pairs = True
    auto_class = "AutoModelForSequenceClassification"
    model_output = "logits"
    openvino_model_types = frozenset({
        "bert",          # ms-marco-MiniLM cross-encoders (token types)
        "xlm-roberta",   # bge-reranker-base/-large, bge-reranker-v2-m3
    })
    # A probe's logits: |got - want| <= atol + rtol * |want| (a cosine of 1-wide rows only
    # compares signs).
    PROBE_TOLERANCE = {"float32": (1e-3, 1e-3), "bfloat16": (5e-2, 5e-2)}

    def request_options(self, options: EncodeOptions) -> EncodeOptions:
        return dataclasses.replace(options, normalize=False, dimensions=None,
                                   output_dtype="float32")

    def describe(self, spec: Any) -> dict:
        return {"num_labels": spec.num_labels, "score_activation": spec.score_activation}

    def torch_head(self, engine: Any, out: Any, prepared: Any) -> Any:
        return out

    def probe_error(self, got: np.ndarray, want: np.ndarray, float_dtype: str) -> Optional[str]:
        atol, rtol = self.PROBE_TOLERANCE[float_dtype]
        diff = np.abs(got - want)
        if not np.isfinite(got).all() or (diff > atol + rtol * np.abs(want)).any():
            return (f"largest difference {float(np.nan_to_num(diff, nan=np.inf).max()):.6f}; "
                    f"allowed {atol} + {rtol} x |score|")
        return None

    def summary(self, spec: Any) -> str:
        return f"cross-encoder, {spec.num_labels} label(s)"


def activation(name: str, logits: np.ndarray) -> np.ndarray:
    """The torch.nn activation a CrossEncoder applies to its logits (ModelSpec.score_activation)."""
    if name in ("", "Identity"):
        return logits
    if name == "Sigmoid":
        return 0.5 * (1.0 + np.tanh(0.5 * logits))   # = 1 / (1 + e^-x), without overflow
    if name == "Tanh":
        return np.tanh(logits)
    if name == "ReLU":
        return np.maximum(logits, 0)
    if name == "Softmax":
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    raise ValueError(f"unsupported activation {name!r}")


SCORE = ScoreKind()
