#!/usr/bin/env python
"""Documents of any length, measured.

corpus   `floe embed-corpus --chunk-tokens N --chunk-overlap M` against the script a user of
         sentence-transformers would write: the same documents cut into N-token windows with the
         model's own tokenizer (offsets from `return_offsets_mapping`), then one `encode` of all
         the chunks (bf16, batch_size 64). Both are fresh processes on the same Parquet file, one
         after the other, start-up included; the documents are real prose (the standard
         library's docstring paragraphs, shuffled into documents of about --doc-tokens tokens).

late     the engine alone, one process: late chunking of a long document (one pass, each chunk
         pooled by span) against the forward pass of the same tokens as one plain input, and
         against the same chunks embedded as separate inputs. Times are medians of --repeats.

    python scripts/bench_chunking.py corpus --docs 1000 --doc-tokens 2000 --chunk-tokens 256
    python scripts/bench_chunking.py late --model MODEL_DIR --tokens 2000 --chunk-tokens 256

Keep the machine otherwise idle: both sides use every core.
"""

from __future__ import annotations

import argparse
import json
import os
import random
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
corpus, out, model, n, m = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
st = SentenceTransformer(model, device="cpu", model_kwargs={"torch_dtype": torch.bfloat16})
tok = st.tokenizer
docs = pq.read_table(corpus, columns=["text"]).column("text").to_pylist()
body = n - 2                                    # [CLS] ... [SEP]
texts, ids, starts = [], [], []
for d, text in enumerate(docs):
    offs = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    s = 0
    while s < len(offs):
        e = min(s + body, len(offs))
        texts.append(text[offs[s][0]:offs[e - 1][1]]); ids.append(d); starts.append(offs[s][0])
        if e == len(offs):
            break
        s = e - m
emb = st.encode(texts, batch_size=64, convert_to_numpy=True).astype(np.float32)
flat = pa.array(emb.reshape(-1), type=pa.float32())
pq.write_table(pa.table({"id": pa.array(ids), "start": pa.array(starts),
                         "embedding": pa.FixedSizeListArray.from_arrays(flat, emb.shape[1])}), out)
print(time.monotonic() - t0, len(texts))
"""


def make_documents(n: int, doc_tokens: int, seed: int) -> list[str]:
    from floe.textsets import stdlib_paragraphs

    paras = stdlib_paragraphs()
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        parts, chars = [], 0
        while chars < doc_tokens * 4.3:        # ~4.3 characters per word piece in this prose
            p = rng.choice(paras)
            parts.append(p)
            chars += len(p) + 2
        docs.append("\n\n".join(parts))
    return docs


def timed(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process and its children)."""
    t0 = time.monotonic()
    before = os.times()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    after = os.times()
    if r.returncode:
        sys.exit(f"{cmd[:4]} failed:\n{r.stderr[-3000:]}")
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return time.monotonic() - t0, cpu


def corpus(args) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = tempfile.mkdtemp(prefix="floe-bench-chunking-")
    path = os.path.join(tmp, "docs.parquet")
    docs = make_documents(args.docs, args.doc_tokens, args.seed)
    pq.write_table(pa.table({"text": docs}), path)
    from floe.config import ModelSettings
    from floe.models import load_spec
    model = load_spec(ModelSettings(model=args.model)).path
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="true")
    results = []
    for run in range(args.runs):
        out = os.path.join(tmp, f"floe-{run}.parquet")
        wall, cpu = timed([sys.executable, "-m", "floe", "embed-corpus", path, "-o", out,
                           "--model", args.model, "--chunk-tokens", str(args.chunk_tokens),
                           "--chunk-overlap", str(args.overlap), *args.floe_args], env)
        t = pq.read_table(out)
        tokens = None
        results.append({"side": "floe", "run": run, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                        "chunks": t.num_rows})
        print(json.dumps(results[-1]), flush=True)
        peer_out = os.path.join(tmp, f"peer-{run}.parquet")
        wall, cpu = timed([sys.executable, "-c", PEER, path, peer_out, model,
                           str(args.chunk_tokens), str(args.overlap)], env)
        p = pq.read_table(peer_out)
        results.append({"side": "sentence-transformers", "run": run, "wall_s": round(wall, 1),
                        "cpu_s": round(cpu, 1), "chunks": p.num_rows})
        print(json.dumps(results[-1]), flush=True)
        del tokens
    f = sorted(r["wall_s"] for r in results if r["side"] == "floe")
    s = sorted(r["wall_s"] for r in results if r["side"] != "floe")
    print(json.dumps({"docs": args.docs, "doc_tokens": args.doc_tokens,
                      "chunk_tokens": args.chunk_tokens, "overlap": args.overlap,
                      "floe_wall_s": f, "peer_wall_s": s,
                      "ratio_median": round(float(np.median(s)) / float(np.median(f)), 3)}))
    return 0


