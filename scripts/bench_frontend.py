"""The front end's cost per input, measured with h2load against `floe serve --engine fake`.

    python scripts/bench_frontend.py [--replicas 2] [--duration 10] [--runs 3] [--frontend-workers N]
                                     [--paced 0.8] [--serve-args "..."]

Prints one table: the tokenizers library alone (encode_batch, all cores), then floe over gRPC
with texts, gRPC with token ids, HTTP /v1/embeddings with base64 (16 inputs per request), and HTTP
with one input per request, each as requests/s and inputs/s (median of --runs), with the ratio to
tokenization alone, and the CPU time all server processes (front end and replicas) spent per input
during the run, split between the front-end processes and the replicas: on a machine whose speed swings, CPU per input moves less than the rates do. h2load (Debian's nghttp2-client; installed with apt-get when missing) only
counts status codes, so every configuration is first checked with real clients: the answers must
equal the fake engine's embeddings of the same inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench_peers import free_port, stop_server  # noqa: E402 - the scripts' shared helpers

# about 58 tokens with the default model's tokenizer, as in the measurements
TEXT = ("Search and retrieval pipelines embed billions of short passages, so the cost of every "
        "request outside the model matters as much as the model itself: parsing, checking, "
        "tokenizing, routing and answering must stay small next to the forward pass that a GPU "
        "runs in microseconds per input.")


def ensure_h2load() -> str:
    path = shutil.which("h2load")
    if path:
        return path
    subprocess.run(["apt-get", "install", "-y", "-qq", "nghttp2-client"], check=True,
                   stdout=subprocess.DEVNULL)
    return shutil.which("h2load") or sys.exit("h2load is not available")


def tokenizer_alone(seconds: float) -> float:
    """texts/s of the tokenizers library on 16-text batches from all cores (its own threads)."""
    from floe.models import load_spec
    from floe.config import ModelSettings
    from floe.tokenize import Tokenizer

    tok = Tokenizer(load_spec(ModelSettings()))._trunc["right"]
    batch = [f"{i} {TEXT}" for i in range(16)]
    tok.encode_batch_fast(batch)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        tok.encode_batch_fast(batch)
        n += 16
    return n / (time.perf_counter() - t0)


def server_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) so far of the front-end processes (floe serve and its
    front-end workers) and of the replica processes."""
    import psutil

    root = psutil.Process(pid)
    front = replicas = 0.0
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            is_front = p.pid == pid or "floe.frontend.worker" in " ".join(p.cmdline())
        except psutil.NoSuchProcess:
            continue
        if is_front:
            front += t.user + t.system
        else:
            replicas += t.user + t.system
    return front, replicas


def h2load(args: list[str], seconds: float, server_pid: int) -> tuple[float, float, float]:
    """Requests/s of successful (2xx) answers, and the front end's and the replicas' CPU seconds
    per answer."""
    front0, rep0 = server_cpu(server_pid)
    proc = subprocess.run(["h2load", "-D", str(int(seconds)), "--warm-up-time", "1", *args],
                          capture_output=True, text=True)
    ok = 0
    for line in proc.stdout.splitlines():
        if line.startswith("status codes:"):
            ok = int(line.split()[2])
    front1, rep1 = server_cpu(server_pid)
    if not ok:
        print(f"h2load gave no 2xx answers:\n{proc.stdout[-800:]}{proc.stderr[-400:]}", file=sys.stderr)
        return 0.0, float("nan"), float("nan")
    # h2load's warm-up second is served too: count its answers into the CPU share
    answered = ok * (int(seconds) + 1) / int(seconds)
    return ok / int(seconds), (front1 - front0) / answered, (rep1 - rep0) / answered


def paced_latency(h2_args: list[str], clients: int, rate: float, seconds: float,
                  tmp: str) -> tuple[float, float, float]:
    """p50 and p99 latency (ms) of 2xx answers, and the rate served, with h2load sending at
    ``rate`` requests/s in all (``--rps`` per client). The clients' connections are opened one by
    one across one pacing interval (``-r 1 --rate-period``), so their requests arrive spread out
    rather than all on the same timer tick. h2load paces each client: a late answer delays that
    client's next request, so under overload this understates latency (coordinated omission);
    below saturation, as here, the pacing holds."""
    log_path = os.path.join(tmp, "paced.log")
    if os.path.exists(log_path):
        os.unlink(log_path)   # h2load appends to its log file
    per_client = max(1, round(rate / clients))
    stagger_ms = max(1, round(1000 / per_client / clients))   # h2load takes whole ms
    total = per_client * clients * int(seconds)
    proc = subprocess.run(["h2load", "-n", str(total), "-r", "1", f"--rate-period={stagger_ms}ms",
                           f"--rps={per_client}", f"--log-file={log_path}", *h2_args],
                          capture_output=True, text=True)
    times = []
    with open(log_path) as f:
        for line in f:
            cols = line.split("\t")
            if len(cols) >= 3 and cols[1].startswith("2"):
                times.append(int(cols[2]) / 1000.0)
    if not times:
        print(f"h2load --rps gave no 2xx answers:\n{proc.stdout[-800:]}", file=sys.stderr)
        return float("nan"), float("nan"), 0.0
    p50, p99 = np.percentile(times, [50, 99])
    return float(p50), float(p99), len(times) / int(seconds)   # served over the paced span


