"""`floe bench`: the load generator for floe and for any OpenAI-compatible embeddings server.

It takes ArcticInference's benchmark options (--server, --model, --batch-sizes, --requests,
--concurrency, --prompt-length, --distribution) and adds --protocol grpc|http, an open loop
(--rate, Poisson arrivals, with a --schedule that steps or bursts), --warmup, --duration,
--output-json, --plot, and --in-process, which runs the same workload through sentence-transformers
in this process as the plain-library baseline. An open-loop run also reports its results over time,
window by window (``stats.timeline``).

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
from floe.bench.schedule import SCHEDULES, RateSchedule
from floe.bench.stats import format_table, format_timeline, summarize, timeline
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
    w.add_argument("--schedule", choices=SCHEDULES, default="steady",
                   help="Open loop's rate over time: steady = --rate throughout; step = --rate, then "
                        "--step-rate from --step-at seconds on; burst = --rate with bursts at "
                        "--burst-rate lasting --burst-seconds every --burst-every seconds (the first "
                        "at --burst-every). step and burst need --duration and send as many requests "
                        "as the schedule's Poisson arrivals within it (--requests is not used).")
    w.add_argument("--step-rate", type=_positive_float, default=None,
                   help="--schedule step: requests/s from --step-at on.")
    w.add_argument("--step-at", type=_positive_float, default=None,
                   help="--schedule step: seconds from the start when the rate changes.")
    w.add_argument("--burst-rate", type=_positive_float, default=None,
                   help="--schedule burst: requests/s during a burst.")
    w.add_argument("--burst-seconds", type=_positive_float, default=None,
                   help="--schedule burst: how long each burst lasts.")
    w.add_argument("--burst-every", type=_positive_float, default=None,
                   help="--schedule burst: seconds between burst starts.")
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
    o.add_argument("--window", type=_positive_float, default=1.0,
                   help="Open loop: seconds per window of the results over time (logged, and "
                        "'timeline' in the JSON), by scheduled send time.")
    o.add_argument("--plot", default=None, metavar="PATH.png",
                   help="Open loop: draw the results over time (rates, latency p50/p99 on a log "
                        "scale, requests outstanding) into this PNG; with several --batch-sizes one "
                        "PNG each, named PATH-b<size>.png. Needs matplotlib (pip install 'floe[plot]').")
    o.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                   help="Live status line on stderr (auto: only when stderr is a terminal).")
    return p


_SCHEDULE_FLAGS = {"step": ("step_rate", "step_at"),
                   "burst": ("burst_rate", "burst_seconds", "burst_every")}


def schedule_of(args: argparse.Namespace) -> Optional[RateSchedule]:
    """The open loop's rate schedule the options ask for (None for a closed loop); raises
    BenchError for options that do not fit together."""
    kind = getattr(args, "schedule", "steady")
    for other, names in _SCHEDULE_FLAGS.items():
        given = [n for n in names if getattr(args, n, None) is not None]
        if given and kind != other:
            raise BenchError(f"--{given[0].replace('_', '-')} is for --schedule {other}")
    if args.rate is None:
        if kind != "steady":
            raise BenchError(f"--schedule {kind} needs --rate (the base rate)")
        return None
    if kind != "steady":
        missing = [n for n in _SCHEDULE_FLAGS[kind] if getattr(args, n, None) is None]
        if missing:
            raise BenchError(f"--schedule {kind} needs "
                             + ", ".join("--" + n.replace("_", "-") for n in missing))
        if args.duration is None:
            raise BenchError(f"--schedule {kind} needs --duration: the run sends the schedule's "
                             f"arrivals within it")
        if kind == "step" and args.step_at >= args.duration:
            raise BenchError(f"--step-at {args.step_at:g} must be before --duration {args.duration:g}")
    return RateSchedule(kind, args.rate, **{n: getattr(args, n, None)
                                            for names in _SCHEDULE_FLAGS.values() for n in names})


def _check(args: argparse.Namespace) -> None:
    schedule_of(args)
    if getattr(args, "plot", None):
        if args.rate is None:
            raise BenchError("--plot draws an open-loop run's results over time: give --rate")
        from floe.bench.plot import require_matplotlib

        require_matplotlib()
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
    schedule = schedule_of(args)
    window = getattr(args, "window", 1.0)
    client = _make_client(args, tok)
    rows = []
    try:
        target = await client.wait_ready(args.wait_ready)
        log(f"target: {target}")
        for bs in args.batch_sizes:
            t_gen = time.perf_counter()
            warm = build_requests(tok, args.warmup, bs, args.prompt_length, args.distribution, rng)
            offsets = None
            if schedule is not None and schedule.kind != "steady":
                offsets = schedule.arrivals(args.duration, rng)
            n = args.requests if offsets is None else len(offsets)
            reqs = build_requests(tok, n, bs, args.prompt_length, args.distribution, rng)
            log(f"batch size {bs}: {len(reqs)} requests, {sum(len(r.texts) for r in reqs)} inputs, "
                f"{sum(r.client_tokens for r in reqs)} tokens generated in {time.perf_counter() - t_gen:.1f}s")
            conc = 1 if args.in_process else args.concurrency
            if warm:
                await run_closed(client, warm, conc)
            enabled = None if args.progress == "auto" else args.progress == "on"
            progress = Progress(f"batch {bs}", len(reqs), enabled=enabled)
            if schedule is not None:
                horizon = args.duration  # the schedule's end, for the timeline's last window
                if offsets is None:  # steady: as many arrivals as --requests, cut at --duration
                    offsets = poisson_schedule(len(reqs), args.rate, rng)
                    if horizon is not None and len(offsets) and offsets[-1] < horizon:
                        horizon = None  # the requests ran out first: the schedule ended there
                t0 = time.perf_counter()
                samples = await run_open(client, reqs, offsets, conc, args.duration, progress, t0=t0)
            else:
                samples = await run_closed(client, reqs, conc, args.duration, progress)
            row = summarize(samples, bs)
            row["client_tokens"] = sum(r.client_tokens for r in reqs[: len(samples)])
            if schedule is not None:
                row["timeline"] = timeline(samples, t0, window, horizon)
                log(f"batch size {bs}, over time ({window:g} s windows, by scheduled send time):\n"
                    + format_timeline(row["timeline"]))
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
            "schedule": schedule.describe() if schedule is not None else None,
            "window": window if schedule is not None else None,
            "prompt_length": args.prompt_length, "distribution": args.distribution,
            "warmup": args.warmup, "seed": args.seed, "send_token_ids": args.send_token_ids,
            "encoding_format": args.encoding_format if mode == "http" else None,
            "st_batch_size": args.st_batch_size if args.in_process else None,
            "st_dtype": args.st_dtype if args.in_process else None,
            "argv": getattr(args, "argv", None),
        },
        "results": rows,
    })


def _plot(report: dict, path: str) -> None:
    """One PNG per batch size of an open-loop report (``plot.plot_path`` names them)."""
    from floe.bench.plot import plot_path, plot_timeline

    cfg, rows = report["config"], report["results"]
    sched = cfg["schedule"]
    points = None
    if sched is not None and cfg["duration"] is not None:
        segs = RateSchedule(**sched).segments(cfg["duration"])
        points = [p for a, b, r in segs for p in ((a, r), (b, r))]
    for row in rows:
        if not row.get("timeline"):
            continue
        out = plot_path(path, row["batch_size"], len(rows))
        title = (f"floe bench: {report['target']['mode']}, batch {row['batch_size']}, "
                 f"{sched['kind']} schedule from {sched['rate']:g} req/s")
        plot_timeline(row["timeline"], out, title, points)
        print(f"plot: {out}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`floe bench ...`: 0 when the run completed, 1 when a batch size had no successful request,
    2 for options or a server that cannot be used."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        schedule_of(args)
    except BenchError as e:
        parser.error(str(e))
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
    if args.plot:
        try:
            _plot(report, args.plot)
        except (BenchError, OSError) as e:
            print(f"floe bench: --plot: {e}", file=sys.stderr)
            return 2
    return 1 if any(r["successful"] == 0 for r in report["results"]) else 0
