"""The OpenVINO engine: the model converted once to an OpenVINO graph, run on the CPU.

Conversion builds the same torch pipeline the torch engine runs (the backbone and the task's
head: pooling and Dense, a cross-encoder's logits, or SPLADE pooling: ``TorchEngine``'s own code,
in float32) and hands it to ``openvino.convert_model`` with dynamic batch and sequence dimensions.
The head is part of the graph, so a forward pass returns (n, dim) rather than (n, length, hidden):
less to copy out, and the pooling runs in the same optimised graph. The inputs are ``input_ids``
and ``attention_mask`` (int64, right padded), plus ``token_type_ids`` for a cross-encoder whose
backbone has token types (``_graph_inputs``); whatever else an architecture needs (all-zero token
types for single texts, position ids) is derived inside the graph.

Before it is used, a fresh conversion is checked against the torch pipeline on a padded probe
batch of other shapes than the one traced, so a conversion that baked in a shape or dropped the
mask is refused instead of served (``ConversionError``; ``create_engine`` then falls back to
torch). The check is a cosine for embeddings and SPLADE rows and an absolute + relative tolerance
for a cross-encoder's logits (a cosine of 1-wide rows only compares signs).

The converted graph is cached on disk (``openvino.save_model``: XML + BIN, float32 weights) under
``<cache dir>/openvino/<key>/``, the key hashing the model folder's files (names, sizes, mtimes),
the pipeline options (task and head, pooling, Dense), and the OpenVINO, transformers and torch versions. It is
written to a temporary folder and renamed into place, under a per-key file lock, so replicas that
start together convert once and never read a half-written model. A start that finds the cache
imports neither torch nor transformers. The compiled form (precision- and thread-specific) is
cached by OpenVINO itself in ``<cache dir>/openvino/compiled``.

Second graphs, each converted on first use, checked on a probe and cached under a key of its
own: late chunking's (span weights as a third input), a sliding-window model's banded one, and
for a BERT-family embedding model with ``packing`` the packed one, several inputs per row
(floe/engine/packed_graph.py; ``prepare`` packs a batch where that is smaller than padding it).

Precision: the ``INFERENCE_PRECISION_HINT`` is bf16 on CPUs with AMX or avx512_bf16 (read from
/proc/cpuinfo flags) and f32 elsewhere or when float32 is asked.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import threading
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from floe.engine import packed_graph, packing
from floe.engine.base import Engine, Padded, head_summary, right_pad, span_rows, span_weights
from floe.engine.hardware import cpu_has_fast_bf16
from floe.engine.window import Window, window_of
from floe.errors import ConfigError
from floe.kinds import kind_of
from floe.models.spec import ModelSpec
from floe.resolve import core_count

log = logging.getLogger(__name__)

CACHE_FORMAT = 3          # bump when the graph floe builds changes (2: _tailored, 3: aligned keys)
ENV_CACHE_DIR = "FLOE_ENGINE_CACHE_DIR"
_INPUTS = ("input_ids", "attention_mask")
_TYPE_INPUT = "token_type_ids"
_SPAN_INPUT = "span_weights"
_SPAN_ROWS = "span_rows"   # (not a graph input) which rows of the span graph's output are real
_PACKED_WHERE = "packed_where"  # (not a graph input) each input's row of the packed output
_PRECISION = {"bfloat16": "bf16", "float32": "f32"}


def _graph_inputs(spec: ModelSpec) -> tuple[str, ...]:
    """The converted graph's inputs: token types only where they can differ from all-zero, in a
    cross-encoder's (query, document) pairs (an embedding graph keeps its two inputs)."""
    return _INPUTS + ((_TYPE_INPUT,) if kind_of(spec).pairs and spec.uses_token_types else ())


class ConversionError(RuntimeError):
    """The model could not be converted to OpenVINO, or the result differs from the torch model."""


# --- where and under which key ------------------------------------------------------------------

def default_cache_dir(env: Optional[dict[str, str]] = None) -> str:
    """$FLOE_ENGINE_CACHE_DIR, else $XDG_CACHE_HOME/floe, else ~/.cache/floe."""
    env = os.environ if env is None else env
    if env.get(ENV_CACHE_DIR):
        return env[ENV_CACHE_DIR]
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "floe")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _folder_files(spec: ModelSpec) -> list[tuple[str, int, int]]:
    """(path relative to the model folder, size, mtime_ns) of every file the pipeline reads from."""
    roots = sorted({os.path.realpath(p) for p in (spec.path, spec.backbone_path, *(d.path for d in spec.dense))})
    base = os.path.realpath(spec.path)
    out: set[tuple[str, int, int]] = set()
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                full = os.path.join(dirpath, name)
                try:
                    st = os.stat(full)
                except OSError:
                    continue
                out.add((os.path.relpath(full, base), st.st_size, st.st_mtime_ns))
    return sorted(out)


