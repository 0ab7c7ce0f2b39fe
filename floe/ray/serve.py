"""A Ray Serve deployment of the floe replica behind the OpenAI route (``POST /v1/embeddings``).

Each Serve replica is one floe replica in-process: the model's tokenizer (sentence-transformers
parity, floe/tokenize.py), the edge of floe/edge.py (the same checks, once), and a ReplicaCore (dynamic
length-bucketed batcher + engine thread, floe/replica/core.py) driving one engine. Ray places the
replicas (``ray_actor_options``: CPUs or a GPU each), routes requests between them, and restarts a
replica whose health check fails (``check_health`` fails once the core's threads are gone).

The HTTP routes are FloeIngress's, a light deployment in front of the replicas: it checks a body's
content type and size, hands it to a replica through a deployment handle, and calls another when
that replica dies under the call (its node lost): Serve's proxy alone would answer 500.

Run it with ``serve run floe.ray.serve:build_app model=default`` or a config file (docs/scale-out.md):

    applications:
      - name: floe
        route_prefix: /
        import_path: floe.ray.serve:build_app
        args: {model: default, engine: torch, max_batch_tokens: 4096}
        deployments:
          - name: FloeEmbeddings
            num_replicas: 2
            ray_actor_options: {num_cpus: 1}
          - name: FloeIngress
            max_replicas_per_node: 1
"""

# No `from __future__ import annotations` here: Serve's ingress hands the methods to FastAPI,
# which must see `Request` as the class itself, not as a string it cannot resolve from the
# wrapped method (it then reads `request` as a required query parameter and answers 422).

import logging
import os
import uuid
from typing import Any, Optional

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve

from floe.errors import HTTP_STATUS, FloeError, InternalError, error_envelope
from floe.frontend import schemas
from floe.frontend.http import check_content_type, read_body

log = logging.getLogger("floe.ray.serve")

app = FastAPI(title="floe on Ray Serve", docs_url=None, redoc_url=None)


