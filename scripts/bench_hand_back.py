#!/usr/bin/env python3
"""Each pass's end, with and without handing back (floe/fleet/router.py, "Handing back").

Starts two ``floe serve`` (the embedded all-MiniLM, default settings), one with
``--hand-back-min-tokens 0``, and sends each the same passes by turns, as scripts/bench_peers.py
does (wrk, 64 requests of 16 inputs in flight, every text twice). While a pass runs it samples
each replica process's CPU time every 20 ms (``/proc``), and reports per pass the tokens per
second, the idle tail (how long before the last answer the first replica to finish had done
its last work) and the rows handed back (``/info``), then medians and means per server.

    .venv/bin/python scripts/bench_hand_back.py --workload prose --passes 10
    .venv/bin/python scripts/bench_hand_back.py --workload 16-256 --passes 6

Run it with nothing else on the cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def idle_tail(samples: list, start: float, end: float, k: int) -> float:
    """Seconds before ``end`` that replica ``k`` last used CPU (5 ms or more in a 20 ms step)."""
    last = start
    for a, b in zip(samples, samples[1:]):
        if b[1][k] - a[1][k] > 0.005 and b[0] <= end + 0.03:
            last = b[0]
    return max(0.0, end - last)


def one_pass(server, texts: list[str], tokens: int):
    import httpx
    from bench_peers import drive_wrk

    pids = [c.pid for c in server.children if "floe.replica" in " ".join(c.cmdline())]
    samples: list = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.time(), [cpu_s(p) for p in pids]))
            time.sleep(0.02)

    info = server.base + "/info"
    before = httpx.get(info).json()["replicas"]["handed_back_rows"]
    thread = threading.Thread(target=sample)
    thread.start()
    start = time.time()
    seconds, _, _ = drive_wrk(server.url, texts)
    stop.set()
    thread.join()
    handed = httpx.get(info).json()["replicas"]["handed_back_rows"] - before
    tail = max(idle_tail(samples, start, start + seconds, k) for k in range(len(pids)))
    return tokens / seconds, tail, handed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="prose", help="prose, 50, 256, 16-256 (bench_peers.py)")
    ap.add_argument("--texts", type=int, default=1024)
    ap.add_argument("--passes", type=int, default=10)
    args = ap.parse_args()

    import psutil
    from bench_peers import Server, drive_wrk, free_port, make_texts
    from floe.models.source import embedded_model_path

    model = str(embedded_model_path())
    texts, lengths = make_texts(args.texts, args.workload, model=model)
    texts, tokens = texts + texts, 2 * sum(lengths)
    servers = {}
    try:
        for name, extra in (("hand back", []), ("none", ["--hand-back-min-tokens", "0"])):
            port = free_port()
            srv = Server([sys.executable, "-m", "floe", "serve", "--model", model, "--port", str(port),
                          "--grpc-port", "0", "--log-level", "warning", *extra],
                         f"http://127.0.0.1:{port}/v1/embeddings")
            srv.base = f"http://127.0.0.1:{port}"
            servers[name] = srv
        for srv in servers.values():   # (Server returns once every replica is up)
            srv.children = psutil.Process(srv.proc.pid).children(recursive=True)
            drive_wrk(srv.url, texts)   # warm-up pass
        results: dict[str, list] = {name: [] for name in servers}
        for p in range(args.passes):
            for name in (list(servers) if p % 2 == 0 else list(servers)[::-1]):
                rate, tail, handed = one_pass(servers[name], texts, tokens)
                results[name].append((rate, tail, handed))
                print(f"pass {p} {name}: {rate:,.0f} tokens/s, idle tail {tail:.2f} s, "
                      f"{handed} rows handed back", flush=True)
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                    if line.startswith("model name")), "?")
        print(f"\n{args.workload}, {args.passes} passes each, {cpu}, {os.cpu_count()} cores:")
        for name, rows in results.items():
            print(f"  {name}: median {statistics.median(r[0] for r in rows):,.0f} tokens/s, "
                  f"mean idle tail {statistics.mean(r[1] for r in rows):.3f} s, "
                  f"rows handed back {sum(r[2] for r in rows)}")
    finally:
        for srv in servers.values():
            srv.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
