"""Facts about published model families that their folders do not declare.

sentence-transformers folders carry no Matryoshka dimensions: the published models list them in
their model cards. floe reads an explicit ``"matryoshka_dims"`` list from
config_sentence_transformers.json first; for the models below it falls back to the dimensions
their cards document, so `floe info`, /info and GetReplicaInfo show them for an unmodified
download. A folder is recognised by its hub id (``--model google/embeddinggemma-300m``), by a
local folder named like the repository (``.../embeddinggemma-300m``) or by the hub cache layout
(``models--google--embeddinggemma-300m``), and only when its backbone type and output dimension
match, so a fine-tune with another shape under the same name is not mislabelled.

No torch here: the front end reads this through load_spec.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class KnownModel:
    hub_id: str                       # "org/name" as on the hub
    model_type: str                   # config.json model_type the published weights have
    dim: int                          # output dimension after the Dense layers
    matryoshka_dims: tuple[int, ...]  # from the model card, largest first


KNOWN_MODELS: tuple[KnownModel, ...] = (
    KnownModel("google/embeddinggemma-300m", "gemma3_text", 768, (512, 256, 128)),
    KnownModel("Snowflake/snowflake-arctic-embed-m-v1.5", "bert", 768, (256,)),
    KnownModel("Snowflake/snowflake-arctic-embed-l-v2.0", "xlm-roberta", 1024, (256,)),
    KnownModel("nomic-ai/modernbert-embed-base", "modernbert", 768, (256,)),
)


def _names_of(model: str, path: str) -> set[str]:
    """Lower-cased hub ids / repository names a model argument and its resolved folder stand for."""
    names = {model.strip().lower()}
    for part in os.path.normpath(path).split(os.sep):
        part = part.lower()
        if part.startswith("models--"):  # hub cache: models--org--name/snapshots/<rev>
            names.add(part[len("models--"):].replace("--", "/"))
        names.add(part)
    return names


def find_known_model(model: str, path: str, model_type: str, dim: int) -> KnownModel | None:
    """The published model ``model``/``path`` is a copy of, if floe knows it; else None."""
    names = _names_of(model, path)
    for known in KNOWN_MODELS:
        hub = known.hub_id.lower()
        if (hub in names or hub.split("/", 1)[1] in names) and \
                known.model_type == model_type and known.dim == dim:
            return known
    return None
