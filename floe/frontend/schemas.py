"""The HTTP request bodies, declared once as msgspec structs, and their decoding.

Decoding is bounded by the limits, not by the input: the body is decoded into its struct with the
``input`` field left as raw JSON (msgspec skips over it without building objects), then that raw
field is decoded as a list of raw items whose length is capped by the item limit. A body holding
two million one-id lists therefore costs one scan of its bytes and one comparison, never two
million Python lists. Only then are the items decoded, with their exact type (strings, token ids,
or lists of token ids), and every error names its parameter (``input[3]``, ``dimensions``).
"""


import base64
import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, Optional, Union

import msgspec
import numpy as np

from floe import validate
from floe.errors import TooLargeError, ValidationError
from floe.chunking import ChunkOptions
from floe.protocol import EmbedResult, EncodeOptions, TokenBatch

_PATH = re.compile(r" - at `\$(.*)`$")


_INPUT_DOC = ("What to embed: a string, a list of strings, a list of token ids, or a list of lists "
              "of token ids (at most --max-client-batch-size items).")
_PROMPT_NAME = "floe extension: a prompt of the model (config_sentence_transformers.json) to prepend."
_PROMPT = "floe extension: a literal prompt to prepend (counts against the character limit)."
_TRUNCATE = "Cut inputs longer than the model's max length (default: --auto-truncate); false: 400."
_DIMENSIONS = "Matryoshka: keep the first N values (renormalized when the model normalizes)."
_EMBEDDING_TYPE = ("floe extension: float (default), or a compact form as sentence-transformers' "
                   "quantize_embeddings makes it: int8 or uint8 (one byte per dimension, scaled by "
                   "the ranges /info states), binary or ubinary (sign bits, 8 dimensions per byte). "
                   "Compact forms are integers in JSON, or their bytes in base64.")
EMBEDDING_TYPES = ("float", "int8", "uint8", "binary", "ubinary")
_CHUNKING = ("floe extension: cut each input into chunks and embed each chunk (documents longer "
             "than the model's max length lose nothing). The answer has one embedding per chunk, "
             "with its input's index and its character offsets [start, end) into that input.")
_LATE_CHUNKING = ("Jina's late chunking: `input` is one document's chunks, in order; the document "
                  "is embedded in one pass and each chunk pooled from its own tokens, so every "
                  "chunk keeps the document's context. One embedding per input.")


