#!/usr/bin/env python3
"""Forward throughput of the engines, in-process, no server: torch vs OpenVINO on one model.

For each engine and workload it times ``engine.run(engine.prepare(batch))`` (padding, forward,
pooling, Dense: what a replica's engine thread does per batch) and prints real (unpadded) tokens
per second, the ratio OpenVINO / torch, and the share of the CPU's bf16 matmul peak, measured in
the same run by a matmul of the model's own shapes (tokens x hidden @ hidden x intermediate). The
FLOPs are the model's own (floe/bench/roofline.py): a sliding-window layer counts its band, not
n^2.

Workloads: ``64x50`` (64 inputs of 50 tokens per batch; any ``ROWSxLENGTH``, e.g. ``4x2048``),
``16x256``, and ``mixed`` (inputs of uniform 16-256 tokens, sorted by length and cut into batches
of at most --max-batch-tokens padded tokens, as the replica's scheduler does), and ``prose`` (the
same with the lengths of 2,048 standard-library docstring paragraphs, floe.textsets, as
bench_peers.py's prose workload). ``fill`` is real over padded tokens. ``torch-padded`` is the
torch engine without its packed forward for BERT-family encoders (floe/engine/unpadded.py): with
a GPU's budget (``--max-batch-tokens 16384``) the mixed batches are far from full.

    .venv/bin/python scripts/bench_engines.py --threads 2 --seconds 20
    .venv/bin/python scripts/bench_engines.py --seconds 1 --workloads 64x50   # smoke run
    .venv/bin/python scripts/bench_engines.py --model DIR --workloads 8x1024,4x2048
    .venv/bin/python scripts/bench_engines.py --engines torch,torch-padded --workloads mixed,prose --max-batch-tokens 16384
    .venv/bin/python scripts/bench_engines.py --engines openvino-unaligned,openvino --threads 1 --workloads 40x50,16x120,8x250,mixed,prose
    .venv/bin/python scripts/bench_engines.py --engines openvino,openvino-native --packing --threads 1 --workloads prose,mixed,40x50,8x256
    .venv/bin/python scripts/bench_engines.py --device cuda --dtype bfloat16 --engines torch,torch-padded --workloads mixed,prose --max-batch-tokens 16384

Each engine's ``--seconds`` per workload is cut into ``--turns`` turns taken in alternation, and
the median turn is reported: on the 2-core build machine whichever engine ran first could be 10%
faster, so engines timed one after the other misled.

Run it with nothing else on the cores: a busy machine drops every figure 3-5x.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORKLOADS = ("64x50", "16x256", "mixed")


def prose_lengths(spec, n: int = 2048) -> list[int]:
    """Token counts of the first ``n`` standard-library docstring paragraphs (floe.textsets)
    within the model's length: bench_peers.py's ``prose`` workload."""
    from floe.bench.workload import BenchTokenizer
    from floe.textsets import stdlib_paragraphs

    tok = BenchTokenizer(spec)
    counts = tok.count_lenient(stdlib_paragraphs())
    return [int(c) for c in counts if c <= tok.max_seq_length][:n]


def batches_for(name: str, vocab: int, max_batch_tokens: int, seed: int = 0,
                lengths: list[int] | None = None) -> list[list[np.ndarray]]:
    """``lengths``: the row lengths of the ``prose`` workload (prose_lengths)."""
    rng = np.random.default_rng(seed)
    low = min(1000, vocab - 1)

    def seq(n: int) -> np.ndarray:
        return rng.integers(low, vocab, n).astype(np.int32)

    if name in ("mixed", "prose"):
        drawn = lengths if name == "prose" else rng.integers(16, 257, 1024)
        seqs = sorted((seq(int(n)) for n in drawn), key=len)
        out, cur = [], []
        for s in seqs:  # lengths ascend, so the padded cost of a batch is len(s) x count
            if cur and len(s) * (len(cur) + 1) > max_batch_tokens:
                out.append(cur)
                cur = []
            cur.append(s)
        return out + [cur] if cur else out
    rows, length = (int(x) for x in name.split("x"))
    return [[seq(length) for _ in range(rows)] for _ in range(4)]


def time_engine(engine, batches: list[list[np.ndarray]], seconds: float, min_rounds: int = 1) -> dict:
    engine.run(engine.prepare(batches[0]))  # first call of a shape pays for kernel selection
    tokens = rounds = 0
    t0 = time.perf_counter()
    while rounds < min_rounds or time.perf_counter() - t0 < seconds:
        for b in batches:
            engine.run(engine.prepare(b))
            tokens += sum(len(s) for s in b)
        rounds += 1
    dt = time.perf_counter() - t0
    return {"tokens_per_s": tokens / dt, "seconds": dt, "rounds": rounds}


def matmul_peak(shapes, threads: int, seconds: float, tokens: int = 4096,
                dtype: str = "bfloat16", device: str = "cpu") -> float:
    """GFLOP/s of (tokens x hidden) @ (hidden x intermediate), the model's largest matmul, in
    ``dtype`` (the precision the engines run: a float32 run is measured against float32's peak),
    on ``device``."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(tokens, shapes.hidden).to(device=device, dtype=getattr(torch, dtype))
    b = torch.randn(shapes.hidden, shapes.intermediate).to(device=device, dtype=getattr(torch, dtype))

    def sync() -> None:
        if device != "cpu":
            torch.cuda.synchronize(device)

    for _ in range(3):
        torch.matmul(a, b)
    sync()
    n, t0 = 0, time.perf_counter()
    while n < 5 or time.perf_counter() - t0 < seconds:
        torch.matmul(a, b)
        n += 1
        if n % 50 == 0:
            sync()
    sync()
    dt = time.perf_counter() - t0
    return 2 * tokens * shapes.hidden * shapes.intermediate * n / dt / 1e9


def budget_sweep(engines: dict, spec, budgets: list[int], rounds: int) -> dict:
    """Real tokens/s of the mixed workload cut at each padded-token budget (sorted by length,
    as sentence-transformers cuts a corpus), interleaved; the median of ``rounds`` passes."""
    out: dict = {}
    for kind, engine in engines.items():
        cuts = {b: batches_for("mixed", spec.vocab_size, b) for b in budgets}
        for b, batches in cuts.items():
            engine.run(engine.prepare(batches[0]))
        rates: dict[int, list[float]] = {b: [] for b in budgets}
        for _ in range(rounds):
            for b, batches in cuts.items():
                rates[b].append(time_engine(engine, batches, 0.0)["tokens_per_s"])
        for b in budgets:
            padded = sum(max(len(s) for s in x) * len(x) for x in cuts[b])
            real = sum(len(s) for x in cuts[b] for s in x)
            med = float(np.median(rates[b]))
            out.setdefault(kind, {})[b] = {"median_tokens_per_s": med, "rates": rates[b],
                                           "batches": len(cuts[b]), "real_over_padded": real / padded}
            print(f"sweep {kind:<9} budget {b:>6} batches {len(cuts[b]):>4} real/padded "
                  f"{real / padded:.3f} median {med:>8.0f} tokens/s "
                  f"(min {min(rates[b]):.0f}, max {max(rates[b]):.0f})", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="model folder or 'default' (embedded MiniLM)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where the torch engines run (OpenVINO runs on the CPU only)")
    p.add_argument("--seconds", type=float, default=20.0, help="time per engine and workload")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--engines", default="torch,openvino")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="padded-token budget of the mixed and prose batches (default: floe "
                        "serve's on a CPU for this model)")
    p.add_argument("--budget-sweep", default=None,
                   help="comma-separated padded-token budgets: time the mixed workload cut "
                        "at each budget, interleaved round by round (so a machine whose speed "
                        "drifts shows in every budget alike), medians over --rounds")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--turns", type=int, default=3,
                   help="each engine's --seconds per workload is cut into this many turns, the "
                        "engines alternating; the median turn is reported")
    p.add_argument("--cache-dir", default=None, help="converted-model cache (default: floe's)")
    p.add_argument("--packing", action="store_true",
                   help="OpenVINO engines pack short inputs into shared rows, as served")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from floe.config import ModelSettings
    from floe.models import load_spec

    from floe.bench.roofline import model_shapes

    spec = load_spec(ModelSettings(model=args.model))
    shapes = model_shapes(spec.backbone_path)
    if args.max_batch_tokens is None:
        from floe.resolve import batch_budget

        args.max_batch_tokens = batch_budget(None, False, int(spec.max_seq_length))
    engines = {}
    for kind in args.engines.split(","):
        t0 = time.perf_counter()
        if kind == "torch":
            from floe.engine.torch_engine import TorchEngine

            engines[kind] = TorchEngine(spec, device=args.device, dtype=args.dtype,
                                        threads=args.threads)
        elif kind == "torch-padded":   # torch without the packed forward (floe/engine/unpadded.py)
            from floe.engine.torch_engine import TorchEngine

            engines[kind] = TorchEngine(spec, device=args.device, dtype=args.dtype,
                                        threads=args.threads, unpad=False)
        elif args.device != "cpu":
            raise SystemExit(f"{kind} runs on the CPU only; --device {args.device} takes torch "
                             "and torch-padded")
        elif kind in ("openvino", "openvino-native"):   # without / with floe's attention kernel
            from floe.engine.openvino_engine import OpenVINOEngine

            engines[kind] = OpenVINOEngine(spec, dtype=args.dtype, threads=args.threads,
                                           cache_dir=args.cache_dir, packing=args.packing,
                                           native_attention=kind == "openvino-native")
            if args.packing:
                engines[kind].warmup(args.max_batch_tokens)
            if kind == "openvino-native" and not engines[kind].native.startswith("yes"):
                raise SystemExit(f"floe's attention kernel does not run: {engines[kind].native}")
        elif kind == "openvino-unaligned":   # the graph without floe/engine/aligned_keys.py's keys
            from floe.engine import aligned_keys
            from floe.engine.openvino_convert import default_cache_dir
            from floe.engine.openvino_engine import OpenVINOEngine

            aligned_keys.ENABLED = False
            try:
                engines[kind] = OpenVINOEngine(
                    spec, dtype=args.dtype, threads=args.threads,
                    cache_dir=os.path.join(args.cache_dir or default_cache_dir(), "unaligned-keys"))
            finally:
                aligned_keys.ENABLED = True
        elif kind == "openvino-int8":   # --dtype int8 (the float layers in --dtype), vs the same torch
            from floe.engine.openvino_engine import OpenVINOEngine

            engines[kind] = OpenVINOEngine(spec, dtype="int8", threads=args.threads,
                                           cache_dir=args.cache_dir)
        else:
            raise SystemExit(f"unknown engine {kind!r}")
        print(f"# {kind}: ready in {time.perf_counter() - t0:.1f} s ({engines[kind].dtype})", flush=True)

    rows = 4096 if args.device == "cpu" else 65536   # a GPU needs more rows to reach its peak
    peak = matmul_peak(shapes, args.threads, min(args.seconds, 5.0), dtype=args.dtype,
                       device=args.device, tokens=rows)
    where = f"{args.threads} threads" if args.device == "cpu" else args.device
    print(f"# {spec.name}, {where}, {args.dtype}; {args.dtype} matmul peak "
          f"({rows}x{shapes.hidden} @ {shapes.hidden}x{shapes.intermediate}): {peak:.0f} GFLOP/s")
    results = {"model": spec.name, "threads": args.threads, "dtype": args.dtype,
               "matmul_peak_gflops": peak, "workloads": {}}
    if args.budget_sweep:
        results["budget_sweep"] = budget_sweep(engines, spec, [int(b) for b in args.budget_sweep.split(",")],
                                               args.rounds)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(results, f, indent=1)
        return 0
    print(f"{'workload':<10} {'engine':<13} {'tokens/s':>10} {'vs torch':>9} {'% peak':>7} {'fill':>6}")
    for w in args.workloads.split(","):
        batches = batches_for(w, spec.vocab_size, args.max_batch_tokens,
                              lengths=prose_lengths(spec) if w == "prose" else None)
        lengths = [len(s) for b in batches for s in b]
        flops = shapes.flops(lengths)  # the model's FLOPs for one pass over the workload
        padded = sum(max(len(s) for s in b) * len(b) for b in batches)
        row = results["workloads"].setdefault(w, {"real_over_padded": sum(lengths) / padded})
        turns: dict[str, list[dict]] = {kind: [] for kind in engines}
        for _ in range(args.turns):   # engines take turns: a drift in the machine hits all alike
            for kind, engine in engines.items():
                turns[kind].append(time_engine(engine, batches, args.seconds / args.turns))
        for kind in engines:
            r = sorted(turns[kind], key=lambda t: t["tokens_per_s"])[len(turns[kind]) // 2]
            r["percent_of_peak"] = 100 * r["tokens_per_s"] * flops / sum(lengths) / 1e9 / peak
            row[kind] = r
            ratio = (f"{r['tokens_per_s'] / row['torch']['tokens_per_s']:.2f}x"
                     if "torch" in row and kind != "torch" else "")
            print(f"{w:<10} {kind:<13} {r['tokens_per_s']:>10.0f} {ratio:>9} {r['percent_of_peak']:>6.0f}%"
                  f" {row['real_over_padded']:>6.3f}", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
