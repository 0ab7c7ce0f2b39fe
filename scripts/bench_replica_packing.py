#!/usr/bin/env python3
"""One replica in one process, with and without sequence packing (floe/engine/packing.py).

The embedded all-MiniLM on OpenVINO (1 thread), its replica core with the default batch settings
and a calibrated cost model, fed the prose paragraphs (floe.textsets, at most 256 tokens, 1,024 of
them) by an asyncio client, ``--in-flight`` requests of 16 at a time: one warm-up pass, then
``--passes`` timed ones. Prints real tokens per second, the share of the wall the engine waited
for a batch, the batches and their fill, and how many ran packed.

    taskset -c 1 .venv/bin/python scripts/bench_replica_packing.py on
    taskset -c 1 .venv/bin/python scripts/bench_replica_packing.py off
    taskset -c 1 .venv/bin/python scripts/bench_replica_packing.py on --widths 1

Alternate the runs and take medians: this machine's speed drifts by several percent in minutes.

``--simulate`` runs no model: the batcher alone on the same paragraphs' lengths (512 waiting,
requests of 16, the 2,048 budget, fill floor 0.95, a cost model of this CPU's shape), padded only
and packed with 1-4 widths, and prints the batches it forms and the time it takes to form them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def prose_lengths_and_ids(spec, count: int = 1024) -> list[list[int]]:
    from floe.protocol import EncodeOptions
    from floe.textsets import stdlib_paragraphs
    from floe.tokenize import Tokenizer

    tb = Tokenizer(spec).encode(stdlib_paragraphs()[:4 * count], EncodeOptions())
    off = tb.offsets()
    items = [tb.ids[off[i]:off[i + 1]].tolist() for i in range(tb.n)
             if tb.lengths[i] <= spec.max_seq_length]
    return items[:count]


def simulate(lengths: list[int]) -> None:
    from floe.engine import packing
    from floe.replica.scheduler import Scheduler, Sequence

    for align, widths in [(None, 0), (16, 1), (16, 2), (16, 3), (16, 4)]:
        rng = random.Random(0)
        s = Scheduler(2048, 256, 0.002, min_fill=0.95, pack_align=align,
                      cost=lambda r, w: 0.004 + 1.1e-4 * r * w + 1.5e-7 * r * w * w)
        s.pack_widths = widths
        saved, packing.WIDTHS = packing.WIDTHS, max(1, widths)   # the engine's plan alike
        order = list(range(len(lengths)))
        rng.shuffle(order)
        k, spent, real, padded, batches, clock = 0, 0.0, 0, 0, 0, 0.0
        while k < len(order) or len(s):
            while k < len(order) and len(s) < 512:
                for j in order[k:k + 16]:
                    s.add(Sequence(request_key=k, index=0, length=lengths[j], arrival=clock))
                k, clock = k + 16, clock + 0.001
            t0 = time.perf_counter()
            batch = s.next_batch(now=clock + 100.0)
            spent += time.perf_counter() - t0
            rows, width = packing.shape([x.length for x in batch], align)
            real += sum(x.length for x in batch)
            padded += rows * width
            batches += 1
        packing.WIDTHS = saved
        print(f"{'padded only' if align is None else f'packed, {widths} width(s)'}: {batches} "
              f"batches of {real / batches:,.0f} real tokens, fill {real / padded:.3f}, "
              f"{spent / batches * 1e3:.2f} ms to form each")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=("on", "off"), nargs="?", default="on")
    ap.add_argument("--widths", type=int, default=0, help="packed widths tried (default: floe's)")
    ap.add_argument("--passes", type=int, default=4)
    ap.add_argument("--in-flight", type=int, default=32)
    ap.add_argument("--simulate", action="store_true")
    args = ap.parse_args()

    from floe.bench.workload import load_model_spec
    from floe.models.source import embedded_model_path

    spec = load_model_spec(str(embedded_model_path()))
    items = prose_lengths_and_ids(spec)
    if args.simulate:
        from floe.bench.workload import BenchTokenizer
        from floe.textsets import stdlib_paragraphs

        counts = BenchTokenizer(spec).count_lenient(stdlib_paragraphs())
        simulate([int(c) for c in counts if c <= spec.max_seq_length][:2048])
        return 0

    from floe.config import BatchSettings
    from floe.engine.openvino_engine import OpenVINOEngine
    from floe.protocol import EncodeOptions, TokenBatch
    from floe.replica.core import ReplicaCore
    from floe.replica.cost import for_replica
    from floe.resolve import resolve_batch

    engine = OpenVINOEngine(spec, threads=1, packing=args.mode == "on")
    batch = resolve_batch(BatchSettings(), False, spec.max_seq_length)
    engine.warmup(batch.max_batch_tokens)
    cost = for_replica(engine, batch.max_batch_tokens, batch.max_batch_size, None, 1)
    core = ReplicaCore(engine, batch, cost=cost)
    if args.widths:
        core._sched.pack_widths = args.widths
    core.start()
    requests = [items[i:i + 16] for i in range(0, len(items), 16)]

    async def run(passes: int) -> None:
        gate = asyncio.Semaphore(args.in_flight)

        async def one(i, r):
            async with gate:
                return await core.submit(TokenBatch.from_lists(r), EncodeOptions(), f"r{i}")

        for _ in range(passes):
            await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))

    try:
        asyncio.run(run(1))
        before, idle = core.stats(), core._idle_s
        t0 = time.monotonic()
        asyncio.run(run(args.passes))
        wall = time.monotonic() - t0
        st = core.stats()
    finally:
        core.stop(drain_timeout=1.0)
    tokens = st.tokens - before.tokens
    batches = st.batches - before.batches
    print(f"packing {args.mode}{f' ({args.widths} widths)' if args.widths else ''}: "
          f"{tokens / wall:,.0f} real tokens/s, engine waited {(core._idle_s - idle) / wall:.1%} "
          f"of the wall, {batches} batches of {tokens / batches:,.0f} real tokens, fill "
          f"{tokens / (st.padded_tokens - before.padded_tokens):.3f}, "
          f"{st.packed_batches - before.packed_batches} packed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
