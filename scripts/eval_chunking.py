"""Retrieval quality of documents of any length: truncated vs chunked, plain vs late chunking.

A small retrieval set from real prose shipped with every Python: each document is one standard
library module's documentation (the module's docstring, then those of its public classes and
functions, in source order: a few hundred to several thousand tokens), and each query is a
sentence taken from inside one document (a third of them from its first 200 tokens, the rest from
further in), asked of all the documents. A query is answered when its document is among the
first k documents, a document ranked by its best chunk (max-sim). Modes:

    truncated   one vector per document: its first max-length tokens (what a server that cuts
                long inputs indexes)
    chunked     floe's chunking (N tokens, M overlap), each chunk embedded alone
    late        the same chunks, pooled late from the whole document (macro-windows past the
                max length)

The embeddings are floe's own (Tokenizer.encode_chunked and an engine in this process, as the
replica runs them). Prints one JSON line per mode, and a Markdown table.

    python scripts/eval_chunking.py [--model default] [--chunk-tokens 128] [--overlap 16]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import pkgutil
import random
import re
import sys
import time
import warnings

import numpy as np

from floe import validate
from floe.chunking import ChunkOptions
from floe.config import ModelSettings
from floe.engine import create_engine
from floe.models import load_spec
from floe.tokenize import Tokenizer

_SKIP = ("antigravity", "this", "idlelib", "tkinter", "turtle", "test", "lib2to3", "ensurepip",
         "pydoc_data", "venv", "turtledemo", "__main__")
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def module_documents(min_chars: int, limit: int) -> list[str]:
    """One document per stdlib module: its docstring, then its public members' docstrings."""
    docs = []
    names = sorted(m.name for m in pkgutil.iter_modules() if m.module_finder and
                   "site-packages" not in str(getattr(m.module_finder, "path", "")))
    for name in names:
        if name.startswith("_") or name in _SKIP:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - any module that does not import is left out
            continue
        parts = [inspect.getdoc(mod) or ""]
        for key, obj in sorted(vars(mod).items()):
            if key.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 80:
                parts.append(f"{key}: {doc}")
        text = "\n\n".join(p for p in parts if p).strip()
        if len(text) >= min_chars:
            docs.append(text[:30000])
        if len(docs) >= limit:
            break
    return docs


