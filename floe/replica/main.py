"""`python -m floe.replica`: one model replica process.

This file only wraps ReplicaCore (floe/replica/core.py) with a socket, signals and the parent's
watch. A replica runs in one of two ways:

* **managed** (started by the fleet's supervisor, floe/fleet/replica_slot.py): the whole settings
  tree, its address, placement and a per-launch token arrive as a ``ReplicaLaunch``
  (floe/protocol.py) in FLOE_REPLICA_LAUNCH. It serves the private link's frames
  (floe/transport/frames.py, floe's own messages) on its Unix socket (the default) or on TCP,
  requires the token as every connection's first frame (HELLO), trusts the front end's
  validation (its core only asserts invariants), writes JSON log lines to stderr for the supervisor to re-emit, and prints a
  ``ReplicaHello`` line on stdout once it serves.
* **standalone** (run by hand, flags below): a complete gRPC server on its own. It is then the
  edge, so it validates requests with floe/validate.py and tokenizes strings itself.

A start-up failure prints one line ``floe.replica: error: ...`` to stderr and exits 2 for a
ModelLoadError / ConfigError (1 for anything unexpected, with the traceback, and for a managed
replica whose address is busy: that may change on a restart). SIGTERM (or SIGINT,
or the death of the parent): health turns NOT_SERVING, new requests get UNAVAILABLE, in-flight
ones finish within the drain timeout, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Optional

from floe import validate
from floe.edge import Edge
from floe.config import Settings, add_arguments, settings_from, settings_from_dict
from floe.errors import ConfigError, InternalError, ModelLoadError, UnavailableError
from floe.proto import floe_pb2
from floe.protocol import EmbedResult, EncodeOptions, ReplicaHello, ReplicaLaunch, TokenBatch

log = logging.getLogger("floe.replica")

# Server-settings fields a standalone replica honours; the rest are the front end's.
_SERVER_FIELDS = ("drain_timeout", "log_level", "log_format", "api_key", "max_client_batch_size",
                  "max_input_chars", "auto_truncate", "grpc_payload_limit")
# Replica-set fields that are one replica's own (the rest place and watch a set of replicas).
_REPLICA_FIELDS = ("workers", "engine")


@dataclass(frozen=True)
class Runtime:
    """How this replica process runs: from a manager's launch or from the command line."""

    settings: Settings
    address: str              # gRPC target to bind: "unix:/path" or "host:port"
    replica_id: str
    parent_pid: Optional[int]
    token: Optional[str]      # required Bearer token (managed: the launch token; standalone: --api-key)
    threads: Optional[int]
    gpu_memory_fraction: Optional[float]
    managed: bool


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
    g.add_argument("--unix-socket", default=None, help="Bind this Unix socket path instead of a port.")
    add_arguments(p, ("replicas",), only=_REPLICA_FIELDS, group=g)
    g.add_argument("--threads", type=int, default=None, help="CPU threads for the engine.")
    g.add_argument("--replica-id", default="0", help="Name in logs, stats and GetReplicaInfo.")
    g.add_argument("--parent-pid", type=int, default=None,
                   help="Exit when this process dies.")
    g.add_argument("--gpu-memory-fraction", type=float, default=None,
                   help="Cap this process's share of its GPU's memory (torch engine on CUDA).")
    return p


def runtime_from_launch(launch: ReplicaLaunch) -> Runtime:
    return Runtime(settings=settings_from_dict(launch.settings), address=launch.address,
                   replica_id=str(launch.index), parent_pid=launch.parent_pid, token=launch.token,
                   threads=launch.placement.threads,
                   gpu_memory_fraction=launch.placement.gpu_memory_fraction, managed=True)


def runtime_from_args(args: argparse.Namespace) -> Runtime:
    settings = settings_from(args)
    from floe.transport.grpc import grpc_target
    address = f"unix:{args.unix_socket}" if args.unix_socket else grpc_target(args.host, args.port)
    return Runtime(settings=settings, address=address, replica_id=args.replica_id,
                   parent_pid=args.parent_pid, token=settings.server.api_key, threads=args.threads,
                   gpu_memory_fraction=args.gpu_memory_fraction, managed=False)


class AddressBusyError(Exception):
    """A managed replica could not bind its address (exit 1: its supervisor retries)."""


