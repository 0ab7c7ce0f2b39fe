"""The FLOPs a model's forward really has, for the roofline the benchmarks quote (share of the
CPU's matmul peak). Read from the backbone's config.json; no torch.

Per token and layer: the Q, K, V and O projections (grouped-query heads give K and V fewer
columns), the MLP (three matrices for a gated one: gate, up, down; two otherwise), and attention
(scores and the weighted sum: 4 x keys x heads x head_dim). ``keys`` is the input's length on a
full-attention layer and the band on a sliding-window layer: the mean number of keys within the
radius, clipped at the sequence's ends (floe/engine/window.py ``Window.band_keys``). That is the
model's own work whatever the engine computes: blocks that overlap the band count as the engine's
overhead, not as the model's FLOPs. The pooled head (Dense layers, once per input) is left out: it
is under 0.1% of a forward at these sizes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterable, Optional

from floe.engine.window import Window, window_of_config

# model_type values whose MLP is gated (three hidden x intermediate matrices).
_GATED = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text", "modernbert", "qwen2", "qwen3",
                    "llama", "mistral"})


@dataclass(frozen=True)
class Shapes:
    hidden: int
    intermediate: int
    layers: int
    q_dim: int              # heads x head_dim
    kv_dim: int             # kv_heads x head_dim
    mlp_matrices: int       # 3 gated, 2 plain
    window: Optional[Window]

    def flops_per_token(self, length: float) -> float:
        """Multiply-adds x 2 of one token of an input of ``length`` tokens, all layers."""
        h = self.hidden
        dense = 2 * (h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h
                     + self.mlp_matrices * h * self.intermediate)
        total = 0.0
        for i in range(self.layers):
            sliding = self.window is not None and i < len(self.window.sliding) and self.window.sliding[i]
            keys = self.window.band_keys(int(length)) if sliding else float(length)
            total += dense + 4 * keys * self.q_dim
        return total

    def flops(self, lengths: Iterable[int]) -> float:
        """FLOPs of the forwards of inputs of these lengths (each attends to itself only)."""
        return sum(n * self.flops_per_token(n) for n in lengths)


def shapes_of_config(config: dict) -> Shapes:
    window = window_of_config(config)
    config = config.get("text_config", config)
    hidden = int(config["hidden_size"])
    heads = int(config.get("num_attention_heads") or 1)
    head_dim = int(config.get("head_dim") or hidden // heads)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    return Shapes(hidden=hidden, intermediate=int(config.get("intermediate_size") or 4 * hidden),
                  layers=int(config["num_hidden_layers"]), q_dim=heads * head_dim,
                  kv_dim=kv_heads * head_dim,
                  mlp_matrices=3 if config.get("model_type") in _GATED else 2, window=window)


def model_shapes(backbone_path: str) -> Shapes:
    with open(os.path.join(backbone_path, "config.json"), encoding="utf-8") as f:
        return shapes_of_config(json.load(f))