class Chunking(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """How to cut documents into chunks (floe extension; docs/api.md, "Documents of any length")."""

    max_tokens: Annotated[Optional[int], msgspec.Meta(description=(
        "Tokens per chunk as the model sees it (special tokens and prompt included), from 16 to "
        "the model's max length; default: the max length."))] = None
    overlap: Annotated[int, msgspec.Meta(description=(
        "Tokens consecutive chunks share (less than max_tokens); default 0."))] = 0
    late: Annotated[bool, msgspec.Meta(description=(
        "Late chunking: embed each document in one pass (overlapping windows past the max "
        "length) and pool each chunk from the document's token states."))] = False

    def options(self) -> ChunkOptions:
        return ChunkOptions(max_tokens=self.max_tokens, overlap=self.overlap, late=self.late)


class OpenAIEmbeddingRequest(msgspec.Struct, kw_only=True):
    """POST /v1/embeddings (OpenAI). Unknown fields (``user``, ...) are ignored, as OpenAI does."""

    input: Annotated[msgspec.Raw, msgspec.Meta(description=_INPUT_DOC)] = msgspec.field(default_factory=lambda: msgspec.Raw(b""))
    model: Annotated[Optional[str], msgspec.Meta(description="A served model name; any name is answered unless "
                "--strict-model-name.")] = None
    encoding_format: Annotated[Optional[str], msgspec.Meta(description="float (default) or base64 (little-endian float32 "
                          "bytes).")] = None
    dimensions: Annotated[Optional[int], msgspec.Meta(description=_DIMENSIONS)] = None
    prompt_name: Annotated[Optional[str], msgspec.Meta(description=_PROMPT_NAME)] = None
    prompt: Annotated[Optional[str], msgspec.Meta(description=_PROMPT)] = None
    truncate: Annotated[Optional[bool], msgspec.Meta(description=_TRUNCATE)] = None
    embedding_type: Annotated[Optional[str], msgspec.Meta(description=_EMBEDDING_TYPE)] = None
    chunking: Annotated[Optional[Chunking], msgspec.Meta(description=_CHUNKING)] = None
    late_chunking: Annotated[Optional[bool], msgspec.Meta(description=_LATE_CHUNKING)] = None


class EmbedRequest(msgspec.Struct, kw_only=True):
    """POST /embed and POST / (TEI)."""

    inputs: Annotated[msgspec.Raw, msgspec.Meta(description=_INPUT_DOC)] = msgspec.field(default_factory=lambda: msgspec.Raw(b""))
    model: Optional[str] = None
    normalize: Annotated[Optional[bool], msgspec.Meta(description="L2-normalize (default true).")] = None
    truncate: Annotated[Optional[bool], msgspec.Meta(description=_TRUNCATE)] = None
    truncation_direction: Annotated[Optional[str], msgspec.Meta(description="right (default) or left.")] = None
    prompt_name: Annotated[Optional[str], msgspec.Meta(description=_PROMPT_NAME)] = None
    prompt: Annotated[Optional[str], msgspec.Meta(description=_PROMPT)] = None
    dimensions: Annotated[Optional[int], msgspec.Meta(description=_DIMENSIONS)] = None
    embedding_type: Annotated[Optional[str], msgspec.Meta(description=_EMBEDDING_TYPE)] = None
    chunking: Annotated[Optional[Chunking], msgspec.Meta(description=_CHUNKING)] = None


class SparseEmbedRequest(msgspec.Struct, kw_only=True):
    """POST /embed_sparse (TEI): a SPLADE model's vocabulary-wide vectors, zeros left out."""

    inputs: Annotated[msgspec.Raw, msgspec.Meta(description="A string or a list of strings (or token ids).")] = msgspec.field(
        default_factory=lambda: msgspec.Raw(b""))
    model: Optional[str] = None
    truncate: Annotated[Optional[bool], msgspec.Meta(description=_TRUNCATE)] = None
    truncation_direction: Annotated[Optional[str], msgspec.Meta(description="right (default) or left.")] = None
    prompt_name: Annotated[Optional[str], msgspec.Meta(description=_PROMPT_NAME)] = None
    prompt: Annotated[Optional[str], msgspec.Meta(description=_PROMPT)] = None


class RerankDocument(msgspec.Struct, kw_only=True):
    """A document given as an object (Cohere, Jina): its ``text`` is scored; other fields are
    ignored."""

    text: str


class RerankRequest(msgspec.Struct, kw_only=True):
    """POST /rerank, /v1/rerank, /v2/rerank: TEI's shape (``texts``; answered as TEI answers) or
    Cohere's and Jina's (``documents``; answered with ``results``), told apart by the field."""

    query: Annotated[Any, msgspec.Meta(description="The query every document is scored against.")] = None
    texts: Annotated[Optional[list[Any]], msgspec.Meta(description="TEI: the documents, as strings.")] = None
    documents: Annotated[Optional[list[Union[str, RerankDocument]]], msgspec.Meta(
        description="Cohere / Jina: the documents, as strings or objects with `text`.")] = None
    model: Optional[str] = None
    top_n: Annotated[Optional[int], msgspec.Meta(description="Return only the N best (default: all).")] = None
    return_documents: Annotated[Optional[bool], msgspec.Meta(description="Cohere / Jina: include each document.")] = None
    return_text: Annotated[Optional[bool], msgspec.Meta(description="TEI: include each text.")] = None
    raw_scores: Annotated[Optional[bool], msgspec.Meta(description="The model's logits, without its activation (Sigmoid).")] = None
    truncate: Annotated[Optional[bool], msgspec.Meta(description="Cut pairs longer than the max length: the document, never the query (default: --auto-truncate).")] = None
    truncation_direction: Annotated[Optional[str], msgspec.Meta(description="right (default) or left.")] = None
    max_chunks_per_doc: Optional[int] = None   # Cohere v1 clients send it; accepted, unused


class TokenizeRequest(msgspec.Struct, kw_only=True):
    """POST /tokenize (TEI)."""

    inputs: Annotated[msgspec.Raw, msgspec.Meta(description="A string or a list of strings.")] = msgspec.field(
        default_factory=lambda: msgspec.Raw(b""))
    prompt_name: Annotated[Optional[str], msgspec.Meta(description=_PROMPT_NAME)] = None
    prompt: Annotated[Optional[str], msgspec.Meta(description=_PROMPT)] = None
    truncate: Annotated[Optional[bool], msgspec.Meta(description=_TRUNCATE)] = None


# --- responses (described in the API document; built directly in the handlers for speed) ---------

class EmbeddingItem(msgspec.Struct, omit_defaults=True):
    object: str
    index: int
    embedding: Annotated[Union[list[float], str], msgspec.Meta(description="floats, or base64 of little-endian float32 bytes")]
    # with `chunking` only (absent otherwise: the OpenAI shape is unchanged)
    input_index: Annotated[Optional[int], msgspec.Meta(description="chunking: the input this chunk is from")] = None
    chunk: Annotated[Optional[int], msgspec.Meta(description="chunking: its place among that input's chunks, from 0")] = None
    start: Annotated[Optional[int], msgspec.Meta(description="chunking: its first character in the input")] = None
    end: Annotated[Optional[int], msgspec.Meta(description="chunking: one past its last character")] = None


class Usage(msgspec.Struct):
    prompt_tokens: Annotated[int, msgspec.Meta(description="Tokens embedded, after prompt and truncation, special tokens "
                        "included.")]
    total_tokens: int


class OpenAIEmbeddingResponse(msgspec.Struct, omit_defaults=True):
    object: str
    data: list[EmbeddingItem]
    model: str
    usage: Usage
    chunk_counts: Annotated[Optional[list[int]], msgspec.Meta(
        description="chunking: how many chunks each input gave (0 for an input without text)")] = None


class Token(msgspec.Struct):
    id: int
    text: str


class ErrorBody(msgspec.Struct):
    message: str
    type: str
    param: Optional[str]
    code: Annotated[Optional[str], msgspec.Meta(description="The error kind: validation, auth, not_found, too_large, "
               "unsupported_media, overloaded, unavailable, internal ...")]


class ErrorEnvelope(msgspec.Struct):
    error: ErrorBody


class Model(msgspec.Struct):
    id: str
    object: str
    created: int
    owned_by: str


class ModelList(msgspec.Struct):
    object: str
    data: list[Model]


_DECODERS = {cls: msgspec.json.Decoder(cls) for cls in (OpenAIEmbeddingRequest, EmbedRequest,
                                                        TokenizeRequest, SparseEmbedRequest,
                                                        RerankRequest)}


def _param(err: msgspec.ValidationError, base: str = "") -> str:
    m = _PATH.search(str(err))
    path = m.group(1) if m else ""
    if path.startswith("."):
        path = path[1:]
    return (base + path) if base else (path or "")


def _message(err: Exception) -> str:
    return _PATH.sub("", str(err))[:200]


def decode_body(cls: type, body: bytes) -> Any:
    """The request struct; any malformed body or wrongly typed field is a ValidationError."""
    try:
        return _DECODERS[cls].decode(body)
    except msgspec.ValidationError as e:
        param = _param(e)
        if not param:
            raise ValidationError(f"request body: {_message(e)}") from None
        raise ValidationError(f"`{param}`: {_message(e)}", param=param) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        if b"\\ud" in body.lower():
            raise _locate_surrogate_in_body(body) from None
        raise ValidationError(f"request body is not valid JSON: {str(e)[:160]}") from None
    except RecursionError:
        raise ValidationError("request body is nested too deeply") from None


def _first_byte(raw: bytes) -> bytes:
    for i in range(min(len(raw), 4096)):
        c = raw[i:i + 1]
        if c not in b" \t\r\n":
            return c
    return b""


def decode_input(limits: validate.Limits, raw: msgspec.Raw, param: str
                 ) -> tuple[Optional[list[str]], Optional[TokenBatch]]:
    """A string, a list of strings, a list of token ids, or a list of such lists, decoded with
    the item count checked before any item is built."""
    data = bytes(raw)
    if not data:
        raise ValidationError(f"`{param}` is required", param=param)
    try:
        head = _first_byte(data)
        if head == b'"':
            text = msgspec.json.decode(data, type=str)
            validate.check_text(text, param)
            return [text], None
        if head != b"[":
            raise ValidationError(
                f"`{param}` must be a string, a list of strings, a list of token ids or a list "
                "of lists of token ids", param=param)
        first = _first_byte(data[1:])
        cap = limits.max_ids_per_item if first in b"-0123456789" and first else limits.max_items
        # A count from the raw bytes (C-speed, never above the true count of a well-formed
        # list): an oversized list is refused before a single item object is built.
        if _count_at_most(data, first) > cap:
            raise TooLargeError(_too_many(param, first, cap, limits), param=param)
        if first in b"-0123456789" and first:
            ids = msgspec.json.decode(data, type=list[int])
            if len(ids) > cap:
                raise TooLargeError(_too_many(param, first, cap, limits), param=param)
            return None, validate.parse_json_input(limits, ids, param)[1]
        if first == b"]":
            raise ValidationError(f"`{param}` must not be empty", param=param)
        if first == b'"':
            texts = msgspec.json.decode(data, type=list[str])
            validate.check_count(limits, len(texts), param)
            return texts, None
        if first == b"[":
            lists = msgspec.json.decode(data, type=list[list[int]])
            validate.check_count(limits, len(lists), param)
            return validate.parse_json_input(limits, lists, param)
        raise ValidationError(f"`{param}` items must be strings or token ids", param=f"{param}[0]")
    except msgspec.ValidationError as e:
        where = _param(e, param)
        raise ValidationError(f"`{where}`: {_message(e)}", param=where) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        if b"\\ud" in data.lower():
            raise _locate_surrogate(data, param) from None
        raise ValidationError(f"`{param}` is not valid JSON: {str(e)[:160]}", param=param) from None
    except RecursionError:
        raise ValidationError(f"`{param}` is nested too deeply", param=param) from None


@dataclass(frozen=True)
class OpenAIRequest:
    """A checked POST /v1/embeddings body: what to embed, how, and how to answer."""

    texts: Optional[list[str]]
    tokens: Optional[TokenBatch]
    options: EncodeOptions
    encoding_format: str
    model: str
    chunk: Optional[ChunkOptions] = None   # chunking or late_chunking asked: floe/chunking.py


def check_embedding_type(value: Optional[str]) -> str:
    """The output dtype an ``embedding_type`` asks for (float: the replica's float32)."""
    kind = value or "float"
    if kind not in EMBEDDING_TYPES:
        raise ValidationError(f"`embedding_type` must be one of {', '.join(EMBEDDING_TYPES)}",
                              param="embedding_type")
    return "float32" if kind == "float" else kind


def parse_openai(limits: validate.Limits, body: bytes) -> OpenAIRequest:
    """The OpenAI route's body, decoded and checked once (floe serve and the Ray Serve route)."""
    req = decode_body(OpenAIEmbeddingRequest, body)
    texts, tokens = decode_input(limits, req.input, "input")
    fmt = req.encoding_format or "float"
    if fmt not in ("float", "base64"):
        raise ValidationError("`encoding_format` must be 'float' or 'base64'",
                              param="encoding_format")
    options = EncodeOptions(dimensions=check_dimensions(req.dimensions),
                            prompt_name=req.prompt_name, prompt=req.prompt, truncate=req.truncate,
                            output_dtype=check_embedding_type(req.embedding_type))
    chunk = req.chunking.options() if req.chunking is not None else None
    if req.late_chunking:
        if chunk is not None:
            raise ValidationError("`late_chunking` takes a document already cut into chunks; "
                                  "`chunking` cuts documents itself (use chunking.late for late "
                                  "chunking of whole documents): send one of them",
                                  param="late_chunking")
        chunk = ChunkOptions(late_inputs=True)
    return OpenAIRequest(texts, tokens, options, fmt, req.model or "", chunk)


@dataclass(frozen=True)
class TeiEmbedRequest:
    """TEI's /embed body, decoded and checked."""

    texts: Optional[list]
    tokens: Optional[TokenBatch]
    options: EncodeOptions
    model: str
    chunk: Optional[ChunkOptions] = None


def parse_embed(limits: validate.Limits, body: bytes) -> TeiEmbedRequest:
    """TEI's /embed body (normalize is on unless the client says otherwise, as TEI does)."""
    req = decode_body(EmbedRequest, body)
    texts, tokens = decode_input(limits, req.inputs, "inputs")
    direction = (req.truncation_direction or "right").lower()
    if direction not in ("left", "right"):
        raise ValidationError("`truncation_direction` must be 'left' or 'right'",
                              param="truncation_direction")
    options = EncodeOptions(
        normalize=True if req.normalize is None else req.normalize,
        truncate=req.truncate, truncation_direction=direction,
        prompt_name=req.prompt_name, prompt=req.prompt,
        dimensions=check_dimensions(req.dimensions),
        output_dtype=check_embedding_type(req.embedding_type))
    return TeiEmbedRequest(texts, tokens, options, req.model or "",
                           req.chunking.options() if req.chunking is not None else None)


def _direction(value: Optional[str]) -> str:
    direction = (value or "right").lower()
    if direction not in ("left", "right"):
        raise ValidationError("`truncation_direction` must be 'left' or 'right'",
                              param="truncation_direction")
    return direction


def parse_embed_sparse(limits: validate.Limits, body: bytes) -> TeiEmbedRequest:
    """TEI's /embed_sparse body."""
    req = decode_body(SparseEmbedRequest, body)
    texts, tokens = decode_input(limits, req.inputs, "inputs")
    options = EncodeOptions(truncate=req.truncate, truncation_direction=_direction(req.truncation_direction),
                            prompt_name=req.prompt_name, prompt=req.prompt)
    return TeiEmbedRequest(texts, tokens, options, req.model or "")


@dataclass(frozen=True)
class Rerank:
    """A checked rerank body, in whichever shape it came (``cohere``: documents / results)."""

    query: Any
    documents: list
    param: str            # the documents' field, for errors: "texts" (TEI) or "documents"
    cohere: bool
    top_n: Optional[int]
    return_documents: bool
    raw_scores: bool
    options: EncodeOptions
    model: str


_DOC_LIST = re.compile(rb'"(texts|documents)"\s*:\s*\[')


def _bound_documents(limits: validate.Limits, body: bytes) -> None:
    """413 before any document object is built, for a list of strings longer than the item
    limit (each costs the client three bytes, the server a Python string): counted on the raw
    bytes as decode_input counts inputs, never above the true count. Lists of objects cost at
    least 12 bytes each and are counted after decoding."""
    m = _DOC_LIST.search(body)
    if m is None or _first_byte(body[m.end():]) != b'"':
        return
    param = m.group(1).decode()
    rest = body[m.end() - 1:]
    # the list ends at the first "]" outside a string; bounding by the whole remainder only
    # overcounts by the few strings of the fields after it, so cap with a margin for those
    if _count_at_most(rest, b'"') > limits.max_items + 16:
        raise TooLargeError(_too_many(param, b'"', limits.max_items, limits), param=param)


def parse_rerank(limits: validate.Limits, body: bytes) -> Rerank:
    """The rerank body of any of the three routes; documents counted before they are checked."""
    _bound_documents(limits, body)
    req = decode_body(RerankRequest, body)
    if req.query is None:
        raise ValidationError("`query` is required", param="query")
    if (req.texts is None) == (req.documents is None):
        raise ValidationError("send the documents as `texts` (TEI) or `documents` (Cohere, "
                              "Jina): exactly one of the two", param="documents")
    cohere = req.documents is not None
    param = "documents" if cohere else "texts"
    docs = req.documents if cohere else req.texts
    validate.check_count(limits, len(docs), param)
    if cohere:
        docs = [d.text if isinstance(d, RerankDocument) else d for d in docs]
    if req.top_n is not None and req.top_n < 1:
        raise ValidationError("`top_n` must be a positive integer", param="top_n")
    options = EncodeOptions(truncate=req.truncate, truncation_direction=_direction(req.truncation_direction))
    keep = req.return_documents if cohere else req.return_text
    return Rerank(query=req.query, documents=docs, param=param, cohere=cohere, top_n=req.top_n,
                  return_documents=bool(keep), raw_scores=bool(req.raw_scores), options=options,
                  model=req.model or "")


def rerank_response(req: Rerank, scored: Any, model: str, rid: str) -> Any:
    """TEI's list of {index, score[, text]}, or Cohere / Jina / vLLM's object with results
    (``scored``: floe/frontend/service.py Scores)."""
    scores, order = scored.scores, scored.ranked(req.top_n)
    tokens = int(scored.result.token_counts.sum())
    if not req.cohere:
        rows = [{"index": int(i), "score": float(scores[i])} for i in order]
        if req.return_documents:
            for row in rows:
                row["text"] = req.documents[row["index"]]
        return rows
    results = [{"index": int(i), "relevance_score": float(scores[i])} for i in order]
    if req.return_documents:
        for row in results:
            row["document"] = {"text": req.documents[row["index"]]}
    return {"id": rid, "model": model, "results": results,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "meta": {"billed_units": {"search_units": 1}}}


def sparse_response(result: EmbedResult) -> list:
    """TEI's /embed_sparse answer: per input, its non-zero {index, value} pairs, by index."""
    rows = result.sparse
    off = rows.offsets()
    idx, val = rows.indices.tolist(), rows.values.tolist()
    return [[{"index": idx[k], "value": val[k]} for k in range(off[i], off[i + 1])]
            for i in range(result.n)]


def parse_tokenize(limits: validate.Limits, body: bytes) -> tuple[list, EncodeOptions]:
    """TEI's /tokenize body: texts only (token ids have nothing to tokenize)."""
    req = decode_body(TokenizeRequest, body)
    texts, _tokens = decode_input(limits, req.inputs, "inputs")
    if texts is None:
        raise ValidationError("`inputs` must be a string or a list of strings", param="inputs")
    return texts, EncodeOptions(prompt_name=req.prompt_name, prompt=req.prompt, truncate=req.truncate)


def result_rows(result: EmbedResult) -> np.ndarray:
    """The embeddings as a numpy array of their own type: (n, dim) float32, int8 or uint8, or
    (n, dim / 8) int8 / uint8 for the packed binary forms."""
    if result.dtype in ("int8", "binary"):
        return np.frombuffer(result.data, dtype=np.int8).reshape(result.n, -1)
    if result.dtype in ("uint8", "ubinary"):
        return np.frombuffer(result.data, dtype=np.uint8).reshape(result.n, -1)
    return result.as_float32()


def openai_response(result: EmbedResult, encoding_format: str, model_name: str) -> dict:
    """The OpenAI response object, built straight from the float32 buffer: numpy rows for JSON
    floats (orjson writes them without Python floats), the raw little-endian bytes for base64.
    Compact forms: integers in JSON, their bytes in base64."""
    arr = result_rows(result)
    if encoding_format == "base64":
        rows = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(arr[i].tobytes()).decode("ascii")}
                for i in range(result.n)]
    else:
        rows = [{"object": "embedding", "index": i, "embedding": arr[i]} for i in range(result.n)]
    used = int(result.token_counts.sum())
    return {"object": "list", "data": rows, "model": model_name,
            "usage": {"prompt_tokens": used, "total_tokens": used}}


