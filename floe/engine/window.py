"""Sliding-window geometry of a backbone, read from its config alone (no torch).

Two families floe serves have local attention on some layers and full attention on the others,
both bidirectional: embeddinggemma (gemma3_text with ``use_bidirectional_attention``, on 5 of
every 6 layers) and ModernBERT (on all but every ``global_attn_every_n_layers``-th layer). In both
the config's window is the band's whole width, centred on the token: a token sees the keys at
distance <= ``sliding_window // 2`` (gemma3: transformers' config turns the 512 of config.json into
an exclusive 257) or ``local_attention // 2`` (ModernBERT). ``Window.radius`` is that distance.

floe runs those layers in its own forward (floe/engine/attention.py). When an input is longer
than ``Window.span``, a sliding layer computes only its band, by blocks: the sequence is cut into
query blocks of ``block`` tokens, and each block attends to the ``span = block + 2 * radius`` keys
around it (the window clamped inside the sequence), so the layer's time and memory grow as
n x span instead of n^2. Shorter inputs take the plain path (one masked attention over all keys),
which costs no more there.

The same geometry tells the OpenVINO engine which of its two graphs runs a batch (plain or banded)
and tells scripts/bench_engines.py how many attention FLOPs a sliding layer really has.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

# Largest query block: big enough for efficient matmuls (head_dim 256 x 128 rows), small enough
# that the key span (block + 2 x radius) stays near the band's own width.
MAX_BLOCK = 128


@dataclass(frozen=True)
class Window:
    radius: int               # a query sees keys at distance <= radius on a sliding layer
    sliding: tuple[bool, ...]  # per layer: True for a sliding (local) layer

    @property
    def block(self) -> int:
        """Query block of the banded path: the radius rounded up to a multiple of 8, at most
        MAX_BLOCK."""
        return min(MAX_BLOCK, max(8, -(-self.radius // 8) * 8))

    @property
    def span(self) -> int:
        """Keys each query block of the banded path attends to."""
        return self.block + 2 * self.radius

    def banded(self, length: int) -> bool:
        """Whether a batch padded to ``length`` runs the banded path on its sliding layers (it
        pays only once the key span is shorter than the input)."""
        return length > self.span

    def band_keys(self, length: int) -> float:
        """Mean keys a query of an input of ``length`` tokens really attends to on a sliding
        layer: the band |i - j| <= radius clipped at both ends (the model's FLOPs, whatever the
        path)."""
        n, r = int(length), self.radius
        if n <= r + 1:
            return float(n)
        outside = (n - r - 1) * (n - r)  # pairs farther apart than r, both orders
        return (n * n - outside) / n

    def computed_keys(self, length: int) -> float:
        """Keys per query the engine computes on a sliding layer (the block span on the banded
        path, every key on the plain one)."""
        return float(self.span if self.banded(length) else length)


def window_of_config(config: dict) -> Optional[Window]:
    """The window of a backbone's config.json contents, or None when it has no local layers (or
    when its local attention is not one floe's forward implements, e.g. a causal gemma3)."""
    config = config.get("text_config", config)
    model_type = config.get("model_type")
    layers = int(config.get("num_hidden_layers") or 0)
    types = config.get("layer_types")
    if model_type == "gemma3_text":
        if not config.get("use_bidirectional_attention"):
            return None
        window = int(config.get("sliding_window") or 0)
        if types is None:
            pattern = int(config.get("sliding_window_pattern") or 6)
            types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                     for i in range(layers)]
        radius = window // 2  # transformers runs |i - j| < window // 2 + 1 (Gemma3TextConfig)
    elif model_type == "modernbert":
        local = int(config.get("local_attention") or 128)
        if types is None:
            every = int(config.get("global_attn_every_n_layers") or 3)
            types = ["sliding_attention" if i % every else "full_attention" for i in range(layers)]
        radius = local // 2
    else:
        return None
    sliding = tuple(t == "sliding_attention" for t in types)
    if radius < 1 or not any(sliding):
        return None
    return Window(radius=radius, sliding=sliding)


def window_of(backbone_path: str) -> Optional[Window]:
    """``window_of_config`` of the config.json in ``backbone_path`` (None if unreadable)."""
    try:
        with open(os.path.join(backbone_path, "config.json"), encoding="utf-8") as f:
            return window_of_config(json.load(f))
    except (OSError, ValueError):
        return None
