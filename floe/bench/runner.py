"""Load loops: closed (a fixed number of requests in flight) and open (Poisson arrivals).

In the open loop each request's latency runs from its *scheduled* send time, so a server that
stalls is charged for every request that should have been sent meanwhile (no coordinated
omission); requests that cannot be sent because ``max_in_flight`` is reached wait, and that wait
is part of their latency too.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Optional, Protocol, Sequence, TextIO

import numpy as np

from floe.bench.clients import Outcome
from floe.bench.stats import Sample
from floe.bench.workload import Request


class Client(Protocol):
    async def send(self, req: Request) -> Outcome: ...


class Progress:
    """A live one-line status on stderr, drawn only when stderr is a terminal."""

    def __init__(self, label: str, total: int, stream: Optional[TextIO] = None,
                 enabled: Optional[bool] = None, interval: float = 0.5) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.label, self.total, self.interval = label, total, interval
        self.samples: list[Sample] = []
        self.t0 = time.perf_counter()
        self._task: Optional[asyncio.Task] = None

    def line(self) -> str:
        done = len(self.samples)
        dt = max(time.perf_counter() - self.t0, 1e-9)
        ok = [s for s in self.samples if s.ok]
        return (f"\r{self.label}: {done}/{self.total} requests  {len(ok) / dt:8.1f} req/s  "
                f"{sum(s.tokens for s in ok) / dt:10.0f} tok/s  errors {done - len(ok)}   ")

    async def _draw(self) -> None:
        while True:
            self.stream.write(self.line())
            self.stream.flush()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self.t0 = time.perf_counter()
        if self.enabled:
            self._task = asyncio.get_running_loop().create_task(self._draw())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self.stream.write(self.line() + "\n")
            self.stream.flush()


async def _one(client: Client, req: Request, start: float, out: list[Sample]) -> None:
    try:
        o = await client.send(req)
    except Exception as e:  # a client bug must not end the run; it is counted by type
        o = Outcome(False, error=f"exception:{type(e).__name__}")
    out.append(Sample(start=start, end=time.perf_counter(), ok=o.ok, sequences=o.sequences,
                      tokens=o.tokens, server_tokens=o.server_tokens, error=o.error,
                      refused=o.refused, retry_after=o.retry_after))


async def run_closed(client: Client, requests: Sequence[Request], concurrency: int,
                     duration: Optional[float] = None, progress: Optional[Progress] = None) -> list[Sample]:
    """``concurrency`` workers send the requests back to back until all are sent or ``duration``
    seconds have passed (requests in flight at the deadline still finish and count)."""
    out: list[Sample] = progress.samples if progress else []
    t0 = time.perf_counter()
    deadline = t0 + duration if duration else None
    it = iter(requests)

    async def worker() -> None:
        for req in it:  # one shared iterator: each request goes to exactly one worker
            now = time.perf_counter()
            if deadline is not None and now >= deadline:
                return
            await _one(client, req, now, out)

    if progress:
        progress.start()
    try:
        await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(requests))))))
    finally:
        if progress:
            await progress.stop()
    return out


async def run_open(client: Client, requests: Sequence[Request], offsets: np.ndarray,
                   max_in_flight: int, duration: Optional[float] = None,
                   progress: Optional[Progress] = None, t0: Optional[float] = None) -> list[Sample]:
    """Sends request i at ``t0 + offsets[i]`` (sorted offsets, e.g. Poisson arrivals) whether or
    not earlier ones have answered, with at most ``max_in_flight`` outstanding; stops scheduling
    after ``duration``. ``t0`` is a ``time.perf_counter()`` reading (default: now), so the caller
    knows the origin of the samples' times."""
    out: list[Sample] = progress.samples if progress else []
    gate = asyncio.Semaphore(max(1, max_in_flight))
    tasks: list[asyncio.Task] = []
    loop = asyncio.get_running_loop()

    async def fire(req: Request, due: float) -> None:
        async with gate:
            await _one(client, req, due, out)

    if progress:
        progress.start()
    t0 = time.perf_counter() if t0 is None else t0
    try:
        for req, off in zip(requests, offsets.tolist()):
            if duration is not None and off >= duration:
                break
            due = t0 + off
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(loop.create_task(fire(req, due)))
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        if progress:
            await progress.stop()
    return out
