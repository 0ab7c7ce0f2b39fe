"""The public API's messages (floe/proto/floe.proto, floe.v1) to and from the data plane's types
(floe/protocol.py): what the public gRPC servers (floe/transport/grpc.py) and the Python client
(floe/client.py) convert at the edge. The private link between a front end and its replicas does
not use them (floe/protocol.py, ``EncodeCall``)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from floe.errors import ValidationError
from floe.proto import floe_pb2
from floe.protocol import (OUTPUT_DTYPES, EmbedResult, EncodeOptions, SparseRows, Spans, Timings,
                           TokenBatch, deadline_after)

_DTYPE_NAMES = {v: k for k, v in OUTPUT_DTYPES.items()}

def options_to_proto(o: EncodeOptions) -> floe_pb2.EncodeOptions:
    msg = floe_pb2.EncodeOptions(
        truncation_direction=floe_pb2.LEFT if o.truncation_direction == "left" else floe_pb2.RIGHT,
        prompt_name=o.prompt_name or "",
        dimensions=o.dimensions or 0,
        output_dtype=OUTPUT_DTYPES[o.output_dtype],
        priority=o.priority,
    )
    if o.deadline is not None:
        # already past: the smallest positive value, so the receiver still sees a deadline
        msg.deadline_ms = max(1e-3, (o.deadline - time.monotonic()) * 1000.0)
    if o.normalize is not None:
        msg.normalize = o.normalize
    if o.truncate is not None:
        msg.truncate = o.truncate
    if o.prompt is not None:
        msg.prompt = o.prompt
    return msg


def options_from_proto(msg: floe_pb2.EncodeOptions) -> EncodeOptions:
    if msg.output_dtype not in _DTYPE_NAMES:
        raise ValidationError(f"unknown output_dtype {msg.output_dtype}", param="output_dtype")
    if msg.truncation_direction not in (floe_pb2.LEFT, floe_pb2.RIGHT):
        raise ValidationError(f"unknown truncation_direction {msg.truncation_direction}",
                              param="truncation_direction")
    return EncodeOptions(
        normalize=msg.normalize if msg.HasField("normalize") else None,
        truncate=msg.truncate if msg.HasField("truncate") else None,
        truncation_direction="left" if msg.truncation_direction == floe_pb2.LEFT else "right",
        prompt_name=msg.prompt_name or None,
        prompt=msg.prompt if msg.HasField("prompt") else None,
        dimensions=msg.dimensions or None,
        output_dtype=_DTYPE_NAMES[msg.output_dtype],
        priority=msg.priority,
        deadline=deadline_after(msg.deadline_ms / 1000.0) if msg.deadline_ms > 0 else None,
    )


def request_to_proto(request_id: str, options: EncodeOptions, *, tokens: Optional[TokenBatch] = None,
                     texts: Optional[list[str]] = None, model: str = "") -> floe_pb2.EncodeRequest:
    msg = floe_pb2.EncodeRequest(request_id=request_id, model=model, options=options_to_proto(options))
    if tokens is not None:
        msg.token_ids = tokens.ids.astype("<i4", copy=False).tobytes()
        msg.lengths.extend(tokens.lengths.tolist())
        if tokens.type_splits is not None:
            msg.type_splits.extend(tokens.type_splits.tolist())
        if tokens.spans is not None:
            msg.span_counts.extend(tokens.spans.counts.tolist())
            msg.span_bounds = tokens.spans.bounds.astype("<i4").tobytes()
    if texts is not None:
        msg.texts.extend(texts)
    return msg


def tokens_from_proto(msg: floe_pb2.EncodeRequest) -> Optional[TokenBatch]:
    """The request's token ids, or None when it carries texts. Both at once is a ValidationError."""
    has_ids = bool(msg.token_ids) or len(msg.lengths) > 0
    if has_ids and len(msg.texts):
        raise ValidationError("send either texts or token_ids, not both", param="texts")
    if not has_ids:
        if len(msg.type_splits) or len(msg.span_counts):
            raise ValidationError("type_splits and spans go with token_ids", param="type_splits")
        return None
    tokens = TokenBatch.from_bytes(msg.token_ids, list(msg.lengths))
    splits = np.asarray(msg.type_splits, dtype=np.int64) if len(msg.type_splits) else None
    spans = None
    if len(msg.span_counts) or msg.span_bounds:
        if len(msg.span_bounds) % 8:
            raise ValidationError("span_bounds is not whole int32 pairs", param="spans")
        spans = Spans(counts=np.asarray(msg.span_counts, dtype=np.int64),
                      bounds=np.frombuffer(msg.span_bounds, dtype="<i4").astype(np.int64))
    if splits is not None or spans is not None:
        tokens = TokenBatch(tokens.ids, tokens.lengths, splits, spans)
    return tokens


