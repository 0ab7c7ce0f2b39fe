"""Where each replica runs: a pure function of the settings, the visible GPUs and the CPU cores
(found once, by floe/resolve.py's ``Hardware``)."""

from __future__ import annotations

from floe.config import Settings
from floe.errors import ConfigError
from floe.protocol import Placement

__all__ = ["Placement", "plan_placement"]


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
