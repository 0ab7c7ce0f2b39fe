"""Where each replica runs: pure functions of the settings, the visible GPUs and the CPU cores."""

from __future__ import annotations

import os
from typing import Optional

from floe.config import Settings
from floe.errors import ConfigError
from floe.protocol import Placement

__all__ = ["Placement", "plan_placement", "visible_gpus", "usable_cores", "frontend_workers",
           "batch_budget", "batch_fill_floor", "CPU_BATCH_TOKENS", "GPU_BATCH_TOKENS"]

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
# two rounds with the OpenVINO engine. On a GPU a pass has a fixed cost that larger batches
# amortize: off.
CPU_MIN_BATCH_FILL = 0.9


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


def usable_cores() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def plan_placement(settings: Settings, gpus: list[str], cores: list[int]) -> list[Placement]:
    """Places every replica (pure: the tests call it with made-up GPUs and cores).

    GPU (when ``gpus`` is non-empty): ``dedicated`` gives replica i GPU gpus[i % num_gpus];
    ``shared`` gives every replica all num_gpus GPUs. Each replica's memory fraction is
    gpu_memory_utilization divided by the number of replicas on its GPU.
    CPU: the cores are split into num_replicas disjoint contiguous sets (when there are fewer cores
    than replicas, replica i gets core i mod cores); threads = cores in the set unless
    threads_per_replica says otherwise.
    """
    r = settings.replicas
    n = r.num_replicas
    out: list[Placement] = []
    if gpus:
        if r.num_gpus > len(gpus):
            raise ConfigError(f"--num-gpus {r.num_gpus} but only {len(gpus)} GPU(s) are visible "
                              f"({','.join(gpus)})")
        use = gpus[: r.num_gpus]
        for i in range(n):
            if r.gpu_assignment == "dedicated":
                sharing = len(range(i % r.num_gpus, n, r.num_gpus))
                out.append(Placement(cuda_visible_devices=use[i % r.num_gpus],
                                     gpu_memory_fraction=r.gpu_memory_utilization / sharing,
                                     threads=r.threads_per_replica))
            else:
                out.append(Placement(cuda_visible_devices=",".join(use),
                                     gpu_memory_fraction=r.gpu_memory_utilization / n,
                                     threads=r.threads_per_replica))
        return out
    cores = sorted(cores) or [0]
    for i in range(n):
        if len(cores) >= n:
            base, extra = divmod(len(cores), n)
            start = i * base + min(i, extra)
            mine = cores[start: start + base + (1 if i < extra else 0)]
        else:
            mine = [cores[i % len(cores)]]
        out.append(Placement(cpu_cores=mine, threads=r.threads_per_replica or len(mine)))
    return out


def frontend_workers(settings: Settings, gpus: list[str], cores: list[int]) -> int:
    """How many front-end processes ``floe serve`` runs (pure).

    ``--frontend-workers`` when given. Otherwise: with CPU replicas the cores compute embeddings
    and one front end (whose tokenizer threads already use every core) is right; with GPU replicas
    the cores are free for the front end: one process per 4 cores left beside one core per
    replica, at least 1, at most 8 (past that the replicas, not the front end, are the limit).
    """
    asked = settings.server.frontend_workers
    if asked is not None:
        return asked
    if not gpus:
        return 1
    free = max(0, len(cores) - settings.replicas.num_replicas)
    return max(1, min(8, free // 4))


def batch_fill_floor(asked: Optional[float], on_gpu: bool) -> float:
    """The fill floor replicas batch with (pure): ``asked`` (--min-batch-fill) when given, else
    0.9 on CPU and 0 on GPUs."""
    if asked is not None:
        return asked
    return 0.0 if on_gpu else CPU_MIN_BATCH_FILL


def batch_budget(asked: Optional[int], on_gpu: bool, model_max_length: int) -> int:
    """The batch token budget replicas run with (pure).

    ``asked`` (--max-batch-tokens) when given. Otherwise 16384 on a GPU and 2048 on CPU, raised
    to the model's max length (so its longest input still batches) but never past 16384.
    """
    if asked is not None:
        return asked
    if on_gpu:
        return GPU_BATCH_TOKENS
    return min(GPU_BATCH_TOKENS, max(CPU_BATCH_TOKENS, model_max_length))
