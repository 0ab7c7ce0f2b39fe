"""The replica's histograms: bucket bounds, and a histogram its stats message carries.

floe/metrics.py exports the same bounds for the front end's own histograms of these names."""

from __future__ import annotations

import bisect

from floe.proto import floe_pb2

# Histogram bucket upper bounds (+Inf implied). floe/metrics.py exports the same bounds.
BATCH_SIZE_BOUNDS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
BATCH_TOKENS_BOUNDS: tuple[float, ...] = (
    64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
PADDING_EFFICIENCY_BOUNDS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
QUEUE_WAIT_SECONDS_BOUNDS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
INFERENCE_SECONDS_BOUNDS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

HISTOGRAMS: dict[str, tuple[float, ...]] = {
    "batch_size": BATCH_SIZE_BOUNDS,
    "batch_tokens": BATCH_TOKENS_BOUNDS,
    "padding_efficiency": PADDING_EFFICIENCY_BOUNDS,
    "queue_wait_seconds": QUEUE_WAIT_SECONDS_BOUNDS,
    "inference_seconds": INFERENCE_SECONDS_BOUNDS,
}


class Histogram:
    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, v)] += 1  # first bound >= v
        self.sum += v
        self.count += 1

    def to_proto(self, name: str) -> floe_pb2.Histogram:
        return floe_pb2.Histogram(name=name, bounds=self.bounds, counts=self.counts,
                                  sum=self.sum, count=self.count)
