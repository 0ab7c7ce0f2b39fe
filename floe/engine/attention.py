"""floe's own forward for backbones with sliding-window layers (embeddinggemma, ModernBERT).

transformers builds these models' masks with vmapped mask functions that neither trace (OpenVINO's
converter fails on them) nor cost what they should (a dense n x n mask per layer type, and a
sliding layer that computes every key only to mask most of them). Both models' forwards accept
the masks already made, as a dict keyed by layer type, and call their attention through
transformers' attention interface. floe uses both doors:

* ``WindowedForward`` builds the masks from ``attention_mask`` with plain tensor ops (an arange
  derived from the mask itself, a comparison, a broadcast), so the same code runs eagerly in the
  torch engine and traces into the OpenVINO graph. Full layers get a key-padding mask (n, 1, 1, L)
  (or none for a batch without padding); sliding layers get the band |i - j| <= radius on top of
  it, as an (n, 1, L, L) mask, only when the input is longer than the band.
* On inputs longer than ``Window.span`` (floe/engine/window.py) the sliding layers run
  ``banded_attention`` instead: query blocks of ``Window.block`` tokens, each against the
  ``span`` keys around it, gathered by index, so a sliding layer costs n x span, not n^2. Full
  layers stay as they are. The choice is made from the batch's padded length (static for a traced
  graph: the OpenVINO engine converts one graph per path).

Every query also sees itself: a padded position far from the real tokens would otherwise have no
key at all (a softmax over nothing is NaN, and NaN x 0 survives the pooling mask). Real tokens
always see themselves anyway, so their output is unchanged.

Registered as the attention implementation ``floe_windowed``: sliding layers take the banded path
when the forward asks for it, everything else goes to transformers' own SDPA function.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from floe.engine.window import Window, window_of

IMPLEMENTATION = "floe_windowed"


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """0..L-1 (int64) from the mask's own shape, with tensor ops only (traces as dynamic)."""
    return torch.cumsum(torch.ones_like(attention_mask[0], dtype=torch.int64), 0) - 1


def key_mask(valid: torch.Tensor) -> torch.Tensor:
    """(n, 1, 1, L) bool: the real keys of each row (what a bidirectional full layer needs)."""
    return valid[:, None, None, :]


def band_mask(valid: torch.Tensor, radius: int) -> torch.Tensor:
    """(n, 1, L, L) bool: key real and |i - j| <= radius, or i == j."""
    pos = positions(valid)
    dist = (pos[:, None] - pos[None, :]).abs()
    keep = (dist <= radius)[None] & valid[:, None, :]
    return (keep | (dist == 0)[None])[:, None]


class BandPlan:
    """Where the banded path reads and writes, for one batch: built once per forward from the
    mask and shared by every sliding layer (the index tensors and the band mask do not depend on
    the layer).

    Query block k covers positions [qs_k, qs_k + block), qs_k = min(k x block, L - block) (the
    last block overlaps its neighbour rather than running past the end); its keys are the span
    [ks_k, ks_k + span), ks_k = qs_k - radius clamped inside [0, L - span], which holds every key
    within the radius of every query of the block. Requires L > window.span.
    """

    def __init__(self, valid: torch.Tensor, window: Window) -> None:
        block, span, radius = window.block, window.span, window.radius
        pos = positions(valid)
        length = pos[-1:] + 1                                              # (1,)
        qs = torch.minimum(pos[::block], length - block)                   # (nb,)
        ks = torch.minimum(torch.clamp(qs - radius, min=0), length - span)
        q_pos = qs[:, None] + torch.arange(block, device=pos.device)       # (nb, block)
        k_pos = ks[:, None] + torch.arange(span, device=pos.device)        # (nb, span)
        dist = (q_pos[:, :, None] - k_pos[:, None, :]).abs()                # (nb, block, span)
        n = valid.shape[0]
        keep = (dist <= radius)[None] & valid.index_select(1, k_pos.reshape(-1)).reshape(n, -1, 1, span)
        self.window = window
        self.q_index = q_pos.reshape(-1)
        self.k_index = k_pos.reshape(-1)
        self.keep = keep | (dist == 0)[None]                                # (n, nb, block, span)
        blk = torch.minimum(pos // block, (length - 1) // block)          # (L,)
        self.rows = blk * block + pos - qs.index_select(0, blk)            # each position's row
        self._grouped: dict[int, torch.Tensor] = {}

    def keep_for(self, group: int) -> torch.Tensor:
        """The mask for ``group`` query heads stacked per KV head: (n * nb, 1, group * block, span)."""
        if group not in self._grouped:
            block, span = self.window.block, self.window.span
            keep = self.keep[:, :, None].expand(-1, -1, group, -1, -1)
            self._grouped[group] = keep.reshape(-1, 1, group * block, span)
        return self._grouped[group]


def banded_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: BandPlan,
                     scaling: Optional[float]) -> torch.Tensor:
    """Bidirectional local attention computed on the band only (``BandPlan``'s blocks).

    query (n, heads, L, d); key, value (n, kv_heads, L, d) (grouped-query heads share their keys:
    the group's queries are stacked into one block, no keys repeated). Returns (n, L, heads, d),
    as transformers' attention functions do.
    """
    n, heads, _, d = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    block, span = plan.window.block, plan.window.span
    # (n, heads, nb * block, d) -> (n * nb, kv_heads, group * block, d)
    qb = query.index_select(2, plan.q_index).reshape(n, kv_heads, group, -1, block, d)
    qb = qb.permute(0, 3, 1, 2, 4, 5).reshape(-1, kv_heads, group * block, d)

    def gather_keys(x: torch.Tensor) -> torch.Tensor:  # -> (n * nb, kv_heads, span, d)
        x = x.index_select(2, plan.k_index).reshape(n, kv_heads, -1, span, d)
        return x.permute(0, 2, 1, 3, 4).reshape(-1, kv_heads, span, d)

    out = F.scaled_dot_product_attention(qb, gather_keys(key), gather_keys(value),
                                         attn_mask=plan.keep_for(group), scale=scaling)
    # (n * nb, kv_heads, group * block, d) -> (n, heads, nb * block, d) -> each position's row
    out = out.reshape(n, -1, kv_heads, group, block, d).permute(0, 2, 3, 1, 4, 5)
    out = out.reshape(n, heads, -1, d)
    return out.index_select(2, plan.rows).transpose(1, 2)


