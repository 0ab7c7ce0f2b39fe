"""Sliding-window geometry (floe/engine/window.py) and the banded attention kernel
(floe/engine/attention.py) against a dense masked reference, on random tensors (no model)."""

from __future__ import annotations

import pytest

from floe.engine.window import MAX_BLOCK, Window, window_of_config

GEMMA_300M = {"model_type": "gemma3_text", "use_bidirectional_attention": True, "sliding_window": 512,
              "num_hidden_layers": 24,
              "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 4}


def test_window_of_the_real_configs():
    gemma = window_of_config(GEMMA_300M)
    # transformers turns config.json's 512 into an exclusive 257: |i - j| <= 256
    assert gemma.radius == 256 and gemma.sliding.count(True) == 20 and len(gemma.sliding) == 24
    assert gemma.block == MAX_BLOCK and gemma.span == 128 + 512
    assert not gemma.banded(640) and gemma.banded(641)
    # the same without layer_types (older config.json files): every 6th layer is full
    no_types = dict(GEMMA_300M, layer_types=None, sliding_window_pattern=6)
    assert window_of_config(no_types).sliding == gemma.sliding
    # ModernBERT: local_attention is the whole width too; every 3rd layer (0, 3, ...) is global
    modernbert = window_of_config({"model_type": "modernbert", "local_attention": 128,
                                   "num_hidden_layers": 22, "global_attn_every_n_layers": 3})
    assert modernbert.radius == 64 and modernbert.block == 64 and modernbert.span == 192
    assert modernbert.sliding[:4] == (False, True, True, False)
    # no local layers, or a causal gemma3: not floe's windowed forward
    assert window_of_config({"model_type": "bert", "num_hidden_layers": 6}) is None
    assert window_of_config(dict(GEMMA_300M, use_bidirectional_attention=False)) is None
    assert window_of_config({"text_config": GEMMA_300M}).radius == 256


@pytest.mark.parametrize("length", [1, 5, 9, 10, 40, 257, 1000])
def test_band_keys_counts_the_band(length):
    w = Window(radius=8, sliding=(True,))
    pairs = sum(1 for i in range(length) for j in range(length) if abs(i - j) <= 8)
    assert w.band_keys(length) == pytest.approx(pairs / length)
    assert w.band_keys(length) <= min(length, 17)


def _reference(q, k, v, valid, radius, scale):
    """Dense attention with the band and key-padding mask (each query also sees itself)."""
    import torch

    n, heads, length, d = q.shape
    k = k.repeat_interleave(heads // k.shape[1], dim=1)
    v = v.repeat_interleave(heads // v.shape[1], dim=1)
    pos = torch.arange(length)
    dist = (pos[:, None] - pos[None, :]).abs()
    keep = ((dist <= radius)[None] & valid[:, None, :]) | (dist == 0)[None]
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=keep[:, None], scale=scale).transpose(1, 2)


@pytest.mark.parametrize("heads,kv_heads", [(3, 1), (4, 4), (4, 2)])
@pytest.mark.parametrize("radius", [4, 8, 13])
def test_banded_attention_equals_the_dense_band(heads, kv_heads, radius):
    import torch

    from floe.engine.attention import BandPlan, banded_attention

    window = Window(radius=radius, sliding=(True,))
    gen = torch.Generator().manual_seed(radius * 10 + heads)
    for length in (window.span + 1, window.span + window.block, 3 * window.span + 5, 101):
        if length <= window.span:
            continue
        lengths = torch.tensor([length, length - 3, 2, max(1, length - window.span - 1)])
        valid = torch.arange(length)[None] < lengths[:, None]
        q = torch.randn(4, heads, length, 16, generator=gen)
        k = torch.randn(4, kv_heads, length, 16, generator=gen)
        v = torch.randn(4, kv_heads, length, 16, generator=gen)
        plan = BandPlan(valid, window)
        got = banded_attention(q, k, v, plan, scaling=0.3)
        want = _reference(q, k, v, valid, radius, 0.3)
        assert got.shape == (4, length, heads, 16)
        assert torch.isfinite(got).all()  # padded positions too: they see themselves
        torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5)
        # a real token's output depends on nothing outside its band: move a far key, nothing moves
        far = k.clone()
        far[0, :, length - 1] += 5.0
        moved = banded_attention(q, far, v, plan, scaling=0.3)
        torch.testing.assert_close(moved[0, : length - 1 - radius], got[0, : length - 1 - radius])
        assert not torch.allclose(moved[0, length - 1], got[0, length - 1])


def test_roofline_counts_the_band_on_sliding_layers():
    from floe.bench.roofline import shapes_of_config

    minilm = shapes_of_config({"model_type": "bert", "hidden_size": 384, "intermediate_size": 1536,
                               "num_hidden_layers": 6, "num_attention_heads": 12})
    for n in (50, 256):  # the plain encoder's count, unchanged
        assert minilm.flops_per_token(n) == 2 * 6 * (4 * 384 * 384 + 2 * 384 * 1536 + 2 * n * 384)
    gemma = shapes_of_config(dict(GEMMA_300M, hidden_size=768, intermediate_size=1152,
                                  num_attention_heads=3, num_key_value_heads=1, head_dim=256))
    dense = 2 * (768 * 768 + 2 * 768 * 256 + 768 * 768 + 3 * 768 * 1152)
    full = 24 * (dense + 4 * 2048 * 768)
    band = 20 * (dense + 4 * gemma.window.band_keys(2048) * 768) + 4 * (dense + 4 * 2048 * 768)
    assert gemma.flops_per_token(2048) == pytest.approx(band)
    assert gemma.flops_per_token(2048) < 0.75 * full
    # within the radius the band is every key: nothing to subtract
    assert gemma.flops_per_token(200) == pytest.approx(24 * (dense + 4 * 200 * 768))
    assert gemma.flops([100, 300]) == pytest.approx(100 * gemma.flops_per_token(100)
                                                   + 300 * gemma.flops_per_token(300))
