"""The OpenVINO engine's packed graph: several inputs per row (floe/engine/packing.py).

(input_ids, position_ids, segments, pool_tokens, pool_scale) -> (rows, slots, dim): the backbone
with a block-diagonal attention mask built in the graph from the segment numbers, positions given
per input (plus a RoBERTa-like's offset), pooling as the 0/1 token weights times the hidden states
in one batched matmul, scaled in float32, then the model's Dense layers. It is traced from the
same torch backbone and tailoring as the padded graph (openvino_convert.tailored).

Which models: an embedding model (the plain head: CLS, last-token, mean or mean / sqrt(length)
pooling, then Dense) on a BERT-family encoder (``bert``, ``roberta``, ``xlm-roberta``: their
attention takes a 4-D mask and their embeddings take position ids), without a sliding window.
Before it is traced, the torch pipeline's packed rows are compared with the same inputs run
alone through the padded forward (float32): a transformers release that ignored the 4-D mask or
the position ids would fail that check, and the engine then runs padded batches only.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from floe.engine.packing import (ALIGN, BERT_FAMILIES, POOLINGS, Packer, PackedFeed,
                                 packed_feed, width_for)
from floe.kinds import kind_of
from floe.models.spec import ModelSpec

INPUTS = ("input_ids", "position_ids", "segments", "pool_tokens", "pool_scale")
_ROBERTA_LIKE = ("roberta", "xlm-roberta")


def packable(spec: ModelSpec) -> Optional[str]:
    """Why ``spec`` cannot run packed batches, or None when it can."""
    kind = kind_of(spec)
    if not kind.pools_rows:
        return f"{kind.title}'s head does not pool a row per input"
    if spec.model_type not in BERT_FAMILIES:
        return f"{spec.model_type} is not a BERT-family encoder"
    if spec.pooling not in POOLINGS:
        return f"{spec.pooling} pooling"
    return None


def refusal(spec: ModelSpec, dtype: str) -> Optional[str]:
    """Why the OpenVINO engine would not pack ``spec``'s batches at ``dtype`` (None: it would)."""
    from floe.engine.openvino_convert import band_window

    why = packable(spec)
    if why is None and band_window(spec) is not None:
        why = "a sliding-window model"
    if why is None and dtype == "int8":
        why = "int8 quantizes the padded graph only"
    return why


def state(spec: ModelSpec, dtype: str, cache_dir: Optional[str] = None) -> str:
    """What ``--packing`` (the default) does for ``spec`` on the OpenVINO engine, for `floe info`."""
    import os

    from floe.engine.openvino_convert import cache_key, openvino_dir, read_failure
    from floe.engine.openvino_engine import pick_precision

    why = refusal(spec, pick_precision(dtype) if dtype == "auto" else dtype)
    if why is not None:
        return f"no: {why}"
    root, key = openvino_dir(cache_dir), cache_key(spec, packed=True)
    failed = read_failure(root, key)
    if failed is not None:
        return f"no: the packed graph failed ({failed}; delete {root}/{key}.failed to retry)"
    if os.path.isfile(os.path.join(root, key, "model.xml")):
        return f"yes: packed graph cached in {os.path.join(root, key)}"
    return f"yes: packed graph converted at first start into {os.path.join(root, key)}"


def example(spec: ModelSpec, lengths: list[int], seed: int) -> tuple[list[np.ndarray], PackedFeed]:
    """Random in-vocabulary inputs of ``lengths``, packed in that order (several per row, padding
    at the rows' ends)."""
    rng = np.random.default_rng(seed)
    low = min(5, spec.vocab_size - 1)
    seqs = [rng.integers(low, spec.vocab_size, n).astype(np.int32) for n in lengths]
    packer = Packer(width_for(max(lengths), ALIGN))
    for i, n in enumerate(lengths):
        packer.add(n, i)
    return seqs, packed_feed(seqs, packer.rows, packer.width, spec.pooling, spec.pad_token_id)


