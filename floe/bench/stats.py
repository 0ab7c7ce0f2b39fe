"""Per-run statistics: rates from server-reported token counts, latency percentiles, errors."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass
class Sample:
    """One request's outcome. ``start`` is when it was due to be sent (the scheduled time in an
    open loop, so waiting behind a slow request counts as latency); ``end`` when its answer came."""

    start: float
    end: float
    ok: bool
    sequences: int = 0
    tokens: int = 0
    server_tokens: bool = True   # tokens came from the server's report, not the client's count
    error: Optional[str] = None  # "http:429", "grpc:UNAVAILABLE", "transport:ConnectError", ...

    @property
    def latency(self) -> float:
        return self.end - self.start


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks, the same
    definition as numpy's default, so figures compare with other tools. NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside [0, 100]")
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(samples: Sequence[Sample], batch_size: int, elapsed: Optional[float] = None) -> dict:
    """The result row of one batch size.

    Rates count successful requests only and divide by the wall time from the first send to the
    last answer (or ``elapsed`` when given); latencies are of successful requests, in seconds.
    """
    ok = [s for s in samples if s.ok]
    if elapsed is None:
        elapsed = (max(s.end for s in samples) - min(s.start for s in samples)) if samples else 0.0
    lat = [s.latency for s in ok]
    tokens = sum(s.tokens for s in ok)
    seqs = sum(s.sequences for s in ok)
    sources = {s.server_tokens for s in ok}
    token_source = ("server" if sources == {True} else "client" if sources == {False}
                    else "mixed" if sources else "none")

    def rate(x: float) -> float:
        return x / elapsed if elapsed > 0 else 0.0

    return {
        "batch_size": batch_size,
        "requests": len(samples),
        "successful": len(ok),
        "failed": len(samples) - len(ok),
        "success_rate": len(ok) / len(samples) if samples else 0.0,
        "elapsed_s": elapsed,
        "requests_per_s": rate(len(ok)),
        "sequences_per_s": rate(seqs),
        "tokens_per_s": rate(tokens),
        "sequences": seqs,
        "tokens": tokens,
        "token_source": token_source,
        "mean_sequences_per_request": seqs / len(ok) if ok else 0.0,
        "mean_tokens_per_sequence": tokens / seqs if seqs else 0.0,
        "latency_s": {
            "mean": sum(lat) / len(lat) if lat else math.nan,
            "p50": percentile(lat, 50),
            "p90": percentile(lat, 90),
            "p99": percentile(lat, 99),
            "min": min(lat) if lat else math.nan,
            "max": max(lat) if lat else math.nan,
        },
        "errors": dict(sorted(Counter(s.error or "unknown" for s in samples if not s.ok).items())),
    }


def format_table(rows: Sequence[dict]) -> str:
    """A fixed-width table of result rows for the terminal."""
    head = (f"{'batch':>5} {'reqs':>6} {'ok%':>6} {'req/s':>9} {'seq/s':>9} {'tok/s':>10} "
            f"{'mean ms':>9} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9}  errors")
    lines = [head, "-" * len(head)]
    for r in rows:
        lat = r["latency_s"]

        def ms(v: Optional[float]) -> str:
            return "-" if v is None or math.isnan(v) else f"{v * 1000:.1f}"

        errs = ", ".join(f"{k}={v}" for k, v in r["errors"].items()) or "-"
        src = "" if r["token_source"] in ("server", "none") else f" (tokens: {r['token_source']} count)"
        lines.append(
            f"{r['batch_size']:>5} {r['requests']:>6} {100 * r['success_rate']:>6.1f} "
            f"{r['requests_per_s']:>9.1f} {r['sequences_per_s']:>9.1f} {r['tokens_per_s']:>10.0f} "
            f"{ms(lat['mean']):>9} {ms(lat['p50']):>9} {ms(lat['p90']):>9} {ms(lat['p99']):>9}  {errs}{src}")
    return "\n".join(lines)