def chunk_fields(table: Any) -> list[dict]:
    """Per chunk (output row): its input's index, its place among that input's chunks, and its
    character offsets [start, end) into the input's text."""
    return [{"input_index": i, "chunk": c, "start": a, "end": b} for i, c, a, b in zip(
        table.input_index.tolist(), table.chunk.tolist(), table.start.tolist(), table.end.tolist())]


def openai_chunked_response(chunks: Any, encoding_format: str, model_name: str) -> dict:
    """/v1/embeddings with ``chunking``: the OpenAI shape, one item per chunk, each also naming
    its input, chunk and offsets; ``chunk_counts`` gives each input's number of chunks (0 for an
    input without text)."""
    body = openai_response(chunks.result, encoding_format, model_name)
    for item, where in zip(body["data"], chunk_fields(chunks.table)):
        item.update(where)
    body["chunk_counts"] = chunks.table.counts.tolist()
    return body


def embed_chunked_response(chunks: Any) -> dict:
    """/embed with ``chunking``: each chunk's place and embedding, and each input's chunk count."""
    rows = result_rows(chunks.result)
    out = chunk_fields(chunks.table)
    for k, item in enumerate(out):
        item["embedding"] = rows[k]
    return {"chunks": out, "chunk_counts": chunks.table.counts.tolist()}


