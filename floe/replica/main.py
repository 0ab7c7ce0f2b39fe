"""`python -m floe.replica`: one model replica as a gRPC server.

This file only wraps ReplicaCore (floe/replica/core.py) with a socket, a tokenizer for string
requests, signals and the parent-death watch. The start-up contract with the replica manager
(floe/router/manager.py):

* the line ``FLOE_REPLICA_READY <port>`` on stdout once the server is serving and the model warmed
  up (``--port 0`` prints the port actually bound);
* a start-up failure prints one line ``floe.replica: error: ...`` to stderr and exits 2 for a
  ModelLoadError / ConfigError (1 for anything unexpected, with the traceback);
* SIGTERM (or SIGINT, or the death of ``--parent-pid``): health turns NOT_SERVING, new requests get
  UNAVAILABLE, in-flight ones finish within ``--drain-timeout``, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import signal
import sys
import time
from typing import Optional

from floe.config import Settings, add_arguments, settings_from
from floe.errors import ConfigError, ModelLoadError, ModelNotFoundError, UnavailableError
from floe.proto import floe_pb2
from floe.protocol import EmbedResult, EncodeOptions, TokenBatch

log = logging.getLogger("floe.replica")

READY_LINE = "FLOE_REPLICA_READY"
_PR_SET_PDEATHSIG = 1
# Server-settings fields a replica honours (flags and FLOE_* variables); the rest are the front end's.
_SERVER_FIELDS = ("drain_timeout", "log_level", "log_format")


def arm_parent_death(parent_pid: Optional[int]) -> bool:
    """Asks Linux to SIGTERM this process when its parent dies; False where that is unavailable.

    Returns after checking that the parent is still the one named: if it died before the signal
    was armed, this process was re-parented and the signal will never come, so exit now.
    """
    if not parent_pid:
        return False
    armed = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent_pid:
        sys.exit(0)
    return armed


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m floe.replica",
        description="One floe model replica: gRPC floe.v1.Embedder and arctic_inference "
                    "InferenceService over a dynamic batcher.")
    add_arguments(p, ("model", "batch"))
    server_skip = tuple(f for f in Settings().server.__dataclass_fields__ if f not in _SERVER_FIELDS)
    add_arguments(p, ("server",), skip=server_skip)
    g = p.add_argument_group("replica settings")
    g.add_argument("--host", default="127.0.0.1", help="Address to bind. [default 127.0.0.1]")
    g.add_argument("--port", type=int, default=0,
                   help="Port to bind; 0 picks a free one (printed on the ready line). [default 0]")
    g.add_argument("--workers", dest="replicas.workers", type=int, default=None, metavar="N",
                   help="Threads tokenizing string requests sent to this replica directly.")
    g.add_argument("--engine", dest="replicas.engine", choices=("torch", "fake"), default=None,
                   metavar="{torch,fake}", help="torch (the real model) or fake (deterministic stand-in). [default torch]")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for the engine.")
    g.add_argument("--replica-id", default="0", help="Name in logs, stats and GetReplicaInfo.")
    g.add_argument("--parent-pid", type=int, default=None,
                   help="Exit when this process (the replica manager) dies.")
    g.add_argument("--gpu-memory-fraction", type=float, default=None,
                   help="Cap this process's share of its GPU's memory (torch engine on CUDA).")
    return p


class ReplicaBackend:
    """The EncodeBackend of one replica: tokenizes strings itself, validates ids, runs ReplicaCore."""

    api_key = None  # replicas listen on loopback / a private network; the front end authenticates

    def __init__(self, core, tokenizers, settings: Settings, address: str) -> None:
        self.core = core
        self.spec = core.spec
        self.tokenizers = tokenizers
        self.settings = settings
        self.address = address
        self.draining = False

    async def encode(self, request_id: str, texts: Optional[list[str]], tokens: Optional[TokenBatch],
                     options: EncodeOptions, model: str = "") -> EmbedResult:
        t0 = time.monotonic()
        if model and model != self.spec.name:
            raise ModelNotFoundError(
                f"model {model!r} is not served here; this replica serves {self.spec.name!r}",
                param="model")
        if self.draining:
            raise UnavailableError("replica is draining, retry on another replica")
        if tokens is None:
            tokens = await self.tokenizers.encode(
                texts or [], options, auto_truncate=self.settings.server.auto_truncate,
                default_prompt_name=self.settings.model.default_prompt_name)
        else:
            tokens = self.tokenizers.validate_ids(tokens, options,
                                                  auto_truncate=self.settings.server.auto_truncate)
        t_tok = time.monotonic() - t0
        result = await self.core.submit(tokens, options, request_id)
        result.timings.tokenize_s = t_tok
        result.timings.total_s = time.monotonic() - t0
        return result

    def ready(self) -> bool:
        return self.core.ready and not self.draining

    async def health(self) -> floe_pb2.HealthCheckResponse:
        ready = self.ready()
        msg = "ready" if ready else ("draining" if self.draining else "not ready")
        return floe_pb2.HealthCheckResponse(healthy=self.core.ready or self.draining, ready=ready,
                                            message=msg)

    def info(self) -> floe_pb2.ReplicaInfo:
        s, b, core = self.spec, self.settings.batch, self.core
        ready = self.ready()
        return floe_pb2.ReplicaInfo(
            replica_id=core.replica_id, model=s.name, architecture=s.architecture,
            dtype=core.engine.dtype, device=core.engine.device, ready=ready,
            healthy=core.ready or self.draining, dim=s.dim, max_seq_length=s.max_seq_length,
            pooling=s.pooling, prompts=dict(s.prompts),
            default_prompt_name=self.settings.model.default_prompt_name or s.default_prompt_name or "",
            matryoshka_dims=list(s.matryoshka_dims), max_batch_tokens=b.max_batch_tokens,
            max_batch_size=b.max_batch_size, batch_timeout_ms=b.batch_timeout_ms, pid=os.getpid(),
            status_message="ready" if ready else ("draining" if self.draining else "not ready"),
            address=self.address, stats=core.stats(), vocab_size=s.vocab_size)

    async def replica_info(self) -> floe_pb2.GetReplicaInfoResponse:
        info = self.info()
        return floe_pb2.GetReplicaInfoResponse(replicas=[info], n_replicas=1,
                                               n_healthy_replicas=int(info.healthy))

    async def abort(self, request_id: str) -> bool:
        return self.core.abort(request_id)


def _setup_logging(settings: Settings, replica_id: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.server.log_format == "json":
        from floe.logs import JsonFormatter
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s %(levelname)s replica {replica_id} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.server.log_level.upper())


def load(args: argparse.Namespace, settings: Settings):
    """Model spec, engine (warmed up at the full token budget) and tokenizer pool."""
    from floe.engine import create_engine
    from floe.models import load_spec
    from floe.tokenize import TokenizerPool

    spec = load_spec(settings.model)
    kind = settings.replicas.engine
    if args.gpu_memory_fraction is not None and kind == "torch":
        if not 0.0 < args.gpu_memory_fraction <= 1.0:
            raise ConfigError("--gpu-memory-fraction must be in (0, 1]")
        import torch  # only the torch engine pays for it
        if settings.model.device != "cpu" and torch.cuda.is_available():
            torch.cuda.set_per_process_memory_fraction(args.gpu_memory_fraction)
    engine = create_engine(spec, kind, device=settings.model.device, dtype=settings.model.dtype,
                           threads=args.threads)
    engine.warmup(settings.batch.max_batch_tokens)
    tokenizers = TokenizerPool(spec, workers=settings.replicas.workers)
    return spec, engine, tokenizers


async def _watch_pid(pid: int, on_exit) -> None:
    """Calls ``on_exit`` when process ``pid`` ends: a pidfd where the kernel has one, else a 1 s
    check of the parent pid (this process's parent changes when it dies)."""
    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        gone = asyncio.Event()
        loop.add_reader(fd, gone.set)
        try:
            await gone.wait()
        finally:
            loop.remove_reader(fd)
            os.close(fd)
    else:
        while os.getppid() == pid:
            await asyncio.sleep(1.0)
    log.warning("parent process %d exited; shutting down", pid)
    on_exit()


async def serve(args: argparse.Namespace, settings: Settings, engine, tokenizers) -> int:
    import grpc

    from floe.grpc_api import GRPC_OPTIONS, add_services
    from floe.replica.core import ReplicaCore

    core = ReplicaCore(engine, settings.batch, replica_id=args.replica_id)
    server = grpc.aio.server(options=GRPC_OPTIONS)
    target = f"[{args.host}]:{args.port}" if ":" in args.host else f"{args.host}:{args.port}"
    try:
        port = server.add_insecure_port(target)
    except RuntimeError:
        port = 0
    if not port:
        raise ConfigError(f"cannot bind {target}: address in use or not available")
    backend = ReplicaBackend(core, tokenizers, settings, address=f"{args.host}:{port}")
    health = add_services(server, backend)
    core.start()
    await server.start()
    health.set_serving(True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = (asyncio.create_task(_watch_pid(args.parent_pid, stop.set))
               if args.parent_pid else None)

    print(f"{READY_LINE} {port}", flush=True)
    log.info("replica %s serving %s on %s:%d (engine %s, %s on %s)", args.replica_id,
             engine.spec.name, args.host, port, settings.replicas.engine, engine.dtype, engine.device)
    await stop.wait()

    log.info("draining (up to %.1f s)", settings.server.drain_timeout)
    health.set_serving(False)
    backend.draining = True
    drained = await asyncio.to_thread(core.stop, settings.server.drain_timeout)
    if not drained:
        log.warning("drain timeout: in-flight requests were failed with UNAVAILABLE")
    await server.stop(grace=1.0)
    if watcher is not None:
        watcher.cancel()
    tokenizers.close()
    log.info("replica %s stopped", args.replica_id)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    arm_parent_death(args.parent_pid)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a replica never downloads on its own
    try:
        settings = settings_from(args)
    except ConfigError as e:
        print(f"floe.replica: error: {e}", file=sys.stderr, flush=True)
        return 2
    _setup_logging(settings, args.replica_id)
    try:
        _spec, engine, tokenizers = load(args, settings)
        return asyncio.run(serve(args, settings, engine, tokenizers))
    except (ConfigError, ModelLoadError) as e:
        print(f"floe.replica: error: {e}", file=sys.stderr, flush=True)
        return 2
    except Exception as e:  # noqa: BLE001 - report, with the traceback, and exit non-zero
        log.exception("replica failed")
        print(f"floe.replica: error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
