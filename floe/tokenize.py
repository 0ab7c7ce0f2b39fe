"""Text to token ids in the front end: sentence-transformers parity, off the event loop.

This module uses the Rust ``tokenizers`` library on the model's tokenizer.json directly (never
transformers, never torch: the front end must stay light). It reproduces what
``SentenceTransformer.encode`` feeds its model, token for token:

- the prompt string is prepended to the text (``prompt + text``), exactly as ST does;
- ``do_lower_case`` from sentence_bert_config.json adds a Lowercase normalizer, as ST does;
- the tokenizer's own special tokens are added; truncation keeps ``max_seq_length`` tokens,
  special tokens included ("longest_first"), from the right or (on request) from the left.

The baked-in padding/truncation of tokenizer.json (MiniLM ships fixed padding to 128) is removed:
batches are padded by the engine, to their real longest length.

Character pre-limit: an input longer than ``max_input_chars`` (default 250 x max_seq_length) is
cut to that many characters before tokenizing when truncation is on (head kept for right
truncation, tail for left), and refused with TooLargeError (413) when truncation is off. This
bounds tokenizer CPU per request. The cut cannot change the result unless the kept characters hold
fewer than max_seq_length tokens, i.e. more than 250 characters per token on average (whitespace
runs, not text).
"""

from __future__ import annotations

import asyncio
import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np
from tokenizers import Tokenizer as _RustTokenizer
from tokenizers import normalizers

from floe.errors import ModelLoadError, TooLargeError, ValidationError
from floe.models.spec import ModelSpec
from floe.protocol import EncodeOptions, TokenBatch

CHARS_PER_TOKEN_LIMIT = 250  # TEI's pre-limit: 250 characters per allowed token

# Below this many inputs a request is tokenized in one call; above it, it is split across the
# pool's threads (the Rust library also parallelizes inside one call, so small splits only add
# overhead).
_MIN_CHUNK = 256


def _has_lowercase(normalizer) -> bool:
    if normalizer is None:
        return False
    if isinstance(normalizer, normalizers.Lowercase):
        return True
    if isinstance(normalizer, normalizers.Sequence):
        return any(isinstance(n, normalizers.Lowercase) for n in normalizer)
    return False


def _context_error(max_len: int, got: int, i: int) -> ValidationError:
    # vLLM's wording, which clients and their retry logic already recognise.
    return ValidationError(
        f"This model's maximum context length is {max_len} tokens. However, you requested {got} "
        f"tokens in input[{i}] for embedding generation. Please reduce the length of the input, or "
        "enable truncation.", param=f"input[{i}]")


