"""load_spec on cross-encoder and SPLADE folders (tasks "score" and "sparse"), their refusals, and
the engine pieces that need no model: padding with token types, the fake engine's heads, the
score activations, the engine choice and the cache key per task."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from floe.config import ModelSettings
from floe.engine.base import right_pad
from floe.engine.choice import choose_engine
from floe.engine.fake import FakeEngine
from floe.engine.openvino_convert import cache_key
from floe.errors import ModelLoadError
from floe.models import ModelSpec, describe, load_spec
from tests.support import edit_json

SIGMOID = "torch.nn.modules.activation.Sigmoid"
VERSIONS = {"openvino": "1", "transformers": "1", "torch": "1"}


_edit = edit_json


def _copy(src: str, tmp_path, name: str = "m") -> str:
    dst = str(tmp_path / name)
    shutil.copytree(src, dst)
    return dst


def spec(path: str, **kw):
    return load_spec(ModelSettings(model=path, **kw))


# --- cross-encoders -------------------------------------------------------------------------------

def test_published_bert_reranker(bert_reranker):
    s = spec(bert_reranker)
    assert (s.task, s.architecture, s.is_sentence_transformers) == ("score", "BertForSequenceClassification", False)
    assert (s.dim, s.num_labels, s.score_activation) == (1, 1, "Sigmoid")
    assert s.uses_token_types and not s.normalize and s.pooling == "" and s.dense == ()
    assert s.max_seq_length == 128  # the tokenizer's 512 capped by the 128 positions, as ST does
    assert s.splade_pooling == "" and not s.notices


def test_xlmr_reranker_has_no_token_types_and_sigmoid_by_default(xlmr_reranker):
    s = spec(xlmr_reranker)
    assert (s.task, s.model_type, s.num_labels, s.score_activation) == ("score", "xlm-roberta", 1, "Sigmoid")
    assert not s.uses_token_types and s.pad_token_id == 1
    assert s.max_seq_length == s.max_position_limit == 128  # 130 positions - padding_idx - 1


def test_cross_encoder_saved_by_st6(multilabel_cross_encoder):
    with open(os.path.join(multilabel_cross_encoder, "modules.json")) as f:
        assert [m["type"].rsplit(".", 1)[-1] for m in json.load(f)] == ["Transformer"]
    s = spec(multilabel_cross_encoder)
    assert (s.task, s.is_sentence_transformers, s.dim, s.num_labels) == ("score", True, 3, 3)
    assert s.score_activation == "Identity" and s.uses_token_types and s.max_seq_length == 128


@pytest.mark.parametrize("where, value, want", [
    ("legacy", "torch.nn.modules.activation.Tanh", "Tanh"),          # sbert_ce_default_activation_function
    ("section", "torch.nn.modules.linear.Identity", "Identity"),     # config.json sentence_transformers
    ("section", "torch.nn.modules.activation.Softmax", "Softmax"),
    ("section", "torch.nn.modules.activation.ReLU", "ReLU"),
    ("section", "mypkg.Custom", "Sigmoid"),                           # untrusted: ST's default instead
    ("none", None, "Sigmoid"),
])
def test_score_activation_sources(bert_reranker, tmp_path, where, value, want):
    path = _copy(bert_reranker, tmp_path)

    def set_activation(cfg):
        cfg.pop("sentence_transformers", None)
        if where == "legacy":
            cfg["sbert_ce_default_activation_function"] = value
        elif where == "section":
            cfg["sentence_transformers"] = {"activation_fn": value}
    _edit(os.path.join(path, "config.json"), set_activation)
    s = spec(path)
    assert s.score_activation == want
    assert any("mypkg.Custom" in n for n in s.notices) == (value == "mypkg.Custom")


def test_config_section_beats_the_legacy_key_and_st6_config_beats_both(multilabel_cross_encoder, tmp_path):
    path = _copy(multilabel_cross_encoder, tmp_path)
    _edit(os.path.join(path, "config.json"), lambda c: c.update(
        sentence_transformers={"activation_fn": "torch.nn.modules.activation.Tanh"},
        sbert_ce_default_activation_function=SIGMOID))
    assert spec(path).score_activation == "Identity"  # config_sentence_transformers.json
    _edit(os.path.join(path, "config_sentence_transformers.json"), lambda c: c.pop("activation_fn") and None)
    assert spec(path).score_activation == "Tanh"


def test_num_labels_without_an_activation_is_identity(bert_reranker, tmp_path):
    path = _copy(bert_reranker, tmp_path)

    def three_labels(cfg):
        cfg.pop("sentence_transformers")
        cfg["id2label"] = {str(i): f"L{i}" for i in range(3)}
        cfg["label2id"] = {f"L{i}": i for i in range(3)}
    _edit(os.path.join(path, "config.json"), three_labels)
    s = spec(path)
    assert (s.num_labels, s.dim, s.score_activation) == (3, 3, "Identity")


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.update(sentence_transformers={"activation_fn": "torch.nn.modules.activation.GELU"}),
     "GELU"),
    (lambda c: c.update(architectures=["BertForTokenClassification"]), None),  # then an embedding
])
def test_cross_encoder_refusals_in_config(bert_reranker, tmp_path, edit, match):
    path = _copy(bert_reranker, tmp_path)
    _edit(os.path.join(path, "config.json"), edit)
    if match is None:
        assert spec(path).task == "embed"
        return
    with pytest.raises(ModelLoadError, match=match):
        spec(path)


def test_causal_lm_reranker_is_refused(multilabel_cross_encoder, tmp_path):
    path = _copy(multilabel_cross_encoder, tmp_path)
    _edit(os.path.join(path, "modules.json"), lambda m: m.append(
        {"idx": 1, "name": "1", "path": "1_LogitScore",
         "type": "sentence_transformers.cross_encoder.modules.logit_score.LogitScore"}))
    with pytest.raises(ModelLoadError, match="LogitScore.*causal-LM reranker"):
        spec(path)
    path = _copy(multilabel_cross_encoder, tmp_path, "causal")
    _edit(os.path.join(path, "config.json"), lambda c: c.update(architectures=["Qwen3ForCausalLM"]))
    with pytest.raises(ModelLoadError, match="causal-LM rerankers"):
        spec(path)


def test_pooling_override_is_refused_for_a_cross_encoder(bert_reranker):
    with pytest.raises(ModelLoadError, match="--pooling"):
        spec(bert_reranker, pooling="mean")


# --- SPLADE ---------------------------------------------------------------------------------------

def test_splade_saved_by_sparse_encoder(bert_splade):
    s = spec(bert_splade)
    assert (s.task, s.architecture, s.is_sentence_transformers) == ("sparse", "BertForMaskedLM", True)
    assert (s.dim, s.vocab_size, s.splade_pooling, s.splade_activation) == (30522, 30522, "max", "relu")
    assert s.similarity_fn == "dot" and not s.normalize and s.pooling == "" and s.max_active_dims == 0
    assert s.prompts == {"query": "", "document": ""} and s.max_seq_length == 128


def test_legacy_splade_layout_and_options(bert_splade, tmp_path):
    """ST 5's names (MLMTransformer, sparse_encoder.models.SpladePooling, word_embedding_dimension),
    sum pooling, log1p_relu and max_active_dims."""
    path = _copy(bert_splade, tmp_path)

    def legacy(mods):
        mods[0]["type"] = "sentence_transformers.sparse_encoder.models.MLMTransformer"
        mods[1]["type"] = "sentence_transformers.sparse_encoder.models.SpladePooling"
    _edit(os.path.join(path, "modules.json"), legacy)
    _edit(os.path.join(path, "sentence_bert_config.json"),
          lambda c: {"max_seq_length": 100, "do_lower_case": False})
    _edit(os.path.join(path, "1_SpladePooling", "config.json"),
          lambda c: {"pooling_strategy": "sum", "activation_function": "log1p_relu",
                     "word_embedding_dimension": 30522})
    _edit(os.path.join(path, "config_sentence_transformers.json"), lambda c: c.update(max_active_dims=64))
    s = spec(path)
    assert (s.task, s.splade_pooling, s.splade_activation, s.max_active_dims) == ("sparse", "sum", "log1p_relu", 64)
    assert s.max_seq_length == 100


@pytest.mark.parametrize("module, match", [
    ("sentence_transformers.sparse_encoder.modules.sparse_static_embedding.SparseStaticEmbedding",
     "SparseStaticEmbedding.*inference-free"),
    ("sentence_transformers.base.modules.router.Router", "Router"),
    ("sentence_transformers.sparse_encoder.modules.sparse_auto_encoder.SparseAutoEncoder",
     "SparseAutoEncoder"),
])
def test_other_sparse_encoders_are_refused_by_module(bert_splade, tmp_path, module, match):
    path = _copy(bert_splade, tmp_path)
    _edit(os.path.join(path, "modules.json"), lambda m: m.append(
        {"idx": 2, "name": "2", "path": "2_X", "type": module}))
    with pytest.raises(ModelLoadError, match=match):
        spec(path)


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.update(pooling_strategy="mean"), "pooling_strategy 'mean'"),
    (lambda c: c.update(activation_function="gelu"), "activation_function 'gelu'"),
    (lambda c: c.update(embedding_dimension=1000), "1000 dimensions"),
])
def test_unsupported_splade_pooling_is_refused(bert_splade, tmp_path, edit, match):
    path = _copy(bert_splade, tmp_path)
    _edit(os.path.join(path, "1_SpladePooling", "config.json"), edit)
    with pytest.raises(ModelLoadError, match=match):
        spec(path)


def test_sparse_encoder_over_hidden_states_is_refused(bert_splade, tmp_path):
    path = _copy(bert_splade, tmp_path)
    _edit(os.path.join(path, "sentence_bert_config.json"), lambda c: c.update(transformer_task="feature-extraction"))
    with pytest.raises(ModelLoadError, match="fill-mask"):
        spec(path)


def test_plain_masked_lm_folder_is_still_an_embedding_model(bert_splade, tmp_path):
    path = _copy(bert_splade, tmp_path)
    for name in ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json"):
        os.remove(os.path.join(path, name))
    s = spec(path)
    assert (s.task, s.pooling, s.normalize, s.dim) == ("embed", "mean", True, 32)


def test_describe_reports_the_task(bert_reranker, bert_splade):
    info = describe(spec(bert_reranker), device="cpu", dtype="float32")
    assert (info["task"], info["num_labels"], info["score_activation"], info["token_types"]) == \
        ("score", 1, "Sigmoid", True)
    info = describe(spec(bert_splade), device="cpu", dtype="float32")
    assert info["task"] == "sparse" and info["splade"] == {"pooling": "max", "activation": "relu",
                                                           "max_active_dims": 0}
    json.dumps(info)


# --- engine pieces --------------------------------------------------------------------------------

def _spec(task: str = "score", token_types: bool = True, **kw):
    base = dict(path="/nowhere", name="m", architecture="BertForSequenceClassification",
                model_type="bert", hidden_size=8, dim=1, max_seq_length=16, vocab_size=100,
                pooling="", task=task, uses_token_types=token_types, num_labels=1,
                score_activation="Sigmoid")
    base.update(kw)
    return ModelSpec(**base)


def test_right_pad_builds_token_types_from_the_splits():
    seqs = [np.array([1, 2, 3, 4, 5]), np.array([6, 7, 8])]
    p = right_pad(_spec(pad_token_id=0), seqs, np.array([3, 3]))
    assert p.input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 0, 0]]
    assert p.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert p.token_type_ids.tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]]  # none in the padding
    assert not p.uniform and right_pad(_spec(), seqs[:1]).uniform
    assert right_pad(_spec(), seqs).token_type_ids is None
    assert right_pad(_spec(token_types=False), seqs, np.array([1, 1])).token_type_ids is None
    with pytest.raises(ValueError, match="type_splits"):
        right_pad(_spec(), seqs, np.array([1]))


def test_fake_scores_depend_on_ids_and_token_types_not_on_the_batch():
    e = FakeEngine(_spec(dim=3, num_labels=3))
    seqs = [np.array([1, 2, 3, 4]), np.array([5, 6])]
    out = e.run(e.prepare(seqs, np.array([2, 2])))
    assert out.shape == (2, 3) and out.dtype == np.float32
    alone = e.run(e.prepare(seqs[:1], np.array([2])))
    assert seqs[0].tolist() == [1, 2, 3, 4]  # the caller's ids are left as they were
    np.testing.assert_array_equal(out[:1], alone)
    assert not np.allclose(out[0], e.run(e.prepare(seqs[:1], np.array([4])))[0])
    untyped = FakeEngine(_spec(dim=3, num_labels=3, token_types=False))
    np.testing.assert_array_equal(untyped.run(untyped.prepare(seqs, np.array([2, 2]))),
                                  untyped.run(untyped.prepare(seqs)))


def test_fake_splade_rows_are_sparse_and_non_negative():
    e = FakeEngine(_spec(task="sparse", dim=100, num_labels=0, score_activation="",
                         architecture="BertForMaskedLM", splade_pooling="max", splade_activation="relu"))
    seqs = [np.array([3, 7, 7, 9]), np.array([9])]
    out = e.run(e.prepare(seqs))
    assert out.shape == (2, 100) and (out >= 0).all()
    assert np.flatnonzero(out[0]).tolist() == [3, 7, 9] and np.flatnonzero(out[1]).tolist() == [9]
    assert out[0, 9] == out[1, 9]


def test_engine_choice_per_task():
    def choose(s):
        return choose_engine("auto", s, "auto", "auto", gpu=lambda: False, have_openvino=lambda: True)

    assert choose(_spec()).kind == "openvino"
    assert choose(_spec(model_type="xlm-roberta", token_types=False)).kind == "openvino"
    sparse = choose(_spec(task="sparse", model_type="xlm-roberta", dim=100))
    assert sparse.kind == "torch" and "sparse" in sparse.reason
    assert choose(_spec(model_type="qwen3")).kind == "torch"
    assert choose_engine("auto", _spec(), "auto", "auto", gpu=lambda: True,
                         have_openvino=lambda: True).kind == "torch"


def test_cache_key_follows_the_task_and_head(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    score = _spec(path=str(tmp_path))
    keys = {cache_key(s, VERSIONS) for s in (
        score,
        dataclasses.replace(score, num_labels=3, dim=3),
        dataclasses.replace(score, uses_token_types=False),
        dataclasses.replace(score, task="sparse", dim=100, num_labels=0, splade_pooling="max",
                            splade_activation="relu"),
        dataclasses.replace(score, task="sparse", dim=100, num_labels=0, splade_pooling="sum",
                            splade_activation="relu"),
        dataclasses.replace(score, task="embed", pooling="mean", dim=8, num_labels=0),
    )}
    assert len(keys) == 6
    # an embedding spec's key ignores the other tasks' fields (its cached graphs stay valid)
    embed = dataclasses.replace(score, task="embed", pooling="mean", dim=8, num_labels=0)
    assert cache_key(embed, VERSIONS) == cache_key(
        dataclasses.replace(embed, score_activation="", uses_token_types=False), VERSIONS)


def test_st_model_types_and_transformer_tasks(multilabel_cross_encoder, tiny_bert, tmp_path):
    path = _copy(multilabel_cross_encoder, tmp_path, "no_task")
    _edit(os.path.join(path, "sentence_bert_config.json"), lambda c: c.pop("transformer_task") and None)
    assert spec(path).task == "score"  # a CrossEncoder's undeclared Transformer is its classifier
    path = _copy(tiny_bert, tmp_path, "colbert")
    _edit(os.path.join(path, "config_sentence_transformers.json"),
          lambda c: c.update(model_type="MultiVectorEncoder"))
    with pytest.raises(ModelLoadError, match="MultiVectorEncoder"):
        spec(path)
    path = _copy(tiny_bert, tmp_path, "mlm_pooled")
    _edit(os.path.join(path, "modules.json"), lambda m: m[0].update(
        type="sentence_transformers.sparse_encoder.models.MLMTransformer"))
    with pytest.raises(ModelLoadError, match="transformer_task 'fill-mask'"):
        spec(path)
