"""SPLADE sparse vectors (``task: sparse``): the MLM head's logits pooled by SpladePooling.

Front end: normalize, dimensions and the compact dtypes do not apply (values are float32 over the
vocabulary). Replica: a vocabulary-wide dense row per input would be 120 KB for BERT's 30,522
entries of which SPLADE keeps a few hundred, so each row is kept as its non-zero (index, value)
pairs, one nonzero pass per batch, and cut to the model's ``max_active_dims`` largest
(sentence-transformers' top-k); the answer is one SparseRows. Engine:
``AutoModelForMaskedLM``'s logits, padding zeroed, log1p(relu(x)) (twice for ``log1p_relu``),
max or sum over the tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from floe.errors import ValidationError
from floe.kinds.base import Kind
from floe.protocol import EmbedResult, EncodeOptions, SparseRows, Timings


class SparseKind(Kind):
    name = "sparse"
    title = "a sparse embedding model (SPLADE)"
    routes = "/embed_sparse"
    route_kinds = ("sparse", "encode")
    keeps_sparse_rows = True
    auto_class = "AutoModelForMaskedLM"
    model_output = "logits"
    openvino_model_types = frozenset({"bert"})   # naver/splade-v3, splade-cocondenser (BERT MLM)

    def request_options(self, options: EncodeOptions) -> EncodeOptions:
        if options.output_dtype != "float32" or options.dimensions is not None:
            raise ValidationError("a sparse model's values are float32 and have no "
                                  "dimensions option", param="output_dtype")
        return dataclasses.replace(options, normalize=False)

    def describe(self, spec: Any) -> dict:
        return {"splade": {"pooling": spec.splade_pooling, "activation": spec.splade_activation,
                           "max_active_dims": spec.max_active_dims}}

    def new_rows(self, spec: Any, n_rows: int) -> list:
        return [None] * n_rows

    def batch_rows(self, spec: Any, out: np.ndarray) -> tuple:
        # one nonzero pass for the batch, then each row's slice of it
        nz_rows, nz_cols = np.nonzero(out)
        nz_vals = out[nz_rows, nz_cols]
        nz_off = np.zeros(out.shape[0] + 1, dtype=np.int64)
        np.cumsum(np.bincount(nz_rows, minlength=out.shape[0]), out=nz_off[1:])
        return nz_cols, nz_vals, nz_off

    def store(self, spec: Any, rows: list, batch: tuple, a: int, b: int, at: int) -> None:
        nz_cols, nz_vals, nz_off = batch
        for k in range(b - a):
            lo, hi = nz_off[a + k], nz_off[a + k + 1]
            cols, vals = nz_cols[lo:hi].astype(np.int32), nz_vals[lo:hi]
            top = spec.max_active_dims
            if top and len(vals) > top:   # the model keeps each row's k largest (ST's top-k)
                keep = np.sort(np.argpartition(vals, len(vals) - top)[len(vals) - top:])
                cols, vals = cols[keep], vals[keep]
            rows[at + k] = (cols, vals)

    def finish(self, spec: Any, rows: list, options: EncodeOptions, token_counts: np.ndarray,
               request_id: str, timings: Timings) -> EmbedResult:
        sparse = SparseRows(counts=[len(i) for i, _ in rows],
                            indices=np.concatenate([i for i, _ in rows]),
                            values=np.concatenate([v for _, v in rows]))
        return EmbedResult(n=len(rows), dim=spec.dim, dtype="float32", data=b"",
                           token_counts=token_counts, model=spec.name, request_id=request_id,
                           timings=timings, sparse=sparse)

    def torch_head(self, engine: Any, logits: Any, p: Any) -> Any:
        """sentence-transformers' SpladePooling, in the logits' dtype as it runs: padding zeroed,
        log1p(relu(x)) (twice log1p for "log1p_relu"), then max or sum over the tokens. In place:
        the (n, length, vocab) logits are the largest tensor of the forward."""
        spec = engine.spec
        x = logits.mul_(p.attention_mask.unsqueeze(-1).to(logits.dtype)).relu_().log1p_()
        if spec.splade_activation == "log1p_relu":
            x = x.log1p_()
        return x.amax(dim=1) if spec.splade_pooling == "max" else x.sum(dim=1)

    def summary(self, spec: Any) -> str:
        return f"SPLADE {spec.splade_pooling} pooling, {spec.dim} dims"


SPARSE = SparseKind()