class ReplicaBackend:
    """The EncodeBackend of one replica. Standalone it is the edge: it validates (floe/validate.py)
    and tokenizes strings; managed, the front end did both and the core asserts invariants."""

    def __init__(self, core, tokenizers, settings: Settings, address: str, trusted: bool) -> None:
        self.core = core
        self.spec = core.spec
        self.tokenizers = tokenizers
        self.settings = settings
        self.address = address
        self.trusted = trusted
        self.draining = False
        self.edge = Edge(validate.Limits.for_server(self.spec, settings), tokenizers)

    async def encode(self, request_id: str, texts: Optional[list[str]], tokens: Optional[TokenBatch],
                     options: EncodeOptions, model: str = "") -> EmbedResult:
        t0 = time.monotonic()
        if self.draining:
            raise UnavailableError("replica is draining, retry on another replica")
        if not self.trusted:
            tokens = (await self.edge.prepare(texts, tokens, options, model)).tokens
        elif tokens is None:
            raise UnavailableError("this replica takes token ids from its manager only")
        t_tok = time.monotonic() - t0
        result = await self.core.submit(tokens, options, request_id)
        result.timings.tokenize_s = t_tok
        result.timings.total_s = time.monotonic() - t0
        return result

    def check_key(self, model: str, kind: str) -> None:
        """A call on the private link names the model and kind it is meant for: another model's
        or kind's call reached the wrong replica (a routing bug), and is never computed."""
        if (model and model != self.spec.name) or (kind and kind != self.core.kind.name):
            log.error("a call for %r (%s) reached replica %s of %r (%s)", model, kind,
                      self.core.replica_id, self.spec.name, self.core.kind.name)
            raise InternalError("the request reached a replica of another model")

    def ready(self) -> bool:
        return self.core.ready and not self.draining

    async def health(self) -> floe_pb2.HealthCheckResponse:
        ready = self.ready()
        msg = "ready" if ready else ("draining" if self.draining else "not ready")
        return floe_pb2.HealthCheckResponse(healthy=self.core.ready or self.draining, ready=ready,
                                            message=msg)

    def info(self) -> floe_pb2.ReplicaInfo:
        s, b, core = self.spec, self.core.settings, self.core
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
            address=self.address, stats=core.stats(), vocab_size=s.vocab_size,
            task=s.task)

    async def replica_info(self) -> floe_pb2.GetReplicaInfoResponse:
        info = self.info()
        return floe_pb2.GetReplicaInfoResponse(replicas=[info], n_replicas=1,
                                               n_healthy_replicas=int(info.healthy))

    async def abort(self, request_id: str) -> bool:
        return self.core.abort(request_id)

    async def hand_back(self, request_ids: list[str], max_tokens: int, min_tokens: int) -> list:
        if self.draining:
            return []   # draining: what is queued here is computed here
        return await self.core.hand_back(request_ids, max_tokens, min_tokens)


def _setup_logging(rt: Runtime) -> None:
    from floe.logs import JsonFormatter

    handler = logging.StreamHandler(sys.stderr)
    # Managed: JSON lines, which the supervisor re-emits at their level in the front end's log.
    if rt.managed or rt.settings.server.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s %(levelname)s replica {rt.replica_id} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(rt.settings.server.log_level.upper())


def load(rt: Runtime):
    """Model spec, engine and tokenizer pool (the engine is warmed up in ``serve``, at the
    settled budget its core runs with)."""
    from floe.engine import engine_for
    from floe.models import load_spec
    from floe.tokenize import TokenizerPool

    settings = rt.settings
    spec = load_spec(settings.model)
    r = settings.replicas
    if rt.gpu_memory_fraction is not None and r.engine in ("torch", "auto"):
        if not 0.0 < rt.gpu_memory_fraction <= 1.0:
            raise ConfigError("--gpu-memory-fraction must be in (0, 1]")
        import torch  # only the torch engine pays for it
        if settings.model.device != "cpu" and torch.cuda.is_available():
            torch.cuda.set_per_process_memory_fraction(rt.gpu_memory_fraction)
    engine = engine_for(spec, r, device=settings.model.device, dtype=settings.model.dtype,
                        threads=rt.threads)
    tokenizers = TokenizerPool(spec, workers=r.workers, max_input_chars=settings.server.max_input_chars)
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


