"""The OpenVINO graph of a model: converted from the torch pipeline, tailored, checked, cached.

Conversion builds the same torch pipeline the torch engine runs (the backbone and the task's
head: pooling and Dense, a cross-encoder's logits, or SPLADE pooling: ``TorchEngine``'s own code,
in float32) and hands it to ``openvino.convert_model`` with dynamic batch and sequence dimensions.
The head is part of the graph, so a forward pass returns (n, dim) rather than (n, length, hidden):
less to copy out, and the pooling runs in the same optimised graph. The inputs are ``input_ids``
and ``attention_mask`` (int64, right padded), plus ``token_type_ids`` for a cross-encoder whose
backbone has token types (``graph_inputs``); whatever else an architecture needs (all-zero token
types for single texts, position ids) is derived inside the graph. Before it is traced, the
pipeline is tailored for OpenVINO's CPU plugin (``tailored``: the query scale folded in, pooling
as a matmul, the keys padded to whole blocks), a change to the graph and never to its output.

``convert`` (and ``convert_spans``, late chunking's graph) return the ov.Model with a probe batch
of other shapes than the one traced and the torch pipeline's output on it: the engine
(floe/engine/openvino_engine.py) compares the compiled graph with that output before it serves
it, so a conversion that baked in a shape or dropped the mask is refused (``ConversionError``).

The converted graph is cached on disk under ``<cache dir>/openvino/<key>/`` (``cache_key``: the
model folder's files, names, sizes and mtimes; the pipeline options, task and head, pooling,
Dense; the OpenVINO, transformers and torch versions; the source of floe's own windowed
forward), written under a per-key file lock (``locked``); a failed conversion is recorded beside
it (``read_failure``) so that a restart does not convert again. Nothing here imports torch or
openvino until a conversion runs: a start that finds the cache imports neither.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from floe.engine import packed_graph
from floe.engine.base import Padded, right_pad, span_weights
from floe.engine.hardware import cpu_has_amx
from floe.engine.window import Window, window_of
from floe.kinds import kind_of
from floe.models.spec import ModelSpec

log = logging.getLogger(__name__)

CACHE_FORMAT = 5          # bump when the graph floe builds changes (2: tailored, 3: aligned keys,
                          # 4: gate and up projections in one matmul, 5: that only on AMX)
ENV_CACHE_DIR = "FLOE_ENGINE_CACHE_DIR"
INPUTS = ("input_ids", "attention_mask")
TYPE_INPUT = "token_type_ids"
SPAN_INPUT = "span_weights"


def graph_inputs(spec: ModelSpec) -> tuple[str, ...]:
    """The converted graph's inputs: token types only where they can differ from all-zero, in a
    cross-encoder's (query, document) pairs (an embedding graph keeps its two inputs)."""
    return INPUTS + ((TYPE_INPUT,) if kind_of(spec).pairs and spec.uses_token_types else ())


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


def library_version(dist: str) -> str:
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
        versions = {d: library_version(d) for d in ("openvino", "transformers", "torch")}
    parts = {
        "format": CACHE_FORMAT,
        "versions": versions,
        "files": _folder_files(spec),
        "architecture": spec.architecture,
        "pooling": spec.pooling,
        "dense": [[d.in_features, d.out_features, d.bias, d.activation, d.use_residual] for d in spec.dense],
        "pad_token_id": spec.pad_token_id,
    }
    if merges_gate_up():   # a different graph (merge_gate_up), so a cache shared with a CPU
        parts["gate_up"] = "merged"   # without AMX never hands it the other one
    window = window_of(spec.backbone_path)
    if window is not None and _own_forward(spec):  # floe's own forward builds this graph
        parts["window"] = {"radius": window.radius, "block": window.block,
                           "sliding": list(window.sliding), "band_graph": band_window(spec) is not None,
                           "forward": _forward_digest()}
    elif _rotary(spec):   # a float32 table of rotations (_float32_rotation), as long as this
        parts["rotation"] = {"table": "float32", "positions": spec.max_seq_length}
    head = kind_of(spec).graph_key(spec)
    if head is not None:   # (None for embeddings, whose keys, and caches, stay as they were)
        parts["head"] = {**head, "inputs": list(graph_inputs(spec))}
    if spans:   # late chunking's graph: token states pooled by span weights, then Dense
        parts["head"] = {"task": "spans", "inputs": [*INPUTS, SPAN_INPUT]}
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
    failed = read_failure(root, key)
    if failed is not None:
        return "failed", failed
    return "absent", os.path.join(root, key)


def read_failure(root: str, key: str) -> Optional[str]:
    try:
        with open(os.path.join(root, key + ".failed"), encoding="utf-8") as f:
            return f.read().strip() or "conversion failed"
    except OSError:
        return None


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
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


