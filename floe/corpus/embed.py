"""The embedding step shared by the local and the Ray path: rows of one shard -> a result table.

    tokenize   texts -> token ids with floe's Tokenizer (sentence-transformers parity: prompt,
               lowercase, special tokens, truncation to max_seq_length), split over a thread pool
               (the Rust tokenizer releases the GIL)
    plan       the shard's sequences sorted by length and cut into batches under a token budget
               (padded cost = longest x count, the replica scheduler's rule). The whole window is
               known up front, so a sort gives the least padding; the replica's Scheduler, built
               for arrivals over time and a clock, has nothing to add here. The budget is the
               one measured fastest on the job's first batches (budget.py) unless one is given.
    run        engine.prepare + engine.run per batch -> (n, dim) float32 pooled rows
    post       normalize (as sentence-transformers does), Matryoshka slice then renormalize,
               output dtype -- the same steps as the replica's per-request post step
"""

from __future__ import annotations

import json
from concurrent.futures import Executor
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa

from floe.corpus.budget import Batch, BudgetTuner
from floe.corpus.reader import CorpusError, Rows
from floe import validate
from floe.chunking import ChunkOptions, Chunked, ChunkedBuilder
from floe.edge import prepare_texts
from floe.errors import FloeError
from floe.protocol import EncodeOptions, TokenBatch

# Rows per tokenizer call: big enough that a call's overhead is small, small enough to spread a
# shard over the pool's threads.
TOKENIZE_CHUNK = 512
OUTPUT_DTYPES = {"float32": pa.float32(), "float16": pa.float16()}
# A chunked job's columns: the document's id, the chunk's place in it (0-based), its characters
# [start, end) in the document's text, and the chunk's embedding.
CHUNK_COLUMNS = ("id", "chunk", "start", "end", "embedding")


@dataclass(frozen=True)
class CorpusOptions:
    """Everything that decides the content of the output (and so goes into the manifest)."""

    text_column: str = "text"
    id_column: Optional[str] = None
    prompt_name: Optional[str] = None
    dimensions: Optional[int] = None
    normalize: Optional[bool] = None    # None: the model's own pipeline decides (Normalize module)
    output_dtype: str = "float32"       # float32 | float16
    on_error: str = "fail"              # fail | skip
    shard_rows: int = 10_000
    # Documents of any length (floe/chunking.py): one output row per chunk of at most
    # chunk_tokens tokens, consecutive chunks sharing chunk_overlap; late_chunking pools each
    # chunk from its document's token states. None: one row per input row, cut to max length.
    chunk_tokens: Optional[int] = None
    chunk_overlap: int = 0
    late_chunking: bool = False

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Tokenized:
    """A shard after tokenizing: the sequences the engine runs (units), the output rows they give
    and the bad rows.

    Without chunking a unit is a good row: ``good`` holds their shard positions, one output row
    each. With chunking (``chunks`` set) the output rows are the chunks, in document order; a unit
    is a chunk (``good`` = their indices), or with late chunking a macro-window whose spans give
    several chunks (``tokens.spans``)."""

    rows: Rows
    good: np.ndarray            # units: shard positions of good rows, or chunk / window indices
    tokens: TokenBatch          # ids of the units, in the order of ``good``
    bad: dict                   # position -> reason
    chunks: Optional[Chunked] = None   # per output row: its row's shard position, chunk, offsets

    @property
    def n_tokens(self) -> int:
        return self.tokens.total_tokens

    @property
    def row_keys(self) -> np.ndarray:
        """Sorted keys of the output rows (what committed pieces record): shard positions, or
        chunk indices within the shard."""
        return self.good if self.chunks is None else np.arange(self.chunks.rows, dtype=np.int64)

    def rows_of(self, units: np.ndarray) -> np.ndarray:
        """Output row indices (into ``row_keys``) of units (positions in ``good`` order)."""
        spans = self.tokens.spans
        if spans is None:
            return units
        off = spans.offsets()
        return np.concatenate([np.arange(off[u], off[u + 1]) for u in units]) if len(units) \
            else np.zeros(0, np.int64)

    def units_of(self, done_rows: np.ndarray) -> np.ndarray:
        """Units (positions in ``good`` order) whose output rows are not all in ``done_rows``
        (a bool mask over ``row_keys``): what a resumed shard still computes."""
        spans = self.tokens.spans
        if spans is None:
            return np.flatnonzero(~done_rows)
        off = spans.offsets()
        if not len(done_rows):
            return np.zeros(0, np.int64)
        all_done = np.logical_and.reduceat(done_rows, off[:-1]) if len(off) > 1 else np.zeros(0, bool)
        return np.flatnonzero(~all_done)

    def run(self, engine, units: np.ndarray, seqs: list[np.ndarray]) -> np.ndarray:
        """The engine's rows for these units: one per unit, or one per span (late chunking)."""
        spans = self.tokens.spans
        if spans is None:
            return engine.run(engine.prepare(seqs))
        off = spans.offsets()
        return engine.run(engine.prepare(seqs, spans=[spans.bounds[off[u]:off[u + 1]]
                                                      for u in units]))


