"""`floe serve | info | embed | bench`: argument parsing only; the work lives in the modules."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Optional

from floe.logs import setup_logging
from floe.config import add_arguments, settings_from
from floe.errors import ConfigError, ModelLoadError, ReplicaStartError, WorkerStartError


def _serve(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    setup_logging(settings.server.log_level, settings.server.log_format)
    os.environ.setdefault("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))
    from floe.resolve import Hardware, resolve_server

    # the machine looked at once, the front-end count settled once (floe/resolve.py): serve
    # resolves the rest of the tree on the same hardware and keeps this count
    hardware = Hardware.detect(settings.model.device)
    settings = resolve_server(settings, hardware)
    metrics_dir = None
    if settings.server.frontend_workers > 1:
        # several front ends count into shared files (prometheus_client's multiprocess mode),
        # so any of them answers /metrics for all; set before prometheus_client is imported
        import tempfile
        metrics_dir = tempfile.mkdtemp(prefix="floe-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    from floe.frontend.server import serve
    try:
        return asyncio.run(serve(settings, hardware=hardware))
    finally:
        if metrics_dir:
            import shutil
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _info(args: argparse.Namespace) -> int:
    overrides = {"model": {"model": args.model_pos}} if args.model_pos else {}
    settings = settings_from(args, **overrides)
    setup_logging("warning")
    from floe.models import describe, load_spec

    spec = load_spec(settings.model)
    r = settings.replicas
    info = describe(spec, settings.model.device, settings.model.dtype, engine=r.engine,
                    engine_cache_dir=r.engine_cache_dir, native_attention=r.native_attention)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            if isinstance(v, dict):
                print(f"{k:<{width}}  " + ("" if v else "(none)"))
                for pk, pv in v.items():
                    print(f"{'':<{width}}    {pk}: {pv!r}")
            else:
                print(f"{k:<{width}}  {v}")
    return 0


def _embed_texts(args: argparse.Namespace) -> list[str]:
    """Texts from the arguments, else --file (``-``: stdin), else stdin; blank lines are skipped."""
    if args.texts:
        return list(args.texts)
    if args.file and args.file != "-":
        with open(args.file, encoding="utf-8") as f:
            return [line.rstrip("\r\n") for line in f if line.strip()]
    if sys.stdin is None or (not args.file and sys.stdin.isatty()):
        return []
    return [line.rstrip("\r\n") for line in sys.stdin if line.strip()]


def _embed(args: argparse.Namespace) -> int:
    """Embeds through floe.Client (which chunks to the server's limits and retries 429/503) and
    writes JSON lines or one .npy; any failure is one line on stderr and a non-zero exit."""
    import numpy as np
    import orjson
    from floe.client import Client, Retry
    from floe.errors import HTTP_STATUS, FloeError

    def fail(message: str, code: int = 1) -> int:
        print(f"floe embed: error: {message}", file=sys.stderr)
        return code

    try:
        texts = _embed_texts(args)
    except (OSError, UnicodeDecodeError) as e:
        return fail(f"cannot read {args.file}: {e}", 2)
    if not texts:
        return fail("nothing to embed: give texts as arguments, --file PATH, or lines on stdin", 2)
    to_npy = bool(args.output) and args.output.endswith(".npy")
    progress = sys.stderr.isatty() and not args.quiet
    shown = False
    rows: list = []
    out = None
    try:
        out = (open(args.output, "wb") if args.output and not to_npy else sys.stdout.buffer)
        with Client(args.server, protocol=args.protocol, api_key=args.api_key,
                    timeout=args.timeout, max_batch_size=args.batch_size,
                    retry=Retry(attempts=args.retries + 1)) as client:
            if args.chunk_tokens or args.late_chunking:
                return _embed_chunks(client, texts, args, out, to_npy)
            done = 0
            for arr in client.iter_embed(texts, dimensions=args.dimensions,
                                         prompt_name=args.prompt_name, normalize=args.normalize,
                                         output_dtype=args.output_dtype):
                if to_npy:
                    rows.append(arr)
                else:
                    f32 = arr.astype(np.float32, copy=False)
                    out.write(b"".join(
                        orjson.dumps({"text": t, "embedding": row}, option=orjson.OPT_SERIALIZE_NUMPY)
                        + b"\n" for t, row in zip(texts[done:done + len(arr)], f32)))
                done += len(arr)
                if progress and (shown or done < len(texts)):
                    shown = True
                    print(f"\rfloe embed: {done}/{len(texts)} texts ({100 * done // len(texts)}%)",
                          end="", file=sys.stderr, flush=True)
        if shown:
            print(file=sys.stderr)
        if to_npy:
            np.save(args.output, np.concatenate(rows))
        out.flush()
    except FloeError as e:
        if shown:
            print(file=sys.stderr)
        return fail(f"{e.kind.value} ({HTTP_STATUS[e.kind]}): {e.message}")
    except BrokenPipeError:
        return 0  # the reader stopped (e.g. `| head`): not an error of ours
    except OSError as e:
        return fail(f"cannot write {args.output or 'stdout'}: {e}", 2)
    finally:
        if out is not None and out is not sys.stdout.buffer:
            out.close()
    return 0


# Documents per chunked request: each may give many chunks, and the server counts the chunks
# against its item limit.
_DOCUMENTS_PER_REQUEST = 8


def _embed_chunks(client, texts: list[str], args: argparse.Namespace, out, to_npy: bool) -> int:
    """``floe embed --chunk-tokens``: each text is a document; one output row per chunk, with the
    document's index, the chunk's place and its characters [start, end) (JSON lines), or one
    (chunks, dim) array (.npy)."""
    import numpy as np
    import orjson

    rows = []
    for a in range(0, len(texts), _DOCUMENTS_PER_REQUEST):
        docs = texts[a:a + _DOCUMENTS_PER_REQUEST]
        got = client.embed_chunks(docs, max_tokens=args.chunk_tokens, overlap=args.chunk_overlap,
                                  late=args.late_chunking, dimensions=args.dimensions,
                                  prompt_name=args.prompt_name, normalize=args.normalize)
        if to_npy:
            rows.append(got.embeddings)
            continue
        out.write(b"".join(orjson.dumps(
            {"input_index": a + int(i), "chunk": int(c), "start": int(s), "end": int(e),
             "text": docs[i][s:e], "embedding": row}, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"
            for i, c, s, e, row in zip(got.input_index, got.chunk, got.start, got.end,
                                       got.embeddings)))
    if to_npy:
        np.save(args.output, np.concatenate(rows))
    out.flush()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="floe", description="High-throughput text-embedding server.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="serve a model over HTTP (OpenAI /v1/embeddings, /embed) and gRPC",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Serve a model. Settings may also come from FLOE_* variables.")
    add_arguments(p)
    p.set_defaults(func=_serve)

    p = sub.add_parser("info", help="print what floe would load for a model, without loading it")
    p.add_argument("model_pos", nargs="?", metavar="MODEL",
                   help="model folder, 'default' or hub id (default: --model or the embedded model)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_arguments(p, sections=("model",))
    add_arguments(p, sections=("replicas",), only=("engine",))
    p.set_defaults(func=_info)

    p = sub.add_parser("embed", help="embed texts (arguments, --file or stdin) with a running server",
                       description="Embed texts with a running floe server. Input of any length is "
                       "sent in requests within the server's limits (retried on 429/503); output is "
                       "JSON lines {\"text\", \"embedding\"} on stdout, or --output FILE (.npy: "
                       "one (n, dim) array, rows in input order). Blank input lines are skipped. "
                       "Any failure: one line on stderr, exit status 1 (server) or 2 (usage, files).")
    p.add_argument("texts", nargs="*", help="texts to embed (default: --file, else stdin lines)")
    p.add_argument("--file", "-f", default=None, metavar="PATH",
                   help="read texts from PATH, one per line ('-': stdin)")
    p.add_argument("--output", "-o", default=None, metavar="PATH",
                   help="write here instead of stdout: PATH.npy gets a numpy array, else JSON lines")
    p.add_argument("--server", default="http://127.0.0.1:8080",
                   help="http://host:port for HTTP or host:port for gRPC")
    p.add_argument("--protocol", choices=("http", "grpc"), default="http")
    p.add_argument("--api-key", default=os.environ.get("FLOE_API_KEY"),
                   help="bearer key (default: $FLOE_API_KEY)")
    p.add_argument("--dimensions", type=int, default=None, help="Matryoshka truncation")
    p.add_argument("--prompt-name", default=None)
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="L2-normalize (default: the server's default for the protocol)")
    p.add_argument("--output-dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="float16 is stored as float16 in .npy; bfloat16 as float32 holding "
                   "bfloat16 values")
    p.add_argument("--batch-size", type=int, default=None,
                   help="most texts per request (default: the server's limit over HTTP, 2048 "
                   "over gRPC)")
    p.add_argument("--retries", type=int, default=4,
                   help="times a request refused with 429/503 is sent again (after Retry-After)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress line on a terminal")
    p.add_argument("--chunk-tokens", type=int, default=None, metavar="N",
                   help="each text is a document: cut it into chunks of at most N tokens and "
                   "embed each; JSON lines then carry input_index, chunk, start, end and the "
                   "chunk's text (docs/api.md, documents of any length)")
    p.add_argument("--chunk-overlap", type=int, default=0, metavar="M",
                   help="tokens consecutive chunks share")
    p.add_argument("--late-chunking", action="store_true",
                   help="pool each chunk from its whole document's token states")
    p.set_defaults(func=_embed)

    from floe.corpus import args as corpus_args
    p = sub.add_parser("embed-corpus", help="embed a Parquet/JSONL/CSV corpus offline (in-process or on Ray)",
                       description=corpus_args.DESCRIPTION)
    corpus_args.add_arguments(p)
    p.set_defaults(func=corpus_args.main)

    p = sub.add_parser("bench", help="load generator for floe or any OpenAI-compatible server",
                       add_help=False)
    p.set_defaults(func=None)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from floe.bench import main as bench_main
        return bench_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)

    try:
        return int(args.func(args) or 0)
    except (ConfigError, ModelLoadError, ReplicaStartError, WorkerStartError) as e:
        print(f"floe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
