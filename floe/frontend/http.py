"""HTTP transport: OpenAI /v1/embeddings, TEI-style /embed and /tokenize, health, info, metrics.

Bodies are read with a hard size limit and parsed with orjson (strict UTF-8, no lone surrogates,
bounded nesting), then validated by hand so that every error names its parameter and stays small.
Embeddings are serialized straight from the float32 buffer: numpy rows for JSON floats, the raw
bytes for base64 and application/octet-stream.
"""

from __future__ import annotations

import base64
import hmac
import logging
import time
from typing import Any, Optional

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from floe import metrics
from floe.errors import (
    HTTP_STATUS,
    AuthError,
    FloeError,
    InternalError,
    TooLargeError,
    UnsupportedMediaError,
    ValidationError,
    error_envelope,
)
from floe.frontend.service import EmbedService, error_label, new_request_id
from floe.protocol import EmbedResult, EncodeOptions, TokenBatch

log = logging.getLogger("floe.http")

_JSON = "application/json"
_OCTET = "application/octet-stream"


def _json(obj: Any, status: int = 200, headers: Optional[dict] = None) -> Response:
    return Response(orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type=_JSON, headers=headers)


def error_response(err: FloeError) -> Response:
    headers = {}
    if err.retry_after is not None:
        headers["retry-after"] = str(max(1, int(round(err.retry_after))))
    return _json(error_envelope(err), status=HTTP_STATUS[err.kind], headers=headers)


# --- request parsing ---------------------------------------------------------------------------

async def read_json(request: Request, limit: int) -> Any:
    ctype = request.headers.get("content-type", _JSON).split(";")[0].strip().lower()
    if ctype not in (_JSON, "") and not ctype.endswith("+json"):
        raise UnsupportedMediaError(f"content-type must be application/json, got {ctype[:60]!r}")
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
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ValidationError(f"request body is not valid JSON: {str(e)[:160]}") from None
    if not isinstance(data, dict):
        raise ValidationError("request body must be a JSON object")
    return data


def _opt_bool(data: dict, key: str) -> Optional[bool]:
    v = data.get(key)
    if v is None:
        return None
    if not isinstance(v, bool):
        raise ValidationError(f"`{key}` must be a boolean", param=key)
    return v


def _opt_str(data: dict, key: str) -> Optional[str]:
    v = data.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        raise ValidationError(f"`{key}` must be a string", param=key)
    return v


def _opt_dimensions(data: dict) -> Optional[int]:
    v = data.get("dimensions")
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValidationError("`dimensions` must be a positive integer", param="dimensions")
    if v < 1:
        raise ValidationError("`dimensions` must be a positive integer", param="dimensions")
    return v


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_input(value: Any, param: str) -> tuple[Optional[list[str]], Optional[TokenBatch]]:
    """OpenAI input: a string, a list of strings, a list of token ids, or a list of such lists."""
    if isinstance(value, str):
        return [value], None
    if not isinstance(value, list):
        raise ValidationError(
            f"`{param}` must be a string, a list of strings, a list of token ids or a list of "
            "lists of token ids", param=param)
    if not value:
        raise ValidationError(f"`{param}` must not be empty", param=param)
    first = value[0]
    if isinstance(first, str):
        for i, x in enumerate(value):
            if not isinstance(x, str):
                raise ValidationError(f"`{param}[{i}]` must be a string like the other items",
                                      param=f"{param}[{i}]")
        return value, None
    if _is_int(first):
        for i, x in enumerate(value):
            if not _is_int(x):
                raise ValidationError(f"`{param}[{i}]` must be a token id (integer)",
                                      param=f"{param}[{i}]")
        return None, TokenBatch.from_lists([value])
    if isinstance(first, list):
        for i, item in enumerate(value):
            if not isinstance(item, list) or not item:
                raise ValidationError(f"`{param}[{i}]` must be a non-empty list of token ids",
                                      param=f"{param}[{i}]")
            for j, x in enumerate(item):
                if not _is_int(x):
                    raise ValidationError(f"`{param}[{i}][{j}]` must be a token id (integer)",
                                          param=f"{param}[{i}][{j}]")
        return None, TokenBatch.from_lists(value)
    raise ValidationError(
        f"`{param}` items must be strings or token ids, got {type(first).__name__}", param=f"{param}[0]")


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

