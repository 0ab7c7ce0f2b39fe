"""`floe bench --plot`: an open-loop run's timeline (``stats.timeline``) drawn as one PNG.

Three panels against seconds since the start: requests/s offered, succeeded (goodput), refused
and failed; latency p50 / p99 of successful requests and the median time to a refusal, on a log
scale; requests outstanding. matplotlib is optional (``pip install 'floe[plot]'``) and imported
only here, with the non-interactive Agg backend.
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Optional, Sequence

from floe.bench.workload import BenchError

INSTALL_HINT = "pip install 'floe[plot]'"


def require_matplotlib() -> None:
    """Fails early, before a long run, when --plot cannot be drawn."""
    if importlib.util.find_spec("matplotlib") is None:
        raise BenchError(f"--plot needs matplotlib: {INSTALL_HINT}")


def plot_path(path: str, batch_size: int, n_batch_sizes: int) -> str:
    """``path`` itself for a run of one batch size; else ``stem-b<size>.png`` per batch size."""
    if n_batch_sizes == 1:
        return path
    stem, ext = os.path.splitext(path)
    return f"{stem}-b{batch_size}{ext or '.png'}"


def _nan(v: Optional[float]) -> float:
    return math.nan if v is None else v


def plot_timeline(rows: Sequence[dict], path: str, title: str = "",
                  schedule: Optional[Sequence[tuple[float, float]]] = None) -> str:
    """Draws ``rows`` (``stats.timeline``'s windows) into the PNG ``path`` and returns it.
    ``schedule``, when given, is the target rate as (t, requests/s) points, drawn as a line."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure  # a Figure without pyplot: no global state, no GUI

    if not rows:
        raise BenchError("nothing to plot: the run has no samples")
    # each window's value holds from its start to its end: step plots with one point more
    t = [r["t"] for r in rows] + [rows[-1]["t_end"]]

    def steps(key, sub=None):
        vals = [_nan(r[key][sub] if sub else r[key]) for r in rows]
        return vals + vals[-1:]

    fig = Figure(figsize=(10, 9), constrained_layout=True)
    ax_rate, ax_lat, ax_fly = fig.subplots(3, 1, sharex=True, height_ratios=[3, 3, 2])
    if schedule:
        ax_rate.plot([p[0] for p in schedule], [p[1] for p in schedule], color="0.6",
                     linestyle="--", linewidth=1, label="schedule")
    ax_rate.step(t, steps("offered_rps"), where="post", color="tab:blue", linewidth=2.5,
                 label="offered")
    ax_rate.step(t, steps("ok_rps"), where="post", color="tab:green", label="goodput (ok)")
    ax_rate.step(t, steps("refused_rps"), where="post", color="tab:orange", label="refused")
    if any(r["errors"] for r in rows):
        ax_rate.step(t, steps("errors_rps"), where="post", color="tab:red", label="errors")
    ax_rate.set_ylabel("requests/s (by send time)")
    ax_rate.set_ylim(bottom=0)
    ax_rate.legend(loc="upper left", fontsize="small")
    ax_rate.grid(alpha=0.3)

    ax_lat.step(t, steps("latency_s", "p50"), where="post", color="tab:green", label="p50 ok")
    ax_lat.step(t, steps("latency_s", "p99"), where="post", color="tab:purple", label="p99 ok")
    if any(r["refused"] for r in rows):
        ax_lat.step(t, steps("refusal_latency_p50_s"), where="post", color="tab:orange",
                    linestyle=":", label="p50 refusal")
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("latency, s (log)")
    ax_lat.legend(loc="upper left", fontsize="small")
    ax_lat.grid(alpha=0.3, which="both")

    ax_fly.step(t, steps("in_flight"), where="post", color="tab:gray")
    ax_fly.set_ylabel("outstanding (mean)")
    ax_fly.set_ylim(bottom=0)
    ax_fly.set_xlabel("seconds since start (windows by scheduled send time)")
    ax_fly.grid(alpha=0.3)
    ax_fly.set_xlim(t[0], t[-1])
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=100, format="png")
    return path