def queries(docs: list[str], tok: Tokenizer, per_doc: int, seed: int) -> list[tuple[str, int, bool]]:
    """(sentence, its document, from the head) per query; a sentence that appears in two
    documents is left out."""
    rng = random.Random(seed)
    out = []
    for d, text in enumerate(docs):
        enc = tok._plain.encode(text, add_special_tokens=False)
        head_chars = enc.offsets[min(200, len(enc.offsets) - 1)][1] if enc.offsets else 0
        sents = [(m.start(), s) for m, s in
                 ((m, text[m.start():m.end()]) for m in re.finditer(r"[^.!?\n]{40,300}[.!?]", text))]
        sents = [(p, s.strip()) for p, s in sents if 8 <= len(s.split()) <= 40]
        head = [s for s in sents if s[0] < head_chars]
        tail = [s for s in sents if s[0] >= head_chars]
        picks = rng.sample(head, min(len(head), max(1, per_doc // 3)))
        picks += rng.sample(tail, min(len(tail), per_doc - len(picks)))
        for pos, s in picks:
            if sum(s in other for other in docs) == 1:
                out.append((s, d, pos < head_chars))
    return out


def embed_rows(engine, spec, chunked, batch_tokens: int) -> np.ndarray:
    toks = chunked.tokens
    seqs = [toks.item(i) for i in range(toks.n)]
    spans = None
    if toks.spans is not None:
        off = toks.spans.offsets()
        spans = [toks.spans.bounds[off[i]:off[i + 1]] for i in range(toks.n)]
    order = np.argsort([len(s) for s in seqs], kind="stable")
    out_rows = np.zeros((chunked.rows, spec.dim), np.float32)
    row_of = (np.arange(toks.n + 1) if spans is None else toks.spans.offsets())
    i = 0
    while i < len(order):
        j = i + 1
        while j < len(order) and (j - i + 1) * len(seqs[order[j]]) <= batch_tokens:
            j += 1
        idx = order[i:j]
        got = engine.run(engine.prepare([seqs[k] for k in idx], spans=None if spans is None
                                        else [spans[k] for k in idx]))
        rows = np.concatenate([np.arange(row_of[k], row_of[k + 1]) for k in idx])
        out_rows[rows] = got
        i = j
    return out_rows / np.linalg.norm(out_rows, axis=1, keepdims=True)


def recall(q: np.ndarray, rows: np.ndarray, owner: np.ndarray, truth: np.ndarray, n_docs: int,
           ks=(1, 10)) -> dict:
    sims = q @ rows.T
    best = np.full((len(q), n_docs), -np.inf, np.float32)
    for d in range(n_docs):
        cols = owner == d
        if cols.any():
            best[:, d] = sims[:, cols].max(axis=1)
    rank = (best > best[np.arange(len(q)), truth][:, None]).sum(axis=1)
    out = {f"recall@{k}": float((rank < k).mean()) for k in ks}
    out["mrr"] = float((1.0 / (rank + 1)).mean())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--docs", type=int, default=120)
    ap.add_argument("--min-chars", type=int, default=3000)
    ap.add_argument("--queries-per-doc", type=int, default=6)
    ap.add_argument("--chunk-tokens", type=int, default=128)
    ap.add_argument("--overlap", type=int, default=16)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    spec = load_spec(ModelSettings(model=args.model))
    tok = Tokenizer(spec)
    engine = create_engine(spec, kind=args.engine, dtype=args.dtype)
    docs = module_documents(args.min_chars, args.docs)
    qs = queries(docs, tok, args.queries_per_doc, args.seed)
    plan = validate.Plan(prompt="", truncate=True, direction="right")
    doc_tokens = [len(tok._plain.encode(d, add_special_tokens=False).ids) for d in docs]
    print(f"{len(docs)} documents ({int(np.median(doc_tokens))} tokens median, "
          f"{int(np.mean(doc_tokens))} mean), {len(qs)} queries "
          f"({sum(h for _, _, h in qs)} from a document's first 200 tokens); {spec.name}, "
          f"{engine.backend} {engine.dtype}", file=sys.stderr)
    qb = tok.encode([q for q, _, _ in qs], _options())
    qv = engine.run(engine.prepare([qb.item(i) for i in range(qb.n)]))
    qv = qv / np.linalg.norm(qv, axis=1, keepdims=True)
    truth = np.array([d for _, d, _ in qs])
    head = np.array([h for _, _, h in qs])
    modes = {
        "truncated": None,
        f"chunked N={args.chunk_tokens} M={args.overlap}":
            ChunkOptions(max_tokens=args.chunk_tokens, overlap=args.overlap),
        f"late N={args.chunk_tokens} M={args.overlap}":
            ChunkOptions(max_tokens=args.chunk_tokens, overlap=args.overlap, late=True),
    }
    results = []
    for name, opts in modes.items():
        t0 = time.perf_counter()
        if opts is None:   # each document cut to the max length: what truncation keeps
            rows = embed_rows(engine, spec, _Whole(tok.encode(docs, _options())), args.batch_tokens)
            owner = np.arange(len(docs))
        else:
            chunked = tok.encode_chunked(docs, plan, opts)
            rows = embed_rows(engine, spec, chunked, args.batch_tokens)
            owner = chunked.input_index
        r = {"mode": name, "rows": int(len(rows)), "seconds": round(time.perf_counter() - t0, 1),
             **recall(qv, rows, owner, truth, len(docs)),
             "beyond_head": recall(qv[~head], rows, owner, truth[~head], len(docs))}
        results.append(r)
        print(json.dumps(r))
    print("\n| mode | vectors | recall@1 | recall@10 | MRR | recall@10, queries past the first 200 tokens |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['rows']} | {r['recall@1']:.3f} | {r['recall@10']:.3f} | "
              f"{r['mrr']:.3f} | {r['beyond_head']['recall@10']:.3f} |")
    return 0


def _options():
    from floe.protocol import EncodeOptions

    return EncodeOptions(truncate=True)


class _Whole:
    """A plain token batch in the shape ``embed_rows`` reads (one row per sequence)."""

    def __init__(self, tokens) -> None:
        self.tokens = tokens
        self.rows = tokens.n


if __name__ == "__main__":
    sys.exit(main())
