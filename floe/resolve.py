"""Settings resolved once: what the tree leaves to the machine, settled before any process starts.

A field of floe/config.py left at None means "the default for this machine and model": the batch
token budget, the fill floor, the number of front-end processes and their tokenizer threads.
``resolve(settings, spec, hardware)`` turns those into numbers, and every process downstream (the
front-end workers, the replicas) receives the settled tree and decides nothing again. It is pure:
the machine comes in as a ``Hardware`` (``Hardware.detect`` looks, the tests make one up), so a
test says exactly which machine it means.

Who calls it: ``floe serve`` (floe/entrypoints/cli.py, floe/frontend/server.py) for each served
model; the replica manager settles its batch section the same way (a no-op on a settled tree). A
replica without a front end (``python -m floe.replica`` by hand, the Ray Serve deployment) knows
its engine's device and settles its batch section with ``resolve_batch``.

Cores are counted here only (``usable_cores``: the cores this process may run on, which is what
its threads can use), and GPUs are found here only (``visible_gpus``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Optional

from floe.config import BatchSettings, Settings
from floe.errors import ConfigError

log = logging.getLogger("floe.resolve")

__all__ = ["Hardware", "resolve", "resolve_batch", "fit_max_length", "batch_budget",
           "batch_fill_floor", "frontend_workers", "tokenizer_threads", "usable_cores",
           "core_count", "visible_gpus", "CPU_BATCH_TOKENS", "GPU_BATCH_TOKENS",
           "CPU_MIN_BATCH_FILL"]

# Default --max-batch-tokens. On CPU a smaller budget measured faster on every CPU it was tried
# on (docs/benchmarks.md, sections 2 and 3): AMD Zen 5, bf16, the engine alone on uniform 16-256
# lengths at 2048 / 4096 / 8192 / 16384 padded tokens: 27,367 / 25,651 / 24,001 / 21,995 tokens/s
# (less padding, and the activations stay in cache), and floe serve over HTTP 2-4% faster at 2048
# than at 4096 on 50, 256 and 16-256 tokens in every round; AMD Zen 2, fp32: 5,786 / 5,737 /
# 5,438 / 5,259. (An older measurement, when each batch still paid a gRPC hop, found 2048 at half
# the rate: that cost is gone.) A GPU needs the larger batches to saturate.
CPU_BATCH_TOKENS = 2048
GPU_BATCH_TOKENS = 16384

# Default --min-batch-fill. On CPU a forward pass costs about its padded tokens, so a batch held to
# close lengths wastes less. In a simulation of the uniform 16-256 workload (the scheduler alone,
# a pass costing its padded tokens plus 2 ms, 16, 32 or 64 requests of 16 inputs queued per
# replica) the floor raised the fill from 0.87 / 0.92 / 0.96 to 0.93 / 0.95 / 0.97 and the real
# tokens per second by 3.5 / 1.7 / 0.9% (-1.3% at 64 if a pass had a fixed 10 ms). Served
# (docs/benchmarks-history.md, "The fill floor, served"): fill 0.90 -> 0.95 and +26% / +51% tokens/s in
# two rounds with the OpenVINO engine. 0.95 against 0.9, served on AMD Zen 4 (docs/benchmarks.md,
# section 2), medians of 3 rounds in two runs: uniform 16-256 +1.1 / +1.6% (fill 0.971 -> 0.979),
# standard-library prose +4.7 / +2.2% (fill 0.910 -> 0.961); 0.98 was no better than 0.9. On a
# GPU a pass has a fixed cost that larger batches amortize: off.
CPU_MIN_BATCH_FILL = 0.95

# Default --frontend-workers on GPU hosts: one front-end process per this many cores left beside
# the replicas, at most MAX_DEFAULT_FRONTENDS (past that the replicas, not the front end, are the
# limit).
CORES_PER_FRONTEND = 4
MAX_DEFAULT_FRONTENDS = 8


# --- the machine --------------------------------------------------------------------------------

def usable_cores() -> list[int]:
    """The cores this process may run on (its affinity, which a container or ``taskset`` narrows);
    every count of cores in floe is this one."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def core_count() -> int:
    """How many cores this process may run on (``usable_cores``), at least 1."""
    return max(1, len(usable_cores()))


def visible_gpus(device: str, env: Optional[dict] = None) -> list[str]:
    """GPU ids this process may use, found without importing torch (the front end never does)."""
    env = os.environ if env is None else env
    if device == "cpu":
        return []
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        return [d.strip() for d in cvd.split(",") if d.strip() and d.strip() != "-1"]
    try:
        n = len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        n = 0
    return [str(i) for i in range(n)]


@dataclass(frozen=True)
class Hardware:
    """What the settings are resolved against: the GPUs the replicas may use and the cores."""

    gpus: tuple[str, ...] = ()
    cores: tuple[int, ...] = (0,)

    @property
    def on_gpu(self) -> bool:
        """Whether the replicas compute on GPUs (else on these cores)."""
        return bool(self.gpus)

    @classmethod
    def detect(cls, device: str = "auto", env: Optional[dict] = None) -> "Hardware":
        """This machine, for ``--device device``."""
        return cls(gpus=tuple(visible_gpus(device, env)), cores=tuple(usable_cores()))


# --- the rules (pure) ---------------------------------------------------------------------------

