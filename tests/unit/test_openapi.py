"""The served API description equals the checked-in docs/openapi.json (regenerate with
`python -m floe.frontend.openapi > docs/openapi.json`)."""

import json
import pathlib

from floe.frontend import openapi

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "openapi.json"


def test_checked_in_document_matches():
    assert openapi.render() == DOC.read_text(), \
        "docs/openapi.json is stale: run `python -m floe.frontend.openapi > docs/openapi.json`"


def test_every_route_is_described_with_schemas_and_errors():
    doc = openapi.openapi_document()
    for path in ("/v1/embeddings", "/embed", "/", "/tokenize"):
        op = doc["paths"][path]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert {"400", "401", "413", "429", "503"} <= set(op["responses"])
        assert op["security"] == [{"bearerAuth": []}]
    assert "text/plain" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    req = doc["components"]["schemas"]["OpenAIEmbeddingRequest"]
    assert req["required"] == ["input"] and "anyOf" in req["properties"]["input"]
    json.dumps(doc)
