"""The torch engine's packed forward (floe/engine/unpadded.py): which models take it, and that it
gives the padded forward's states on mixed lengths (the parity tests in test_parity.py compare
the same engines, packed, against sentence-transformers)."""

from __future__ import annotations

import numpy as np
import pytest

from floe.config import ModelSettings
from floe.engine.torch_engine import TorchEngine
from floe.engine.unpadded import pack_indices
from floe.models import load_spec

LENGTHS = (5, 23, 1, 17, 23, 9)


def test_pack_indices_maps_real_tokens_and_pads():
    mask = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    rows, slots = pack_indices(mask)
    assert rows.tolist() == [0, 1, 2, 3, 6, 7]
    # each real slot reads its own packed row; a pad reads row 0 (masked as a key, output dropped)
    assert slots.tolist() == [0, 1, 2, 3, 0, 0, 4, 5, 0]
    assert rows.dtype == np.int64 and slots.dtype == np.int64


def _batch(spec, seed=0):
    rng = np.random.default_rng(seed)
    low = min(5, spec.vocab_size - 1)
    return [rng.integers(low, spec.vocab_size, n).astype(np.int32) for n in LENGTHS]


@pytest.mark.parametrize("name", ["minilm", "tiny_bert", "tiny_xlmr", "plain_bert"])
def test_packed_forward_equals_the_padded_one(name, minilm_path, tiny_bert, tiny_xlmr, plain_bert):
    path = {"minilm": minilm_path, "tiny_bert": tiny_bert, "tiny_xlmr": tiny_xlmr,
            "plain_bert": plain_bert}[name]
    spec = load_spec(ModelSettings(model=path))
    packed = TorchEngine(spec, device="cpu", dtype="float32")
    padded = TorchEngine(spec, device="cpu", dtype="float32", unpad=False)
    assert packed._unpadded is not None and padded._unpadded is None
    seqs = _batch(spec)
    prepared = packed.prepare(seqs)
    assert prepared.rows is not None and int(prepared.rows.numel()) == sum(LENGTHS)
    got, want = packed.run(prepared), padded.run(padded.prepare(seqs))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    alone = np.stack([packed.run(packed.prepare([s]))[0] for s in seqs])
    np.testing.assert_allclose(got, alone, rtol=1e-4, atol=1e-5)