def band_window(spec: ModelSpec) -> Optional[Window]:
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


def source_engine(spec: ModelSpec, threads: Optional[int]) -> Any:
    """The torch engine a graph is traced from: float32, the padded forward, rotations from a
    float32 table."""
    from floe.engine.torch_engine import TorchEngine

    source = TorchEngine(spec, device="cpu", dtype="float32", threads=threads, unpad=False)
    _float32_rotation(source.model, spec)
    return source


def source_module() -> type:
    """The base of the pipelines traced here: a torch module holding the torch engine it runs
    (``source``, not a module itself) with that engine's backbone as a submodule, so that the
    trace sees its weights. Made on call: torch is imported only when a conversion runs."""
    import torch

    class SourceModule(torch.nn.Module):
        def __init__(self, source: Any) -> None:
            super().__init__()
            self.source = source
            self.backbone = source.model

    return SourceModule


def fold_query_scale(backbone: Any) -> int:
    """Folds attention's 1/sqrt(head dim) into the query projection of transformers' BERT-family
    self-attention (a ``query`` Linear and a float ``scaling`` it passes to the attention
    function), which then scales by 1. OpenVINO's CPU plugin otherwise multiplies the keys by
    the scale in a pass of its own (all-MiniLM, 40 x 50 tokens: 0.8% of a forward). Returns how
    many modules it changed; ``tailored`` checks that the float32 output did not."""
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


def merges_gate_up(flags: Optional[set[str]] = None) -> bool:
    """Whether the conversion gives gated MLPs one matmul for gate and up (merge_gate_up): on a
    CPU with AMX, where it must; elsewhere the separate form runs 3-7% faster (AMD Zen 4,
    embeddinggemma-300m's shape, 16 x 50 to 1 x 2,048: docs/benchmarks.md, section 9), its
    activation fused into the gate's matmul."""
    return cpu_has_amx(flags)


def merge_gate_up(backbone: Any) -> int:
    """Gives each gated MLP (transformers' ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``:
    Gemma3's, Qwen3's) one matmul for its gate and up projections, split after it. On a CPU with
    AMX in bf16, OpenVINO's CPU plugin fuses the separate form into its LLM MLP kernel, which
    dies of a division by zero (SIGFPE) when the engine has one thread, as a replica on a core
    of its own does (OpenVINO 2026.4); the merged form runs as one FullyConnected, as fast as that
    kernel on two threads (docs/benchmarks.md, section 9). Returns how many modules it changed;
    ``tailored`` checks that the float32 output did not."""
    import torch

    def gated(module: Any, x: torch.Tensor) -> torch.Tensor:
        gate, up = module.gate_up(x).chunk(2, dim=-1)
        return module.down_proj(module.act_fn(gate) * up)

    merged = 0
    for module in backbone.modules():
        gate, up = getattr(module, "gate_proj", None), getattr(module, "up_proj", None)
        if not (isinstance(gate, torch.nn.Linear) and isinstance(up, torch.nn.Linear)
                and isinstance(getattr(module, "down_proj", None), torch.nn.Linear)
                and callable(getattr(module, "act_fn", None))
                and gate.weight.shape == up.weight.shape and gate.bias is None and up.bias is None):
            continue
        module.gate_up = torch.nn.Linear(gate.in_features, 2 * gate.out_features, bias=False,
                                         dtype=gate.weight.dtype)
        with torch.no_grad():
            module.gate_up.weight.copy_(torch.cat([gate.weight, up.weight], dim=0))
        module.forward = gated.__get__(module)
        del module.gate_proj, module.up_proj
        merged += 1
    return merged


