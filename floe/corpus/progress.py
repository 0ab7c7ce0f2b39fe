"""Progress of a corpus job: a bar on a terminal (tqdm), log lines otherwise, a summary line."""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Optional

log = logging.getLogger("floe.corpus")

LOG_EVERY_S = 10.0


def _rate(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"


def _duration(s: float) -> str:
    s = int(max(0, s))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class Progress:
    """Thread-safe counters of rows and tokens. ``update`` is called once per written shard."""

    def __init__(self, total_rows: int, done_rows: int, enabled: Optional[bool] = None,
                 stream=None) -> None:
        self.stream = stream or sys.stderr
        self.total = total_rows
        self.start_rows = done_rows
        self.rows = done_rows
        self.tokens = 0
        self.skipped = 0
        self.t0 = time.monotonic()
        self._last_log = self.t0
        # The steady rate: rows written after the first shard over the time since it was written.
        # Start-up (engine load, a Ray instance, the first shard's pipeline fill) falls before it,
        # so two paths can be compared at the rate a long job runs at.
        self._first_at: Optional[float] = None
        self._first_rows = 0
        self._last_at = self.t0
        self._lock = threading.Lock()
        tty = enabled if enabled is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self._bar = None
        if tty:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total_rows, initial=done_rows, unit="row", file=self.stream,
                                 dynamic_ncols=True, smoothing=0.1, desc="embedding")

    def update(self, rows: int, tokens: int, skipped: int = 0) -> None:
        with self._lock:
            self.rows += rows
            self.tokens += tokens
            self.skipped += skipped
            self._last_at = time.monotonic()
            if self._first_at is None:
                self._first_at, self._first_rows = self._last_at, self.rows
            elapsed = time.monotonic() - self.t0
            tps = self.tokens / elapsed if elapsed > 0 else 0.0
            if self._bar is not None:
                self._bar.update(rows)
                self._bar.set_postfix_str(f"{_rate(tps)} tokens/s", refresh=False)
                return
            now = time.monotonic()
            if now - self._last_log >= LOG_EVERY_S or self.rows >= self.total:
                self._last_log = now
                new_rows = self.rows - self.start_rows
                rps = new_rows / elapsed if elapsed > 0 else 0.0
                eta = (self.total - self.rows) / rps if rps > 0 else float("inf")
                pct = 100.0 * self.rows / self.total if self.total else 100.0
                log.info("%d/%d rows (%.1f%%), %s rows/s, %s tokens/s, ETA %s", self.rows, self.total,
                         pct, _rate(rps), _rate(tps), _duration(eta) if eta != float("inf") else "?")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def steady_rows_per_s(self) -> Optional[float]:
        """Rows/s from the first written shard to the last; None with fewer than two shards."""
        if self._first_at is None or self._last_at <= self._first_at:
            return None
        return (self.rows - self._first_rows) / (self._last_at - self._first_at)

    def summary(self, output: str, written_rows: int, skipped: int, wall_s: float) -> str:
        new_rows = self.rows - self.start_rows
        resumed = f" (resumed: {self.start_rows} rows were already written)" if self.start_rows else ""
        steady = self.steady_rows_per_s()
        after = f", {steady:.1f} rows/s after the first shard" if steady is not None else ""
        return (f"embedded {new_rows} rows in {wall_s:.1f} s ({_rate(new_rows / wall_s if wall_s else 0)} "
                f"rows/s, {_rate(self.tokens / wall_s if wall_s else 0)} tokens/s{after}){resumed}; "
                f"{output}: {written_rows} rows, {skipped} skipped")


# --- a Ray job's profile (ray_pool.py logs it; pure, so tested without Ray) ---------------------

def fixed_cost(statuses: list[dict], t_start: float, t_connected: float) -> str:
    """Where the Ray job's time went before its steady state, from the actors' status rows (wall
    clock: the driver's and the actors' on one machine, or clocks kept in step). For the first
    actor ready: connecting to (or starting) Ray; until the actor's creation reached its worker
    process (the actor's placement, the process' start unless Ray had one waiting); loading the
    actor's class (importing pyarrow and floe); its
    constructor (model, tokenizer, engine); then until its first shard started. One line,
    logged at the end of a job."""
    if not statuses:
        return f"Ray: connect {t_connected - t_start:.1f} s; no shard ran"
    r = min(statuses, key=lambda r: r["ready_at"])
    first = min(x["started_at"] for x in statuses)
    built = r["ready_at"] - r["init_s"]
    process = ("a process Ray had started before the job" if r["process_at"] <= t_connected else
               f"a process started +{r['process_at'] - t_connected:.1f} s")
    nodes = sorted({x["node"] for x in statuses})
    # the end's tail: from the first node out of shards to the last shard's end (one node waits)
    last = {n: max(x["ended_at"] for x in statuses if x["node"] == n) for n in nodes}
    tail = max(last.values()) - min(last.values())
    # the start's stagger: a node whose actor was placed or built later starts later
    latest = max(min(x["started_at"] for x in statuses if x["node"] == n) for n in nodes)
    return (f"Ray fixed cost: connect {t_connected - t_start:.1f} s; first actor's creation "
            f"reached its process +{r['imported_at'] - t_connected:.1f} s ({process}), its class "
            f"loaded in {built - r['imported_at']:.1f} s, its constructor {r['init_s']:.1f} s "
            f"(model, engine); first shard started {first - r['ready_at']:.1f} s after that, "
            f"{first - t_start:.1f} s into the job (the last node's {latest - t_start:.1f} s); "
            f"{len(statuses)} shard(s) on {len(nodes)} node(s), "
            f"the last ending {tail:.1f} s after the first node's last; {node_rates(statuses)}")


def node_rates(statuses: list[dict]) -> str:
    """Each node's rate while it computed (its rows over the span from its first shard's start
    to its last shard's end) and their sum: the cluster's steady rate, which neither Ray's fixed
    cost at the start nor the end's tail (one node idle while another ends its last shard) is in."""
    rates = {}
    for n in sorted({x["node"] for x in statuses}):
        mine = [x for x in statuses if x["node"] == n]
        span = max(x["ended_at"] for x in mine) - min(x["started_at"] for x in mine)
        rates[n] = sum(x["rows"] for x in mine) / span if span > 0 else 0.0
    return ("node rates " + ", ".join(f"{n} {r:.1f}" for n, r in rates.items())
            + f" rows/s, together {sum(rates.values()):.1f} rows/s")