def test_token_types_reach_the_packed_embeddings(tiny_bert):
    spec = load_spec(ModelSettings(model=tiny_bert))
    packed = TorchEngine(spec, device="cpu", dtype="float32")
    padded = TorchEngine(spec, device="cpu", dtype="float32", unpad=False)
    seqs = _batch(spec, seed=1)
    splits = np.array([max(1, n // 2) for n in LENGTHS], dtype=np.int64)
    got = packed.run(packed.prepare(seqs, type_splits=splits))
    np.testing.assert_allclose(got, padded.run(padded.prepare(seqs, type_splits=splits)),
                               rtol=1e-5, atol=1e-5)
    if packed._takes_token_types:  # types change the states, so the test above can fail
        assert not np.allclose(got, packed.run(packed.prepare(seqs)), atol=1e-4)


def test_a_batch_without_padding_runs_the_models_own_forward(tiny_bert):
    spec = load_spec(ModelSettings(model=tiny_bert))
    engine = TorchEngine(spec, device="cpu", dtype="float32")
    assert engine.prepare([np.arange(5, 12, dtype=np.int32)] * 3).rows is None


def test_late_chunking_spans_pool_the_packed_states(tiny_bert):
    spec = load_spec(ModelSettings(model=tiny_bert))
    packed = TorchEngine(spec, device="cpu", dtype="float32")
    padded = TorchEngine(spec, device="cpu", dtype="float32", unpad=False)
    seqs = _batch(spec, seed=2)
    spans = [np.array([[0, max(1, n // 2)], [0, n]]) for n in LENGTHS]
    np.testing.assert_allclose(packed.run(packed.prepare(seqs, spans=spans)),
                               padded.run(padded.prepare(seqs, spans=spans)), rtol=1e-5, atol=1e-5)


def test_other_families_and_heads_keep_the_padded_forward(tiny_model_root, bert_reranker):
    from tests.fixtures.families import build_qwen3_embedding

    qwen = load_spec(ModelSettings(model=build_qwen3_embedding(f"{tiny_model_root}/unpad-qwen3")))
    assert TorchEngine(qwen, device="cpu", dtype="float32")._unpadded is None
    reranker = load_spec(ModelSettings(model=bert_reranker))  # reads logits, not hidden states
    assert TorchEngine(reranker, device="cpu", dtype="float32")._unpadded is None


def _reference_varlen(calls):
    """torch.nn.attention.varlen.varlen_attn's contract, one input at a time with SDPA: (T, heads,
    dim) packed rows, cumulative starts (n + 1,) int32, the longest length, a scale."""
    import torch
    import torch.nn.functional as F

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None):
        assert cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k) and max_q == max_k
        assert int(cu_q[-1]) == q.shape[0] and int((cu_q[1:] - cu_q[:-1]).max()) == max_q
        calls.append(q.shape)
        out = torch.empty_like(q)
        for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            out[a:b] = F.scaled_dot_product_attention(
                *(x[a:b].transpose(0, 1)[None] for x in (q, k, v)), scale=scale)[0].transpose(0, 1)
        return out

    return varlen


def test_packed_attention_takes_the_inputs_cumulative_lengths(tiny_bert):
    """The flash path's plumbing (a GPU's fp16/bf16 path) run on CPU with a reference kernel of
    the same contract: the packed projections, the starts and the output layout."""
    spec = load_spec(ModelSettings(model=tiny_bert))
    packed = TorchEngine(spec, device="cpu", dtype="float32")
    padded = TorchEngine(spec, device="cpu", dtype="float32", unpad=False)
    calls: list = []
    packed._unpadded.varlen = _reference_varlen(calls)
    packed._unpadded.takes_varlen = lambda states: True
    seqs = _batch(spec, seed=3)
    got = packed.run(packed.prepare(seqs))
    assert len(calls) == packed.model.config.num_hidden_layers
    assert calls[0][0] == sum(LENGTHS)
    np.testing.assert_allclose(got, padded.run(padded.prepare(seqs)), rtol=1e-5, atol=1e-5)


def test_a_failing_packed_attention_falls_back_to_padded_for_good(tiny_bert, caplog):
    spec = load_spec(ModelSettings(model=tiny_bert))
    packed = TorchEngine(spec, device="cpu", dtype="float32")
    padded = TorchEngine(spec, device="cpu", dtype="float32", unpad=False)

    def unsupported(*args, **kwargs):
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer")

    packed._unpadded.varlen = unsupported
    packed._unpadded.takes_varlen = lambda states: packed._unpadded.varlen is not None
    seqs = _batch(spec, seed=4)
    with caplog.at_level("WARNING", logger="floe.engine.unpadded"):
        got = packed.run(packed.prepare(seqs))
    assert "packed flash attention failed" in caplog.text and "Ampere" in caplog.text
    assert packed._unpadded.varlen is None
    np.testing.assert_allclose(got, padded.run(padded.prepare(seqs)), rtol=1e-5, atol=1e-5)


def test_out_of_memory_in_packed_attention_keeps_its_kind_and_the_kernel(tiny_bert):
    import torch

    spec = load_spec(ModelSettings(model=tiny_bert))
    packed = TorchEngine(spec, device="cpu", dtype="float32")

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    packed._unpadded.varlen = out_of_memory
    packed._unpadded.takes_varlen = lambda states: True
    with pytest.raises(torch.OutOfMemoryError):
        packed.run(packed.prepare(_batch(spec, seed=5)))
    assert packed._unpadded.varlen is out_of_memory
