"""HTTP transport: OpenAI /v1/embeddings, TEI-style /embed, /embed_sparse, /rerank and /tokenize,
Cohere / Jina-style /v1/rerank, health, info, metrics.

Each compute route asks floe/frontend/models.py for the served model that answers it (by the
route's kind and the body's ``model``).

Every compute route runs through ``run_compute``: auth, admission before the body is read, the
body limit, decoding with floe/frontend/schemas.py (bounded by the limits, every error naming its
parameter), the work (cancelled if the client disconnects), one count per outcome.
Embeddings are serialized straight from the float32 buffer: numpy rows for JSON floats, the raw
bytes for base64 and application/octet-stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import importlib.util
import logging
import math
import pathlib
import sys
import time
from typing import Any, Optional

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from floe import metrics
from floe.frontend import openapi, schemas
from floe.errors import (
    HTTP_STATUS,
    AuthError,
    FloeError,
    InternalError,
    ModelNotFoundError,
    TooLargeError,
    UnsupportedMediaError,
    ValidationError,
    error_envelope,
)
from floe.frontend.models import ServedModels
from floe.frontend.service import EmbedService, error_label
from floe.request_id import new_request_id, request_id
from floe.protocol import MAX_DEADLINE_S, EmbedResult, deadline_after
from floe.transport.auth import AUTH_HINT, bearer_ok

log = logging.getLogger("floe.http")

_JSON = "application/json"
_OCTET = "application/octet-stream"


def _json(obj: Any, status: int = 200, headers: Optional[dict] = None) -> Response:
    return Response(orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type=_JSON, headers=headers)


# --- request parsing ---------------------------------------------------------------------------

# Bodies larger than this are decoded and checked on a worker thread (floe/frontend/schemas.py
# bounds that work by the limits, not by the body's contents).
_INLINE_BODY_BYTES = 64 * 1024


def check_content_type(request: Request) -> None:
    ctype = request.headers.get("content-type", _JSON).split(";")[0].strip().lower()
    if ctype not in (_JSON, "") and not ctype.endswith("+json"):
        raise UnsupportedMediaError(f"content-type must be application/json, got {ctype[:60]!r}")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to be over ``limit`` bytes (from the
    Content-Length header, or while a chunked body streams in)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLargeError(f"request body of {declared} bytes is over the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLargeError(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body:
        raise ValidationError("request body is empty; send a JSON object")
    return body


def timing_headers(result: EmbedResult) -> dict[str, str]:
    t = result.timings
    return {
        "x-request-id": result.request_id,
        "x-tokenization-time": f"{t.tokenize_s * 1e3:.3f}",
        "x-queue-time": f"{t.queue_s * 1e3:.3f}",
        "x-inference-time": f"{t.inference_s * 1e3:.3f}",
        "x-total-time": f"{t.total_s * 1e3:.3f}",
        "x-compute-tokens": str(int(result.token_counts.sum())),
    }


# --- the app -----------------------------------------------------------------------------------

# The HTTP protocol (floe/frontend/connections.py) calls the function stored under this scope key
# when the client's connection is lost before its response is complete.
ON_DISCONNECT = "floe.on_disconnect"


def _request_id(request: Request) -> str:
    return request_id(request.headers.get("x-request-id"))


# A request's own deadline over HTTP, in milliseconds from its arrival (gRPC has the call's
# deadline): the replica refuses at once (429) what it predicts cannot finish in time and drops
# what is still queued when the time is up (504). docs/operations.md.
DEADLINE_HEADER = "x-request-timeout-ms"


def request_deadline(request: Request) -> Optional[float]:
    """The deadline the request's header sets, on the clock of EncodeOptions.deadline; None
    without the header. A value that is not a positive number of milliseconds is a 400."""
    raw = request.headers.get(DEADLINE_HEADER)
    if raw is None:
        return None
    try:
        ms = float(raw)
    except ValueError:
        ms = math.nan
    if not 0 < ms <= MAX_DEADLINE_S * 1000:
        raise ValidationError(f"{DEADLINE_HEADER} must be a positive number of milliseconds, "
                              f"at most {MAX_DEADLINE_S * 1000:.0f}", param=DEADLINE_HEADER)
    return deadline_after(ms / 1000.0)


def _with_deadline(parsed: Any, deadline: Optional[float]) -> Any:
    options = getattr(parsed, "options", None)
    if deadline is None or options is None:
        return parsed
    return dataclasses.replace(parsed, options=dataclasses.replace(options, deadline=deadline))


class HttpRoutes:
    """The endpoints of one front end, as methods over its served models (an EmbedService each).

    Compute routes (``openai_embeddings``, ``embed``, ``embed_sparse``, ``rerank``,
    ``tokenize``) go through ``run_compute`` with a parse step (floe/frontend/schemas.py) and a
    respond step; the others answer directly. ``create_app`` mounts them. Parsing is bounded by
    the default model's limits; the model's own are applied at its edge.
    """

    def __init__(self, models: ServedModels) -> None:
        self.served = models
        service = self.service = models.default   # admission (shared), parsing, /tokenize
        self.limits = service.limits
        self.limit = service.settings.server.payload_limit
        self.key = service.api_key
        self.document = orjson.dumps(openapi.openapi_document())

    def authorize(self, request: Request) -> None:
        if self.key and not bearer_ok(request.headers.get("authorization"), self.key):
            raise AuthError(AUTH_HINT)

    async def run_compute(self, request: Request, endpoint: str, parse, respond) -> Response:
        """Every compute route: auth, admission (before the body is read), body limit, parsing
        (off the event loop for large bodies), the work (cancelled if the client goes away),
        and one count per outcome."""
        service = self.service
        t0 = time.perf_counter()
        rid = _request_id(request)
        task = asyncio.current_task()
        gone: list[bool] = []

        def on_disconnect() -> None:
            # cancelling the work drops its still-queued sequences in the replica, as a
            # cancelled gRPC call does
            gone.append(True)
            task.cancel()

        request.scope[ON_DISCONNECT] = on_disconnect
        try:
            self.authorize(request)
            check_content_type(request)
            deadline = request_deadline(request)
            with service.admission.admitted():
                body = await read_body(request, self.limit)
                if len(body) > _INLINE_BODY_BYTES:
                    parsed = await service.tokenizers.run(parse, self.limits, body)
                else:
                    parsed = parse(self.limits, body)
                del body
                parsed = _with_deadline(parsed, deadline)
                response = await respond(parsed, rid, request)
            metrics.REQUESTS.labels(endpoint=endpoint, transport="http").inc()
            return response
        except (asyncio.CancelledError, ClientDisconnect):
            if not gone and not isinstance(sys.exc_info()[1], ClientDisconnect):
                raise
            if gone:
                task.uncancel()
            metrics.REQUEST_FAILURES.labels(endpoint=endpoint, transport="http",
                                            error="cancelled").inc()
            log.info("request %s on %s: client disconnected; its queued work was dropped", rid,
                     endpoint)
            return Response(status_code=499)  # nobody reads it; the server needs a response
        except FloeError as err:
            metrics.REQUEST_FAILURES.labels(endpoint=endpoint, transport="http",
                                            error=error_label(err)).inc()
            return error_response(err, rid)
        except Exception:
            metrics.REQUEST_FAILURES.labels(endpoint=endpoint, transport="http", error="internal").inc()
            log.exception("internal error on %s", endpoint)
            return error_response(InternalError(), rid)
        finally:
            request.scope.pop(ON_DISCONNECT, None)
            metrics.REQUEST_SECONDS.labels(endpoint=endpoint, transport="http").observe(
                time.perf_counter() - t0)

    # --- OpenAI ------------------------------------------------------------------------------

    async def openai_embeddings(self, request: Request) -> Response:
        return await self.run_compute(request, "/v1/embeddings", schemas.parse_openai,
                                      self._respond_openai)

    async def _embed(self, route: str, req: Any, rid: str) -> tuple[EmbedResult, str]:
        """The embed path of the model that answers ``route`` for ``req``; (result, its name)."""
        service = self.served.for_request(route, req.model)
        result = await service.embed(rid, req.texts, req.tokens, req.options, model=req.model)
        return result, service.model_name

    async def _chunked(self, req: Any, rid: str):
        """The chunked embed path of the model that answers the embed route for ``req``."""
        service = self.served.for_request("embed", req.model)
        chunks = await service.embed_chunked(rid, req.texts, req.tokens, req.options, req.chunk,
                                             model=req.model)
        return chunks, service.model_name

    async def _respond_openai(self, req: schemas.OpenAIRequest, rid: str, request) -> Response:
        if req.chunk is not None:
            chunks, name = await self._chunked(req, rid)
            body = (schemas.openai_response(chunks.result, req.encoding_format, name)
                    if req.chunk.late_inputs
                    else schemas.openai_chunked_response(chunks, req.encoding_format, name))
            return _json(body, headers=timing_headers(chunks.result))
        result, name = await self._embed("embed", req, rid)
        return _json(schemas.openai_response(result, req.encoding_format, name),
                     headers=timing_headers(result))

    # --- TEI ---------------------------------------------------------------------------------

    async def embed(self, request: Request) -> Response:
        return await self.run_compute(request, "/embed", schemas.parse_embed, self._respond_embed)

    async def _respond_embed(self, req: schemas.TeiEmbedRequest, rid: str, request) -> Response:
        if req.chunk is not None:
            if _OCTET in request.headers.get("accept", ""):
                raise ValidationError("a chunked answer is JSON (each chunk carries its input and "
                                      "offsets); drop `Accept: application/octet-stream` or "
                                      "`chunking`", param="chunking")
            chunks, _ = await self._chunked(req, rid)
            return _json(schemas.embed_chunked_response(chunks),
                         headers=timing_headers(chunks.result))
        result, _ = await self._embed("embed", req, rid)
        headers = timing_headers(result)
        rows = schemas.result_rows(result)
        if _OCTET in request.headers.get("accept", ""):
            headers.update({"x-embedding-count": str(result.n), "x-embedding-dim": str(result.dim),
                            "x-embedding-dtype": ("float32-le" if result.dtype == "float32"
                                                  else result.dtype)})
            return Response(rows.tobytes(), media_type=_OCTET, headers=headers)
        return _json(rows, headers=headers)

    async def embed_sparse(self, request: Request) -> Response:
        return await self.run_compute(request, "/embed_sparse", schemas.parse_embed_sparse,
                                      self._respond_sparse)

    async def _respond_sparse(self, req: schemas.TeiEmbedRequest, rid: str, request) -> Response:
        result, _ = await self._embed("sparse", req, rid)
        return _json(schemas.sparse_response(result), headers=timing_headers(result))

    async def rerank(self, request: Request) -> Response:
        return await self.run_compute(request, request.url.path, schemas.parse_rerank,
                                      self._respond_rerank)

    async def _respond_rerank(self, req: schemas.Rerank, rid: str, request) -> Response:
        service = self.served.for_request("score", req.model)
        scored = await service.rerank(rid, req.query, req.documents, req.options,
                                      raw_scores=req.raw_scores, model=req.model, param=req.param)
        body = schemas.rerank_response(req, scored, service.model_name, rid)
        return _json(body, headers=timing_headers(scored.result))

    async def tokenize(self, request: Request) -> Response:
        return await self.run_compute(request, "/tokenize", schemas.parse_tokenize,
                                      self._respond_tokenize)

    async def _respond_tokenize(self, parsed: tuple, rid: str, request) -> Response:
        texts, options = parsed
        batch = await self.service.tokenize(texts, options)
        offsets = batch.offsets()
        tok = self.service.tokenizers.tokenizer
        out = []
        for i in range(batch.n):
            ids = batch.ids[offsets[i]:offsets[i + 1]]
            pieces = tok.decode_tokens(ids)
            out.append([{"id": int(t), "text": p} for t, p in zip(ids.tolist(), pieces)])
        return _json(out, headers={"x-request-id": rid})

    # --- health, info, models, metrics, API description ----------------------------------------

    async def health(self, request: Request) -> Response:
        """Liveness: the front end's event loop answers."""
        return _json({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        """Readiness: at least one healthy replica and not draining."""
        service = self.service
        if self.served.ready():
            return _json({"status": "ready"})
        status = service.router.status()
        reason = "draining" if service.draining else status.get("reason", "no healthy replica")
        return _json({"status": "not ready", "reason": reason},
                     status=503, headers={"retry-after": "1"})

    async def info(self, request: Request) -> Response:
        """The default model's description (TEI's /info shape), and with several models every
        model's under ``models``."""
        self.authorize(request)
        body = self.service.describe()
        body["batching"] = await self.service.batching()
        if len(self.served.services) > 1:
            body["models"] = [s.describe() for s in self.served.services]
        return _json(body)

    @staticmethod
    def _model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "floe"}

    async def models(self, request: Request) -> Response:
        self.authorize(request)
        return _json({"object": "list",
                      "data": [self._model_card(n) for n in self.served.names]})

    async def one_model(self, request: Request) -> Response:
        self.authorize(request)
        model = request.path_params["model"]
        if model not in self.served.names:
            raise ModelNotFoundError(f"model {model[:100]!r} is not served here", param="model")
        return _json(self._model_card(model))

    async def prometheus(self, request: Request) -> Response:
        body, ctype = await metrics.render(self.served.services,
                                           accept=request.headers.get("accept", ""))
        return Response(body, media_type=ctype)

    async def openapi_json(self, request: Request) -> Response:
        self.authorize(request)
        return Response(self.document, media_type=_JSON)

    async def docs(self, request: Request) -> Response:
        # Public, like its assets: the page is the same on every server and holds no API
        # description; it fetches /openapi.json (behind the key) and asks for the key when told 401.
        return Response(openapi.DOCS_HTML, media_type="text/html")

    async def docs_static(self, request: Request) -> Response:
        name = request.path_params["name"]
        # Swagger UI 5 from the fastapi-offline package: the page works offline, with no CDN.
        if name not in _DOCS_ASSETS:
            raise StarletteHTTPException(status_code=404, detail="Not Found")
        return Response(_docs_asset(name), media_type=_DOCS_ASSETS[name])


async def _floe_error(request: Request, err: FloeError) -> Response:
    return error_response(err, _request_id(request))


async def _http_error(request: Request, err: StarletteHTTPException) -> Response:
    kind, code = {404: ("not_found_error", "not_found"),
                  405: ("invalid_request_error", "method_not_allowed")}.get(
        err.status_code, ("error", None))
    body = {"error": {"message": str(err.detail), "type": kind, "param": None, "code": code}}
    return _json(body, status=err.status_code, headers={"x-request-id": _request_id(request)})


async def _internal(request: Request, err: Exception) -> Response:
    log.exception("internal error on %s", request.url.path)
    return error_response(InternalError(), _request_id(request))


def create_app(served: EmbedService | ServedModels) -> "RequestIdApp":
    """The ASGI app: plain Starlette routes (the hot path pays for no dependency injection; the
    API description is built from the request structs, floe/frontend/openapi.py)."""
    r = HttpRoutes(served if isinstance(served, ServedModels) else ServedModels([served]))
    app = Starlette()
    app.add_exception_handler(FloeError, _floe_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal)
    posts = {"/v1/embeddings": r.openai_embeddings, "/embeddings": r.openai_embeddings,
             "/embed": r.embed,
             # TEI clients (huggingface_hub's InferenceClient, Haystack) post to the root URL
             "/": r.embed,
             "/tokenize": r.tokenize,
             "/embed_sparse": r.embed_sparse,
             # TEI's shape (texts) or Cohere's and Jina's (documents) on each; vLLM serves all three
             "/rerank": r.rerank, "/v1/rerank": r.rerank, "/v2/rerank": r.rerank}
    for path, endpoint in posts.items():
        app.add_route(path, endpoint, methods=["POST"])
    for path, endpoint, methods in (
            ("/health", r.health, ["GET", "HEAD"]), ("/ready", r.ready, ["GET", "HEAD"]),
            ("/info", r.info, ["GET"]), ("/v1/models", r.models, ["GET"]),
            ("/v1/models/{model:path}", r.one_model, ["GET"]), ("/metrics", r.prometheus, ["GET"]),
            ("/openapi.json", r.openapi_json, ["GET"]), ("/docs", r.docs, ["GET"]),
            ("/docs/static/{name}", r.docs_static, ["GET"])):
        app.add_route(path, endpoint, methods=methods)
    # the embedding routes skip Starlette's routing and middleware (run_compute already answers
    # every outcome, errors included): one-input requests cost the front end 0.41 -> 0.32 ms of
    # CPU in A/B runs (docs/benchmarks-history.md)
    hot = {"/v1/embeddings": r.openai_embeddings, "/embeddings": r.openai_embeddings}
    return RequestIdApp(app, hot_posts=hot)


class RequestIdApp:
    """Every HTTP response carries ``x-request-id``: the compute routes set their own; this pure
    ASGI wrapper adds the client's (or a new) id to every other response, errors included.

    ``hot_posts``: POST endpoints (path -> Starlette endpoint) called directly, without the
    Starlette app's routing and middleware stack. Each must answer every outcome itself."""

    def __init__(self, app: Starlette, hot_posts: Optional[dict] = None) -> None:
        self.app = app
        self.hot_posts = hot_posts or {}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["method"] == "POST":
            endpoint = self.hot_posts.get(scope["path"])
            if endpoint is not None:
                scope["app"] = self.app
                response = await endpoint(Request(scope, receive))
                await response(scope, receive, send)
                return

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                headers = message.setdefault("headers", [])
                if not any(k == b"x-request-id" for k, _ in headers):
                    rid = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"")
                    if not rid or len(rid) > 128 or not rid.isascii():
                        rid = new_request_id().encode()
                    headers.append((b"x-request-id", rid))
            await send(message)

        await self.app(scope, receive, send_with_id)


_DOCS_ASSETS = {"swagger-ui.css": "text/css", "swagger-ui-bundle.js": "text/javascript"}


@functools.lru_cache(maxsize=None)
def _docs_asset(name: str) -> bytes:
    # Found without importing the package: its __init__ imports FastAPI, which serving never needs.
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the /docs page needs the fastapi-offline package (a floe dependency)")
    return (pathlib.Path(spec.submodule_search_locations[0]) / "static" / name).read_bytes()


def error_response(err: FloeError, request_id: str = "") -> Response:
    headers = {}
    if err.retry_after is not None:
        headers["retry-after"] = str(max(1, int(round(err.retry_after))))
    if request_id:
        headers["x-request-id"] = request_id
    return _json(error_envelope(err), status=HTTP_STATUS[err.kind], headers=headers)