def _count_at_most(data: bytes, first: bytes) -> int:
    """How many items a JSON list whose first item starts with ``first`` holds, counted on the
    raw bytes, never more than the real count of a well-formed list of that kind: lists of token
    ids by their "[", strings by their unescaped quotes, ids by their commas."""
    if first == b"[":
        return data.count(b"[") - 1
    if first == b'"':
        return (data.count(b'"') - data.count(b'\\"')) // 2
    return data.count(b",") + 1


def _too_many(param: str, first: bytes, cap: int, limits: validate.Limits) -> str:
    if first in b"-0123456789" and first:
        return f"`{param}` has more than {cap} token ids, over the limit of {cap}"
    return (f"`{param}` has more than {cap} items, over the limit of {limits.max_items} per "
            "request (--max-client-batch-size)")


def _locate_surrogate_in_body(body: bytes) -> ValidationError:
    """A lone surrogate escape somewhere in the body: name the field (and item) that holds it."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return ValidationError("request body is not valid JSON")
    if isinstance(value, dict):
        for key, field in value.items():
            if isinstance(field, (str, list)):
                err = _surrogate_in(field, str(key)[:40])
                if err is not None:
                    return err
    return ValidationError("request body holds an invalid \\u escape")


def _surrogate_in(value: Any, param: str) -> Optional[ValidationError]:
    items = [value] if isinstance(value, str) else value
    for i, x in enumerate(items):
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                where = param if isinstance(value, str) else f"{param}[{i}]"
                return ValidationError(f"`{where}` is not valid Unicode text (it holds a lone "
                                       "surrogate)", param=where)
    return None


def _locate_surrogate(data: bytes, param: str) -> ValidationError:
    """The stdlib parser accepts lone surrogates: it finds which item holds one."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return ValidationError(f"`{param}` is not valid JSON", param=param)
    if isinstance(value, (str, list)):
        err = _surrogate_in(value, param)
        if err is not None:
            return err
    return ValidationError(f"`{param}` holds an invalid \\u escape", param=param)


def check_dimensions(value: Optional[int]) -> Optional[int]:
    if value is not None and value < 1:
        raise ValidationError("`dimensions` must be a positive integer", param="dimensions")
    return value


