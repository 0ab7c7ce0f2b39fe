"""Python client for a floe server: HTTP or gRPC, sync (``Client``) or async (``AsyncClient``).

Embeddings come back as an (n, dim) numpy array decoded straight from the server's bytes
(gRPC: floe.v1.Embedder's embedding buffer; HTTP: /embed with ``Accept: application/octet-stream``),
never through a list of Python floats. Server errors are raised as floe.errors types.

    with floe.Client("127.0.0.1:50050", protocol="grpc") as c:
        vectors = c.embed(["a query", "a document"])
        chunks = c.embed_chunks([long_document], max_tokens=256, overlap=32)  # or late=True
        ranked = c.rerank("a query", ["doc one", "doc two"])      # a reranker served
        sparse = c.embed_sparse(["a query"], model="splade")       # a SPLADE model served

Bulk input
    ``embed`` takes any number of inputs: it splits them into requests the server accepts (at most
    ``max_batch_size`` inputs and about ``max_chunk_chars`` characters each), sends them one after
    the other and returns one array in input order. ``iter_embed`` yields the array of each request
    as it arrives, for input too large to hold twice in memory. The item limit is learned from the
    server: over HTTP from ``GET /info`` (``max_client_batch_size``, asked once per client); over gRPC
    the server does not report it (GetReplicaInfo describes replicas, not the front end's admission
    limit), so it is ``max_batch_size``, default 2048 (the server's default ``--max-client-batch-size``):
    pass the server's value when it was started with a smaller one.

Retries
    A request the server refused as overloaded (HTTP 429, gRPC RESOURCE_EXHAUSTED with kind
    ``overloaded``) or unavailable (HTTP 503, gRPC UNAVAILABLE from a floe server: not ready,
    draining) is sent again after the Retry-After the server named, within ``Retry``'s bounds (tries
    per request and seconds of waiting). Nothing else is retried: not 400 or 413 (the same request
    fails the same way), not a failure to connect (raised at once as UnavailableError with
    ``retry_after`` None, so a wrong address fails fast). When the bounds run out the server's error
    is raised, its ``retry_after`` still set.

Errors
    Every failure is a ``floe.errors.FloeError`` of the kind the server decided, the same over both
    protocols: ``TooLargeError`` (413; too many inputs or an input too long), ``OverloadedError``
    (429), ``UnavailableError`` (503 or unreachable), ``ValidationError`` (400), ``AuthError`` (401),
    ``ModelNotFoundError`` (404) and so on. Over gRPC the kind comes from the ``floe-error-kind``
    trailing metadata, never from message text.

Output dtypes
    ``output_dtype="float32"`` (default) returns float32; ``"float16"`` returns a float16 array
    (over gRPC the server's own float16 bytes; over HTTP, which ships float32, the same
    round-to-nearest-even cast done here). numpy has no bfloat16, so ``"bfloat16"`` returns a
    float32 array whose values are exactly the bfloat16 values (the low 16 bits of every float are
    zero): ``arr.view(np.uint32) >> 16`` gives the raw bfloat16 bits.

Sync and async share everything but the I/O: each operation is written once as a generator (a
"plan") that yields what to send (an HTTP request, an RPC, a pause) and receives the answer;
``Client`` and ``AsyncClient`` only carry those steps out, blocking or awaited.

``python -m floe.client --prompt TEXT`` prints one embedding's dimension, norm and first values.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
import uuid
from dataclasses import dataclass
from typing import (Any, AsyncIterator, Callable, Iterator, Optional, Sequence, Union)

import numpy as np

from floe import errors
from floe.errors import ErrorKind, FloeError
from floe.protocol import EncodeOptions
# what a plan sends and receives (floe/client_wire.py); Chunks is part of this module's API
from floe.client_wire import (Chunks, Http as _Http, Plan, Rpc as _Rpc, Sleep as _Sleep,  # noqa: F401
                               check_http as _check_http, grpc_array as _grpc_array,
                               grpc_error as _grpc_error, grpc_request as _grpc_request,
                               http_array as _http_array, http_body as _http_body,
                               json_or_none as _json_or_none, unreachable as _unreachable)

Inputs = Union[str, Sequence[str], Sequence[Sequence[int]]]

DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_BATCH_SIZE = 2048  # the server's default --max-client-batch-size
# Keeps one HTTP body well under the server's default --payload-limit (16 MB) even for text that
# takes 4 bytes a character in UTF-8; a token id is counted as 8 characters of JSON.
DEFAULT_MAX_CHUNK_CHARS = 3_000_000
_ID_CHARS = 8
_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
_RETRIED = (ErrorKind.OVERLOADED, ErrorKind.UNAVAILABLE)


@dataclass(frozen=True)
class Retry:
    """When a request refused as overloaded or unavailable is sent again.

    ``attempts``: tries per request, the first included (1 = never retry). ``max_wait``: seconds
    one request may spend waiting between its tries, all waits together; a Retry-After that would
    pass it is not waited for (the error is raised at once). ``jitter``: each wait is the server's
    Retry-After stretched by up to this fraction at random, so that clients refused together do not
    come back together.
    """

    attempts: int = 5
    max_wait: float = 60.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.max_wait < 0 or self.jitter < 0:
            raise ValueError("Retry needs attempts >= 1, max_wait >= 0 and jitter >= 0")

    def delay(self, err: FloeError, attempt: int, waited: float,
              rand: Callable[[], float] = random.random) -> Optional[float]:
        """Seconds to wait before try ``attempt + 1`` after ``err``, or None to give up.

        Only an overloaded or unavailable answer that names a Retry-After is retried (a floe server
        always names one; a connection failure has none)."""
        if err.kind not in _RETRIED or err.retry_after is None or attempt >= self.attempts:
            return None
        wait = max(0.0, err.retry_after) * (1.0 + self.jitter * rand())
        if waited + err.retry_after > self.max_wait:
            return None
        return min(wait, self.max_wait - waited)


NO_RETRY = Retry(attempts=1)


# --- input, options, chunks (pure) -------------------------------------------------------------

def _split_inputs(inputs: Inputs) -> tuple[Optional[list[str]], Optional[list[list[int]]]]:
    """Texts or token-id lists; anything else is a ValidationError raised before any I/O."""
    if isinstance(inputs, str):
        return [inputs], None
    items = list(inputs)
    if not items:
        raise errors.ValidationError("embed() needs at least one input", param="input")
    if all(isinstance(x, str) for x in items):
        return items, None
    if all(not isinstance(x, (str, bytes)) and hasattr(x, "__iter__") for x in items):
        ids = [[int(t) for t in x] for x in items]
        return None, ids
    raise errors.ValidationError("inputs must be a string, a list of strings or a list of token-id "
                                 "lists", param="input")


def _options(normalize, dimensions, prompt_name, truncate, output_dtype) -> EncodeOptions:
    if output_dtype not in ("float32", "float16", "bfloat16"):
        raise errors.ValidationError(f"unknown output_dtype {output_dtype!r}", param="output_dtype")
    return EncodeOptions(normalize=normalize, dimensions=dimensions, prompt_name=prompt_name,
                         truncate=truncate, output_dtype=output_dtype)


def chunk_bounds(sizes: Sequence[int], max_items: int, max_chars: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of consecutive chunks holding at most ``max_items`` items and, unless one
    item alone is larger, at most ``max_chars`` of ``sizes`` together. Covers every item once, in
    order."""
    start, total = 0, 0
    for i, size in enumerate(sizes):
        if i > start and (i - start >= max_items or total + size > max_chars):
            yield start, i
            start, total = i, 0
        total += size
    if start < len(sizes):
        yield start, len(sizes)


