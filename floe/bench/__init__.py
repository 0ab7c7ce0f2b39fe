"""`floe bench`: the load generator for floe and for any OpenAI-compatible embeddings server.

It takes ArcticInference's benchmark options (--server, --model, --batch-sizes, --requests,
--concurrency, --prompt-length, --distribution) and adds --protocol grpc|http, an open loop
(--rate, Poisson arrivals), --warmup, --duration, --output-json, and --in-process, which runs the
same workload through sentence-transformers in this process as the plain-library baseline.

Prompt lengths are exact under the model's tokenizer and throughput counts the tokens the server
reports, so tokens/s means the same for every server. See docs/benchmarks.md for the method.

Entry points: ``floe.bench.main(argv) -> int`` (the CLI's ``floe bench``) and ``python -m floe.bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import math
import os
import platform
import sys
import time
from typing import Optional, Sequence

import numpy as np

from floe.bench.runner import Progress, run_closed, run_open
from floe.bench.stats import format_table, summarize
from floe.bench.workload import (DISTRIBUTIONS, BenchError, BenchTokenizer, build_requests,
                                 load_model_spec, poisson_schedule)

REPORT_SCHEMA = 1
__all__ = ["main", "build_parser", "run", "BenchError", "REPORT_SCHEMA"]


def _positive_int(raw: str) -> int:
    try:
        v = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{raw!r} must be >= 1")
    return v


def _positive_float(raw: str) -> float:
    try:
        v = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a number") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"{raw!r} must be a positive number")
    return v


def _int_list(raw: str) -> list[int]:
    try:
        vals = [int(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a comma-separated list of integers") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"{raw!r}: give one or more integers >= 1, e.g. 1,16,64")
    return vals


def build_parser(prog: str = "floe bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=(
        "Measure an embeddings server (floe gRPC, or any OpenAI-compatible /v1/embeddings) or "
        "sentence-transformers in-process, with prompts of exact token lengths."))
    t = p.add_argument_group("target")
    t.add_argument("--server", default=None,
                   help="host:port (gRPC) or host:port / URL (HTTP). Default localhost:50050 for "
                        "grpc, localhost:8080 for http.")
    t.add_argument("--protocol", choices=("grpc", "http"), default="grpc",
                   help="grpc: floe.v1.Embedder/Encode. http: OpenAI-compatible POST /v1/embeddings "
                        "(floe, TEI, Infinity, vLLM).")
    t.add_argument("--endpoint", default="/v1/embeddings", help="HTTP path of the embeddings route.")
    t.add_argument("--model", default="default",
                   help="Model whose tokenizer builds the prompts: a local folder, or 'default' for "
                        "the embedded all-MiniLM-L6-v2. Also the in-process model.")
    t.add_argument("--served-model-name", default=None,
                   help="The request's `model` field (HTTP default: the first id of GET /v1/models; "
                        "gRPC default: empty, i.e. the served model).")
    t.add_argument("--encoding-format", choices=("base64", "float"), default="base64",
                   help="HTTP encoding_format asked for (the response is decoded either way).")
    t.add_argument("--send-token-ids", action="store_true",
                   help="Tokenize in the client and send ids (gRPC: int32 bytes; HTTP: lists of ints).")
    t.add_argument("--api-key", default=os.environ.get("FLOE_API_KEY"),
                   help="Bearer key for HTTP servers that need one [env FLOE_API_KEY].")
    t.add_argument("--timeout", type=_positive_float, default=120.0, help="Seconds per request.")
    t.add_argument("--wait-ready", type=float, default=10.0,
                   help="Seconds to wait for the server to report ready before giving up.")
    w = p.add_argument_group("workload")
    w.add_argument("--batch-sizes", type=_int_list, default=[1, 16, 64],
                   help="Comma-separated inputs per request; one run per value.")
    w.add_argument("--requests", type=_positive_int, default=1024, help="Requests per batch size.")
    w.add_argument("--duration", type=_positive_float, default=None,
                   help="Stop sending after this many seconds per batch size, even if --requests "
                        "are not all sent.")
    w.add_argument("--concurrency", type=_positive_int, default=64,
                   help="Closed loop: requests in flight at all times. Open loop: most in flight.")
    w.add_argument("--rate", type=_positive_float, default=None,
                   help="Open loop: requests/s with Poisson arrivals; latency counts from the "
                        "scheduled send time.")
    w.add_argument("--prompt-length", type=_positive_int, default=50,
                   help="Tokens per input, special tokens included, exact under --model's tokenizer.")
    w.add_argument("--distribution", choices=DISTRIBUTIONS, default="fixed",
                   help="For prompt lengths and batch sizes: fixed = the value; uniform on "
                        "[1, value]; normal with mean value/2, sd value/4, clipped to [1, value].")
    w.add_argument("--max-seq-length", type=_positive_int, default=None,
                   help="Longest prompt the generator may make and the in-process model's "
                        "max_seq_length (default: the model's). Start the server with the same value.")
    w.add_argument("--warmup", type=int, default=16, help="Requests sent first and not counted.")
    w.add_argument("--seed", type=int, default=0, help="Seed of the texts, sizes and arrivals.")
    i = p.add_argument_group("in-process baseline")
    i.add_argument("--in-process", action="store_true",
                   help="Run SentenceTransformer(model).encode here instead of calling a server "
                        "(concurrency 1).")
    i.add_argument("--st-batch-size", type=_positive_int, default=32, help="encode(batch_size=...).")
    i.add_argument("--st-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="Model precision (bfloat16: model.to(torch.bfloat16)).")
    i.add_argument("--device", default=None, help="In-process device (default: sentence-transformers').")
    o = p.add_argument_group("output")
    o.add_argument("--output-json", default=None, help="Write the JSON report here.")
    o.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                   help="Live status line on stderr (auto: only when stderr is a terminal).")
    return p


def _check(args: argparse.Namespace) -> None:
    if args.warmup < 0:
        raise BenchError("--warmup must be >= 0")
    if args.in_process and args.rate is not None:
        raise BenchError("--rate needs a server: --in-process runs one library call at a time")
    if args.in_process and args.send_token_ids:
        raise BenchError("--send-token-ids has no meaning with --in-process")
    if args.server is None:
        args.server = "localhost:50050" if args.protocol == "grpc" else "localhost:8080"


def machine_info() -> dict:
    """What the figures were measured on, for the report."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "hostname": platform.node()}
    try:
        import psutil

        info["memory_bytes"] = psutil.virtual_memory().total
    except ImportError:
        pass
    return info


