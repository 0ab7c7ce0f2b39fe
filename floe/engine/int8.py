"""int8 for the OpenVINO engine (``--dtype int8``): post-training quantization with a quality gate.

The converted float32 graph (openvino_engine.py) is quantized once per model with NNCF
(``nncf.quantize``, transformer preset: int8 weights and activations of the linear layers,
SmoothQuant), calibrated on 1,024 paragraphs of the Python standard library's docstrings
(floe/textsets.py: real prose that every install has offline). The feed-forward down-projections
(hidden x 4 -> hidden, the layers whose inputs have the widest range after GELU) stay in the
float precision: on all-MiniLM-L6-v2 quantizing them too cost the top-10 neighbour agreement
0.958 -> 0.942 for a 1.47-1.63x speed-up instead of 1.2-1.28x (docs/benchmarks.md, section 5).

**The gate.** Before the int8 graph is used it is measured against the float32 graph on 2,000
other paragraphs: the cosine of each embedding to its float32 counterpart (mean >= 0.99) and, for
200 of them as queries, the agreement of their 10 nearest neighbours among the 2,000 (>= 0.95).
A model that misses either target is refused with the measured figures, and the verdict is
cached beside the graph, so a later start refuses at once instead of quantizing again.

Cache: ``<converted graph's folder>/int8/`` holds ``model.xml``/``.bin`` and ``quality.json``,
written under the converted graph's lock like the graph itself.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Any, Iterator

import numpy as np

from floe.errors import ConfigError
from floe.kinds import kind_of
from floe.models.spec import ModelSpec

log = logging.getLogger(__name__)

MIN_MEAN_COSINE = 0.99
MIN_TOP10_OVERLAP = 0.95
CALIBRATION_TEXTS = 1024
EVAL_TEXTS = 2000
EVAL_QUERIES = 200
_BATCH = 16
GATE_FORMAT = 1   # bump when the recipe or the gate changes: cached verdicts are then redone


class Int8Refused(ConfigError):
    """int8 misses the quality targets for this model (or cannot be built here)."""


def down_projections(model: Any, hidden: int) -> list[str]:
    """Names of the MatMuls that project a wider input back to ``hidden`` (the feed-forward
    down-projections of every layer, whatever the architecture calls them)."""
    names = []
    for op in model.get_ops():
        if op.get_type_name() != "MatMul":
            continue
        weight = op.input(1).get_partial_shape()
        if not weight.is_static or len(weight) != 2:
            continue
        rows, cols = (int(d.get_length()) for d in weight)
        transpose_b = bool(op.get_attributes().get("transpose_b", False))
        out_f, in_f = (rows, cols) if transpose_b else (cols, rows)
        if out_f == hidden and in_f > hidden:
            names.append(op.get_friendly_name())
    return names


def gate(mean_cosine: float, top10_overlap: float) -> bool:
    return mean_cosine >= MIN_MEAN_COSINE and top10_overlap >= MIN_TOP10_OVERLAP


def neighbour_overlap(reference: np.ndarray, candidate: np.ndarray, queries: np.ndarray,
                      k: int = 10) -> float:
    """Mean share of each query's k nearest neighbours (by cosine, itself excluded) that the
    candidate embeddings agree on with the reference ones."""
    def top(e: np.ndarray) -> np.ndarray:
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        s = e[queries] @ e.T
        s[np.arange(len(queries)), queries] = -np.inf
        return np.argsort(-s, axis=1, kind="stable")[:, :k]
    a, b = top(reference), top(candidate)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)]))


def _feeds(spec: ModelSpec, texts: list[str]) -> Iterator[dict[str, np.ndarray]]:
    from floe.engine.base import right_pad
    from floe.protocol import EncodeOptions
    from floe.tokenize import Tokenizer

    tok = Tokenizer(spec)
    for i in range(0, len(texts), _BATCH):
        batch = tok.encode(texts[i:i + _BATCH], EncodeOptions())
        off = batch.offsets()
        p = right_pad(spec, [batch.ids[off[j]:off[j + 1]] for j in range(batch.n)])
        yield {"input_ids": p.input_ids, "attention_mask": p.attention_mask}


def _embed(core: Any, model: Any, feeds: list, config: dict) -> np.ndarray:
    request = core.compile_model(model, "CPU", config).create_infer_request()
    return np.concatenate([np.array(request.infer(f)[0], dtype=np.float32) for f in feeds])


def quantized_model(core: Any, spec: ModelSpec, model_dir: str, config: dict) -> str:
    """The int8 graph's model.xml for the converted graph in ``model_dir``: cached, or built
    and measured now (the caller holds the converted graph's lock). Raises Int8Refused."""
    folder = os.path.join(model_dir, "int8")
    report = _read_report(folder)
    if report is None:
        report = _build(core, spec, model_dir, folder, config)
    if not report["passed"]:
        raise Int8Refused(
            f"--dtype int8 is refused for {spec.name}: quantized, it embeds real prose at mean "
            f"cosine {report['mean_cosine']:.4f} to float32 (min {report['min_cosine']:.4f}) and "
            f"agrees on {report['top10_overlap']:.3f} of the 10 nearest neighbours; floe serves "
            f"int8 only at >= {MIN_MEAN_COSINE} and >= {MIN_TOP10_OVERLAP}. Use --dtype bfloat16 "
            f"(or auto). Measured once and cached in {folder}")
    return os.path.join(folder, "model.xml")


def read_quality(model_dir: str) -> dict | None:
    """The cached verdict (for `floe info` and /info), or None."""
    return _read_report(os.path.join(model_dir, "int8"))


def _read_report(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, "quality.json"), encoding="utf-8") as f:
            report = json.load(f)
    except (OSError, ValueError):
        return None
    if report.get("format") != GATE_FORMAT:
        return None
    if report["passed"] and not os.path.isfile(os.path.join(folder, "model.xml")):
        return None
    return report


