"""int8 for the OpenVINO engine (``--dtype int8``): post-training quantization with a quality gate.

The converted float32 graph (openvino_convert.py) is quantized once per model with NNCF
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
from typing import Any, Iterator, Optional

import numpy as np

from floe.engine.window import Window
from floe.errors import ConfigError
from floe.kinds import kind_of
from floe.models.spec import ModelSpec
from floe.protocol import EncodeOptions

log = logging.getLogger(__name__)

MIN_MEAN_COSINE = 0.99
MIN_TOP10_OVERLAP = 0.95
CALIBRATION_TEXTS = 1024
EVAL_TEXTS = 2000
EVAL_QUERIES = 200
LONG_CALIBRATION = 32   # a sliding-window model's banded graph: documents past its key span
LONG_EVAL = 48
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


def pooling_matmuls(model: Any) -> list[str]:
    """Names of the MatMuls that pool token states into rows ((n, 1, length) 0/1 weights @ the
    hidden states: floe/kinds/embed.py pool as a matmul): they stay in float, as the element-wise
    pooling they replace did."""
    names = []
    for op in model.get_ops():
        if op.get_type_name() != "MatMul":
            continue
        weights = op.input(0).get_partial_shape()
        if len(weights) == 3 and weights[1].is_static and weights[1].get_length() == 1:
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


def _feeds(spec: ModelSpec, texts: list[str], batch_size: int = _BATCH) -> Iterator[dict[str, np.ndarray]]:
    from floe.engine.base import right_pad
    from floe.tokenize import Tokenizer

    tok = Tokenizer(spec)
    for i in range(0, len(texts), batch_size):
        batch = tok.encode(texts[i:i + batch_size], EncodeOptions())
        off = batch.offsets()
        p = right_pad(spec, [batch.ids[off[j]:off[j + 1]] for j in range(batch.n)])
        yield {"input_ids": p.input_ids, "attention_mask": p.attention_mask}


def _embed(core: Any, model: Any, feeds: list, config: dict) -> np.ndarray:
    request = core.compile_model(model, "CPU", config).create_infer_request()
    return np.concatenate([np.array(request.infer(f)[0], dtype=np.float32) for f in feeds])


def quantized_model(core: Any, spec: ModelSpec, model_dir: str, config: dict,
                    window: Optional[Window] = None) -> tuple[str, Optional[str]]:
    """The int8 graphs' model.xml (and, for a sliding-window model whose inputs can outgrow its
    key span, band.xml) for the converted graphs in ``model_dir``: cached, or built and measured
    now (the caller holds the converted graph's lock). Raises Int8Refused."""
    folder = os.path.join(model_dir, "int8")
    report = _read_report(folder, banded=window is not None)
    if report is None:
        report = _build(core, spec, model_dir, folder, config, window)
    band = report.get("band")
    if not report["passed"]:
        long = (f"; documents longer than its key span ({band['eval_texts']} of "
                f"{band['tokens']} tokens) at mean cosine {band['mean_cosine']:.4f}") if band else ""
        raise Int8Refused(
            f"--dtype int8 is refused for {spec.name}: quantized, it embeds real prose at mean "
            f"cosine {report['mean_cosine']:.4f} to float32 (min {report['min_cosine']:.4f}) and "
            f"agrees on {report['top10_overlap']:.3f} of the 10 nearest neighbours{long}; floe "
            f"serves int8 only at >= {MIN_MEAN_COSINE} and >= {MIN_TOP10_OVERLAP}. Use --dtype "
            f"bfloat16 (or auto). Measured once and cached in {folder}")
    return (os.path.join(folder, "model.xml"),
            os.path.join(folder, "band.xml") if window is not None else None)


def read_quality(model_dir: str) -> dict | None:
    """The cached verdict (for `floe info` and /info), or None."""
    return _read_report(os.path.join(model_dir, "int8"))


def _read_report(folder: str, banded: bool = False) -> dict | None:
    try:
        with open(os.path.join(folder, "quality.json"), encoding="utf-8") as f:
            report = json.load(f)
    except (OSError, ValueError):
        return None
    if report.get("format") != GATE_FORMAT:
        return None
    graphs = ("model.xml", "band.xml") if banded else ("model.xml",)
    if report["passed"] and not all(os.path.isfile(os.path.join(folder, g)) for g in graphs):
        return None
    if banded and "band" not in report:
        return None
    return report


def _long_texts(spec: ModelSpec, paragraphs: list[str], min_tokens: int, count: int) -> list[str]:
    """``count`` documents longer than ``min_tokens`` tokens: consecutive paragraphs joined
    until the text is (the server cuts it at the model's max length, and so will the feed)."""
    from floe.tokenize import Tokenizer

    tok = Tokenizer(spec)
    out: list[str] = []
    parts: list[str] = []
    for para in paragraphs:
        parts.append(para)
        text = "\n\n".join(parts)
        if len(tok.encode([text], EncodeOptions()).ids) > min_tokens:
            out.append(text)
            parts = []
            if len(out) == count:
                break
    return out


def _quantize(nncf: Any, model: Any, calibration: list, kept: list[str]) -> Any:
    return nncf.quantize(
        model, nncf.Dataset(calibration), model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(calibration), ignored_scope=nncf.IgnoredScope(names=kept, validate=False))


def _cosines(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    return (got * want).sum(1) / np.maximum(
        np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1), 1e-30)


def _build(core: Any, spec: ModelSpec, model_dir: str, folder: str, config: dict,
           window: Optional[Window] = None) -> dict:
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
             "check; about a minute for all-MiniLM on 2 cores, more than 25 minutes for a "
             "300M-parameter model)", spec.name)
    fp32 = core.read_model(os.path.join(model_dir, "model.xml"))
    paragraphs = stdlib_paragraphs(CALIBRATION_TEXTS + EVAL_TEXTS)
    if len(paragraphs) < CALIBRATION_TEXTS + EVAL_TEXTS:
        raise Int8Refused("--dtype int8: this Python install has too few standard-library "
                          "docstrings to calibrate on")
    calibration = list(_feeds(spec, paragraphs[:CALIBRATION_TEXTS]))
    kept = down_projections(fp32, spec.hidden_size) + pooling_matmuls(fp32)
    quantized = _quantize(nncf, fp32, calibration, kept)
    evaluation = list(_feeds(spec, paragraphs[CALIBRATION_TEXTS:]))
    f32 = {**config, "INFERENCE_PRECISION_HINT": "f32"}
    want = _embed(core, fp32, evaluation, f32)
    got = _embed(core, quantized, evaluation, config)
    cos = _cosines(got, want)
    queries = np.linspace(0, len(want) - 1, EVAL_QUERIES).astype(int)
    overlap = neighbour_overlap(want, got, queries)
    report = {"format": GATE_FORMAT, "model": spec.name, "mean_cosine": float(cos.mean()),
              "min_cosine": float(cos.min()), "top10_overlap": overlap,
              "eval_texts": len(want), "calibration_texts": CALIBRATION_TEXTS,
              "kept_float": len(kept), "passed": gate(float(cos.mean()), overlap)}
    band = None
    if window is not None:
        # The banded graph (inputs longer than the key span) is quantized and measured on its
        # own inputs: documents of consecutive paragraphs joined past the span. Its gate is the
        # mean cosine (a few dozen long documents are too few for a neighbour test).
        band_fp32 = core.read_model(os.path.join(model_dir, "band.xml"))
        longs = _long_texts(spec, paragraphs, window.span, LONG_CALIBRATION + LONG_EVAL)
        if len(longs) < LONG_CALIBRATION + LONG_EVAL:
            raise Int8Refused("--dtype int8: too few standard-library docstrings to build "
                              f"documents longer than {spec.name}'s key span to calibrate on")
        band = _quantize(nncf, band_fp32, list(_feeds(spec, longs[:LONG_CALIBRATION], 1)),
                         down_projections(band_fp32, spec.hidden_size))
        held = list(_feeds(spec, longs[LONG_CALIBRATION:], 1))
        band_cos = _cosines(_embed(core, band, held, config), _embed(core, band_fp32, held, f32))
        report["band"] = {"mean_cosine": float(band_cos.mean()), "min_cosine": float(band_cos.min()),
                          "eval_texts": len(held), "calibration_texts": LONG_CALIBRATION,
                          "tokens": int(np.mean([f["attention_mask"].sum() for f in held]))}
        report["passed"] = report["passed"] and float(band_cos.mean()) >= MIN_MEAN_COSINE
    log.info("int8 %s: mean cosine %.4f (min %.4f), top-10 overlap %.3f%s: %s", spec.name,
             report["mean_cosine"], report["min_cosine"], overlap,
             f"; past the key span {report['band']['mean_cosine']:.4f}" if band is not None else "",
             "served" if report["passed"] else "refused")
    tmp = tempfile.mkdtemp(prefix=".int8.", dir=model_dir)
    try:
        if report["passed"]:
            ov.save_model(quantized, os.path.join(tmp, "model.xml"), compress_to_fp16=False)
            if band is not None:
                ov.save_model(band, os.path.join(tmp, "band.xml"), compress_to_fp16=False)
        with open(os.path.join(tmp, "quality.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report
