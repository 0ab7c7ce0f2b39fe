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
the gathers around attention cost about what they save (docs/benchmarks.md section 12). The
OpenVINO graph keeps the padded forward for that reason: its converter traces
``TorchEngine(unpad=False)``.

The packing indices are made on the host when a batch is prepared (``pack_indices``), so the
forward needs no device-to-host sync to learn T.

On a GPU in half precision, where torch has it (``torch.nn.attention.varlen``: Flash Attention's
variable-length kernel), attention runs packed too, from the inputs' cumulative lengths: no pad
is computed anywhere. The first batch that tries it and fails (a GPU the kernel does not support)
logs why and leaves the padded attention for the rest of the process.

Families: transformers' ``bert``, ``roberta`` and ``xlm-roberta`` encoders (MiniLM, BGE,
snowflake-arctic-embed-m, e5, multilingual-e5, bge-m3): their layers share one structure, and
``unpadded_forward`` checks that structure rather than trusting the name. Their own embeddings
module runs on the padded ids (position ids from the pad id for RoBERTa-likes stay exactly
transformers' own) and its output is packed.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from floe.engine.packing import BERT_FAMILIES

log = logging.getLogger(__name__)

FAMILIES = BERT_FAMILIES


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


class _KernelRefused(Exception):
    """The flash kernel itself refused the batch (not a memory error, not another layer's)."""


def _flash_varlen() -> Optional[Callable]:
    """torch's variable-length flash attention (CUDA, fp16/bf16), or None where torch lacks it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


class UnpaddedForward:
    """Calls the backbone's own modules on packed rows; see the module docstring."""

    def __init__(self, model: Any) -> None:
        self.model = model
        config = model.config
        self.heads = int(config.num_attention_heads)
        self.head_dim = int(config.hidden_size) // self.heads
        self.hidden = int(config.hidden_size)
        self.varlen = _flash_varlen()   # dropped for good if it fails once

    def takes_varlen(self, states: torch.Tensor) -> bool:
        return (self.varlen is not None and states.device.type == "cuda"
                and states.dtype in (torch.float16, torch.bfloat16))

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 rows: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor,
                 token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(n, L, hidden) last hidden states of a right-padded batch, zero at the pads;
        ``lengths``: (n,) real tokens per row."""
        n, length = input_ids.shape
        model = self.model
        kwargs: dict[str, Any] = {"input_ids": input_ids}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        states = model.embeddings(**kwargs).reshape(n * length, self.hidden).index_select(0, rows)
        if self.takes_varlen(states):
            starts = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
            try:
                out = self._layers(states, lambda q, k, v, scale: self._varlen_attention(
                    q, k, v, scale, starts, length))
            except _KernelRefused as refused:
                exc = refused.__cause__
                log.warning("packed flash attention failed on %s (%s: %s); padded attention from "
                            "now on", states.device, type(exc).__name__, str(exc)[:200])
                self.varlen = None
            else:
                return self._unpack(out, rows, n, length)
        keys = attention_mask[:, None, None, :].bool()  # (n, 1, 1, L): the real keys of each row

        def padded(x: torch.Tensor) -> torch.Tensor:
            return (x.index_select(0, slots).view(n, length, self.heads, self.head_dim)
                    .transpose(1, 2))

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale) -> torch.Tensor:
            out = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), attn_mask=keys,
                                                 scale=scale)
            return out.transpose(1, 2).reshape(n * length, self.hidden).index_select(0, rows)

        return self._unpack(self._layers(states, attend), rows, n, length)

    def _layers(self, states: torch.Tensor, attend: Callable) -> torch.Tensor:
        """The encoder's layers on packed rows; ``attend(q, k, v, scale)`` maps packed (T, hidden)
        projections to packed attention output."""
        for layer in self.model.encoder.layer:
            core = layer.attention.self
            out = attend(core.query(states), core.key(states), core.value(states),
                         getattr(core, "scaling", None))
            states = layer.feed_forward_chunk(layer.attention.output(out, states))
        return states

    def _varlen_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale,
                          starts: torch.Tensor, longest: int) -> torch.Tensor:
        tokens = q.shape[0]
        shape = (tokens, self.heads, self.head_dim)
        try:
            out = self.varlen(q.view(shape), k.view(shape), v.view(shape), starts, starts,
                              longest, longest, scale=scale)
        except torch.OutOfMemoryError:
            raise   # keeps its kind: the engine's memory handling, not a reason to drop the kernel
        except (RuntimeError, NotImplementedError) as exc:
            raise _KernelRefused() from exc
        return out.reshape(tokens, self.hidden)

    def _unpack(self, states: torch.Tensor, rows: torch.Tensor, n: int, length: int) -> torch.Tensor:
        full = states.new_zeros(n * length, self.hidden)
        return full.index_copy_(0, rows, states).view(n, length, self.hidden)


def unpadded_forward(model: Any) -> Optional[UnpaddedForward]:
    """The packed forward for ``model``, or None when it is not a BERT-family encoder of the
    structure this forward calls into."""
    return UnpaddedForward(model) if _supported(model) else None
