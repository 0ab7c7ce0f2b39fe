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


def _refs(node):
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_document_is_valid_openapi_3_1():
    """What /docs renders: valid OpenAPI 3.1 by openapi-spec-validator (its 3.1 schema and
    checks), every $ref pointing at something, every operation in a declared tag (else Swagger UI
    files it under "default")."""
    from openapi_spec_validator import OpenAPIV31SpecValidator

    doc = json.loads(DOC.read_text())
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in OpenAPIV31SpecValidator(doc).iter_errors()]
    assert errors == []
    for ref in set(_refs(doc)):
        node = doc
        for part in ref.removeprefix("#/").split("/"):
            assert part in node, f"dangling $ref {ref}"
            node = node[part]
    declared = [t["name"] for t in doc["tags"]]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert len(op["tags"]) == 1 and op["tags"][0] in declared, (method, path)


def test_example_bodies_match_their_schemas():
    """The bodies /docs fills in for "Try it out" are requests the schemas accept (the browser
    test, tests/integration/test_docs_page.py, sends some of them to a server)."""
    import jsonschema
    import referencing

    doc = openapi.openapi_document()
    resource = referencing.Resource.from_contents(
        doc, default_specification=referencing.jsonschema.DRAFT202012)
    registry = referencing.Registry().with_resource("floe-openapi", resource)
    examples = 0
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if "requestBody" not in op:
                continue
            media = op["requestBody"]["content"]["application/json"]
            assert "example" in media, f"{method.upper()} {path} has no example body"
            schema = {"$ref": "floe-openapi" + media["schema"]["$ref"]}
            jsonschema.Draft202012Validator(schema, registry=registry).validate(media["example"])
            examples += 1
    assert examples >= 9   # every compute route