@dataclass
class _Request:
    """One embed call after validation: the inputs, the options, and the chunks they go out in."""

    texts: Optional[list[str]]
    ids: Optional[list[list[int]]]
    options: EncodeOptions

    @property
    def n(self) -> int:
        return len(self.texts if self.texts is not None else self.ids)

    def chunks(self, max_items: int, max_chars: int) -> Iterator[tuple[Optional[list[str]],
                                                                       Optional[list[list[int]]]]]:
        if self.texts is not None:
            sizes = [len(t) for t in self.texts]
        else:
            sizes = [_ID_CHARS * len(x) for x in self.ids]
        for a, b in chunk_bounds(sizes, max_items, max_chars):
            yield (self.texts[a:b] if self.texts is not None else None,
                   self.ids[a:b] if self.ids is not None else None)





# --- plans: each operation written once --------------------------------------------------------

class _Base:
    """What ``Client`` and ``AsyncClient`` share: settings and every operation as a plan."""

    def __init__(self, url_or_address: str, protocol: Optional[str], api_key: Optional[str],
                 timeout: float, max_batch_size: Optional[int], max_chunk_chars: int,
                 retry: Optional[Retry]) -> None:
        self.protocol, self.target = _target(url_or_address, protocol)
        self.api_key = api_key
        self.timeout = timeout
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self._max_batch_size = max_batch_size
        self._server_limit: Optional[int] = None
        self.max_chunk_chars = max_chunk_chars
        self.retry = retry or NO_RETRY

    def _limit_plan(self) -> Plan:
        """Most inputs per request: the server's max_client_batch_size (HTTP, learned once), the
        constructor's max_batch_size, or 2048; the smaller of those that are known."""
        if self.protocol == "http" and self._server_limit is None:
            try:
                r = yield _Http("GET", "/info")
                _check_http(r)
                self._server_limit = int((r.json() or {}).get("max_client_batch_size") or 0) or None
            except (FloeError, ValueError, TypeError):
                pass  # not a floe /info: the request itself will say what is wrong
        known = [x for x in (self._max_batch_size, self._server_limit) if x]
        return min(known) if known else DEFAULT_MAX_BATCH_SIZE

    def _prepare(self, inputs: Inputs, normalize, dimensions, prompt_name, truncate,
                 output_dtype) -> _Request:
        texts, ids = _split_inputs(inputs)
        return _Request(texts, ids, _options(normalize, dimensions, prompt_name, truncate,
                                             output_dtype))

    def _retried(self, once: Callable[[], Plan]) -> Plan:
        """Runs the plan ``once()`` makes, again after the server's Retry-After for as long as
        ``self.retry`` allows; returns its result."""
        attempt, waited = 1, 0.0
        while True:
            try:
                return (yield from once())
            except FloeError as err:
                wait = self.retry.delay(err, attempt, waited)
                if wait is None:
                    raise
            yield _Sleep(wait)
            attempt, waited = attempt + 1, waited + wait

    def _chunk_plan(self, texts, ids, o: EncodeOptions) -> Plan:
        """One request, retried as ``self.retry`` allows; returns its array."""
        def once() -> Plan:
            if self.protocol == "http":
                r = yield _Http("POST", "/embed", _http_body(texts, ids, o),
                                {"accept": "application/octet-stream",
                                 "content-type": "application/json"})
                _check_http(r)
                return _http_array(r, o)
            return _grpc_array((yield _Rpc("Encode", _grpc_request(texts, ids, o))))
        return (yield from self._retried(once))

    def _chunks_plan(self, texts: list[str], o: EncodeOptions, max_tokens: Optional[int],
                     overlap: int, late: bool) -> Plan:
        """One chunked request (documents are not split across requests: how many chunks they
        give is the server's to count, and it answers 413 past its item limit)."""
        def once() -> Plan:
            if self.protocol == "http":
                import orjson
                body = orjson.loads(_http_body(texts, None, o))
                body["chunking"] = {"overlap": overlap, "late": late}
                if max_tokens:
                    body["chunking"]["max_tokens"] = max_tokens
                r = yield _Http("POST", "/embed", orjson.dumps(body),
                                {"content-type": "application/json"})
                _check_http(r)
                return Chunks.from_json(r.json())
            from floe.proto import floe_pb2
            msg = _grpc_request(texts, None, o)
            msg.chunking.CopyFrom(floe_pb2.ChunkOptions(max_tokens=max_tokens or 0,
                                                        overlap=overlap, late=late))
            return Chunks.from_proto((yield _Rpc("Encode", msg)))
        return (yield from self._retried(once))

    def _rerank_plan(self, query: str, documents: list[str], top_n: Optional[int],
                     raw_scores: bool, truncate: Optional[bool], model: str) -> Plan:
        """One rerank request (TEI's /rerank, or gRPC Rerank): [(document index, score)], best
        first."""
        def once() -> Plan:
            if self.protocol == "http":
                import orjson
                body: dict[str, Any] = {"query": query, "texts": documents,
                                        "raw_scores": raw_scores, "model": model}
                if truncate is not None:
                    body["truncate"] = truncate
                r = yield _Http("POST", "/rerank", orjson.dumps(body),
                                {"content-type": "application/json"})
                _check_http(r)
                ranked = [(int(x["index"]), float(x["score"])) for x in r.json()]
                return ranked[:top_n] if top_n else ranked
            from floe.proto import floe_pb2
            msg = floe_pb2.RerankRequest(request_id=uuid.uuid4().hex, query=query,
                                         documents=documents, top_n=top_n or 0,
                                         raw_scores=raw_scores, model=model)
            if truncate is not None:
                msg.truncate = truncate
            reply = yield _Rpc("Rerank", msg)
            return [(int(x.index), float(x.score)) for x in reply.results]
        return (yield from self._retried(once))

    def _sparse_plan(self, texts: list[str], truncate: Optional[bool], model: str) -> Plan:
        """One sparse request (TEI's /embed_sparse, or gRPC Encode of a SPLADE model): per text,
        its non-zero (indices, values), indices ascending."""
        def once() -> Plan:
            if self.protocol == "http":
                import orjson
                body: dict[str, Any] = {"inputs": texts, "model": model}
                if truncate is not None:
                    body["truncate"] = truncate
                r = yield _Http("POST", "/embed_sparse", orjson.dumps(body),
                                {"content-type": "application/json"})
                _check_http(r)
                return [(np.array([e["index"] for e in row], dtype=np.int32),
                         np.array([e["value"] for e in row], dtype=np.float32))
                        for row in r.json()]
            from floe.proto.convert import result_from_proto
            o = _options(None, None, None, truncate, "float32")
            msg = _grpc_request(texts, None, o)
            msg.model = model
            rows = result_from_proto((yield _Rpc("Encode", msg))).sparse
            if rows is None:
                raise errors.ValidationError("the server's model is not a sparse model",
                                             param="model")
            off = rows.offsets()
            return [(rows.indices[off[i]:off[i + 1]].copy(), rows.values[off[i]:off[i + 1]].copy())
                    for i in range(len(texts))]
        return (yield from self._retried(once))

    def _health_plan(self) -> Plan:
        if self.protocol == "http":
            try:
                live = (yield _Http("GET", "/health")).status_code == 200
                ready = yield _Http("GET", "/ready")
            except FloeError as e:
                return {"healthy": False, "ready": False, "message": e.message}
            body = _json_or_none(ready) or {}
            return {"healthy": live, "ready": ready.status_code == 200,
                    "message": str(body.get("reason") or body.get("status", ""))}
        from floe.proto import floe_pb2
        try:
            h = yield _Rpc("HealthCheck", floe_pb2.HealthCheckRequest())
        except FloeError as e:
            return {"healthy": False, "ready": False, "message": e.message or e.kind.name}
        return {"healthy": h.healthy, "ready": h.ready, "message": h.message}

    def _info_plan(self) -> Plan:
        if self.protocol == "http":
            r = yield _Http("GET", "/info")
            _check_http(r)
            return r.json()
        from google.protobuf.json_format import MessageToDict
        from floe.proto import floe_pb2
        reply = yield _Rpc("GetReplicaInfo", floe_pb2.GetReplicaInfoRequest())
        return MessageToDict(reply, preserving_proto_field_name=True)

    def _http_headers(self) -> dict:
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _grpc_metadata(self):
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else None