def late(args) -> int:
    from floe import validate
    from floe.chunking import ChunkOptions
    from floe.config import ModelSettings
    from floe.engine import create_engine
    from floe.models import load_spec
    from floe.tokenize import Tokenizer

    spec = load_spec(ModelSettings(model=args.model))
    tok = Tokenizer(spec)
    engine = create_engine(spec, kind=args.engine, dtype=args.dtype)
    doc = make_documents(1, args.tokens, args.seed)[0]
    # exactly --tokens tokens of text under this model's tokenizer (special tokens come on top)
    offsets = tok._plain.encode(doc, add_special_tokens=False).offsets
    doc = doc[:offsets[min(args.tokens, len(offsets)) - 1][1]]
    plan = validate.Plan(prompt="", truncate=True, direction="right")
    late_batch = tok.encode_chunked([doc], plan, ChunkOptions(max_tokens=args.chunk_tokens, late=True))
    plain_chunks = tok.encode_chunked([doc], plan, ChunkOptions(max_tokens=args.chunk_tokens))
    seq = late_batch.tokens.item(0)
    if late_batch.tokens.n != 1:
        sys.exit(f"the document took {late_batch.tokens.n} windows: lower --tokens below the "
                 f"model's max length {spec.max_seq_length}")
    spans = [late_batch.tokens.spans.bounds]
    chunks = [plain_chunks.tokens.item(i) for i in range(plain_chunks.tokens.n)]

    def clock(fn) -> float:
        fn()   # warm: the first call converts / compiles what it needs
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    whole = clock(lambda: engine.run(engine.prepare([seq])))
    late_s = clock(lambda: engine.run(engine.prepare([seq], spans=spans)))
    sep = clock(lambda: engine.run(engine.prepare(chunks)))
    print(json.dumps({"model": spec.name, "engine": engine.backend, "dtype": engine.dtype,
                      "tokens": int(len(seq)), "chunks": int(late_batch.rows),
                      "plain_one_input_s": round(whole, 4), "late_s": round(late_s, 4),
                      "plain_chunks_s": round(sep, 4),
                      "late_over_plain_input": round(late_s / whole, 3),
                      "late_over_plain_chunks": round(late_s / sep, 3)}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("corpus")
    c.add_argument("--model", default="default")
    c.add_argument("--docs", type=int, default=1000)
    c.add_argument("--doc-tokens", type=int, default=2000)
    c.add_argument("--chunk-tokens", type=int, default=256)
    c.add_argument("--overlap", type=int, default=0)
    c.add_argument("--runs", type=int, default=1)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("floe_args", nargs="*", help="extra `floe embed-corpus` arguments (after --)")
    l = sub.add_parser("late")
    l.add_argument("--model", required=True)
    l.add_argument("--engine", default="auto")
    l.add_argument("--dtype", default="auto")
    l.add_argument("--tokens", type=int, default=2000)
    l.add_argument("--chunk-tokens", type=int, default=256)
    l.add_argument("--repeats", type=int, default=5)
    l.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    return corpus(args) if args.cmd == "corpus" else late(args)


if __name__ == "__main__":
    sys.exit(main())
