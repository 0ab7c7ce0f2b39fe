"""Attention whose keys come in whole blocks: a graph tailoring for OpenVINO's CPU attention kernel.

OpenVINO's CPU plugin runs an encoder's attention as one fused kernel (MatMul-Softmax-MatMul,
its MHA "Subgraph"). That kernel is markedly slower when the number of keys is not a multiple of
16: all-MiniLM, bf16, one thread, AMD Zen 4, per-node counters, 16 rows x 120 tokens: 6.4 ms per
layer, against 4.8 ms at 16 x 128, more tokens. Padding the keys and values with zero rows to
the next multiple of 16, masked, runs the 120-token batch's attention in 4.3 ms, and the keys'
transpose that the plugin otherwise leaves outside the kernel becomes a cheaper one (0.6-0.75 ->
2 x 0.15 ms per layer at 2,000 tokens). The padding is a concatenation with zeros of the
missing length, not a Pad: OpenVINO's (reference) Pad took 0.28 ms per tensor and layer at 16 x
128, where nothing is missing, the concatenation 0.05-0.08. The result is the same function: a
masked key adds exp(-inf) = 0 to the softmax.

``install(model)`` points a transformers backbone whose layers call the attention interface
(BERT, RoBERTa, XLM-RoBERTa ...) at ``aligned_attention``; the OpenVINO converter does so before it
traces (floe/engine/openvino_convert.py ``tailored``), and checks that the float32 output did not
move. Causal layers (decoders) are passed through unchanged. Queries keep their length, so the
dense layers never see the padding. floe's own windowed forward (embeddinggemma's 256-dimension
heads, ModernBERT's 64) does not take it: timed at neighbouring lengths, those graphs showed no
such loss (within 1.5%, docs/benchmarks.md section 12).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

IMPLEMENTATION = "floe_aligned_keys"
KEY_MULTIPLE = 16
# scripts/bench_engines.py's ``openvino-unaligned`` turns it off to convert the graph without it
# (into a cache of its own: the cache key does not name it), for the A/B of docs/benchmarks.md
ENABLED = True


def _padded_mask(mask: Optional[torch.Tensor], length: Any, pad: Any,
                 like: torch.Tensor) -> torch.Tensor:
    """``mask`` (boolean keep, or additive float) widened by ``pad`` masked keys; without a mask,
    one that keeps the ``length`` real keys."""
    if mask is None:
        keep = torch.arange(length + pad, device=like.device) < length
        return keep.view(1, 1, 1, -1)
    shape = (*mask.shape[:-1], pad)
    if mask.dtype == torch.bool:
        extra = mask.new_zeros(shape)
    else:
        extra = mask.new_full(shape, torch.finfo(mask.dtype).min)
    return torch.cat([mask, extra], dim=-1)


def aligned_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                      **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """transformers' SDPA attention (query, key, value: (batch, heads, length, head dim)) with the
    keys and values padded to a multiple of ``KEY_MULTIPLE`` by masked zero rows."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = kwargs.get("is_causal")
    if causal or (causal is None and getattr(module, "is_causal", False)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    length = key.shape[2]  # traced: the padding follows each batch's length in the graph
    pad = (length + KEY_MULTIPLE - 1) // KEY_MULTIPLE * KEY_MULTIPLE - length
    zeros = key.new_zeros(key.shape[0], key.shape[1], pad, key.shape[3])
    key = torch.cat([key, zeros], dim=2)
    value = torch.cat([value, zeros.to(value.dtype)], dim=2)
    mask = _padded_mask(attention_mask, length, pad, key)
    return sdpa_attention_forward(module, query, key, value, mask, is_causal=False,
                                  **{k: v for k, v in kwargs.items() if k != "is_causal"})


def install(model: torch.nn.Module) -> bool:
    """Makes ``model`` (a transformers backbone on SDPA attention) run ``aligned_attention``, with
    the masks SDPA's would get. False, and nothing changed, for a model on another attention."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    config = getattr(model, "config", None)
    if not ENABLED or config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(IMPLEMENTATION, aligned_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    config._attn_implementation = IMPLEMENTATION
    return True