def cache_key(spec: ModelSpec, versions: Optional[dict[str, str]] = None,
              spans: bool = False, packed: bool = False) -> str:
    """Hex key of the converted graph: model files, pipeline options and library versions.

    The inference precision is not part of it: the graph is stored in float32 and the precision is
    a compile-time hint (OpenVINO's compiled-model cache, keyed by its own hash of the graph and
    the compile options, holds the precision-specific form).
    """
    if versions is None:
        versions = {d: _version(d) for d in ("openvino", "transformers", "torch")}
    parts = {
        "format": CACHE_FORMAT,
        "versions": versions,
        "files": _folder_files(spec),
        "architecture": spec.architecture,
        "pooling": spec.pooling,
        "dense": [[d.in_features, d.out_features, d.bias, d.activation, d.use_residual] for d in spec.dense],
        "pad_token_id": spec.pad_token_id,
    }
    window = window_of(spec.backbone_path)
    if window is not None and _own_forward(spec):  # floe's own forward builds this graph
        parts["window"] = {"radius": window.radius, "block": window.block,
                           "sliding": list(window.sliding), "band_graph": _band_window(spec) is not None,
                           "forward": _forward_digest()}
    elif _rotary(spec):   # a float32 table of rotations (_float32_rotation), as long as this
        parts["rotation"] = {"table": "float32", "positions": spec.max_seq_length}
    head = kind_of(spec).graph_key(spec)
    if head is not None:   # (None for embeddings, whose keys, and caches, stay as they were)
        parts["head"] = {**head, "inputs": list(_graph_inputs(spec))}
    if spans:   # late chunking's graph: token states pooled by span weights, then Dense
        parts["head"] = {"task": "spans", "inputs": [*_INPUTS, _SPAN_INPUT]}
    if packed:  # several inputs per row (floe/engine/packed_graph.py)
        parts["head"] = {"task": "packed", "inputs": list(packed_graph.INPUTS)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def openvino_dir(cache_dir: Optional[str] = None) -> str:
    return os.path.join(cache_dir or default_cache_dir(), "openvino")


def cached_state(spec: ModelSpec, cache_dir: Optional[str] = None) -> tuple[str, str]:
    """("converted" | "failed" | "absent", detail) for ``spec`` in the cache (for `floe info`)."""
    root, key = openvino_dir(cache_dir), cache_key(spec)
    if os.path.isfile(os.path.join(root, key, "model.xml")):
        return "converted", os.path.join(root, key)
    failed = _read_failure(root, key)
    if failed is not None:
        return "failed", failed
    return "absent", os.path.join(root, key)


def _read_failure(root: str, key: str) -> Optional[str]:
    try:
        with open(os.path.join(root, key + ".failed"), encoding="utf-8") as f:
            return f.read().strip() or "conversion failed"
    except OSError:
        return None


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (a process that dies releases it)."""
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --- conversion ---------------------------------------------------------------------------------

def _forward_digest() -> str:
    """Hash of the source of floe's windowed forward (floe/engine/attention.py, window.py): a
    change there changes the graph, so it changes the cache key. Read as text: no torch import."""
    here = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256()
    for name in ("attention.py", "window.py"):
        with open(os.path.join(here, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def _own_forward(spec: ModelSpec) -> bool:
    """The backbone's hidden states feed the head, so a windowed backbone runs floe's own forward
    (floe/engine/attention.py); a head of transformers' own (logits) keeps transformers' forward."""
    return kind_of(spec).model_output == "last_hidden_state"


def _band_window(spec: ModelSpec) -> Optional[Window]:
    """The window of an embedding model whose inputs can outgrow its key span, which therefore
    gets a second, banded graph (floe/engine/window.py); None for every other model."""
    window = window_of(spec.backbone_path) if _own_forward(spec) else None
    return window if window is not None and window.banded(spec.max_seq_length) else None


def _band_lengths(spec: ModelSpec, window: Window) -> tuple[list[int], list[int]]:
    """Row lengths of the banded graph's traced example and probe: all batches wider than the
    key span, of different widths, none a multiple of the block, one row short."""
    cap = spec.max_seq_length
    trace = min(cap, window.span + window.block + 3)
    probe = min(cap, 2 * window.span + 5)
    if probe == trace:
        probe = max(window.span + 1, trace - 1)
    return [trace, max(1, trace - 5)], [probe, 3, window.span + 1]


def _sliding_window(spec: ModelSpec) -> int:
    """The attention window of a model with sliding-window or local layers (0 if it has none)."""
    try:
        with open(os.path.join(spec.backbone_path, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return 0
    config = config.get("text_config", config)
    window = 0
    if "sliding_attention" in (config.get("layer_types") or []):
        window = int(config.get("sliding_window") or 0)
    return max(window, int(config.get("local_attention") or 0))  # ModernBERT's local layers


def _rotary(spec: ModelSpec) -> bool:
    """Whether the backbone rotates its queries and keys (config.json names a rope setting)."""
    try:
        with open(os.path.join(spec.backbone_path, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    config = config.get("text_config", config)
    return any(k in config for k in ("rope_theta", "rope_parameters", "rope_scaling"))


def _float32_rotation(backbone: Any, spec: ModelSpec) -> None:
    """Gives a rotary backbone (Qwen3's) a float32 table of its rotations (attention.py's
    RotaryTable) before it is traced. Its own module computes position x frequency, which the
    graph then runs at the bf16 precision hint: far positions rotate wrong (on the tiny Qwen3 of
    tests/fixtures, cosine to float32 0.993 at 300 tokens, 0.964 at 700). floe's own forward
    (gemma3, ModernBERT) installs its table itself."""
    from floe.engine.attention import RotaryTable

    rotary = getattr(backbone, "rotary_emb", None)
    if rotary is None or isinstance(rotary, RotaryTable) or not _rotary(spec):
        return
    backbone.rotary_emb = RotaryTable(rotary, int(spec.max_seq_length))


def _source(spec: ModelSpec, threads: Optional[int]) -> Any:
    """The torch engine a graph is traced from: float32, the padded forward, rotations from a
    float32 table."""
    from floe.engine.torch_engine import TorchEngine

    source = TorchEngine(spec, device="cpu", dtype="float32", threads=threads, unpad=False)
    _float32_rotation(source.model, spec)
    return source


def _fold_query_scale(backbone: Any) -> int:
    """Folds attention's 1/sqrt(head dim) into the query projection of transformers' BERT-family
    self-attention (a ``query`` Linear and a float ``scaling`` it passes to the attention
    function), which then scales by 1. OpenVINO's CPU plugin otherwise multiplies the keys by
    the scale in a pass of its own (all-MiniLM, 40 x 50 tokens: 0.8% of a forward). Returns how
    many modules it changed; ``_tailored`` checks that the float32 output did not."""
    import torch

    folded = 0
    for module in backbone.modules():
        scaling, query = getattr(module, "scaling", None), getattr(module, "query", None)
        if isinstance(scaling, float) and scaling != 1.0 and isinstance(query, torch.nn.Linear):
            with torch.no_grad():
                query.weight.mul_(scaling)
                if query.bias is not None:
                    query.bias.mul_(scaling)
            module.scaling = 1.0
            folded += 1
    return folded


def _tailored(make_source: Callable[[], Any], pipeline_of: Callable[[Any], Any],
              probe: dict[str, np.ndarray]) -> tuple[Any, np.ndarray]:
    """The pipeline to trace, and its float32 output on ``probe`` before any change: the torch
    engine ``make_source()`` builds, with the query scale folded in, pooling as a matmul
    (floe/kinds/embed.py pool) and the attention's keys padded to whole blocks
    (floe/engine/aligned_keys.py), so the graph runs faster on OpenVINO's CPU plugin. These change
    the graph, not the function: if the tailored pipeline's output on the probe moves by more
    than float32 rounding, a fresh, untouched one is traced instead (and the probe check after
    the conversion compares the graph with the untouched model either way)."""
    import torch

    from floe.engine import aligned_keys

    def run(pipeline: Any) -> np.ndarray:
        with torch.no_grad():
            return pipeline(**{k: torch.from_numpy(v) for k, v in probe.items()}).numpy()

    source = make_source()
    pipeline = pipeline_of(source)
    want = run(pipeline)
    source.matmul_pooling = True
    folded = _fold_query_scale(source.model)
    aligned = aligned_keys.install(source.model)
    got = run(pipeline)
    scale = max(float(np.abs(want).max()), 1e-6)
    if not np.isfinite(got).all() or float(np.abs(got - want).max()) > 1e-4 * scale:
        log.warning("the graph's tailoring (%d query scales folded, pooling as a matmul%s) "
                    "changed the float32 output (%.3g): converting the model unchanged",
                    folded, ", keys aligned" if aligned else "",
                    float(np.nan_to_num(np.abs(got - want)).max()))
        pipeline = pipeline_of(make_source())
    return pipeline, want


def _batch(spec: ModelSpec, lengths: Sequence[int], seed: int) -> dict[str, np.ndarray]:
    """The graph's inputs for right-padded random in-vocabulary ids (and, for a graph that takes
    token types, a random split in each row)."""
    rng = np.random.default_rng(seed)
    low = min(5, spec.vocab_size - 1)
    seqs = [rng.integers(low, spec.vocab_size, n) for n in lengths]
    splits = np.array([rng.integers(1, n + 1) for n in lengths], dtype=np.int64)
    padded = right_pad(spec, seqs, splits if _TYPE_INPUT in _graph_inputs(spec) else None)
    return _feed(padded)


def _feed(padded: Padded) -> dict[str, np.ndarray]:
    feed = {"input_ids": padded.input_ids, "attention_mask": padded.attention_mask}
    if padded.token_type_ids is not None:
        feed[_TYPE_INPUT] = padded.token_type_ids
    return feed


def _trace_lengths(spec: ModelSpec) -> tuple[list[int], list[int]]:
    """Row lengths of the traced example and of the probe: padded, of different widths, and
    longer than the sliding window where there is one (so the windowed mask is what gets traced)."""
    window = _sliding_window(spec)
    cap = spec.max_seq_length
    banded = _band_window(spec)
    if banded is not None:  # the plain graph: every batch it runs is within the key span
        cap = min(cap, banded.span)
    trace = min(cap, max(16, window + 4))
    probe = min(cap, max(29, window + 11))
    return [trace, max(1, trace - 5)], [probe, min(3, probe), max(1, probe - 7)]


def _traced(pipeline: Any, example: dict[str, np.ndarray],
            probe: dict[str, np.ndarray]) -> tuple[Any, np.ndarray]:
    """``pipeline`` converted by tracing ``example``, and its torch output on ``probe``."""
    import openvino as ov
    import torch

    with torch.no_grad():
        try:
            model = ov.convert_model(pipeline, example_input={
                k: torch.from_numpy(v) for k, v in example.items()})
        except Exception as exc:  # the converter raises many kinds; all mean "does not convert"
            text = str(exc).strip()
            raise ConversionError(f"openvino.convert_model failed: {type(exc).__name__}: "
                                  f"{text.splitlines()[0][:300] if text else ''}") from exc
        want = pipeline(**{k: torch.from_numpy(v) for k, v in probe.items()}).numpy()
    return model, want


def _span_batch(spec: ModelSpec, lengths: Sequence[int], seed: int) -> dict[str, np.ndarray]:
    """``_batch`` with late chunking's span weights: two spans per row, of other widths."""
    feed = _batch(spec, lengths, seed)
    spans = [np.array([[0, max(1, n // 2)], [max(0, n // 3), n]]) for n in lengths]
    feed[_SPAN_INPUT] = span_weights(spec, feed["input_ids"].shape[1], spans)
    return feed


def _convert_spans(spec: ModelSpec, threads: Optional[int],
                   banded: bool = False) -> tuple[Any, tuple[dict[str, np.ndarray], np.ndarray]]:
    """Late chunking's graph: (input_ids, attention_mask, span_weights) -> (n, spans, dim), the
    torch engine's span head (floe/engine/base.py span_weights), plus a probe and its output.
    ``banded``: the one for a sliding-window model's long windows, as ``_convert``'s."""
    import openvino as ov
    import torch

    from floe.engine.torch_engine import Prepared, TorchEngine

    def make_source() -> TorchEngine:
        return _source(spec, threads)

    class SpanPipeline(torch.nn.Module):
        def __init__(self, source: TorchEngine) -> None:
            super().__init__()
            self.source = source
            self.backbone = source.model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    span_weights: torch.Tensor) -> torch.Tensor:
            source = self.source
            batch = Prepared(input_ids, attention_mask, attention_mask.sum(dim=1), uniform=False)
            pooled = torch.einsum("bsl,blh->bsh", span_weights, source._forward(batch).float())
            for layer in source._dense:
                pooled = layer(pooled)
            return pooled.float()

    window = _band_window(spec)
    trace_lengths, probe_lengths = (_band_lengths(spec, window) if banded and window is not None
                                    else _trace_lengths(spec))
    probe = _span_batch(spec, probe_lengths, 1)
    pipeline, want = _tailored(make_source, lambda source: SpanPipeline(source).eval(), probe)
    model, _ = _traced(pipeline, _span_batch(spec, trace_lengths, 0), probe)
    model.reshape({"input_ids": ov.PartialShape([-1, -1]),
                   "attention_mask": ov.PartialShape([-1, -1]),
                   _SPAN_INPUT: ov.PartialShape([-1, -1, -1])})
    del pipeline
    return model, (probe, want.reshape(-1, want.shape[-1]))


def _convert(spec: ModelSpec, threads: Optional[int],
             banded: bool = False) -> tuple[Any, tuple[dict[str, np.ndarray], np.ndarray]]:
    """The torch pipeline converted to an ov.Model, plus a probe batch and its torch output.
    ``banded``: the graph of a sliding-window model's long batches (traced and probed wider than
    its key span, so floe's forward takes the banded path)."""
    import openvino as ov
    import torch

    from floe.engine.torch_engine import Prepared, TorchEngine

    def make_source() -> TorchEngine:
        return _source(spec, threads)

    class Pipeline(torch.nn.Module):
        """(input_ids, attention_mask[, token_type_ids]) -> the task's (n, dim) float32 rows."""

        def __init__(self, source: TorchEngine) -> None:
            super().__init__()
            self.source = source
            self.backbone = source.model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
            source = self.source
            batch = Prepared(input_ids, attention_mask, attention_mask.sum(dim=1), uniform=False,
                             token_type_ids=token_type_ids)
            return source._head(source._forward(batch), batch).float()

    inputs = _graph_inputs(spec)
    window = _band_window(spec)
    trace_lengths, probe_lengths = (_band_lengths(spec, window) if banded and window is not None
                                    else _trace_lengths(spec))
    probe = _batch(spec, probe_lengths, seed=1)
    pipeline, want = _tailored(make_source, lambda source: Pipeline(source).eval(), probe)
    model, _ = _traced(pipeline, _batch(spec, trace_lengths, seed=0), probe)
    names = [port.get_any_name() for port in model.inputs]
    if sorted(names) != sorted(inputs):
        raise ConversionError(f"converted graph has inputs {names}, expected {list(inputs)}")
    model.reshape({name: ov.PartialShape([-1, -1]) for name in inputs})
    del pipeline
    return model, (probe, want)


# --- the engine ---------------------------------------------------------------------------------

def pick_precision(dtype: str, flags: Optional[set[str]] = None) -> str:
    """The engine dtype ("bfloat16" | "float32" | "int8") for a requested --dtype on this CPU."""
    if dtype == "auto":
        return "bfloat16" if cpu_has_fast_bf16(flags) else "float32"
    if dtype == "int8":
        return dtype
    if dtype in _PRECISION:
        if dtype == "bfloat16" and not cpu_has_fast_bf16(flags):
            log.warning("bfloat16 on a CPU without AMX/avx512_bf16 runs emulated and is slow")
        return dtype
    raise ConfigError(f"--dtype {dtype!r}: the OpenVINO engine runs bfloat16 or float32 "
                      "(use --engine torch for float16)")


class OpenVINOEngine(Engine):
    """Runs ``spec`` converted to OpenVINO on the CPU with ``threads`` threads."""

    backend = "openvino"

    def __init__(self, spec: ModelSpec, dtype: str = "auto", threads: Optional[int] = None,
                 cache_dir: Optional[str] = None, pin_threads: bool = True,
                 profile: bool = False, packing: bool = False) -> None:
        """``pin_threads``: let OpenVINO pin its threads to cores (its default). Off where several
        engines share one process: each would pin to the same first cores. ``profile``: keep
        per-node performance counters (``profiling_info``), for scripts/profile_engine.py.
        ``packing``: pack short inputs into shared rows (floe/engine/packing.py) where the model
        allows it; the packed graph is made ready by ``warmup``, after which ``packing`` is set."""
        import openvino as ov

        self.spec = spec
        self.device = "cpu"
        self._inputs = _graph_inputs(spec)
        self.dtype = pick_precision(dtype)
        self.threads = int(threads) if threads else core_count()
        self.cache_dir = cache_dir or default_cache_dir()
        self.converted = False  # True when this construction converted (no cache hit)
        self._spans: dict[bool, Any] = {}   # late chunking's infer requests (plain, banded),
                                             # made on first use
        self._packed_request: Any = None    # the packed graph's (warmup makes it)
        self._lock = threading.Lock()
        # Sliding-window models whose inputs can outgrow the key span have a second graph, run on
        # batches wider than the span (floe/engine/attention.py); int8 quantizes and gates both.
        self._window = _band_window(spec)
        self._band_request: Any = None
        self._pack_refused = packed_graph.refusal(spec, self.dtype) if packing else "off"
        root = openvino_dir(self.cache_dir)
        os.makedirs(root, exist_ok=True)
        key = cache_key(spec)
        self.model_dir = os.path.join(root, key)
        failure = _read_failure(root, key)
        if failure is not None:
            raise ConversionError(f"{failure} (recorded in {root}/{key}.failed; delete it to retry)")

        self._core = ov.Core()
        self._core.set_property("CPU", {"CACHE_DIR": os.path.join(root, "compiled")})
        self._config = {
            # int8: the layers left in float (engine/int8.py) run at the CPU's best float
            "INFERENCE_PRECISION_HINT": _PRECISION.get(
                self.dtype, "bf16" if cpu_has_fast_bf16() else "f32"),
            "INFERENCE_NUM_THREADS": self.threads,
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": bool(pin_threads),
        }
        if profile:
            self._config["PERF_COUNT"] = True
        xml = os.path.join(self.model_dir, "model.xml")
        with _locked(os.path.join(root, key + ".lock")):
            if os.path.isfile(xml):
                if self.dtype != "int8":
                    self._compile(xml)
                    if self._window is not None:
                        self._compile_band(os.path.join(self.model_dir, "band.xml"))
            else:
                failure = _read_failure(root, key)  # another replica may have just failed
                if failure is not None:
                    raise ConversionError(failure)
                self._convert_check_save(root, key)
            if self.dtype == "int8":
                from floe.engine.int8 import quantized_model

                plain, band = quantized_model(self._core, spec, self.model_dir, self._config,
                                              self._window)
                self._compile(plain)
                if band is not None:
                    self._compile_band(band)
        actual = str(self._compiled.get_property("INFERENCE_PRECISION_HINT"))
        if self.dtype != "int8" and (actual.endswith("f32") or actual == "float32"):
            self.dtype = "float32"  # a CPU that cannot run the bf16 hint runs f32
        log.info("OpenVINO engine: %s %s on cpu in %s, %d threads (%s; graph %s)",
                 spec.name, "converted" if self.converted else "loaded from the cache", self.dtype,
                 self.threads, head_summary(spec), self.model_dir)

    @property
    def _float_dtype(self) -> str:
        """The float precision the graph's float layers run in (all of them, but for int8)."""
        hint = self._config["INFERENCE_PRECISION_HINT"]
        return "bfloat16" if hint == "bf16" else "float32"

    def _compile(self, model: Any) -> None:
        try:
            self._compiled = self._core.compile_model(model, "CPU", self._config)
        except RuntimeError as exc:
            raise ConversionError(f"OpenVINO could not compile the converted graph: {str(exc)[:300]}") from exc
        self._request = self._compiled.create_infer_request()

    def _compile_band(self, model: Any) -> None:
        try:
            compiled = self._core.compile_model(model, "CPU", self._config)
        except RuntimeError as exc:
            raise ConversionError(f"OpenVINO could not compile the banded graph: {str(exc)[:300]}") from exc
        self._band_request = compiled.create_infer_request()

    def _convert_check_save(self, root: str, key: str) -> None:
        """Converts, compiles, checks the probe, then publishes the graph (caller holds the lock)."""
        import openvino as ov

        log.info("converting %s to OpenVINO (first start with these files; cached in %s)",
                 self.spec.name, self.model_dir)
        try:
            model, probe = _convert(self.spec, self.threads)
            self._compile(model)
            self._check_probe(probe)
            band = None
            if self._window is not None:
                band, band_probe = _convert(self.spec, self.threads, banded=True)
                self._compile_band(band)
                self._check_probe(band_probe)
        except ConversionError as exc:
            self._record_failure(root, key, str(exc))
            raise
        tmp = tempfile.mkdtemp(prefix=f".{key}.", dir=root)
        try:
            ov.save_model(model, os.path.join(tmp, "model.xml"), compress_to_fp16=False)
            if band is not None:
                ov.save_model(band, os.path.join(tmp, "band.xml"), compress_to_fp16=False)
            with open(os.path.join(tmp, "floe.json"), "w", encoding="utf-8") as f:
                json.dump({"model": self.spec.path, "architecture": self.spec.architecture,
                           "task": kind_of(self.spec).name, "pooling": self.spec.pooling, "format": CACHE_FORMAT,
                           "openvino": _version("openvino")}, f, indent=1)
            os.rename(tmp, self.model_dir)
        except OSError:
            if not os.path.isfile(os.path.join(self.model_dir, "model.xml")):
                raise  # not "another process published it first": a real write error
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.converted = True

    def _check_probe(self, probe) -> None:
        """Refuses a conversion whose output differs from the torch pipeline's on the probe."""
        feed, want = probe
        try:
            got = self.run(feed)
        except RuntimeError as exc:  # e.g. a reshape that baked in the traced shape
            lines = [ln for ln in str(exc).splitlines() if ln.strip()]
            raise ConversionError("the converted graph fails on a probe batch of other shapes: "
                                  + (lines[-1][:300] if lines else type(exc).__name__)) from exc
        why = kind_of(self.spec).probe_error(got, want, self._float_dtype)
        if why is not None:
            raise ConversionError("the converted graph differs from the torch model on a probe "
                                  f"batch ({why})")

    @staticmethod
    def _record_failure(root: str, key: str, message: str) -> None:
        try:
            with open(os.path.join(root, key + ".failed"), "w", encoding="utf-8") as f:
                f.write(message + "\n")
        except OSError:
            pass

    # --- stages ------------------------------------------------------------------------------

    def prepare(self, sequences: Sequence[np.ndarray],
                type_splits: Optional[np.ndarray] = None,
                spans: Optional[Sequence[np.ndarray]] = None) -> dict[str, np.ndarray]:
        """The graph's inputs: (n, longest) int64 arrays, right-padded with the model's pad id,
        and token types where the graph takes them (from ``type_splits``; all 0 without them);
        with ``spans``, late chunking's span weights for the span graph. With packing on, a batch
        that packs into fewer padded tokens (``packing.plan``, in the order given) gets the packed
        graph's inputs instead; ``run`` returns its rows in the same order either way."""
        takes_types = _TYPE_INPUT in self._inputs  # (an embedding graph: single texts, all type 0)
        if self.packing and spans is None:
            layout = packing.plan([len(s) for s in sequences], self.packing)
            if layout is not None:   # smaller packed than padded: the packed graph
                feed = packing.packed_feed(sequences, layout[0], layout[1], self.spec.pooling,
                                           self.spec.pad_token_id)
                return {**feed.inputs, _PACKED_WHERE: feed.where}
        padded = right_pad(self.spec, sequences, type_splits if takes_types else None)
        feed = _feed(padded)
        if spans is not None:
            feed[_SPAN_INPUT] = span_weights(self.spec, padded.input_ids.shape[1], spans)
            feed[_SPAN_ROWS] = span_rows(spans)
            return feed
        if takes_types and padded.token_type_ids is None:
            feed[_TYPE_INPUT] = np.zeros_like(padded.input_ids)
        return feed

    def run(self, prepared: dict[str, np.ndarray]) -> np.ndarray:
        """Forward and the task's head in one graph; returns (n, spec.dim) float32 (one row per
        span for a late-chunking batch)."""
        if _PACKED_WHERE in prepared:
            where = prepared[_PACKED_WHERE]
            feed = {k: v for k, v in prepared.items() if k != _PACKED_WHERE}
            with self._lock:
                self._packed_request.infer(feed, share_inputs=True)
                out = self._packed_request.get_output_tensor(0).data
                return np.array(out.reshape(-1, out.shape[-1])[where], dtype=np.float32, copy=True)
        if _SPAN_INPUT in prepared:
            rows = prepared[_SPAN_ROWS]
            feed = {k: v for k, v in prepared.items() if k != _SPAN_ROWS}
            banded = self._window is not None and self._window.banded(feed["input_ids"].shape[1])
            with self._lock:
                request = self._span_request(banded)
                request.infer(feed, share_inputs=True)
                out = np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True)
            return out[rows]
        request = self._request
        if self._band_request is not None and self._window.banded(prepared["input_ids"].shape[1]):
            request = self._band_request  # wider than the key span: the banded graph
        with self._lock:
            request.infer(prepared, share_inputs=True)
            return np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True)

    def _span_request(self, banded: bool = False) -> Any:
        """Late chunking's graph, converted (or read from the cache) and compiled on first use,
        on the engine thread: a server that never late-chunks never pays for it. A
        sliding-window model's windows wider than its key span take a banded one, as plain
        batches do. Caller holds the lock."""
        if banded not in self._spans:
            key = cache_key(self.spec, spans=True) + ("-band" if banded else "")

            def convert() -> tuple[Any, Any]:
                model, (feed, want) = _convert_spans(self.spec, self.threads, banded)
                return model, (feed, want, None)

            self._spans[banded] = self._side_request(key, convert, "late-chunking graph")
        return self._spans[banded]

    def _side_request(self, key: str, convert: Callable[[], tuple[Any, Any]], what: str) -> Any:
        """An infer request of a second graph (late chunking's, the packed one): read from the
        cache, or made by ``convert`` (the ov.Model and a probe: feed, torch rows, and which rows
        of the output they are, None: all), checked on its probe and saved. A conversion that
        fails is recorded beside the cache, so that the next start does not convert again."""
        import openvino as ov

        root = openvino_dir(self.cache_dir)
        folder = os.path.join(root, key)
        xml = os.path.join(folder, "model.xml")
        with _locked(os.path.join(root, key + ".lock")):
            failure = _read_failure(root, key)
            if failure is not None:
                raise ConversionError(f"{failure} (recorded in {root}/{key}.failed)")
            converting = not os.path.isfile(xml)
            try:
                if not converting:
                    model, probe = xml, None
                else:
                    log.info("converting %s's %s to OpenVINO (first use; cached in %s)",
                             self.spec.name, what, folder)
                    model, probe = convert()
                compiled = self._core.compile_model(model, "CPU", self._config)
                request = compiled.create_infer_request()
                if probe is not None:
                    feed, want, select = probe
                    request.infer(feed, share_inputs=True)
                    got = np.array(request.get_output_tensor(0).data, dtype=np.float32)
                    got = got.reshape(-1, want.shape[-1])
                    why = kind_of(self.spec).probe_error(
                        got if select is None else got[select], want, self._float_dtype)
                    if why is not None:
                        raise ConversionError(f"the {what} differs from the torch model ({why})")
            except (ConversionError, RuntimeError) as exc:
                if converting:
                    # a conversion that failed fails again: recorded (a cached graph that did not
                    # compile this time is not: the cause may pass)
                    self._record_failure(root, key, f"{what}: {exc}"[:500])
                raise ConversionError(str(exc)) from exc
            if probe is not None:
                tmp = tempfile.mkdtemp(prefix=f".{key}.", dir=root)
                try:
                    ov.save_model(model, os.path.join(tmp, "model.xml"), compress_to_fp16=False)
                    os.rename(tmp, folder)
                except OSError:
                    if not os.path.isfile(xml):
                        raise
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
        return request

    def profiling_info(self) -> list:
        """The last forward's per-node counters (an engine built with ``profile=True``)."""
        return list(self._request.profiling_info)

    # --- lifecycle ---------------------------------------------------------------------------

    def warmup(self, max_batch_tokens: int) -> None:
        """Makes the packed graph ready where packing was asked for and the model allows it
        (converted on the first start), then one forward at the full token budget (proves it
        fits), then a tiny one."""
        if self._pack_refused is None and self._packed_request is None:
            try:
                with self._lock:
                    self._packed_request = self._side_request(
                        cache_key(self.spec, packed=True),
                        lambda: packed_graph.convert(self.spec, self.threads), "packed graph")
                self.packing = packing.ALIGN
                log.info("packing: short inputs share rows of the forward pass (%s)",
                         self.spec.name)
            except Exception as exc:  # noqa: BLE001 - packing is optional: the engine pads
                self._pack_refused = str(exc)
                log.warning("packing off for %s: %s: %s", self.spec.name, type(exc).__name__, exc)
        seq = self.spec.max_seq_length
        rows = max(1, int(max_batch_tokens) // seq)
        filler = min(1000, self.spec.vocab_size - 1)
        self.run(self.prepare([np.full(seq, filler, dtype=np.int32)] * rows))
        self.run(self.prepare([np.full(min(8, seq), filler, dtype=np.int32)]))
        if self.packing:   # a packed batch: one input and four short ones sharing its row
            short = [np.full(3, filler, dtype=np.int32)] * 4
            self.run(self.prepare([np.full(min(20, seq), filler, dtype=np.int32)] + short))
