"""`floe serve`: the front-end process.

Start-up order: read the model spec (JSON only) -> tokenizer pool -> replica manager (spawns the
replica processes and waits for the first to be ready) -> public gRPC server -> HTTP server.
SIGTERM/SIGINT drain: readiness goes false at once, new requests get 503, in-flight requests finish
(up to --drain-timeout), then the replicas are stopped and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import time
from typing import TYPE_CHECKING, Optional

import uvicorn

from floe.config import Settings
from floe.errors import ConfigError
from floe.frontend.http import create_app
from floe.frontend.service import EmbedService

if TYPE_CHECKING:
    from floe.frontend.models import ServedModels
    from floe.resolve import Hardware

log = logging.getLogger("floe.server")


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: floe's drain decides when HTTP stops."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield


def model_settings(settings: Settings) -> list[Settings]:
    """One settings tree per served model: the first is ``--model`` itself, the others
    (``also_serve``) the same tree with their own folder, their folder's name, and their own
    replica ports (start_port + 100 x k, for the tcp transport)."""
    out = [dataclasses.replace(settings, model=dataclasses.replace(settings.model, also_serve=()))]
    for k, model in enumerate(settings.model.also_serve, start=1):
        out.append(dataclasses.replace(
            settings,
            model=dataclasses.replace(settings.model, model=model, served_model_name=None,
                                      also_serve=()),
            replicas=dataclasses.replace(settings.replicas,
                                         start_port=settings.replicas.start_port + 100 * k)))
    return out


async def serve(settings: Settings, ready_event: Optional[asyncio.Event] = None,
                hardware: "Optional[Hardware]" = None) -> int:
    """``floe serve``: ``settings`` as given, resolved here (floe/resolve.py) for each model on
    ``hardware`` (default: this machine) before any process starts."""
    from floe.models import load_spec
    from floe.fleet.manager import ReplicaManager
    from floe.frontend.models import ServedModels
    from floe.resolve import Hardware, resolve, resolve_server
    from floe.tokenize import TokenizerPool

    t_start = time.perf_counter()
    hardware = hardware or Hardware.detect(settings.model.device)
    settings = resolve_server(settings, hardware)   # on the whole tree: it knows every model
    per_model = [resolve(s, load_spec(s.model), hardware) for s in model_settings(settings)]
    settings = per_model[0]
    srv = settings.server
    n_frontends = srv.frontend_workers
    services: list[EmbedService] = []
    for s in per_model:
        spec = load_spec(s.model)
        tokenizers = TokenizerPool(spec, s.server.tokenization_workers,
                                   max_input_chars=srv.max_input_chars, library_threads=False)
        services.append(EmbedService(s, spec, tokenizers, ReplicaManager(s, spec, hardware)))
    names = [n for svc in services for n in svc.limits.served_names]
    if len(set(names)) != len(names):
        raise ConfigError(f"two served models share a name ({', '.join(names)}); give each "
                          "--model a folder of its own name")
    served = ServedModels(services)
    if len(services) > 1:
        # one concurrency bound for the endpoint; a request is admitted while any model has a
        # replica (its own model's router answers 503 when that model has none)
        from floe.frontend.admission import Admission

        shared = Admission(srv.max_concurrent_requests,
                           lambda: any(svc.router.ready() for svc in services))
        for svc in services:
            svc.admission = shared
    for svc in services:
        svc.frontends = n_frontends
    # bound before the replicas start: a busy port fails at once, and every front end shares it
    http_socket = bind_http(srv.host, srv.port) if srv.port else None
    workers = None
    try:
        await asyncio.gather(*(svc.router.start() for svc in services))
        if n_frontends > 1:
            from floe.frontend.workers import FrontendWorkers
            workers = FrontendWorkers([(svc.settings, svc.router) for svc in services],
                                      http_socket, n_frontends - 1,
                                      os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
            await workers.start()

        def on_ready() -> None:
            log.info("floe ready in %.1f s: model%s %s, http %s, grpc %s, %d front-end "
                     "process%s", time.perf_counter() - t_start, "s" if len(services) > 1 else "",
                     ", ".join(f"{s.spec.name} ({s.spec.architecture}, {s.spec.task})"
                               for s in services),
                     f"http://{srv.host}:{srv.port}" if srv.port else "off",
                     f"{srv.host}:{srv.grpc_port}" if srv.grpc_port else "off",
                     n_frontends, "es" if n_frontends > 1 else "")
            if ready_event is not None:
                ready_event.set()

        return await run_frontend(served, settings, http_socket, on_ready,
                                  on_stop=workers.begin_drain if workers else None)
    finally:
        if workers is not None:
            await workers.stop()
        await asyncio.gather(*(svc.router.stop() for svc in services))
        for svc in services:
            svc.tokenizers.close()
        if http_socket is not None:
            http_socket.close()
        log.info("floe stopped")


async def run_frontend(service: "EmbedService | ServedModels", settings: Settings, http_socket,
                       on_ready, on_stop=None, stop: Optional[asyncio.Event] = None) -> int:
    """One front end's life, in the main process and in every front-end worker alike: the
    public gRPC server, HTTP on ``http_socket``, then on SIGTERM/SIGINT (or ``stop``) the drain.
    ``on_stop`` runs as soon as the stop is asked (the main process tells its workers)."""
    from floe.frontend.models import ServedModels

    if isinstance(service, EmbedService):
        service = ServedModels([service])
    srv = settings.server
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    grpc_server = None
    http_server = None
    http_task = None
    try:
        if srv.grpc_port:
            from floe.transport.grpc import grpc_target, start_server
            grpc_server, _health, _ports = await start_server(
                service, [grpc_target(srv.host, srv.grpc_port)],
                receive_limit=srv.grpc_payload_limit, api_key=srv.api_key,
                share_port=service.frontends > 1)
        if http_socket is not None:
            http_server = _Uvicorn(http_config(service, settings))
            http_task = asyncio.create_task(http_server.serve(sockets=[http_socket]))
            while not http_server.started:
                if http_task.done():
                    await http_task
                    raise SystemExit(f"HTTP server failed to start on {srv.host}:{srv.port}")
                await asyncio.sleep(0.02)
        on_ready()
        await stop.wait()
        if on_stop is not None:
            on_stop()
        log.info("draining: readiness off, waiting for %d in-flight requests (up to %.0f s)",
                 service.admission.in_flight, srv.drain_timeout)
        if not await service.admission.drain(srv.drain_timeout):
            log.warning("drain timeout: %d requests still in flight are cut off",
                        service.admission.in_flight)
        return 0
    finally:
        if http_server is not None:
            http_server.should_exit = True
            if http_task is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(http_task, timeout=5)
        if grpc_server is not None:
            await grpc_server.stop(grace=1.0)


def bind_http(host: str, port: int) -> socket.socket:
    """The public HTTP socket, bound and inheritable (front-end workers accept on it too). Not
    listening yet: until a front end serves, a client is refused at once instead of waiting in
    the backlog while the replicas load (uvicorn listens when it starts serving).

    The protocol is named (IPPROTO_TCP, not 0): asyncio sets TCP_NODELAY only on accepted sockets
    whose ``proto`` says TCP, and without it every response written as headers, then body waits
    for the client's delayed ACK (40 ms a request on a keep-alive connection)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen for HTTP on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def http_config(service: "EmbedService | ServedModels", settings: Settings) -> uvicorn.Config:
    """uvicorn over httptools (strict framing), with floe's deadlines and connection cap."""
    from floe.frontend.connections import guarded_protocol

    srv = settings.server
    protocol = guarded_protocol(srv.http_header_timeout, srv.http_body_timeout, srv.max_connections,
                                srv.max_header_count, srv.max_header_bytes)
    return uvicorn.Config(create_app(service), host=srv.host, port=srv.port, loop="asyncio",
                          http=protocol, lifespan="off", log_level="warning", access_log=False,
                          # nothing here reads the client's address: no X-Forwarded-* rewriting
                          proxy_headers=False,
                          timeout_keep_alive=int(max(1, srv.keep_alive_timeout)),
                          timeout_graceful_shutdown=5)
