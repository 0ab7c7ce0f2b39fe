"""Request kinds: what a model answers, one object per kind, asked instead of branching on a name.

A served model has one kind (its ``ModelSpec.task``, read from its folder): ``embed`` (dense
embeddings: floe/kinds/embed.py), ``score`` (a cross-encoder's relevance scores:
floe/kinds/score.py) or ``sparse`` (SPLADE vectors: floe/kinds/sparse.py). The layers ask the kind
(floe/kinds/base.py lists what each answers):

    front end   which routes it answers, its request options, its pairs, what /info shows
                (floe/frontend/service.py, floe/frontend/models.py, floe/validate.py)
    replica     how a request's output rows are kept and finished (floe/replica/core.py)
    engine      the transformers class of the backbone and its head, which OpenVINO conversions
                are verified, how a converted graph is checked (floe/engine/)

Chunked and late-chunked embeddings are requests of the embed kind with a ChunkOptions
(floe/chunking.py): the kind's rows are one per chunk, pooled by span in the engine. Adding a kind
is one module here, registered below, plus its head where the engine builds it.

Nothing here imports torch: the front end imports this package, the engines import torch
themselves.
"""

from __future__ import annotations

from floe.kinds.base import Kind
from floe.kinds.embed import EMBED
from floe.kinds.score import SCORE
from floe.kinds.sparse import SPARSE

KINDS: dict[str, Kind] = {k.name: k for k in (EMBED, SCORE, SPARSE)}

# The route kinds of the front end, and the kinds that answer each, in the order a default model
# is looked for: gRPC Encode ("encode") serves embedding and sparse models alike.
ROUTE_KINDS: dict[str, tuple[Kind, ...]] = {
    route: tuple(k for k in KINDS.values() if route in k.route_kinds)
    for route in ("embed", "score", "sparse", "encode")}


def kind_of(spec) -> Kind:
    """The kind of the model ``spec`` describes."""
    return KINDS[spec.task]


__all__ = ["KINDS", "Kind", "ROUTE_KINDS", "kind_of"]