def encode_call_from_proto(msg: floe_pb2.EncodeRequest
                           ) -> tuple[str, Optional[list[str]], Optional[TokenBatch], EncodeOptions, str]:
    """An Encode call's arguments (request id, texts or token ids, options, model), whatever
    transport carried it. A request with neither texts nor ids is a ValidationError."""
    tokens = tokens_from_proto(msg)
    texts = None
    if tokens is None:
        if not msg.texts:
            raise ValidationError("request carries neither texts nor token_ids", param="texts")
        texts = list(msg.texts)
    return msg.request_id, texts, tokens, options_from_proto(msg.options), msg.model


def result_to_proto(r: EmbedResult) -> floe_pb2.EncodeResponse:
    msg = floe_pb2.EncodeResponse(
        request_id=r.request_id, n=r.n, dim=r.dim, dtype=OUTPUT_DTYPES[r.dtype], embeddings=r.data,
        token_counts=r.token_counts.tolist(), model=r.model,
        # field by field: dataclasses.asdict deep-copies, a measurable cost on every answer
        timings=floe_pb2.Timings(tokenize_s=r.timings.tokenize_s, queue_s=r.timings.queue_s,
                                 inference_s=r.timings.inference_s, total_s=r.timings.total_s),
    )
    if r.sparse is not None:
        msg.sparse_counts.extend(r.sparse.counts.tolist())
        msg.sparse_indices = r.sparse.indices.tobytes()
        msg.sparse_values = r.sparse.values.tobytes()
    return msg


def result_from_proto(msg: floe_pb2.EncodeResponse) -> EmbedResult:
    t = msg.timings
    sparse = None
    if len(msg.sparse_counts) or msg.sparse_indices:
        sparse = SparseRows(counts=np.asarray(msg.sparse_counts, dtype=np.int64),
                            indices=np.frombuffer(msg.sparse_indices, dtype="<i4"),
                            values=np.frombuffer(msg.sparse_values, dtype="<f4"))
    return EmbedResult(sparse=sparse,
        n=msg.n, dim=msg.dim, dtype=_DTYPE_NAMES[msg.dtype], data=msg.embeddings,
        token_counts=np.asarray(msg.token_counts, dtype=np.int64), model=msg.model,
        request_id=msg.request_id,
        timings=Timings(t.tokenize_s, t.queue_s, t.inference_s, t.total_s),
    )


def chunk_options_from_proto(msg: floe_pb2.ChunkOptions):
    """A gRPC request's ``chunking`` as floe/chunking.py's ChunkOptions (0 tokens: the model's
    max length); the edge checks the values."""
    from floe.chunking import ChunkOptions

    return ChunkOptions(max_tokens=msg.max_tokens or None, overlap=msg.overlap, late=msg.late)


def chunks_to_proto(table, msg: floe_pb2.EncodeResponse) -> None:
    """A chunked answer's table (floe/chunking.py Chunked) into the response's chunk fields."""
    msg.chunk_input_index.extend(table.input_index.tolist())
    msg.chunk_index.extend(table.chunk.tolist())
    msg.chunk_start.extend(table.start.tolist())
    msg.chunk_end.extend(table.end.tolist())
    msg.chunk_counts.extend(table.counts.tolist())
