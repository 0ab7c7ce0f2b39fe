"""``floe info``: what a model folder declares and how floe would run it, without loading weights."""

from __future__ import annotations

from typing import Any

from floe.models.spec import ModelSpec


def describe(spec: ModelSpec, device: str = "auto", dtype: str = "auto") -> dict[str, Any]:
    """A JSON-ready summary of ``spec`` plus the device and dtype ``create_engine`` would pick.

    Picking the device imports torch (to ask for CUDA) but never loads the model. A device/dtype
    request that cannot be honoured is reported under "device_error" instead of raising, so that
    `floe info` still shows the rest.
    """
    out: dict[str, Any] = {
        "name": spec.name,
        "path": spec.path,
        "architecture": spec.architecture,
        "model_type": spec.model_type,
        "sentence_transformers": spec.is_sentence_transformers,
        "pooling": spec.pooling,
        "hidden_size": spec.hidden_size,
        "dim": spec.dim,
        "max_seq_length": spec.max_seq_length,
        "vocab_size": spec.vocab_size,
        "prompts": dict(spec.prompts),
        "default_prompt_name": spec.default_prompt_name,
        "matryoshka_dims": list(spec.matryoshka_dims),
        "normalize": spec.normalize,
        "similarity_fn": spec.similarity_fn,
        "lowercase": spec.do_lower_case,
        "dense": [{"in_features": d.in_features, "out_features": d.out_features, "bias": d.bias,
                   "activation": d.activation.rsplit(".", 1)[-1], "residual": d.use_residual}
                  for d in spec.dense],
        "float16_refused": spec.refuse_float16,
        "notices": list(spec.notices),
    }
    from floe.errors import ConfigError
    from floe.engine.torch_engine import pick_device_and_dtype

    try:
        out["device"], out["dtype"] = pick_device_and_dtype(device, dtype, spec)
    except ConfigError as exc:
        out["device"], out["dtype"] = device, dtype
        out["device_error"] = str(exc)
    return out
