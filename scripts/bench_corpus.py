#!/usr/bin/env python
"""Wall time, start-up included: `floe embed-corpus` vs sentence-transformers' encode in bf16.

Both sides run as fresh processes on the same Parquet corpus, one after the other, in the same
run (so they see the same machine):

  floe   python -m floe embed-corpus CORPUS -o OUT.parquet [--engine E] [extra floe args]
  peer   python -c "<load SentenceTransformer in bfloat16; read CORPUS; encode(texts,
         batch_size=64); write the embeddings as Parquet>"

The corpus is synthetic text (words drawn from a fixed vocabulary, lengths uniform in
[--min-words, --max-words]), written once. Prints one JSON line per run and a summary with the
ratio peer_wall / floe_wall (> 1: floe is faster). Checks the two outputs agree (cosine).

Example: python scripts/bench_corpus.py --rows 20000 --runs 2 --engine openvino
Smoke:   python scripts/bench_corpus.py --rows 200 --runs 1
Keep the machine otherwise idle while it runs: both sides use every core.
"""

from __future__ import annotations

import argparse
import re
from typing import Optional
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

PEER = r"""
import sys, time
t0 = time.monotonic()
import numpy as np, pyarrow as pa, pyarrow.parquet as pq, torch
from sentence_transformers import SentenceTransformer
corpus, out, model, dtype = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
st = SentenceTransformer(model, device="cpu", model_kwargs={"torch_dtype": getattr(torch, dtype)})
texts = pq.read_table(corpus, columns=["text"]).column("text").to_pylist()
emb = st.encode(texts, batch_size=64, convert_to_numpy=True).astype(np.float32)
flat = pa.array(emb.reshape(-1), type=pa.float32())
pq.write_table(pa.table({"id": pa.array(np.arange(len(texts))),
                         "embedding": pa.FixedSizeListArray.from_arrays(flat, emb.shape[1])}), out)
print(time.monotonic() - t0)
"""

WORDS = ("the of and to in is was for on that with as by at from his her an which be are this "
         "have had not but were they all one their been has there who can more would when will "
         "system search vector corpus document retrieval embedding model query passage index "
         "language network training data learning large results method performance approach").split()


def make_corpus(path: str, kind: str, rows: int, min_words: int, max_words: int, seed: int) -> int:
    """Writes the corpus; returns its row count. ``words``: random words, lengths uniform in
    [min_words, max_words]; ``prose``: the standard library's docstring paragraphs (floe.textsets),
    repeated in a seeded shuffle when ``rows`` asks for more than there are."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    if kind == "prose":
        from floe.textsets import stdlib_paragraphs

        paras = stdlib_paragraphs()
        texts = [paras[i % len(paras)] for i in range(min(rows, len(paras)))]
        while len(texts) < rows:
            texts += [paras[i] for i in rng.permutation(len(paras))[: rows - len(texts)]]
    else:
        lengths = rng.integers(min_words, max_words + 1, size=rows)
        texts = [" ".join(rng.choice(WORDS, size=int(k))) for k in lengths]
    pq.write_table(pa.table({"text": texts}), path)
    return len(texts)


def count_tokens(path: str, model: str) -> int:
    from floe.config import ModelSettings
    from floe.models import load_spec
    from floe.protocol import EncodeOptions
    from floe.tokenize import Tokenizer
    import pyarrow.parquet as pq

    tok = Tokenizer(load_spec(ModelSettings(model=model)))
    texts = pq.read_table(path).column("text").to_pylist()
    return sum(tok.encode(texts[i:i + 1024], EncodeOptions()).total_tokens
               for i in range(0, len(texts), 1024))


STEADY: dict[str, list[float]] = {}   # side -> rows/s after the first shard, one per run
CPU: dict[str, list[float]] = {}      # side -> user + system CPU seconds of its process tree


def timed(cmd: list[str], env: dict, side: str = "") -> tuple[float, Optional[float]]:
    """The process' wall time, and the job's own (from its summary line: reading to the last
    commit, without the interpreter's and Ray's start-up) where it prints one. The summary's
    rate after the first shard (start-up and pipeline fill excluded) goes to STEADY[side]; the
    process' user + system CPU seconds (its waited-for children included, as /usr/bin/time
    counts them) go to CPU[side]."""
    t0 = time.monotonic()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{stderr[-3000:]}")
    if side:
        CPU.setdefault(side, []).append(usage.ru_utime + usage.ru_stime)
    m = re.search(r"embedded \d+ rows in ([0-9.]+) s", stdout + stderr)
    steady = re.search(r"([0-9.]+) rows/s after the first shard", stdout + stderr)
    if steady and side:
        STEADY.setdefault(side, []).append(float(steady.group(1)))
    return wall, float(m.group(1)) if m else None


SERVE_CLIENT = r"""
import asyncio, sys, time
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
from floe.client import AsyncClient
corpus, out, url, chunk, concurrency = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
texts = pq.read_table(corpus).column("text").to_pylist()
async def main():
    sem = asyncio.Semaphore(concurrency)
    async with AsyncClient(url) as c:
        async def one(i):
            async with sem:
                return await c.embed(texts[i:i + chunk])
        t0 = time.monotonic()
        parts = await asyncio.gather(*(one(i) for i in range(0, len(texts), chunk)))
        print(f"embedded {len(texts)} rows in {time.monotonic() - t0:.3f} s over HTTP")
    emb = np.concatenate(parts).astype(np.float32)
    flat = pa.array(emb.reshape(-1), type=pa.float32())
    pq.write_table(pa.table({"id": pa.array(np.arange(len(texts))),
                             "embedding": pa.FixedSizeListArray.from_arrays(flat, emb.shape[1])}), out)
