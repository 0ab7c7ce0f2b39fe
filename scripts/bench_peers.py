"""floe against the strongest baselines a user would run, in one run on this machine.

    python scripts/bench_peers.py [--texts 2048] [--infinity .venv-infinity] [--skip ...]
                                  [--budgets 16384,4096] [--fills 0,0.9] [--rounds 3]
                                  [--model DIR] [--max-tokens N]

For each workload (50 tokens, 256 tokens, uniform 16-256 tokens per input, exact under the
model's tokenizer, or ``prose``: the standard library's docstring paragraphs within the model's
length, floe.textsets; --model: the embedded MiniLM by default, or any model folder, e.g. the
embeddinggemma-300m-shaped one of scripts/build_bench_model.py with --workloads 50,256,1024,2048
and --max-tokens to keep the long workloads to minutes):

- sentence-transformers in-process, ``encode(all_texts, batch_size=64)`` once, bf16 and fp32
  (what a user indexing a corpus with the library runs);
- floe serve with the OpenVINO engine and with the torch engine (bf16), and Infinity (bf16, its
  own environment: scripts/setup_infinity.sh), each over HTTP /v1/embeddings with
  encoding_format=base64 (what the openai client sends), 16 inputs per request, 64 requests in
  flight (``--per-request``, ``--concurrency``: 512 and 1 are a sequential indexing client),
  every text sent twice, by the same load generator (--client);
- the bf16 matmul peak of these cores with the model's own shapes (tokens x hidden @ hidden x
  intermediate), measured at the start of each round, and each system's share of it: the
  model's own FLOPs (floe/bench/roofline.py; a sliding-window layer counts its band, not n^2)
  per second over that round's peak, and over the highest peak of the run (a peak measured
  during a neighbour's burst is low, and would flatter the shares of its round).

Prints tokens/s per cell and floe's ratio to each baseline, then the median request latency of
each server (p50, the measured pass) and, for floe, the padding fill of its batches in that pass
(real / padded tokens, from the server's /metrics). Every system is started once and stays up;
``--rounds`` passes per cell interleave the systems, and the tables are medians. ``--budgets`` runs the OpenVINO server once
per ``--max-batch-tokens`` value (columns ``floe_openvino_b<budget>``), ``--fills`` once per
``--min-batch-fill`` value (``_f<fill>``) and ``--packing on,off`` with and without packing
(``_pack_on``, ``_pack_off``), ``--split on,off`` with and without cutting requests across
replicas (``_split_on``, ``_split_off``), ``--hand-back on,off`` with and without handing back
queued inputs to an idle replica (``_hb_on``, ``_hb_off``), ``--native on,off`` with and without
floe's attention kernel (``_nat_on``, ``_nat_off``). The load generator runs on the same cores as the
servers: by default wrk (C, one thread, scripts/bench_peers.lua), which takes a twentieth of
the Python asyncio client's CPU per token (``--client python``: httpx, about 3% of the two cores
on all-MiniLM); the Python client still sends each pass's warm-up and decodes its answers, and
it is the one to use against a server that refuses load (it retries after Retry-After, wrk
cannot).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Optional

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_server(proc: subprocess.Popen, grace: float = 60.0) -> None:
    """SIGTERM (the server drains), then SIGKILL to its process group after ``grace`` seconds."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def make_texts(n: int, lengths: str, seed: int = 0,
               model: str = "default") -> tuple[list[str], list[int]]:
    """n texts of exact token lengths (special tokens included) under ``model``'s tokenizer;
    returns (texts, their lengths)."""
    from floe.bench.workload import BenchTokenizer, load_model_spec

    tok = BenchTokenizer(load_model_spec(model))
    if lengths == "prose":
        # real prose: the standard library's docstring paragraphs (floe.textsets), in their
        # fixed order, those within the model's length (so no system truncates or refuses one)
        from floe.textsets import stdlib_paragraphs

        paragraphs = stdlib_paragraphs()
        counts = tok.count_lenient(paragraphs)
        keep = [i for i, c in enumerate(counts) if c <= tok.max_seq_length][:n]
        return [paragraphs[i] for i in keep], [int(counts[i]) for i in keep]
    rng = random.Random(seed)
    if "-" in lengths:
        lo, hi = map(int, lengths.split("-"))
        sizes = [rng.randint(lo, hi) for _ in range(n)]
    else:
        sizes = [int(lengths)] * n
    texts, ids = tok.exact_texts(sizes, np.random.default_rng(seed))
    return texts, [len(x) for x in ids]


