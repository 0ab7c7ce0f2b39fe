"""The pure parts of --frontend-workers: how many, the control messages, the worker's replica
view (channels per generation, rotation, death), and balancing that does not herd."""

from __future__ import annotations

import asyncio

import pytest

from floe.config import ReplicaSetSettings, ServerSettings, Settings
from floe.errors import ConfigError
from floe.protocol import FrontendHello, FrontendLaunch, ReplicaEndpoint, ReplicaTable
from floe.fleet.balance import Balancer, ReplicaLoad
from floe.resolve import frontend_workers
from floe.fleet.remote import RemoteReplicas


def _settings(workers=None, replicas=2) -> Settings:
    return Settings(server=ServerSettings(frontend_workers=workers),
                    replicas=ReplicaSetSettings(num_replicas=replicas))


def test_frontend_workers_default_and_explicit():
    cores = list(range(16))
    assert frontend_workers(_settings(), [], cores) == 1              # CPU replicas use the cores
    assert frontend_workers(_settings(), ["0"], cores) == 3           # (16 - 2) // 4
    assert frontend_workers(_settings(), ["0"], list(range(64))) == 8  # capped
    assert frontend_workers(_settings(), ["0"], [0, 1]) == 1           # at least one
    assert frontend_workers(_settings(workers=4), [], [0, 1]) == 4     # asked for: as asked
    with pytest.raises(ConfigError):
        _settings(workers=0).validate()


def test_control_messages_round_trip():
    table = ReplicaTable((ReplicaEndpoint(0, "unix:/s/r0.sock", "tok", 123, True, "ready", 1, "", 123),
                          ReplicaEndpoint(1, "unix:/s/r1.sock", "tok2", 0, False, "restarting")))
    assert ReplicaTable.from_line(table.to_line()) == table
    assert ReplicaTable.from_line("FLOE_REPLICAS {not json") is None
    assert ReplicaTable.from_line("something else") is None
    hello = FrontendHello(index=1, pid=42)
    assert FrontendHello.from_line(hello.to_line()) == hello
    launch = FrontendLaunch(settings={"server": {}}, index=1, frontends=3, parent_pid=7, http_fd=5)
    assert FrontendLaunch.from_json(launch.to_json()) == launch
    several = FrontendLaunch(settings={"server": {}}, index=1, frontends=2, parent_pid=7,
                             models=({"model": {"model": "a"}}, {"model": {"model": "b"}}))
    assert FrontendLaunch.from_json(several.to_json()) == several
    keyed = ReplicaTable((ReplicaEndpoint(0, "unix:/s/a0.sock", "t", 1, True, "ready", model="a"),
                          ReplicaEndpoint(0, "unix:/s/b0.sock", "t", 2, True, "ready", model="b")))
    assert ReplicaTable.from_line(keyed.to_line()) == keyed


def test_balancers_of_different_workers_start_on_different_replicas():
    idle = [ReplicaLoad(0, True), ReplicaLoad(1, True)]
    for policy in ("least_loaded", "round_robin"):
        firsts = {Balancer(policy, start=k).pick(idle) for k in range(2)}
        assert firsts == {0, 1}, policy


def _ep(i, gen, healthy=True, state="ready"):
    return ReplicaEndpoint(i, f"unix:/nowhere/r{i}.sock", "t", gen, healthy, state)


async def test_remote_view_follows_the_supervisors_table():
    view = RemoteReplicas(_settings(), spec=None, worker_index=1)
    assert not view.ready()
    await view.apply(ReplicaTable((_ep(0, 10), _ep(1, 11))))
    assert view.ready() and [t.healthy for t in view.targets] == [True, True]
    c0 = view.targets[0].client

    # same generation: the same channel; a new generation (restart): a new channel
    await view.apply(ReplicaTable((_ep(0, 10), _ep(1, 11))))
    assert view.targets[0].client is c0
    await view.apply(ReplicaTable((_ep(0, 20), _ep(1, 11))))
    assert view.targets[0].client is not c0 and view.targets[0].client is not None

    # a failed call takes it out of this worker's rotation until the next healthy table
    view.targets[1].leave_rotation()
    assert not view.targets[1].healthy
    await view.apply(ReplicaTable((_ep(0, 20), _ep(1, 11))))
    assert view.targets[1].healthy

    # restarting: no channel, out of rotation
    await view.apply(ReplicaTable((_ep(0, 0, healthy=False, state="restarting"), _ep(1, 11))))
    assert view.targets[0].client is None and not view.targets[0].healthy
    assert view.status()["healthy_replicas"] == 1
    # the new process: starting (its pid is the new generation), then ready with that pid
    await view.apply(ReplicaTable((_ep(0, 30, healthy=False, state="starting"), _ep(1, 11))))
    assert view.targets[0].client is None
    await view.apply(ReplicaTable((_ep(0, 30), _ep(1, 11))))
    assert view.targets[0].client is not None and view.targets[0].healthy
    await view.stop()
    assert not view.ready()


async def test_crashed_under_sees_a_restart_reported_by_the_supervisor():
    view = RemoteReplicas(_settings(), spec=None)
    await view.apply(ReplicaTable((_ep(0, 10), _ep(1, 11))))
    target = view.targets[0]
    client = target.client
    assert not await target.crashed_under(client, 0.05)   # nothing reported: alive

    async def report_exit():
        await asyncio.sleep(0.05)
        await view.apply(ReplicaTable((_ep(0, 0, healthy=False, state="restarting"), _ep(1, 11))))

    task = asyncio.create_task(report_exit())
    assert await target.crashed_under(client, 5.0)
    await task
    await view.stop()


@pytest.mark.parametrize("rewrapped", [False, True], ids=["front-end", "front-end-worker"])
def test_http_socket_connections_get_tcp_nodelay(rewrapped):
    """Accepted connections on the shared HTTP socket must have TCP_NODELAY: asyncio sets it only
    when the listening socket says it is TCP, and without it a keep-alive client waits for its own
    delayed ACK (40 ms) between the response's headers and body."""
    import socket

    from floe.frontend.server import bind_http

    sock = bind_http("127.0.0.1", 0)
    if rewrapped:  # what a front-end worker does with the inherited descriptor
        sock = socket.socket(fileno=sock.detach())
    port = sock.getsockname()[1]
    seen: list[int] = []

    async def main() -> None:
        def accepted(reader, writer):
            s = writer.get_extra_info("socket")
            seen.append(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(accepted, sock=sock)
        async with server:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(100):
                if seen:
                    break
                await asyncio.sleep(0.02)
            w.close()

    asyncio.run(main())
    assert seen and seen[0] != 0


async def test_each_model_takes_only_its_own_rows_of_the_table():
    """Several served models share one table (each row keyed by its model): a worker's view of
    model b ignores model a's replicas, whatever their index."""
    from types import SimpleNamespace

    view = RemoteReplicas(_settings(), spec=SimpleNamespace(name="b", task="embed"))
    a = ReplicaEndpoint(0, "unix:/nowhere/a0.sock", "t", 5, True, "ready", model="a")
    b = ReplicaEndpoint(0, "unix:/nowhere/b0.sock", "t", 6, True, "ready", model="b")
    await view.apply(ReplicaTable((a, b)))
    assert view.targets[0].endpoint == b
    await view.apply(ReplicaTable((a,)))
    assert view.targets[0].endpoint == b
    await view.stop()