def grpc_body(msg) -> bytes:
    data = msg.SerializeToString()
    return b"\x00" + struct.pack(">I", len(data)) + data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--frontend-workers", type=int, default=None,
                    help="floe serve --frontend-workers (default: the server's own choice)")
    ap.add_argument("--paced", type=float, default=0.0, metavar="FRACTION",
                    help="after each path's maximum, send at this fraction of it (e.g. 0.8) and "
                         "print p50 / p99 latency")
    ap.add_argument("--serve-args", default="",
                    help="more floe serve arguments, one string (e.g. \"--replica-hop grpc\")")
    args = ap.parse_args()
    ensure_h2load()

    import httpx
    import grpc
    from floe.proto import floe_pb2, floe_pb2_grpc

    tmp = tempfile.mkdtemp(prefix="floe-bench-")
    port, gport = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "floe", "serve", "--engine", "fake",
                             "--num-replicas", str(args.replicas), "--port", str(port),
                             "--grpc-port", str(gport), "--max-concurrent-requests", "4096",
                             "--log-level", "warning",
                             *(["--frontend-workers", str(args.frontend_workers)]
                               if args.frontend_workers else []), *shlex.split(args.serve_args)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                sys.exit("floe serve did not become ready")
            time.sleep(0.2)

        texts = [f"{i} {TEXT}" for i in range(16)]
        # answers checked with real clients before any load
        ref = np.array(httpx.post(url + "/embed", json={"inputs": texts}, timeout=30).json(),
                       dtype=np.float32)
        tokens = httpx.post(url + "/tokenize", json={"inputs": texts}, timeout=30).json()
        ids = [[t["id"] for t in item] for item in tokens]
        with grpc.insecure_channel(f"127.0.0.1:{gport}") as ch:
            stub = floe_pb2_grpc.EmbedderStub(ch)
            r = stub.Encode(floe_pb2.EncodeRequest(texts=texts), timeout=30)
            assert np.allclose(np.frombuffer(r.embeddings, "<f4").reshape(16, -1), ref, atol=1e-6)
            flat = np.concatenate([np.asarray(x, "<i4") for x in ids]).tobytes()
            ids_msg = floe_pb2.EncodeRequest(token_ids=flat, lengths=[len(x) for x in ids])
            r = stub.Encode(ids_msg, timeout=30)
            assert np.allclose(np.frombuffer(r.embeddings, "<f4").reshape(16, -1), ref, atol=1e-6)
        b64 = httpx.post(url + "/v1/embeddings", json={"input": texts, "encoding_format": "base64"},
                         timeout=30).json()
        import base64
        got = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in b64["data"]])
        assert np.allclose(got, ref, atol=1e-6)
        one = httpx.post(url + "/v1/embeddings", json={"input": texts[0]}, timeout=30).json()
        assert np.allclose(np.asarray(one["data"][0]["embedding"], np.float32), ref[0], atol=1e-6)
        usage_tokens = sum(len(x) for x in ids)

        files = {}
        for name, payload in (("grpc_texts", grpc_body(floe_pb2.EncodeRequest(texts=texts))),
                              ("grpc_ids", grpc_body(ids_msg)),
                              ("http_b64", json.dumps({"input": texts,
                                                       "encoding_format": "base64"}).encode()),
                              ("http_one", json.dumps({"input": texts[0]}).encode())):
            files[name] = os.path.join(tmp, name)
            with open(files[name], "wb") as f:
                f.write(payload)
        c = str(args.concurrency)
        grpc_args = ["-c", "8", "-m", str(max(1, args.concurrency // 8)), "-H", "content-type: application/grpc",
                     "-H", "te: trailers", f"http://127.0.0.1:{gport}/floe.v1.Embedder/Encode"]
        http_args = ["--h1", "-c", c, "-H", "content-type: application/json"]
        # (label, inputs per request, h2load arguments, h2load's clients)
        cases = [
            ("gRPC Encode, 16 texts", 16, ["-d", files["grpc_texts"], *grpc_args], 8),
            ("gRPC Encode, 16 token-id lists", 16, ["-d", files["grpc_ids"], *grpc_args], 8),
            ("HTTP /v1/embeddings base64, 16 texts", 16,
             ["-d", files["http_b64"], *http_args, url + "/v1/embeddings"], args.concurrency),
            ("HTTP /v1/embeddings, 1 text", 1,
             ["-d", files["http_one"], *http_args, url + "/v1/embeddings"], args.concurrency),
        ]
        print(f"{args.replicas} fake replicas, {args.frontend_workers or 'default'} front-end "
              f"process(es), {usage_tokens / 16:.0f} tokens per input, "
              f"h2load concurrency {args.concurrency}, {args.duration:g} s x {args.runs} runs (medians)")
        base = statistics.median(tokenizer_alone(min(5.0, args.duration)) for _ in range(args.runs))
        print(f"{'tokenizers encode_batch alone':40s} {'':>10s} {base:10.0f} inputs/s")
        for label, per, h2_args, clients in cases:
            runs = [h2load(h2_args, args.duration, proc.pid) for _ in range(args.runs)]
            rps = statistics.median(r for r, _, _ in runs)
            front_ms = statistics.median(f for _, f, _ in runs) * 1000 / per
            rep_ms = statistics.median(r for _, _, r in runs) * 1000 / per
            ratio = "" if "token-id" in label else f"  {rps * per / base:.2f}x tokenization alone"
            print(f"{label:40s} {rps:8.0f} req/s {rps * per:10.0f} inputs/s  "
                  f"{front_ms + rep_ms:6.3f} ms server CPU/input (front end {front_ms:.3f}, "
                  f"replicas {rep_ms:.3f}){ratio}", flush=True)
            if args.paced and rps:
                p50, p99, got = paced_latency(h2_args, clients, rps * args.paced, args.duration, tmp)
                print(f"{'  paced at ' + f'{args.paced:.0%}' + ' of that rate':40s} {got:8.0f} req/s "
                      f"{'':>10s}          p50 {p50:6.1f} ms  p99 {p99:6.1f} ms", flush=True)
    finally:
        stop_server(proc, grace=40)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