def create_app(service: EmbedService) -> FastAPI:
    settings = service.settings
    limit = settings.server.payload_limit
    app = FastAPI(title="floe", version="0.1.0", docs_url="/docs", redoc_url=None)

    def authorize(request: Request) -> None:
        key = service.api_key
        if not key:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise AuthError("missing or invalid API key (send `Authorization: Bearer KEY`)")

    @app.exception_handler(FloeError)
    async def _floe_error(request: Request, err: FloeError) -> Response:
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> Response:
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(err.status_code, "error")
        body = {"error": {"message": str(err.detail), "type": kind, "param": None, "code": err.status_code}}
        return _json(body, status=err.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception) -> Response:
        log.exception("internal error on %s", request.url.path)
        return error_response(InternalError())

    async def run_embed(request: Request, endpoint: str, handler) -> Response:
        """Shared wrapper: auth, request metrics, error accounting."""
        t0 = time.perf_counter()
        try:
            authorize(request)
            response = await handler()
            metrics.REQUESTS.labels(endpoint=endpoint, transport="http").inc()
            return response
        except FloeError as err:
            metrics.REQUEST_FAILURES.labels(endpoint=endpoint, transport="http",
                                            error=error_label(err)).inc()
            return error_response(err)
        except Exception:
            metrics.REQUEST_FAILURES.labels(endpoint=endpoint, transport="http", error="internal").inc()
            log.exception("internal error on %s", endpoint)
            return error_response(InternalError())
        finally:
            metrics.REQUEST_SECONDS.labels(endpoint=endpoint, transport="http").observe(
                time.perf_counter() - t0)

    # OpenAI -----------------------------------------------------------------------------------

    async def openai_embeddings(request: Request) -> Response:
        async def handle() -> Response:
            data = await read_json(request, limit)
            if "input" not in data:
                raise ValidationError("`input` is required", param="input")
            texts, tokens = parse_input(data["input"], "input")
            fmt = data.get("encoding_format") or "float"
            if fmt not in ("float", "base64"):
                raise ValidationError("`encoding_format` must be 'float' or 'base64'",
                                      param="encoding_format")
            model = _opt_str(data, "model") or ""
            user_prompt = _opt_str(data, "prompt")
            options = EncodeOptions(dimensions=_opt_dimensions(data),
                                    prompt_name=_opt_str(data, "prompt_name"), prompt=user_prompt,
                                    truncate=_opt_bool(data, "truncate"))
            result = await service.embed(request.headers.get("x-request-id", ""), texts, tokens,
                                          options, model=model)
            arr = result.as_float32()
            if fmt == "base64":
                rows = [{"object": "embedding", "index": i,
                         "embedding": base64.b64encode(arr[i].tobytes()).decode("ascii")}
                        for i in range(result.n)]
            else:
                rows = [{"object": "embedding", "index": i, "embedding": arr[i]} for i in range(result.n)]
            tokens_used = int(result.token_counts.sum())
            body = {"object": "list", "data": rows, "model": service.model_name,
                    "usage": {"prompt_tokens": tokens_used, "total_tokens": tokens_used}}
            return _json(body, headers=timing_headers(result))
        return await run_embed(request, "/v1/embeddings", handle)

    app.add_api_route("/v1/embeddings", openai_embeddings, methods=["POST"])
    app.add_api_route("/embeddings", openai_embeddings, methods=["POST"], include_in_schema=False)

    # TEI-style -----------------------------------------------------------------------------

    async def embed(request: Request) -> Response:
        async def handle() -> Response:
            data = await read_json(request, limit)
            if "inputs" not in data:
                raise ValidationError("`inputs` is required", param="inputs")
            texts, tokens = parse_input(data["inputs"], "inputs")
            direction = (_opt_str(data, "truncation_direction") or "right").lower()
            if direction not in ("left", "right"):
                raise ValidationError("`truncation_direction` must be 'left' or 'right'",
                                      param="truncation_direction")
            normalize = _opt_bool(data, "normalize")
            options = EncodeOptions(
                normalize=True if normalize is None else normalize,
                truncate=_opt_bool(data, "truncate"), truncation_direction=direction,
                prompt_name=_opt_str(data, "prompt_name"), prompt=_opt_str(data, "prompt"),
                dimensions=_opt_dimensions(data))
            result = await service.embed(request.headers.get("x-request-id", ""), texts, tokens,
                                          options, model=_opt_str(data, "model") or "")
            headers = timing_headers(result)
            if _OCTET in request.headers.get("accept", ""):
                headers.update({"x-embedding-count": str(result.n), "x-embedding-dim": str(result.dim),
                                "x-embedding-dtype": "float32-le"})
                return Response(result.as_float32().astype("<f4", copy=False).tobytes(),
                                media_type=_OCTET, headers=headers)
            return _json(result.as_float32(), headers=headers)
        return await run_embed(request, "/embed", handle)

    app.add_api_route("/embed", embed, methods=["POST"])

    async def tokenize(request: Request) -> Response:
        async def handle() -> Response:
            data = await read_json(request, limit)
            if "inputs" not in data:
                raise ValidationError("`inputs` is required", param="inputs")
            texts, tokens = parse_input(data["inputs"], "inputs")
            if texts is None:
                raise ValidationError("`inputs` must be a string or a list of strings", param="inputs")
            options = EncodeOptions(prompt_name=_opt_str(data, "prompt_name"),
                                    prompt=_opt_str(data, "prompt"), truncate=_opt_bool(data, "truncate"))
            batch = await service.tokenize(texts, options)
            offsets = batch.offsets()
            tok = service.tokenizers.tokenizer
            out = []
            for i in range(batch.n):
                ids = batch.ids[offsets[i]:offsets[i + 1]]
                pieces = tok.decode_tokens(ids)
                out.append([{"id": int(t), "text": p} for t, p in zip(ids.tolist(), pieces)])
            return _json(out)
        return await run_embed(request, "/tokenize", handle)

    app.add_api_route("/tokenize", tokenize, methods=["POST"])

    # Health, info, models, metrics ---------------------------------------------------------

    @app.get("/health")
    async def health() -> Response:
        """Liveness: the front end's event loop answers."""
        return _json({"status": "ok"})

    @app.get("/ready")
    async def ready() -> Response:
        """Readiness: at least one healthy replica and not draining."""
        if service.ready():
            return _json({"status": "ready"})
        status = service.router.status()
        reason = "draining" if service.draining else status.get("reason", "no healthy replica")
        return _json({"status": "not ready", "reason": reason, "replicas": status},
                     status=503, headers={"retry-after": "1"})

    @app.get("/info")
    async def info(request: Request) -> Response:
        authorize(request)
        return _json(service.describe())

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        authorize(request)
        return _json({"object": "list", "data": [
            {"id": service.model_name, "object": "model", "created": 0, "owned_by": "floe"}]})

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, ctype = await metrics.render(service)
        return Response(body, media_type=ctype)

    return app