class STEncode:
    """sentence-transformers in-process: one ``encode(all_texts, batch_size=64)`` call per pass,
    the model loaded once."""

    def __init__(self, dtype: str, model_path: str) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(os.cpu_count() or 1)
        self.model = SentenceTransformer(model_path, device="cpu")
        if dtype == "bfloat16":
            self.model = self.model.to(torch.bfloat16)
        self.model.encode(["warm up"] * 64, batch_size=64)

    def measure(self, texts: list[str], total: int) -> dict[str, float]:
        t0 = time.perf_counter()
        self.model.encode(texts, batch_size=64)
        return {"tokens_s": total / (time.perf_counter() - t0), "p50_s": 0.0, "fill": 0.0}


def matmul_peak(hidden: int = 384, intermediate: int = 1536, seconds: float = 3.0) -> float:
    """bf16 GFLOP/s of a matmul of the model's shapes (4096 tokens x hidden @ hidden x
    intermediate; MiniLM: 384 x 1536)."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    a = torch.randn(4096, hidden).to(torch.bfloat16)
    b = torch.randn(hidden, intermediate).to(torch.bfloat16)
    for _ in range(5):
        a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 4096 * hidden * intermediate * n / (time.perf_counter() - t0) / 1e9


class Server:
    def __init__(self, argv: list[str], url: str, env: dict | None = None) -> None:
        self.url = url
        self.proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True,
                                     env={**os.environ, **(env or {})})
        import httpx
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{argv[0]} exited with {self.proc.returncode}")
            try:
                r = httpx.post(url, json={"input": ["warm up"] * 16, "model": "m"}, timeout=30)
                if r.status_code == 200 and self._all_replicas_up(deadline):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError("server did not come up")

    def _all_replicas_up(self, deadline: float) -> bool:
        """floe answers once one replica is ready; the others may still be converting or
        calibrating, on the cores the next measurement needs. Waits for every replica (/info);
        a server without /info (Infinity) is up when it answers."""
        import httpx
        base = self.url.rsplit("/v1/", 1)[0]
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"{base}/info", timeout=10)
            except httpx.HTTPError:
                return False
            fleet = r.json().get("replicas") if r.status_code == 200 else None
            if not isinstance(fleet, dict) or fleet.get("healthy_replicas") == fleet.get("num_replicas"):
                return True
            time.sleep(0.5)
        return False

    def stop(self) -> None:
        stop_server(self.proc)


async def drive(url: str, texts: list[str], per_request: int = 16, concurrency: int = 64,
                model: str = "m", refusals: Optional[list] = None) -> tuple[float, list[float]]:
    """Sends ``texts`` in requests of ``per_request``, ``concurrency`` in flight; returns the
    wall seconds from the first request to the last answer and each request's latency.

    A request refused for load (429, or 503 at the connection cap) is sent again after its
    Retry-After, as the OpenAI client does: a slow model's server refuses what its queue bound
    cannot hold (floe: 30 s of predicted work) while it stays busy with the rest. Each refusal
    is appended to ``refusals``."""
    import httpx

    bodies = [json.dumps({"input": texts[i:i + per_request], "model": model,
                          "encoding_format": "base64"}).encode()
              for i in range(0, len(texts), per_request)]
    queue = [(body, None) for body in bodies]   # (body, when it was first sent)
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker() -> None:
            while queue:
                body, sent = queue.pop()
                sent = time.perf_counter() if sent is None else sent   # latency counts retries
                r = await client.post(url, content=body, headers={"content-type": "application/json"})
                if r.status_code in (429, 503) and "retry-after" in r.headers:
                    if refusals is not None:
                        refusals.append(r.status_code)
                    await asyncio.sleep(float(r.headers["retry-after"]))
                    queue.append((body, sent))
                    continue
                r.raise_for_status()
                latencies.append(time.perf_counter() - sent)
                data = r.json()["data"]
                np.frombuffer(base64.b64decode(data[0]["embedding"]), "<f4")
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - t0, latencies


WRK_SCRIPT = os.path.join(REPO, "scripts", "bench_peers.lua")


def install_wrk() -> Optional[str]:
    """wrk's path, installed from Debian's package with apt-get when missing (the package lists
    refreshed if the first try fails); None where it cannot be."""
    for steps in ([["apt-get", "install", "-y", "-qq", "wrk"]],
                  [["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]]):
        if shutil.which("wrk"):
            break
        for step in steps:
            try:
                subprocess.run(step, check=True, timeout=300, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
            except (OSError, subprocess.SubprocessError):
                break
    return shutil.which("wrk")


def ensure_wrk() -> str:
    return install_wrk() or sys.exit("wrk is not available (apt-get install wrk): "
                                     "use --client python")


def drive_wrk(url: str, texts: list[str], per_request: int = 16, concurrency: int = 64,
              model: str = "m", give_up_s: float = 1800.0) -> tuple[float, float, float]:
    """The same requests as ``drive``, sent by wrk (a C load generator, one thread) through
    scripts/bench_peers.lua; returns the wall seconds to the last answer, the median latency and
    wrk's CPU seconds. wrk cannot tell which body a refusal was for, so a refused or failed
    request voids the pass (use ``--client python``, which retries, for a server that refuses).
    A pass still unanswered after ``give_up_s`` (a request lost with its connection) fails."""
    import psutil

    bodies = [json.dumps({"input": texts[i:i + per_request], "model": model,
                          "encoding_format": "base64"})
              for i in range(0, len(texts), per_request)]
    wrk = ensure_wrk()
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl") as f:
        f.write("\n".join(bodies) + "\n")
        f.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen([wrk, "-t", "1", "-c", str(min(concurrency, len(bodies))),
                                 "-d", "3600s", "--timeout", "600s", "-s", WRK_SCRIPT, url,
                                 "--", f.name],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        watchdog = threading.Timer(give_up_s, proc.kill)
        watchdog.daemon = True
        watchdog.start()
        said = []
        for line in proc.stderr:   # the script writes "done ..." when the last answer came
            if line.startswith("done "):
                seconds = time.perf_counter() - t0
                answered, refused, failed = map(int, line.split()[1:])
                break
            said.append(line)
        else:
            proc.wait()
            watchdog.cancel()
            raise RuntimeError(f"wrk exited with {proc.returncode}: {''.join(said)[-400:]}")
        cpu = psutil.Process(proc.pid).cpu_times()
        proc.send_signal(signal.SIGINT)   # wrk stops and prints the script's summary
        out, _ = proc.communicate(timeout=60)
        watchdog.cancel()
    if refused or failed:
        raise RuntimeError(f"{refused} requests refused and {failed} failed of {len(bodies)} "
                           f"({''.join(said)[-300:]}); --client python retries refusals")
    p50_us = next(float(x.split()[1]) for x in out.splitlines() if x.startswith("latency_p50_us"))
    return seconds, p50_us / 1e6, cpu.user + cpu.system


def padding_counters(url: str) -> tuple[float, float]:
    """floe's (real, padded) token counters summed over replicas; (0, 0) for other servers."""
    import httpx

    base = url.rsplit("/v1/", 1)[0]
    try:
        text = httpx.get(base + "/metrics", timeout=30).text
    except httpx.HTTPError:
        return 0.0, 0.0
    sums = {"floe_tokens_embedded_total": 0.0, "floe_padded_tokens_total": 0.0}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in sums:
            sums[name] += float(line.rsplit(" ", 1)[1])
    return sums["floe_tokens_embedded_total"], sums["floe_padded_tokens_total"]


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User + system CPU seconds of a process (a server's front end) and of all its descendants
    (floe's replicas, Infinity's workers); those that exit in between are not counted."""
    import psutil

    own = children = 0.0
    try:
        root = psutil.Process(pid)
        for p in [root, *root.children(recursive=True)]:
            try:
                t = p.cpu_times()
            except psutil.Error:
                continue
            if p.pid == pid:
                own += t.user + t.system
            else:
                children += t.user + t.system
    except psutil.Error:
        pass
    return own, children


def serve_measure(server: "Server", texts: list[str], total: int,
                  client: str = "python", per_request: int = 16,
                  concurrency: int = 64) -> dict[str, float]:
    """tokens/s, p50 latency (s), padding fill (floe only, else 0) and the server's and the
    client's CPU seconds per million tokens of one measured pass: on these shared cores, what
    the client takes is not the server's, and the server's CPU per token is what a wall time on
    a noisy machine hides. The warm-up is always the Python client's, which decodes the answers:
    wrk only checks that each answer is a 200 with embeddings in it."""
    url = server.url
    warm = max(16, min(256, 16384 * len(texts) // max(1, total)))  # about 16k tokens
    asyncio.run(drive(url, texts[:warm], concurrency=16))   # warm-up
    real0, padded0 = padding_counters(url)
    (front0, rest0), client0 = cpu_seconds(server.proc.pid), time.process_time()
    refusals: list = []
    if client == "wrk":
        seconds, p50, wrk_cpu = drive_wrk(url, texts + texts, per_request, concurrency)
    else:
        seconds, latencies = asyncio.run(drive(url, texts + texts, per_request, concurrency,
                                               refusals=refusals))
        p50, wrk_cpu = float(np.median(latencies)), 0.0
    (front1, rest1), client1 = cpu_seconds(server.proc.pid), time.process_time()
    server0, server1 = front0 + rest0, front1 + rest1
    real1, padded1 = padding_counters(url)
    fill = (real1 - real0) / (padded1 - padded0) if padded1 > padded0 else 0.0
    per_m = 1e6 / (2 * total)
    return {"tokens_s": 2 * total / seconds, "p50_s": p50, "fill": fill,
            "server_cpu_per_m": (server1 - server0) * per_m,
            "front_cpu_per_m": (front1 - front0) * per_m,
            "client_cpu_per_m": (client1 - client0 + wrk_cpu) * per_m,
            "server_cores": (server1 - server0) / seconds, "refused": len(refusals)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--texts", type=int, default=2048)
    ap.add_argument("--model", default="default",
                    help="model folder (default: the embedded all-MiniLM-L6-v2)")
    ap.add_argument("--max-tokens", type=int, default=0,
                    help="at most this many tokens per workload (fewer texts for long inputs)")
    ap.add_argument("--workloads", default="50,256,16-256")
    ap.add_argument("--rounds", type=int, default=1,
                    help="passes per cell, the systems interleaved within each round; medians")
    ap.add_argument("--infinity", default=os.path.join(REPO, ".venv-infinity"),
                    help="Infinity's virtualenv (scripts/setup_infinity.sh)")
    ap.add_argument("--skip", default="", help="comma list of st_fp32,st_bf16,openvino,torch,infinity")
    ap.add_argument("--budgets", default="",
                    help="comma list of --max-batch-tokens values for the OpenVINO server "
                         "(default: the server's own default, one server)")
    ap.add_argument("--fills", default="",
                    help="comma list of --min-batch-fill values for the OpenVINO server, crossed "
                         "with --budgets (default: the server's own default)")
    ap.add_argument("--packing", default="",
                    help="comma list of on,off: the OpenVINO server with --packing / --no-packing, "
                         "crossed with --budgets and --fills (default: the server's own default)")
    ap.add_argument("--split", default="",
                    help="on,off: serve floe with and without cutting a request across replicas "
                         "(--split-min-tokens at its default, or 0): columns _split_on, _split_off")
    ap.add_argument("--hand-back", default="",
                    help="on,off: serve floe with and without handing back queued inputs to an "
                         "idle replica (--hand-back-min-tokens at its default, or 0): columns "
                         "_hb_on, _hb_off")
    ap.add_argument("--native", default="",
                    help="on,off: serve floe with --native-attention and --no-native-attention: "
                         "columns _nat_on, _nat_off")
    ap.add_argument("--per-request", type=int, default=16, help="inputs per request")
    ap.add_argument("--concurrency", type=int, default=64,
                    help="requests in flight (1: a sequential client, one request at a time)")
    ap.add_argument("--floe-dtype", default="bfloat16", choices=("bfloat16", "int8"),
                    help="the OpenVINO server's --dtype (int8: quality-gated at its first start; "
                         "the share of the peak stays the bf16 peak's)")
    ap.add_argument("--client", default="wrk", choices=("wrk", "python"),
                    help="the servers' load generator: wrk (C, one thread; installed with apt-get "
                         "when missing) or the Python asyncio client, which retries refusals")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    from floe.bench.roofline import model_shapes
    from floe.bench.workload import load_model_spec
    from floe.models.source import embedded_model_path

    model_path = str(embedded_model_path()) if args.model == "default" else args.model
    spec = load_model_spec(model_path)
    shapes = model_shapes(spec.backbone_path)
    # the peak is measured again at the start of each round: this machine's speed moves by
    # several percent over minutes, and a share is only as good as the peak it divides by
    peaks: list[float] = []
    workloads, flops = [], {}
    for wl in args.workloads.split(","):
        longest = 256 if wl == "prose" else int(wl.split("-")[-1])
        n = min(args.texts, max(1, args.max_tokens // longest)) if args.max_tokens else args.texts
        texts, lengths = make_texts(n, wl, model=model_path)
        workloads.append((wl, texts, sum(lengths)))
        flops[wl] = shapes.flops(lengths)

    # Every system is started once, up front, and stays up (idle while another is measured): the
    # rounds then interleave them, so a machine whose speed drifts during the run (this one's
    # does, by several times) shifts every system alike, and the medians compare like with like.
    systems: dict[str, Any] = {}
    servers: list[Server] = []
    try:
        for name, dtype in (("st_bf16", "bfloat16"), ("st_fp32", "float32")):
            if name not in skip:
                systems[name] = STEncode(dtype, model_path)
        budgets = [int(b) for b in args.budgets.split(",") if b] or [None]
        fills = [f for f in args.fills.split(",") if f] or [None]
        packs = [p for p in args.packing.split(",") if p] or [None]
        splits = [p for p in args.split.split(",") if p] or [None]
        hand_backs = [p for p in args.hand_back.split(",") if p] or [None]
        natives = [p for p in args.native.split(",") if p] or [None]
        for engine, budget, fill, pack, split, hb, nat in (
                [("openvino", b, f, p, c, h, n) for b in budgets for f in fills for p in packs
                 for c in splits for h in hand_backs for n in natives]
                + [("torch", None, None, None, None, None, None)]):
            if engine in skip:
                continue
            port = free_port()
            extra = (["--max-batch-tokens", str(budget)] if budget else []) + (
                ["--min-batch-fill", fill] if fill else []) + (
                [{"on": "--packing", "off": "--no-packing"}[pack]] if pack else []) + (
                ["--split-min-tokens", "0"] if split == "off" else []) + (
                ["--hand-back-min-tokens", "0"] if hb == "off" else []) + (
                ["--no-native-attention"] if nat == "off" else [])
            srv = Server([sys.executable, "-m", "floe", "serve", "--model", model_path,
                          "--engine", engine, "--dtype",
                          args.floe_dtype if engine == "openvino" else "bfloat16",
                          "--port", str(port), "--grpc-port", "0",
                          "--log-level", "warning", *extra],
                         f"http://127.0.0.1:{port}/v1/embeddings")
            servers.append(srv)
            systems[f"floe_{engine}" + (f"_b{budget}" if budget else "")
                    + (f"_f{fill}" if fill else "") + (f"_pack_{pack}" if pack else "")
                    + (f"_split_{split}" if split else "") + (f"_hb_{hb}" if hb else "")
                    + (f"_nat_{nat}" if nat else "")] = srv
        inf = os.path.join(args.infinity, "bin", "infinity_emb")
        if "infinity" not in skip and os.path.exists(inf):
            port = free_port()
            srv = Server([inf, "v2", "--model-id", model_path, "--served-model-name", "m",
                          "--engine", "torch", "--dtype", "bfloat16", "--device", "cpu",
                          "--port", str(port), "--url-prefix", "/v1", "--batch-size", "64",
                          "--no-model-warmup"],
                         f"http://127.0.0.1:{port}/v1/embeddings",
                         env={"INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1",
                              "HF_HUB_OFFLINE": "1"})
            servers.append(srv)
            systems["infinity"] = srv

        runs: dict[str, dict[str, list[dict[str, float]]]] = {
            wl: {name: [] for name in systems} for wl, _, _ in workloads}
        for r in range(args.rounds):
            peaks.append(matmul_peak(shapes.hidden, shapes.intermediate))
            print(f"round {r + 1}: bf16 matmul peak ({shapes.hidden} x {shapes.intermediate}): "
                  f"{peaks[-1]:.0f} GFLOP/s", flush=True)
            for wl, texts, total in workloads:
                for name, system in systems.items():
                    try:
                        if isinstance(system, Server):
                            m = serve_measure(system, texts, total, args.client,
                                              args.per_request, args.concurrency)
                        else:
                            m = system.measure(texts, total)
                    except Exception as e:  # noqa: BLE001 - one system's failure ends only its cell
                        print(f"round {r + 1} {wl} {name}: failed ({type(e).__name__}: {e})",
                              flush=True)
                        continue
                    m["flops_s"] = m["tokens_s"] * flops[wl] / total
                    m["share"] = m["flops_s"] / (peaks[-1] * 1e9)
                    runs[wl][name].append(m)
                    print(f"round {r + 1} {wl} {name}: {m['tokens_s']:,.0f} tokens/s, "
                          f"{100 * m['share']:.0f}% of the round's peak"
                          + (f", p50 {m['p50_s']:.2f} s" if m["p50_s"] else "")
                          + (f", fill {m['fill']:.3f}" if m["fill"] else "")
                          + (f", {m['refused']} refusals retried" if m.get("refused") else ""),
                          flush=True)
    finally:
        for srv in servers:
            srv.stop()

    def med(wl: str, name: str, key: str) -> float:
        got = [m[key] for m in runs[wl][name]]
        return float(np.median(got)) if got else 0.0

    names = list(systems)
    print()
    print(f"medians of {args.rounds} round(s), tokens/s:")
    print("| tokens per input | " + " | ".join(names) + " | floe best / ST bf16 | floe best / Infinity |")
    print("|---" * (len(names) + 3) + "|")
    for wl, _, _ in workloads:
        row = {n: med(wl, n, "tokens_s") for n in names}
        best = max((v for k, v in row.items() if k.startswith("floe")), default=0.0)
        st, inf_rate = row.get("st_bf16"), row.get("infinity")
        print(f"| {wl} | " + " | ".join(f"{v:,.0f}" for v in row.values())
              + (f" | {best / st:.2f}x" if st else " | n/a")
              + (f" | {best / inf_rate:.2f}x |" if inf_rate else " | n/a |"))
    print()
    print("p50 request latency (s) and floe's padding fill (real / padded tokens), medians:")
    for wl, _, _ in workloads:
        print(f"  {wl}: " + ", ".join(
            f"{n} p50 {med(wl, n, 'p50_s'):.2f}" + (f" fill {med(wl, n, 'fill'):.3f}"
                                                     if med(wl, n, "fill") else "")
            for n in names if isinstance(systems[n], Server)))
    print()
    print("CPU seconds per million tokens, the server's processes (of which its first process: "
          "floe's front end; the cores they kept busy) and this client's, medians:")
    for wl, _, _ in workloads:
        print(f"  {wl}: " + ", ".join(
            f"{n} server {med(wl, n, 'server_cpu_per_m'):.1f} (its first process "
            f"{med(wl, n, 'front_cpu_per_m'):.1f}; {med(wl, n, 'server_cores'):.2f} "
            f"cores) client {med(wl, n, 'client_cpu_per_m'):.1f}"
            for n in names if isinstance(systems[n], Server)))
    # Share of the matmul peak: the model's own FLOPs of the workload (floe/bench/roofline.py:
    # projections, MLP, attention over the keys each layer really has) at each system's rate,
    # over the peak of its round, and over the highest peak of the run: the hardware's peak does
    # not move, so a round whose peak measured low (a neighbour's load during those 3 s) would
    # flatter every share of that round (over 100% has been seen); the second never does.
    top = max(peaks, default=0.0)
    for wl, _, _ in workloads:
        for n in names:
            for m in runs[wl][n]:
                m["share_top"] = m["flops_s"] / (top * 1e9)
    print()
    print(f"share of the bf16 matmul peak (peaks {', '.join(f'{p:.0f}' for p in peaks)} "
          f"GFLOP/s), medians of the rounds: " + ", ".join(
              f"{wl}: " + " ".join(f"{n} {100 * med(wl, n, 'share'):.0f}%" for n in names)
              for wl, _, _ in workloads))
    print(f"the same over the run's highest peak ({top:.0f} GFLOP/s), medians: " + ", ".join(
        f"{wl}: " + " ".join(f"{n} {100 * med(wl, n, 'share_top'):.0f}%" for n in names)
        for wl, _, _ in workloads))


if __name__ == "__main__":
    main()