def _advance(plan: Plan, answer: Any, failure: Optional[FloeError]) -> tuple[bool, Any]:
    """Resumes a plan with the last step's answer (or throws its failure in): (False, next step)
    or, once the plan returns, (True, its result)."""
    try:
        return False, (plan.throw(failure) if failure is not None else plan.send(answer))
    except StopIteration as stop:
        return True, stop.value




_CHUNKS_DOC = """Cuts documents into chunks of at most ``max_tokens`` tokens (default: the
        model's max length) sharing ``overlap`` tokens, and embeds each chunk; ``late=True``
        pools each chunk from its whole document's token states (late chunking). Returns
        ``Chunks``. One request: the documents' chunks count against the server's item limit."""


_RERANK_DOC = """Scores each document against the query with the server's reranker
        (cross-encoder); returns [(document index, score)], highest first, at most ``top_n``.
        ``raw_scores``: the model's logits, without its activation. ``model``: a served
        reranker's name (default: the first one served). One request."""

_SPARSE_DOC = """SPLADE vectors of the texts from the server's sparse model: per text, its
        non-zero entries as (int32 vocabulary indices, ascending; float32 values). ``model``: a
        served sparse model's name (over gRPC it must be given when the server's first model is
        not a sparse one). One request."""


class _Collector:
    """Fills one (n, dim) array from the chunks' arrays, in order."""

    def __init__(self, n: int) -> None:
        self.n, self.row, self.out = n, 0, None

    def add(self, arr: np.ndarray) -> None:
        if self.out is None:
            self.out = np.empty((self.n, arr.shape[1]), dtype=arr.dtype)
        self.out[self.row:self.row + len(arr)] = arr
        self.row += len(arr)

    def result(self) -> np.ndarray:
        assert self.out is not None and self.row == self.n
        return self.out


