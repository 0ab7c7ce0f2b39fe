"""`floe serve | info | embed | bench`: argument parsing only; the work lives in the modules."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from typing import Optional

from floe.config import add_arguments, settings_from
from floe.errors import ConfigError, ModelLoadError


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        from floe.logs import JsonFormatter
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _serve(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    setup_logging(settings.server.log_level, settings.server.log_format)
    os.environ.setdefault("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))
    from floe.frontend.server import serve
    return asyncio.run(serve(settings))


def _info(args: argparse.Namespace) -> int:
    overrides = {"model": {"model": args.model_pos}} if args.model_pos else {}
    settings = settings_from(args, **overrides)
    setup_logging("warning")
    from floe.models import describe, load_spec

    spec = load_spec(settings.model)
    if settings.replicas.engine == "fake":
        device, dtype = "cpu", "float32"
    else:
        from floe.engine.torch_engine import pick_device_and_dtype
        device, dtype = pick_device_and_dtype(settings.model.device, settings.model.dtype, spec)
    info = describe(spec, device, dtype)
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


def _embed(args: argparse.Namespace) -> int:
    from floe.client import Client

    texts = args.texts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    with Client(args.server, protocol=args.protocol, api_key=args.api_key) as client:
        arr = client.embed(texts, dimensions=args.dimensions, prompt_name=args.prompt_name)
    for text, row in zip(texts, arr):
        print(json.dumps({"text": text, "embedding": [round(float(x), 6) for x in row]}))
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
    p.add_argument("--engine", dest="replicas.engine", default=None, choices=("torch", "fake"))
    p.set_defaults(func=_info)

    p = sub.add_parser("embed", help="embed texts (arguments or stdin lines) with a running server")
    p.add_argument("texts", nargs="*")
    p.add_argument("--server", default="http://127.0.0.1:8080",
                   help="http://host:port for HTTP or host:port for gRPC")
    p.add_argument("--protocol", choices=("http", "grpc"), default="http")
    p.add_argument("--api-key", default=os.environ.get("FLOE_API_KEY"))
    p.add_argument("--dimensions", type=int, default=None)
    p.add_argument("--prompt-name", default=None)
    p.set_defaults(func=_embed)

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
    from floe.router.manager import ReplicaStartError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, ModelLoadError, ReplicaStartError) as e:
        print(f"floe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
