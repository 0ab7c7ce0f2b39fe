"""gRPC servicers over an abstract backend: the front end and every replica serve the same API.

``add_services(server, backend)`` registers on a ``grpc.aio.Server``:

* ``floe.v1.Embedder`` (floe/proto/floe.proto): Encode, HealthCheck, GetReplicaInfo, Abort;
* ``arctic_inference.InferenceService`` (floe/proto/arctic_inference.proto), so ArcticInference
  clients work unchanged;
* ``grpc.health.v1.Health`` (readiness: the backend's, or flipped through the returned servicer)
  and server reflection.

The backend is anything with the ``EncodeBackend`` methods: ``floe.frontend.service.EmbedService``
in the front end, the replica's own backend in floe/replica/main.py. Errors leave as gRPC status
codes only: a FloeError becomes ``errors.GRPC_STATUS[kind]`` with its message (plus ``retry-after``
trailing metadata when the client should retry); anything else becomes INTERNAL "internal error"
and is logged with its traceback. No OK response ever carries an error.

Authentication: when the backend has a non-empty ``api_key``, the Embedder and InferenceService
methods require ``authorization: Bearer KEY`` metadata. Health and reflection stay open so that
load balancers and probes work without the key.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import uuid
from typing import Any, Awaitable, Callable, Optional, Protocol

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from floe.errors import GRPC_STATUS, AuthError, FloeError, ValidationError
from floe.proto import arctic_inference_pb2 as arctic_pb2
from floe.proto import arctic_inference_pb2_grpc as arctic_grpc
from floe.proto import floe_pb2, floe_pb2_grpc
from floe.protocol import (EmbedResult, EncodeOptions, TokenBatch, options_from_proto,
                           result_to_proto, tokens_from_proto)

log = logging.getLogger("floe.grpc")

# Largest gRPC message either way. A 2048-input request of 8192-token ids is 64 MiB of int32 and
# its answer at dim 4096 is 32 MiB of float32: 256 MiB leaves room without being unbounded.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024

# Options for grpc.aio.server(...) and for channels talking to it.
GRPC_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]

EMBEDDER_SERVICE = floe_pb2.DESCRIPTOR.services_by_name["Embedder"].full_name
ARCTIC_SERVICE = arctic_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


class EncodeBackend(Protocol):
    """What the servicers call. ``api_key`` (optional attribute): require it as a Bearer token."""

    async def encode(self, request_id: str, texts: Optional[list[str]], tokens: Optional[TokenBatch],
                     options: EncodeOptions, model: str) -> EmbedResult:
        """Embeds texts or token ids (exactly one is given). ``model`` is the client's model field
        ("" when unset) and must name the served model when set (else ModelNotFoundError)."""

    async def health(self) -> floe_pb2.HealthCheckResponse: ...

    async def replica_info(self) -> floe_pb2.GetReplicaInfoResponse: ...

    async def abort(self, request_id: str) -> bool: ...


def new_request_id() -> str:
    return uuid.uuid4().hex


# --- error mapping ----------------------------------------------------------------------------

def _handler(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Runs a servicer method: checks auth, maps FloeError / other exceptions to a status."""

    @functools.wraps(fn)
    async def wrapper(self: "_Base", request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            self._check_auth(context)
            return await fn(self, request, context)
        except FloeError as e:
            err = e
        except grpc.aio.AbortError:
            raise
        except Exception:  # noqa: BLE001 - the client gets a generic message, the log the traceback
            log.exception("unhandled error in %s", fn.__qualname__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        code = getattr(grpc.StatusCode, GRPC_STATUS[err.kind])
        trailing: tuple[tuple[str, str], ...] = ()
        if err.retry_after is not None and code in (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                    grpc.StatusCode.UNAVAILABLE):
            trailing = (("retry-after", f"{err.retry_after:g}"),)
        await context.abort(code, err.message, trailing_metadata=trailing)

    return wrapper


class _Base:
    def __init__(self, backend: EncodeBackend) -> None:
        self.backend = backend

    def _check_auth(self, context: grpc.aio.ServicerContext) -> None:
        key = getattr(self.backend, "api_key", None)
        if not key:
            return
        got = ""
        for k, v in context.invocation_metadata() or ():
            if k.lower() == "authorization":
                got = v if isinstance(v, str) else v.decode("latin-1")
                break
        want = f"Bearer {key}"
        if not hmac.compare_digest(got.encode("utf-8", "replace"), want.encode("utf-8")):
            raise AuthError("missing or invalid `authorization: Bearer <key>` metadata")


# --- floe.v1.Embedder -------------------------------------------------------------------------

class EmbedderServicer(_Base, floe_pb2_grpc.EmbedderServicer):
    @_handler
    async def Encode(self, request: floe_pb2.EncodeRequest, context) -> floe_pb2.EncodeResponse:
        tokens = tokens_from_proto(request)
        texts = None
        if tokens is None:
            if not request.texts:
                raise ValidationError("request carries neither texts nor token_ids", param="texts")
            texts = list(request.texts)
        options = options_from_proto(request.options)
        request_id = request.request_id or new_request_id()
        result = await self.backend.encode(request_id, texts, tokens, options, request.model)
        result.request_id = result.request_id or request_id
        t = result.timings
        context.set_trailing_metadata((
            ("x-tokenization-time", repr(t.tokenize_s)),
            ("x-queue-time", repr(t.queue_s)),
            ("x-inference-time", repr(t.inference_s)),
            ("x-total-time", repr(t.total_s)),
            ("x-tokens", str(int(result.token_counts.sum()))),
        ))
        return result_to_proto(result)

    @_handler
    async def HealthCheck(self, request, context) -> floe_pb2.HealthCheckResponse:
        return await self.backend.health()

    @_handler
    async def GetReplicaInfo(self, request, context) -> floe_pb2.GetReplicaInfoResponse:
        return await self.backend.replica_info()

    @_handler
    async def Abort(self, request: floe_pb2.AbortRequest, context) -> floe_pb2.AbortResponse:
        if not request.request_id:
            raise ValidationError("request_id is required", param="request_id")
        ok = await self.backend.abort(request.request_id)
        return floe_pb2.AbortResponse(
            success=ok, message="aborted" if ok else f"no request {request.request_id!r} in flight")


# --- arctic_inference.InferenceService ---------------------------------------------------------

def arctic_tokens(request: arctic_pb2.EncodeRequest) -> Optional[TokenBatch]:
    """The request's token ids (one int32 LE bytes entry per prompt), or None for prompts."""
    entries = request.token_id_bytes_i32
    if entries and request.prompts:
        raise ValidationError("send either prompts or token_id_bytes_i32, not both", param="prompts")
    if not entries:
        return None
    for i, b in enumerate(entries):
        if len(b) % 4:
            raise ValidationError(
                f"token_id_bytes_i32[{i}] is {len(b)} bytes, not a multiple of 4 (int32 little-endian)",
                param="token_id_bytes_i32")
    lengths = [len(b) // 4 for b in entries]
    return TokenBatch.from_bytes(b"".join(entries), lengths)


class ArcticServicer(_Base, arctic_grpc.InferenceServiceServicer):
    @_handler
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
        request_id = request.request_id or new_request_id()
        options = EncodeOptions(priority=request.priority)
        result = await self.backend.encode(request_id, texts, tokens, options, request.model_name)
        rows = result.as_float32().astype("<f4", copy=False)
        return arctic_pb2.EncodeResponse(
            request_id=request_id, n_prompts=result.n, embedding_dim=result.dim,
            embedding_bytes_fp32=[np.ascontiguousarray(r).tobytes() for r in rows])

    @_handler
    async def HealthCheck(self, request, context) -> arctic_pb2.HealthCheckResponse:
        h = await self.backend.health()
        return arctic_pb2.HealthCheckResponse(healthy=h.healthy and h.ready, message=h.message)

    @_handler
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

    @_handler
    async def Abort(self, request: arctic_pb2.AbortRequest, context) -> arctic_pb2.AbortResponse:
        if not request.request_id:
            raise ValidationError("request_id is required", param="request_id")
        ok = await self.backend.abort(request.request_id)
        return arctic_pb2.AbortResponse(
            success=ok, message="aborted" if ok else f"no request {request.request_id!r} in flight")


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
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
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


# --- registration -----------------------------------------------------------------------------

def add_services(server: grpc.aio.Server, backend: EncodeBackend) -> HealthServicer:
    """Registers Embedder, InferenceService, grpc.health.v1 and reflection on ``server``.

    Returns the health servicer: its ``set_serving(bool | None)`` flips readiness (None: follow
    ``backend.health()``, the default).
    """
    floe_pb2_grpc.add_EmbedderServicer_to_server(EmbedderServicer(backend), server)
    arctic_grpc.add_InferenceServiceServicer_to_server(ArcticServicer(backend), server)
    health_servicer = HealthServicer(backend)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (EMBEDDER_SERVICE, ARCTIC_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    return health_servicer
