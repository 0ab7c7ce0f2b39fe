"""What floe's Python client sends and receives, apart from how it runs (floe/client.py): the
steps a plan yields (an HTTP request, an RPC, a pause), the bodies and messages it builds, the
answers it decodes into numpy, and how a failed answer becomes the FloeError the server decided.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Generator, Optional, Union

import numpy as np

from floe import errors
from floe.errors import ErrorKind, FloeError
from floe.protocol import EmbedResult, EncodeOptions, TokenBatch

_HTTP_KIND = {status: kind for kind, status in errors.HTTP_STATUS.items()}


# --- the steps a plan yields, and their answers ---------------------------------------------

@dataclass(frozen=True)
class Http:
    method: str
    path: str
    content: Optional[bytes] = None
    headers: Optional[dict] = None


@dataclass(frozen=True)
class Rpc:
    method: str  # a floe.v1.Embedder method name
    request: Any


@dataclass(frozen=True)
class Sleep:
    seconds: float


Plan = Generator[Union[Http, Rpc, Sleep], Any, Any]


def http_error(status: int, payload: Any, retry_after: Optional[str]) -> FloeError:
    """The FloeError an HTTP answer stands for: exactly the kind and param a floe server put in
    its envelope (``code``, ``param``); the status's usual meaning for any other server."""
    message, kind, param = f"HTTP {status}", None, None
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        body = payload["error"]
        message = str(body.get("message") or message)
        kind = body.get("code") if isinstance(body.get("code"), str) else None
        param = body.get("param")
    seconds = None
    if retry_after:
        try:
            seconds = float(retry_after)
        except ValueError:
            seconds = None
    if kind is None or kind.upper() not in ErrorKind.__members__:
        kind = _HTTP_KIND.get(status, ErrorKind.INTERNAL).name
    return errors.error_from_fields(kind, message, param, seconds)


def check_http(r) -> None:
    if r.status_code != 200:
        raise http_error(r.status_code, json_or_none(r), r.headers.get("retry-after"))


def grpc_error(e) -> FloeError:
    """The FloeError a failed RPC stands for. A status that names neither a kind nor a
    Retry-After did not come from a floe server's handler (most often: the server cannot be
    reached), so it carries no retry_after and is never retried."""
    metadata = [(k, v) for k, v in (e.trailing_metadata() or ())]
    err = errors.from_grpc_status(e.code().name, e.details() or "", metadata)
    if not any(k in (errors.KIND_METADATA_KEY, errors.RETRY_AFTER_METADATA_KEY)
               for k, _ in metadata):
        err.retry_after = None
    return err


def unreachable(target: str, e: BaseException) -> FloeError:
    return errors.UnavailableError(f"cannot reach {target}: {e}", retry_after=None)


def http_body(texts, ids, o: EncodeOptions) -> bytes:
    import orjson
    body: dict[str, Any] = {"inputs": texts if texts is not None else ids}
    for key in ("normalize", "truncate", "prompt_name", "dimensions"):
        value = getattr(o, key)
        if value is not None:
            body[key] = value
    return orjson.dumps(body)


def http_array(r, o: EncodeOptions) -> np.ndarray:
    n, dim = int(r.headers["x-embedding-count"]), int(r.headers["x-embedding-dim"])
    arr = np.frombuffer(r.content, dtype="<f4").reshape(n, dim)
    if o.output_dtype == "float16":
        return arr.astype(np.float16)  # round to nearest even, as the replica casts
    if o.output_dtype == "bfloat16":
        # HTTP ships float32; apply the same round-to-nearest-even cast the replica would.
        return EmbedResult.from_array(arr, "bfloat16", np.zeros(n)).as_float32().copy()
    return arr.astype(np.float32, copy=True)


def grpc_request(texts, ids, o: EncodeOptions):
    from floe.proto.convert import request_to_proto
    tokens = TokenBatch.from_lists(ids) if ids is not None else None
    return request_to_proto(uuid.uuid4().hex, o, tokens=tokens, texts=texts)


def grpc_array(reply) -> np.ndarray:
    from floe.proto.convert import result_from_proto
    result = result_from_proto(reply)
    if result.dtype == "float16":
        return np.frombuffer(result.data, dtype="<f2").reshape(result.n, result.dim).astype(np.float16)
    return result.as_float32().copy()


def json_or_none(response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


@dataclass(frozen=True)
class Chunks:
    """Documents cut into chunks: row k of ``embeddings`` is chunk ``chunk[k]`` of document
    ``input_index[k]``, its characters ``text[start[k]:end[k]]``; ``counts[i]`` chunks came from
    document i (0 for an empty one)."""

    embeddings: np.ndarray
    input_index: np.ndarray
    chunk: np.ndarray
    start: np.ndarray
    end: np.ndarray
    counts: np.ndarray

    @classmethod
    def from_json(cls, body: dict) -> "Chunks":
        rows = body["chunks"]
        col = lambda key: np.array([c[key] for c in rows], dtype=np.int64)  # noqa: E731
        emb = np.array([c["embedding"] for c in rows], dtype=np.float32)
        return cls(emb.reshape(len(rows), -1), col("input_index"), col("chunk"), col("start"),
                   col("end"), np.array(body["chunk_counts"], dtype=np.int64))

    @classmethod
    def from_proto(cls, reply) -> "Chunks":
        col = lambda f: np.array(f, dtype=np.int64)  # noqa: E731
        return cls(grpc_array(reply), col(reply.chunk_input_index), col(reply.chunk_index),
                   col(reply.chunk_start), col(reply.chunk_end), col(reply.chunk_counts))
