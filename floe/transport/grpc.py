"""gRPC for both processes: the servicers, the error mapping and the server factory.

``start_server(backend, targets, ...)`` serves, over any ``EncodeBackend`` (the front end's
``EmbedService``, or a replica's ``ReplicaBackend``):

* ``floe.v1.Embedder`` (floe/proto/floe.proto): Encode, HealthCheck, GetReplicaInfo, Abort;
* ``arctic_inference.InferenceService``, so ArcticInference clients work unchanged;
* ``grpc.health.v1.Health`` and server reflection (v1 and v1alpha).

Errors leave as status codes only, mapped once here: a FloeError becomes
``errors.GRPC_STATUS[kind]`` with its message, plus trailing metadata naming the kind exactly
(``floe-error-kind``) and ``retry-after`` where the client should retry. Anything else is INTERNAL
"internal error" with the traceback in the log, never in the status. A request that is not a valid
protobuf message is INVALID_ARGUMENT (grpcio would otherwise answer UNKNOWN with the Python
exception's name and log a traceback). No OK response ever carries an error.

Authentication (``api_key``): every method needs ``authorization: Bearer KEY`` metadata except
``grpc.health.v1``, which stays open so that probes work without credentials. Reflection describes
the API, so it follows the key like the HTTP API description does.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
from typing import Any, Awaitable, Callable, Optional, Protocol, Sequence

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from floe.errors import GRPC_STATUS, FloeError, ValidationError, grpc_trailing_metadata
from floe.proto import arctic_inference_pb2 as arctic_pb2
from floe.proto import floe_pb2
from floe.protocol import EmbedResult, EncodeOptions, TokenBatch, deadline_after
from floe.proto.convert import (chunk_options_from_proto, chunks_to_proto, encode_call_from_proto,
                                result_to_proto)
from floe.request_id import request_id as client_request_id
from floe.transport.auth import AUTH_HINT, bearer_ok

log = logging.getLogger("floe.grpc")

# What a server sends at most. Responses are bounded by the item limit x the model's dimension
# (2048 x 4096 x 4 bytes = 32 MiB); requests are bounded by the configured receive limit.
MAX_SEND_BYTES = 256 * 1024 * 1024

EMBEDDER_SERVICE = floe_pb2.DESCRIPTOR.services_by_name["Embedder"].full_name
ARCTIC_SERVICE = arctic_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
_OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def channel_options(receive_limit: int, send_limit: int = MAX_SEND_BYTES) -> list[tuple[str, Any]]:
    return [("grpc.max_receive_message_length", receive_limit),
            ("grpc.max_send_message_length", send_limit)]


class EncodeBackend(Protocol):
    """What the servicers call."""

    async def encode(self, request_id: str, texts: Optional[list[str]], tokens: Optional[TokenBatch],
                     options: EncodeOptions, model: str) -> EmbedResult:
        """Embeds texts or token ids (exactly one is given); raises FloeError."""

    async def health(self) -> floe_pb2.HealthCheckResponse: ...

    # a front end serving a reranker also has
    #   async def rerank(request_id, query, documents, options, raw_scores, model) -> Scores

    async def replica_info(self) -> floe_pb2.GetReplicaInfoResponse: ...

    async def abort(self, request_id: str) -> bool: ...


# --- error mapping ----------------------------------------------------------------------------

async def abort_with(context: grpc.aio.ServicerContext, err: FloeError) -> None:
    """Ends the call with ``err``'s status, its kind and its Retry-After (the one gRPC table)."""
    await context.abort(getattr(grpc.StatusCode, GRPC_STATUS[err.kind]), err.message,
                        trailing_metadata=grpc_trailing_metadata(err))


