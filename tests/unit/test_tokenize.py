"""The front end's tokenizer: prompts, truncation, limits and hostile inputs (no torch).

Token-for-token parity with sentence-transformers lives in tests/integration/test_parity.py.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from floe.config import ModelSettings
from floe.errors import TooLargeError, ValidationError
from floe.models import load_spec
from floe.protocol import EncodeOptions, TokenBatch
from floe.tokenize import Tokenizer, TokenizerPool

CLS, SEP = 101, 102


@pytest.fixture(scope="module")
def spec():
    return dataclasses.replace(load_spec(ModelSettings()), prompts={"query": "query: ", "doc": ""})


@pytest.fixture(scope="module")
def tok(spec):
    return Tokenizer(spec)


def items(batch: TokenBatch) -> list[list[int]]:
    return [batch.item(i).tolist() for i in range(batch.n)]


def test_baked_in_padding_and_truncation_are_gone(tok):
    b = tok.encode(["hello", "hello world " * 200], EncodeOptions())
    # MiniLM's tokenizer.json pads and truncates to 128; the model's max_seq_length is 256
    assert b.lengths.tolist() == [3, 256]
    assert b.ids.dtype == np.int32 and b.total_tokens == 259


def test_empty_string_still_has_special_tokens(tok):
    assert items(tok.encode([""], EncodeOptions())) == [[CLS, SEP]]


def test_prompt_is_prepended_to_the_text(tok):
    with_name = tok.encode(["hello"], EncodeOptions(prompt_name="query"))
    by_hand = tok.encode(["query: hello"], EncodeOptions())
    raw = tok.encode(["hello"], EncodeOptions(prompt="query: "))
    assert items(with_name) == items(by_hand) == items(raw)
    assert with_name.lengths[0] > tok.encode(["hello"], EncodeOptions()).lengths[0]


def test_default_prompt_name_applies_unless_the_request_names_one(tok):
    default = tok.encode(["hi"], EncodeOptions(), default_prompt_name="query")
    assert items(default) == items(tok.encode(["query: hi"], EncodeOptions()))
    overridden = tok.encode(["hi"], EncodeOptions(prompt_name="doc"), default_prompt_name="query")
    assert items(overridden) == items(tok.encode(["hi"], EncodeOptions()))


def test_unknown_prompt_name_lists_the_available_ones(tok):
    with pytest.raises(ValidationError, match="available: doc, query") as e:
        tok.encode(["x"], EncodeOptions(prompt_name="passage"))
    assert e.value.param == "prompt_name"
    with pytest.raises(ValidationError, match="not both"):
        tok.encode(["x"], EncodeOptions(prompt="a", prompt_name="query"))


def test_exactly_max_length_passes_and_one_more_is_refused_without_truncation(tok):
    # "hello " is one token: 254 words + [CLS] + [SEP] = 256
    at_max = tok.encode(["hello " * 254], EncodeOptions(truncate=False))
    assert at_max.lengths.tolist() == [256]
    with pytest.raises(ValidationError) as e:
        tok.encode(["ok", "hello " * 255], EncodeOptions(truncate=False))
    assert e.value.param == "input[1]"
    assert e.value.message.startswith(
        "This model's maximum context length is 256 tokens. However, you requested 257 tokens in input[1]")


def test_auto_truncate_setting_is_the_default_and_a_request_overrides_it(tok):
    with pytest.raises(ValidationError):
        tok.encode(["hello " * 300], EncodeOptions(), auto_truncate=False)
    assert tok.encode(["hello " * 300], EncodeOptions(truncate=True), auto_truncate=False).lengths[0] == 256


def test_left_truncation_keeps_the_tail_and_the_special_tokens(tok):
    text = " ".join(f"w{i}" for i in range(400))
    right = items(tok.encode([text], EncodeOptions(truncation_direction="right")))[0]
    left = items(tok.encode([text], EncodeOptions(truncation_direction="left")))[0]
    assert len(left) == len(right) == 256
    assert left[0] == right[0] == CLS and left[-1] == right[-1] == SEP
    tail = items(tok.encode(["w399"], EncodeOptions()))[0][1:-1]
    assert left[-1 - len(tail):-1] == tail and right[-1 - len(tail):-1] != tail
    with pytest.raises(ValidationError, match="truncation_direction"):
        tok.encode([text], EncodeOptions(truncation_direction="middle"))


def test_character_pre_limit(spec):
    small = Tokenizer(spec, max_input_chars=1000)
    long_text = "hello " * 1000  # 6000 characters
    with pytest.raises(TooLargeError,
                       match="input\\[0\\] has 6000 characters with its prompt; the limit is 1000"):
        small.encode([long_text], EncodeOptions(truncate=False))
    # truncation on: cut to the limit by characters, then tokenized and truncated as usual
    cut = small.encode([long_text], EncodeOptions(truncate=True))
    assert items(cut) == items(small.encode([long_text[:1000]], EncodeOptions()))
    tail = small.encode([long_text], EncodeOptions(truncate=True, truncation_direction="left"))
    assert items(tail) == items(small.encode([long_text[-1000:]], EncodeOptions()))
    assert Tokenizer(spec).max_input_chars == 250 * 256


def test_lone_surrogate_and_non_strings_name_the_item(tok):
    with pytest.raises(ValidationError) as e:
        tok.encode(["fine", "bad \ud800 text"], EncodeOptions())
    assert e.value.param == "input[1]" and "Unicode" in e.value.message
    with pytest.raises(ValidationError) as e:
        tok.encode(["fine", 3], EncodeOptions())  # type: ignore[list-item]
    assert e.value.param == "input[1]"


def test_tokenizer_stressors_stay_bounded(tok):
    stress = ["a" * 100_000, "\u0301" * 20_000, "😀" * 20_000, "\n" * 100_000]
    b = tok.encode(stress, EncodeOptions())
    assert b.n == 4 and b.lengths.max() <= 256 and b.lengths.min() >= 2


def test_lowercase_from_sentence_bert_config(spec, tmp_path):
    # A cased copy of MiniLM's tokenizer: do_lower_case must add the lowercasing back, as ST does.
    with open(os.path.join(spec.path, "tokenizer.json"), encoding="utf-8") as f:
        tj = json.load(f)
    tj["normalizer"]["lowercase"] = False
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    cased_spec = dataclasses.replace(spec, path=str(tmp_path), transformer_path="", do_lower_case=False)
    cased = Tokenizer(cased_spec)
    lower = Tokenizer(dataclasses.replace(cased_spec, do_lower_case=True))
    opts = EncodeOptions()
    assert items(lower.encode(["The QUICK Fox"], opts)) == items(lower.encode(["the quick fox"], opts))
    assert items(cased.encode(["The QUICK Fox"], opts)) != items(cased.encode(["the quick fox"], opts))


def test_validate_ids(tok):
    ok = TokenBatch.from_lists([[CLS, 7592, SEP], [CLS, SEP]])
    assert tok.validate_ids(ok) is ok
    with pytest.raises(ValidationError, match="Token id 30522 in input\\[1\\] is out of vocabulary"):
        tok.validate_ids(TokenBatch.from_lists([[1, 2], [3, 30522]]))
    with pytest.raises(ValidationError, match="Token id -1 in input\\[0\\]"):
        tok.validate_ids(TokenBatch.from_lists([[-1]]))
    with pytest.raises(ValidationError, match="input\\[1\\] is an empty list"):
        tok.validate_ids(TokenBatch.from_lists([[1], []]))


def test_validate_ids_length_truncates_or_refuses(tok):
    long = list(range(1000, 1300))  # 300 ids
    batch = TokenBatch.from_lists([[5, 6], long])
    with pytest.raises(ValidationError, match="maximum context length is 256 tokens.*300 tokens in input\\[1\\]"):
        tok.validate_ids(batch, EncodeOptions(truncate=False))
    right = tok.validate_ids(batch, EncodeOptions())
    assert items(right) == [[5, 6], long[:256]]
    left = tok.validate_ids(batch, EncodeOptions(truncation_direction="left"))
    assert items(left) == [[5, 6], long[-256:]]


def test_decode(tok):
    b = tok.encode(["Hello world"], EncodeOptions())
    assert tok.decode_tokens(b.item(0)) == ["[CLS]", "hello", "world", "[SEP]"]
    assert tok.decode(b.item(0)) == "hello world"
    with pytest.raises(ValidationError):
        tok.decode_tokens([10**7])


async def test_pool_splits_large_requests_and_keeps_order_and_indices(spec, tok):
    pool = TokenizerPool(spec, workers=3)
    try:
        texts = [f"text number {i} " + "word " * (i % 37) for i in range(1000)]
        got = await pool.encode(texts, EncodeOptions(prompt_name="query"))
        want = tok.encode(texts, EncodeOptions(prompt_name="query"))
        assert np.array_equal(got.ids, want.ids) and np.array_equal(got.lengths, want.lengths)
        texts[700] = "bad \udfff"
        with pytest.raises(ValidationError) as e:
            await pool.encode(texts, EncodeOptions())
        assert e.value.param == "input[700]"
        small = await pool.encode(["a"], EncodeOptions())
        assert items(small) == items(tok.encode(["a"], EncodeOptions()))
    finally:
        pool.close()


async def test_pool_without_library_threads_splits_from_64_texts(spec, tok, monkeypatch):
    # a server's pool: the library runs each call on its caller, so the pool splits a lone
    # request of a few dozen texts itself, and the pieces join back exactly
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    pool = TokenizerPool(spec, workers=2, library_threads=False)
    try:
        assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
        calls = []
        real = pool.tokenizer.encode_plan
        monkeypatch.setattr(pool.tokenizer, "encode_plan",
                            lambda texts, plan, base=0: calls.append(len(texts)) or real(texts, plan, base))
        texts = [f"text {i} " + "word " * (i % 11) for i in range(64)]
        got = await pool.encode(texts, EncodeOptions())
        want = tok.encode(texts, EncodeOptions())
        assert np.array_equal(got.ids, want.ids) and np.array_equal(got.lengths, want.lengths)
        assert calls == [32, 32]
    finally:
        pool.close()
