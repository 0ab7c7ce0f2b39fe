"""Per-run statistics: rates from server-reported token counts, latency percentiles, errors, and
an open loop's results over time (``timeline``)."""

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
    refused: bool = False        # shed for load (HTTP 429, gRPC RESOURCE_EXHAUSTED), not an error
    retry_after: bool = False    # the refusal named a Retry-After

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
    Refusals (``Sample.refused``) are failures too, and are also counted apart with how fast
    they were answered.
    """
    ok = [s for s in samples if s.ok]
    refused = [s for s in samples if s.refused and not s.ok]
    ref_lat = [s.latency for s in refused]
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
        "refused": len(refused),
        "refusals_with_retry_after": sum(1 for s in refused if s.retry_after),
        "refusal_latency_s": {"p50": percentile(ref_lat, 50), "p99": percentile(ref_lat, 99)},
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


def timeline(samples: Sequence[Sample], t0: float, window: float = 1.0,
             duration: Optional[float] = None) -> list[dict]:
    """An open loop's results over time: the samples bucketed by *scheduled send time* into
    windows of ``window`` seconds from ``t0`` (the ``time.perf_counter()`` origin of the schedule).

    Every figure of a window is about the requests scheduled in it, so goodput is "of what was
    offered in this window, how much succeeded", and a slow answer counts in the window that
    asked for it, not the one it arrived in. Windows cover [0, duration) when ``duration`` is
    given (the last one may be shorter: its rates divide by its own width), else up to the last
    send. One dict per window:

    - ``t``, ``t_end``: the window, seconds since ``t0``;
    - ``offered``, ``ok``, ``refused``, ``errors``: requests scheduled in it, by outcome (a
      refusal is a 429 / RESOURCE_EXHAUSTED shed for load; ``errors`` are all other failures);
    - ``offered_rps``, ``ok_rps``, ``ok_tokens_per_s``, ``refused_rps``, ``errors_rps``: the
      same per second of the window (tokens of successful requests);
    - ``latency_s``: p50 / p90 / p99 of the successful requests (NaN without any);
    - ``refusal_latency_p50_s``: the median time to a refusal (NaN without any);
    - ``in_flight``: the time-weighted mean number of requests outstanding during the window
      (scheduled and not yet answered, those waiting for a --concurrency slot included).
    """
    if window <= 0:
        raise ValueError(f"window must be positive, got {window}")
    if not samples:
        return []
    if duration is not None:
        span = duration
    else:
        span = (math.floor(max(s.start - t0 for s in samples) / window) + 1) * window
    n = max(1, math.ceil(span / window - 1e-9))
    edges = [min(i * window, span) for i in range(n + 1)]
    buckets: list[list[Sample]] = [[] for _ in range(n)]
    busy = [0.0] * n  # request-seconds outstanding within each window
    for s in samples:
        a, b = s.start - t0, s.end - t0
        i = min(max(int(a // window), 0), n - 1)
        buckets[i].append(s)
        j = max(int(a // window), 0)
        while j < n and edges[j] < b:
            busy[j] += max(0.0, min(b, edges[j + 1]) - max(a, edges[j]))
            j += 1
    rows = []
    for i, bucket in enumerate(buckets):
        width = edges[i + 1] - edges[i]
        ok = [s for s in bucket if s.ok]
        ref = [s for s in bucket if s.refused and not s.ok]
        lat = [s.latency for s in ok]

        def per_s(x: float) -> float:
            return x / width if width > 0 else 0.0

        rows.append({
            "t": edges[i], "t_end": edges[i + 1],
            "offered": len(bucket), "ok": len(ok), "refused": len(ref),
            "errors": len(bucket) - len(ok) - len(ref),
            "offered_rps": per_s(len(bucket)), "ok_rps": per_s(len(ok)),
            "ok_tokens_per_s": per_s(sum(s.tokens for s in ok)),
            "refused_rps": per_s(len(ref)), "errors_rps": per_s(len(bucket) - len(ok) - len(ref)),
            "latency_s": {"p50": percentile(lat, 50), "p90": percentile(lat, 90),
                          "p99": percentile(lat, 99)},
            "refusal_latency_p50_s": percentile([s.latency for s in ref], 50),
            "in_flight": per_s(busy[i]),
        })
    return rows


def format_timeline(rows: Sequence[dict]) -> str:
    """One line per window of ``timeline``'s rows, for the log."""
    head = (f"{'t s':>7} {'offered/s':>9} {'ok/s':>8} {'tok/s':>9} {'refused/s':>9} {'err/s':>7} "
            f"{'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'refusal ms':>10} {'in flight':>9}")
    lines = [head]

    def ms(v: Optional[float]) -> str:
        return "-" if v is None or math.isnan(v) else f"{v * 1000:.1f}"

    for r in rows:
        lat = r["latency_s"]
        lines.append(
            f"{r['t']:>7.1f} {r['offered_rps']:>9.1f} {r['ok_rps']:>8.1f} {r['ok_tokens_per_s']:>9.0f} "
            f"{r['refused_rps']:>9.1f} {r['errors_rps']:>7.1f} {ms(lat['p50']):>8} {ms(lat['p90']):>8} "
            f"{ms(lat['p99']):>8} {ms(r['refusal_latency_p50_s']):>10} {r['in_flight']:>9.1f}")
    return "\n".join(lines)
