"""The benchmark's workload generator: exact token lengths and the size/length distributions."""

from __future__ import annotations

import numpy as np
import pytest

from floe.bench.workload import (BenchError, BenchTokenizer, build_requests, load_model_spec,
                                 poisson_schedule, sample_values)


@pytest.fixture(scope="module")
def spec():
    return load_model_spec("default", max_seq_length=512)


@pytest.fixture(scope="module")
def tok(spec) -> BenchTokenizer:
    return BenchTokenizer(spec)


@pytest.fixture(scope="module")
def reference(spec):
    """A separate plain `tokenizers` instance on the model's tokenizer.json: what a server
    counts (special tokens included), checked independently of the code under test."""
    import os

    import tokenizers

    t = tokenizers.Tokenizer.from_file(os.path.join(spec.backbone_path, "tokenizer.json"))
    t.no_padding()
    t.no_truncation()
    return lambda text: len(t.encode(text).ids)


def test_minilm_facts(tok):
    # [CLS] ... [SEP]: the shortest non-empty text is one word plus two special tokens
    assert tok.n_special == 2
    assert tok.min_length == 3
    assert tok.max_seq_length == 512


@pytest.mark.parametrize("target", [3, 4, 5, 7, 16, 50, 128, 255, 256, 511, 512])
def test_exact_lengths_fast_path(tok, reference, target):
    rng = np.random.default_rng(target)
    texts, ids = tok.exact_texts([target] * 8, rng)
    for text, row in zip(texts, ids):
        assert text.strip()
        assert reference(text) == target
        assert len(row) == target
    assert len(set(texts)) > 1 or target == 3  # distinct texts, so no server cache helps


@pytest.mark.parametrize("target", [3, 4, 9, 50, 333, 512])
def test_exact_lengths_bisection_path(tok, reference, target):
    rng = np.random.default_rng(100 + target)
    for _ in range(3):
        text = tok.exact_text(target, rng)
        assert text and reference(text) == target


def test_short_targets_are_raised_to_shortest_text(tok, reference):
    # 1 and 2 tokens cannot be reached with a non-empty text under a [CLS]/[SEP] tokenizer
    lengths = tok.clamp(np.array([1, 2, 3, 4]))
    assert lengths.tolist() == [3, 3, 3, 4]
    texts, _ = tok.exact_texts(lengths.tolist(), np.random.default_rng(0))
    assert [reference(t) for t in texts] == [3, 3, 3, 4]


def test_unknown_model_is_a_bench_error(tmp_path):
    with pytest.raises(BenchError, match="no such folder"):
        load_model_spec(str(tmp_path / "nope" / "x"))
    with pytest.raises(BenchError, match="exceeds"):
        load_model_spec("default", max_seq_length=4096)


def test_out_of_range_targets_are_refused(tok):
    with pytest.raises(BenchError, match="max_seq_length"):
        tok.exact_text(513, np.random.default_rng(0))
    with pytest.raises(BenchError):
        tok.exact_texts([2], np.random.default_rng(0))


def test_multi_token_words_are_handled(tok, reference):
    # words such as "embeddings" split into several WordPieces; the generator must still land exactly
    texts, _ = tok.exact_texts(list(range(3, 40)), np.random.default_rng(7))
    assert [reference(t) for t in texts] == list(range(3, 40))
    assert any(w in " ".join(texts) for w in ("embeddings", "quantization", "multilingual"))


def test_seeded_generation_is_reproducible(tok):
    a = build_requests(tok, 5, 4, 20, "uniform", np.random.default_rng(42))
    b = build_requests(tok, 5, 4, 20, "uniform", np.random.default_rng(42))
    c = build_requests(tok, 5, 4, 20, "uniform", np.random.default_rng(43))
    assert [r.texts for r in a] == [r.texts for r in b]
    assert [r.texts for r in a] != [r.texts for r in c]


def test_build_requests_fixed(tok, reference):
    reqs = build_requests(tok, 6, 16, 50, "fixed", np.random.default_rng(1))
    assert len(reqs) == 6
    for r in reqs:
        assert len(r.texts) == len(r.ids) == 16
        assert r.client_tokens == 16 * 50
        assert all(reference(t) == 50 for t in r.texts)