def post_process(arr: np.ndarray, normalize: bool, dimensions: Optional[int]) -> np.ndarray:
    """Matryoshka slice, then L2 normalization (x / max(||x||, 1e-12), as torch's F.normalize)."""
    if dimensions is not None and dimensions < arr.shape[1]:
        arr = arr[:, :dimensions]
    if normalize:
        norms = np.linalg.norm(arr, axis=1, keepdims=True)
        arr = arr / np.maximum(norms, 1e-12)
    return np.ascontiguousarray(arr, dtype=np.float32)


def embedding_type(dim: int, output_dtype: str) -> pa.DataType:
    return pa.list_(OUTPUT_DTYPES[output_dtype], dim)


def embedding_array(arr: np.ndarray, output_dtype: str) -> pa.FixedSizeListArray:
    n, dim = arr.shape
    flat = arr.astype(np.float16 if output_dtype == "float16" else np.float32, copy=False).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=OUTPUT_DTYPES[output_dtype]), dim)


class ShardEmbedder:
    """Tokenizes, batches and post-processes the shards of one job for a given model.

    It holds no engine: ``batches`` cuts a shard into forward passes, which the local path's
    engine workers (local.py) or a Ray actor's engines (engines.py) run with ``Tokenized.run``.
    ``tuner`` cuts the batches (a fixed budget, or the one it measures).
    """

    def __init__(self, spec, tokenizer, options: CorpusOptions, tuner: BudgetTuner) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        self.options = options
        self.tuner = tuner
        if options.dimensions is not None and not 1 <= options.dimensions <= spec.dim:
            raise CorpusError(f"--dimensions must be between 1 and {spec.dim} for {spec.name}, "
                              f"got {options.dimensions}")
        # The server's checks, once: prompt resolution, option ranges. Texts are cut to the
        # character budget and truncated to max_seq_length tokens, as the server does by default.
        self.limits = tokenizer.limits()
        try:
            self.plan = validate.check_options(
                self.limits, EncodeOptions(prompt_name=options.prompt_name, truncate=True))
        except FloeError as exc:
            raise CorpusError(f"--prompt-name: {exc}") from None
        if options.output_dtype not in OUTPUT_DTYPES:
            raise CorpusError(f"--output-dtype must be float32 or float16, not {options.output_dtype!r}")
        self.normalize = spec.normalize if options.normalize is None else options.normalize
        self.dim = options.dimensions or spec.dim
        self.chunk: Optional[ChunkOptions] = None
        if options.chunk_tokens is not None or options.late_chunking:
            try:
                self.chunk = validate.check_chunking(self.limits, ChunkOptions(
                    max_tokens=options.chunk_tokens, overlap=options.chunk_overlap,
                    late=options.late_chunking))
            except FloeError as exc:
                flag = {"chunking.max_tokens": "--chunk-tokens", "chunking.overlap":
                        "--chunk-overlap"}.get(exc.param or "", "--late-chunking")
                raise CorpusError(f"{flag}: {exc}") from None

    # --- tokenize ------------------------------------------------------------------------------

    def _encode(self, texts: list) -> TokenBatch:
        return prepare_texts(self.limits, self.tokenizer, texts, self.plan)

    def _encode_chunk(self, texts: list) -> tuple[TokenBatch, dict]:
        """Token ids of ``texts``; a text the tokenizer refuses becomes a bad row (by position)."""
        try:
            return self._encode(texts), {}
        except FloeError:
            pass
        bad: dict = {}
        parts: list[np.ndarray] = []
        lengths: list[int] = []
        for i, t in enumerate(texts):
            try:
                tb = self._encode([t])
            except FloeError as exc:
                bad[i] = f"cannot be tokenized: {exc}"
                continue
            parts.append(tb.ids)
            lengths.append(tb.total_tokens)
        ids = np.concatenate(parts) if parts else np.zeros(0, np.int32)
        return TokenBatch(ids=ids, lengths=np.asarray(lengths, dtype=np.int64)), bad

    def check_bad(self, rows: Rows, bad: dict) -> None:
        """With --on-error fail, raises naming the first bad row."""
        if bad and self.options.on_error == "fail":
            pos = min(bad)
            row = rows.shard.start + pos
            ident = rows.ids[pos].as_py()
            id_part = f" (id {ident!r})" if self.options.id_column and ident is not None else ""
            raise CorpusError(f"row {row}{id_part}: {bad[pos]}; pass --on-error skip to skip bad rows "
                              f"({len(bad)} bad row(s) in rows {rows.shard.start}-{rows.shard.end - 1})")

    def _chunk_texts(self, texts: list) -> tuple[Optional[Chunked], dict]:
        """Chunks of ``texts`` (input_index relative to the list); a text the tokenizer refuses
        becomes a bad row (by position), as in ``_encode_chunk``."""
        def one(ts: list) -> Chunked:
            checked = validate.check_texts(self.limits, ts, self.plan)
            return self.tokenizer.encode_chunked(checked, self.plan, self.chunk)
        try:
            return one(texts), {}
        except FloeError:
            pass
        bad: dict = {}
        parts: list[Chunked] = []
        for i, t in enumerate(texts):
            try:
                part = one([t])
            except FloeError as exc:
                bad[i] = f"cannot be tokenized: {exc}"
                continue
            part.input_index[:] = i
            parts.append(part)
        return (Chunked.concat(parts) if parts else None), bad

    def _tokenize_chunked(self, rows: Rows, pool: Optional[Executor]) -> Tokenized:
        bad = dict(rows.bad)
        self.check_bad(rows, bad)
        good = np.array([i for i in range(len(rows.texts)) if i not in bad], dtype=np.int64)
        texts = [rows.texts[i] for i in good]
        step = max(1, TOKENIZE_CHUNK // 16)   # a document is many texts' worth of tokens
        groups = [(a, texts[a:a + step]) for a in range(0, len(texts), step)]
        if pool is not None and len(groups) > 1:
            results = list(pool.map(lambda g: self._chunk_texts(g[1]), groups))
        else:
            results = [self._chunk_texts(g[1]) for g in groups]
        parts = []
        for (a, _), (part, group_bad) in zip(groups, results):
            for i, reason in group_bad.items():
                bad[int(good[a + i])] = reason
            if part is not None:
                part.input_index[:] = good[a + part.input_index]   # shard positions
                parts.append(part)
        if len(bad) > len(rows.bad):
            self.check_bad(rows, bad)
        chunks = Chunked.concat(parts) if parts else ChunkedBuilder().build()
        return Tokenized(rows=rows, good=np.arange(chunks.tokens.n, dtype=np.int64),
                         tokens=chunks.tokens, bad=bad, chunks=chunks)

    def tokenize(self, rows: Rows, pool: Optional[Executor] = None) -> Tokenized:
        if self.chunk is not None:
            return self._tokenize_chunked(rows, pool)
        bad = dict(rows.bad)
        self.check_bad(rows, bad)
        good = np.array([i for i in range(len(rows.texts)) if i not in bad], dtype=np.int64)
        texts = [rows.texts[i] for i in good]
        chunks = [(a, texts[a:a + TOKENIZE_CHUNK]) for a in range(0, len(texts), TOKENIZE_CHUNK)]
        if pool is not None and len(chunks) > 1:
            results = list(pool.map(lambda c: self._encode_chunk(c[1]), chunks))
        else:
            results = [self._encode_chunk(c[1]) for c in chunks]
        keep = np.ones(len(good), dtype=bool)
        for (a, _), (_, chunk_bad) in zip(chunks, results):
            for i, reason in chunk_bad.items():
                bad[int(good[a + i])] = reason
                keep[a + i] = False
        if len(bad) > len(rows.bad):
            self.check_bad(rows, bad)
        ids = [r[0].ids for r in results]
        lengths = [r[0].lengths for r in results]
        tokens = TokenBatch(ids=np.concatenate(ids) if ids else np.zeros(0, np.int32),
                            lengths=np.concatenate(lengths) if lengths else np.zeros(0, np.int64))
        return Tokenized(rows=rows, good=good[keep], tokens=tokens, bad=bad)

    # --- batches and results -----------------------------------------------------------------

    def batches(self, tok: Tokenized, todo: Optional[np.ndarray] = None
                ) -> Iterator[tuple[Batch, list[np.ndarray]]]:
        """(batch, its id arrays) for the shard's forward passes; ``batch.idx`` are positions in
        ``tok.good`` order. ``todo``: only these positions (the rest were committed by an earlier
        run). A generator: it may wait for the budget measurement (budget.py), so every trial
        batch it yields must be reported to ``self.tuner.record``."""
        offsets = tok.tokens.offsets()
        ids = tok.tokens.ids
        lengths = tok.tokens.lengths if todo is None else tok.tokens.lengths[todo]
        for batch in self.tuner.cut(lengths):
            if todo is not None:
                batch.idx = todo[batch.idx]
            yield batch, [ids[offsets[i]:offsets[i + 1]] for i in batch.idx]

    def result_table(self, tok: Tokenized, pooled: np.ndarray) -> tuple[pa.Table, list[dict]]:
        """The shard's output rows (good rows, in input order) and its skipped-row records."""
        arr = post_process(pooled, self.normalize, self.options.dimensions)
        if not np.isfinite(arr).all():
            bad_rows = np.nonzero(~np.isfinite(arr).all(axis=1))[0]
            raise CorpusError(f"the engine returned non-finite values for row "
                              f"{tok.rows.shard.start + int(tok.good[bad_rows[0]])}")
        if tok.chunks is None:
            ids = tok.rows.ids.take(pa.array(tok.good, type=pa.int64()))
            table = pa.Table.from_arrays([ids, embedding_array(arr, self.options.output_dtype)],
                                         names=["id", "embedding"])
        else:
            c = tok.chunks
            ids = tok.rows.ids.take(pa.array(c.input_index, type=pa.int64()))
            table = pa.Table.from_arrays(
                [ids, pa.array(c.chunk, pa.int32()), pa.array(c.start, pa.int64()),
                 pa.array(c.end, pa.int64()), embedding_array(arr, self.options.output_dtype)],
                names=list(CHUNK_COLUMNS))
        skipped = []
        for pos in sorted(tok.bad):
            ident: Any = tok.rows.ids[pos].as_py()
            skipped.append({"row": tok.rows.shard.start + pos, "id": ident, "reason": tok.bad[pos]})
        return table, skipped


def skipped_json(skipped: list[dict]) -> bytes:
    return json.dumps(skipped, default=str).encode()
