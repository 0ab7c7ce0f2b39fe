"""floe/validate.py: every limit counts what it protects, and is checked before the work."""

from __future__ import annotations

import numpy as np
import pytest

from floe import validate
from floe.errors import ModelNotFoundError, TooLargeError, ValidationError
from floe.protocol import EncodeOptions, TokenBatch


def limits(**kw) -> validate.Limits:
    base = dict(max_items=8, max_input_chars=100, max_seq_length=10, vocab_size=50, dim=16,
                auto_truncate=True, prompts=(("query", "query: "), ("huge", "x" * 101)),
                served_names=("m",))
    base.update(kw)
    return validate.Limits(**base)


def test_prompt_counts_against_the_character_limit():
    with pytest.raises(TooLargeError) as e:
        validate.check_options(limits(), EncodeOptions(prompt="p" * 101))
    assert e.value.param == "prompt"
    # a prompt_name resolves to its text, which counts the same way
    with pytest.raises(TooLargeError) as e:
        validate.check_options(limits(), EncodeOptions(prompt_name="huge"))
    assert e.value.param == "prompt_name"


def test_prompt_and_input_share_one_budget():
    lim = limits()
    plan = validate.check_options(lim, EncodeOptions(prompt="p" * 40))
    out = validate.check_texts(lim, ["a" * 70, "b" * 10], plan)
    assert len(out[0]) == 60 and out[1] == "b" * 10          # cut to 100 - 40, head kept
    left = validate.check_options(lim, EncodeOptions(prompt="p" * 40, truncation_direction="left"))
    assert validate.check_texts(lim, ["ab" * 35], left)[0] == ("ab" * 35)[-60:]
    strict = validate.check_options(lim, EncodeOptions(prompt="p" * 40, truncate=False))
    with pytest.raises(TooLargeError) as e:
        validate.check_texts(lim, ["ok", "a" * 61], strict)
    assert e.value.param == "input[1]"


def test_lone_surrogate_names_its_item():
    lim = limits()
    plan = validate.check_options(lim, EncodeOptions())
    with pytest.raises(ValidationError) as e:
        validate.check_texts(lim, ["a", "b", "c", "x\ud800y"], plan)
    assert e.value.param == "input[3]"
    with pytest.raises(ValidationError) as e:
        validate.check_options(lim, EncodeOptions(prompt="\udfff"))
    assert e.value.param == "prompt"


def test_count_is_checked_before_any_item():
    lim = limits()
    # items that are not even valid: the count alone decides, before any of them is looked at
    with pytest.raises(TooLargeError) as e:
        validate.parse_json_input(lim, [[1]] * 3_000_000, "input")
    assert "limit of 8" in e.value.message
    with pytest.raises(TooLargeError):
        validate.parse_json_input(lim, ["a"] * 9, "input")
    with pytest.raises(ValidationError, match="must not be empty"):
        validate.parse_json_input(lim, [], "input")


@pytest.mark.parametrize("value,param", [
    (123, "input"), (None, "input"), ([1.5], "input[0]"), ([{"a": 1}], "input[0]"),
    (["a", 3], "input[1]"), ([[1, 2], [3, "x"]], "input[1][1]"), ([[1], []], "input[1]"),
    ([2 ** 70], "input[0]"), ([1, True], "input[1]"),
])
def test_wrong_types_name_their_param(value, param):
    with pytest.raises(ValidationError) as e:
        validate.parse_json_input(limits(), value, "input")
    assert e.value.param == param
    assert len(e.value.message) < 400


def test_token_ids_vocabulary_and_length():
    lim = limits()
    plan = validate.check_options(lim, EncodeOptions())
    batch = TokenBatch.from_lists([[1, 2], [3, 50]])
    with pytest.raises(ValidationError, match="Token id 50 in input\\[1\\] is out of vocabulary"):
        validate.check_token_batch(lim, batch, plan)
    with pytest.raises(ValidationError, match="out of vocabulary"):
        validate.check_token_batch(lim, TokenBatch.from_lists([[-1]]), plan)
    long = TokenBatch.from_lists([list(range(1, 13)), [7]])
    cut = validate.check_token_batch(lim, long, plan)
    assert cut.lengths.tolist() == [10, 1] and cut.item(0).tolist() == list(range(1, 11))
    strict = validate.check_options(lim, EncodeOptions(truncate=False))
    with pytest.raises(ValidationError, match="maximum context length is 10 tokens. However, you "
                                              "requested 12 tokens"):
        validate.check_token_batch(lim, long, strict)
    # more ids than the per-item budget is refused before any id is looked at
    with pytest.raises(TooLargeError):
        validate.check_token_batch(lim, TokenBatch(ids=np.ones(101, np.int32), lengths=[101]), plan)


def test_options():
    lim = limits()
    for bad in (0, -1, 17, True):
        with pytest.raises(ValidationError) as e:
            validate.check_options(lim, EncodeOptions(dimensions=bad))
        assert e.value.param == "dimensions"
    with pytest.raises(ValidationError, match="unknown prompt_name"):
        validate.check_options(lim, EncodeOptions(prompt_name="nope"))
    with pytest.raises(ValidationError):
        validate.check_options(lim, EncodeOptions(prompt="a", prompt_name="query"))
    plan = validate.check_options(lim, EncodeOptions(prompt_name="query", truncate=False))
    assert plan == validate.Plan(prompt="query: ", truncate=False, direction="right")
    assert validate.check_model(lim, "other") is False     # answered, logged once by the caller
    assert validate.check_model(lim, "m") and validate.check_model(lim, "")
    with pytest.raises(ModelNotFoundError):
        validate.check_model(limits(strict_model_name=True), "other")


def test_token_ids_can_be_refused():
    lim = limits(accept_token_ids=False)
    plan = validate.check_options(lim, EncodeOptions())
    with pytest.raises(ValidationError, match="check_embedding_ctx_length=False"):
        validate.check_token_batch(lim, TokenBatch.from_lists([[1, 2]]), plan)
