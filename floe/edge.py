"""The edge pipeline: a client's request becomes a checked token batch, once, in one place.

Every entry point where a client's request enters a process calls ``Edge.prepare`` exactly once:
the front end's embed path (floe/frontend/service.py, HTTP and gRPC alike), a replica run on its
own (floe/replica/main.py), the Ray Serve deployment (floe/ray/serve.py); the offline corpus job
(floe/corpus/embed.py) calls the same steps per chunk through ``prepare_texts``. The steps, in
the order that protects the work behind each (floe/validate.py has the checks themselves):

    model name   -> served, or answered by the one model served (404 with --strict-model-name)
    options      -> the Plan: prompt resolved and bounded, truncation, direction
    texts        -> count, per-item type / length / Unicode (off the event loop past a few items),
                    then tokenized (floe/tokenize.py) with the plan
    or token ids -> count, range, length (truncated per the plan), vectorized
    or pairs     -> a reranker's query and documents: the query checked once, the documents as
                    texts, then tokenized as pairs (the document truncated, never the query)

Behind the edge everything trusts the batch; a managed replica's core only asserts invariants.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from floe import validate
from floe.chunking import ChunkOptions, Chunked
from floe.errors import TooLargeError, ValidationError
from floe.protocol import COMPACT_DTYPES, EncodeOptions, TokenBatch

# Requests with more inputs than this are checked item by item on the tokenizer pool's threads,
# not on the event loop (per-item work proportional to the input never blocks other clients).
INLINE_ITEMS = 32


@dataclass(frozen=True)
class Prepared:
    """What the edge hands on: the token batch, the plan it was cut with, and whether the model
    name the client sent is one of the served names (False: answered by the default, logged)."""

    tokens: TokenBatch
    plan: validate.Plan
    known_model: bool = True


class Edge:
    """The checks and the tokenizer of one served model, composed once.

    ``tokenizers`` is a floe.tokenize.TokenizerPool (async, off the event loop); the corpus job's
    ``prepare_texts`` takes a plain Tokenizer.
    """

    def __init__(self, limits: validate.Limits, tokenizers: Any = None,
                 compact_output: bool = False) -> None:
        """``compact_output``: the caller packs int8 / binary output itself (floe serve's
        service does, floe/compact.py); elsewhere (a replica run alone, Ray Serve) asking for it
        is a 400 rather than an error deep in the replica."""
        self.limits = limits
        self.tokenizers = tokenizers
        self.compact_output = compact_output

    async def prepare(self, texts: Optional[Sequence[Any]], tokens: Optional[TokenBatch],
                      options: EncodeOptions, model: Optional[str] = "") -> Prepared:
        """Exactly one of ``texts`` and ``tokens``. Raises the FloeError naming what is wrong."""
        known = validate.check_model(self.limits, model)
        plan = self.plan(options)
        if tokens is not None:
            return Prepared(validate.check_token_batch(self.limits, tokens, plan), plan, known)
        return Prepared(await self.tokenize(texts or [], plan), plan, known)

    async def tokenize(self, texts: Sequence[Any], plan: validate.Plan) -> TokenBatch:
        """Per-item checks then tokens, for texts whose options gave ``plan``."""
        limits = self.limits
        if len(texts) <= INLINE_ITEMS:
            checked = validate.check_texts(limits, texts, plan)
        else:
            validate.check_count(limits, len(texts))   # one comparison before the per-item work
            checked = await self.tokenizers.run(validate.check_texts, limits, texts, plan)
        return await self.tokenizers.encode_plan(checked, plan)

    async def prepare_pairs(self, query: Any, documents: Sequence[Any], options: EncodeOptions,
                            model: Optional[str] = "", param: str = "documents") -> Prepared:
        """A reranker's request: ``query`` against each of ``documents``."""
        known = validate.check_model(self.limits, model)
        plan = self.plan(options)
        query = validate.check_query(self.limits, query, plan)
        if len(documents) <= INLINE_ITEMS:
            checked = validate.check_texts(self.limits, documents, plan, param=param)
        else:
            validate.check_count(self.limits, len(documents), param)
            checked = await self.tokenizers.run(validate.check_texts, self.limits, documents, plan,
                                                param)
        return Prepared(await self.tokenizers.encode_pairs(query, checked, plan), plan, known)

    async def prepare_chunked(self, texts: Optional[Sequence[Any]], tokens: Optional[TokenBatch],
                              options: EncodeOptions, chunk: ChunkOptions,
                              model: Optional[str] = "") -> tuple[Chunked, bool]:
        """Documents cut into chunks (floe/chunking.py): the checks of ``prepare``, the chunk
        options, then one tokenization per document with offsets. The chunks a request expands
        to count against the item limit (413). Returns (the chunked batch, known model name)."""
        known = validate.check_model(self.limits, model)
        plan = self.plan(options)
        chunk = validate.check_chunking(self.limits, chunk)
        if tokens is not None or texts is None:
            raise ValidationError("chunking cuts texts at character offsets: send the documents "
                                  "as strings, not token ids", param="chunking")
        if len(texts) <= INLINE_ITEMS:
            checked = validate.check_texts(self.limits, texts, plan)
        else:
            validate.check_count(self.limits, len(texts))
            checked = await self.tokenizers.run(validate.check_texts, self.limits, texts, plan)
        if chunk.late_inputs:
            chunked = await self.tokenizers.encode_late(checked, plan)
        else:
            chunked = await self.tokenizers.encode_chunked(checked, plan, chunk)
        if chunked.rows > self.limits.max_items:
            raise TooLargeError(
                f"the documents give {chunked.rows} chunks, over the limit of "
                f"{self.limits.max_items} per request (--max-client-batch-size); send fewer "
                "documents per request or larger chunks", param="input")
        return chunked, known

    def plan(self, options: EncodeOptions) -> validate.Plan:
        if options.output_dtype in COMPACT_DTYPES and not self.compact_output:
            raise ValidationError(f"{options.output_dtype} output is packed by floe serve's front "
                                  "end; this endpoint returns float32, float16 or bfloat16",
                                  param="output_dtype")
        return validate.check_options(self.limits, options)


def prepare_texts(limits: validate.Limits, tokenizer: Any, texts: Sequence[Any],
                  plan: validate.Plan) -> TokenBatch:
    """The text steps of ``Edge.prepare`` in the caller's thread (the corpus job's chunks)."""
    return tokenizer.encode_plan(validate.check_texts(limits, texts, plan), plan)
