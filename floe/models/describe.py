"""``floe info``: what a model folder declares and how floe would run it, without loading weights."""

from __future__ import annotations

from typing import Any, Optional

from floe.kinds import kind_of
from floe.models.spec import ModelSpec


def describe(spec: ModelSpec, device: str = "auto", dtype: str = "auto", engine: str = "auto",
             engine_cache_dir: Optional[str] = None,
             native_attention: bool = True) -> dict[str, Any]:
    """A JSON-ready summary of ``spec`` plus the engine, device and dtype ``create_engine`` would
    pick, and why that engine ("engine_reason"); for OpenVINO also whether the converted graph is
    already cached, and a recorded conversion failure (the replica then runs torch).

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
        "task": spec.task,
        "token_types": spec.uses_token_types,
    }
    out.update(kind_of(spec).describe(spec))
    from floe.errors import ConfigError
    from floe.engine.torch_engine import pick_device_and_dtype

    from floe.engine.choice import choose_engine

    try:
        choice = choose_engine(engine, spec, device, dtype)
        out["engine"], out["engine_reason"] = choice.kind, choice.reason
    except ConfigError as exc:
        out["engine"], out["engine_reason"] = engine, f"cannot run: {exc}"
        choice = None
    if choice is not None and choice.kind == "openvino":
        from floe.engine.openvino_convert import cached_state

        state, detail = cached_state(spec, engine_cache_dir)
        if state == "failed":
            out["engine"] = "torch"
            out["engine_reason"] = f"OpenVINO conversion failed ({detail}); falling back to torch"
        else:
            out["engine_cache"] = (f"converted graph cached in {detail}" if state == "converted"
                                   else f"converted at first start into {detail}")
        from floe.engine import packed_graph

        out["packing"] = packed_graph.state(spec, dtype, engine_cache_dir)
        from floe.engine import native

        out["attention"] = native.state(spec, dtype, engine_cache_dir, native_attention)
        if dtype == "int8":
            from floe.engine import int8

            verdict = int8.read_quality(detail) if state == "converted" else None
            out["device"], out["dtype"] = "cpu", "int8"
            out["int8"] = verdict or "quantized and measured at first start (engine/int8.py)"
            return out
    if choice is not None and choice.kind == "fake":
        out["device"], out["dtype"] = "cpu", "float32"
        return out
    try:
        out["device"], out["dtype"] = pick_device_and_dtype(device, dtype, spec)
    except ConfigError as exc:
        out["device"], out["dtype"] = device, dtype
        out["device_error"] = str(exc)
    return out
