"""`python -m floe.frontend.worker`: one extra front-end process of ``floe serve``.

Started by floe/frontend/workers.py with a ``FrontendLaunch`` (floe/protocol.py) in the
environment: the settings tree, the inherited listening HTTP socket and the shared metrics
directory. It runs the same front end as the main process (floe/frontend/server.py
``run_frontend``: tokenizer pool, validation, HTTP and gRPC on the shared ports) and routes to
the replicas that the main process supervises (floe/fleet/remote.py), whose table arrives on
stdin. It prints a ``FrontendHello`` line once it serves, writes JSON log lines to stderr (its
supervisor, floe/child_process.py, re-emits them at their level in the main process' log), drains
on SIGTERM, and drains and exits when stdin closes (the main process is gone).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys

from floe.protocol import FrontendHello, FrontendLaunch, ReplicaTable

log = logging.getLogger("floe.frontend.worker")


async def _read_tables(replicas: list, first: asyncio.Event, stop: asyncio.Event) -> None:
    """The main process' replica tables from stdin, each applied to every served model's
    routers (each takes its own model's rows)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=16 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            log.warning("the main floe process is gone (stdin closed); draining")
            stop.set()
            return
        table = ReplicaTable.from_line(line.decode(errors="replace").strip())
        if table is not None:
            for r in replicas:
                await r.apply(table)
            first.set()


async def run(launch: FrontendLaunch) -> int:
    from floe.config import settings_from_dict
    from floe.frontend.server import run_frontend
    from floe.frontend.admission import Admission
    from floe.frontend.models import ServedModels
    from floe.frontend.service import EmbedService
    from floe.models import load_spec
    from floe.fleet.remote import RemoteReplicas
    from floe.tokenize import TokenizerPool

    # the main process resolved each model's tree (floe/resolve.py): budget, max length, threads
    settings = settings_from_dict(launch.settings)
    trees = [settings_from_dict(t) for t in launch.models] or [settings]
    services = []
    for tree in trees:
        spec = load_spec(tree.model)
        tokenizers = TokenizerPool(spec, tree.server.tokenization_workers,
                                   max_input_chars=tree.server.max_input_chars,
                                   library_threads=False)
        service = EmbedService(tree, spec, tokenizers,
                               RemoteReplicas(tree, spec, worker_index=launch.index))
        service.frontend_index, service.frontends = launch.index, launch.frontends
        services.append(service)
    served = ServedModels(services)
    if len(services) > 1:   # one concurrency bound for the endpoint, as the main front end has
        shared = Admission(settings.server.max_concurrent_requests,
                           lambda: any(svc.router.ready() for svc in services))
        for svc in services:
            svc.admission = shared
    replicas = [svc.router for svc in services]
    http_socket = None
    if launch.http_fd is not None:
        http_socket = socket.socket(fileno=launch.http_fd)
    stop = asyncio.Event()
    first_table = asyncio.Event()
    tables = asyncio.create_task(_read_tables(replicas, first_table, stop))
    try:
        waiter = asyncio.create_task(first_table.wait())
        await asyncio.wait({waiter, tables}, return_when=asyncio.FIRST_COMPLETED)
        if not first_table.is_set():
            return 1

        def on_ready() -> None:
            # the supervisor logs "front-end worker N ready" when it reads this
            print(FrontendHello(index=launch.index, pid=os.getpid()).to_line(), flush=True)

        return await run_frontend(served, settings, http_socket, on_ready, stop=stop)
    finally:
        tables.cancel()
        for svc in services:
            await svc.router.stop()
            svc.tokenizers.close()


def main() -> int:
    raw = os.environ.get(FrontendLaunch.ENV)
    if not raw:
        print("floe.frontend.worker: error: started without a launch; it is run by `floe serve "
              "--frontend-workers N`", file=sys.stderr)
        return 2
    launch = FrontendLaunch.from_json(raw)
    os.environ.pop(FrontendLaunch.ENV, None)
    if launch.metrics_dir:
        # before prometheus_client is imported: count into the files every front end shares
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = launch.metrics_dir
    from floe.logs import setup_logging
    from floe.config import settings_from_dict

    # JSON whatever --log-format says: the supervisor re-emits each line in the main log's format
    setup_logging(settings_from_dict(launch.settings).server.log_level, "json")
    try:
        return asyncio.run(run(launch))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
