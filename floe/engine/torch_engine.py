"""The torch engine: backbone forward -> the model kind's head, in the device's best precision.

The model's kind (floe/kinds/) names the transformers class that loads the backbone with its head
(``Kind.auto_class``), the output the head reads and the head itself (``Kind.torch_head``): an
embedding model's pooling -> Dense over AutoModel's hidden states, a cross-encoder's logits
(AutoModelForSequenceClassification) with no activation, sentence-transformers' SpladePooling of
AutoModelForMaskedLM's logits.

The model is cast to its dtype for real (``model.to(bfloat16)``), not run under autocast: on the
CPUs floe targets, oneDNN's bf16 kernels (AMX / avx512_bf16) are several times faster than fp32,
and autocast's per-op casts eat most of that. Pooling sums are accumulated in float32 (as
sentence-transformers does) so bf16 does not lose the mean; the result leaves as float32.

Normalize, Matryoshka slicing and the output dtype are per-request and belong to the replica.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Optional, Sequence

import numpy as np
import torch

from floe.engine.base import Engine, head_summary, right_pad, span_rows, span_weights
from floe.engine.hardware import cpu_flags, cpu_has_fast_bf16  # noqa: F401  (re-exported)
from floe.engine.unpadded import pack_indices, unpadded_forward
from floe.kinds import kind_of
from floe.errors import ConfigError, ModelLoadError
from floe.models.spec import DenseSpec, ModelSpec

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device_and_dtype(device: str, dtype: str, spec: Optional[ModelSpec] = None,
                          *, cuda_available: Optional[bool] = None,
                          cuda_capability: Optional[tuple[int, int]] = None,
                          flags: Optional[set[str]] = None) -> tuple[str, str]:
    """Resolves ("auto"|"cpu"|"cuda"[:i], "auto"|dtype) to a torch device string and a dtype name.

    auto device: cuda when available, else cpu. auto dtype: bfloat16 on CPUs with AMX or
    avx512_bf16 and on GPUs with compute capability >= 8 (Ampere+), float16 on older GPUs,
    float32 otherwise; models whose activations overflow in float16 (``spec.refuse_float16``) get
    float32 instead of float16, and an explicit float16 for them is a ConfigError. The keyword
    arguments stand in for the hardware in tests.
    """
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if device == "auto":
        device = "cuda:0" if cuda_available else "cpu"
    elif device == "cuda":
        device = "cuda:0"
    if device.startswith("cuda"):
        if not cuda_available:
            raise ConfigError(f"--device {device}: no CUDA device is available (use --device cpu)")
    elif device != "cpu":
        raise ConfigError(f"--device {device!r} is not one of auto, cpu, cuda")

    refuse16 = bool(spec is not None and spec.refuse_float16)
    if dtype == "int8":
        from floe.engine.choice import INT8_NEEDS_OPENVINO

        raise ConfigError(INT8_NEEDS_OPENVINO + "; the torch engine runs float32, bfloat16 and "
                          "float16")
    if dtype not in ("auto", *_DTYPES):
        raise ConfigError(f"--dtype {dtype!r} is not one of auto, float32, bfloat16, float16")
    if dtype == "float16" and refuse16:
        raise ConfigError(
            f"--dtype float16 is refused for {spec.model_type} models: their activations overflow "
            "in float16 and give NaN embeddings; use bfloat16 or float32")
    if device == "cpu":
        fast_bf16 = cpu_has_fast_bf16(flags)
        if dtype == "auto":
            return device, "bfloat16" if fast_bf16 else "float32"
        if dtype == "bfloat16" and not fast_bf16:
            log.warning("bfloat16 on a CPU without AMX/avx512_bf16 runs emulated and is slow")
        if dtype == "float16":
            log.warning("float16 on CPU is slow and less accurate than bfloat16")
        return device, dtype
    if dtype != "auto":
        return device, dtype
    if cuda_capability is None:
        cuda_capability = torch.cuda.get_device_capability(torch.device(device))
    if cuda_capability[0] >= 8:
        return device, "bfloat16"
    return device, "float32" if refuse16 else "float16"


_ACTIVATIONS = {
    "Identity": lambda x: x,
    "Tanh": torch.tanh,
    "ReLU": torch.relu,
    "GELU": torch.nn.functional.gelu,
    "Sigmoid": torch.sigmoid,
    "SiLU": torch.nn.functional.silu,
}


def _load_state(folder: str) -> dict[str, torch.Tensor]:
    st = os.path.join(folder, "model.safetensors")
    if os.path.isfile(st):
        from safetensors.torch import load_file

        return load_file(st)
    return torch.load(os.path.join(folder, "pytorch_model.bin"), map_location="cpu", weights_only=True)


class _Dense:
    """One ST Dense module: act(x W^T + b) (+ residual), weights from its folder."""

    def __init__(self, d: DenseSpec, device: torch.device, dtype: torch.dtype) -> None:
        state = _load_state(d.path)
        try:
            self.weight = state["linear.weight"].to(device=device, dtype=dtype)
            self.bias = state["linear.bias"].to(device=device, dtype=dtype) if d.bias else None
            self.residual = None
            if d.use_residual and d.in_features != d.out_features:
                self.residual = state["residual.weight"].to(device=device, dtype=dtype)
        except KeyError as exc:
            raise ModelLoadError(f"{d.path}: Dense weights lack {exc}") from None
        if tuple(self.weight.shape) != (d.out_features, d.in_features):
            raise ModelLoadError(f"{d.path}: weight shape {tuple(self.weight.shape)} does not match "
                                 f"({d.out_features}, {d.in_features})")
        self.act = _ACTIVATIONS[d.activation.rsplit(".", 1)[-1]]
        self.use_residual = d.use_residual

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(torch.nn.functional.linear(x, self.weight, self.bias))
        if self.use_residual:
            out = out + (x if self.residual is None else torch.nn.functional.linear(x, self.residual))
        return out


class Prepared:
    """A padded batch on the device: what ``run`` consumes."""

    __slots__ = ("input_ids", "attention_mask", "lengths", "uniform", "token_type_ids",
                 "span_weights", "span_rows", "rows", "slots")

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, lengths: torch.Tensor,
                 uniform: bool, token_type_ids: Optional[torch.Tensor] = None,
                 span_weights: Optional[torch.Tensor] = None,
                 span_rows: Optional[torch.Tensor] = None,
                 rows: Optional[torch.Tensor] = None, slots: Optional[torch.Tensor] = None) -> None:
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.lengths = lengths
        self.uniform = uniform  # all rows the same length: no padding at all
        self.token_type_ids = token_type_ids  # None: all type 0
        self.span_weights = span_weights  # late chunking: (n, spans, length) pooling weights
        self.span_rows = span_rows        # (n, spans) bool: the real spans
        # the packed forward's indices (floe/engine/unpadded.py pack_indices); None: run padded
        self.rows = rows
        self.slots = slots


class TorchEngine(Engine):
    """Runs one model folder (described by ``spec``) with transformers' AutoModel."""

    backend = "torch"

    def __init__(self, spec: ModelSpec, device: str = "auto", dtype: str = "auto",
                 threads: Optional[int] = None, unpad: bool = True) -> None:
        """``unpad``: run a BERT-family encoder's dense layers on real tokens only
        (floe/engine/unpadded.py); the OpenVINO converter traces the padded forward."""
        self.spec = spec
        self.kind = kind_of(spec)
        self.device, self.dtype = pick_device_and_dtype(device, dtype, spec)
        if threads:
            torch.set_num_threads(int(threads))
        self._torch_device = torch.device(self.device)
        self._torch_dtype = _DTYPES[self.dtype]
        self._lock = threading.Lock()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a resolved local folder never needs the hub
        import transformers
        from transformers import AutoConfig
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # replica logs are lines, not progress bars

        folder = spec.backbone_path
        auto = getattr(transformers, self.kind.auto_class)
        try:
            config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
            kwargs: dict[str, Any] = {"config": config, "dtype": self._torch_dtype}
            try:
                model = auto.from_pretrained(folder, attn_implementation="sdpa", **kwargs)
            except (ValueError, ImportError) as exc:
                # Architectures without an SDPA path fall back to their eager attention.
                log.info("sdpa attention unavailable for %s (%s); using eager", spec.architecture, exc)
                model = auto.from_pretrained(folder, attn_implementation="eager", **kwargs)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"cannot load the model in {folder}: {type(exc).__name__}: "
                                 f"{str(exc)[:300]}") from None
        model.to(device=self._torch_device, dtype=self._torch_dtype)
        model.eval()
        self.model = model
        import inspect

        params = inspect.signature(model.forward).parameters
        self._takes_token_types = "token_type_ids" in params
        # Backbones with sliding-window layers run floe's own forward (masks that trace, a band
        # that costs n x window): floe/engine/attention.py.
        self._windowed = None
        if self.kind.model_output == "last_hidden_state":   # a backbone's states, not a head's
            from floe.engine.attention import windowed_forward

            self._windowed = windowed_forward(model, folder)
        # pooling as a matmul (floe/kinds/embed.py pool): set by the OpenVINO converter only
        self.matmul_pooling = False
        self._unpadded = None
        if unpad and self._windowed is None and self.kind.model_output == "last_hidden_state":
            self._unpadded = unpadded_forward(model)
        self._dense = [_Dense(d, self._torch_device, self._torch_dtype) for d in spec.dense]
        log.info("loaded %s on %s in %s (%s)", spec.name, self.device, self.dtype, head_summary(spec))

    # --- stages ------------------------------------------------------------------------------

    def prepare(self, sequences: Sequence[np.ndarray],
                type_splits: Optional[np.ndarray] = None,
                spans: Optional[Sequence[np.ndarray]] = None) -> Prepared:
        """Right-pads int32 id arrays with the model's pad id into (n, longest) device tensors,
        with token types from ``type_splits`` where the backbone has them (``Engine.prepare``)."""
        padded = right_pad(self.spec, sequences, type_splits)
        dev = self._torch_device
        packed = None
        if self._unpadded is not None and not padded.uniform:
            packed = pack_indices(padded.attention_mask)
        non_blocking = dev.type == "cuda"

        def put(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(dev, non_blocking=non_blocking)

        return Prepared(
            input_ids=put(padded.input_ids),
            attention_mask=put(padded.attention_mask),
            lengths=put(padded.lengths),
            uniform=padded.uniform,
            token_type_ids=None if padded.token_type_ids is None else put(padded.token_type_ids),
            span_weights=None if spans is None else put(
                span_weights(self.spec, padded.input_ids.shape[1], spans)),
            span_rows=None if spans is None else put(span_rows(spans)),
            rows=None if packed is None else put(packed[0]),
            slots=None if packed is None else put(packed[1]),
        )

    def run(self, prepared: Prepared) -> np.ndarray:
        """Forward and the task's head; returns (n, spec.dim) float32 (see floe/engine/base.py)."""
        return self.finish(self.forward(prepared))

    def forward(self, prepared: Prepared) -> torch.Tensor:
        """The model and its kind's head, left on the device (a GPU copies it in ``finish``
        while the next batch runs)."""
        with self._lock, torch.inference_mode():
            return self._head(self._forward(prepared), prepared)

    def finish(self, output: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return output.float().cpu().numpy()

    def _forward(self, p: Prepared) -> torch.Tensor:
        """The output the kind's head reads: hidden states or logits (``Kind.model_output``)."""
        if self._windowed is not None:
            return self._windowed(p.input_ids, p.attention_mask, uniform=p.uniform).last_hidden_state
        if p.rows is not None:
            return self._unpadded(p.input_ids, p.attention_mask, p.rows, p.slots, p.lengths,
                                  p.token_type_ids)
        kwargs: dict[str, Any] = {"input_ids": p.input_ids}
        # A batch without padding needs no mask, which lets SDPA take its unmasked (faster) path.
        # RoBERTa-likes still need the pad id only for position ids, which ids alone determine.
        kwargs["attention_mask"] = None if p.uniform else p.attention_mask
        if self._takes_token_types:
            kwargs["token_type_ids"] = (torch.zeros_like(p.input_ids) if p.token_type_ids is None
                                        else p.token_type_ids)
        out = self.model(**kwargs)
        if isinstance(out, (tuple, list)):
            return out[0]
        return getattr(out, self.kind.model_output)

    def _head(self, out: torch.Tensor, p: Prepared) -> torch.Tensor:
        """(n, spec.dim) in the model's dtype: the kind's head (floe/kinds/)."""
        return self.kind.torch_head(self, out, p)

    # --- lifecycle ---------------------------------------------------------------------------

    def warmup(self, max_batch_tokens: int) -> None:
        """One forward at the full token budget (proves it fits), then a tiny one."""
        seq = self.spec.max_seq_length
        rows = max(1, int(max_batch_tokens) // seq)
        filler = min(1000, self.spec.vocab_size - 1)  # any in-vocabulary id that is not padding
        full = [np.full(seq, filler, dtype=np.int32)] * rows
        self.run(self.prepare(full))
        self.run(self.prepare([np.full(min(8, seq), filler, dtype=np.int32)]))
        if self._torch_device.type == "cuda":
            torch.cuda.synchronize(self._torch_device)

    def memory(self) -> tuple[int, int]:
        if self._torch_device.type != "cuda":
            return (0, 0)
        free, total = torch.cuda.mem_get_info(self._torch_device)
        return (int(total - free), int(total))