async def serve(rt: Runtime, engine, tokenizers) -> int:
    from floe.replica.core import ReplicaCore
    from floe.replica.cost import for_replica
    from floe.resolve import resolve_batch

    settings = rt.settings
    # A managed replica gets its batch section settled by its manager; standalone, it is
    # settled here for the device the engine runs on (floe/resolve.py, as floe serve settles it).
    # The warm-up runs one forward at that budget (before serving).
    batch = resolve_batch(settings.batch, str(engine.device).startswith("cuda"),
                          engine.spec.max_seq_length)
    engine.warmup(batch.max_batch_tokens)
    # the forward time by batch shape, for admission and tuning (floe/replica/cost.py)
    cost = for_replica(engine, batch.max_batch_tokens, batch.max_batch_size,
                       settings.replicas.engine_cache_dir, rt.threads)
    core = ReplicaCore(engine, batch, replica_id=rt.replica_id, cost=cost)
    # Managed: the front end already bounded the request; its token ids are at most
    # max_client_batch_size x max_seq_length int32s.
    limit = settings.server.grpc_payload_limit
    if rt.managed:
        limit = max(limit, settings.server.max_client_batch_size * engine.spec.max_seq_length * 4
                    + (1 << 20))
    backend = ReplicaBackend(core, tokenizers, settings, address=rt.address, trusted=rt.managed)
    # The link a front end reaches this replica by (floe/fleet/link.py): a managed replica
    # speaks the private link's frames (floe/protocol.py), on its Unix socket or on TCP for a
    # front end on another host; a standalone replica is a complete public server (floe.v1,
    # ArcticInference, grpc.health, reflection) on gRPC.
    address = rt.address
    server = health = frames = None
    if rt.managed:
        from floe.transport.frames import split_address, start_frames_server

        scheme, where, _port = split_address(rt.address)
        if scheme == "unix":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(where)   # left behind by a killed predecessor
        try:
            frames = await start_frames_server(rt.address, backend, rt.token, limit)
        except OSError as e:
            raise AddressBusyError(f"cannot bind {rt.address}: {e.strerror or e}") from None
        if scheme == "unix":
            os.chmod(where, 0o600)
        address = backend.address = frames.address
    else:
        from floe.transport.grpc import start_server

        server, health, ports = await start_server(backend, [rt.address], receive_limit=limit,
                                                   api_key=rt.token)
        if ports and ports[0]:
            host = rt.address.rsplit(":", 1)[0]
            address = f"{host}:{ports[0]}"
            backend.address = address
        if rt.address.startswith("unix:"):
            os.chmod(rt.address[len("unix:"):], 0o600)
    core.start()
    if health is not None:
        health.set_serving(True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = (asyncio.create_task(_watch_pid(rt.parent_pid, stop.set)) if rt.parent_pid else None)

    engine_kind = getattr(engine, "backend", settings.replicas.engine)
    hello = ReplicaHello(address=address, pid=os.getpid(), engine=engine_kind,
                         dtype=engine.dtype, device=engine.device, attention=engine.attention)
    print(hello.to_line(), flush=True)
    log.info("replica %s serving %s on %s (engine %s, %s on %s)", rt.replica_id,
             engine.spec.name, address, engine_kind, engine.dtype, engine.device)
    await stop.wait()

    log.info("draining (up to %.1f s)", settings.server.drain_timeout)
    if health is not None:
        health.set_serving(False)
    backend.draining = True
    drained = await asyncio.to_thread(core.stop, settings.server.drain_timeout)
    if not drained:
        log.warning("drain timeout: in-flight requests were failed with UNAVAILABLE")
    if frames is not None:
        await frames.stop()
    if server is not None:
        await server.stop(grace=1.0)
    if watcher is not None:
        watcher.cancel()
    tokenizers.close()
    log.info("replica %s stopped", rt.replica_id)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a replica never downloads on its own
    raw_launch = os.environ.pop(ReplicaLaunch.ENV, None)
    try:
        if raw_launch:
            rt = runtime_from_launch(ReplicaLaunch.from_json(raw_launch))
        else:
            rt = runtime_from_args(build_parser().parse_args(argv))
    except ConfigError as e:
        print(f"floe.replica: error: {e}", file=sys.stderr, flush=True)
        return 2
    _setup_logging(rt)
    try:
        _spec, engine, tokenizers = load(rt)
        return asyncio.run(serve(rt, engine, tokenizers))
    except (ConfigError, ModelLoadError) as e:
        print(f"floe.replica: error: {e}", file=sys.stderr, flush=True)
        return 2
    except AddressBusyError as e:
        print(f"floe.replica: error: {e}", file=sys.stderr, flush=True)
        return 1
    except Exception as e:  # noqa: BLE001 - report, with the traceback, and exit non-zero
        log.exception("replica failed")
        print(f"floe.replica: error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
