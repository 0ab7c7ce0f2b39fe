"""The process boundary, declared in one file.

Everything that crosses between the front end and a replica is one of the types below, and the
only code that converts them to and from the wire lives here, with round-trip tests in
tests/unit/test_protocol.py:

* the data plane: ``EncodeOptions``, ``TokenBatch``, ``EmbedResult`` (their public floe.v1 form,
  for the gRPC API's edge and a standalone replica, is converted in floe/proto/convert.py);
* the private link between a front end and its replicas on this machine: floe's own messages
  (``EncodeCall`` / ``EncodeAnswer`` keyed by model and kind, ``HealthCall``, ``AbortCall``,
  ``HandBackCall``;
  msgspec structs in MessagePack) in frames (``Frame``, ``frame``, ``FrameReader``) on a
  replica's Unix socket or TCP port, and the one error codec a frame carries (``error_to_frame`` /
  ``error_from_frame``, over errors.error_fields);
* the control plane: what the supervisor hands a child process at launch and what the child
  answers (``ReplicaLaunch``, ``ReplicaHello``, ``FrontendLaunch``, ``FrontendHello``,
  ``ReplicaTable``).

Token ids and embeddings stay numpy arrays over raw little-endian bytes end to end: no per-float
Python objects on the hot path.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import msgspec
import numpy as np
from google.protobuf.message import DecodeError

from floe.errors import FloeError, InternalError, ValidationError, error_fields, error_from_fields
from floe.proto import floe_pb2

# Output dtypes a client may ask for, by wire enum.
OUTPUT_DTYPES = {"float32": floe_pb2.FLOAT32, "float16": floe_pb2.FLOAT16, "bfloat16": floe_pb2.BFLOAT16,
                 "int8": floe_pb2.INT8, "uint8": floe_pb2.UINT8, "binary": floe_pb2.BINARY,
                 "ubinary": floe_pb2.UBINARY}
# The float forms a replica produces, and their bytes per value.
# A deadline further out than a day is as good as none (and keeps the float arithmetic sane).
MAX_DEADLINE_S = 86_400.0

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
# The compact forms (floe/compact.py), packed in the front end from a replica's float32 rows.
COMPACT_DTYPES = ("int8", "uint8", "binary", "ubinary")


def row_bytes(dtype: str, dim: int) -> int:
    """Bytes of one embedding of ``dim`` values in ``dtype`` (binary forms: 8 values per byte)."""
    if dtype in ITEMSIZE:
        return dim * ITEMSIZE[dtype]
    if dtype in ("int8", "uint8"):
        return dim
    if dtype in ("binary", "ubinary"):
        return (dim + 7) // 8
    raise ValidationError(f"unknown output dtype {dtype!r}", param="output_dtype")


@dataclass(frozen=True)
class EncodeOptions:
    """Per-request options. ``None`` means "the server's or model's default"."""

    normalize: Optional[bool] = None
    truncate: Optional[bool] = None
    truncation_direction: str = "right"  # "right" | "left"
    prompt_name: Optional[str] = None
    prompt: Optional[str] = None
    dimensions: Optional[int] = None
    output_dtype: str = "float32"  # a key of OUTPUT_DTYPES
    priority: int = 0
    # When the caller stops waiting, on this process' time.monotonic() clock (None: no deadline
    # of its own). It crosses a process boundary as the milliseconds left (``deadline_ms``).
    # Requests with different deadlines are never merged into one replica call (the coalescer
    # merges equal options only), so each is admitted and expired on its own.
    deadline: Optional[float] = None


@dataclass
class TokenBatch:
    """The token ids of n inputs: ``ids`` int32 concatenated, ``lengths[i]`` ids for item i.

    ``type_splits`` (pairs: a cross-encoder's query and document), per item, is the position where
    token type 1 begins (``lengths[i]`` for an item of one segment); None: every item is one
    segment.

    ``spans`` (late chunking): per item, the token ranges pooled into one output row each; the
    replica returns one row per span instead of one per item. None: one row per item."""

    ids: np.ndarray
    lengths: np.ndarray
    type_splits: Optional[np.ndarray] = None
    spans: Optional["Spans"] = None

    def __post_init__(self) -> None:
        self.ids = np.ascontiguousarray(self.ids, dtype=np.int32).reshape(-1)
        self.lengths = np.ascontiguousarray(self.lengths, dtype=np.int64).reshape(-1)
        if self.spans is not None:
            self.spans.check(self.lengths)
        if self.type_splits is not None:
            self.type_splits = np.ascontiguousarray(self.type_splits, dtype=np.int64).reshape(-1)
            if self.type_splits.shape != self.lengths.shape or \
                    (self.type_splits > self.lengths).any() or (self.type_splits < 0).any():
                raise ValidationError("type_splits needs one entry per item, each at most that "
                                      "item's length", param="type_splits")

    @property
    def n(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def total_tokens(self) -> int:
        return int(self.ids.shape[0])

    def offsets(self) -> np.ndarray:
        """Start offset of each item (length n + 1; the last is total_tokens)."""
        out = np.zeros(self.n + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=out[1:])
        return out

    def item(self, i: int) -> np.ndarray:
        off = self.offsets()
        return self.ids[off[i]: off[i + 1]]

    def take(self, start: int, stop: int) -> "TokenBatch":
        """Items ``start`` to ``stop`` (exclusive) as a batch of their own, with their type
        splits and spans: a request cut across replicas (floe/fleet/balance.py ``spread``)."""
        off = self.offsets()
        spans = None
        if self.spans is not None:
            rows = self.spans.offsets()
            spans = Spans(counts=self.spans.counts[start:stop],
                          bounds=self.spans.bounds[rows[start]:rows[stop]])
        return TokenBatch(ids=self.ids[off[start]:off[stop]], lengths=self.lengths[start:stop],
                          type_splits=None if self.type_splits is None else self.type_splits[start:stop],
                          spans=spans)

    def pick(self, items: np.ndarray) -> "TokenBatch":
        """The given items (ascending indices) as a batch of their own, with their type splits:
        the rows a replica handed back (floe/fleet/replica_client.py). Not for late chunking."""
        if self.spans is not None:
            raise ValueError("a late-chunking batch is not picked apart")
        items = np.asarray(items, dtype=np.int64)
        off = self.offsets()
        ids = (np.concatenate([self.ids[off[i]:off[i + 1]] for i in items.tolist()])
               if items.size else self.ids[:0])
        return TokenBatch(ids=ids, lengths=self.lengths[items],
                          type_splits=None if self.type_splits is None else self.type_splits[items])

    @classmethod
    def from_lists(cls, items: list[list[int]]) -> "TokenBatch":
        lengths = np.fromiter((len(x) for x in items), dtype=np.int64, count=len(items))
        try:
            ids = np.fromiter((t for x in items for t in x), dtype=np.int64, count=int(lengths.sum()))
        except (OverflowError, TypeError, ValueError):
            # ids beyond int64, or not integers at all: the client's mistake, not a crash
            raise ValidationError("token ids must be integers in int32 range", param="input") from None
        if ids.size and (ids.min() < np.iinfo(np.int32).min or ids.max() > np.iinfo(np.int32).max):
            raise ValidationError("token id out of int32 range", param="input")
        return cls(ids=ids.astype(np.int32), lengths=lengths)

    @classmethod
    def from_bytes(cls, data: bytes, lengths: list[int] | np.ndarray) -> "TokenBatch":
        """Reads an int32 LE buffer; a size that does not match the lengths is a ValidationError."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if len(data) % 4:
            raise ValidationError(
                f"token_ids is {len(data)} bytes, not a multiple of 4 (int32 little-endian)",
                param="token_ids")
        expected = int(lengths.sum()) * 4
        if len(data) != expected:
            raise ValidationError(
                f"token_ids holds {len(data)} bytes but lengths sum to {int(lengths.sum())} ids "
                f"(expected {expected} bytes)", param="token_ids")
        if (lengths < 0).any():
            raise ValidationError("lengths must be non-negative", param="lengths")
        return cls(ids=np.frombuffer(data, dtype="<i4"), lengths=lengths)


@dataclass
class Spans:
    """Late chunking's pooling ranges: item i owns ``counts[i]`` rows of ``bounds``, each a
    [start, end) range of that item's token positions (special tokens and prompt included in the
    positions, never in a range), in item order."""

    counts: np.ndarray
    bounds: np.ndarray

    def __post_init__(self) -> None:
        self.counts = np.ascontiguousarray(self.counts, dtype=np.int64).reshape(-1)
        self.bounds = np.ascontiguousarray(self.bounds, dtype=np.int64).reshape(-1, 2)

    @property
    def rows(self) -> int:
        return int(self.bounds.shape[0])

    def offsets(self) -> np.ndarray:
        out = np.zeros(self.counts.shape[0] + 1, dtype=np.int64)
        np.cumsum(self.counts, out=out[1:])
        return out

    def check(self, lengths: np.ndarray) -> None:
        """Every item has a span, every span is a non-empty range inside its item."""
        if self.counts.shape != lengths.shape or int(self.counts.sum()) != self.rows:
            raise ValidationError("spans need a count per item and a range per count",
                                  param="spans")
        if self.rows == 0:
            return
        owner = np.repeat(lengths, self.counts)
        a, b = self.bounds[:, 0], self.bounds[:, 1]
        if (self.counts < 1).any() or (a < 0).any() or (b <= a).any() or (b > owner).any():
            raise ValidationError("each span must be a non-empty range inside its item, and each "
                                  "item needs at least one", param="spans")


@dataclass
class Timings:
    tokenize_s: float = 0.0
    queue_s: float = 0.0
    inference_s: float = 0.0
    total_s: float = 0.0


@dataclass
class SparseRows:
    """n sparse vectors: item i owns ``counts[i]`` entries of ``indices`` (int32, ascending within
    the item) and ``values`` (float32), concatenated in item order."""

    counts: np.ndarray
    indices: np.ndarray
    values: np.ndarray

    def __post_init__(self) -> None:
        self.counts = np.ascontiguousarray(self.counts, dtype=np.int64).reshape(-1)
        self.indices = np.ascontiguousarray(self.indices, dtype="<i4").reshape(-1)
        self.values = np.ascontiguousarray(self.values, dtype="<f4").reshape(-1)
        if int(self.counts.sum()) != self.indices.shape[0] or self.indices.shape != self.values.shape:
            raise ValueError("sparse rows: counts, indices and values disagree")

    @classmethod
    def from_dense(cls, arr: np.ndarray) -> "SparseRows":
        """The non-zero entries of an (n, dim) array, row by row (np.nonzero's row-major order)."""
        rows, cols = np.nonzero(arr)
        counts = np.bincount(rows, minlength=arr.shape[0])
        return cls(counts=counts, indices=cols.astype(np.int32), values=arr[rows, cols])

    def offsets(self) -> np.ndarray:
        out = np.zeros(self.counts.shape[0] + 1, dtype=np.int64)
        np.cumsum(self.counts, out=out[1:])
        return out


@dataclass
class EmbedResult:
    """n embeddings of ``dim`` values as one contiguous little-endian buffer of ``dtype``; or, for
    a sparse model, ``sparse`` rows over a vocabulary of ``dim`` (``data`` empty)."""

    n: int
    dim: int
    dtype: str
    data: bytes
    token_counts: np.ndarray
    timings: Timings = field(default_factory=Timings)
    model: str = ""
    request_id: str = ""
    sparse: Optional[SparseRows] = None
    # items of the call this answer leaves out, ascending: a replica handed their rows back
    # before computing them (``HandBackCall``); the front end has them computed elsewhere and
    # joins the two answers (floe/fleet/replica_client.py). None: every item is here.
    handed_back: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        if not isinstance(self.token_counts, np.ndarray):
            self.token_counts = np.asarray(self.token_counts, dtype=np.int64)
        if self.sparse is not None:
            if self.data or self.sparse.counts.shape[0] != self.n:
                raise ValueError("a sparse result carries n sparse rows and no dense buffer")
            return
        if len(self.data) != self.n * row_bytes(self.dtype, self.dim):
            raise ValueError(f"embedding buffer is {len(self.data)} bytes, expected "
                             f"{self.n} rows of {row_bytes(self.dtype, self.dim)} ({self.dtype} "
                             f"x {self.dim})")

    def as_float32(self) -> np.ndarray:
        """The embeddings as an (n, dim) float32 array (bf16/fp16 widened exactly)."""
        if self.dtype not in ITEMSIZE or self.sparse is not None:
            raise ValueError(f"a {self.dtype} {'sparse ' if self.sparse is not None else ''}"
                             "result has no float form")
        if self.dtype == "float32":
            return np.frombuffer(self.data, dtype="<f4").reshape(self.n, self.dim)
        if self.dtype == "float16":
            return np.frombuffer(self.data, dtype="<f2").astype(np.float32).reshape(self.n, self.dim)
        raw = np.frombuffer(self.data, dtype="<u2").astype(np.uint32) << 16
        return raw.view(np.float32).reshape(self.n, self.dim)

    @classmethod
    def concat(cls, parts: "list[EmbedResult]", request_id: str = "") -> "EmbedResult":
        """The answers to consecutive parts of one request (``TokenBatch.take``), as one answer
        in item order. The parts ran side by side: each timing is the longest part's."""
        first = parts[0]
        sparse = None
        if first.sparse is not None:
            sparse = SparseRows(counts=np.concatenate([p.sparse.counts for p in parts]),
                                indices=np.concatenate([p.sparse.indices for p in parts]),
                                values=np.concatenate([p.sparse.values for p in parts]))
        return cls(n=sum(p.n for p in parts), dim=first.dim, dtype=first.dtype,
                   data=b"".join(p.data for p in parts),
                   token_counts=np.concatenate([p.token_counts for p in parts]),
                   timings=Timings(*(max(getattr(p.timings, f) for p in parts) for f in
                                     ("tokenize_s", "queue_s", "inference_s", "total_s"))),
                   model=first.model, request_id=request_id or first.request_id, sparse=sparse)

    @classmethod
    def from_array(cls, arr: np.ndarray, dtype: str, token_counts, **kw) -> "EmbedResult":
        """Packs an (n, dim) float32 array into the requested output dtype (round to nearest even)."""
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        n, dim = arr.shape
        if dtype == "float32":
            data = arr.astype("<f4", copy=False).tobytes()
        elif dtype == "float16":
            data = arr.astype("<f2").tobytes()
        elif dtype == "bfloat16":
            bits = arr.view(np.uint32).astype(np.uint64)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            nan = np.isnan(arr)
            if nan.any():  # rounding would carry a low-payload NaN into the exponent (infinity)
                rounded[nan] = (bits[nan] >> 16) | 0x0040
            data = rounded.astype("<u2").tobytes()
        else:
            raise ValidationError(f"unknown output dtype {dtype!r}", param="output_dtype")
        return cls(n=n, dim=dim, dtype=dtype, data=data,
                   token_counts=np.asarray(token_counts, dtype=np.int64), **kw)


# --- the replica link's frames ----------------------------------------------------------------

class Frame(enum.IntEnum):
    """Frame types on a replica's Unix socket. A frame is a 9-byte header ``<payload length u32>
    <call id u32><type u8>`` (little-endian) and its payload. Many calls share one connection and
    are answered in any order, matched by call id.

    The client opens with HELLO (the replica's launch token); a connection that does not start
    with the right one is closed. A call is one request frame, answered by RESULT (the answer,
    ``FRAME_CALLS``) or ERROR (``error_to_frame``). CANCEL (empty) withdraws a call: the replica drops
    its queued work, as a gRPC deadline or cancellation would.
    """

    HELLO = 1
    ENCODE = 2      # EncodeCall                     -> EncodeAnswer
    RESULT = 3
    ERROR = 4
    CANCEL = 5
    HEALTH = 6      # HealthCall                     -> HealthAnswer
    INFO = 7        # InfoCall                       -> floe.v1.GetReplicaInfoResponse
    ABORT = 8       # AbortCall                      -> AbortAnswer
    HAND_BACK = 9   # HandBackCall                   -> HandBackAnswer


# --- the private link's messages (frames on a replica's Unix socket) ---------------------------
#
# floe's own, not the public floe.v1 API: msgspec structs in MessagePack, positional (array_like)
# so a message is its values. The public API may grow fields a client sends (texts, chunking) that
# mean nothing between a front end and its replica; these carry exactly what crosses. Every call
# names the model and the request kind it is meant for, and the replica refuses one meant for
# another (a misrouted call is a bug, answered as an internal error, never computed).
# GetReplicaInfo stays floe.v1: it is what the public GetReplicaInfo and /metrics return.


class LinkOptions(msgspec.Struct, frozen=True, array_like=True):
    """EncodeOptions on the link; ``deadline_ms``: milliseconds left when sent (None: none)."""

    normalize: Optional[bool] = None
    truncate: Optional[bool] = None
    truncation_direction: str = "right"
    prompt_name: Optional[str] = None
    prompt: Optional[str] = None
    dimensions: Optional[int] = None
    output_dtype: str = "float32"
    priority: int = 0
    deadline_ms: Optional[float] = None


class EncodeCall(msgspec.Struct, frozen=True, array_like=True):
    """A request's token ids for one model and kind (the front end tokenized and validated)."""

    request_id: str
    model: str            # the served model's name
    kind: str             # its kind (floe/kinds: "embed", "score", "sparse")
    ids: bytes            # int32 little-endian, every item's ids concatenated
    lengths: bytes        # int32 little-endian, one per item
    options: LinkOptions
    type_splits: Optional[bytes] = None   # int32 LE per item (cross-encoder pairs)
    span_counts: Optional[bytes] = None   # int32 LE per item (late chunking)
    span_bounds: Optional[bytes] = None   # int32 LE (start, end) pairs


class EncodeAnswer(msgspec.Struct, frozen=True, array_like=True):
    request_id: str
    model: str
    n: int
    dim: int
    dtype: str
    data: bytes
    token_counts: bytes                   # int64 LE per item
    timings: tuple[float, float, float, float]   # tokenize, queue, inference, total seconds
    sparse_counts: Optional[bytes] = None  # int64 LE per row
    sparse_indices: Optional[bytes] = None  # int32 LE
    sparse_values: Optional[bytes] = None  # float32 LE
    handed_back: Optional[bytes] = None    # int32 LE: items left out (EmbedResult.handed_back)


class HealthCall(msgspec.Struct, frozen=True, array_like=True):
    pass


class HealthAnswer(msgspec.Struct, frozen=True, array_like=True):
    healthy: bool
    ready: bool
    message: str = ""


class InfoCall(msgspec.Struct, frozen=True, array_like=True):
    pass


class AbortCall(msgspec.Struct, frozen=True, array_like=True):
    request_id: str


class AbortAnswer(msgspec.Struct, frozen=True, array_like=True):
    success: bool
    message: str = ""


class HandBackCall(msgspec.Struct, frozen=True, array_like=True):
    """Asks a replica to give back queued rows it has not started, of these calls only (the
    asker's own, most recent first), up to ``max_tokens`` and at most half of what it has queued,
    and nothing unless that is ``min_tokens`` or more: another replica is idle
    (floe/fleet/router.py, "Handing back")."""

    request_ids: list[str]
    max_tokens: int
    min_tokens: int = 1


class HandBackAnswer(msgspec.Struct, frozen=True, array_like=True):
    """Per call that gave any: its request id and the items handed back (int32 LE, ascending).
    Those calls' answers leave the items out (``EncodeAnswer.handed_back``)."""

    calls: list[tuple[str, bytes]]


# The request and answer of each call frame.
FRAME_CALLS: dict[Frame, tuple[type, type]] = {
    Frame.ENCODE: (EncodeCall, EncodeAnswer),
    Frame.HEALTH: (HealthCall, HealthAnswer),
    Frame.INFO: (InfoCall, floe_pb2.GetReplicaInfoResponse),
    Frame.ABORT: (AbortCall, AbortAnswer),
    Frame.HAND_BACK: (HandBackCall, HandBackAnswer),
}
_MSGPACK = msgspec.msgpack.Encoder()
_DECODERS: dict[type, Any] = {}


def encode_message(msg: Any) -> bytes:
    """A frame's payload: MessagePack for the link's own messages, protobuf for floe.v1's."""
    if isinstance(msg, msgspec.Struct):
        return _MSGPACK.encode(msg)
    return msg.SerializeToString()


def decode_message(kind: type, payload: bytes) -> Any:
    """The message of type ``kind`` in ``payload``; ValidationError when it is not one."""
    try:
        if issubclass(kind, msgspec.Struct):
            dec = _DECODERS.get(kind)
            if dec is None:
                dec = _DECODERS[kind] = msgspec.msgpack.Decoder(kind)
            return dec.decode(payload)
        return kind.FromString(payload)
    except (msgspec.DecodeError, DecodeError, ValueError, RuntimeError):
        raise ValidationError(f"the message is not a valid {kind.__name__}") from None


def _i32(values: Any) -> bytes:
    return np.asarray(values, dtype="<i4").tobytes()


def link_options(o: EncodeOptions) -> LinkOptions:
    left = None
    if o.deadline is not None:
        left = max(1e-3, (o.deadline - time.monotonic()) * 1000.0)
    return LinkOptions(o.normalize, o.truncate, o.truncation_direction, o.prompt_name, o.prompt,
                       o.dimensions, o.output_dtype, o.priority, left)


def options_from_link(o: LinkOptions) -> EncodeOptions:
    if o.output_dtype not in OUTPUT_DTYPES:
        raise ValidationError(f"unknown output_dtype {o.output_dtype!r}", param="output_dtype")
    if o.truncation_direction not in ("left", "right"):
        raise ValidationError(f"unknown truncation_direction {o.truncation_direction!r}",
                              param="truncation_direction")
    deadline = None
    if o.deadline_ms is not None and o.deadline_ms == o.deadline_ms:   # not NaN
        deadline = deadline_after(o.deadline_ms / 1000.0)
    return EncodeOptions(normalize=o.normalize, truncate=o.truncate,
                         truncation_direction=o.truncation_direction, prompt_name=o.prompt_name,
                         prompt=o.prompt, dimensions=o.dimensions, output_dtype=o.output_dtype,
                         priority=o.priority, deadline=deadline)


def encode_call(request_id: str, tokens: "TokenBatch", options: EncodeOptions, model: str,
                kind: str) -> EncodeCall:
    spans = tokens.spans
    return EncodeCall(
        request_id=request_id, model=model, kind=kind, ids=_i32(tokens.ids),
        lengths=_i32(tokens.lengths), options=link_options(options),
        type_splits=None if tokens.type_splits is None else _i32(tokens.type_splits),
        span_counts=None if spans is None else _i32(spans.counts),
        span_bounds=None if spans is None else _i32(spans.bounds))


def tokens_from_call(call: EncodeCall) -> "TokenBatch":
    """The call's token ids; malformed buffers are a ValidationError."""
    for name in ("ids", "lengths", "type_splits", "span_counts", "span_bounds"):
        buf = getattr(call, name)
        if buf is not None and len(buf) % 4:
            raise ValidationError(f"{name} is not whole int32s", param=name)
    lengths = np.frombuffer(call.lengths, dtype="<i4").astype(np.int64)
    tokens = TokenBatch.from_bytes(call.ids, lengths.tolist())
    splits = (None if call.type_splits is None
              else np.frombuffer(call.type_splits, dtype="<i4").astype(np.int64))
    spans = None
    if call.span_counts is not None or call.span_bounds is not None:
        if call.span_bounds is None or call.span_counts is None or len(call.span_bounds) % 8:
            raise ValidationError("span_bounds is not whole int32 pairs", param="spans")
        spans = Spans(counts=np.frombuffer(call.span_counts, dtype="<i4").astype(np.int64),
                      bounds=np.frombuffer(call.span_bounds, dtype="<i4").astype(np.int64))
    if splits is not None or spans is not None:
        tokens = TokenBatch(tokens.ids, tokens.lengths, splits, spans)
    return tokens


def encode_answer(r: "EmbedResult") -> EncodeAnswer:
    t = r.timings
    sparse = r.sparse
    return EncodeAnswer(
        request_id=r.request_id, model=r.model, n=r.n, dim=r.dim, dtype=r.dtype, data=r.data,
        token_counts=np.asarray(r.token_counts, dtype="<i8").tobytes(),
        timings=(t.tokenize_s, t.queue_s, t.inference_s, t.total_s),
        sparse_counts=None if sparse is None else np.asarray(sparse.counts, "<i8").tobytes(),
        sparse_indices=None if sparse is None else np.asarray(sparse.indices, "<i4").tobytes(),
        sparse_values=None if sparse is None else np.asarray(sparse.values, "<f4").tobytes(),
        handed_back=None if r.handed_back is None else _i32(r.handed_back))


def hand_back_answer(given: list[tuple[str, np.ndarray]]) -> HandBackAnswer:
    return HandBackAnswer(calls=[(rid, _i32(items)) for rid, items in given])


def handed_from_answer(a: HandBackAnswer) -> list[tuple[str, np.ndarray]]:
    """(request id, items) per call; items not whole int32s are a ValidationError."""
    out = []
    for rid, buf in a.calls:
        if len(buf) % 4:
            raise ValidationError("handed-back items are not whole int32s", param="calls")
        out.append((rid, np.frombuffer(buf, dtype="<i4").astype(np.int64)))
    return out


def result_from_answer(a: EncodeAnswer) -> "EmbedResult":
    sparse = None
    if a.sparse_counts is not None:
        sparse = SparseRows(counts=np.frombuffer(a.sparse_counts, dtype="<i8").astype(np.int64),
                            indices=np.frombuffer(a.sparse_indices or b"", dtype="<i4"),
                            values=np.frombuffer(a.sparse_values or b"", dtype="<f4"))
    return EmbedResult(n=a.n, dim=a.dim, dtype=a.dtype, data=a.data,
                       token_counts=np.frombuffer(a.token_counts, dtype="<i8").astype(np.int64),
                       model=a.model, request_id=a.request_id, timings=Timings(*a.timings),
                       sparse=sparse, handed_back=None if a.handed_back is None else
                       np.frombuffer(a.handed_back, dtype="<i4").astype(np.int64))
FRAME_HEADER = struct.Struct("<IIB")
MAX_CALL_ID = 2 ** 32 - 1


def frame(kind: int, call_id: int, payload: bytes = b"") -> bytes:
    return FRAME_HEADER.pack(len(payload), call_id, kind) + payload


class FrameReader:
    """Splits a byte stream into frames; ``feed`` returns the complete ones."""

    def __init__(self, max_payload: int) -> None:
        self.max_payload = max_payload
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        """(type, call id, payload) of each complete frame. Raises ValueError on a frame larger
        than the limit (the connection is then unusable: the caller closes it)."""
        buf = self._buf
        buf += data
        frames, pos, size = [], 0, len(buf)
        while size - pos >= FRAME_HEADER.size:
            length, call_id, kind = FRAME_HEADER.unpack_from(buf, pos)
            if length > self.max_payload:
                raise ValueError(f"a {length}-byte frame, over the {self.max_payload}-byte limit")
            end = pos + FRAME_HEADER.size + length
            if end > size:
                break
            frames.append((kind, call_id, bytes(buf[pos + FRAME_HEADER.size:end])))
            pos = end
        if pos:
            del buf[:pos]
        return frames


def error_to_frame(err: FloeError) -> bytes:
    """An ERROR frame's payload: the error's fields (kind, message, param, Retry-After) as JSON."""
    return json.dumps(error_fields(err), separators=(",", ":")).encode()


def error_from_frame(payload: bytes) -> FloeError:
    """The FloeError an ERROR frame carries, exactly; an unreadable one is an InternalError."""
    try:
        d = json.loads(payload)
        return error_from_fields(d["kind"], str(d.get("message") or ""), d.get("param"),
                                 d.get("retry_after"))
    except (ValueError, KeyError, TypeError, AttributeError):
        return InternalError("the replica sent an unreadable error")


# --- control plane: manager <-> replica process --------------------------------------------------

@dataclass(frozen=True)
class Placement:
    """Where one replica runs (computed by floe/fleet/placement.py)."""

    cuda_visible_devices: Optional[str] = None
    gpu_memory_fraction: Optional[float] = None
    cpu_cores: Optional[list[int]] = None
    threads: Optional[int] = None


@dataclass(frozen=True)
class ReplicaLaunch:
    """What the manager hands a replica process it starts (JSON in the FLOE_REPLICA_LAUNCH
    environment variable, readable only by this user): the whole settings tree, so every
    ``floe serve`` setting reaches the replica, plus the replica's slot.

    ``address`` is "unix:/path" or "host:port"; ``token`` is a per-launch secret the replica
    requires as a Bearer token on every call except health, so only its manager can use it.
    """

    settings: dict
    index: int
    address: str
    parent_pid: int
    token: str
    placement: Placement = field(default_factory=Placement)

    ENV = "FLOE_REPLICA_LAUNCH"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "ReplicaLaunch":
        d = json.loads(text)
        d["placement"] = Placement(**d.get("placement") or {})
        return cls(**d)


class _HelloLine:
    """A process' handshake as one stdout line: ``PREFIX {json of the dataclass}``."""

    PREFIX = ""

    def to_line(self) -> str:
        return f"{self.PREFIX} {json.dumps(dataclasses.asdict(self), separators=(',', ':'))}"

    @classmethod
    def from_line(cls, line: str):
        """The hello in ``line``, or None when the line is something else."""
        if not line.startswith(cls.PREFIX + " "):
            return None
        try:
            return cls(**json.loads(line[len(cls.PREFIX) + 1:]))
        except (ValueError, TypeError):
            return None


@dataclass(frozen=True)
class ReplicaHello(_HelloLine):
    """The replica's handshake: one stdout line ``FLOE_REPLICA_READY {json}`` once it serves."""

    address: str    # "unix:/path": the link's frames (floe/transport/frames.py); "host:port": gRPC
    pid: int
    engine: str
    dtype: str
    device: str
    attention: str = ""   # the engine's ``attention``: floe's kernel runs, or why not

    PREFIX = "FLOE_REPLICA_READY"


# --- control plane: main process <-> front-end worker processes --------------------------------

@dataclass(frozen=True)
class FrontendLaunch:
    """What ``floe serve`` hands each extra front-end worker (JSON in FLOE_FRONTEND_LAUNCH): the
    settings tree and the inherited listening HTTP socket. The replicas it may use arrive after
    start as ``ReplicaTable`` lines on its stdin; a closed stdin means the main process is gone."""

    settings: dict
    index: int                      # 1 .. frontends - 1 (the main process is front end 0)
    frontends: int
    parent_pid: int
    http_fd: Optional[int] = None   # a listening socket shared by every front end (accept balances)
    metrics_dir: Optional[str] = None   # prometheus_client's multiprocess directory
    # every served model's settings tree as floe serve resolved it (``--model A --model B``: one
    # each, in order; the first is ``settings``); empty: ``settings`` alone
    models: tuple = ()

    ENV = "FLOE_FRONTEND_LAUNCH"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "FrontendLaunch":
        d = json.loads(text)
        d["models"] = tuple(d.get("models") or ())
        return cls(**d)


@dataclass(frozen=True)
class ReplicaEndpoint:
    """One replica as the main process' supervisor sees it, for a front-end worker's router.

    ``generation`` changes on every (re)start, so the worker opens a fresh channel to the new
    process; ``healthy`` is the supervisor's rotation state (last probe, process alive)."""

    index: int
    address: str
    token: str
    generation: int
    healthy: bool
    state: str
    restarts: int = 0
    message: str = ""
    pid: Optional[int] = None
    model: str = ""     # the served model whose replica this is (several --model: the key)


@dataclass(frozen=True)
class ReplicaTable:
    """The supervisor's view of every replica: one stdin line ``FLOE_REPLICAS {json}``, sent at
    start, on every change, and at least every health interval."""

    replicas: tuple[ReplicaEndpoint, ...]

    PREFIX = "FLOE_REPLICAS"

    def to_line(self) -> str:
        body = [dataclasses.asdict(r) for r in self.replicas]
        return f"{self.PREFIX} {json.dumps(body, separators=(',', ':'))}"

    @classmethod
    def from_line(cls, line: str) -> Optional["ReplicaTable"]:
        if not line.startswith(cls.PREFIX + " "):
            return None
        try:
            return cls(tuple(ReplicaEndpoint(**r) for r in json.loads(line[len(cls.PREFIX) + 1:])))
        except (ValueError, TypeError):
            return None


@dataclass(frozen=True)
class FrontendHello(_HelloLine):
    """A front-end worker's handshake: one stdout line ``FLOE_FRONTEND_READY {json}`` once its
    HTTP and gRPC servers accept requests."""

    index: int
    pid: int

    PREFIX = "FLOE_FRONTEND_READY"


def deadline_after(seconds: float) -> float:
    """The deadline ``seconds`` from now on the clock ``EncodeOptions.deadline`` uses."""
    if not seconds == seconds or seconds < 0:   # NaN or negative: already past
        seconds = 0.0
    return time.monotonic() + min(seconds, MAX_DEADLINE_S)
