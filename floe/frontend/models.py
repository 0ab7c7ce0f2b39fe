"""The models one server serves, and which of them a request goes to.

``floe serve --model A --model B`` runs one EmbedService per model (its own tokenizer, replicas
and batcher), all behind one Admission (the endpoint's concurrency bound). A request is routed by
its route's kind and its ``model`` field:

    the route's kind  -> embed (/v1/embeddings, /embed, gRPC Encode), score (/rerank,
                         /v1/rerank, gRPC Rerank) or sparse (/embed_sparse)
    a served name     -> that model; a model of another kind is a 400 naming the right route
    empty or unknown  -> the first model of the route's kind (the unknown name logged once, or a
                         404 with --strict-model-name), as a single-model server answers any name

gRPC Encode serves embedding and sparse models alike (a sparse model answers with the sparse
fields), so its kind is "encode". Pure: unit-tested without a server.
"""

from __future__ import annotations

from typing import Optional, Sequence

from floe.errors import ModelNotFoundError
from floe.frontend.service import EmbedService
from floe.kinds import ROUTE_KINDS


class ServedModels:
    """The services of one front end, the first being the default (``--model``'s first value)."""

    def __init__(self, services: Sequence[EmbedService]) -> None:
        if not services:
            raise ValueError("a server serves at least one model")
        self.services = list(services)
        self.default = self.services[0]
        self._by_name: dict[str, EmbedService] = {}
        for service in self.services:
            for name in service.limits.served_names:
                self._by_name.setdefault(name, service)

    @property
    def names(self) -> list[str]:
        """Every served name, each model's primary name first."""
        out: list[str] = []
        for service in self.services:
            out.extend(n for n in service.limits.served_names if n not in out)
        return out

    def for_request(self, route: str, model: Optional[str]) -> EmbedService:
        """The service that answers a request of ``route`` kind naming ``model``."""
        if model:
            named = self._by_name.get(model)
            if named is not None:
                named.require(route)   # a model of another kind: the 400 naming the right route
                return named
        for service in self.services:
            if route in service.kind.route_kinds:
                return service   # its edge logs an unknown name, or 404s under --strict-model-name
        wanted = ROUTE_KINDS[route][0]
        served = ", ".join(f"{s.model_name} ({s.kind.name})" for s in self.services)
        raise ModelNotFoundError(
            f"this server serves no model for {wanted.routes} (it needs {wanted.title}); it "
            f"serves {served}. Start floe serve with another --model to add one", param="model")

    # -- the public gRPC services' backend (floe/transport/grpc.py EncodeBackend) ----------------

    @property
    def admission(self):
        return self.default.admission   # one for the endpoint: every service holds the same

    @property
    def draining(self) -> bool:
        return self.default.draining

    @property
    def frontends(self) -> int:
        return self.default.frontends

    def ready(self) -> bool:
        return all(s.ready() for s in self.services)

    async def encode(self, request_id: str, texts, tokens, options, model: str = ""):
        return await self.for_request("encode", model).encode(request_id, texts, tokens, options,
                                                              model)

    async def encode_chunked(self, request_id: str, texts, tokens, options, chunk, model: str = ""):
        return await self.for_request("embed", model).encode_chunked(request_id, texts, tokens,
                                                                     options, chunk, model)

    async def rerank(self, request_id: str, query, documents, options, raw_scores: bool,
                     model: str = ""):
        return await self.for_request("score", model).rerank_call(
            request_id, query, documents, options, raw_scores, model)

    async def health(self):
        from floe.proto import floe_pb2

        answers = [await s.health() for s in self.services]
        ready = all(a.ready for a in answers)
        message = "; ".join(f"{s.model_name}: {a.message}" for s, a in zip(self.services, answers)) \
            if len(answers) > 1 else answers[0].message
        return floe_pb2.HealthCheckResponse(healthy=ready, ready=ready, message=message)

    async def replica_info(self):
        from floe.proto import floe_pb2

        infos = [i for s in self.services for i in (await s.replica_info()).replicas]
        return floe_pb2.GetReplicaInfoResponse(
            replicas=infos, n_replicas=len(infos), n_healthy_replicas=sum(i.healthy for i in infos))

    async def abort(self, request_id: str) -> bool:
        found = [await s.abort(request_id) for s in self.services]
        return any(found)