class _Malformed:
    """Stands in for a request that did not parse, so the servicer can answer INVALID_ARGUMENT."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name


def _safe_parser(cls: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except (DecodeError, ValueError, RuntimeError):
            return _Malformed(cls.DESCRIPTOR.full_name)
    return parse


def _rpc(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Runs one servicer method: refuses malformed messages, maps errors to a status."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if isinstance(request, _Malformed):
                raise ValidationError(f"the request is not a valid {request.type_name} message")
            return await fn(self, request, context)
        except FloeError as e:
            err: FloeError = e
        except grpc.aio.AbortError:
            raise
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the client gets a generic message, the log the traceback
            log.exception("unhandled error in %s", fn.__qualname__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        await abort_with(context, err)

    return wrapper


def _register(server: grpc.aio.Server, service_descriptor: Any, module: Any, servicer: Any) -> None:
    """Registers ``servicer``'s methods for one service, parsing requests with _safe_parser."""
    handlers = {}
    for method in service_descriptor.methods:
        req_cls = getattr(module, method.input_type.name)
        resp_cls = getattr(module, method.output_type.name)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name), request_deserializer=_safe_parser(req_cls),
            response_serializer=resp_cls.SerializeToString)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service_descriptor.full_name, handlers),))


async def _abort(backend: EncodeBackend, request_id: str) -> tuple[bool, str]:
    """Both services' Abort: the id is required; False when nothing by that id is in flight."""
    if not request_id:
        raise ValidationError("request_id is required", param="request_id")
    ok = await backend.abort(request_id)
    return ok, "aborted" if ok else "no such request in flight"


def with_call_deadline(options: EncodeOptions, context: Any) -> EncodeOptions:
    """The options with the call's gRPC deadline as the request's own (the shorter of it and a
    ``deadline_ms`` the message carries): the replica refuses what cannot finish in time and
    drops what outlives it (floe/replica/admission.py)."""
    remaining = context.time_remaining()
    if remaining is None:
        return options
    deadline = deadline_after(remaining)
    if options.deadline is not None and options.deadline <= deadline:
        return options
    return dataclasses.replace(options, deadline=deadline)


# --- floe.v1.Embedder -------------------------------------------------------------------------

class EmbedderServicer:
    def __init__(self, backend: EncodeBackend) -> None:
        self.backend = backend

    @_rpc
    async def Encode(self, request: floe_pb2.EncodeRequest, context) -> floe_pb2.EncodeResponse:
        request_id, texts, tokens, options, model = encode_call_from_proto(request)
        request_id = client_request_id(request_id)
        options = with_call_deadline(options, context)
        table = None
        if request.HasField("chunking"):
            chunk = chunk_options_from_proto(request.chunking)
            encode_chunked = getattr(self.backend, "encode_chunked", None)
            if encode_chunked is None:
                raise ValidationError("chunking is done by floe serve's front end; this endpoint "
                                      "embeds each input as it is", param="chunking")
            chunks = await encode_chunked(request_id, texts, tokens, options, chunk, model)
            result, table = chunks.result, chunks.table
        else:
            result = await self.backend.encode(request_id, texts, tokens, options, model)
        result.request_id = result.request_id or request_id
        t = result.timings
        context.set_trailing_metadata((
            ("x-tokenization-time", repr(t.tokenize_s)),
            ("x-queue-time", repr(t.queue_s)),
            ("x-inference-time", repr(t.inference_s)),
            ("x-total-time", repr(t.total_s)),
            ("x-tokens", str(int(result.token_counts.sum()))),
        ))
        msg = result_to_proto(result)
        if table is not None:
            chunks_to_proto(table, msg)
        return msg

    @_rpc
    async def Rerank(self, request: floe_pb2.RerankRequest, context) -> floe_pb2.RerankResponse:
        rerank = getattr(self.backend, "rerank", None)
        if rerank is None:  # a replica: reranking is the front end's (it tokenizes the pairs)
            raise ValidationError("this endpoint does not rerank; call the front end")
        request_id = client_request_id(request.request_id)
        options = EncodeOptions(
            truncate=request.truncate if request.HasField("truncate") else None,
            truncation_direction="left" if request.truncation_direction == floe_pb2.LEFT else "right",
            priority=request.priority)
        options = with_call_deadline(options, context)
        scored = await rerank(request_id, request.query, list(request.documents), options,
                              request.raw_scores, request.model)
        scores = scored.scores
        order = scored.ranked(request.top_n)
        docs = request.documents
        results = [floe_pb2.RerankResult(index=int(i), score=float(scores[i]),
                                         document=docs[i] if request.return_documents else "")
                   for i in order]
        t = scored.result.timings
        return floe_pb2.RerankResponse(
            request_id=request_id, model=scored.result.model, results=results,
            tokens=int(scored.result.token_counts.sum()),
            timings=floe_pb2.Timings(tokenize_s=t.tokenize_s, queue_s=t.queue_s,
                                     inference_s=t.inference_s, total_s=t.total_s))

    @_rpc
    async def HealthCheck(self, request, context) -> floe_pb2.HealthCheckResponse:
        return await self.backend.health()

    @_rpc
    async def GetReplicaInfo(self, request, context) -> floe_pb2.GetReplicaInfoResponse:
        return await self.backend.replica_info()

    @_rpc
    async def Abort(self, request: floe_pb2.AbortRequest, context) -> floe_pb2.AbortResponse:
        ok, message = await _abort(self.backend, request.request_id)
        return floe_pb2.AbortResponse(success=ok, message=message)


