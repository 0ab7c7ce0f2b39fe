"""The torch engine's forward for BERT-family encoders that spends its dense layers on real tokens.

A padded batch of mixed lengths wastes the pad rows' share of every linear layer, and the linear
layers are most of an encoder's time. This forward keeps the hidden states packed, one row per
real token (T x hidden), through the embeddings' output, the Q/K/V, output and feed-forward
layers and their layer norms, all of which work row by row. Only attention needs the rows of one
input together: before it, Q, K and V are gathered into the padded (n, heads, L, d) layout (a pad
slot reads any real row; the key mask hides it and its own output is dropped), and its output is
gathered back to packed rows. The kind's head gets the padded (n, L, hidden) states back, zero at
the pads.

Where it pays: with the GPU's batching (a 16,384-token budget, no fill floor) a batch of mixed
lengths is often half padding; with the CPU's fill floor of 0.95 there is little left to win, and
the two gathers per layer cost about what they save (docs/benchmarks.md section 12). The
OpenVINO graph keeps the padded forward for that reason: its converter traces
``TorchEngine(unpad=False)``.

The packing indices are made on the host when a batch is prepared (``pack_indices``), so the
forward needs no device-to-host sync to learn T.

Families: transformers' ``bert``, ``roberta`` and ``xlm-roberta`` encoders (MiniLM, BGE,
snowflake-arctic-embed-m, e5, multilingual-e5, bge-m3): their layers share one structure, and
``unpadded_forward`` checks that structure rather than trusting the name. Their own embeddings
module runs on the padded ids (position ids from the pad id for RoBERTa-likes stay exactly
transformers' own) and its output is packed.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

FAMILIES = ("bert", "roberta", "xlm-roberta")


def pack_indices(attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, slots) for a right-padded (n, L) mask: ``rows`` (T,) are the flat positions
    (i * L + j) of the real tokens in order, and ``slots`` (n * L,) give each padded position
    the packed row it reads (its own for a real token; row 0 for a pad, which attention masks)."""
    flat = attention_mask.reshape(-1) > 0
    rows = np.flatnonzero(flat).astype(np.int64)
    slots = np.where(flat, np.cumsum(flat) - 1, 0).astype(np.int64)
    return rows, slots


def _supported(model: Any) -> bool:
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in FAMILIES:
        return False
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return False
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if not layers or getattr(model, "embeddings", None) is None:
        return False
    for layer in layers:
        attention = getattr(layer, "attention", None)
        core = getattr(attention, "self", None)
        if core is None or not all(hasattr(core, a) for a in ("query", "key", "value")):
            return False
        if not hasattr(attention, "output") or not hasattr(layer, "feed_forward_chunk"):
            return False
    return True


class UnpaddedForward:
    """Calls the backbone's own modules on packed rows; see the module docstring."""

    def __init__(self, model: Any) -> None:
        self.model = model
        config = model.config
        self.heads = int(config.num_attention_heads)
        self.head_dim = int(config.hidden_size) // self.heads
        self.hidden = int(config.hidden_size)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 rows: torch.Tensor, slots: torch.Tensor,
                 token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(n, L, hidden) last hidden states of a right-padded batch, zero at the pads."""
        n, length = input_ids.shape
        model = self.model
        kwargs: dict[str, Any] = {"input_ids": input_ids}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        states = model.embeddings(**kwargs).reshape(n * length, self.hidden).index_select(0, rows)
        keys = attention_mask[:, None, None, :].bool()  # (n, 1, 1, L): the real keys of each row

        def padded(x: torch.Tensor) -> torch.Tensor:
            return (x.index_select(0, slots).view(n, length, self.heads, self.head_dim)
                    .transpose(1, 2))

        for layer in model.encoder.layer:
            core = layer.attention.self
            q, k, v = (padded(proj(states)) for proj in (core.query, core.key, core.value))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keys,
                                                 scale=getattr(core, "scaling", None))
            out = out.transpose(1, 2).reshape(n * length, self.hidden).index_select(0, rows)
            states = layer.feed_forward_chunk(layer.attention.output(out, states))
        full = states.new_zeros(n * length, self.hidden)
        return full.index_copy_(0, rows, states).view(n, length, self.hidden)


def unpadded_forward(model: Any) -> Optional[UnpaddedForward]:
    """The packed forward for ``model``, or None when it is not a BERT-family encoder of the
    structure this forward calls into."""
    return UnpaddedForward(model) if _supported(model) else None
