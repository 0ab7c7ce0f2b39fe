"""The API description (OpenAPI 3.1), built from the same msgspec structs that decode requests.

``openapi_document()`` does not depend on the settings, so the served document can be diffed
against the checked-in docs/openapi.json (tests/unit/test_openapi.py); regenerate that file with
``python -m floe.frontend.openapi > docs/openapi.json``. The document is served at /openapi.json
and rendered at /docs by Swagger UI 5 from the fastapi-offline package (no CDN). The document
follows the API key; the page itself is public and takes the key through its Authorize button.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from floe.frontend import schemas

VERSION = "0.1.0"

_INPUT_SCHEMA = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}, "minItems": 1},
        {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
        {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0},
                                    "minItems": 1}, "minItems": 1},
    ],
}

_ERRORS = {
    "400": "Invalid request: bad JSON, wrong types, empty input, bad parameter, token id out of "
           "vocabulary, too long with truncation off. `param` names the field (`input[3]`).",
    "401": "Missing or invalid API key (`Authorization: Bearer KEY`).",
    "404": "Unknown model (with --strict-model-name), or no served model does what the route "
           "asks (a reranker for rerank, a SPLADE model for sparse).",
    "413": "Body, item count, prompt or input over a limit; never retried.",
    "415": "Content type is not application/json.",
    "429": "Overloaded, or predicted to finish past the request's deadline or the server's "
           "latency target; retry after the Retry-After header's seconds.",
    "503": "Not ready, draining, no healthy replica or the forward timeout passed; retry after "
           "Retry-After.",
    "500": "Internal error (generic message; details in the server log).",
    "504": "The request's own deadline (x-request-timeout-ms) passed while it was queued; it was "
           "dropped before compute.",
}

# A request's own deadline (floe/frontend/http.py DEADLINE_HEADER; docs/operations.md)
_DEADLINE_PARAM = {
    "name": "x-request-timeout-ms", "in": "header", "required": False,
    "schema": {"type": "number", "exclusiveMinimum": 0},
    "description": "Milliseconds this request may take from its arrival. Predicted to take "
                   "longer: 429 at once, with Retry-After. Still queued when they pass: 504, "
                   "never computed. Overrides the server's --latency-target-ms."}


def _json_body(ref: str, example: Any = None) -> dict:
    media: dict[str, Any] = {"schema": {"$ref": f"#/components/schemas/{ref}"}}
    if example is not None:   # the body /docs fills in for "Try it out": a request that succeeds
        media["example"] = example
    return {"content": {"application/json": media}}


_QUERY = "What is a fox?"
_TEXTS = ["A fox is a small wild canine.", "The stock market fell today."]
# Operations grouped on /docs, in this order.
_TAGS = [
    {"name": "embeddings", "description": "Dense embeddings: the OpenAI API and TEI's."},
    {"name": "rerank", "description": "Scores of (query, document) pairs from a cross-encoder: "
                                      "TEI's shape and Cohere's / Jina's."},
    {"name": "sparse", "description": "Sparse (SPLADE) embeddings."},
    {"name": "tokenize", "description": "The tokens floe would embed."},
    {"name": "models", "description": "What is served, and how."},
    {"name": "probes", "description": "Liveness, readiness and metrics: public, even with "
                                      "--api-key."},
]


def _errors(*codes: str) -> dict:
    return {c: {"description": _ERRORS[c], **_json_body("ErrorEnvelope"),
                **({"headers": {"Retry-After": {"schema": {"type": "integer"}}}}
                   if c in ("429", "503") else {})}
            for c in codes}


_COMPUTE_ERRORS = ("400", "401", "404", "413", "415", "429", "503", "504", "500")
_SECURED = [{"bearerAuth": []}]


def openapi_document() -> dict[str, Any]:
    _, components = msgspec.json.schema_components(
        [schemas.OpenAIEmbeddingRequest, schemas.EmbedRequest, schemas.TokenizeRequest,
         schemas.SparseEmbedRequest, schemas.RerankRequest,
         schemas.OpenAIEmbeddingResponse, schemas.ErrorEnvelope, schemas.ModelList, schemas.Token],
        ref_template="#/components/schemas/{name}")
    for name, field in (("OpenAIEmbeddingRequest", "input"), ("EmbedRequest", "inputs"),
                        ("TokenizeRequest", "inputs"), ("SparseEmbedRequest", "inputs")):
        prop = components[name]["properties"][field]
        components[name]["properties"][field] = {**_INPUT_SCHEMA, **prop}
        components[name]["required"] = [field]
    embed_json = {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}

    def embed_op(summary: str) -> dict:
        return {"summary": summary, "tags": ["embeddings"], "security": _SECURED, "requestBody": {
            "required": True, **_json_body("EmbedRequest", {"inputs": [_QUERY]})}, "responses": {
            "200": {"description": "One vector per input. With `Accept: application/octet-stream`: "
                                   "the raw little-endian float32 buffer (n x dim, row-major), with "
                                   "x-embedding-count and x-embedding-dim headers.",
                    "content": {"application/json": {"schema": embed_json},
                                "application/octet-stream": {"schema": {"type": "string",
                                                                        "format": "binary"}}}},
            **_errors(*_COMPUTE_ERRORS)}}

    openai_op = {"summary": "Create embeddings (OpenAI API)", "tags": ["embeddings"],
                 "security": _SECURED,
                 "requestBody": {"required": True, **_json_body("OpenAIEmbeddingRequest",
                                                                {"input": [_QUERY, *_TEXTS]})},
                 "responses": {"200": {"description": "Embeddings",
                                       **_json_body("OpenAIEmbeddingResponse")},
                               **_errors(*_COMPUTE_ERRORS)}}
    components["RerankRequest"]["properties"]["query"] = {
        "type": "string", "description": "The query every document is scored against."}
    components["RerankRequest"]["required"] = ["query"]
    tei_rerank = {"type": "array", "items": {"type": "object", "required": ["index", "score"],
                  "properties": {"index": {"type": "integer"}, "score": {"type": "number"},
                                 "text": {"type": "string"}}}}
    cohere_rerank = {"type": "object", "properties": {
        "id": {"type": "string"}, "model": {"type": "string"},
        "results": {"type": "array", "items": {"type": "object", "properties": {
            "index": {"type": "integer"}, "relevance_score": {"type": "number"},
            "document": {"type": "object", "properties": {"text": {"type": "string"}}}}}},
        "usage": {"type": "object", "properties": {"prompt_tokens": {"type": "integer"},
                                                   "total_tokens": {"type": "integer"}}}}}

    def rerank_op(summary: str, example: dict) -> dict:
        return {"summary": summary, "tags": ["rerank"], "security": _SECURED, "requestBody": {
            "required": True, **_json_body("RerankRequest", example)}, "responses": {
            "200": {"description": "Documents by score, highest first (at most top_n): TEI's list "
                                   "when the body has `texts`, Cohere's and Jina's object when it "
                                   "has `documents`.",
                    "content": {"application/json": {"schema": {"anyOf": [tei_rerank, cohere_rerank]}}}},
            **_errors(*_COMPUTE_ERRORS)}}

    cohere_example = {"query": _QUERY, "documents": _TEXTS, "top_n": 2, "return_documents": True}
    sparse_json = {"type": "array", "items": {"type": "array", "items": {
        "type": "object", "properties": {"index": {"type": "integer"}, "value": {"type": "number"}}}}}
    text = {"content": {"text/plain": {"schema": {"type": "string"}}}}
    status_body = {"content": {"application/json": {"schema": {"type": "object"}}}}
    paths = {
        "/v1/embeddings": {"post": openai_op},
        "/embeddings": {"post": {**openai_op, "summary": "Alias of /v1/embeddings"}},
        "/embed": {"post": embed_op("Embed (TEI API)")},
        "/": {"post": embed_op("Embed (TEI clients post to the root URL)")},
        "/rerank": {"post": rerank_op("Rerank with a cross-encoder (TEI's shape, or Cohere's)",
                                      {"query": _QUERY, "texts": _TEXTS, "return_text": True})},
        "/v1/rerank": {"post": rerank_op("Rerank (Cohere / Jina API)", cohere_example)},
        "/v2/rerank": {"post": rerank_op("Rerank (Cohere v2 API)", cohere_example)},
        "/embed_sparse": {"post": {
            "summary": "Sparse embeddings of a SPLADE model (TEI API)", "tags": ["sparse"],
            "security": _SECURED,
            "requestBody": {"required": True, **_json_body("SparseEmbedRequest",
                                                           {"inputs": [_QUERY]})},
            "responses": {"200": {"description": "Per input, its non-zero entries by vocabulary "
                                                 "index", "content": {"application/json": {
                                                     "schema": sparse_json}}},
                          **_errors(*_COMPUTE_ERRORS)}}},
        "/tokenize": {"post": {
            "summary": "The token ids floe would embed, with their text", "tags": ["tokenize"],
            "security": _SECURED,
            "requestBody": {"required": True, **_json_body("TokenizeRequest", {"inputs": _QUERY})},
            "responses": {"200": {"description": "Per input, its tokens", "content": {
                "application/json": {"schema": {"type": "array", "items": {
                    "type": "array", "items": {"$ref": "#/components/schemas/Token"}}}}}},
                **_errors(*_COMPUTE_ERRORS)}}},
        "/v1/models": {"get": {"summary": "The served models and their aliases", "tags": ["models"],
                               "security": _SECURED,
                               "responses": {"200": {"description": "Models",
                                                     **_json_body("ModelList")},
                                             **_errors("401")}}},
        "/v1/models/{model}": {"get": {
            "summary": "One served model", "tags": ["models"], "security": _SECURED,
            "parameters": [{"name": "model", "in": "path", "required": True,
                            "schema": {"type": "string"}}],
            "responses": {"200": {"description": "The model", **_json_body("Model")},
                          **_errors("401", "404")}}},
        "/info": {"get": {"summary": "Model, batching configuration and replica status",
                          "tags": ["models"], "security": _SECURED,
                          "responses": {"200": {"description": "Info", **status_body},
                                        **_errors("401")}}},
        "/health": {"get": {"summary": "Liveness (public); HEAD works too", "tags": ["probes"],
                            "responses": {"200": {"description": "Alive", **status_body}}}},
        "/ready": {"get": {"summary": "Readiness (public): a healthy replica exists, not draining",
                           "tags": ["probes"],
                           "responses": {"200": {"description": "Ready", **status_body},
                                         "503": {"description": "Not ready; Retry-After",
                                                 **status_body}}}},
        "/metrics": {"get": {"summary": "Prometheus metrics (public); OpenMetrics when asked for "
                                        "with Accept: application/openmetrics-text",
                             "tags": ["probes"],
                             "responses": {"200": {"description": "Metrics", **text}}}},
    }
    for route in paths.values():
        op = route.get("post")
        if op is not None and "504" in op["responses"]:   # the compute routes
            if op["tags"] == ["tokenize"]:   # answered by the front end: no queue, no deadline
                del op["responses"]["504"]
            else:
                op["parameters"] = [_DEADLINE_PARAM]
    return {
        "openapi": "3.1.0",
        "info": {"title": "floe", "version": VERSION,
                 "description": "Text-embedding inference server: OpenAI /v1/embeddings, TEI "
                                "/embed, /embed_sparse and /rerank, Cohere /v1/rerank, gRPC "
                                "floe.v1.Embedder (see docs/api.md). With --api-key "
                                "set, routes marked with bearerAuth need `Authorization: Bearer "
                                "KEY`, and this document itself does too (on /docs: press "
                                "Authorize)."},
        "tags": _TAGS,
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": {
            "bearerAuth": {"type": "http", "scheme": "bearer"}}},
    }


def render() -> str:
    return json.dumps(openapi_document(), indent=2, sort_keys=True) + "\n"


# The /docs page: Swagger UI 5 (the fastapi-offline package's copy, served from /docs/static, no
# CDN). The page fetches /openapi.json itself rather than giving Swagger UI its URL, so that a 401
# (the server has --api-key) becomes a placeholder holding only the bearer scheme: its Authorize
# button takes the key, the description is fetched again with it, and "Try it out" carries it.
# The key lives in the page's memory only (no persistAuthorization); validatorUrl null: no badge
# fetched from validator.swagger.io.
DOCS_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>floe API</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/docs/static/swagger-ui.css"></head>
<body><div id="ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script>
<script>
"use strict";
(function () {
  var ui = null, placeholder = false;
  function keyless(refused) {
    return {openapi: "3.1.0", info: {title: "floe", version: "", description: refused
      ? "**The API key was refused.** Press Authorize and enter it again."
      : "This server needs an API key (`--api-key`). Press **Authorize**, enter the key, and " +
        "the API description loads; requests from this page then carry it."},
      paths: {}, components: {securitySchemes: {bearerAuth: {type: "http", scheme: "bearer"}}}};
  }
  function key() {
    var value = ui && ui.authSelectors.authorized().getIn(["bearerAuth", "value"]);
    return value || "";
  }
  function load() {
    var k = key();
    return fetch("/openapi.json", {headers: k ? {authorization: "Bearer " + k} : {}})
      .then(function (r) {
        if (r.status === 401) {
          if (k) ui.authActions.logout(["bearerAuth"]);   // so Authorize asks again
          return keyless(Boolean(k));
        }
        if (!r.ok) throw new Error("GET /openapi.json answered " + r.status);
        return r.json();
      })
      .then(function (doc) {
        placeholder = !doc.paths || Object.keys(doc.paths).length === 0;
        if (ui) { ui.specActions.updateSpec(JSON.stringify(doc)); return; }
        ui = SwaggerUIBundle({spec: doc, dom_id: "#ui", validatorUrl: null, deepLinking: true,
                              displayRequestDuration: true, plugins: [reloadOnAuthorize]});
        window.ui = ui;
      })
      .catch(function (e) {
        document.getElementById("ui").textContent = "Could not load the API description: " + e;
      });
  }
  function reloadOnAuthorize() {
    return {statePlugins: {auth: {wrapActions: {authorize: function (authorize) {
      return function (payload) {
        var out = authorize(payload);
        if (placeholder) load();
        return out;
      };
    }}}}};
  }
  load();
})();
</script>
</body></html>
"""


if __name__ == "__main__":
    print(render(), end="")
