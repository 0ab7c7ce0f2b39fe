"""The paths of one served model that HTTP and gRPC both call: embed, rerank, sparse.

admission (floe/frontend/admission.py, checked by the transport before it reads the body) ->
the edge (floe/edge.py: validation once, here, then tokenization in the front end's thread pool)
-> the router sends token ids to a replica -> an EmbedResult of raw bytes. Transports only parse
their own wire format and map FloeError through their table in floe/errors.py.

The model's kind decides which paths it answers (floe/kinds/: asked, never named): an embedding
model ``embed`` and ``embed_chunked`` (with the compact output forms of floe/compact.py packed
here, after the replica's float32), a cross-encoder ``rerank`` (pairs tokenized here; the replica
returns logits and the activation is applied here, where ``raw_scores`` is known), a SPLADE model
``embed`` too (the replica returns the non-zero entries). floe/frontend/models.py picks the
service a request goes to.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from floe import compact, metrics, validate
from floe.config import Settings
from floe.chunking import ChunkOptions, Chunked
from floe.edge import Edge
from floe.kinds import ROUTE_KINDS, kind_of
from floe.kinds.score import activation
from floe.errors import FloeError, ValidationError
from floe.frontend.admission import Admission
from floe.models.spec import ModelSpec
from floe.proto import floe_pb2
from floe.protocol import COMPACT_DTYPES, EmbedResult, EncodeOptions, TokenBatch, row_bytes

@dataclass
class Scores:
    """A rerank call's answer: one score per document (in the request's order), and the
    replica's result it came from (timings, token counts)."""

    scores: np.ndarray
    result: EmbedResult

    def ranked(self, top_n: Optional[int] = None) -> np.ndarray:
        """Document indices by score, highest first (ties in the request's order), at most
        ``top_n`` (None or 0: all)."""
        order = np.argsort(-self.scores, kind="stable")
        return order[:top_n] if top_n else order


