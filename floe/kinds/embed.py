"""Dense embeddings (``task: embed``): Pooling -> Dense* -> Normalize, as sentence-transformers.

Front end: every option applies (dimensions, normalize, the float and compact output dtypes,
chunking). Replica: one float32 row per input, or per chunk when late chunking pools spans;
Normalize, the Matryoshka slice (renormalized) and the output dtype are per request, after the
batch. Engine: the backbone's last hidden state pooled as the model's Pooling module says
(mean, CLS, last token, max, mean / sqrt(length), weighted mean; by span for late chunking), then
the Dense layers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from floe.kinds.base import Kind
from floe.protocol import COMPACT_DTYPES, EmbedResult, EncodeOptions, Timings


class EmbedKind(Kind):
    name = "embed"
    title = "an embedding model"
    pools_rows = True
    routes = "/v1/embeddings or /embed"
    route_kinds = ("embed", "encode")
    output_dtypes = ("float32", "float16", "bfloat16", *COMPACT_DTYPES)
    # --dtype int8 (its quality gate runs at first start, on the banded graph too for the
    # sliding-window families): every architecture below
    int8_model_types = frozenset({"bert", "xlm-roberta", "qwen3", "gemma3_text", "modernbert"})
    # config.json model_types whose OpenVINO conversion equals sentence-transformers (cosine
    # >= 0.99999 in f32, >= 0.999 in bf16, batched equals alone): each has a stand-in in
    # tests/fixtures and a parity test in tests/integration/test_openvino_engine.py.
    # gemma3_text and modernbert convert through floe's own forward (floe/engine/attention.py:
    # masks built from attention_mask with plain tensor ops, and a banded graph for inputs longer
    # than the sliding window's key span).
    openvino_model_types = frozenset({
        "bert",          # all-MiniLM, BGE, arctic-embed-m/s, E5, GTE-base ...
        "xlm-roberta",   # bge-m3, multilingual-e5, arctic-embed-l-v2
        "qwen3",         # Qwen3-Embedding
        "gemma3_text",   # embeddinggemma (bidirectional, sliding window on 5 of 6 layers)
        "modernbert",    # ModernBERT, modernbert-embed (alternating local and global attention)
    })

    def graph_key(self, spec: Any) -> None:
        return None

    def finish(self, spec: Any, rows: np.ndarray, options: EncodeOptions,
               token_counts: np.ndarray, request_id: str, timings: Timings) -> EmbedResult:
        normalize = spec.normalize if options.normalize is None else options.normalize
        arr = rows
        if options.dimensions is not None and options.dimensions < arr.shape[1]:
            arr = arr[:, : options.dimensions]
        if normalize:
            norms = np.linalg.norm(arr, axis=1, keepdims=True)
            arr = arr / np.maximum(norms, 1e-12)
        return EmbedResult.from_array(arr, options.output_dtype, token_counts, model=spec.name,
                                      request_id=request_id, timings=timings)

    def torch_head(self, engine: Any, out: Any, prepared: Any) -> Any:
        import torch

        if prepared.span_weights is not None:   # late chunking: a row per span
            pooled = torch.einsum("bsl,blh->bsh", prepared.span_weights, out.float()).to(out.dtype)
            for layer in engine._dense:
                pooled = layer(pooled)
            return pooled[prepared.span_rows]
        pooled = pool(engine.spec.pooling, out, prepared, as_matmul=engine.matmul_pooling)
        for layer in engine._dense:
            pooled = layer(pooled)
        return pooled

    def summary(self, spec: Any) -> str:
        return f"{spec.pooling} pooling, dim {spec.dim}"


def pool(mode: str, hidden: Any, p: Any, as_matmul: bool = False) -> Any:
    """sentence-transformers' Pooling over a right-padded batch's hidden states, in their dtype
    (sums accumulated in float32, as the library does).

    ``as_matmul``: CLS, last token, mean and mean / sqrt(length) as one batched matmul of 0/1
    token weights (n, 1, length) with the hidden states, for the OpenVINO graph
    (floe/engine/openvino_convert.py). Its CPU plugin keeps the nodes between the last matmul and
    the outputs in float32 under the bf16 hint; with the pooling as element-wise ops and sums,
    that tail reaches back through every residual add and layer norm of the backbone, which then
    run in float32 between conversions. A matmul ends the tail there (all-MiniLM, 40 x 50
    tokens, one thread: 2.1% faster)."""
    import torch

    from floe.errors import ModelLoadError

    if as_matmul and mode in ("cls", "last_token", "mean", "mean_sqrt_len_tokens"):
        return _pool_matmul(mode, hidden, p)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "last_token":
        # Right padding: the last real token of row i sits at lengths[i] - 1.
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, p.lengths - 1]
    mask = p.attention_mask.unsqueeze(-1)
    if mode == "max":
        return hidden.masked_fill(mask == 0, float("-inf")).max(dim=1).values
    if mode in ("mean", "mean_sqrt_len_tokens"):
        summed = (hidden * mask.to(hidden.dtype)).sum(dim=1, dtype=torch.float32)
        count = p.lengths.to(torch.float32).clamp(min=1).unsqueeze(-1)
        denom = count if mode == "mean" else count.sqrt()
        return (summed / denom).to(hidden.dtype)
    if mode == "weightedmean":
        weights = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=torch.float32)
        w = mask.to(torch.float32) * weights.view(1, -1, 1)
        summed = (hidden.float() * w).sum(dim=1)
        return (summed / w.sum(dim=1).clamp(min=1e-9)).to(hidden.dtype)
    raise ModelLoadError(f"unsupported pooling mode {mode!r}")


def _pool_matmul(mode: str, hidden: Any, p: Any) -> Any:
    """``pool`` as (n, 1, length) 0/1 token weights @ (n, length, hidden): the weights are exact
    in any float precision, and the division by the length comes after, in float32."""
    import torch

    positions = torch.arange(hidden.shape[1], device=hidden.device)
    if mode == "cls":
        weights = (positions == 0).unsqueeze(0).expand_as(p.attention_mask)
    elif mode == "last_token":
        weights = positions.unsqueeze(0) == (p.lengths - 1).unsqueeze(1)
    else:
        weights = p.attention_mask
    summed = torch.matmul(weights.to(hidden.dtype).unsqueeze(1), hidden).squeeze(1).float()
    if mode in ("mean", "mean_sqrt_len_tokens"):
        count = p.lengths.to(torch.float32).clamp(min=1).unsqueeze(-1)
        summed = summed / (count if mode == "mean" else count.sqrt())
    return summed.to(hidden.dtype)


EMBED = EmbedKind()
