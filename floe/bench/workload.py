"""The benchmark's workload: prompts whose token counts are exact under the served model's tokenizer.

A prompt of "50 tokens" means 50 ids as the server counts them, special tokens included, so that
throughput figures in tokens/s mean the same thing for every server measured. Text is drawn from a
seeded word list; each text's length is predicted from per-word token counts, then checked with the
real tokenizer in one batch call, and the rare text whose prediction was wrong is rebuilt by
bisection on words, then on tokens (decoding a slice of ids).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

DISTRIBUTIONS = ("fixed", "uniform", "normal")

# Plain lower-case English: mostly one WordPiece/BPE token each, plus a few longer words that split
# into several tokens, so both the fast path and the exactness check are exercised on real models.
WORDS = tuple("""
the of and to in is that for it as was with be by on not he this are or his from at which but have
an they you were her she there been one all we their has would when if so no will more can who out
said about other into than time only some could them first very also new after two what these may
any made over where most way did many before must through back years much down people should because
each just those how too state good well our used own long being under never same while last might
great since against right three world still public another here without between both house life
river mountain garden window morning evening music history science market language question answer
tokenization embeddings throughput latency quantization transformer multilingual retrieval semantic
indexing benchmark parallelism
""".split())


class BenchError(Exception):
    """A benchmark that cannot run as asked (bad option, unreachable server); exit status 2."""


def sample_values(distribution: str, value: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """n integers in [1, value]: ``fixed`` = value; ``uniform`` on [1, value]; ``normal`` with mean
    value/2 and sd value/4, rounded and clipped to [1, value] (ArcticInference's definitions)."""
    if value < 1:
        raise BenchError(f"sizes and lengths must be >= 1, got {value}")
    if distribution == "fixed":
        return np.full(n, value, dtype=np.int64)
    if distribution == "uniform":
        return rng.integers(1, value + 1, size=n, dtype=np.int64)
    if distribution == "normal":
        draws = np.rint(rng.normal(value / 2.0, value / 4.0, size=n))
        return np.clip(draws, 1, value).astype(np.int64)
    raise BenchError(f"unknown distribution {distribution!r}; use one of {', '.join(DISTRIBUTIONS)}")


def load_model_spec(model: str, max_seq_length: Optional[int] = None):
    """The ModelSpec the server builds for ``model`` ('default', a folder, or a hub id), with the
    same --max-seq-length override, so the bench tokenizes exactly as the server does."""
    from floe.config import ModelSettings
    from floe.errors import ConfigError, ModelLoadError
    from floe.models import load_spec

    try:
        return load_spec(ModelSettings(model=model, max_seq_length=max_seq_length))
    except (ModelLoadError, ConfigError) as e:
        raise BenchError(str(e)) from None


class BenchTokenizer:
    """The served model's tokenizer (floe.tokenize.Tokenizer on the same ModelSpec as the server).

    Counts include special tokens, and the model's default prompt when it has one: they are the
    counts a server reports back (floe's token_counts, OpenAI usage.prompt_tokens) for inputs
    that are not truncated.
    """

    def __init__(self, spec, words: Sequence[str] = WORDS) -> None:
        from floe.protocol import EncodeOptions
        from floe.tokenize import Tokenizer

        self.spec = spec
        self.model_dir = spec.path
        self.max_seq_length = int(spec.max_seq_length)
        self._tok = Tokenizer(spec)
        self._opts = EncodeOptions(truncate=False)
        # What the tokenizer adds around a text (special tokens, a default prompt): ``_pre`` ids
        # before it and ``_post`` after, found by comparing an empty text with a one-word one.
        empty, one = self._encode_one(""), self._encode_one("the")
        self._pre = next((i for i, (a, b) in enumerate(zip(empty, one)) if a != b), len(empty))
        self._post = len(empty) - self._pre
        self.n_special = len(empty)
        self._words = np.array(list(words), dtype=object)
        base = len(self._plain_ids("the"))
        first = [len(self._plain_ids(w)) for w in words]
        mid = [len(self._plain_ids("the " + w)) - base for w in words]
        self._first = np.array(first, dtype=np.int64)
        self._mid = np.array(mid, dtype=np.int64)
        singles = [i for i in range(len(first)) if first[i] == 1 and mid[i] == 1]
        self._singles = np.array(singles, dtype=np.int64)
        # the shortest non-empty text: empty strings are rejected by several servers
        self.min_length = self.n_special + 1

    def _encode_one(self, text: str) -> list[int]:
        from floe.errors import ValidationError

        try:
            return self.encode([text])[0]
        except ValidationError:  # a text that yields no ids at all (no special tokens)
            return []

    def _plain_ids(self, text: str) -> list[int]:
        ids = self._encode_one(text)
        return ids[self._pre: len(ids) - self._post]

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids per text, as the server makes them (no truncation: the generator stays in range)."""
        tb = self._tok.encode(list(texts), self._opts, auto_truncate=False)
        return [a.tolist() for a in np.split(tb.ids, tb.offsets()[1:-1])] if tb.n else []

    def count(self, texts: Sequence[str]) -> np.ndarray:
        tb = self._tok.encode(list(texts), self._opts, auto_truncate=False)
        return tb.lengths.copy()

    def count_lenient(self, texts: Sequence[str], chunk: int = 256) -> np.ndarray:
        """``count``, but a text past max_seq_length (which the tokenizer refuses) counts as
        max_seq_length + 1 instead of failing the call."""
        from floe.errors import FloeError

        out = []
        for i in range(0, len(texts), chunk):
            part = list(texts[i:i + chunk])
            try:
                out.extend(self.count(part).tolist())
            except FloeError:
                out.extend(self._count_one(t) for t in part)
        return np.array(out, dtype=np.int64)

    def _encode_lenient(self, texts: list[str]) -> list[list[int]]:
        """``encode``, but a text the tokenizer refuses (a mispredicted length past
        max_seq_length) gets no ids instead of failing the batch, so it is rebuilt."""
        from floe.errors import FloeError

        try:
            return self.encode(texts)
        except FloeError:
            return [self._encode_one(t) if self._count_one(t) <= self.max_seq_length else []
                    for t in texts]

    def _count_one(self, text: str) -> int:
        """Tokens in ``text``; past max_seq_length the tokenizer refuses, and any larger number
        serves the bisection as well as the exact one."""
        from floe.errors import FloeError

        try:
            return len(self.encode([text])[0])
        except FloeError:
            return self.max_seq_length + 1

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    # --- exact-length texts --------------------------------------------------------------------

    def clamp(self, lengths: np.ndarray) -> np.ndarray:
        """Targets below the shortest non-empty text are raised to it."""
        return np.maximum(np.asarray(lengths, dtype=np.int64), self.min_length)

    def _predicted_text(self, target: int, rng: np.random.Generator) -> str:
        """Words whose predicted token counts sum to ``target`` (special tokens included)."""
        budget = target - self.n_special
        idx = rng.integers(0, len(self._words), size=budget)
        counts = self._mid[idx].copy()
        counts[0] = self._first[idx[0]]
        k = int(np.searchsorted(np.cumsum(counts), budget, side="right"))
        rest = budget - int(counts[:k].sum())
        fill = rng.choice(self._singles, size=rest) if rest else np.empty(0, dtype=np.int64)
        return " ".join(self._words[np.concatenate([idx[:k], fill]).astype(np.int64)])

    def exact_text(self, target: int, rng: np.random.Generator, attempts: int = 20) -> str:
        """One text of exactly ``target`` tokens, by bisection: the longest prefix of a random word
        sequence that fits, then the first ids of one word more, decoded, when a word splits."""
        if target < self.min_length or target > self.max_seq_length:
            raise BenchError(f"cannot make a {target}-token text: lengths run from "
                             f"{self.min_length} to max_seq_length {self.max_seq_length}")
        for _ in range(attempts):
            words = list(self._words[rng.integers(0, len(self._words), size=target + 1)])
            lo, hi = 0, len(words)  # count(prefix of lo words) <= target holds; find the largest lo
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self._count_one(" ".join(words[:mid])) <= target:
                    lo = mid
                else:
                    hi = mid - 1
            text = " ".join(words[:lo])
            if lo and self._count_one(text) == target:
                return text
            longer = self._plain_ids(" ".join(words[: lo + 1]))
            want = target - self.n_special
            for k in (want, want - 1, want + 1, want - 2, want + 2):
                if 0 < k <= len(longer):
                    cand = self.decode(longer[:k])
                    if cand and self._count_one(cand) == target:
                        return cand
        raise BenchError(f"could not build a text of exactly {target} tokens with this tokenizer")

    def exact_texts(self, targets: Sequence[int], rng: np.random.Generator) -> tuple[list[str], list[list[int]]]:
        """Texts of exactly ``targets[i]`` tokens and their ids (special tokens included)."""
        for t in targets:
            if not self.min_length <= t <= self.max_seq_length:
                raise BenchError(f"cannot make a {t}-token text: lengths run from "
                                 f"{self.min_length} to max_seq_length {self.max_seq_length}")
        if len(self._singles):
            texts = [self._predicted_text(int(t), rng) for t in targets]
            ids = self._encode_lenient(texts)
        else:  # no one-token word to predict with: every text takes the exact path
            texts, ids = [""] * len(targets), [[] for _ in targets]
        for i, t in enumerate(targets):
            if len(ids[i]) != t or not texts[i]:  # prediction missed: rebuild this one exactly
                texts[i] = self.exact_text(int(t), rng)
                ids[i] = self.encode([texts[i]])[0]
        return texts, ids


@dataclass
class Request:
    """One request of the workload: its texts, their ids (special tokens included) and the
    client-side token count, used only when a server reports none."""

    texts: list[str]
    ids: list[list[int]]
    client_tokens: int


def build_requests(tok: BenchTokenizer, n_requests: int, batch_size: int, prompt_length: int,
                   distribution: str, rng: np.random.Generator) -> list[Request]:
    """``n_requests`` requests whose sizes and prompt lengths follow ``distribution``."""
    if n_requests <= 0:
        return []
    sizes = sample_values(distribution, batch_size, n_requests, rng)
    lengths = tok.clamp(sample_values(distribution, prompt_length, int(sizes.sum()), rng))
    texts, ids = tok.exact_texts(lengths.tolist(), rng)
    out, at = [], 0
    for s in sizes.tolist():
        chunk = ids[at: at + s]
        out.append(Request(texts=texts[at: at + s], ids=chunk, client_tokens=sum(map(len, chunk))))
        at += s
    return out


def poisson_schedule(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Send offsets (seconds from the start) of n Poisson arrivals at ``rate`` requests/s."""
    if not rate > 0 or not math.isfinite(rate):
        raise BenchError(f"--rate must be a positive number, got {rate}")
    gaps = rng.exponential(1.0 / rate, size=n)
    gaps[0] = 0.0  # the first request goes at once
    return np.cumsum(gaps)