def _make_client(args: argparse.Namespace, tok: BenchTokenizer):
    from floe.bench import clients

    if args.in_process:
        return clients.InProcessClient(tok.model_dir, tok.max_seq_length, args.st_batch_size,
                                       args.st_dtype, args.device)
    if args.protocol == "grpc":
        return clients.GrpcClient(args.server, args.served_model_name or "", args.send_token_ids,
                                  args.timeout)
    return clients.HttpClient(args.server, args.served_model_name, args.endpoint, args.encoding_format,
                              args.send_token_ids, args.timeout, args.concurrency, args.api_key)


def _nan_to_none(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


async def run(args: argparse.Namespace, log=print) -> dict:
    """Runs every batch size of the benchmark ``args`` describe and returns the JSON report."""
    _check(args)
    tok = BenchTokenizer(load_model_spec(args.model, args.max_seq_length))
    if args.prompt_length > tok.max_seq_length:
        raise BenchError(f"--prompt-length {args.prompt_length} exceeds max_seq_length "
                         f"{tok.max_seq_length}: pass --max-seq-length (and start the server with it)")
    rng = np.random.default_rng(args.seed)
    client = _make_client(args, tok)
    rows = []
    try:
        target = await client.wait_ready(args.wait_ready)
        log(f"target: {target}")
        for bs in args.batch_sizes:
            t_gen = time.perf_counter()
            warm = build_requests(tok, args.warmup, bs, args.prompt_length, args.distribution, rng)
            reqs = build_requests(tok, args.requests, bs, args.prompt_length, args.distribution, rng)
            log(f"batch size {bs}: {len(reqs)} requests, {sum(len(r.texts) for r in reqs)} inputs, "
                f"{sum(r.client_tokens for r in reqs)} tokens generated in {time.perf_counter() - t_gen:.1f}s")
            conc = 1 if args.in_process else args.concurrency
            if warm:
                await run_closed(client, warm, conc)
            enabled = None if args.progress == "auto" else args.progress == "on"
            progress = Progress(f"batch {bs}", len(reqs), enabled=enabled)
            if args.rate is not None:
                offsets = poisson_schedule(len(reqs), args.rate, rng)
                samples = await run_open(client, reqs, offsets, conc, args.duration, progress)
            else:
                samples = await run_closed(client, reqs, conc, args.duration, progress)
            row = summarize(samples, bs)
            row["client_tokens"] = sum(r.client_tokens for r in reqs[: len(samples)])
            rows.append(row)
    finally:
        await client.close()
    mode = "in-process" if args.in_process else args.protocol
    return _nan_to_none({
        "schema": REPORT_SCHEMA,
        "tool": "floe bench",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "target": {"mode": mode, "server": None if args.in_process else args.server, "description": target},
        "config": {
            "model": args.model, "model_dir": tok.model_dir, "max_seq_length": tok.max_seq_length,
            "batch_sizes": args.batch_sizes, "requests": args.requests, "duration": args.duration,
            "concurrency": 1 if args.in_process else args.concurrency, "rate": args.rate,
            "loop": "open" if args.rate is not None else "closed",
            "prompt_length": args.prompt_length, "distribution": args.distribution,
            "warmup": args.warmup, "seed": args.seed, "send_token_ids": args.send_token_ids,
            "encoding_format": args.encoding_format if mode == "http" else None,
            "st_batch_size": args.st_batch_size if args.in_process else None,
            "st_dtype": args.st_dtype if args.in_process else None,
            "argv": getattr(args, "argv", None),
        },
        "results": rows,
    })


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`floe bench ...`: 0 when the run completed, 1 when a batch size had no successful request,
    2 for options or a server that cannot be used."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        report = asyncio.run(run(args, log=lambda m: print(m, file=sys.stderr)))
    except BenchError as e:
        print(f"floe bench: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("floe bench: interrupted", file=sys.stderr)
        return 130
    print(format_table(report["results"]))
    if any(r["token_source"] in ("client", "mixed") for r in report["results"]):
        print("note: tokens counted with the client's tokenizer where the target reported none")
    if args.output_json:
        import json

        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 1 if any(r["successful"] == 0 for r in report["results"]) else 0
