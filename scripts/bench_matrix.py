"""Runs the benchmark matrix of docs/benchmarks.md and prints its tables (medians of N runs).

    .venv/bin/python scripts/bench_matrix.py --runs 3 --out bench-results

For each workload (short: 50 tokens; long: 512 tokens with max_seq_length 512) and each server
configuration (replicas x dtype), it starts `floe serve` on free ports, runs `floe bench` over gRPC
and HTTP, stops the server, and runs sentence-transformers in-process at the same precision. Every
run is a separate `floe bench` process writing its JSON report; the tables are medians per cell and
the ratio of floe's tokens/s to sentence-transformers' at the same precision, workload and batch
size, all measured in this one session on this one machine.

The number of requests per batch size is sized to a token budget, so that each cell takes seconds
on a 2-core CPU and minutes would not be spent on batch 64 x 512 tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

WORKLOADS = {"short": {"prompt_length": 50, "max_seq_length": None},
             "long": {"prompt_length": 512, "max_seq_length": 512}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def requests_for(batch: int, prompt_length: int, token_budget: int, concurrency: int) -> int:
    """Enough requests to spend ~token_budget tokens, at least 2 x concurrency for batch 1."""
    n = max(1, token_budget // (batch * prompt_length))
    if batch == 1:
        n = max(n, 2 * concurrency)
    return n


def bench(args: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "floe.bench", "--progress", "off", "--output-json", str(out), *args]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def start_server(extra: list[str], log: Path) -> tuple[subprocess.Popen, int, int]:
    port, grpc_port, start_port = free_port(), free_port(), free_port()
    cmd = [sys.executable, "-m", "floe", "serve", "--port", str(port), "--grpc-port", str(grpc_port),
           "--start-port", str(start_port), *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"floe serve failed: see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    print(f"  server {' '.join(extra)} ready in {time.perf_counter() - t0:.1f} s", flush=True)
    return proc, port, grpc_port


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", default="bench-results")
    p.add_argument("--workloads", default="short,long")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--replicas", default="1,2")
    p.add_argument("--protocols", default="grpc,http")
    p.add_argument("--batch-sizes", default="1,16,64")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--token-budget", type=int, default=40_000, help="tokens per cell (short workload)")
    p.add_argument("--long-token-budget", type=int, default=100_000, help="tokens per cell (long)")
    p.add_argument("--long-dtypes", default=None, help="dtypes for the long workload (default: --dtypes)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    cells: dict[tuple, list[float]] = {}
    latencies: dict[tuple, list[tuple[float, float]]] = {}

    def record(key: tuple, report: dict) -> None:
        row = report["results"][0]
        if row["success_rate"] < 1.0:
            print(f"  WARNING {key}: success rate {row['success_rate']:.3f} {row.get('errors')}")
        cells.setdefault(key, []).append(row["tokens_per_s"])
        latencies.setdefault(key, []).append((row["latency_s"]["p50"], row["latency_s"]["p99"]))

    for wl in args.workloads.split(","):
        spec = WORKLOADS[wl]
        plen = spec["prompt_length"]
        budget = args.token_budget if wl == "short" else args.long_token_budget
        msl = ["--max-seq-length", str(spec["max_seq_length"])] if spec["max_seq_length"] else []
        dtypes = (args.long_dtypes or args.dtypes) if wl == "long" else args.dtypes
        for dtype in dtypes.split(","):
            for reps in [int(x) for x in args.replicas.split(",")]:
                print(f"{wl} {dtype} replicas={reps}", flush=True)
                proc, port, grpc_port = start_server(
                    ["--num-replicas", str(reps), "--dtype", dtype, *msl],
                    out / f"serve-{wl}-{dtype}-{reps}.log")
                try:
                    for run in range(args.runs):
                        for proto in args.protocols.split(","):
                            server = f"127.0.0.1:{grpc_port if proto == 'grpc' else port}"
                            for bs in batch_sizes:
                                n = requests_for(bs, plen, budget, args.concurrency)
                                key = (wl, dtype, f"floe {proto}", reps, bs)
                                rep = bench(["--protocol", proto, "--server", server, "--batch-sizes", str(bs),
                                             "--concurrency", str(args.concurrency), "--requests", str(n),
                                             "--warmup", "8", "--prompt-length", str(plen), "--seed", str(run),
                                             *msl], out / f"{wl}-{dtype}-{proto}-{reps}-{bs}-{run}.json")
                                record(key, rep)
                                print(f"    run {run} {proto} bs={bs}: {rep['results'][0]['tokens_per_s']:.0f} tok/s",
                                      flush=True)
                finally:
                    stop_server(proc)
            print(f"{wl} {dtype} sentence-transformers in-process", flush=True)
            for run in range(args.runs):
                for bs in batch_sizes:
                    n = max(4, requests_for(bs, plen, budget, 1) // (4 if bs == 1 else 1))
                    key = (wl, dtype, "sentence-transformers", 0, bs)
                    rep = bench(["--in-process", "--st-dtype", dtype, "--st-batch-size", str(max(bs, 32)),
                                 "--batch-sizes", str(bs), "--requests", str(n), "--warmup", "2",
                                 "--prompt-length", str(plen), "--seed", str(run), *msl],
                                out / f"{wl}-{dtype}-st-{bs}-{run}.json")
                    record(key, rep)
                    print(f"    run {run} st bs={bs}: {rep['results'][0]['tokens_per_s']:.0f} tok/s", flush=True)

    (out / "cells.json").write_text(json.dumps(
        [{"key": list(k), "tokens_per_s": v, "p50_p99_s": latencies[k]} for k, v in cells.items()], indent=1))
    print_tables(cells, latencies, batch_sizes)
    return 0


def print_tables(cells: dict, latencies: dict, batch_sizes: list[int]) -> None:
    med = {k: statistics.median(v) for k, v in cells.items()}
    for wl in WORKLOADS:
        rows = sorted({k[:4] for k in med if k[0] == wl}, key=lambda k: (k[1], k[2] != "sentence-transformers", k[2], k[3]))
        if not rows:
            continue
        print(f"\n### {wl} workload ({WORKLOADS[wl]['prompt_length']} tokens per input)\n")
        head = "| target | dtype | replicas | " + " | ".join(
            f"bs {b} tok/s (x ST) | bs {b} p50 / p99 ms" for b in batch_sizes) + " |"
        print(head)
        print("|" + "---|" * (3 + 2 * len(batch_sizes)))
        for (w, dtype, target, reps) in rows:
            parts = []
            for b in batch_sizes:
                k = (w, dtype, target, reps, b)
                if k not in med:
                    parts += ["", ""]
                    continue
                st = med.get((w, dtype, "sentence-transformers", 0, b))
                ratio = f" ({med[k] / st:.2f}x)" if st and target != "sentence-transformers" else ""
                p50 = statistics.median(x[0] for x in latencies[k]) * 1e3
                p99 = statistics.median(x[1] for x in latencies[k]) * 1e3
                parts += [f"{med[k]:,.0f}{ratio}", f"{p50:,.0f} / {p99:,.0f}"]
            print(f"| {target} | {dtype} | {reps or '-'} | " + " | ".join(parts) + " |")


if __name__ == "__main__":
    sys.exit(main())