@dataclass
class Chunks:
    """A chunked request's answer: one embedding row per chunk (``result``, in the order of the
    documents and of each document's chunks) and where each chunk lies (``table``)."""

    result: EmbedResult
    table: Chunked


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
        self.edge = Edge(self.limits, tokenizers, compact_output=True)
        self.admission = Admission(srv.max_concurrent_requests, router.ready)
        # which front-end process this is (0: the main one) of how many (--frontend-workers)
        self.frontend_index = 0
        self.frontends = 1
        self._unknown_models: set[str] = set()
        # int8 / uint8 ranges by (dimensions, normalize): computed once, on first use
        self._ranges: dict[tuple, np.ndarray] = {}
        self._ranges_lock = asyncio.Lock()

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
        return await self._grpc_call("Encode", self.embed(request_id, texts, tokens, options, model))

    async def encode_chunked(self, request_id: str, texts: Optional[list[str]],
                             tokens: Optional[TokenBatch], options: EncodeOptions,
                             chunk: ChunkOptions, model: str = "") -> Chunks:
        """The gRPC Encode entry of a request with ``chunking``: admission, the chunked path and
        its request metrics."""
        return await self._grpc_call("Encode", self.embed_chunked(request_id, texts, tokens,
                                                                  options, chunk, model))

    async def rerank_call(self, request_id: str, query: str, documents: list[str],
                          options: EncodeOptions, raw_scores: bool, model: str = "") -> Scores:
        """The gRPC Rerank entry: admission, the rerank path and its request metrics."""
        return await self._grpc_call("Rerank", self.rerank(request_id, query, documents, options,
                                                           raw_scores=raw_scores, model=model))

    async def _grpc_call(self, endpoint: str, work) -> Any:
        t0 = time.perf_counter()
        try:
            with self.admission.admitted():
                result = await work
            metrics.REQUESTS.labels(endpoint=endpoint, transport="grpc").inc()
            return result
        except BaseException as err:
            work.close()  # not started when admission refused: no "never awaited" warning
            metrics.REQUEST_FAILURES.labels(endpoint=endpoint, transport="grpc",
                                            error=error_label(err)).inc()
            raise
        finally:
            metrics.REQUEST_SECONDS.labels(endpoint=endpoint, transport="grpc").observe(
                time.perf_counter() - t0)

    @property
    def kind(self):
        """What this model answers (floe/kinds/)."""
        return kind_of(self.spec)

    def require(self, route: str) -> None:
        """A request for another kind of model than this one is the client's mistake (400)."""
        if route not in self.kind.route_kinds:
            wanted = ROUTE_KINDS[route][0]
            raise ValidationError(
                f"model {self.model_name!r} is {self.kind.title}; this route needs "
                f"{wanted.title} (use {self.kind.routes} for this model)", param="model")

    async def embed(self, request_id: str, texts: Optional[list[str]], tokens: Optional[TokenBatch],
                    options: EncodeOptions, model: str = "") -> EmbedResult:
        """Embeds texts (tokenized here) or token ids; raises FloeError for anything the client
        did. The caller has admitted the request. A sparse model answers with sparse rows."""
        self.require("encode")
        options = self.kind.request_options(options)
        compact_dtype = options.output_dtype if options.output_dtype in COMPACT_DTYPES else None
        if compact_dtype is not None:
            options = dataclasses.replace(options, output_dtype="float32")
        result = await self._encode(request_id, texts, tokens, options, model)
        if compact_dtype is not None:
            result = await self._compact(result, compact_dtype, options)
        return result

    async def embed_chunked(self, request_id: str, texts: Optional[list[str]],
                            tokens: Optional[TokenBatch], options: EncodeOptions,
                            chunk: ChunkOptions, model: str = "") -> Chunks:
        """Documents cut into chunks, one embedding per chunk (floe/chunking.py); the caller
        has admitted the request. A request whose documents give no chunk at all (empty texts)
        is answered without reaching a replica."""
        self.require("embed")
        compact_dtype = options.output_dtype if options.output_dtype in COMPACT_DTYPES else None
        if compact_dtype is not None:
            options = dataclasses.replace(options, output_dtype="float32")
        request_id = request_id or new_request_id()
        t0 = time.perf_counter()
        table, known = await self.edge.prepare_chunked(texts, tokens, options, chunk, model)
        if not known:
            self._note_unknown_model(model)
        if table.rows:
            result = await self._run(request_id, table.tokens, options, t0)
        else:
            dim = options.dimensions or self.spec.dim
            result = EmbedResult.from_array(np.zeros((0, dim), np.float32), options.output_dtype,
                                            [], request_id=request_id, model=self.model_name)
        if compact_dtype is not None and result.n:
            result = await self._compact(result, compact_dtype, options)
        elif compact_dtype is not None:
            result = dataclasses.replace(result, dtype=compact_dtype, data=b"")
        return Chunks(result=result, table=table)

    async def _encode(self, request_id: str, texts: Optional[Sequence[Any]],
                      tokens: Optional[TokenBatch], options: EncodeOptions, model: str,
                      pairs_query: Any = None, param: str = "documents") -> EmbedResult:
        request_id = request_id or new_request_id()
        if options.deadline is None:   # (a deadline of its own may be longer than the target)
            early = getattr(getattr(self.router, "router", None), "early_refusal", None)
            refusal = early() if early is not None else None
            if refusal is not None:
                raise refusal
        t0 = time.perf_counter()
        if pairs_query is not None:
            prepared = await self.edge.prepare_pairs(pairs_query, texts or [], options, model, param)
        else:
            prepared = await self.edge.prepare(texts, tokens, options, model)
        if not prepared.known_model:
            self._note_unknown_model(model)
        return await self._run(request_id, prepared.tokens, options, t0)

    async def _run(self, request_id: str, tokens: TokenBatch, options: EncodeOptions,
                   t0: float) -> EmbedResult:
        """A checked token batch to a replica and back, with the request's timings."""
        t_tok = time.perf_counter() - t0
        metrics.TOKENIZE_SECONDS.observe(t_tok)
        result = await self.router.encode(tokens, options, request_id)
        result.timings.tokenize_s = t_tok
        result.timings.total_s = time.perf_counter() - t0
        result.request_id = request_id
        result.model = self.model_name
        return result

    async def rerank(self, request_id: str, query: Any, documents: Sequence[Any],
                     options: EncodeOptions, raw_scores: bool = False, model: str = "",
                     param: str = "documents") -> Scores:
        """Scores each document against the query (a cross-encoder); the caller has admitted
        the request. ``param`` names the documents' field in errors (TEI: texts)."""
        self.require("score")
        if self.spec.num_labels != 1:
            raise ValidationError(
                f"model {self.model_name!r} has {self.spec.num_labels} labels; reranking needs a "
                "model with one relevance score", param="model")
        options = self.kind.request_options(options)
        result = await self._encode(request_id, documents, None, options, model,
                                    pairs_query=query, param=param)
        logits = result.as_float32()
        scores = logits if raw_scores else activation(self.spec.score_activation, logits)
        return Scores(scores=np.ascontiguousarray(scores[:, 0], dtype=np.float32), result=result)

    # -- compact output -------------------------------------------------------------------------

    async def _compact(self, result: EmbedResult, dtype: str, options: EncodeOptions) -> EmbedResult:
        arr = result.as_float32()
        ranges = None
        if dtype in ("int8", "uint8"):
            ranges = await self.int8_ranges(arr.shape[1], options)
        packed = compact.quantize(arr, dtype, ranges)
        out = dataclasses.replace(result, dtype=dtype, data=packed.tobytes())
        assert len(out.data) == out.n * row_bytes(dtype, out.dim)
        return out

    async def int8_ranges(self, dim: int, options: EncodeOptions) -> np.ndarray:
        """The per-dimension [min; max] the int8 / uint8 forms scale by: this model's embeddings
        of the calibration texts (floe/compact.py), at this dimension count and normalization,
        computed on first use and then fixed for the life of the server (stated in /info)."""
        normalize = self.spec.normalize if options.normalize is None else bool(options.normalize)
        key = (dim, normalize)
        if key in self._ranges:
            return self._ranges[key]
        async with self._ranges_lock:
            if key not in self._ranges:
                from floe.textsets import stdlib_paragraphs

                texts = await asyncio.get_running_loop().run_in_executor(
                    None, stdlib_paragraphs, compact.CALIBRATION_TEXTS)
                calib = EncodeOptions(normalize=normalize,
                                      dimensions=dim if dim < self.spec.dim else None,
                                      truncate=True)
                step = self.limits.max_items  # --max-client-batch-size binds this call too
                parts = [await self._encode(new_request_id(), texts[i:i + step], None, calib, "")
                         for i in range(0, len(texts), step)]
                self._ranges[key] = compact.ranges_of(
                    np.concatenate([p.as_float32() for p in parts]))
                log.info("int8/uint8 ranges of %s (%d dims, normalize %s) set from %d calibration "
                         "texts", self.model_name, dim, normalize, len(texts))
        return self._ranges[key]

    def _runs(self) -> dict:
        for replica in self.router.status().get("replicas", []):
            if replica.get("dtype"):
                return {"dtype": replica["dtype"], "engine": replica.get("engine", ""),
                        "device": replica.get("device", ""),
                        "attention": replica.get("attention", "")}
        return {"dtype": self.settings.model.dtype, "engine": "", "device": "", "attention": ""}

    def calibration(self) -> dict:
        """The int8 / uint8 ranges in use, for /info (a client dequantizes with them)."""
        return {f"{dim}{'' if norm else ',unnormalized'}": {
                    "texts": compact.CALIBRATION_TEXTS, "source": "Python standard library "
                    "docstring paragraphs", "min": r[0].tolist(), "max": r[1].tolist()}
                for (dim, norm), r in self._ranges.items()}

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

    async def batching(self, timeout: float = 0.5) -> dict:
        """The /info view of admission and tuning: the settings, and per replica its cost model,
        its knobs now and its predicted queue time, from the replicas' own statistics. Waits at
        most ``timeout`` for them: /info is polled by people and scripts watching a replica that
        hangs, and must answer at once (the replicas are then left out)."""
        b = self.settings.batch
        out: dict[str, Any] = {"latency_target_ms": b.latency_target_ms,
                               "max_queue_ms": None if b.latency_target_ms else b.max_queue_ms,
                               "tuning": b.tuning, "replicas": []}
        try:
            infos = await asyncio.wait_for(self.router.replica_infos(), timeout)
        except Exception:  # noqa: BLE001 - /info must answer while a replica is slow or down
            log.warning("replica statistics unavailable for /info", exc_info=True)
            return out
        for info in infos:
            if not info.HasField("stats"):
                continue
            st = info.stats
            out["replicas"].append({
                "replica_id": info.replica_id,
                "cost_model": {"fixed_s": st.cost_fixed_seconds,
                               "per_token_s": st.cost_per_token_seconds,
                               "per_token_length_s": st.cost_per_token_length_seconds,
                               "per_token_window_s": st.cost_per_token_window_seconds,
                               "window_span": st.cost_window_span,
                               "relative_error": st.cost_relative_error},
                "max_batch_tokens": st.batch_budget_tokens,
                "batch_timeout_ms": st.batch_timeout_seconds * 1000.0,
                "min_batch_fill": st.batch_min_fill,
                "packing_align": st.batch_packing_align,
                "packed_batches": st.packed_batches,
                "predicted_wait_s": st.predicted_wait_seconds,
                "refused_requests": st.refused_requests,
                "expired_requests": st.expired_requests,
                "tuning_changes": st.tuning_changes,
            })
        return out

    def describe(self) -> dict:
        s = self.spec
        return {
            "model_id": s.name,
            "model_path_name": s.path.rstrip("/").split("/")[-1],
            "architecture": s.architecture,
            "model_type": s.model_type,
            "task": self.kind.name,
            "pooling": s.pooling,
            "dim": s.dim,
            "max_input_length": s.max_seq_length,
            "normalize": s.normalize,
            "prompts": s.prompts,
            "default_prompt_name": self.settings.model.default_prompt_name or s.default_prompt_name,
            "matryoshka_dimensions": list(s.matryoshka_dims),
            "output_dtypes": list(self.kind.output_dtypes),
            "int8_calibration": self.calibration(),
            # the precision and engine that run, as the replicas reported them at start-up
            **self._runs(),
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
