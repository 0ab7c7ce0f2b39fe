#!/usr/bin/env python3
"""Builds a random-weight model of a published model's shape, for throughput work (compute does not
depend on the weights' values; nothing is downloaded).

    .venv/bin/python scripts/build_bench_model.py embeddinggemma-300m OUT_DIR
    .venv/bin/python scripts/build_bench_model.py modernbert-embed-base OUT_DIR

``embeddinggemma-300m``: google/embeddinggemma-300m's shape. Gemma3 text, 24 layers, hidden 768,
3 heads of 256 with one KV head, MLP 1152 (gated), bidirectional, a 512-token sliding window (the
band's whole width: +-256) on 5 of every 6 layers, 2048 positions; mean pooling, Dense
768->3072->768 (no bias), Normalize; the published prompts and Matryoshka dims. The tokenizer is
the tiny Gemma-style one of tests/fixtures/families.py (a few hundred pieces instead of 262,144):
the embedding table is smaller, the forward's FLOPs are the same.

``modernbert-embed-base``: nomic-ai/modernbert-embed-base's shape. ModernBERT, 22 layers, hidden
768, 12 heads of 64, gated MLP 1152, global attention on every third layer and a 128-token local
window (+-64) on the others, rotary positions; mean pooling, Normalize, the search_query /
search_document prompts. ``max_seq_length`` is 2048 here (the published 8192 is past what the
benchmarks measure). The tokenizer is the tiny ModernBERT-style one of tests/fixtures/families.py.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_embeddinggemma_300m(out: str) -> str:
    import torch
    from transformers import Gemma3TextConfig, Gemma3TextModel

    from tests.fixtures import families

    tok = families.gemma_tokenizer()
    cfg = Gemma3TextConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=768, intermediate_size=1152,
        num_hidden_layers=24, num_attention_heads=3, num_key_value_heads=1, head_dim=256,
        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=2048, rms_norm_eps=1e-6,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, query_pre_attn_scalar=256,
        sliding_window=512, use_bidirectional_attention=True,
        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 4,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
        initializer_range=0.02, architectures=["Gemma3TextModel"])
    torch.manual_seed(0)
    model = Gemma3TextModel(cfg).eval()
    tok_cfg = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": True,
               "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
               "unk_token": "<unk>", "mask_token": "<mask>", "padding_side": "right",
               "model_max_length": 2048}
    return families._write_st_folder(
        out, model, tok, tok_cfg, pooling="mean", dense=[(768, 3072), (3072, 768)],
        max_seq_length=2048, prompts=families.EMBEDDINGGEMMA_PROMPTS, matryoshka_dims=(512, 256, 128))


def build_modernbert_embed_base(out: str) -> str:
    import torch
    from transformers import ModernBertConfig, ModernBertModel

    from tests.fixtures import families

    tok = families.modernbert_tokenizer()
    ids = {t: tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]")}
    cfg = ModernBertConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=768, intermediate_size=1152,
        num_hidden_layers=22, num_attention_heads=12, max_position_embeddings=8192,
        global_attn_every_n_layers=3, local_attention=128, pad_token_id=ids["[PAD]"],
        bos_token_id=ids["[CLS]"], cls_token_id=ids["[CLS]"], eos_token_id=ids["[SEP]"],
        sep_token_id=ids["[SEP]"], initializer_range=0.02, architectures=["ModernBertModel"])
    torch.manual_seed(0)
    model = ModernBertModel(cfg).eval()
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "cls_token": "[CLS]",
               "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]",
               "mask_token": "[MASK]", "model_max_length": 8192,
               "clean_up_tokenization_spaces": True}
    return families._write_st_folder(out, model, tok, tok_cfg, pooling="mean", max_seq_length=2048,
                                     prompts=families.MODERNBERT_PROMPTS, matryoshka_dims=(256,))


MODELS = {"embeddinggemma-300m": build_embeddinggemma_300m,
          "modernbert-embed-base": build_modernbert_embed_base}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", choices=sorted(MODELS))
    p.add_argument("out")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(MODELS[args.model](args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
