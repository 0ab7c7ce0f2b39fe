"""The one embed path that HTTP and gRPC both call.

admission (floe/frontend/admission.py, checked by the transport before it reads the body) ->
the edge (floe/edge.py: validation once, here, then tokenization in the front end's thread pool)
-> the router sends token ids to a replica -> an EmbedResult of raw bytes. Transports only parse
their own wire format and map FloeError through their table in floe/errors.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from typing import Any, Optional

from floe import metrics, validate
from floe.config import Settings
from floe.edge import Edge
from floe.errors import FloeError
from floe.frontend.admission import Admission
from floe.models.spec import ModelSpec
from floe.proto import floe_pb2
from floe.protocol import EmbedResult, EncodeOptions, TokenBatch

log = logging.getLogger("floe.service")


def new_request_id() -> str:
    return uuid.uuid4().hex


class EmbedService:
    """Implements the EncodeBackend of floe/transport/grpc.py for the public gRPC server; the HTTP
    app calls ``embed`` and ``tokenize`` directly, inside ``admission.admitted()``."""

    def __init__(self, settings: Settings, spec: ModelSpec, tokenizers: Any, router: Any) -> None:
        self.settings = settings
        self.spec = spec
        self.tokenizers = tokenizers      # floe.tokenize.TokenizerPool
        self.router = router              # floe.fleet.manager.ReplicaManager
        self.api_key = settings.server.api_key
        self.model_name = spec.name
        srv = settings.server
        self.limits = validate.Limits.for_server(spec, settings)
        self.edge = Edge(self.limits, tokenizers)
        self.admission = Admission(srv.max_concurrent_requests, router.ready)
        # which front-end process this is (0: the main one) of how many (--frontend-workers)
        self.frontend_index = 0
        self.frontends = 1
        self._unknown_models: set[str] = set()

    def _note_unknown_model(self, model: str) -> None:
        # once per name (and at most 100 names), so a client's default name is seen, not spammed
        if model not in self._unknown_models and len(self._unknown_models) < 100:
            self._unknown_models.add(model)
            log.warning("request names model %r, which is not a served name (%s); answering with "
                        "%s. --served-model-name adds aliases, --strict-model-name refuses.",
                        model[:100], ", ".join(self.limits.served_names), self.model_name)

    @property
    def draining(self) -> bool:
        return self.admission.draining

    # -- the embed path ---------------------------------------------------------------------

    async def tokenize(self, texts: list[str], options: EncodeOptions) -> TokenBatch:
        """Validates and tokenizes texts (for /tokenize)."""
        return (await self.edge.prepare(texts, None, options)).tokens

    async def encode(self, request_id: str, texts: Optional[list[str]], tokens: Optional[TokenBatch],
                     options: EncodeOptions, model: str = "") -> EmbedResult:
        """EncodeBackend entry for the public gRPC services (floe.v1 and arctic_inference):
        admission, the embed path, and the request metrics HTTP records in its own wrapper."""
        t0 = time.perf_counter()
        try:
            with self.admission.admitted():
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
        """Embeds texts (tokenized here) or token ids; raises FloeError for anything the client
        did. The caller has admitted the request."""
        request_id = request_id or new_request_id()
        t0 = time.perf_counter()
        prepared = await self.edge.prepare(texts, tokens, options, model)
        if not prepared.known_model:
            self._note_unknown_model(model)
        tokens = prepared.tokens
        t_tok = time.perf_counter() - t0
        metrics.TOKENIZE_SECONDS.observe(t_tok)
        result = await self.router.encode(tokens, options, request_id)
        result.timings.tokenize_s = t_tok
        result.timings.total_s = time.perf_counter() - t0
        result.request_id = request_id
        result.model = self.model_name
        return result

    # -- EncodeBackend: health, info, abort ---------------------------------------------------

    def ready(self) -> bool:
        return (not self.admission.draining) and self.router.ready()

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
            "frontend": {"index": self.frontend_index, "processes": self.frontends,
                         "pid": os.getpid()},
        }


def error_label(err: BaseException) -> str:
    if isinstance(err, FloeError):
        return err.kind.name.lower()
    if isinstance(err, asyncio.CancelledError):
        return "cancelled"
    return "internal"