# --- arctic_inference.InferenceService ---------------------------------------------------------

def arctic_tokens(request: arctic_pb2.EncodeRequest) -> Optional[TokenBatch]:
    """The request's token ids (one int32 LE bytes entry per prompt), or None for prompts."""
    entries = request.token_id_bytes_i32
    if entries and request.prompts:
        raise ValidationError("send either prompts or token_id_bytes_i32, not both", param="prompts")
    if not entries:
        return None
    lengths = np.fromiter((len(b) for b in entries), dtype=np.int64, count=len(entries))
    odd = lengths % 4 != 0
    if odd.any():
        i = int(np.argmax(odd))
        raise ValidationError(
            f"token_id_bytes_i32[{i}] is {int(lengths[i])} bytes, not a multiple of 4 "
            "(int32 little-endian)", param=f"token_id_bytes_i32[{i}]")
    return TokenBatch.from_bytes(b"".join(entries), lengths // 4)


class ArcticServicer:
    def __init__(self, backend: EncodeBackend) -> None:
        self.backend = backend

    @_rpc
    async def Encode(self, request: arctic_pb2.EncodeRequest, context) -> arctic_pb2.EncodeResponse:
        tokens = arctic_tokens(request)
        texts = None if tokens is not None else list(request.prompts)
        n = tokens.n if tokens is not None else len(texts or ())
        if n == 0:
            raise ValidationError("request carries neither prompts nor token_id_bytes_i32",
                                  param="prompts")
        if request.n_prompts != n:
            raise ValidationError(f"n_prompts is {request.n_prompts} but the request carries {n} inputs",
                                  param="n_prompts")
        request_id = client_request_id(request.request_id)
        options = with_call_deadline(EncodeOptions(priority=request.priority), context)
        result = await self.backend.encode(request_id, texts, tokens, options, request.model_name)
        rows = result.as_float32().astype("<f4", copy=False)
        return arctic_pb2.EncodeResponse(
            request_id=request_id, n_prompts=result.n, embedding_dim=result.dim,
            embedding_bytes_fp32=[np.ascontiguousarray(r).tobytes() for r in rows])

    @_rpc
    async def HealthCheck(self, request, context) -> arctic_pb2.HealthCheckResponse:
        h = await self.backend.health()
        return arctic_pb2.HealthCheckResponse(healthy=h.healthy and h.ready, message=h.message)

    @_rpc
    async def GetReplicaInfo(self, request, context) -> arctic_pb2.ReplicaInfoResponse:
        info = await self.backend.replica_info()
        out = []
        for r in info.replicas:
            out.append(arctic_pb2.SingleReplicaInfoResponse(
                model_name=r.model, task="embed", dtype=r.dtype, ready=r.ready,
                parallel_config=json.dumps({"device": r.device, "replica_id": r.replica_id,
                                            "tensor_parallel_size": 1}),
                scheduler_config=json.dumps({"max_batch_tokens": r.max_batch_tokens,
                                             "max_batch_size": r.max_batch_size,
                                             "batch_timeout_ms": r.batch_timeout_ms}),
            ))
        return arctic_pb2.ReplicaInfoResponse(
            replica_infos=out, n_replicas=info.n_replicas, n_healthy_replicas=info.n_healthy_replicas)

    @_rpc
    async def Abort(self, request: arctic_pb2.AbortRequest, context) -> arctic_pb2.AbortResponse:
        ok, message = await _abort(self.backend, request.request_id)
        return arctic_pb2.AbortResponse(success=ok, message=message)


# --- grpc.health.v1 ---------------------------------------------------------------------------

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthServicer(health_pb2_grpc.HealthServicer):
    """grpc.health.v1 for "" and both API services.

    Until the owner calls ``set_serving``, Check follows the backend's own readiness
    (``backend.health().ready``); after it, the explicit value wins (e.g. False while draining).
    Watch sends the current status, then every change made through ``set_serving``.
    """

    SERVICES = ("", EMBEDDER_SERVICE, ARCTIC_SERVICE)

    def __init__(self, backend: EncodeBackend) -> None:
        self.backend = backend
        self.serving: Optional[bool] = None
        self._watchers: set[asyncio.Queue] = set()

    def set_serving(self, serving: Optional[bool]) -> None:
        """True/False: report SERVING/NOT_SERVING; None: follow the backend. Call on the loop."""
        self.serving = serving
        for q in list(self._watchers):
            q.put_nowait(None)

    async def _status(self) -> int:
        if self.serving is not None:
            return _SERVING if self.serving else _NOT_SERVING
        try:
            h = await self.backend.health()
        except Exception:  # noqa: BLE001 - a failing backend is simply not serving
            log.exception("health check of the backend failed")
            return _NOT_SERVING
        return _SERVING if (h.healthy and h.ready) else _NOT_SERVING

    async def Check(self, request: health_pb2.HealthCheckRequest, context):
        if request.service not in self.SERVICES:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service[:100]!r}")
        return health_pb2.HealthCheckResponse(status=await self._status())

    async def Watch(self, request: health_pb2.HealthCheckRequest, context):
        if request.service not in self.SERVICES:
            yield health_pb2.HealthCheckResponse(
                status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            return
        q: asyncio.Queue = asyncio.Queue()
        self._watchers.add(q)
        try:
            last = None
            while True:
                status = await self._status()
                if status != last:
                    yield health_pb2.HealthCheckResponse(status=status)
                    last = status
                await q.get()
        finally:
            self._watchers.discard(q)


# --- authentication ---------------------------------------------------------------------------

class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without ``authorization: Bearer KEY`` with UNAUTHENTICATED (health is open)."""

    def __init__(self, api_key: str, open_prefixes: Sequence[str] = _OPEN_PREFIXES) -> None:
        self._key = api_key
        self._open = tuple(open_prefixes)

    def _allowed(self, details: grpc.HandlerCallDetails) -> bool:
        if details.method.startswith(self._open):
            return True
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                return bearer_ok(value, self._key)
        return False

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
            details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or self._allowed(details):
            return handler

        async def deny(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> None:
            from floe.errors import AuthError
            await abort_with(context, AuthError(AUTH_HINT + " metadata"))

        async def deny_stream(request_or_iterator: Any, context: grpc.aio.ServicerContext):
            await deny(request_or_iterator, context)
            yield  # pragma: no cover - abort raises

        async def deny_read(requests: Any, context: grpc.aio.ServicerContext) -> None:
            # A streaming request is refused once its first message has landed (or after a
            # second): refused while the client is still writing it, the client's send fails and
            # some clients report INTERNAL ("failed execute_batch") instead of UNAUTHENTICATED.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(requests.__aiter__().__anext__(), 1.0)
            await deny(requests, context)

        async def deny_read_stream(requests: Any, context: grpc.aio.ServicerContext):
            await deny_read(requests, context)
            yield  # pragma: no cover - abort raises

        kw = dict(request_deserializer=None, response_serializer=handler.response_serializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(deny, **kw)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(deny_stream, **kw)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(deny_read, **kw)
        return grpc.stream_stream_rpc_method_handler(deny_read_stream, **kw)


# --- the server -------------------------------------------------------------------------------

def add_services(server: grpc.aio.Server, backend: EncodeBackend) -> HealthServicer:
    """Registers Embedder, InferenceService, grpc.health.v1 and reflection (v1 and v1alpha).

    Returns the health servicer: its ``set_serving(bool | None)`` flips readiness.
    """
    from floe.proto import arctic_inference_pb2, floe_pb2 as floe_module

    _register(server, floe_module.DESCRIPTOR.services_by_name["Embedder"], floe_module,
              EmbedderServicer(backend))
    _register(server, arctic_inference_pb2.DESCRIPTOR.services_by_name["InferenceService"],
              arctic_inference_pb2, ArcticServicer(backend))
    health_servicer = HealthServicer(backend)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    _add_reflection(server)
    return health_servicer


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _add_reflection(server: grpc.aio.Server) -> None:
    """Server reflection as grpc.reflection.v1 and v1alpha.

    grpcio-reflection ships only the v1alpha service. v1 is the same protocol under a new package
    name: its messages are field-for-field those of v1alpha, so the v1alpha servicer answers
    both, registered under each name with the same (wire-identical) message codecs. grpcurl and
    grpcui ask for v1 first.
    """
    from grpc_reflection.v1alpha import _async, reflection, reflection_pb2

    names = (EMBEDDER_SERVICE, ARCTIC_SERVICE, health.SERVICE_NAME, REFLECTION_V1,
             reflection.SERVICE_NAME)
    servicer = _async.ReflectionServicer(names)
    for service_name in (reflection.SERVICE_NAME, REFLECTION_V1):
        handler = grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            service_name, {"ServerReflectionInfo": handler}),))


async def start_server(backend: EncodeBackend, targets: Sequence[str], *, receive_limit: int,
                       send_limit: int = MAX_SEND_BYTES, api_key: Optional[str] = None,
                       share_port: bool = False
                       ) -> tuple[grpc.aio.Server, HealthServicer, list[int]]:
    """Starts a gRPC server over ``backend`` on every target ("host:port" or "unix:/path").

    Returns the server, its health servicer and the bound port per target (0 for Unix sockets).
    A target that cannot be bound raises ConfigError naming it. ``share_port``: the front ends
    of one ``floe serve --frontend-workers N`` bind the same port (SO_REUSEPORT; the kernel
    spreads connections over them, and only processes of the same user may join).
    """
    from floe.errors import ConfigError

    options = channel_options(receive_limit, send_limit) + [
        # Without this a second server could silently share the port (SO_REUSEPORT) and steal traffic.
        ("grpc.so_reuseport", 1 if share_port else 0),
    ]
    interceptors = [ApiKeyInterceptor(api_key)] if api_key else []
    server = grpc.aio.server(options=options, interceptors=interceptors)
    health_servicer = add_services(server, backend)
    ports = []
    for target in targets:
        try:
            bound = server.add_insecure_port(target)
        except RuntimeError as e:
            raise ConfigError(f"cannot bind {target}: {e}") from None
        if not bound:
            raise ConfigError(f"cannot bind {target}: address in use or not available")
        ports.append(0 if target.startswith("unix:") else bound)
    await server.start()
    return server, health_servicer, ports


def grpc_target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
