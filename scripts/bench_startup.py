"""Start-up time of `floe serve` per engine: from the command to the first embedding answered.

    python scripts/bench_startup.py [--rounds 3] [--engines torch,openvino] [--replicas 1]

``openvino-nopack`` is the OpenVINO engine with ``--no-packing`` (no packed graph to convert or
compile; floe/engine/packing.py).

Each round starts every engine once, in turn (interleaved, so a machine that slows down during
the run slows every engine alike), and times launch -> /ready -> one POST /v1/embeddings answered.
The OpenVINO engine reads its converted model from a cache directory made for this run: the first
start converts (reported apart as "cold"), every later one loads the cached model. Prints each
start and the median per engine; the issue's target is the cached OpenVINO start within 2 s of
the torch start.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

from bench_peers import REPO, free_port, stop_server  # noqa: E402 - the scripts' shared helpers


def start_once(engine: str, replicas: int, cache_dir: str) -> float:
    """Seconds from launch to the first embedding answered; the server is stopped afterwards."""
    port = free_port()
    kind, _, variant = engine.partition("-")
    argv = [sys.executable, "-m", "floe", "serve", "--engine", kind, "--num-replicas",
            str(replicas), "--port", str(port), "--grpc-port", "0", "--log-level", "warning",
            "--engine-cache-dir", cache_dir] + (["--no-packing"] if variant == "nopack" else [])
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        with httpx.Client(base_url=url, timeout=60) as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"floe serve --engine {engine} exited with "
                                       f"{proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"floe serve --engine {engine} did not start")
                try:
                    if client.get("/ready").status_code == 200:
                        r = client.post("/v1/embeddings", json={"input": ["start-up probe"]})
                        r.raise_for_status()
                        return time.perf_counter() - t0
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
    finally:
        stop_server(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--engines", default="torch,openvino")
    ap.add_argument("--replicas", type=int, default=1)
    args = ap.parse_args()
    engines = [e for e in args.engines.split(",") if e]
    times: dict[str, list[float]] = {e: [] for e in engines}
    with tempfile.TemporaryDirectory(prefix="floe-startup-") as cache:
        for e in engines:
            if not e.startswith("openvino"):
                continue
            with tempfile.TemporaryDirectory(prefix="floe-startup-cold-") as empty:
                cold = start_once(e, args.replicas, empty)
            print(f"{e} cold (converts into an empty cache): {cold:.2f} s", flush=True)
        if any(e.startswith("openvino") for e in engines):
            start_once(engines[[e.startswith("openvino") for e in engines].index(True)],
                       args.replicas, cache)   # fills the run's cache
        for r in range(args.rounds):
            for e in engines:
                t = start_once(e, args.replicas, cache)
                times[e].append(t)
                print(f"round {r + 1} {e}: {t:.2f} s", flush=True)
    print()
    for e, ts in times.items():
        print(f"{e}: median {statistics.median(ts):.2f} s (min {min(ts):.2f}, max {max(ts):.2f}, "
              f"{len(ts)} starts)")
    if {"torch", "openvino"} <= set(times):
        d = statistics.median(times["openvino"]) - statistics.median(times["torch"])
        print(f"cached openvino - torch: {d:+.2f} s (target: <= +2 s)")


if __name__ == "__main__":
    main()