class Tokenizer:
    """A model's tokenizer. ``encode`` is synchronous, thread-safe and takes a whole batch."""

    def __init__(self, spec: ModelSpec, max_input_chars: Optional[int] = None) -> None:
        self.spec = spec
        self.max_seq_length = spec.max_seq_length
        self.max_input_chars = max_input_chars or CHARS_PER_TOKEN_LIMIT * spec.max_seq_length
        path = os.path.join(spec.backbone_path, "tokenizer.json")
        try:
            base = _RustTokenizer.from_file(path)
        except Exception as exc:  # noqa: BLE001 - any parse failure is a load failure
            raise ModelLoadError(f"cannot load {path}: {exc}") from None
        base.no_padding()
        base.no_truncation()
        if spec.do_lower_case and not _has_lowercase(base.normalizer):
            # Same construction as sentence-transformers' Transformer(do_lower_case=True).
            current = base.normalizer
            chain = [normalizers.Lowercase()]
            if isinstance(current, normalizers.Sequence):
                chain += list(current)
            elif current is not None:
                chain.append(current)
            base.normalizer = normalizers.Sequence(chain)
        serialized = base.to_str()
        # One immutable tokenizer per truncation mode: the Rust object's truncation is state, and
        # threads share these objects, so it is configured once here and never changed.
        self._plain = base
        self._trunc = {}
        for direction in ("right", "left"):
            tok = _RustTokenizer.from_str(serialized)
            tok.enable_truncation(self.max_seq_length, strategy="longest_first", direction=direction)
            self._trunc[direction] = tok

    # --- prompts -----------------------------------------------------------------------------

    def resolve_prompt(self, options: EncodeOptions, default_prompt_name: Optional[str] = None) -> str:
        """The prompt string for a request: explicit ``prompt``, else ``prompt_name``, else default."""
        if options.prompt is not None and options.prompt_name:
            raise ValidationError("pass either prompt or prompt_name, not both", param="prompt_name")
        if options.prompt is not None:
            return options.prompt
        name = options.prompt_name or default_prompt_name or self.spec.default_prompt_name
        if not name:
            return ""
        try:
            return self.spec.prompts[name]
        except KeyError:
            names = ", ".join(sorted(self.spec.prompts)) or "none (the model defines no prompts)"
            raise ValidationError(f"unknown prompt_name {name!r}; available: {names}",
                                  param="prompt_name") from None

    # --- encoding ----------------------------------------------------------------------------

    def encode(self, texts: Sequence[str], options: EncodeOptions, auto_truncate: bool = True,
               default_prompt_name: Optional[str] = None) -> TokenBatch:
        """Tokenizes a batch as sentence-transformers would (prompt, lowercase, special tokens,
        truncation). Raises ValidationError / TooLargeError naming ``input[i]``."""
        prompt = self.resolve_prompt(options, default_prompt_name)
        truncate = auto_truncate if options.truncate is None else bool(options.truncate)
        return self.encode_resolved(texts, prompt, truncate, options.truncation_direction)

    def encode_resolved(self, texts: Sequence[str], prompt: str, truncate: bool, direction: str,
                        base_index: int = 0) -> TokenBatch:
        """``encode`` with the prompt and truncation already decided; ``base_index`` is the
        position of ``texts[0]`` in the request, so errors name the client's index."""
        if direction not in ("right", "left"):
            raise ValidationError(f"truncation_direction must be 'right' or 'left', not {direction!r}",
                                  param="truncation_direction")
        limit = self.max_input_chars
        prepared: list[str] = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValidationError(f"input[{base_index + i}] is not a string",
                                      param=f"input[{base_index + i}]")
            if len(text) > limit:
                if not truncate:
                    raise TooLargeError(
                        f"input[{base_index + i}] has {len(text)} characters; the limit is {limit} "
                        f"({CHARS_PER_TOKEN_LIMIT} x max_seq_length) when truncation is off",
                        param=f"input[{base_index + i}]")
                text = text[:limit] if direction == "right" else text[-limit:]
            prepared.append(prompt + text if prompt else text)
        tok = self._trunc[direction] if truncate else self._plain
        try:
            encodings = tok.encode_batch_fast(prepared, add_special_tokens=True)
        except Exception:
            raise self._locate_bad_text(prepared, base_index) from None
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
        ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.int32,
                          count=int(lengths.sum()))
        if lengths.size and lengths.min() == 0:
            i = int(np.argmin(lengths))
            raise ValidationError(f"input[{base_index + i}] produced no tokens", param=f"input[{base_index + i}]")
        if not truncate and lengths.size and lengths.max() > self.max_seq_length:
            i = int(np.argmax(lengths > self.max_seq_length))
            raise _context_error(self.max_seq_length, int(lengths[i]), base_index + i)
        return TokenBatch(ids=ids, lengths=lengths)

    @staticmethod
    def _locate_bad_text(texts: Sequence[str], base_index: int) -> ValidationError:
        for i, text in enumerate(texts):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                return ValidationError(
                    f"input[{base_index + i}] is not valid Unicode text (it holds a lone surrogate "
                    "or another code point UTF-8 cannot encode)", param=f"input[{base_index + i}]")
        return ValidationError("the tokenizer rejected the input", param="input")

    # --- token-id input ----------------------------------------------------------------------

    def validate_ids(self, tokens: TokenBatch, options: Optional[EncodeOptions] = None,
                     auto_truncate: bool = True) -> TokenBatch:
        """Checks client-sent ids: 0 <= id < vocab_size, no empty item, length <= max_seq_length
        (cut to it, from the side ``truncation_direction`` names, when truncation is on)."""
        options = options or EncodeOptions()
        truncate = auto_truncate if options.truncate is None else bool(options.truncate)
        lengths = tokens.lengths
        if lengths.size and lengths.min() <= 0:
            i = int(np.argmin(lengths))
            raise ValidationError(f"input[{i}] is an empty list of token ids", param=f"input[{i}]")
        ids = tokens.ids
        bad = (ids < 0) | (ids >= self.spec.vocab_size)
        if bad.any():
            pos = int(np.argmax(bad))
            i = int(np.searchsorted(tokens.offsets(), pos, side="right") - 1)
            raise ValidationError(
                f"Token id {int(ids[pos])} in input[{i}] is out of vocabulary "
                f"(valid ids are 0..{self.spec.vocab_size - 1})", param=f"input[{i}]")
        max_len = self.max_seq_length
        if not lengths.size or lengths.max() <= max_len:
            return tokens
        if not truncate:
            i = int(np.argmax(lengths > max_len))
            raise _context_error(max_len, int(lengths[i]), i)
        if options.truncation_direction not in ("right", "left"):
            raise ValidationError("truncation_direction must be 'right' or 'left'",
                                  param="truncation_direction")
        # Keep, per item, the first (right truncation) or last (left) max_len ids: one mask over
        # the concatenated ids, no per-item Python loop.
        off = tokens.offsets()
        item_of = np.repeat(np.arange(tokens.n), lengths)
        pos_in_item = np.arange(ids.shape[0]) - off[item_of]
        if options.truncation_direction == "right":
            keep = pos_in_item < max_len
        else:
            keep = pos_in_item >= (lengths[item_of] - max_len)
        return TokenBatch(ids=ids[keep], lengths=np.minimum(lengths, max_len))

    # --- the other way -----------------------------------------------------------------------

    def decode_tokens(self, ids: Sequence[int]) -> list[str]:
        """The token string of each id (for /tokenize); out-of-vocabulary ids are a ValidationError."""
        out = []
        for tid in ids:
            tok = self._plain.id_to_token(int(tid)) if 0 <= int(tid) else None
            if tok is None:
                raise ValidationError(f"Token id {int(tid)} is out of vocabulary", param="ids")
            out.append(tok)
        return out

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of a sequence of ids (for /detokenize-style endpoints)."""
        return self._plain.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


class TokenizerPool:
    """Runs ``Tokenizer.encode`` on a thread pool so the event loop never tokenizes.

    A large request is split into chunks across the pool's threads (the Rust tokenizer releases
    the GIL), and the pieces are joined back in order.
    """

    def __init__(self, spec: ModelSpec, workers: int, max_input_chars: Optional[int] = None) -> None:
        self.tokenizer = Tokenizer(spec, max_input_chars=max_input_chars)
        self.workers = max(1, int(workers))
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="floe-tokenize")

    async def encode(self, texts: Sequence[str], options: EncodeOptions, auto_truncate: bool = True,
                     default_prompt_name: Optional[str] = None) -> TokenBatch:
        tok = self.tokenizer
        prompt = tok.resolve_prompt(options, default_prompt_name)
        truncate = auto_truncate if options.truncate is None else bool(options.truncate)
        direction = options.truncation_direction
        loop = asyncio.get_running_loop()
        n = len(texts)
        chunks = min(self.workers, max(1, n // _MIN_CHUNK))
        if chunks == 1:
            return await loop.run_in_executor(self._executor, tok.encode_resolved, list(texts),
                                              prompt, truncate, direction, 0)
        bounds = np.linspace(0, n, chunks + 1).astype(int)
        parts = await asyncio.gather(*(
            loop.run_in_executor(self._executor, tok.encode_resolved, list(texts[a:b]), prompt,
                                 truncate, direction, int(a))
            for a, b in zip(bounds[:-1], bounds[1:])))
        return TokenBatch(ids=np.concatenate([p.ids for p in parts]),
                          lengths=np.concatenate([p.lengths for p in parts]))

    def validate_ids(self, tokens: TokenBatch, options: Optional[EncodeOptions] = None,
                     auto_truncate: bool = True) -> TokenBatch:
        return self.tokenizer.validate_ids(tokens, options, auto_truncate)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