def tailored(make_source: Callable[[], Any], pipeline_of: Callable[[Any], Any],
              probe: dict[str, np.ndarray]) -> tuple[Any, np.ndarray]:
    """The pipeline to trace, and its float32 output on ``probe`` before any change: the torch
    engine ``make_source()`` builds, with the query scale folded in, gate and up projections
    merged on a CPU with AMX (merge_gate_up), pooling as a matmul
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
    folded = fold_query_scale(source.model)
    merged = merge_gate_up(source.model) if merges_gate_up() else 0
    aligned = aligned_keys.install(source.model)
    got = run(pipeline)
    scale = max(float(np.abs(want).max()), 1e-6)
    if not np.isfinite(got).all() or float(np.abs(got - want).max()) > 1e-4 * scale:
        log.warning("the graph's tailoring (%d query scales folded, %d gated MLPs merged, pooling "
                    "as a matmul%s) changed the float32 output (%.3g): converting the model "
                    "unchanged", folded, merged, ", keys aligned" if aligned else "",
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
    padded = right_pad(spec, seqs, splits if TYPE_INPUT in graph_inputs(spec) else None)
    return graph_feed(padded)


def graph_feed(padded: Padded) -> dict[str, np.ndarray]:
    feed = {"input_ids": padded.input_ids, "attention_mask": padded.attention_mask}
    if padded.token_type_ids is not None:
        feed[TYPE_INPUT] = padded.token_type_ids
    return feed


def _trace_lengths(spec: ModelSpec) -> tuple[list[int], list[int]]:
    """Row lengths of the traced example and of the probe: padded, of different widths, and
    longer than the sliding window where there is one (so the windowed mask is what gets traced)."""
    window = _sliding_window(spec)
    cap = spec.max_seq_length
    banded = band_window(spec)
    if banded is not None:  # the plain graph: every batch it runs is within the key span
        cap = min(cap, banded.span)
    trace = min(cap, max(16, window + 4))
    probe = min(cap, max(29, window + 11))
    return [trace, max(1, trace - 5)], [probe, min(3, probe), max(1, probe - 7)]


def traced(pipeline: Any, example: dict[str, np.ndarray],
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
    feed[SPAN_INPUT] = span_weights(spec, feed["input_ids"].shape[1], spans)
    return feed


def convert_spans(spec: ModelSpec, threads: Optional[int],
                   banded: bool = False) -> tuple[Any, tuple[dict[str, np.ndarray], np.ndarray]]:
    """Late chunking's graph: (input_ids, attention_mask, span_weights) -> (n, spans, dim), the
    torch engine's span head (floe/engine/base.py span_weights), plus a probe and its output.
    ``banded``: the one for a sliding-window model's long windows, as ``convert``'s."""
    import openvino as ov
    import torch

    from floe.engine.torch_engine import Prepared, TorchEngine

    def make_source() -> TorchEngine:
        return source_engine(spec, threads)

    class SpanPipeline(source_module()):
        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    span_weights: torch.Tensor) -> torch.Tensor:
            source = self.source
            batch = Prepared(input_ids, attention_mask, attention_mask.sum(dim=1), uniform=False)
            pooled = torch.einsum("bsl,blh->bsh", span_weights, source._forward(batch).float())
            for layer in source._dense:
                pooled = layer(pooled)
            return pooled.float()

    window = band_window(spec)
    trace_lengths, probe_lengths = (_band_lengths(spec, window) if banded and window is not None
                                    else _trace_lengths(spec))
    probe = _span_batch(spec, probe_lengths, 1)
    pipeline, want = tailored(make_source, lambda source: SpanPipeline(source).eval(), probe)
    model, _ = traced(pipeline, _span_batch(spec, trace_lengths, 0), probe)
    model.reshape({"input_ids": ov.PartialShape([-1, -1]),
                   "attention_mask": ov.PartialShape([-1, -1]),
                   SPAN_INPUT: ov.PartialShape([-1, -1, -1])})
    del pipeline
    return model, (probe, want.reshape(-1, want.shape[-1]))


def convert(spec: ModelSpec, threads: Optional[int],
             banded: bool = False) -> tuple[Any, tuple[dict[str, np.ndarray], np.ndarray]]:
    """The torch pipeline converted to an ov.Model, plus a probe batch and its torch output.
    ``banded``: the graph of a sliding-window model's long batches (traced and probed wider than
    its key span, so floe's forward takes the banded path)."""
    import openvino as ov
    import torch

    from floe.engine.torch_engine import Prepared, TorchEngine

    def make_source() -> TorchEngine:
        return source_engine(spec, threads)

    class Pipeline(source_module()):
        """(input_ids, attention_mask[, token_type_ids]) -> the task's (n, dim) float32 rows."""

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
            source = self.source
            batch = Prepared(input_ids, attention_mask, attention_mask.sum(dim=1), uniform=False,
                             token_type_ids=token_type_ids)
            return source._head(source._forward(batch), batch).float()

    inputs = graph_inputs(spec)
    window = band_window(spec)
    trace_lengths, probe_lengths = (_band_lengths(spec, window) if banded and window is not None
                                    else _trace_lengths(spec))
    probe = _batch(spec, probe_lengths, seed=1)
    pipeline, want = tailored(make_source, lambda source: Pipeline(source).eval(), probe)
    model, _ = traced(pipeline, _batch(spec, trace_lengths, seed=0), probe)
    names = [port.get_any_name() for port in model.inputs]
    if sorted(names) != sorted(inputs):
        raise ConversionError(f"converted graph has inputs {names}, expected {list(inputs)}")
    model.reshape({name: ov.PartialShape([-1, -1]) for name in inputs})
    del pipeline
    return model, (probe, want)