def batch_budget(asked: Optional[int], on_gpu: bool, model_max_length: int) -> int:
    """The batch token budget replicas run with.

    ``asked`` (--max-batch-tokens) when given. Otherwise 16384 on a GPU and 2048 on CPU, raised
    to the model's max length (so its longest input still batches) but never past 16384.
    """
    if asked is not None:
        return asked
    if on_gpu:
        return GPU_BATCH_TOKENS
    return min(GPU_BATCH_TOKENS, max(CPU_BATCH_TOKENS, model_max_length))


def batch_fill_floor(asked: Optional[float], on_gpu: bool) -> float:
    """The fill floor replicas batch with: ``asked`` (--min-batch-fill) when given, else 0.95 on
    CPU and 0 on GPUs."""
    if asked is not None:
        return asked
    return 0.0 if on_gpu else CPU_MIN_BATCH_FILL


def resolve_batch(batch: BatchSettings, on_gpu: bool, model_max_length: int) -> BatchSettings:
    """The batch section with its budget and fill floor settled (the same section when both
    already are)."""
    budget = batch_budget(batch.max_batch_tokens, on_gpu, model_max_length)
    floor = batch_fill_floor(batch.min_batch_fill, on_gpu)
    if (budget, floor) == (batch.max_batch_tokens, batch.min_batch_fill):
        return batch
    return dataclasses.replace(batch, max_batch_tokens=budget, min_batch_fill=floor)


def frontend_workers(settings: Settings, gpus, cores) -> int:
    """How many front-end processes ``floe serve`` runs.

    ``--frontend-workers`` when given. Several models: one (front-end workers route to one
    model's replicas). Otherwise: with CPU replicas the cores compute embeddings and one front end
    (whose tokenizer threads already use every core) is right; with GPU replicas the cores are
    free for the front end: one process per 4 cores left beside one core per replica, at least 1,
    at most 8 (past that the replicas, not the front end, are the limit).
    """
    asked = settings.server.frontend_workers
    if asked is not None:
        return asked
    if not gpus or settings.model.also_serve:
        return 1
    free = max(0, len(cores) - settings.replicas.num_replicas)
    return max(1, min(MAX_DEFAULT_FRONTENDS, free // CORES_PER_FRONTEND))


def tokenizer_threads(settings: Settings, frontends: int, cores) -> int:
    """Tokenizer threads per front-end process: --tokenization-workers, else the cores shared
    between the front ends (at least 1 each). Each thread runs one library call at a time on its
    own (TokenizerPool's library_threads=False), so these threads are all the tokenizing
    parallelism a front end has."""
    asked = settings.server.tokenization_workers
    return asked or max(1, len(cores) // max(1, frontends))


def fit_max_length(settings: Settings, model_max_length: int) -> Settings:
    """Keeps the longest input inside the batch budget (the scheduler's invariant).

    A model whose max length exceeds the budget (Qwen3-Embedding: 32768) would otherwise form
    batches over budget. With auto-truncate the max length is lowered to the budget, with a
    notice; without it the server refuses to start, naming both settings (TEI does the same).
    ``settings.batch.max_batch_tokens`` must be settled.
    """
    budget = settings.batch.max_batch_tokens
    if model_max_length <= budget:
        return settings
    if not settings.server.auto_truncate:
        raise ConfigError(
            f"the model's max length ({model_max_length} tokens) is over --max-batch-tokens "
            f"({budget}); raise --max-batch-tokens, lower --max-seq-length, or enable --auto-truncate")
    log.warning("max length lowered from %d to --max-batch-tokens %d tokens; raise "
                "--max-batch-tokens to serve longer inputs", model_max_length, budget)
    return dataclasses.replace(settings, model=dataclasses.replace(settings.model, max_seq_length=budget))


def resolve_server(settings: Settings, hardware: Hardware) -> Settings:
    """The front end's share: how many front-end processes, how many tokenizer threads each."""
    srv = settings.server
    frontends = frontend_workers(settings, hardware.gpus, hardware.cores)
    threads = tokenizer_threads(settings, frontends, hardware.cores)
    if (frontends, threads) == (srv.frontend_workers, srv.tokenization_workers):
        return settings
    return dataclasses.replace(settings, server=dataclasses.replace(
        srv, frontend_workers=frontends, tokenization_workers=threads))


def resolve(settings: Settings, spec, hardware: Hardware) -> Settings:
    """The tree with every machine default settled, for the model ``spec`` on ``hardware``.

    - ``batch.max_batch_tokens`` and ``batch.min_batch_fill``: ``resolve_batch`` (the device's
      defaults, the budget raised to the model's max length on CPU);
    - ``model.max_seq_length``: lowered to the budget when the model's is longer (auto-truncate),
      else a ConfigError (``fit_max_length``);
    - ``server.frontend_workers`` and ``server.tokenization_workers``: ``resolve_server``.

    Values already given are kept, so resolving a resolved tree returns it unchanged. The
    replicas' cores and threads are split from ``hardware`` by floe/fleet/placement.py.
    """
    batch = resolve_batch(settings.batch, hardware.on_gpu, spec.max_seq_length)
    if batch is not settings.batch:
        settings = dataclasses.replace(settings, batch=batch)
    settings = fit_max_length(settings, spec.max_seq_length)
    return resolve_server(settings, hardware)
