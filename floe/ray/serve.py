"""A Ray Serve deployment of the floe replica behind the OpenAI route (``POST /v1/embeddings``).

Each Serve replica is one floe replica in-process: the model's tokenizer (sentence-transformers
parity, floe/tokenize.py), the edge of floe/edge.py (the same checks, once), and a ReplicaCore (dynamic
length-bucketed batcher + engine thread, floe/replica/core.py) driving one engine. Ray places the
replicas (``ray_actor_options``: CPUs or a GPU each), routes requests between them, and restarts a
replica whose health check fails (``check_health`` fails once the core's threads are gone).

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
@serve.ingress(app)
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
        self.core = ReplicaCore(eng, batch)
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

    async def _embed(self, request: Request) -> Response:
        # the same checks, in the same order, as floe serve's OpenAI route (floe/frontend)
        check_content_type(request)
        body = await read_body(request, self.payload_limit)
        req = schemas.parse_openai(self.limits, body)
        prepared = await self.edge.prepare(req.texts, req.tokens, req.options, req.model)
        result = await self.core.submit(prepared.tokens, req.options, uuid.uuid4().hex)
        return _json(schemas.openai_response(result, req.encoding_format, self.spec.name))

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> Response:
        try:
            return await self._embed(request)
        except FloeError as err:
            return _error(err)
        except Exception:  # noqa: BLE001 - never a stack trace to the client
            log.exception("internal error on /v1/embeddings")
            return _error(InternalError())

    @app.get("/v1/models")
    async def models(self) -> Response:
        return _json({"object": "list", "data": [
            {"id": self.spec.name, "object": "model", "created": 0, "owned_by": "floe"}]})

    @app.get("/health")
    async def health(self) -> Response:
        return _json({"status": "ok" if self.core.ready else "not ready"},
                     status=200 if self.core.ready else 503)


def build_app(args: Optional[dict] = None):
    """Application builder for ``serve run floe.ray.serve:build_app key=value ...`` and config
    files: ``args`` are FloeEmbeddings' arguments, each checked and parsed here (as its flag
    would be), so a misspelt or malformed one fails before Serve starts a replica."""
    from floe.config import sections_of

    args = dict(args or {})
    threads = args.pop("threads", None)
    config = {k: v for section in sections_of(args).values() for k, v in section.items()}
    return FloeEmbeddings.bind(threads=None if threads is None else int(threads), **config)
