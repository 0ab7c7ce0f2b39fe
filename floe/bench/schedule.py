"""Arrival-rate schedules for the open loop: a piecewise-constant rate and its Poisson arrivals.

A schedule is a rate function r(t) in requests/s over [0, duration):

- ``steady``: r(t) = rate.
- ``step``: rate before ``step_at`` seconds, ``step_rate`` from then on.
- ``burst``: ``rate``, except ``burst_rate`` during [k * burst_every, k * burst_every + burst_seconds)
  for k = 1, 2, ...: the first burst starts ``burst_every`` seconds in, after a stretch at the base
  rate to compare it with.

Arrivals are a non-homogeneous Poisson process with that rate, drawn exactly by time change: the
arrival times of a rate-1 process (cumulative sums of Exp(1) draws) are mapped through the
inverse of the integrated rate Lambda(t) = integral of r over [0, t]. The same ``rng`` state gives
the same arrivals. This module is pure: no clock, no IO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from floe.bench.workload import BenchError

SCHEDULES = ("steady", "step", "burst")


def _positive(name: str, v: Optional[float]) -> float:
    if v is None or not (v > 0 and math.isfinite(v)):
        raise BenchError(f"{name} must be a positive number, got {v}")
    return float(v)


@dataclass(frozen=True)
class RateSchedule:
    """A rate function of time (see the module's docstring). Validated when built."""

    kind: str = "steady"
    rate: float = 1.0                      # the base rate, requests/s
    step_rate: Optional[float] = None      # step: the rate from ``step_at`` on
    step_at: Optional[float] = None        # step: seconds from the start
    burst_rate: Optional[float] = None     # burst: the rate during a burst
    burst_seconds: Optional[float] = None  # burst: how long each burst lasts
    burst_every: Optional[float] = None    # burst: seconds from one burst's start to the next

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise BenchError(f"unknown schedule {self.kind!r}; use one of {', '.join(SCHEDULES)}")
        _positive("--rate", self.rate)
        if self.kind == "step":
            _positive("--step-rate", self.step_rate)
            _positive("--step-at", self.step_at)
        if self.kind == "burst":
            _positive("--burst-rate", self.burst_rate)
            _positive("--burst-seconds", self.burst_seconds)
            _positive("--burst-every", self.burst_every)
            if self.burst_seconds >= self.burst_every:
                raise BenchError(f"--burst-seconds {self.burst_seconds:g} must be shorter than "
                                 f"--burst-every {self.burst_every:g}")

    def rate_at(self, t: float) -> float:
        """r(t), requests/s, for t >= 0."""
        if self.kind == "step":
            return self.step_rate if t >= self.step_at else self.rate
        if self.kind == "burst":
            k = math.floor(t / self.burst_every)
            in_burst = k >= 1 and t < k * self.burst_every + self.burst_seconds
            return self.burst_rate if in_burst else self.rate
        return self.rate

    def segments(self, duration: float) -> list[tuple[float, float, float]]:
        """[(start, end, rate), ...]: r on [0, duration) as consecutive constant pieces."""
        _positive("--duration", duration)
        if self.kind == "step" and self.step_at < duration:
            return [(0.0, self.step_at, self.rate), (self.step_at, duration, self.step_rate)]
        if self.kind == "burst":
            out, at, k = [], 0.0, 1
            while k * self.burst_every < duration:
                b0 = k * self.burst_every
                b1 = min(b0 + self.burst_seconds, duration)
                out += [(at, b0, self.rate), (b0, b1, self.burst_rate)]
                at, k = b1, k + 1
            if at < duration:
                out.append((at, duration, self.rate))
            return out
        return [(0.0, duration, self.rate)]

    def expected_arrivals(self, duration: float) -> float:
        """Lambda(duration): the mean number of arrivals in [0, duration)."""
        return sum((b - a) * r for a, b, r in self.segments(duration))

    def arrivals(self, duration: float, rng: np.random.Generator) -> np.ndarray:
        """Sorted send offsets (seconds from the start) of the arrivals in [0, duration)."""
        segs = self.segments(duration)
        starts = np.array([a for a, _, _ in segs])
        rates = np.array([r for _, _, r in segs])
        cum = np.concatenate([[0.0], np.cumsum([(b - a) * r for a, b, r in segs])])
        total = cum[-1]
        # rate-1 arrival times up to Lambda(duration), drawn in chunks so that the count is free
        chunk = int(total + 6.0 * math.sqrt(total) + 16)
        u = np.cumsum(rng.exponential(1.0, size=chunk))
        while u[-1] < total:
            u = np.concatenate([u, u[-1] + np.cumsum(rng.exponential(1.0, size=chunk))])
        u = u[u < total]
        i = np.searchsorted(cum, u, side="right") - 1  # the piece each arrival falls in
        t = starts[i] + (u - cum[i]) / rates[i]
        return np.minimum(t, np.nextafter(duration, 0.0))

    def describe(self) -> dict:
        """The schedule for the JSON report: its kind and the parameters that kind uses."""
        d = {"kind": self.kind, "rate": self.rate}
        if self.kind == "step":
            d.update(step_rate=self.step_rate, step_at=self.step_at)
        elif self.kind == "burst":
            d.update(burst_rate=self.burst_rate, burst_seconds=self.burst_seconds,
                     burst_every=self.burst_every)
        return d
