"""`python -m floe.entrypoints.replica_manager`: N replicas behind one public gRPC port, no HTTP.

The option names follow ArcticInference's replica manager (--port is the public gRPC port, 50050;
replicas listen on --replica-host:--start-port + i), so its users migrate by changing a command.
Every other floe setting (batching, model, admission) is accepted too: the flags come from the one
settings tree, floe/config.py. SIGTERM or SIGINT drains: readiness goes false, in-flight requests
finish (up to --drain-timeout), the replicas exit, the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Optional

from floe.config import add_arguments, settings_from
from floe.errors import ConfigError, ModelLoadError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m floe.entrypoints.replica_manager",
        description="Serve a model from several replica processes behind one gRPC endpoint "
                    "(floe.v1.Embedder and arctic_inference.InferenceService). See docs/replicas.md.",
    )
    # --port is the gRPC port here (ArcticInference's meaning); there is no HTTP listener.
    add_arguments(parser, skip=("port", "grpc_port"))
    parser.add_argument("--port", dest="server.grpc_port", type=int, default=None,
                        help="Public gRPC port [env FLOE_GRPC_PORT; default 50050]")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from floe.logs import setup_logging
    from floe.errors import ReplicaStartError

    try:
        settings = settings_from(args, server={"port": 0})
        if not settings.server.grpc_port:
            raise ConfigError("--port must be a TCP port: the gRPC listener is the only one")
        setup_logging(settings.server.log_level, settings.server.log_format)
        from floe.frontend.server import serve
        return int(asyncio.run(serve(settings)) or 0)
    except (ConfigError, ModelLoadError, ReplicaStartError) as e:
        print(f"floe replica manager: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
