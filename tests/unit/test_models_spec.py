"""load_spec on each folder layout, settings overrides, and the refusals (JSON only, no torch)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from floe.config import ModelSettings
from floe.errors import ModelLoadError
from floe.models import describe, load_spec
from tests.support import edit_json


_edit = edit_json


@pytest.fixture
def bert_copy(tiny_bert, tmp_path) -> str:
    dst = str(tmp_path / "bert")
    shutil.copytree(tiny_bert, dst)
    return dst


def test_embedded_default_model():
    spec = load_spec(ModelSettings())
    assert (spec.architecture, spec.model_type) == ("BertModel", "bert")
    assert (spec.hidden_size, spec.dim, spec.max_seq_length, spec.vocab_size) == (384, 384, 256, 30522)
    assert spec.pooling == "mean" and spec.normalize and spec.dense == ()
    assert spec.name == "all-MiniLM-L6-v2" and spec.is_sentence_transformers
    assert spec.max_position_limit == 512 and spec.pad_token_id == 0 and not spec.notices


def test_st6_layout_reads_max_length_from_tokenizer_config(tiny_bert):
    spec = load_spec(ModelSettings(model=tiny_bert))
    assert spec.pooling == "mean" and spec.normalize
    assert (spec.dim, spec.max_seq_length, spec.max_position_limit) == (32, 64, 128)
    assert spec.name == "bert_mean" and spec.prompts == {} and spec.default_prompt_name is None


def test_legacy_layout_with_cls_dense_and_prompts(tiny_bert_dense):
    spec = load_spec(ModelSettings(model=tiny_bert_dense, served_model_name="served"))
    assert spec.pooling == "cls" and spec.normalize and spec.name == "served"
    assert [(d.in_features, d.out_features) for d in spec.dense] == [(32, 16), (16, 12)]
    assert spec.dense[0].activation.endswith("Tanh") and spec.dense[1].activation.endswith("Identity")
    assert spec.dim == 12 and spec.max_seq_length == 48
    assert spec.prompts == {"query": "query: ", "passage": "passage: "}


def test_xlmr_position_offset_pad_id_and_lowercase(tiny_xlmr):
    spec = load_spec(ModelSettings(model=tiny_xlmr))
    assert spec.model_type == "xlm-roberta" and spec.pooling == "cls"
    # 66 positions minus padding_idx + 1 leaves 64 usable ones
    assert spec.max_position_limit == 64 and spec.pad_token_id == 1
    assert spec.max_seq_length == 40 and spec.do_lower_case


def test_plain_transformers_folder_gets_mean_and_normalize_with_a_notice(plain_bert):
    spec = load_spec(ModelSettings(model=plain_bert))
    assert not spec.is_sentence_transformers
    assert spec.pooling == "mean" and spec.normalize
    assert spec.max_seq_length == 96  # tokenizer's 512 capped by the 96 positions
    assert any("modules.json" in n for n in spec.notices)


def test_overrides_and_their_limits(tiny_bert_dense):
    spec = load_spec(ModelSettings(model=tiny_bert_dense, max_seq_length=100, pooling="max",
                                   default_prompt_name="query"))
    assert spec.max_seq_length == 100 and spec.pooling == "max" and spec.default_prompt_name == "query"
    assert any("pooling overridden" in n for n in spec.notices)
    with pytest.raises(ModelLoadError, match="exceeds"):
        load_spec(ModelSettings(model=tiny_bert_dense, max_seq_length=129))
    with pytest.raises(ModelLoadError, match="available: passage, query"):
        load_spec(ModelSettings(model=tiny_bert_dense, default_prompt_name="nope"))


def test_include_prompt_false_is_refused(bert_copy):
    _edit(os.path.join(bert_copy, "1_Pooling", "config.json"), lambda c: c.update(include_prompt=False))
    with pytest.raises(ModelLoadError, match="include_prompt"):
        load_spec(ModelSettings(model=bert_copy))


def test_multi_mode_pooling_is_refused(bert_copy):
    _edit(os.path.join(bert_copy, "1_Pooling", "config.json"),
          lambda c: c.update(pooling_mode=["mean", "max"]))
    with pytest.raises(ModelLoadError, match="one pooling mode"):
        load_spec(ModelSettings(model=bert_copy))


def test_unknown_module_type_is_refused(bert_copy):
    def add_layernorm(mods):
        mods.insert(2, {"idx": 2, "name": "x", "path": "x",
                        "type": "sentence_transformers.sentence_transformer.modules.layer_norm.LayerNorm"})
        for i, m in enumerate(mods):
            m["idx"] = i
    _edit(os.path.join(bert_copy, "modules.json"), add_layernorm)
    with pytest.raises(ModelLoadError, match="LayerNorm"):
        load_spec(ModelSettings(model=bert_copy))


def test_module_after_normalize_is_refused(tiny_bert_dense, tmp_path):
    dst = str(tmp_path / "m")
    shutil.copytree(tiny_bert_dense, dst)

    def normalize_first(mods):
        norm = mods.pop()
        mods.insert(2, norm)
        for i, m in enumerate(mods):
            m["idx"] = i
    _edit(os.path.join(dst, "modules.json"), normalize_first)
    with pytest.raises(ModelLoadError, match="after Normalize"):
        load_spec(ModelSettings(model=dst))


def test_unsupported_dense_activation_is_refused(tiny_bert_dense, tmp_path):
    dst = str(tmp_path / "m")
    shutil.copytree(tiny_bert_dense, dst)
    dense_dir = [d for d in os.listdir(dst) if d.endswith("_Dense")][0]
    _edit(os.path.join(dst, dense_dir, "config.json"),
          lambda c: c.update(activation_function="mypkg.Swish"))
    with pytest.raises(ModelLoadError, match="activation"):
        load_spec(ModelSettings(model=dst))


def test_missing_tokenizer_json_is_refused(bert_copy):
    os.remove(os.path.join(bert_copy, "tokenizer.json"))
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        load_spec(ModelSettings(model=bert_copy))


def test_corrupt_json_is_a_load_error(bert_copy):
    with open(os.path.join(bert_copy, "modules.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ModelLoadError, match="modules.json"):
        load_spec(ModelSettings(model=bert_copy))


def test_matryoshka_dims_are_read_and_bounded(bert_copy):
    _edit(os.path.join(bert_copy, "config_sentence_transformers.json"),
          lambda c: c.update(matryoshka_dims=[8, 32, 16, 64]))
    assert load_spec(ModelSettings(model=bert_copy)).matryoshka_dims == (32, 16, 8)


def test_describe_reports_pipeline_and_device(tiny_bert_dense):
    info = describe(load_spec(ModelSettings(model=tiny_bert_dense)), device="cpu", dtype="float32")
    assert info["pooling"] == "cls" and info["dim"] == 12 and info["normalize"] is True
    assert info["dense"][0] == {"in_features": 32, "out_features": 16, "bias": True,
                                "activation": "Tanh", "residual": False}
    assert (info["device"], info["dtype"]) == ("cpu", "float32")
    assert info["prompts"]["query"] == "query: " and info["float16_refused"] is False
    json.dumps(info)  # JSON-ready


def test_describe_reports_an_impossible_device_instead_of_raising(tiny_bert):
    info = describe(load_spec(ModelSettings(model=tiny_bert)), device="cpu", dtype="int4")
    assert "device_error" in info
