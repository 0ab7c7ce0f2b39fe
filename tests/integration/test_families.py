"""Each supported model family, on its tiny random-weight stand-in, against sentence-transformers.

For every family (tests/fixtures/families.py): floe's tokenizer gives ST's ids token for token
(prompts, special tokens, truncation at max_seq_length); floe's torch engine gives ST's embedding
(cosine >= 0.99999 in float32, >= 0.999 in bfloat16 against ST's float32); an input inside a padded
batch equals the same input alone; inputs at the maximum length agree. Then family-specific
checks: embeddinggemma's bidirectional sliding-window attention and float16 refusal, Qwen3's
appended end-of-text token read by last-token pooling, XLM-R's offset positions under padding.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from floe.config import ModelSettings
from floe.engine import create_engine
from floe.errors import ConfigError, ValidationError
from floe.models import load_spec
from floe.protocol import EncodeOptions
from floe.tokenize import Tokenizer
from tests.fixtures import families
from tests.support import ModuleMemo

FAMILY_NAMES = list(families.FAMILIES)
# Tokenization and float32 parity run for every family in the default tier; the batching and
# bfloat16 checks there run for the two families whose forward is floe's own (sliding-window
# attention: floe/engine/attention.py; also tests/integration/test_windowed_engines.py), the rest
# in the full tier.
TORCH_SERVED = ("embeddinggemma", "modernbert-embed")
TIERED = [n if n in TORCH_SERVED else pytest.param(n, marks=pytest.mark.full) for n in FAMILY_NAMES]
FP32_MIN_COS = 0.99999
BF16_MIN_COS = 0.999


# --- fixtures: built once per module, loaded once per family --------------------------------------

@pytest.fixture(scope="module")
def family_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("families"))


_memo = ModuleMemo()
_get = _memo.get
_clear_memo = _memo.clear_fixture()


def family_dir(root: str, name: str) -> str:
    return _get(("dir", name), lambda: families.FAMILIES[name](os.path.join(root, name)))


def st_model(root: str, name: str):
    from sentence_transformers import SentenceTransformer

    return _get(("st", name), lambda: SentenceTransformer(family_dir(root, name), device="cpu"))


def spec_of(root: str, name: str, **overrides):
    key = ("spec", name, tuple(sorted(overrides.items())))
    return _get(key, lambda: load_spec(ModelSettings(model=family_dir(root, name), **overrides)))


def engine(root: str, name: str, dtype: str = "float32"):
    return _get(("engine", name, dtype),
                lambda: create_engine(spec_of(root, name), "torch", device="cpu", dtype=dtype))


def tokenizer(root: str, name: str) -> Tokenizer:
    return _get(("tok", name), lambda: Tokenizer(spec_of(root, name)))


# --- helpers --------------------------------------------------------------------------------------

def floe_ids(tok: Tokenizer, texts, **options) -> list[list[int]]:
    batch = tok.encode(list(texts), EncodeOptions(**options))
    offsets = np.concatenate([[0], np.cumsum(batch.lengths)])
    return [batch.ids[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]


def st_ids(st, texts, prompt: str | None = None) -> list[list[int]]:
    """What SentenceTransformer.encode feeds its model (one padded batch; padding stripped by the
    attention mask, which also handles Qwen3's left padding)."""
    features = st.preprocess(list(texts), prompt=prompt)
    return [ids[mask.bool()].tolist()
            for ids, mask in zip(features["input_ids"], features["attention_mask"])]


def floe_embed(eng, tok: Tokenizer, texts, **options) -> np.ndarray:
    """floe's embedding path below the replica: tokenize, pad, forward, pool, Dense (no Normalize)."""
    return eng.run(eng.prepare([np.asarray(x, dtype=np.int32) for x in floe_ids(tok, texts, **options)]))


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def long_text(n_words: int = 600) -> str:
    words = "the quick brown fox jumps over lazy dog 数据 检索 Le renard 42 embeddings".split()
    return " ".join(words[i % len(words)] for i in range(n_words))


def prompt_cases(spec) -> list[dict]:
    """No prompt, each named prompt of the model (distinct strings only), and an explicit prompt."""
    cases, seen = [{}], set()
    for name, text in sorted(spec.prompts.items()):
        if text not in seen:
            seen.add(text)
            cases.append({"prompt_name": name})
    cases.append({"prompt": "custom instruction: "})
    return cases


def st_prompt(spec, case: dict) -> str | None:
    if "prompt" in case:
        return case["prompt"]
    return spec.prompts[case["prompt_name"]] if "prompt_name" in case else None


# --- every family ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_tokenization_matches_sentence_transformers(family_root, name):
    st, spec, tok = st_model(family_root, name), spec_of(family_root, name), tokenizer(family_root, name)
    texts = families.TEXTS + [long_text()]
    for case in prompt_cases(spec):
        got = floe_ids(tok, texts, **case)
        want = st_ids(st, texts, prompt=st_prompt(spec, case))
        assert got == want, f"{name} {case}"
    # The long text is cut to exactly max_seq_length, special tokens kept.
    assert len(floe_ids(tok, [long_text()])[0]) == spec.max_seq_length == st.max_seq_length


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_float32_parity_with_prompts(family_root, name):
    st, spec = st_model(family_root, name), spec_of(family_root, name)
    eng, tok = engine(family_root, name), tokenizer(family_root, name)
    texts = families.TEXTS
    for case in prompt_cases(spec):
        want = st.encode(texts, prompt=st_prompt(spec, case), convert_to_numpy=True, batch_size=4)
        got = floe_embed(eng, tok, texts, **case)
        assert got.shape == (len(texts), spec.dim)
        cos = cosines(got, want)
        assert cos.min() >= FP32_MIN_COS, f"{name} {case}: {cos}"
    # The model is not degenerate: different texts give clearly different embeddings, so the
    # thresholds above could fail.
    sims = cosines(got[:1].repeat(len(texts), 0), got)[1:]
    assert sims.max() < 0.999, sims


@pytest.mark.parametrize("name", TIERED)
def test_batched_equals_alone_and_max_length(family_root, name):
    st, spec = st_model(family_root, name), spec_of(family_root, name)
    eng, tok = engine(family_root, name), tokenizer(family_root, name)
    texts = [long_text(), "a", long_text(37), "hello world", long_text(900)]
    batched = floe_embed(eng, tok, texts)
    alone = np.concatenate([floe_embed(eng, tok, [t]) for t in texts])
    np.testing.assert_allclose(batched, alone, rtol=1e-4, atol=1e-5)
    lengths = [len(x) for x in floe_ids(tok, texts)]
    assert lengths[0] == lengths[4] == spec.max_seq_length and min(lengths) < 8
    cos = cosines(batched, st.encode(texts, convert_to_numpy=True, batch_size=8))
    assert cos.min() >= FP32_MIN_COS, cos


@pytest.mark.parametrize("name", TIERED)
def test_bfloat16_parity(family_root, name):
    st, spec = st_model(family_root, name), spec_of(family_root, name)
    eng, tok = engine(family_root, name, "bfloat16"), tokenizer(family_root, name)
    texts = families.TEXTS + [long_text()]
    name0 = sorted(spec.prompts)[0] if spec.prompts else None
    options = {"prompt_name": name0} if name0 else {}
    want = st.encode(texts, prompt=spec.prompts.get(name0) if name0 else None, convert_to_numpy=True)
    cos = cosines(floe_embed(eng, tok, texts, **options), want)
    assert cos.min() >= BF16_MIN_COS, cos


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_default_prompt_name(family_root, name):
    """A default prompt (the server's --default-prompt-name) is applied exactly as ST's
    default_prompt_name is; an unknown one is refused at load time."""
    spec = spec_of(family_root, name)
    named = [n for n, p in sorted(spec.prompts.items()) if p]
    with pytest.raises(Exception, match="not one of the model's prompts"):
        load_spec(ModelSettings(model=family_dir(family_root, name), default_prompt_name="nope"))
    if not named:
        return
    st = st_model(family_root, name)
    default = named[-1]
    spec_d = load_spec(ModelSettings(model=family_dir(family_root, name), default_prompt_name=default))
    tok = Tokenizer(spec_d)
    previous = st.default_prompt_name
    st.default_prompt_name = default
    try:
        want_ids = st_ids(st, families.TEXTS, prompt=spec.prompts[default])
        want = st.encode(families.TEXTS, convert_to_numpy=True)  # ST applies its default itself
    finally:
        st.default_prompt_name = previous
    assert floe_ids(tok, families.TEXTS) == want_ids
    eng = engine(family_root, name)
    got = eng.run(eng.prepare([np.asarray(x, dtype=np.int32) for x in floe_ids(tok, families.TEXTS)]))
    assert cosines(got, want).min() >= FP32_MIN_COS
    with pytest.raises(ValidationError, match="unknown prompt_name"):
        tok.encode(["x"], EncodeOptions(prompt_name="no-such-prompt"))


# --- family specifics ---------------------------------------------------------------------------

def test_embeddinggemma_spec_and_float16_refused(family_root):
    spec = spec_of(family_root, "embeddinggemma")
    assert spec.architecture == "Gemma3TextModel" and spec.model_type == "gemma3_text"
    assert spec.pooling == "mean" and spec.normalize
    assert [(d.in_features, d.out_features, d.bias) for d in spec.dense] == [(48, 192, False),
                                                                          (192, 48, False)]
    assert spec.prompts == families.EMBEDDINGGEMMA_PROMPTS
    assert spec.matryoshka_dims == (32, 16, 8)
    assert spec.max_seq_length == families.GEMMA_MAX_SEQ_LENGTH
    assert spec.refuse_float16
    with pytest.raises(ConfigError, match="float16 is refused.*bfloat16 or float32"):
        create_engine(spec, "torch", device="cpu", dtype="float16")


def test_embeddinggemma_tokens_bos_eos(family_root):
    tok = tokenizer(family_root, "embeddinggemma")
    ids = floe_ids(tok, ["hello world", long_text()], prompt_name="query")
    for row in ids:
        assert row[0] == 2 and row[-1] == 1  # <bos> ... <eos>, also after truncation
        assert 2 not in row[1:] and 1 not in row[:-1]


def test_embeddinggemma_attention_is_bidirectional_and_windowed(family_root):
    """transformers honours use_bidirectional_attention (an early token sees a later one) and the
    sliding layers really restrict attention at the test lengths (changing the window changes the
    output), so parity above covers both."""
    import torch
    from transformers import AutoModel

    folder = family_dir(family_root, "embeddinggemma")
    model = AutoModel.from_pretrained(folder, attn_implementation="sdpa").eval()
    assert model.config.use_bidirectional_attention
    assert "sliding_attention" in model.config.layer_types and "full_attention" in model.config.layer_types
    ids = torch.tensor([floe_ids(tokenizer(family_root, "embeddinggemma"), [long_text(60)])[0]])
    assert ids.shape[1] > 3 * families.GEMMA_SLIDING_WINDOW
    changed = ids.clone()
    changed[0, -3] = (int(ids[0, -3]) + 7) % model.config.vocab_size
    with torch.no_grad():
        out = model(input_ids=ids).last_hidden_state
        out_changed = model(input_ids=changed).last_hidden_state
        model.config.sliding_window = ids.shape[1] + 1  # every layer sees the whole input
        out_wide = model(input_ids=ids).last_hidden_state
    assert not torch.allclose(out[0, 0], out_changed[0, 0], atol=1e-6)  # position 0 saw position -3
    assert not torch.allclose(out, out_wide, atol=1e-5)


def test_qwen3_appends_end_of_text_and_pools_it(family_root):
    spec, tok = spec_of(family_root, "qwen3-embedding"), tokenizer(family_root, "qwen3-embedding")
    assert spec.pooling == "last_token" and spec.architecture == "Qwen3ForCausalLM"
    eot = tok._plain.token_to_id("<|endoftext|>")
    for row in floe_ids(tok, ["hello world", long_text()], prompt_name="query"):
        assert row[-1] == eot
    # ST pads on the left for this tokenizer, floe on the right reading index length-1: the
    # padded-batch parity test covers both; here the padding side really differs.
    st = st_model(family_root, "qwen3-embedding")
    assert st.tokenizer.padding_side == "left" and spec.padding_side == "right"


def test_bge_m3_positions_under_right_padding(family_root):
    """XLM-R positions start at padding_idx + 1: a short input padded to a long one must keep its
    positions (the engine passes ids and mask; transformers derives positions from the pad id)."""
    spec = spec_of(family_root, "bge-m3")
    assert spec.pad_token_id == 1 and spec.max_position_limit == families.BGE_M3_MAX_SEQ_LENGTH
    eng, tok = engine(family_root, "bge-m3"), tokenizer(family_root, "bge-m3")
    texts = ["hello world", long_text()]
    np.testing.assert_allclose(floe_embed(eng, tok, texts)[0], floe_embed(eng, tok, texts[:1])[0],
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(Exception, match="exceeds what the model's positions allow"):
        load_spec(ModelSettings(model=family_dir(family_root, "bge-m3"),
                                max_seq_length=families.BGE_M3_MAX_SEQ_LENGTH + 1))


def test_matryoshka_dims_declared(family_root):
    expected = {"embeddinggemma": (32, 16, 8), "arctic-embed-m": (8,), "qwen3-embedding": (32, 16),
                "bge-m3": (), "modernbert-embed": (8,)}
    for name, dims in expected.items():
        assert spec_of(family_root, name).matryoshka_dims == dims, name
