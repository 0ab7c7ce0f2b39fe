"""The one embed path that HTTP and gRPC both call.

admission (concurrency, draining, readiness) -> validation -> tokenization in the front end's
thread pool -> the router picks a replica -> an EmbedResult of raw bytes. Transports only parse
their own wire format and map FloeError through their table in floe/errors.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any, AsyncIterator, Optional, Sequence

from floe import metrics
from floe.config import Settings
from floe.errors import (
    FloeError,
    ModelNotFoundError,
    TooLargeError,
    UnavailableError,
    ValidationError,
    OverloadedError,
)
from floe.models.spec import ModelSpec
from floe.proto import floe_pb2
from floe.protocol import EmbedResult, EncodeOptions, TokenBatch

log = logging.getLogger("floe.service")


def new_request_id() -> str:
    return uuid.uuid4().hex


class EmbedService:
    """Implements floe.grpc_api.EncodeBackend for the public gRPC server; HTTP calls it directly."""

    def __init__(self, settings: Settings, spec: ModelSpec, tokenizers: Any, router: Any) -> None:
        self.settings = settings
        self.spec = spec
        self.tokenizers = tokenizers      # floe.tokenize.TokenizerPool
        self.router = router              # floe.router.manager.ReplicaManager
        self.api_key = settings.server.api_key
        self.model_name = spec.name
        self.in_flight = 0
        self.draining = False
        srv = settings.server
        self.max_input_chars = srv.max_input_chars or 250 * spec.max_seq_length

    # -- admission --------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Counts the request in flight; refuses it when draining, not ready or over the limit."""
        if self.draining:
            raise UnavailableError("server is draining, retry on another instance")
        if self.in_flight >= self.settings.server.max_concurrent_requests:
            raise OverloadedError(
                f"too many concurrent requests (limit {self.settings.server.max_concurrent_requests})")
        if not self.router.ready():
            raise UnavailableError("no healthy replica is ready, retry later")
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    def check_model(self, model: Optional[str]) -> None:
        if model and model != self.model_name:
            raise ModelNotFoundError(
                f"model {model!r} is not served here; this server serves {self.model_name!r}",
                param="model")

    def check_options(self, options: EncodeOptions) -> None:
        d = options.dimensions
        if d is not None:
            if isinstance(d, bool) or not isinstance(d, int) or d < 1:
                raise ValidationError("`dimensions` must be a positive integer", param="dimensions")
            if d > self.spec.dim:
                raise ValidationError(
                    f"`dimensions` is {d} but the model's embedding dimension is {self.spec.dim}",
                    param="dimensions")

    def check_count(self, n: int, param: str = "input") -> None:
        if n == 0:
            raise ValidationError("input must not be empty", param=param)
        limit = self.settings.server.max_client_batch_size
        if n > limit:
            raise TooLargeError(
                f"batch of {n} inputs is over the limit of {limit} per request "
                "(--max-client-batch-size)", param=param)

    def check_texts(self, texts: Sequence[str], param: str = "input") -> None:
        limit = self.max_input_chars
        for i, t in enumerate(texts):
            if len(t) > limit:
                raise TooLargeError(
                    f"{param}[{i}] has {len(t)} characters, over the limit of {limit}",
                    param=f"{param}[{i}]")

    # -- the embed path ---------------------------------------------------------------------

    async def tokenize(self, texts: list[str], options: EncodeOptions) -> TokenBatch:
        self.check_count(len(texts))
        self.check_texts(texts)
        return await self.tokenizers.encode(
            texts, options, auto_truncate=self.settings.server.auto_truncate,
            default_prompt_name=self.settings.model.default_prompt_name)

    async def encode(self, request_id: str, texts: Optional[list[str]], tokens: Optional[TokenBatch],
                     options: EncodeOptions, model: str = "") -> EmbedResult:
        """EncodeBackend entry for the public gRPC services (floe.v1 and arctic_inference): the
        embed path plus the request metrics that HTTP records in its own wrapper."""
        t0 = time.perf_counter()
        try:
            result = await self.embed(request_id, texts, tokens, options, model)
            metrics.REQUESTS.labels(endpoint="Encode", transport="grpc").inc()
            return result
        except BaseException as err:
            metrics.REQUEST_FAILURES.labels(endpoint="Encode", transport="grpc",
                                            error=error_label(err)).inc()
            raise
        finally:
            metrics.REQUEST_SECONDS.labels(endpoint="Encode", transport="grpc").observe(
                time.perf_counter() - t0)

    async def embed(self, request_id: str, texts: Optional[list[str]], tokens: Optional[TokenBatch],
                    options: EncodeOptions, model: str = "") -> EmbedResult:
        """Embeds texts (tokenized here) or token ids; raises FloeError for anything the client did."""
        request_id = request_id or new_request_id()
        t0 = time.perf_counter()
        self.check_model(model)
        self.check_options(options)
        async with self.admit():
            if tokens is None:
                tokens = await self.tokenize(list(texts or []), options)
            else:
                self.check_count(tokens.n)
                tokens = self.tokenizers.validate_ids(
                    tokens, options, auto_truncate=self.settings.server.auto_truncate)
            t_tok = time.perf_counter() - t0
            metrics.TOKENIZE_SECONDS.observe(t_tok)
            result = await self.router.encode(tokens, options, request_id)
        result.timings.tokenize_s = t_tok
        result.timings.total_s = time.perf_counter() - t0
        result.request_id = request_id
        result.model = self.model_name
        log.debug("request %s: %d inputs, %d tokens, %.1f ms", request_id, result.n,
                  int(result.token_counts.sum()), result.timings.total_s * 1e3)
        return result

    # -- EncodeBackend: health, info, abort ---------------------------------------------------

    def ready(self) -> bool:
        return (not self.draining) and self.router.ready()

    async def health(self) -> floe_pb2.HealthCheckResponse:
        ready = self.ready()
        status = self.router.status()
        msg = "ready" if ready else ("draining" if self.draining else status.get("reason", "not ready"))
        return floe_pb2.HealthCheckResponse(healthy=ready, ready=ready, message=msg)

    async def replica_info(self) -> floe_pb2.GetReplicaInfoResponse:
        infos = await self.router.replica_infos()
        healthy = sum(1 for i in infos if i.healthy)
        return floe_pb2.GetReplicaInfoResponse(replicas=infos, n_replicas=len(infos),
                                               n_healthy_replicas=healthy)

    async def abort(self, request_id: str) -> bool:
        abort = getattr(self.router, "abort", None)
        return bool(await abort(request_id)) if abort else False

    def describe(self) -> dict:
        s = self.spec
        return {
            "model_id": s.name,
            "model_path_name": s.path.rstrip("/").split("/")[-1],
            "architecture": s.architecture,
            "model_type": s.model_type,
            "pooling": s.pooling,
            "dim": s.dim,
            "max_input_length": s.max_seq_length,
            "normalize": s.normalize,
            "prompts": s.prompts,
            "default_prompt_name": self.settings.model.default_prompt_name or s.default_prompt_name,
            "matryoshka_dimensions": list(s.matryoshka_dims),
            "max_batch_tokens": self.settings.batch.max_batch_tokens,
            "max_batch_size": self.settings.batch.max_batch_size,
            "batch_timeout_ms": self.settings.batch.batch_timeout_ms,
            "max_client_batch_size": self.settings.server.max_client_batch_size,
            "auto_truncate": self.settings.server.auto_truncate,
            "ready": self.ready(),
            "draining": self.draining,
            "replicas": self.router.status(),
        }


def error_label(err: BaseException) -> str:
    if isinstance(err, FloeError):
        return err.kind.name.lower()
    if isinstance(err, asyncio.CancelledError):
        return "cancelled"
    return "internal"
