#!/usr/bin/env python3
"""Latency you can promise, measured: overload, light load and a step in load, side by side.

Each scenario starts its own `floe serve` (HTTP on 127.0.0.1), drives it with `floe bench`
(open loop, latency from the scheduled send time) and stops it, so no run inherits another's
queue or tuning. Run it with nothing else on the machine.

    .venv/bin/python scripts/bench_latency.py --out /tmp/lat [--model default] [--length 50]
        [--inputs 16] [--scenarios capacity,overload,light,step,sweep,deadline]

Scenarios (every rate is a fraction of ``capacity``, the closed-loop requests/s measured first):
- ``capacity``: closed loop, --concurrency 8, 20 s: what the server completes.
- ``overload``: 3x capacity for 30 s with --latency-target-ms 1000 (and the same load against
  the default server without a target, for comparison).
- ``light``: one query of about 12 words at 10% of capacity, 20 s, tuning on and off.
- ``step``: 10% then 90% of capacity (the step at 15 s of 45), tuning on.
- ``sweep``: closed-loop capacity of static configurations (--no-tuning, budgets
  ``--sweep-budgets``, 1024 / 2048 / 4096 by default) against the tuned default.
- ``deadline``: a gRPC call with a 200 ms deadline behind a full queue (10 s of work queued).

Writes one JSON per run, PNGs of the open-loop runs, and ``summary.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(out: str, name: str, model: str, *flags: str):
    port, grpc_port = _port(), _port()
    cmd = [PY, "-m", "floe", "serve", "--model", model, "--host", "127.0.0.1", "--port",
           str(port), "--grpc-port", str(grpc_port), *flags]
    log = open(os.path.join(out, f"serve-{name}.log"), "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"floe serve {name} exited; see serve-{name}.log")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"floe serve {name} not ready")
            time.sleep(0.3)
        yield url, f"127.0.0.1:{grpc_port}"
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        if proc.poll() is None:
            proc.kill()
        log.close()


def bench(out: str, name: str, url: str, model: str, *flags: str, plot: bool = False) -> dict:
    path = os.path.join(out, f"{name}.json")
    cmd = [PY, "-m", "floe", "bench", "--server", url, "--protocol", "http", "--model", model,
           "--warmup", "8", "--progress", "off", "--output-json", path, *flags]
    if plot:
        cmd += ["--plot", os.path.join(out, f"{name}.png")]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=open(os.path.join(out, f"{name}.txt"), "w"),
                   stderr=subprocess.STDOUT)
    with open(path) as f:
        return json.load(f)["results"][0]


def row(r: dict) -> dict:
    lat = r["latency_s"]
    return {"requests": r["requests"], "ok": r["successful"], "refused": r.get("refused", 0),
            "errors": r["failed"] - r.get("refused", 0), "ok_rps": r["requests_per_s"],
            "tokens_per_s": r["tokens_per_s"], "p50_ms": 1000 * lat["p50"],
            "p99_ms": 1000 * lat["p99"], "max_ms": 1000 * lat["max"],
            "refusal_p50_ms": 1000 * (r.get("refusal_latency_s") or {}).get("p50") if
            (r.get("refusal_latency_s") or {}).get("p50") is not None else None,
            "refusal_p99_ms": 1000 * (r.get("refusal_latency_s") or {}).get("p99") if
            (r.get("refusal_latency_s") or {}).get("p99") is not None else None,
            "refusals_with_retry_after": r.get("refusals_with_retry_after", 0),
            "errors_by_kind": r["errors"]}


async def _deadline_probe(url: str, grpc_address: str, model: str, inputs: int) -> dict:
    import grpc

    from floe.proto import floe_pb2, floe_pb2_grpc

    texts = ["a sentence about the weather, the sea and the mountains " * 4] * inputs
    async with httpx.AsyncClient(timeout=300) as client:
        background = [asyncio.create_task(client.post(url + "/v1/embeddings", json={"input": texts}))
                      for _ in range(60)]
        t_end = time.monotonic() + 60
        while True:
            text = (await client.get(url + "/metrics")).text
            wait = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("floe_replica_predicted_wait_seconds{"))
            if wait > 2.0 or time.monotonic() > t_end:
                break
            await asyncio.sleep(0.05)
        before = text
        async with grpc.aio.insecure_channel(grpc_address) as ch:
            stub = floe_pb2_grpc.EmbedderStub(ch)
            t0 = time.monotonic()
            try:
                await stub.Encode(floe_pb2.EncodeRequest(texts=["one short query"]), timeout=0.2)
                code, details = "OK", ""
            except grpc.aio.AioRpcError as e:
                code, details = e.code().name, e.details()
            elapsed = time.monotonic() - t0
        answers = await asyncio.gather(*background)
    return {"queued_wait_s": wait, "code": code, "details": details, "answered_in_ms": elapsed * 1000,
            "background": {str(c): sum(a.status_code == c for a in answers)
                           for c in sorted({a.status_code for a in answers})},
            "metrics_before_refusal": [line for line in before.splitlines()
                                       if line.startswith("floe_replica_refused")]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="default")
    p.add_argument("--length", type=int, default=50, help="Tokens per input.")
    p.add_argument("--inputs", type=int, default=16, help="Inputs per request.")
    p.add_argument("--overload", type=float, default=3.0)
    p.add_argument("--target-ms", type=float, default=1000.0)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--scenarios", default="capacity,overload,light,step,sweep,deadline")
    p.add_argument("--sweep-budgets", default="1024,2048,4096",
                   help="Token budgets of the static configurations the sweep compares.")
    p.add_argument("--concurrency", type=int, default=8, help="Closed loops' concurrency.")
    p.add_argument("--closed-seconds", type=float, default=20.0, help="Closed loops' length.")
    p.add_argument("--serve-flag", action="append", default=[],
                   help="Extra `floe serve` flag for every server (repeat; e.g. --serve-flag=--max-batch-tokens=4096).")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    todo = set(args.scenarios.split(","))
    model, extra = args.model, list(args.serve_flag)
    shape = ["--batch-sizes", str(args.inputs), "--prompt-length", str(args.length)]
    summary: dict = {"model": model, "length": args.length, "inputs": args.inputs,
                     "cpu": open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": \t")}
    path = os.path.join(args.out, "summary.json")

    def save():
        with open(path, "w") as f:
            json.dump(summary, f, indent=1)

    with serve(args.out, "default", model, *extra) as (url, _):
        r = bench(args.out, "capacity", url, model, *shape, "--concurrency", str(args.concurrency), "--duration",
                  str(args.closed_seconds), "--requests", "1500")
        capacity = r["requests_per_s"]
    summary["capacity"] = row(r)
    print(f"capacity: {capacity:.2f} req/s ({r['tokens_per_s']:.0f} tok/s)", flush=True)
    save()
    if "overload" in todo:
        rate = args.overload * capacity
        for name, flags in (("overload-target", ["--latency-target-ms", str(args.target_ms)]),
                            ("overload-default", [])):
            with serve(args.out, name, model, *extra, *flags) as (url, _):
                r = bench(args.out, name, url, model, *shape, "--rate", f"{rate:.3f}",
                          "--duration", str(args.seconds), "--concurrency", "100000",
                          "--requests", str(int(rate * args.seconds * 1.2) + 16),
                          "--timeout", "600", plot=True)
            steady = [w for w in r.get("timeline", []) if 2 <= w["t"] < args.seconds - 1]
            steady_ok = sum(w["ok_rps"] for w in steady) / max(1, len(steady))
            summary[name] = {**row(r), "offered_rps": rate,
                             "goodput_vs_capacity": r["requests_per_s"] / capacity,
                             "steady_ok_rps": steady_ok,
                             "steady_goodput_vs_capacity": steady_ok / capacity}
            print(name, json.dumps(summary[name]), flush=True)
            save()
    if "light" in todo:
        light = 0.1 * capacity * args.inputs   # the same token rate in one-query requests
        for name, flags in (("light-tuned", []), ("light-static", ["--no-tuning"])):
            with serve(args.out, name, model, *extra, *flags) as (url, _):
                r = bench(args.out, name, url, model, "--batch-sizes", "1", "--prompt-length", "16",
                          "--rate", f"{min(light, 50):.3f}", "--duration", "20",
                          "--requests", str(int(min(light, 50) * 24) + 16),
                          "--concurrency", "100000")
            summary[name] = row(r)
            print(name, json.dumps(summary[name]), flush=True)
            save()
    if "step" in todo:
        with serve(args.out, "step", model, *extra) as (url, _):
            r = bench(args.out, "step", url, model, *shape, "--schedule", "step",
                      "--rate", f"{0.1 * capacity:.3f}", "--step-rate", f"{0.9 * capacity:.3f}",
                      "--step-at", "15", "--duration", "45", "--concurrency", "100000", plot=True)
        high = [w for w in r.get("timeline", []) if w["t"] >= 20]
        summary["step"] = {**row(r), "high_phase_ok_rps": sum(w["ok_rps"] for w in high) / max(1, len(high)),
                           "high_phase_offered_rps": 0.9 * capacity}
        print("step", json.dumps(summary["step"]), flush=True)
        save()
    if "sweep" in todo:
        summary["sweep"] = {}
        configs = [("tuned", [])] + [(f"static-{b}", ["--no-tuning", "--max-batch-tokens", b])
                                     for b in args.sweep_budgets.split(",")]
        for name, flags in configs:
            with serve(args.out, f"sweep-{name}", model, *extra, *flags) as (url, _):
                r = bench(args.out, f"sweep-{name}", url, model, *shape, "--concurrency", str(args.concurrency),
                          "--duration", str(args.closed_seconds), "--requests", "1500")
            summary["sweep"][name] = row(r)
            print("sweep", name, f"{r['requests_per_s']:.2f} req/s", flush=True)
            save()
    if "deadline" in todo:
        with serve(args.out, "deadline", model, *extra) as (url, grpc_address):
            summary["deadline"] = asyncio.run(_deadline_probe(url, grpc_address, model, args.inputs))
        print("deadline", json.dumps(summary["deadline"]), flush=True)
        save()
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