def _lengths(spec: ModelSpec, seed: int) -> list[int]:
    cap = max(4, min(spec.max_seq_length, 48 - 8 * seed))
    return [cap - 3, 3, 9, cap // 2, cap // 2 - 1, 2, 1][: 7 - seed]


def convert(spec: ModelSpec, threads: Optional[int]) -> tuple[Any, tuple[dict, np.ndarray, np.ndarray]]:
    """The packed pipeline converted to an ov.Model, and a probe: (feed, torch float32 rows of
    the real inputs, where they are in the output)."""
    import openvino as ov
    import torch

    from floe.engine.openvino_convert import (ConversionError, source_engine, source_module,
                                              tailored, traced)
    from floe.engine.torch_engine import TorchEngine

    why = packable(spec)
    if why is not None:
        raise ConversionError(f"no packed graph: {why}")

    def make_source() -> TorchEngine:
        return source_engine(spec, threads)

    class PackedPipeline(source_module()):
        def __init__(self, source: TorchEngine) -> None:
            super().__init__(source)
            embeddings = getattr(source.model, "embeddings", None)
            # RoBERTa-likes number positions from their pad id + 1 (transformers' own rule)
            self.offset = (int(getattr(embeddings, "padding_idx", spec.pad_token_id)) + 1
                           if spec.model_type in _ROBERTA_LIKE else 0)

        def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                    segments: torch.Tensor, pool_tokens: torch.Tensor,
                    pool_scale: torch.Tensor) -> torch.Tensor:
            source = self.source
            # a token sees its own input's tokens; padding (segment 0) sees padding
            mask = (segments[:, :, None] == segments[:, None, :])[:, None]
            kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask,
                                      "position_ids": position_ids + self.offset}
            if source._takes_token_types:
                kwargs["token_type_ids"] = torch.zeros_like(input_ids)
            hidden = self.backbone(**kwargs).last_hidden_state
            summed = torch.matmul(pool_tokens.to(hidden.dtype), hidden).float()
            pooled = (summed * pool_scale.unsqueeze(-1)).to(hidden.dtype)
            for layer in source._dense:
                pooled = layer(pooled)
            return pooled.float()

    seqs, probe = example(spec, _lengths(spec, 1), seed=1)
    # packed rows equal each input alone (float32, untouched model) before anything is traced
    source = make_source()
    alone = source.run(source.prepare(seqs))
    with torch.no_grad():
        out = PackedPipeline(source)(**{k: torch.from_numpy(v) for k, v in probe.inputs.items()})
    packed = out.reshape(-1, out.shape[-1]).numpy()[probe.where]
    scale = max(float(np.abs(alone).max()), 1e-6)
    if not np.isfinite(packed).all() or float(np.abs(packed - alone).max()) > 1e-4 * scale:
        raise ConversionError("packed rows differ from the same inputs run alone (max |diff| "
                              f"{float(np.nan_to_num(np.abs(packed - alone)).max()):.3g}): this "
                              "transformers release does not honour the 4-D mask or position ids")
    del source
    pipeline, want = tailored(make_source, lambda s: PackedPipeline(s).eval(), probe.inputs)
    _, traced_example = example(spec, _lengths(spec, 0), seed=0)
    model, _ = traced(pipeline, traced_example.inputs, probe.inputs)
    # (a traced input may carry more than one tensor name: its own and an internal one)
    ports = {name: port for port in model.inputs for name in port.get_names() if name in INPUTS}
    if sorted(ports) != sorted(INPUTS) or len(model.inputs) != len(INPUTS):
        raise ConversionError(f"the packed graph has inputs "
                              f"{[sorted(p.get_names()) for p in model.inputs]}, expected {list(INPUTS)}")
    model.reshape({ports[name]: ov.PartialShape([-1] * (3 if name == "pool_tokens" else 2))
                   for name in INPUTS})
    del pipeline
    rows = want.reshape(-1, want.shape[-1])[probe.where]
    return model, (probe.inputs, rows, probe.where)
