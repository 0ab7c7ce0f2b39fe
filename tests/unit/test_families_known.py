"""Matryoshka dimensions of published models whose folders do not declare them
(floe/models/families.py), wired into load_spec. JSON-only folders: no weights are read."""

from __future__ import annotations

import json
import os

from floe.config import ModelSettings
from floe.models import load_spec
from floe.models.families import find_known_model


def test_find_known_model_by_hub_id_folder_name_and_cache_layout():
    gemma = ("gemma3_text", 768)
    assert find_known_model("google/embeddinggemma-300m", "/x/y", *gemma).matryoshka_dims == (512, 256, 128)
    assert find_known_model("/data/embeddinggemma-300m", "/data/embeddinggemma-300m", *gemma) is not None
    cache = "/c/hub/models--google--embeddinggemma-300m/snapshots/0123abcd"
    assert find_known_model(cache, cache, *gemma).hub_id == "google/embeddinggemma-300m"
    # Same name, other shape (a fine-tune with another head, or a tiny stand-in): not recognised.
    assert find_known_model("google/embeddinggemma-300m", "/x", "gemma3_text", 48) is None
    assert find_known_model("google/embeddinggemma-300m", "/x", "bert", 768) is None
    assert find_known_model("/data/some-other-model", "/data/some-other-model", *gemma) is None


def _write(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


def _gemma_like_folder(folder: str, st_extra: dict) -> str:
    """embeddinggemma-300m's JSON files (module pipeline and config shape), weights as empty files."""
    _write(os.path.join(folder, "config.json"), {
        "architectures": ["Gemma3TextModel"], "model_type": "gemma3_text", "hidden_size": 768,
        "vocab_size": 262144, "max_position_embeddings": 2048, "pad_token_id": 0})
    _write(os.path.join(folder, "tokenizer.json"), {"model": {"type": "BPE", "vocab": {}}})
    _write(os.path.join(folder, "modules.json"), [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
        {"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"},
        {"idx": 4, "name": "4", "path": "4_Normalize", "type": "sentence_transformers.models.Normalize"}])
    _write(os.path.join(folder, "sentence_bert_config.json"), {"max_seq_length": 2048})
    _write(os.path.join(folder, "1_Pooling", "config.json"),
           {"word_embedding_dimension": 768, "pooling_mode_mean_tokens": True})
    for sub, (i, o) in {"2_Dense": (768, 3072), "3_Dense": (3072, 768)}.items():
        _write(os.path.join(folder, sub, "config.json"), {
            "in_features": i, "out_features": o, "bias": False,
            "activation_function": "torch.nn.modules.linear.Identity"})
        open(os.path.join(folder, sub, "model.safetensors"), "wb").close()
    _write(os.path.join(folder, "config_sentence_transformers.json"),
           {"prompts": {"query": "task: search result | query: "}, "default_prompt_name": None,
            **st_extra})
    return folder


def test_load_spec_falls_back_to_the_model_card_dims(tmp_path):
    folder = _gemma_like_folder(str(tmp_path / "models--google--embeddinggemma-300m" / "snapshots" / "abc"), {})
    spec = load_spec(ModelSettings(model=folder))
    assert spec.matryoshka_dims == (512, 256, 128) and spec.dim == 768
    assert any("model card" in n for n in spec.notices)


def test_explicit_key_wins_and_unknown_folders_get_none(tmp_path):
    explicit = _gemma_like_folder(str(tmp_path / "embeddinggemma-300m"), {"matryoshka_dims": [64]})
    assert load_spec(ModelSettings(model=explicit)).matryoshka_dims == (64,)
    other = _gemma_like_folder(str(tmp_path / "my-gemma-finetune"), {})
    assert load_spec(ModelSettings(model=other)).matryoshka_dims == ()