_EMBED_DOC = """Embeds strings or token-id lists; returns an (n, dim) array in input order.

        Any number of inputs: they go out in requests the server accepts (see the module
        docstring), and a request refused as overloaded or unavailable is retried as ``retry``
        allows. ``output_dtype`` float32 or float16 gives an array of that dtype; bfloat16 gives
        float32 holding bfloat16 values. Raises a floe.errors.FloeError subclass."""


class Client(_Base):
    """Blocking client. ``protocol`` defaults from the address: http(s):// -> HTTP, else gRPC.

    ``max_batch_size``: most inputs per request (default: the server's limit over HTTP, 2048 over
    gRPC). ``max_chunk_chars``: about how many characters one request carries. ``retry``: a
    ``Retry`` (default ``Retry()``); ``floe.client.NO_RETRY`` turns retries off.
    """

    def __init__(self, url_or_address: str = "127.0.0.1:50050", protocol: Optional[str] = None,
                 api_key: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT, *,
                 max_batch_size: Optional[int] = None,
                 max_chunk_chars: int = DEFAULT_MAX_CHUNK_CHARS,
                 retry: Optional[Retry] = Retry()) -> None:
        super().__init__(url_or_address, protocol, api_key, timeout, max_batch_size,
                         max_chunk_chars, retry)
        if self.protocol == "http":
            import httpx
            self._http = httpx.Client(base_url=self.target, timeout=timeout,
                                      headers=self._http_headers())
        else:
            import grpc
            from floe.proto import floe_pb2_grpc
            self._channel = grpc.insecure_channel(self.target, options=_grpc_channel_options())
            self._stub = floe_pb2_grpc.EmbedderStub(self._channel)

    def _step(self, step) -> Any:
        if isinstance(step, _Sleep):
            time.sleep(step.seconds)
            return None
        if isinstance(step, _Http):
            import httpx
            try:
                return self._http.request(step.method, step.path, content=step.content,
                                          headers=step.headers)
            except httpx.TransportError as e:
                raise _unreachable(self.target, e) from None
        import grpc
        try:
            return getattr(self._stub, step.method)(step.request, timeout=self.timeout,
                                                    metadata=self._grpc_metadata())
        except grpc.RpcError as e:
            raise _grpc_error(e) from None

    def _run(self, plan: Plan) -> Any:
        """Carries a plan out: each step's answer is sent back in, each failure thrown in."""
        done, step = _advance(plan, None, None)
        while not done:
            try:
                answer, failure = self._step(step), None
            except FloeError as e:  # only the step's own failure goes back into the plan
                answer, failure = None, e
            done, step = _advance(plan, answer, failure)
        return step

    def iter_embed(self, inputs: Inputs, *, normalize: Optional[bool] = None,
                   dimensions: Optional[int] = None, prompt_name: Optional[str] = None,
                   truncate: Optional[bool] = None, output_dtype: str = "float32"
                   ) -> Iterator[np.ndarray]:
        """Like ``embed``, one array per request as it arrives (their rows, in order, are the
        inputs). Bad inputs or options raise here, before anything is sent."""
        return self._iter(self._prepare(inputs, normalize, dimensions, prompt_name, truncate,
                                        output_dtype))

    def _iter(self, req: _Request) -> Iterator[np.ndarray]:
        limit = self._run(self._limit_plan())
        for texts, ids in req.chunks(limit, self.max_chunk_chars):
            yield self._run(self._chunk_plan(texts, ids, req.options))

    def embed(self, inputs: Inputs, *, normalize: Optional[bool] = None,
              dimensions: Optional[int] = None, prompt_name: Optional[str] = None,
              truncate: Optional[bool] = None, output_dtype: str = "float32") -> np.ndarray:
        req = self._prepare(inputs, normalize, dimensions, prompt_name, truncate, output_dtype)
        out = _Collector(req.n)
        for arr in self._iter(req):
            out.add(arr)
        return out.result()

    embed.__doc__ = _EMBED_DOC

    def embed_chunks(self, documents: Union[str, Sequence[str]], *, max_tokens: Optional[int] = None,
                     overlap: int = 0, late: bool = False, normalize: Optional[bool] = None,
                     dimensions: Optional[int] = None, prompt_name: Optional[str] = None,
                     truncate: Optional[bool] = None) -> Chunks:
        texts = [documents] if isinstance(documents, str) else list(documents)
        o = _options(normalize, dimensions, prompt_name, truncate, "float32")
        return self._run(self._chunks_plan(texts, o, max_tokens, overlap, late))

    embed_chunks.__doc__ = _CHUNKS_DOC

    def rerank(self, query: str, documents: Sequence[str], *, top_n: Optional[int] = None,
               raw_scores: bool = False, truncate: Optional[bool] = None,
               model: str = "") -> list[tuple[int, float]]:
        return self._run(self._rerank_plan(query, list(documents), top_n, raw_scores, truncate,
                                           model))

    rerank.__doc__ = _RERANK_DOC

    def embed_sparse(self, texts: Union[str, Sequence[str]], *, truncate: Optional[bool] = None,
                     model: str = "") -> list[tuple[np.ndarray, np.ndarray]]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self._run(self._sparse_plan(texts, truncate, model))

    embed_sparse.__doc__ = _SPARSE_DOC

    def max_batch_size(self) -> int:
        """Most inputs this client sends in one request (asks the server once over HTTP)."""
        return self._run(self._limit_plan())

    def health(self) -> dict:
        """{"healthy", "ready", "message"}: the server answers, and can embed right now."""
        return self._run(self._health_plan())

    def info(self) -> dict:
        """HTTP: the server's /info; gRPC: GetReplicaInfo as a dict."""
        return self._run(self._info_plan())

    def close(self) -> None:
        if self.protocol == "http":
            self._http.close()
        else:
            self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_Base):
    """The asyncio twin of ``Client`` (httpx.AsyncClient / grpc.aio); same arguments and results.
    Requests of one ``embed`` call go out one after the other; run several calls concurrently for
    more throughput."""

    def __init__(self, url_or_address: str = "127.0.0.1:50050", protocol: Optional[str] = None,
                 api_key: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT, *,
                 max_batch_size: Optional[int] = None,
                 max_chunk_chars: int = DEFAULT_MAX_CHUNK_CHARS,
                 retry: Optional[Retry] = Retry()) -> None:
        super().__init__(url_or_address, protocol, api_key, timeout, max_batch_size,
                         max_chunk_chars, retry)
        if self.protocol == "http":
            import httpx
            self._http = httpx.AsyncClient(base_url=self.target, timeout=timeout,
                                           headers=self._http_headers())
        else:
            import grpc
            from floe.proto import floe_pb2_grpc
            self._channel = grpc.aio.insecure_channel(self.target, options=_grpc_channel_options())
            self._stub = floe_pb2_grpc.EmbedderStub(self._channel)

    async def _step(self, step) -> Any:
        if isinstance(step, _Sleep):
            await asyncio.sleep(step.seconds)
            return None
        if isinstance(step, _Http):
            import httpx
            try:
                return await self._http.request(step.method, step.path, content=step.content,
                                                headers=step.headers)
            except httpx.TransportError as e:
                raise _unreachable(self.target, e) from None
        import grpc
        try:
            return await getattr(self._stub, step.method)(step.request, timeout=self.timeout,
                                                          metadata=self._grpc_metadata())
        except grpc.aio.AioRpcError as e:
            raise _grpc_error(e) from None

    async def _run(self, plan: Plan) -> Any:
        done, step = _advance(plan, None, None)
        while not done:
            try:
                answer, failure = await self._step(step), None
            except FloeError as e:  # only the step's own failure goes back into the plan
                answer, failure = None, e
            done, step = _advance(plan, answer, failure)
        return step

    def iter_embed(self, inputs: Inputs, *, normalize: Optional[bool] = None,
                   dimensions: Optional[int] = None, prompt_name: Optional[str] = None,
                   truncate: Optional[bool] = None, output_dtype: str = "float32"
                   ) -> AsyncIterator[np.ndarray]:
        """``async for arr in client.iter_embed(...)``: one array per request, in order."""
        return self._iter(self._prepare(inputs, normalize, dimensions, prompt_name, truncate,
                                        output_dtype))

    async def _iter(self, req: _Request) -> AsyncIterator[np.ndarray]:
        limit = await self._run(self._limit_plan())
        for texts, ids in req.chunks(limit, self.max_chunk_chars):
            yield await self._run(self._chunk_plan(texts, ids, req.options))

    async def embed(self, inputs: Inputs, *, normalize: Optional[bool] = None,
                    dimensions: Optional[int] = None, prompt_name: Optional[str] = None,
                    truncate: Optional[bool] = None, output_dtype: str = "float32") -> np.ndarray:
        req = self._prepare(inputs, normalize, dimensions, prompt_name, truncate, output_dtype)
        out = _Collector(req.n)
        async for arr in self._iter(req):
            out.add(arr)
        return out.result()

    embed.__doc__ = _EMBED_DOC

    async def embed_chunks(self, documents: Union[str, Sequence[str]], *,
                           max_tokens: Optional[int] = None, overlap: int = 0, late: bool = False,
                           normalize: Optional[bool] = None, dimensions: Optional[int] = None,
                           prompt_name: Optional[str] = None,
                           truncate: Optional[bool] = None) -> Chunks:
        texts = [documents] if isinstance(documents, str) else list(documents)
        o = _options(normalize, dimensions, prompt_name, truncate, "float32")
        return await self._run(self._chunks_plan(texts, o, max_tokens, overlap, late))

    embed_chunks.__doc__ = _CHUNKS_DOC

    async def rerank(self, query: str, documents: Sequence[str], *, top_n: Optional[int] = None,
                     raw_scores: bool = False, truncate: Optional[bool] = None,
                     model: str = "") -> list[tuple[int, float]]:
        return await self._run(self._rerank_plan(query, list(documents), top_n, raw_scores,
                                                 truncate, model))

    rerank.__doc__ = _RERANK_DOC

    async def embed_sparse(self, texts: Union[str, Sequence[str]], *,
                           truncate: Optional[bool] = None,
                           model: str = "") -> list[tuple[np.ndarray, np.ndarray]]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        return await self._run(self._sparse_plan(texts, truncate, model))

    embed_sparse.__doc__ = _SPARSE_DOC

    async def max_batch_size(self) -> int:
        return await self._run(self._limit_plan())

    async def health(self) -> dict:
        return await self._run(self._health_plan())

    async def info(self) -> dict:
        return await self._run(self._info_plan())

    async def close(self) -> None:
        if self.protocol == "http":
            await self._http.aclose()
        else:
            await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def _target(url_or_address: str, protocol: Optional[str]) -> tuple[str, str]:
    proto = protocol or ("http" if url_or_address.startswith(("http://", "https://")) else "grpc")
    if proto not in ("http", "grpc"):
        raise ValueError(f"protocol must be 'http' or 'grpc', not {proto!r}")
    if proto == "http":
        url = url_or_address if "://" in url_or_address else "http://" + url_or_address
        return proto, url.rstrip("/")
    return proto, url_or_address.split("://", 1)[-1].rstrip("/")


def _grpc_channel_options():
    return [("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES)]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m floe.client",
                                description="Embed one prompt with a running floe server.")
    p.add_argument("--prompt", required=True, help="text to embed")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="default 50050 (gRPC) or 8080 (HTTP)")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    p.add_argument("--api-key", default=None)
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    args = p.parse_args(argv)
    port = args.port or (50050 if args.protocol == "grpc" else 8080)
    address = f"{args.host}:{port}"
    try:
        with Client(address, protocol=args.protocol, api_key=args.api_key,
                    timeout=args.timeout) as c:
            vec = c.embed([args.prompt])[0]
    except FloeError as e:
        print(f"error ({e.kind.value}): {e.message}", file=sys.stderr)
        return 1
    first = ", ".join(f"{x:.6f}" for x in vec[:8])
    print(f"dimension: {vec.shape[0]}")
    print(f"norm: {float(np.linalg.norm(vec)):.6f}")
    print(f"first values: [{first}{', ...' if vec.shape[0] > 8 else ''}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