asyncio.run(main())
"""


def serve_side(corpus: str, out: str, model: str, engine: Optional[str], env: dict,
               chunk: int = 64, concurrency: int = 32) -> tuple[float, Optional[float]]:
    """`floe serve` started fresh, the corpus sent over HTTP by floe's AsyncClient (chunks of
    ``chunk`` texts, ``concurrency`` in flight, like an indexing pipeline); returns the wall
    time including the server's start and the time from the first request to the last answer."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "floe", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--grpc-port", "0", "--model", model, "--log-level", "warning"]
    if engine:
        cmd += ["--engine", engine]
    t0 = time.monotonic()
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)
    try:
        while True:
            if server.poll() is not None:
                sys.exit(f"floe serve exited: {server.stderr.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        _, job = timed([sys.executable, "-c", SERVE_CLIENT, corpus, out,
                        f"http://127.0.0.1:{port}", str(chunk), str(concurrency)], env)
        return time.monotonic() - t0, job
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)


def embeddings(path: str) -> np.ndarray:
    import pyarrow.parquet as pq

    col = pq.read_table(path).column("embedding").combine_chunks()
    return col.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(col), -1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--corpus", choices=("words", "prose"), default="words",
                    help="random words (--min-words..--max-words per row) or real prose: the "
                         "standard library's docstring paragraphs (floe.textsets)")
    ap.add_argument("--peer-dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                    help="sentence-transformers' dtype; auto: bfloat16 on CPUs with AMX or "
                         "avx512_bf16, float32 elsewhere (bf16 is emulated, several times slower, "
                         "without them): the library at its fastest on this CPU")
    ap.add_argument("--min-words", type=int, default=8)
    ap.add_argument("--max-words", type=int, default=80)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--model", default=None, help="model folder (default: the embedded MiniLM)")
    ap.add_argument("--engine", default=None, help="floe --engine (default: floe's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--serve", action="store_true",
                    help="also time `floe serve` fed the corpus over HTTP by floe's AsyncClient "
                         "(64 texts per request, 32 in flight): the offline path against the "
                         "server's own best, in the same run")
    ap.add_argument("--no-peer", action="store_true",
                    help="skip the sentence-transformers side (to compare floe local with --ray)")
    ap.add_argument("--ray", action="store_true",
                    help="also run `floe embed-corpus --ray` (a new local Ray instance) in each run; "
                         "run the script inside a loopback-only network namespace (Ray listens on "
                         "every interface)")
    ap.add_argument("floe_args", nargs="*", help="extra floe embed-corpus arguments (after --)")
    args = ap.parse_args()

    from floe.models.source import embedded_model_path

    model = args.model or embedded_model_path()
    work = args.workdir or tempfile.mkdtemp(prefix="floe-bench-corpus-")
    corpus = os.path.join(work, "corpus.parquet")
    args.rows = make_corpus(corpus, args.corpus, args.rows, args.min_words, args.max_words, args.seed)
    from floe.engine.hardware import cpu_has_fast_bf16

    peer_dtype = args.peer_dtype
    if peer_dtype == "auto":
        peer_dtype = "bfloat16" if cpu_has_fast_bf16() else "float32"
    tokens = count_tokens(corpus, model)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="true")
    results: dict[str, list[float]] = {"floe": [], "peer": []}
    job_walls: dict[str, list[float]] = {"floe": [], "floe-ray": [], "floe-serve": []}
    sides = ["floe", "floe-ray", "peer"] if args.ray else ["floe", "peer"]
    if args.serve:
        sides.insert(-1 if "peer" in sides else len(sides), "floe-serve")
    if args.no_peer:
        sides.remove("peer")
    for run in range(args.runs):
        walls, outs = {}, {}
        for side in sides:
            out = outs[side] = os.path.join(work, f"{side}-{run}.parquet")
            for leftover in (out, out + ".parts"):
                subprocess.run(["rm", "-rf", leftover])
            if side == "peer":
                walls[side], _ = timed([sys.executable, "-c", PEER, corpus, out, model, peer_dtype],
                                       env, side)
                continue
            if side == "floe-serve":
                walls[side], job = serve_side(corpus, out, model, args.engine, env)
                if job is not None:
                    job_walls[side].append(job)
                continue
            cmd = [sys.executable, "-m", "floe", "embed-corpus", corpus, "-o", out, "--model", model,
                   "--no-progress", "--log-level", "warning"]
            if args.engine:
                cmd += ["--engine", args.engine]
            cmd += list(args.floe_args) + (["--ray"] if side == "floe-ray" else [])
            walls[side], job = timed(cmd, env, side)
            if job is not None:
                job_walls[side].append(job)
        ref_side = "peer" if "peer" in sides else "floe"
        ref = embeddings(outs[ref_side])
        for side in sides:
            results.setdefault(side, []).append(walls[side])
            line = {"run": run, "side": side, "wall_s": round(walls[side], 2), "rows": args.rows,
                    "tokens": tokens, "tokens_per_s": round(tokens / walls[side])}
            if side in CPU:
                line["cpu_s"] = round(CPU[side][-1], 1)
                line["cpu_us_per_token"] = round(CPU[side][-1] / tokens * 1e6, 2)
            if side == "peer":
                line["dtype"] = peer_dtype
            print(json.dumps(line), flush=True)
            if side != ref_side:
                a = embeddings(outs[side])
                cos = float(((a * ref).sum(1) / np.linalg.norm(a, axis=1)
                             / np.linalg.norm(ref, axis=1)).min())
                print(json.dumps({"run": run, f"min_cosine_{side}_vs_{ref_side}": round(cos, 6)}))
    if args.ray:
        lw, rw = min(results["floe"]), min(results["floe-ray"])
        ray_line = {"ray_summary": True, "local_best_wall_s": round(lw, 2),
                    "ray_best_wall_s": round(rw, 2),
                    "ray_throughput_over_local_wall": round(lw / rw, 3)}
        if job_walls["floe"] and job_walls["floe-ray"]:
            lj, rj = min(job_walls["floe"]), min(job_walls["floe-ray"])
            ray_line.update(local_job_s=lj, ray_job_s=rj,
                            ray_throughput_over_local_job=round(lj / rj, 3))
        if STEADY.get("floe") and STEADY.get("floe-ray"):
            # the rate a long job runs at: needs several shards (--shard-rows after --)
            ls, rs = max(STEADY["floe"]), max(STEADY["floe-ray"])
            ray_line.update(local_steady_rows_per_s=ls, ray_steady_rows_per_s=rs,
                            ray_steady_over_local_steady=round(rs / ls, 3))
        print(json.dumps(ray_line))
    if args.serve and job_walls["floe"] and job_walls["floe-serve"]:
        lj, sj = min(job_walls["floe"]), min(job_walls["floe-serve"])
        print(json.dumps({"serve_summary": True, "tokens": tokens,
                          "offline_tokens_per_s": round(tokens / lj),
                          "http_tokens_per_s": round(tokens / sj),
                          "offline_over_http": round(sj / lj, 3),
                          "note": "both without start-up: the offline job's own summary time, "
                                  "first request to last answer over HTTP"}))
    if args.no_peer:
        return 0
    f, p = min(results["floe"]), min(results["peer"])
    print(json.dumps({"summary": True, "rows": args.rows, "tokens": tokens,
                      "floe_best_wall_s": round(f, 2), "peer_best_wall_s": round(p, 2),
                      "speedup_peer_over_floe": round(p / f, 3), "peer_dtype": peer_dtype,
                      "floe_cpu_s": round(min(CPU.get("floe", [0])), 1),
                      "peer_cpu_s": round(min(CPU.get("peer", [0])), 1),
                      "floe_tokens_per_s": round(tokens / f), "peer_tokens_per_s": round(tokens / p),
                      "cpu_count": os.cpu_count()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
