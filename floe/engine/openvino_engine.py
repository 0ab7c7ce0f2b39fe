"""The OpenVINO engine: a model's OpenVINO graph (floe/engine/openvino_convert.py), run on the CPU.

The graph is converted once per model and cached on disk; an engine that finds it in the cache
compiles it without importing torch or transformers. The compiled form (precision- and
thread-specific) is cached by OpenVINO itself in ``<cache dir>/openvino/compiled``. Replicas
that start together convert once: the conversion runs under the key's file lock, into a
temporary folder renamed into place, so none reads a half-written model. Before a fresh
conversion is used, the compiled graph's output on the probe batch is compared with the torch
pipeline's: a cosine for embeddings and SPLADE rows and an absolute + relative tolerance for a
cross-encoder's logits (a cosine of 1-wide rows only compares signs); a graph that differs is
refused (``ConversionError``; ``create_engine`` then falls back to torch) and the refusal recorded.

Second graphs, each converted on first use, checked on a probe and cached under a key of its
own: late chunking's (span weights as a third input), a sliding-window model's banded one, and
for a BERT-family embedding model with ``packing`` the packed one, several inputs per row
(floe/engine/packed_graph.py; ``prepare`` packs a batch where that is smaller than padding it).

floe's attention kernel (floe/engine/native/): with ``native_attention`` on a CPU with AVX-512
BF16, in bf16, a BERT-family graph with heads of 32 dimensions (the padded one and the packed
one) has its attention rewritten to the kernel, which computes each input's scores over its own
keys only. The rewritten graph is checked against the untouched one on a probe batch, cached
under a key of its own (the graph's and the kernel build's), and run in its place; on a CPU with
AMX, whose attention overtakes the kernel's on long inputs (``native.reach``), both are kept and
a batch runs on the kernel's when its longest input is short. Anything that stops it (no
compiler, a graph it does not match, a probe that differs) leaves the untouched graph running,
logged and shown by ``native``.

Precision: the ``INFERENCE_PRECISION_HINT`` is bf16 on CPUs with AMX or avx512_bf16 (read from
/proc/cpuinfo flags) and f32 elsewhere or when float32 is asked.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from typing import Any, Callable, Optional, Sequence

import numpy as np

from floe.engine import packed_graph, packing
from floe.engine.base import Engine, head_summary, right_pad, span_rows, span_weights
from floe.engine.hardware import cpu_has_fast_bf16
from floe.engine.native import describe_reach as native_reach_words
from floe.engine.openvino_convert import (CACHE_FORMAT, SPAN_INPUT, TYPE_INPUT, ConversionError,
                                          band_window, cache_key, convert, convert_spans,
                                          default_cache_dir, graph_feed, graph_inputs,
                                          library_version, locked, openvino_dir, read_failure)
from floe.errors import ConfigError
from floe.kinds import kind_of
from floe.models.spec import ModelSpec
from floe.resolve import core_count

log = logging.getLogger(__name__)

_SPAN_ROWS = "span_rows"   # (not a graph input) which rows of the span graph's output are real
_PACKED_WHERE = "packed_where"  # (not a graph input) each input's row of the packed output
_LONGEST = "longest_input"      # (not a graph input) a packed batch's longest input, in tokens
_PRECISION = {"bfloat16": "bf16", "float32": "f32"}


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
                 profile: bool = False, packing: bool = False,
                 native_attention: bool = False) -> None:
        """``pin_threads``: let OpenVINO pin its threads to cores (its default). Off where several
        engines share one process: each would pin to the same first cores. ``profile``: keep
        per-node performance counters (``profiling_info``), for scripts/profile_engine.py.
        ``packing``: pack short inputs into shared rows (floe/engine/packing.py) where the model
        allows it; the packed graph is made ready by ``warmup``, after which ``packing`` is set.
        ``native_attention``: run attention on floe's kernel where it applies (floe/engine/native/;
        ``native`` says whether it runs, or why not)."""
        import openvino as ov

        self.spec = spec
        self.device = "cpu"
        self._inputs = graph_inputs(spec)
        self.dtype = pick_precision(dtype)
        self.threads = int(threads) if threads else core_count()
        self.cache_dir = cache_dir or default_cache_dir()
        self.converted = False  # True when this construction converted (no cache hit)
        self._spans: dict[bool, Any] = {}   # late chunking's infer requests (plain, banded),
                                             # made on first use
        self._packed_request: Any = None    # the packed graph's (warmup makes it)
        self._kernel: Optional[str] = None   # floe's attention kernel, where it is loaded
        # its graphs ("padded", "packed") kept beside the untouched ones where it runs only the
        # batches whose longest input is within its reach (a CPU with AMX); elsewhere they replace
        # the untouched ones
        self._short: dict[str, Any] = {}
        self._reach: Optional[dict[str, int]] = None
        self._lock = threading.Lock()
        # Sliding-window models whose inputs can outgrow the key span have a second graph, run on
        # batches wider than the span (floe/engine/attention.py); int8 quantizes and gates both.
        self._window = band_window(spec)
        self._band_request: Any = None
        self._pack_refused = packed_graph.refusal(spec, self.dtype) if packing else "off"
        root = openvino_dir(self.cache_dir)
        os.makedirs(root, exist_ok=True)
        key = cache_key(spec)
        self.model_dir = os.path.join(root, key)
        failure = read_failure(root, key)
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
        with locked(os.path.join(root, key + ".lock")):
            if os.path.isfile(xml):
                if self.dtype != "int8":
                    self._compile(xml)
                    if self._window is not None:
                        self._compile_band(os.path.join(self.model_dir, "band.xml"))
            else:
                failure = read_failure(root, key)  # another replica may have just failed
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
        self.native = self._load_kernel() if native_attention else "off"
        if self._kernel is not None:
            self._request, why = self._on_kernel(self._request, key, "attention_mask",
                                                 self._probe_feed(), layout="padded")
            self.native = (f"no: {why}" if why else f"yes: floe's attention kernel ({self._kernel})"
                           + native_reach_words(self._reach))
        log.info("OpenVINO engine: %s %s on cpu in %s, %d threads (%s; graph %s)",
                 spec.name, "converted" if self.converted else "loaded from the cache", self.dtype,
                 self.threads, head_summary(spec), self.model_dir)

    @property
    def attention(self) -> str:   # Engine.attention, in `floe info`'s words
        return "no: --no-native-attention" if self.native == "off" else self.native

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
            model, probe = convert(self.spec, self.threads)
            self._compile(model)
            self._check_probe(probe)
            band = None
            if self._window is not None:
                band, band_probe = convert(self.spec, self.threads, banded=True)
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
                           "openvino": library_version("openvino")}, f, indent=1)
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

    # --- floe's attention kernel -------------------------------------------------------------

    def _load_kernel(self) -> str:
        """Loads floe's attention kernel into this engine's OpenVINO where it applies; returns
        what ``native`` shows: "yes: ...", or "no: why"."""
        from floe.engine import native

        if self.dtype == "int8" or self._config["INFERENCE_PRECISION_HINT"] != "bf16":
            return "no: the kernel computes in bf16, and this engine does not"
        if self.spec.model_type not in packing.BERT_FAMILIES or self._window is not None:
            return f"no: {self.spec.model_type} is not a BERT-family encoder"
        path, why = native.library(self.cache_dir)
        if path is None:
            log.info("floe's attention kernel does not run here: %s", why)
            return f"no: {why}"
        try:
            self._core.add_extension(path)
        except RuntimeError as exc:
            log.warning("floe's attention kernel did not load (%s): OpenVINO's attention runs", exc)
            return f"no: it did not load ({str(exc)[:200]})"
        self._kernel = path
        self._reach = native.reach()
        return f"yes: {path}"

    def _probe_feed(self) -> dict[str, np.ndarray]:
        """A padded batch of four inputs of different lengths, random ids."""
        rng = np.random.default_rng(7)
        low = min(5, self.spec.vocab_size - 1)
        seqs = [rng.integers(low, self.spec.vocab_size, n).astype(np.int32)
                for n in (min(40, self.spec.max_seq_length), 3, 17, 1)]
        feed = graph_feed(right_pad(self.spec, seqs, None))
        if TYPE_INPUT in self._inputs:
            feed[TYPE_INPUT] = np.zeros_like(feed["input_ids"])
        return feed

    def _on_kernel(self, request: Any, key: str, segments_input: str, feed: dict,
                   rows: Optional[np.ndarray] = None,
                   layout: str = "padded") -> tuple[Any, Optional[str]]:
        """(request, None): an infer request of graph ``key`` with its attention on floe's kernel
        (floe/engine/native/graph.py), checked against ``request``, the same graph untouched, on
        ``feed`` (``rows``: the output rows to compare, a packed batch's real ones); where the
        kernel has a reach (AMX), ``request`` itself, the kernel's kept in ``_short[layout]``.
        (request, why): ``request`` itself, where the rewrite does not apply or differs. The
        rewritten graph is cached as ``<key>-attention-<kernel build>-<rewrite version>``, a
        refusal beside it."""
        from floe.engine.native import graph

        root = openvino_dir(self.cache_dir)
        source = os.path.join(root, key, "model.xml")
        build = os.path.basename(os.path.dirname(self._kernel))
        name = f"{key}-attention-{build}-{graph.VERSION}"
        folder = os.path.join(root, name)
        xml = os.path.join(folder, "model.xml")
        with locked(os.path.join(root, name + ".lock")):
            why = read_failure(root, name)
            if why is None and not os.path.isfile(xml):
                why = self._rewrite_and_check(request, source, folder, segments_input, feed, rows)
            if why is not None:
                log.info("floe's attention kernel is not used for %s (%s)", key, why)
                return request, why
            try:
                compiled = self._core.compile_model(xml, "CPU", self._config)
            except RuntimeError as exc:
                why = f"the graph on the kernel did not compile: {str(exc)[:300]}"
                log.warning("%s; OpenVINO's attention runs", why)
                return request, why
        log.info("attention on floe's kernel%s: %s", native_reach_words(self._reach), xml)
        if self._reach is not None:
            self._short[layout] = compiled.create_infer_request()
            return request, None
        if request is self._request:
            self._compiled = compiled
        return compiled.create_infer_request(), None

    def _rewrite_and_check(self, request: Any, source: str, folder: str, segments_input: str,
                           feed: dict, rows: Optional[np.ndarray]) -> Optional[str]:
        """Writes ``source`` rewritten into ``folder`` when it matches and agrees with ``request``
        on ``feed``; else records and returns why not. Caller holds the lock."""
        import openvino as ov

        from floe.engine.native import graph

        root, name = os.path.dirname(folder), os.path.basename(folder)
        if not os.path.isfile(source):
            return "the untouched graph is not in the cache"
        tmp = tempfile.mkdtemp(prefix=f".{name}.", dir=root)
        try:
            model = self._core.read_model(source)
            try:
                count = graph.rewrite(model, segments_input)
            except (ValueError, RuntimeError) as exc:
                count, why = 0, f"the rewrite failed: {exc}"
            else:
                why = "no attention of 32-dimension heads in a shape it takes"
            if count:
                ov.save_model(model, os.path.join(tmp, "model.xml"), compress_to_fp16=False)
                rewritten = self._core.compile_model(os.path.join(tmp, "model.xml"), "CPU",
                                                     self._config).create_infer_request()
                outputs = []
                for r in (request, rewritten):
                    r.infer(feed, share_inputs=True)
                    out = np.array(r.get_output_tensor(0).data, dtype=np.float32)
                    out = out.reshape(-1, out.shape[-1])
                    outputs.append(out if rows is None else out[rows])
                why = kind_of(self.spec).probe_error(outputs[1], outputs[0], "bfloat16")
                if why is None:
                    os.rename(tmp, folder)
                    return None
                why = f"its output differs from the untouched graph's ({why})"
        except (OSError, RuntimeError) as exc:
            why = f"{type(exc).__name__}: {str(exc)[:300]}"
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._record_failure(root, name, why)
        return why

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
        takes_types = TYPE_INPUT in self._inputs  # (an embedding graph: single texts, all type 0)
        if self.packing and spans is None:
            layout = packing.plan([len(s) for s in sequences], self.packing)
            if layout is not None:   # smaller packed than padded: the packed graph
                feed = packing.packed_feed(sequences, layout[0], layout[1], self.spec.pooling,
                                           self.spec.pad_token_id)
                return {**feed.inputs, _PACKED_WHERE: feed.where,
                        _LONGEST: np.int64(max(len(s) for s in sequences))}
        padded = right_pad(self.spec, sequences, type_splits if takes_types else None)
        feed = graph_feed(padded)
        if spans is not None:
            feed[SPAN_INPUT] = span_weights(self.spec, padded.input_ids.shape[1], spans)
            feed[_SPAN_ROWS] = span_rows(spans)
            return feed
        if takes_types and padded.token_type_ids is None:
            feed[TYPE_INPUT] = np.zeros_like(padded.input_ids)
        return feed

    def run(self, prepared: dict[str, np.ndarray]) -> np.ndarray:
        """Forward and the task's head in one graph; returns (n, spec.dim) float32 (one row per
        span for a late-chunking batch)."""
        if _PACKED_WHERE in prepared:
            where = prepared[_PACKED_WHERE]
            feed = {k: v for k, v in prepared.items() if k not in (_PACKED_WHERE, _LONGEST)}
            request = self._within_reach("packed", int(prepared[_LONGEST]), self._packed_request)
            with self._lock:
                request.infer(feed, share_inputs=True)
                out = request.get_output_tensor(0).data
                return np.array(out.reshape(-1, out.shape[-1])[where], dtype=np.float32, copy=True)
        if SPAN_INPUT in prepared:
            rows = prepared[_SPAN_ROWS]
            feed = {k: v for k, v in prepared.items() if k != _SPAN_ROWS}
            banded = self._window is not None and self._window.banded(feed["input_ids"].shape[1])
            with self._lock:
                request = self._span_request(banded)
                request.infer(feed, share_inputs=True)
                out = np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True)
            return out[rows]
        request = self._within_reach("padded", prepared["input_ids"].shape[1], self._request)
        if self._band_request is not None and self._window.banded(prepared["input_ids"].shape[1]):
            request = self._band_request  # wider than the key span: the banded graph
        with self._lock:
            request.infer(prepared, share_inputs=True)
            return np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True)

    def _within_reach(self, layout: str, longest: int, untouched: Any) -> Any:
        """The kernel's request of the ``layout`` graph for a batch whose longest input is within
        its reach (a CPU with AMX), else ``untouched`` (the kernel's own where it has no reach)."""
        short = self._short.get(layout)
        return short if short is not None and longest <= self._reach[layout] else untouched

    def _span_request(self, banded: bool = False) -> Any:
        """Late chunking's graph, converted (or read from the cache) and compiled on first use,
        on the engine thread: a server that never late-chunks never pays for it. A
        sliding-window model's windows wider than its key span take a banded one, as plain
        batches do. Caller holds the lock."""
        if banded not in self._spans:
            key = cache_key(self.spec, spans=True) + ("-band" if banded else "")

            def convert() -> tuple[Any, Any]:
                model, (feed, want) = convert_spans(self.spec, self.threads, banded)
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
        with locked(os.path.join(root, key + ".lock")):
            failure = read_failure(root, key)
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
                if self._kernel is not None:
                    probe = packed_graph.example(self.spec, [9, 3, 17, 1, 30], seed=7)[1]
                    with self._lock:
                        self._packed_request, _ = self._on_kernel(
                            self._packed_request, cache_key(self.spec, packed=True), "segments",
                            probe.inputs, probe.where, layout="packed")
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
