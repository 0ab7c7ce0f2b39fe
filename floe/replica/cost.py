"""The replica's cost model: how long a forward pass of a given shape takes.

A batch of ``count`` sequences padded to ``length`` tokens costs

    seconds = fixed + per_token * count * length + per_token_length * count * length**2
                    + per_token_window * count * length * min(length, span)

``fixed`` is what a pass costs whatever it carries (a call into the engine, a kernel launch,
reading the weights once), ``per_token`` the dense layers (linear in the padded tokens),
``per_token_length`` attention's score matrix on full-attention layers (each token against each
other of its row), and ``per_token_window`` the same on sliding-window layers, where a query
computes at most ``span`` keys: floe's windowed forward (floe/engine/window.py) runs an input
longer than its key span by bands, so those layers grow as n x span, not n^2. Only a model with
such layers has the last term (``span`` > 0). One quadratic term could not fit both sides of the
span: on the embeddinggemma-300m shape (OpenVINO bf16, 1 thread, AMD Zen 4) it predicted up to
11-14% too little just past the span (640-900 tokens) to be right at 2,048 (docs/benchmarks.md
section 9).

It is a pure object: no clock, no engine. ``calibrate`` (below) measures a few real passes at
start-up and the replica core refines the fit from every batch it runs (``observe``). The fit is
a least-squares fit of *relative* error (a 1 ms pass matters as much as a 100 ms one) with
non-negative coefficients, over the calibration passes and a ring of the latest batches.

The admission policy (floe/replica/admission.py) and the tuning policy (floe/replica/tuning.py)
ask it two questions: what one batch costs, and how long a queue of work takes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import platform
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

log = logging.getLogger("floe.cost")

# bumped when the model's form or the calibration's shapes change: older cache files are ignored
# (2: the sliding-window term and its calibration lengths)
COST_FORMAT = 2


@dataclass(frozen=True)
class Coefficients:
    fixed_s: float = 0.0
    per_token_s: float = 0.0
    per_token_length_s: float = 0.0
    per_token_window_s: float = 0.0
    span: int = 0   # keys a query computes at most on a sliding-window layer; 0: no such layer

    def seconds(self, count: float, length: float) -> float:
        tokens = count * length
        return (self.fixed_s + self.per_token_s * tokens + self.per_token_length_s * tokens * length
                + self.per_token_window_s * tokens * min(length, self.span))

    @property
    def known(self) -> bool:
        return (self.fixed_s > 0 or self.per_token_s > 0 or self.per_token_length_s > 0
                or self.per_token_window_s > 0)


def _features(count: np.ndarray, length: np.ndarray, span: int) -> np.ndarray:
    tokens = count * length
    columns = [np.ones_like(tokens), tokens, tokens * length]
    if span > 0:
        columns.append(tokens * np.minimum(length, span))
    return np.stack(columns, axis=1)


def fit(count: Sequence[float], length: Sequence[float], seconds: Sequence[float],
        weights: Optional[Sequence[float]] = None, span: int = 0) -> Coefficients:
    """Non-negative least squares of relative error over observed passes.

    Three coefficients (four with a sliding-window ``span``), so the exact non-negative optimum
    is the best of the subsets of free coefficients whose unconstrained fit is non-negative (no
    solver needed). Where no pass is longer than the span, the two attention terms are the same
    column: a subset with one of them fits as well as both, and the first found (the
    full-attention term) is kept."""
    c = np.asarray(count, dtype=np.float64)
    n = np.asarray(length, dtype=np.float64)
    t = np.asarray(seconds, dtype=np.float64)
    keep = (t > 0) & (c > 0) & (n > 0)
    if not keep.any():
        return Coefficients(span=span)
    c, n, t = c[keep], n[keep], t[keep]
    w = (np.ones_like(t) if weights is None else np.asarray(weights, dtype=np.float64)[keep]) / t
    x = _features(c, n, span) * w[:, None]
    y = t * w
    terms = x.shape[1]
    best, best_err = np.zeros(terms), math.inf
    for k in range(1, terms + 1):
        for cols in itertools.combinations(range(terms), k):
            sub = x[:, cols]
            sol, *_ = np.linalg.lstsq(sub, y, rcond=None)
            if (sol < 0).any():
                continue
            err = float(np.sum((sub @ sol - y) ** 2))
            # a larger subset must fit better by more than rounding: an equal fit keeps fewer terms
            if err < best_err * (1 - 1e-9) - 1e-15:
                best_err = err
                best = np.zeros(terms)
                best[list(cols)] = sol
    return Coefficients(*(float(v) for v in best), span=span)


class CostModel:
    """Predicted forward seconds by batch shape, refined online. Not thread-safe: the replica
    core calls ``observe`` from its finisher thread and reads ``coefficients`` (an immutable
    value, replaced whole) from others."""

    def __init__(self, calibration: Iterable[tuple[int, int, float]] = (), *, recent: int = 256,
                 refit_every: int = 16, span: int = 0) -> None:
        self.span = span   # the sliding-window layers' key span (Coefficients.span); 0: none
        self._calibration = [(float(c), float(n), float(t)) for c, n, t in calibration]
        self._recent: deque = deque(maxlen=recent)
        self.refit_every = refit_every
        self._since_fit = 0
        self.observed = 0
        self.error = 0.0   # moving mean of |observed - predicted| / observed, over recent batches
        self.coefficients = (fit(*zip(*self._calibration), span=span) if self._calibration
                             else Coefficients(span=span))

    @property
    def calibrated(self) -> bool:
        return self.coefficients.known

    def seconds(self, count: float, length: float) -> float:
        """Predicted seconds of one pass of ``count`` sequences padded to ``length``."""
        return self.coefficients.seconds(count, length)

    def observe(self, count: int, length: int, seconds: float) -> None:
        """One batch's measured forward time; the fit is redone every ``refit_every`` batches."""
        if seconds <= 0 or count <= 0 or length <= 0:
            return
        predicted = self.seconds(count, length)
        if predicted > 0:
            self.error += 0.05 * (abs(seconds - predicted) / seconds - self.error)
        self._recent.append((float(count), float(length), float(seconds)))
        self.observed += 1
        self._since_fit += 1
        if self._since_fit >= self.refit_every or not self.calibrated:
            self._since_fit = 0
            self._refit()

    def _refit(self) -> None:
        rows = self._calibration + list(self._recent)
        if not rows:
            return
        # the latest batches say how the machine runs now (another tenant, a thermal limit): they
        # weigh more than the start-up passes, which still anchor shapes the traffic lacks
        weights = [1.0] * len(self._calibration) + [2.0] * len(self._recent)
        self.coefficients = fit(*zip(*rows), weights=weights, span=self.span)

    def drain_seconds(self, tokens: int, sequences: int, budget: int, max_batch_size: int,
                      fill: float) -> float:
        """Predicted seconds to run ``sequences`` queued inputs of ``tokens`` real tokens in all,
        in batches of ``budget`` padded tokens at the measured padding ``fill`` (real / padded)."""
        if sequences <= 0 or tokens <= 0:
            return 0.0
        fill = min(1.0, max(0.05, fill))
        mean_len = tokens / sequences
        padded_len = max(1.0, mean_len / fill)
        per_batch = max(1, min(max_batch_size, int(budget // padded_len)))
        full, rest = divmod(sequences, per_batch)
        total = full * self.seconds(per_batch, padded_len)
        if rest:
            total += self.seconds(rest, padded_len)
        return total

    def summary(self) -> dict:
        c = self.coefficients
        return {"fixed_s": c.fixed_s, "per_token_s": c.per_token_s,
                "per_token_length_s": c.per_token_length_s,
                "per_token_window_s": c.per_token_window_s, "span": c.span,
                "calibrated": self.calibrated,
                "calibration_passes": len(self._calibration), "observed_batches": self.observed,
                "relative_error": self.error}


# --- calibration -------------------------------------------------------------------------------

def calibration_shapes(budget: int, max_len: int, max_batch_size: int,
                       span: int = 0) -> list[tuple[int, int]]:
    """(count, length) pairs spanning what the batcher forms: short and long rows, lone inputs
    and full budgets. Few, so that start-up stays short even for a slow model. With a
    sliding-window ``span`` shorter than the model's inputs, also rows of the span and of twice
    it, so that the fit can tell the windowed layers' attention from the full layers'."""
    wanted = [16, 64, 256, max_len]
    if 0 < span < max_len:
        wanted += [span, 2 * span]
    lengths = sorted({min(max_len, n) for n in wanted})
    shapes = {(1, lengths[0])}
    for n in lengths:
        full = max(1, min(max_batch_size, budget // n))
        shapes.add((full, n))
        if full >= 4:
            shapes.add((max(1, full // 4), n))
    return sorted(shapes, key=lambda s: s[0] * s[1])


def calibrate(run: Callable[[int, int], None], shapes: Sequence[tuple[int, int]],
              repeats: int = 2, clock: Callable[[], float] = time.perf_counter
              ) -> list[tuple[int, int, float]]:
    """Times ``run(count, length)`` for each shape, ``repeats`` times; keeps each shape's fastest
    (the others measured a noisy neighbour, not the model)."""
    out = []
    for count, length in shapes:
        best = math.inf
        for _ in range(repeats):
            t0 = clock()
            run(count, length)
            best = min(best, clock() - t0)
        out.append((count, length, best))
    return out


def engine_runner(engine: Any) -> Callable[[int, int], None]:
    """``run(count, length)`` for a real engine: one forward pass of that shape, through the same
    prepare/forward/finish stages the replica runs."""
    filler = min(1000, max(1, engine.spec.vocab_size - 1))

    def run(count: int, length: int) -> None:
        ids = [np.full(length, filler, dtype=np.int32)] * count
        engine.finish(engine.forward(engine.prepare(ids)))

    return run


def cache_key(engine: Any, budget: int, threads: Optional[int]) -> str:
    """What a calibration depends on: the model, the engine and its precision, the machine."""
    spec = engine.spec
    parts = {
        "format": COST_FORMAT, "model": spec.name, "path": getattr(spec, "path", ""),
        "architecture": spec.architecture, "max_seq_length": spec.max_seq_length,
        "engine": getattr(engine, "backend", type(engine).__name__), "dtype": engine.dtype,
        "device": str(engine.device), "budget": budget, "threads": threads,
        "cpu": _cpu_name(), "cpus": os.cpu_count(), "machine": platform.machine(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def load_or_calibrate(engine: Any, budget: int, max_batch_size: int, cache_dir: Optional[str],
                      threads: Optional[int] = None, span: int = 0) -> CostModel:
    """The engine's cost model: from ``cache_dir/cost/<key>.json`` when this model, engine,
    precision and machine were calibrated before, else measured now and stored there."""
    key = cache_key(engine, budget, threads)
    path = os.path.join(cache_dir, "cost", key + ".json") if cache_dir else None
    if path and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                rows = [tuple(r) for r in json.load(f)["passes"]]
            model = CostModel(rows, span=span)
            log.info("cost model from %s: %s", path, model.summary())
            return model
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("ignoring an unreadable cost model cache %s", path)
    t0 = time.perf_counter()
    shapes = calibration_shapes(budget, engine.spec.max_seq_length, max_batch_size, span)
    rows = calibrate(engine_runner(engine), shapes)
    model = CostModel(rows, span=span)
    log.info("cost model calibrated on %d shapes in %.2f s: %s", len(rows),
             time.perf_counter() - t0, model.summary())
    if path:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"passes": rows, "coefficients": asdict(model.coefficients)}, f)
            os.replace(tmp, path)
        except OSError:
            log.warning("could not store the cost model in %s", path, exc_info=True)
    return model


def for_replica(engine: Any, budget: int, max_batch_size: int, cache_dir: Optional[str],
                threads: Optional[int] = None) -> CostModel:
    """A serving replica's cost model: calibrated (or read from the cache beside the converted
    models) for a real engine; for the fake engine, its simulated costs (test parameters, never
    stored)."""
    if getattr(engine, "backend", "") == "fake":
        # its cost is a formula by construction: the model is that formula, measured by no one
        per_batch = getattr(engine, "seconds_per_batch", 0.0)
        per_token = getattr(engine, "seconds_per_token", 0.0)
        shapes = calibration_shapes(budget, engine.spec.max_seq_length, max_batch_size)
        return CostModel([(c, n, per_batch + per_token * c * n) for c, n in shapes])
    from floe.engine.openvino_convert import default_cache_dir

    return load_or_calibrate(engine, budget, max_batch_size, cache_dir or default_cache_dir(),
                             threads, key_span(engine.spec))


def key_span(spec: Any) -> int:
    """The key span of the model's sliding-window layers (floe/engine/window.py), 0 when it has
    none. A model whose engine runs every layer over all keys anyway (a head of transformers' own)
    still gets the term: the fit then finds its coefficient near zero."""
    from floe.engine.window import window_of

    path = getattr(spec, "backbone_path", None)
    window = window_of(path) if path else None
    return window.span if window is not None else 0