def _build(core: Any, spec: ModelSpec, model_dir: str, folder: str, config: dict) -> dict:
    kind = kind_of(spec)
    if not kind.int8_model_types:
        raise Int8Refused(f"--dtype int8 is measured for embedding models only; {spec.name} is "
                          f"{kind.title}: use --dtype bfloat16 or auto")
    try:
        import nncf
    except ImportError:
        raise Int8Refused("--dtype int8 needs NNCF: pip install 'floe[int8]' (or nncf)") from None
    import openvino as ov

    from floe.textsets import stdlib_paragraphs

    log.info("quantizing %s to int8 (first start with --dtype int8: calibration and a quality "
             "check, about a minute)", spec.name)
    fp32 = core.read_model(os.path.join(model_dir, "model.xml"))
    paragraphs = stdlib_paragraphs(CALIBRATION_TEXTS + EVAL_TEXTS)
    if len(paragraphs) < CALIBRATION_TEXTS + EVAL_TEXTS:
        raise Int8Refused("--dtype int8: this Python install has too few standard-library "
                          "docstrings to calibrate on")
    calibration = list(_feeds(spec, paragraphs[:CALIBRATION_TEXTS]))
    kept = down_projections(fp32, spec.hidden_size)
    quantized = nncf.quantize(
        fp32, nncf.Dataset(calibration), model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(calibration),
        ignored_scope=nncf.IgnoredScope(names=kept, validate=False))
    evaluation = list(_feeds(spec, paragraphs[CALIBRATION_TEXTS:]))
    want = _embed(core, fp32, evaluation, {**config, "INFERENCE_PRECISION_HINT": "f32"})
    got = _embed(core, quantized, evaluation, config)
    cos = (got * want).sum(1) / np.maximum(
        np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1), 1e-30)
    queries = np.linspace(0, len(want) - 1, EVAL_QUERIES).astype(int)
    overlap = neighbour_overlap(want, got, queries)
    report = {"format": GATE_FORMAT, "model": spec.name, "mean_cosine": float(cos.mean()),
              "min_cosine": float(cos.min()), "top10_overlap": overlap,
              "eval_texts": len(want), "calibration_texts": CALIBRATION_TEXTS,
              "kept_float": len(kept), "passed": gate(float(cos.mean()), overlap)}
    log.info("int8 %s: mean cosine %.4f (min %.4f), top-10 overlap %.3f: %s", spec.name,
             report["mean_cosine"], report["min_cosine"], overlap,
             "served" if report["passed"] else "refused")
    tmp = tempfile.mkdtemp(prefix=".int8.", dir=model_dir)
    try:
        if report["passed"]:
            ov.save_model(quantized, os.path.join(tmp, "model.xml"), compress_to_fp16=False)
        with open(os.path.join(tmp, "quality.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report