def test_build_requests_distribution_applies_to_sizes_and_lengths(tok):
    reqs = build_requests(tok, 200, 8, 30, "uniform", np.random.default_rng(2))
    sizes = [len(r.texts) for r in reqs]
    lengths = [len(ids) for r in reqs for ids in r.ids]
    assert min(sizes) == 1 and max(sizes) == 8
    assert min(lengths) == 3 and max(lengths) == 30  # 1 and 2 raised to the shortest text
    assert sum(r.client_tokens for r in reqs) == sum(lengths)


N = 200_000


def test_fixed_distribution():
    v = sample_values("fixed", 64, 1000, np.random.default_rng(0))
    assert (v == 64).all()


@pytest.mark.parametrize("value", [1, 2, 16, 512])
def test_uniform_distribution(value):
    v = sample_values("uniform", value, N, np.random.default_rng(value))
    assert v.min() == 1 and v.max() == value
    assert abs(v.mean() - (value + 1) / 2) < 0.02 * value + 0.01
    if value >= 16:  # every value is reached with roughly equal frequency
        counts = np.bincount(v, minlength=value + 1)[1:]
        assert counts.min() > 0.8 * N / value and counts.max() < 1.2 * N / value


@pytest.mark.parametrize("value", [1, 16, 64, 512])
def test_normal_distribution(value):
    v = sample_values("normal", value, N, np.random.default_rng(value))
    assert v.min() >= 1 and v.max() <= value
    if value >= 64:
        # clipping at 2 sd on both sides keeps the mean at value/2 and trims the sd a little
        assert abs(v.mean() - value / 2) < 0.01 * value
        assert 0.85 * value / 4 < v.std() < value / 4
        assert v.min() == 1 and v.max() == value  # the clip bounds are reached
        inner = np.mean(np.abs(v - value / 2) <= value / 4)
        assert 0.66 < inner < 0.71  # ~68% within one sd


def test_bad_distribution_and_value():
    with pytest.raises(BenchError):
        sample_values("zipf", 4, 10, np.random.default_rng(0))
    with pytest.raises(BenchError):
        sample_values("fixed", 0, 10, np.random.default_rng(0))


def test_poisson_schedule():
    off = poisson_schedule(50_000, 200.0, np.random.default_rng(3))
    assert off[0] == 0.0 and (np.diff(off) >= 0).all()
    gaps = np.diff(off)
    assert abs(gaps.mean() - 1 / 200) < 0.02 / 200 * 5
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.03  # exponential gaps: sd == mean
    with pytest.raises(BenchError):
        poisson_schedule(10, 0.0, np.random.default_rng(0))


def test_bisection_and_token_slices_when_no_word_is_one_token(spec, reference):
    # every word splits into 3-4 WordPieces, so lengths in between need a decoded slice of ids
    tok = BenchTokenizer(spec, words=["embeddings", "quantization", "multilingual"])
    assert len(tok._singles) == 0
    texts, ids = tok.exact_texts(list(range(3, 30)), np.random.default_rng(5))
    assert [reference(t) for t in texts] == list(range(3, 30))
    assert [len(i) for i in ids] == list(range(3, 30))


def test_byte_level_bpe_tokenizer(tmp_path):
    """A GPT-style tokenizer (byte-level BPE, words carry their leading space, one EOS appended)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from floe.bench.workload import WORDS

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([" ".join(WORDS[i:] + WORDS[:i]) for i in range(0, len(WORDS), 7)], trainer)
    bpe.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[
        ("<eos>", bpe.token_to_id("<eos>"))])
    bpe.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(
        '{"model_type": "gpt2", "hidden_size": 8, "vocab_size": 400, "max_position_embeddings": 300}')

    tok = BenchTokenizer(load_model_spec(str(tmp_path)))
    assert tok.n_special == 1 and tok.min_length == 2 and tok.max_seq_length == 300
    targets = [2, 3, 5, 17, 64, 299, 300]
    texts, _ = tok.exact_texts(targets, np.random.default_rng(11))
    counts = [len(bpe.encode(t).ids) for t in texts]
    assert counts == targets


def test_lenient_count_marks_texts_past_the_models_length(tok):
    long = " ".join(["word"] * (tok.max_seq_length + 40))
    texts = ["a short one", long, "another short text"] * 100   # several chunks, each with a long text
    counts = tok.count_lenient(texts, chunk=64)
    assert len(counts) == 300
    assert (counts[1::3] == tok.max_seq_length + 1).all()
    short = tok.count(["a short one", "another short text"])
    assert (counts[0::3] == short[0]).all() and (counts[2::3] == short[1]).all()
