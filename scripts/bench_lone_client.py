#!/usr/bin/env python3
"""One client sending one query at a time, after a busy spell: what the batch wait costs it.

Starts `floe serve` on the embedded model (extra arguments go to it), runs a busy spell (16
clients, 60 queries each), then ``--clients`` clients (1 by default) send ``--queries`` queries
each of about 15 tokens, each client after the answer to its last. Prints the p50 latency and
the p50 of the server's x-queue-time (the batch wait is part of it) over the first 500 answers
and over the rest, and each replica's batch wait at the end (/metrics): the tuner
(floe/replica/tuning.py) needs a window or more (and a changed knob's cooldown) to see that a
lone client never brings company, and drops the wait; where company comes it keeps it.

    .venv/bin/python scripts/bench_lone_client.py
    .venv/bin/python scripts/bench_lone_client.py --no-tuning
    .venv/bin/python scripts/bench_lone_client.py --clients 16 --queries 150
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_peers import Server, free_port  # noqa: E402 - the scripts' shared helpers


async def client(url: str, k: int, n: int, lat: list, queue: list) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=30) as c:
        for i in range(n):
            t0 = time.perf_counter()
            r = await c.post(url, json={"input": f"query {i} from client {k} about the lazy dog "
                                                 "near the river", "model": "m"})
            r.raise_for_status()
            lat.append((time.perf_counter() - t0) * 1e3)
            queue.append(float(r.headers["x-queue-time"]))


async def clients(url: str, n: int, queries: int, lat: list, queue: list) -> None:
    await asyncio.gather(*(client(url, k, queries, lat, queue) for k in range(n)))


async def busy_spell(url: str) -> None:
    await asyncio.gather(*(client(url, 100 + k, 60, [], []) for k in range(16)))


def main() -> None:
    import httpx

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", type=int, default=1500, help="queries per measured client")
    ap.add_argument("--clients", type=int, default=1, help="measured clients, side by side")
    args, serve_args = ap.parse_known_args()
    port = free_port()
    srv = Server([sys.executable, "-m", "floe", "serve", "--port", str(port), "--grpc-port", "0",
                  "--log-level", "warning", *serve_args], f"http://127.0.0.1:{port}/v1/embeddings")
    try:
        asyncio.run(busy_spell(srv.url))
        lat: list[float] = []
        queue: list[float] = []
        t0 = time.perf_counter()
        asyncio.run(clients(srv.url, args.clients, args.queries, lat, queue))
        rate = len(lat) / (time.perf_counter() - t0)
        waits = [line.rsplit(" ", 1)[1] for line in httpx.get(
            srv.url.rsplit("/v1/", 1)[0] + "/metrics", timeout=10).text.splitlines()
            if line.startswith("floe_batch_timeout_seconds")]
    finally:
        srv.stop()
    head = min(500, len(lat) // 2)
    print(f"first {head}: p50 {statistics.median(lat[:head]):.2f} ms, x-queue-time p50 "
          f"{statistics.median(queue[:head]):.2f} ms; the rest: p50 "
          f"{statistics.median(lat[head:]):.2f} ms, x-queue-time p50 "
          f"{statistics.median(queue[head:]):.2f} ms; {rate:,.0f} answers/s; batch wait at the end "
          f"(s, per replica): {', '.join(waits)}")


if __name__ == "__main__":
    main()
