"""Rerank throughput: `floe serve` /rerank against sentence-transformers' CrossEncoder.predict.

    python scripts/bench_rerank.py [--requests 32] [--docs 64] [--query-tokens 16]
                                   [--doc-tokens 200 | 20-200] [--rounds 3] [--concurrency 4]
                                   [-- floe serve arguments, e.g. --no-packing]

The reranker is a cross-encoder of ms-marco-MiniLM-L6-v2's shape built from the embedded
all-MiniLM-L6-v2 backbone with a one-label classification head (seeded; no model hub here), saved
as a plain transformers folder (BertForSequenceClassification), which both sides load.

- the library: ``CrossEncoder(folder).predict(all_pairs)`` once on the whole workload, in bf16
  where this CPU has fast bf16 (AMX or avx512_bf16), float32 elsewhere (--peer-dtype);
- floe: ``floe serve --model folder`` (its defaults), ``--requests`` POST /rerank requests of
  ``--docs`` documents each (query ``--query-tokens`` + document ``--doc-tokens`` word pieces,
  exact under the tokenizer), ``--concurrency`` in flight, from an asyncio httpx client on the
  same cores.

Prints pairs/s per side per round, the medians and their ratio, and the largest score difference
between the two (floe's scores are checked against the library's on the whole workload).
Keep the machine otherwise idle while it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))

from bench_peers import free_port, stop_server  # noqa: E402


def build_reranker(folder: str, seed: int = 0) -> str:
    """MiniLM-L6 with a seeded one-label head, saved as a cross-encoder folder."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from floe.models.source import embedded_model_path

    base = embedded_model_path()
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return folder


def doc_lengths(spec: str, count: int, seed: int = 0) -> list[int]:
    """``--doc-tokens``: one length ("200") or a range ("20-200", uniform, seeded)."""
    lo, _, hi = spec.partition("-")
    if not hi:
        return [int(lo)] * count
    rng = np.random.default_rng(seed + 1)
    return [int(n) for n in rng.integers(int(lo), int(hi) + 1, count)]


def workload(requests: int, docs: int, q_tokens: int, d_tokens: str, seed: int = 0):
    from floe.bench.workload import BenchTokenizer, load_model_spec

    tok = BenchTokenizer(load_model_spec("default"))
    rng = np.random.default_rng(seed)
    queries, _ = tok.exact_texts([q_tokens + 2] * requests, rng)   # + [CLS] [SEP]
    documents, _ = tok.exact_texts([n + 2 for n in doc_lengths(d_tokens, requests * docs, seed)],
                                   rng)
    return [(queries[r], documents[r * docs:(r + 1) * docs]) for r in range(requests)]


def peer_dtype(asked: str) -> str:
    if asked != "auto":
        return asked
    from floe.engine.hardware import cpu_has_fast_bf16

    return "bfloat16" if cpu_has_fast_bf16() else "float32"


def measure_library(folder: str, work, dtype: str, rounds: int) -> tuple[list[float], np.ndarray]:
    import torch
    from sentence_transformers import CrossEncoder

    torch.set_num_threads(os.cpu_count() or 1)
    model = CrossEncoder(folder, device="cpu", model_kwargs={"torch_dtype": getattr(torch, dtype)})
    pairs = [(q, d) for q, docs in work for d in docs]
    model.predict(pairs[:64])
    rates, scores = [], None
    for _ in range(rounds):
        t0 = time.perf_counter()
        scores = model.predict(pairs)
        rates.append(len(pairs) / (time.perf_counter() - t0))
    return rates, np.asarray(scores, dtype=np.float32)


async def drive(url: str, work, concurrency: int) -> tuple[float, np.ndarray]:
    import httpx

    out: list = [None] * len(work)
    queue = list(range(len(work)))

    async def worker(client) -> None:
        while queue:
            i = queue.pop()
            q, docs = work[i]
            r = await client.post(url + "/rerank", json={"query": q, "texts": docs})
            r.raise_for_status()
            scores = np.empty(len(docs), np.float32)
            for row in r.json():
                scores[row["index"]] = row["score"]
            out[i] = scores

    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    pairs = sum(len(d) for _, d in work)
    return pairs / elapsed, np.concatenate(out)


def measure_floe(folder: str, work, rounds: int, concurrency: int, extra: list[str]):
    import httpx

    port = free_port()
    argv = [sys.executable, "-m", "floe", "serve", "--model", folder, "--port", str(port),
            "--grpc-port", "0", *extra]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"floe serve exited with {proc.returncode}")
            try:
                if httpx.get(url + "/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("floe serve did not come up")
            time.sleep(1)
        asyncio.run(drive(url, work[:2], 2))   # warm
        rates, scores = [], None
        for _ in range(rounds):
            rate, scores = asyncio.run(drive(url, work, concurrency))
            rates.append(rate)
        return rates, scores
    finally:
        stop_server(proc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--docs", type=int, default=64)
    p.add_argument("--query-tokens", type=int, default=16)
    p.add_argument("--doc-tokens", default="200",
                   help="word pieces per document: one length, or a range such as 20-200")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--peer-dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    p.add_argument("--workdir", default=None)
    p.add_argument("floe_args", nargs="*", help="extra floe serve arguments (after --)")
    args = p.parse_args()

    workdir = args.workdir or tempfile.mkdtemp(prefix="floe-bench-rerank-")
    folder = os.path.join(workdir, "minilm-l6-reranker")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        build_reranker(folder)
    work = workload(args.requests, args.docs, args.query_tokens, args.doc_tokens)
    dtype = peer_dtype(args.peer_dtype)
    floe_rates, floe_scores = measure_floe(folder, work, args.rounds, args.concurrency, args.floe_args)
    lib_rates, lib_scores = measure_library(folder, work, dtype, args.rounds)
    for side, rates in (("floe", floe_rates), ("library", lib_rates)):
        for i, r in enumerate(rates):
            print(json.dumps({"side": side, "round": i, "pairs_per_s": round(r, 1)}))
    f, lib = statistics.median(floe_rates), statistics.median(lib_rates)
    print(json.dumps({
        "summary": True, "pairs": len(lib_scores), "docs_per_request": args.docs,
        "pair_tokens": args.query_tokens + float(np.mean(doc_lengths(
            args.doc_tokens, args.requests * args.docs))) + 3, "peer_dtype": dtype,
        "floe_pairs_per_s": round(f, 1), "library_pairs_per_s": round(lib, 1),
        "floe_over_library": round(f / lib, 3),
        "max_abs_score_diff": float(np.abs(floe_scores - lib_scores).max()),
        "cpu_count": os.cpu_count()}))


if __name__ == "__main__":
    main()
