"""Admission: the one place that decides whether a request may start, and knows when all are done.

It owns three facts: how many requests are in flight, whether the server is draining, and an
event that is set whenever nothing is in flight (so a drain waits on it instead of polling).
Transports admit a request before they read or parse its body, so an overloaded or draining
server refuses work for the price of a header check.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Callable, Iterator

from floe import metrics
from floe.errors import OverloadedError, UnavailableError


class Admission:
    def __init__(self, max_concurrent: int, ready: Callable[[], bool]) -> None:
        self.max_concurrent = max_concurrent
        self._ready = ready
        self.in_flight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def check(self) -> None:
        """Raises the error a new request would get now (UnavailableError, OverloadedError)."""
        if self.draining:
            raise UnavailableError("server is draining, retry on another instance")
        if self.in_flight >= self.max_concurrent:
            raise OverloadedError(
                f"too many concurrent requests (limit {self.max_concurrent}), retry later")
        if not self._ready():
            raise UnavailableError("no healthy replica is ready, retry later")

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """Counts the request in flight for the duration of the block, or refuses it."""
        self.check()
        self.in_flight += 1
        metrics.IN_FLIGHT.inc()
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            metrics.IN_FLIGHT.dec()
            if self.in_flight == 0:
                self._idle.set()

    async def drain(self, timeout: float) -> bool:
        """Refuses new requests from now on; waits up to ``timeout`` s for in-flight ones.
        Returns True when nothing is left in flight."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True