def windowed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                       value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                       dropout: float = 0.0, scaling: Optional[float] = None,
                       floe_band: Optional[BandPlan] = None,
                       **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The ``floe_windowed`` attention implementation (transformers' interface signature)."""
    if floe_band is not None and getattr(module, "sliding_window", None):
        return banded_attention(query, key, value, floe_band, scaling), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


class RotaryTable(torch.nn.Module):
    """The model's rotary embedding as a table of cos and sin per position and layer type,
    computed once in float32 by the model's own rotary module, then gathered by position.

    In a graph run at bf16 (OpenVINO's precision hint applies to every float op) the angle
    position x frequency would be computed in bf16, where integers above 256 are not exact: a long
    input's far positions would get the wrong rotation (measured on the embeddinggemma-300m shape:
    cosine to float32 0.9989 at 1,285 tokens). The table is what torch computes (float32 angles,
    cos and sin cast to the activations' dtype), so the torch engine's numbers do not change.

    ``layer_types``: the model's (its rotary module takes the layer type, as gemma3's and
    ModernBERT's do), or None for a model with one rotation for every layer (Qwen3's).
    """

    def __init__(self, rotary: torch.nn.Module, max_positions: int,
                 layer_types: Optional[Sequence[str]] = None) -> None:
        super().__init__()
        self.layer_types = sorted(set(layer_types)) if layer_types is not None else None
        device = next(iter(rotary.buffers())).device
        positions = torch.arange(max_positions, device=device)[None]
        x = torch.zeros(1, device=device, dtype=torch.float32)
        with torch.no_grad():
            for layer_type in self.layer_types or [None]:
                cos, sin = rotary(x, positions) if layer_type is None else rotary(x, positions, layer_type)
                self.register_buffer(f"{layer_type or 'all'}_cos", cos[0].float(), persistent=False)
                self.register_buffer(f"{layer_type or 'all'}_sin", sin[0].float(), persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor,
                layer_type: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
        cos = getattr(self, f"{layer_type or 'all'}_cos")[position_ids]
        sin = getattr(self, f"{layer_type or 'all'}_sin")[position_ids]
        return cos.to(x.dtype), sin.to(x.dtype)


class WindowedForward:
    """Runs a gemma3_text / ModernBERT backbone (AutoModel) with floe's masks and attention.

    Called as ``forward(input_ids, attention_mask, uniform)``; returns the model's output object.
    ``uniform``: no row is padded (full layers then run unmasked).
    """

    def __init__(self, model: torch.nn.Module, window: Window) -> None:
        from transformers import AttentionInterface

        AttentionInterface.register(IMPLEMENTATION, windowed_attention)
        model.config._attn_implementation = IMPLEMENTATION
        config = model.config
        model.rotary_emb = RotaryTable(model.rotary_emb, int(config.max_position_embeddings),
                                       config.layer_types)
        self.model = model
        self.window = window

    def masks(self, attention_mask: torch.Tensor, uniform: bool = False) -> tuple[dict, dict]:
        """(the per-layer-type mask dict, extra keyword arguments for the layers)."""
        valid = attention_mask.bool()
        length = attention_mask.shape[1]
        full = None if uniform else key_mask(valid)
        if self.window.banded(length):
            return ({"full_attention": full, "sliding_attention": full},
                    {"floe_band": BandPlan(valid, self.window)})
        sliding = full if length <= self.window.radius + 1 else band_mask(valid, self.window.radius)
        return {"full_attention": full, "sliding_attention": sliding}, {}

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 uniform: bool = False) -> Any:
        masks, extra = self.masks(attention_mask, uniform)
        return self.model(input_ids=input_ids, attention_mask=masks, **extra)


def windowed_forward(model: torch.nn.Module, backbone_path: str) -> Optional[WindowedForward]:
    """floe's forward for ``model`` when its config has local layers floe implements, else None."""
    window = window_of(backbone_path)
    return None if window is None else WindowedForward(model, window)