def _json(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json")


def _error(err: FloeError) -> Response:
    return _json(error_envelope(err), status=HTTP_STATUS[err.kind])


@serve.deployment(name="FloeEmbeddings", health_check_period_s=5, health_check_timeout_s=30,
                  max_ongoing_requests=64)
class FloeEmbeddings:
    """One floe replica: tokenizer + ReplicaCore(engine). Its arguments are the deployment's
    config: settings of floe/config.py by field name (``model``, ``served_model_name``,
    ``device``, ``dtype``, ``engine``, ``max_batch_tokens``, ``max_batch_size``,
    ``batch_timeout_ms``, ``max_client_batch_size``, ``payload_limit``, ...), with floe serve's
    defaults and checks, and ``threads``: the engine's compute threads (default: its own)."""

    def __init__(self, threads: Optional[int] = None, **config: Any) -> None:
        from floe.config import sections_of, settings_from
        from floe.edge import Edge
        from floe.engine import engine_for
        from floe.models import load_spec
        from floe.replica.core import ReplicaCore
        from floe.replica.cost import for_replica
        from floe.resolve import core_count, resolve_batch
        from floe.tokenize import TokenizerPool

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        # the config alone: FLOE_* variables of the Serve node do not apply
        settings = settings_from(env={}, **sections_of(config))
        spec = load_spec(settings.model)
        self.spec = spec
        self.tokenizers = TokenizerPool(spec, workers=max(1, min(settings.replicas.workers,
                                                                 core_count())))
        self.limits = self.tokenizers.tokenizer.limits(
            max_items=settings.server.max_client_batch_size)
        self.edge = Edge(self.limits, self.tokenizers)
        self.payload_limit = settings.server.payload_limit
        eng = engine_for(spec, settings.replicas, device=settings.model.device,
                         dtype=settings.model.dtype, threads=threads)
        # this replica's own batch section, settled for the device its engine runs on
        batch = resolve_batch(settings.batch, str(eng.device).startswith("cuda"),
                              spec.max_seq_length)
        eng.warmup(batch.max_batch_tokens)
        cost = for_replica(eng, batch.max_batch_tokens, batch.max_batch_size,
                           settings.replicas.engine_cache_dir, threads)
        self.core = ReplicaCore(eng, batch, cost=cost)
        self.core.start()
        log.info("floe replica ready: %s on %s (%s)", spec.name, eng.device, eng.dtype)

    def check_health(self) -> None:
        """Called by Serve; an exception makes Serve replace this replica."""
        if not self.core.ready:
            raise RuntimeError("the floe replica core is not running")

    def __del__(self) -> None:
        core = getattr(self, "core", None)
        if core is not None:
            core.stop()

    async def embed_body(self, body: bytes) -> tuple[int, bytes]:
        """An OpenAI embeddings request body (its content type and size already checked by
        FloeIngress) -> (HTTP status, JSON body), with the checks of floe serve's OpenAI route
        (floe/frontend), in the same order."""
        try:
            req = schemas.parse_openai(self.limits, body)
            prepared = await self.edge.prepare(req.texts, req.tokens, req.options, req.model)
            result = await self.core.submit(prepared.tokens, req.options, uuid.uuid4().hex)
            out = schemas.openai_response(result, req.encoding_format, self.spec.name)
            return 200, orjson.dumps(out, option=orjson.OPT_SERIALIZE_NUMPY)
        except FloeError as err:
            return HTTP_STATUS[err.kind], orjson.dumps(error_envelope(err))
        except Exception:  # noqa: BLE001 - never a stack trace to the client
            log.exception("internal error on /v1/embeddings")
            err = InternalError()
            return HTTP_STATUS[err.kind], orjson.dumps(error_envelope(err))

    def model_name(self) -> str:
        return self.spec.name


# Errors of a call whose replica died under it (its node lost, its process killed): the request
# did not finish there, and an embedding request is safe to run again on another replica.
_REPLICA_GONE: tuple = ()
try:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    _REPLICA_GONE = (ActorDiedError, ActorUnavailableError, RayActorError)
except ImportError:  # pragma: no cover - older Ray
    from ray.exceptions import RayActorError

    _REPLICA_GONE = (RayActorError,)


@serve.deployment(name="FloeIngress", ray_actor_options={"num_cpus": 0},
                  max_ongoing_requests=1024)
@serve.ingress(app)
class FloeIngress:
    """The HTTP routes in front of the FloeEmbeddings replicas. It checks the body's content
    type and size (415, 413), hands the body to a replica through a deployment handle, and when
    that replica dies under the call (its node lost) calls another: Serve's proxy alone answers
    such a request with a 500. No model here: place one replica where each proxy runs
    (``max_replicas_per_node: 1``, or beside a head-only proxy)."""

    def __init__(self, replicas, payload_limit: int, attempts: int = 3) -> None:
        self.replicas = replicas
        self.payload_limit = payload_limit
        self.attempts = max(1, attempts)

    async def _call(self, method: str, *args: Any) -> Any:
        from floe.errors import UnavailableError

        for attempt in range(1, self.attempts + 1):
            try:
                return await getattr(self.replicas, method).remote(*args)
            except _REPLICA_GONE as exc:
                log.warning("a floe replica died under a call (%s, attempt %d of %d): calling "
                            "another", type(exc).__name__, attempt, self.attempts)
        raise UnavailableError("no floe replica answered: they died under the request")

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> Response:
        try:
            check_content_type(request)
            body = await read_body(request, self.payload_limit)
            status, data = await self._call("embed_body", body)
        except FloeError as err:
            return _error(err)
        return Response(data, status_code=status, media_type="application/json")

    @app.get("/v1/models")
    async def models(self) -> Response:
        try:
            name = await self._call("model_name")
        except FloeError as err:
            return _error(err)
        return _json({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "floe"}]})

    @app.get("/health")
    async def health(self) -> Response:
        return _json({"status": "ok"})


def build_app(args: Optional[dict] = None):
    """Application builder for ``serve run floe.ray.serve:build_app key=value ...`` and config
    files: ``args`` are FloeEmbeddings' arguments, each checked and parsed here (as its flag
    would be), so a misspelt or malformed one fails before Serve starts a replica. The app is
    FloeIngress (the HTTP routes, retrying a request whose replica died) in front of the
    FloeEmbeddings replicas."""
    from floe.config import ServerSettings, sections_of

    args = dict(args or {})
    threads = args.pop("threads", None)
    sections = sections_of(args)
    config = {k: v for section in sections.values() for k, v in section.items()}
    limit = sections.get("server", {}).get("payload_limit", ServerSettings().payload_limit)
    replicas = FloeEmbeddings.bind(threads=None if threads is None else int(threads), **config)
    return FloeIngress.bind(replicas, int(limit))
