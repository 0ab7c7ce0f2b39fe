"""What every request kind answers, layer by layer (floe/kinds/__init__.py has the map).

The defaults are a dense kind's: one float32 row of ``spec.dim`` values per output row, kept in a
preallocated array by the replica. A kind overrides what differs. No torch at import time: the
engine hooks import it when called, in an engine's process.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from floe.protocol import EmbedResult, EncodeOptions, Timings


class Kind:
    # --- what it is ---------------------------------------------------------------------------
    name: str = ""                 # the ModelSpec.task value that selects it
    title: str = ""                # "an embedding model", in messages
    routes: str = ""               # the routes that answer it, in messages
    route_kinds: tuple[str, ...] = ()   # the front end's route kinds it answers
    pairs: bool = False            # inputs are (query, document) pairs with token types
    keeps_sparse_rows: bool = False   # rows over the vocabulary, kept as their non-zero entries
    output_dtypes: tuple[str, ...] = ("float32",)   # what a client may ask for

    # --- front end ----------------------------------------------------------------------------

    def request_options(self, options: EncodeOptions) -> EncodeOptions:
        """The options a request of this kind runs with, refusing (400) what it cannot honour.
        Called once, at the edge, before anything is tokenized."""
        return options

    def describe(self, spec: Any) -> dict:
        """What ``floe info`` and /info add about a model of this kind."""
        return {}

    # --- replica: the rows of one request -------------------------------------------------------

    def new_rows(self, spec: Any, n_rows: int) -> Any:
        """Storage for one request's output rows, filled batch by batch by the finisher."""
        return np.empty((n_rows, spec.dim), dtype=np.float32)

    def batch_rows(self, spec: Any, out: np.ndarray) -> Any:
        """Once per batch, before its rows are stored: whatever ``store`` reads (the batch's
        output by default)."""
        return out

    def store(self, spec: Any, rows: Any, batch: Any, a: int, b: int, at: int) -> None:
        """Stores the batch's output rows [a, b) as the request's rows from ``at``."""
        rows[at: at + (b - a)] = batch[a:b]

    def finish(self, spec: Any, rows: Any, options: EncodeOptions, token_counts: np.ndarray,
               request_id: str, timings: Timings) -> EmbedResult:
        """The request's answer from its rows, once the last one is stored: the per-request
        steps (Normalize, Matryoshka, output dtype for embeddings), in the finisher thread."""
        return EmbedResult.from_array(rows, "float32", token_counts, model=spec.name,
                                      request_id=request_id, timings=timings)

    # --- engine ---------------------------------------------------------------------------------
    auto_class: str = "AutoModel"  # the transformers class of the backbone with its head
    model_output: str = "last_hidden_state"   # the output the head reads
    pools_rows: bool = False       # the head pools token states into a row per input, then
                                   # Dense: inputs can share a packed row (floe/engine/packing.py)
    openvino_model_types: frozenset = frozenset()   # config model_types whose OpenVINO
                                                    # conversion is verified for this kind
    int8_model_types: frozenset = frozenset()   # those whose --dtype int8 is measured for
                                                # this kind (floe/engine/int8.py's gate)

    def graph_key(self, spec: Any) -> Optional[dict]:
        """What the converted OpenVINO graph's cache key holds about the head (None: nothing,
        the embedding head's keys predate the other kinds and stay as they were)."""
        return {"task": self.name, "num_labels": spec.num_labels,
                "splade": [spec.splade_pooling, spec.splade_activation]}

    def torch_head(self, engine: Any, out: Any, prepared: Any) -> Any:
        """The head on the backbone's output, in torch, on the engine's device: (n, spec.dim)."""
        raise NotImplementedError

    def probe_error(self, got: np.ndarray, want: np.ndarray, float_dtype: str) -> Optional[str]:
        """Why a converted graph's probe rows differ too much from torch's (None: they agree).
        Default: a cosine per row, 0.9999 in float32, 0.999 in bfloat16."""
        norms = np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1)
        cos = (got * want).sum(1) / np.maximum(norms, 1e-30)
        limit = 0.9999 if float_dtype == "float32" else 0.999
        if not np.isfinite(got).all() or cos.min() < limit:
            return f"cosine {float(np.nan_to_num(cos).min()):.6f} < {limit}"
        return None

    def summary(self, spec: Any) -> str:
        """The head in a few words, for log lines."""
        return self.name

    def __repr__(self) -> str:
        return f"<kind {self.name}>"
