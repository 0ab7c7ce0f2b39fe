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

Checks (character limits, prompts, token-id ranges) live in floe/validate.py and run before any
of this: ``encode_plan`` trusts its inputs. ``encode`` is the convenience entry that validates and
tokenizes in one call, for library users (bench, corpus, tests).
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

from floe import chunking, validate
from floe.errors import ModelLoadError, ValidationError
from floe.models.spec import ModelSpec
from floe.protocol import EncodeOptions, TokenBatch
from floe.validate import CHARS_PER_TOKEN_LIMIT, Limits, Plan

# Below this many inputs a request is tokenized in one call; above it, it is split across the
# pool's threads. With the library's own threads on, it parallelizes inside one call, so small
# splits only add overhead; with them off (servers, see TokenizerPool), the pool's threads are
# the only parallelism and a chunk of 32 texts (~2.5 ms of work) pays for its hand-over.
_MIN_CHUNK = 256
_MIN_CHUNK_POOL_ONLY = 32
# Requests at most this small are tokenized on the event loop (bounded: ~50 us of work).
_INLINE_ITEMS = 4
_INLINE_CHARS = 2048


def _has_lowercase(normalizer) -> bool:
    if normalizer is None:
        return False
    if isinstance(normalizer, normalizers.Lowercase):
        return True
    if isinstance(normalizer, normalizers.Sequence):
        return any(isinstance(n, normalizers.Lowercase) for n in normalizer)
    return False


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
        # Pairs (query, document) are cut in the document only, so the query a reranker scores
        # against is never shortened ("only_second"); a query too long on its own falls back to
        # "longest_first" (sentence-transformers' CrossEncoder always cuts longest first).
        self._pair_trunc = {}
        for direction in ("right", "left"):
            for table, strategy in ((self._trunc, "longest_first"), (self._pair_trunc, "only_second")):
                tok = _RustTokenizer.from_str(serialized)
                tok.enable_truncation(self.max_seq_length, strategy=strategy, direction=direction)
                table[direction] = tok
        self._limits = self.limits()
        self._template: Optional[tuple[list[int], list[int]]] = None

    def limits(self, max_items: int = 2 ** 31, auto_truncate: bool = True,
               default_prompt_name: Optional[str] = None) -> Limits:
        return Limits.build(self.spec, max_items=max_items, max_input_chars=self.max_input_chars,
                            auto_truncate=auto_truncate, default_prompt_name=default_prompt_name)

    # --- encoding ----------------------------------------------------------------------------

    def encode(self, texts: Sequence[str], options: EncodeOptions, auto_truncate: bool = True,
               default_prompt_name: Optional[str] = None) -> TokenBatch:
        """Validates (floe/validate.py) and tokenizes a batch as sentence-transformers would.
        Raises ValidationError / TooLargeError naming ``input[i]``."""
        limits = self.limits(auto_truncate=auto_truncate, default_prompt_name=default_prompt_name)
        plan = validate.check_options(limits, options)
        return self.encode_plan(validate.check_texts(limits, texts, plan), plan)

    def encode_plan(self, texts: Sequence[str], plan: Plan, base_index: int = 0) -> TokenBatch:
        """Tokenizes texts that validation already accepted, with its prompt and truncation;
        ``base_index`` is the position of ``texts[0]`` in the request, so errors name the
        client's index."""
        prompt = plan.prompt
        prepared = [prompt + t for t in texts] if prompt else list(texts)
        tok = self._trunc[plan.direction] if plan.truncate else self._plain
        try:
            encodings = tok.encode_batch_fast(prepared, add_special_tokens=True)
        except Exception:  # noqa: BLE001 - validation let through something the tokenizer refuses
            raise ValidationError("the tokenizer rejected the input", param="input") from None
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
        ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.int32,
                          count=int(lengths.sum()))
        validate.check_token_lengths(self._limits, lengths, plan.truncate, base_index=base_index)
        return TokenBatch(ids=ids, lengths=lengths)

    def encode_pairs(self, query: str, documents: Sequence[str], plan: Plan,
                     base_index: int = 0) -> TokenBatch:
        """Tokenizes (query, document) pairs as a cross-encoder reads them (``[CLS] q [SEP] d
        [SEP]`` for BERT), with each pair's type split; inputs already validated. Truncation
        cuts the document, never the query, unless the query alone is over the max length."""
        query = self._bound_query(query, plan)
        pairs = [(query, d) for d in documents]
        try:
            if not plan.truncate:
                encodings = self._plain.encode_batch_fast(pairs, add_special_tokens=True)
            else:
                try:
                    encodings = self._pair_trunc[plan.direction].encode_batch_fast(
                        pairs, add_special_tokens=True)
                except Exception:  # noqa: BLE001 - the query alone leaves no room for a document
                    encodings = self._trunc[plan.direction].encode_batch_fast(
                        pairs, add_special_tokens=True)
        except Exception:  # noqa: BLE001 - validation let through something the tokenizer refuses
            raise ValidationError("the tokenizer rejected the input", param="documents") from None
        n = len(encodings)
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=n)
        ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.int32,
                          count=int(lengths.sum()))
        types = np.fromiter(itertools.chain.from_iterable(e.type_ids for e in encodings),
                            dtype=np.int8, count=int(lengths.sum()))
        validate.check_token_lengths(self._limits, lengths, plan.truncate, param="documents",
                                     base_index=base_index)
        # type ids are 0 then 1 (BERT) or all 0 (RoBERTa-likes): the split is the count of 0s
        # when any 1 follows, else the length
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        zeros = np.add.reduceat((types == 0).astype(np.int64), offsets[:-1]) if n else lengths
        ones = lengths - zeros
        splits = np.where(ones > 0, zeros, lengths)
        return TokenBatch(ids=ids, lengths=lengths, type_splits=splits)

    def _bound_query(self, query: str, plan: Plan) -> str:
        """The query cut to the max length's worth of tokens, once. Every pair re-tokenizes its
        query: without the cut, one long query against many documents would cost the front end
        query length x documents (a small request worth minutes of CPU). The cut keeps exactly
        the tokens truncation could keep (the first max-length tokens, or the last for left
        truncation); without truncation such a query cannot fit, and is refused here."""
        limit = self.max_seq_length
        if len(query) <= limit:   # a token holds at least one character
            return query
        enc = self._plain.encode(query, add_special_tokens=False)
        if len(enc.ids) <= limit:
            return query
        if not plan.truncate:
            raise ValidationError(
                f"`query` alone has {len(enc.ids)} tokens, over the model's maximum context length "
                f"of {limit}; shorten it or enable truncation", param="query")
        if plan.direction == "right":
            return query[: enc.offsets[limit][0]]
        return query[enc.offsets[len(enc.ids) - limit][0]:]

    def validate_ids(self, tokens: TokenBatch, options: Optional[EncodeOptions] = None,
                     auto_truncate: bool = True) -> TokenBatch:
        """Checks (and truncates) client-sent token ids; see validate.check_token_batch."""
        limits = self.limits(auto_truncate=auto_truncate)
        plan = validate.check_options(limits, options or EncodeOptions())
        return validate.check_token_batch(limits, tokens, plan)

    # --- documents cut into chunks (floe/chunking.py) --------------------------------------------

    def special_tokens(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer puts before and after a single text ([CLS] / [SEP] for BERT)."""
        if self._template is None:
            enc = self._plain.post_process(self._plain.encode("a", add_special_tokens=False))
            content = [i for i, m in enumerate(enc.special_tokens_mask) if not m]
            first, last = (content[0], content[-1]) if content else (len(enc.ids), len(enc.ids))
            self._template = (list(enc.ids[:first]), list(enc.ids[last + 1:]))
        return self._template

    def encode_chunked(self, texts: Sequence[str], plan: Plan, options: "chunking.ChunkOptions",
                       base_index: int = 0) -> "chunking.Chunked":
        """Cuts validated texts into chunks (floe/chunking.py) and returns what the model runs.

        Plain chunking: one sequence per chunk, the chunk's own text ``text[start:end]``
        tokenized with the prompt as ``encode`` would (so each embedding is the library's
        ``encode`` of that text); in the rare case where that text tokenizes longer than the
        chunk (a cut inside a word), the document's own tokens are used instead. Late chunking:
        one sequence per macro-window of the document (the prompt once, at its head), each chunk
        a span of it."""
        prefix, suffix = self.special_tokens()
        prompt_ids = (self._plain.encode(plan.prompt, add_special_tokens=False).ids
                      if plan.prompt else [])
        head = len(prefix) + len(prompt_ids)
        overhead = head + len(suffix)
        limit = options.max_tokens or self.max_seq_length
        budget = limit - overhead
        if budget <= options.overlap:
            chunking.budget_error(limit, overhead, options.overlap)
        window = self.max_seq_length - overhead
        try:
            docs = self._plain.encode_batch(list(texts), add_special_tokens=False)
        except Exception:  # noqa: BLE001 - validation let through something the tokenizer refuses
            raise ValidationError("the tokenizer rejected the input", param="input") from None
        out = chunking.ChunkedBuilder()
        for i, (text, doc) in enumerate(zip(texts, docs)):
            ids, offsets = doc.ids, doc.offsets
            sentence, word = chunking.boundaries(text, offsets)
            spans = chunking.split(len(ids), budget, options.overlap, sentence, word)
            chars = [(offsets[a][0], offsets[b - 1][1]) for a, b in spans]
            out.add_document(base_index + i, chars)
            if not spans:
                continue
            if options.late:
                self._late_sequences(out, ids, spans, window, prompt_ids)
                continue
            pieces = [plan.prompt + text[a:b] for a, b in chars]
            for (a, b), enc in zip(spans, self._plain.encode_batch_fast(pieces, add_special_tokens=True)):
                seq = enc.ids if len(enc.ids) <= limit else prefix + prompt_ids + ids[a:b] + suffix
                out.add_sequence(seq)
        return out.build()

    def encode_late(self, texts: Sequence[str], plan: Plan, base_index: int = 0) -> "chunking.Chunked":
        """Late chunking of a document the client already cut (Jina's ``late_chunking``): the
        texts are one document's chunks, in order. Each is tokenized alone, without special
        tokens; the document is their tokens end to end (the prompt once, at its head), run in
        one pass, or in macro-windows when longer than the model's context; each text's embedding
        is pooled from its own tokens. A text longer than a window is cut (truncation on) or
        refused, as an input over the max length is."""
        prefix, suffix = self.special_tokens()
        prompt_ids = (self._plain.encode(plan.prompt, add_special_tokens=False).ids
                      if plan.prompt else [])
        head = len(prefix) + len(prompt_ids)
        window = self.max_seq_length - head - len(suffix)
        if window < 1:
            chunking.budget_error(self.max_seq_length, head + len(suffix), 0)
        try:
            encs = self._plain.encode_batch_fast(list(texts), add_special_tokens=False)
        except Exception:  # noqa: BLE001 - validation let through something the tokenizer refuses
            raise ValidationError("the tokenizer rejected the input", param="input") from None
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        chars: list[tuple[int, int]] = []
        pos = 0
        for i, enc in enumerate(encs):
            piece = enc.ids
            param = f"input[{base_index + i}]"
            if not piece:
                raise ValidationError(f"{param} produced no tokens", param=param)
            if len(piece) > window:
                if not plan.truncate:
                    raise validate.context_error(self._limits, len(piece) + head + len(suffix),
                                                 base_index + i)
                piece = piece[:window] if plan.direction == "right" else piece[-window:]
            spans.append((len(ids), len(ids) + len(piece)))
            ids.extend(piece)
            chars.append((pos, pos + len(texts[i])))
            pos += len(texts[i])
        out = chunking.ChunkedBuilder()
        out.add_document(0, chars)
        self._late_sequences(out, ids, spans, window, prompt_ids)
        return out.build()

    def _late_sequences(self, out: "chunking.ChunkedBuilder", ids: list[int],
                        spans: list[tuple[int, int]], window: int, prompt_ids: list[int]) -> None:
        """The sequences of one late-chunked document: a macro-window each, its chunks as spans
        of the window's positions. The document's first chunk also pools the leading special
        tokens (and the prompt, where the model's pooling includes it) and its last chunk the
        trailing ones, so a document of one chunk is pooled exactly as its plain embedding is."""
        prefix, suffix = self.special_tokens()
        head = len(prefix) + len(prompt_ids)
        lead = 0 if self.spec.include_prompt else head
        for ws, we, members in chunking.cover(spans, len(ids), window):
            seq = prefix + prompt_ids + ids[ws:we] + suffix
            bounds = []
            for k in members:
                a, b = spans[k][0] - ws + head, spans[k][1] - ws + head
                if spans[k][0] == 0:
                    a = min(lead, a)
                if spans[k][1] == len(ids):
                    b = len(seq)
                bounds.append((a, b))
            out.add_sequence(seq, bounds)

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
        """The text of a sequence of ids (the bench's exact-length prompts are built with it)."""
        return self._plain.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


class TokenizerPool:
    """Runs ``Tokenizer.encode_plan`` on a thread pool so the event loop never tokenizes.

    A large request is split into chunks across the pool's threads (the Rust tokenizer releases
    the GIL), and the pieces are joined back in order.

    ``library_threads=False`` (the front ends of a server) makes the Rust library run each call on
    its calling thread, for the whole process: TOKENIZERS_PARALLELISM=false unless the user set
    it. A server tokenizes many small requests at once, one call each on a pool thread; with the
    library's own thread pool on, each call was split again into jobs of a few texts whose worker
    threads spin waiting for more, which on 2 cores beside the replicas cost the front end up to
    twice the CPU per text of a lone caller (docs/benchmarks.md). The pool then splits requests
    itself from 2 x 32 texts up, so a lone large request still uses every thread.
    """

    def __init__(self, spec: ModelSpec, workers: int, max_input_chars: Optional[int] = None,
                 library_threads: bool = True) -> None:
        if not library_threads:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.tokenizer = Tokenizer(spec, max_input_chars=max_input_chars)
        self.workers = max(1, int(workers))
        self._min_chunk = _MIN_CHUNK if library_threads else _MIN_CHUNK_POOL_ONLY
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="floe-tokenize")

    async def run(self, fn, *args):
        """Runs ``fn(*args)`` on the pool (for per-item work that must stay off the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def encode_plan(self, texts: Sequence[str], plan: Plan) -> TokenBatch:
        tok = self.tokenizer
        n = len(texts)
        if n <= _INLINE_ITEMS and sum(map(len, texts)) + n * len(plan.prompt) <= _INLINE_CHARS:
            # A few short texts tokenize in tens of microseconds: less than the hop to a thread.
            return tok.encode_plan(texts, plan)
        loop = asyncio.get_running_loop()
        chunks = min(self.workers, max(1, n // self._min_chunk))
        if chunks == 1:
            return await loop.run_in_executor(self._executor, tok.encode_plan, texts, plan, 0)
        bounds = np.linspace(0, n, chunks + 1).astype(int)
        parts = await asyncio.gather(*(
            loop.run_in_executor(self._executor, tok.encode_plan, texts[a:b], plan, int(a))
            for a, b in zip(bounds[:-1], bounds[1:])))
        return TokenBatch(ids=np.concatenate([p.ids for p in parts]),
                          lengths=np.concatenate([p.lengths for p in parts]))

    async def encode_pairs(self, query: str, documents: Sequence[str], plan: Plan) -> TokenBatch:
        """``Tokenizer.encode_pairs`` off the event loop, split across the pool like texts."""
        tok = self.tokenizer
        n = len(documents)
        if n <= _INLINE_ITEMS and sum(map(len, documents)) + n * len(query) <= _INLINE_CHARS:
            return tok.encode_pairs(query, documents, plan)
        loop = asyncio.get_running_loop()
        chunks = min(self.workers, max(1, n // self._min_chunk))
        bounds = np.linspace(0, n, chunks + 1).astype(int)
        parts = await asyncio.gather(*(
            loop.run_in_executor(self._executor, tok.encode_pairs, query, documents[a:b], plan, int(a))
            for a, b in zip(bounds[:-1], bounds[1:])))
        if len(parts) == 1:
            return parts[0]
        return TokenBatch(ids=np.concatenate([p.ids for p in parts]),
                          lengths=np.concatenate([p.lengths for p in parts]),
                          type_splits=np.concatenate([p.type_splits for p in parts]))

    async def encode_chunked(self, texts: Sequence[str], plan: Plan,
                             options: "chunking.ChunkOptions") -> "chunking.Chunked":
        """``Tokenizer.encode_chunked`` off the event loop, documents split across the pool."""
        tok = self.tokenizer
        loop = asyncio.get_running_loop()
        n = len(texts)
        # a document is many texts' worth of work: split from a few documents up
        chunks = min(self.workers, max(1, n // 2))
        bounds = np.linspace(0, n, chunks + 1).astype(int)
        parts = await asyncio.gather(*(
            loop.run_in_executor(self._executor, tok.encode_chunked, texts[a:b], plan, options,
                                 int(a))
            for a, b in zip(bounds[:-1], bounds[1:])))
        return chunking.Chunked.concat(parts)

    async def encode_late(self, texts: Sequence[str], plan: Plan) -> "chunking.Chunked":
        """``Tokenizer.encode_late`` off the event loop (one document: one call)."""
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, self.tokenizer.encode_late, texts, plan)

    async def encode(self, texts: Sequence[str], options: EncodeOptions, auto_truncate: bool = True,
                     default_prompt_name: Optional[str] = None) -> TokenBatch:
        """Validates and tokenizes (library convenience; servers validate once at their edge)."""
        limits = self.tokenizer.limits(auto_truncate=auto_truncate,
                                       default_prompt_name=default_prompt_name)
        plan = validate.check_options(limits, options)
        return await self.encode_plan(validate.check_texts(limits, texts, plan), plan)

    def validate_ids(self, tokens: TokenBatch, options: Optional[EncodeOptions] = None,
                     auto_truncate: bool = True) -> TokenBatch:
        return self.tokenizer.validate_ids(tokens, options, auto_truncate)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
