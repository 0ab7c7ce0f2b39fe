"""Pure parts of the replica manager: placement, the replica's launch, port checks, exit text."""

import asyncio

import os
import subprocess
import sys

import pytest

from floe.config import settings_from, settings_to_dict
from floe.errors import ConfigError
from floe.protocol import Placement, ReplicaLaunch
from floe.replica.main import runtime_from_launch
from floe.fleet.placement import plan_placement
from floe.resolve import visible_gpus
from floe.child_process import describe_exit


def settings(**replicas):
    return settings_from(env={}, replicas=replicas)


def test_cpu_cores_split_disjoint_and_cover():
    ps = plan_placement(settings(num_replicas=3), [], list(range(8)))
    sets = [p.cpu_cores for p in ps]
    assert sets == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert [p.threads for p in ps] == [3, 3, 2]
    assert all(p.cuda_visible_devices is None and p.gpu_memory_fraction is None for p in ps)


def test_cpu_fewer_cores_than_replicas_one_core_each():
    ps = plan_placement(settings(num_replicas=3), [], [4, 5])
    assert [p.cpu_cores for p in ps] == [[4], [5], [4]]
    assert [p.threads for p in ps] == [1, 1, 1]


def test_cpu_threads_per_replica_override():
    ps = plan_placement(settings(num_replicas=2, threads_per_replica=7), [], list(range(4)))
    assert [p.threads for p in ps] == [7, 7]
    assert [p.cpu_cores for p in ps] == [[0, 1], [2, 3]]


def test_gpu_dedicated_round_robin_and_memory_share():
    ps = plan_placement(settings(num_replicas=5, num_gpus=2, gpu_assignment="dedicated",
                                 gpu_memory_utilization=0.9), ["0", "1", "2"], [0, 1])
    assert [p.cuda_visible_devices for p in ps] == ["0", "1", "0", "1", "0"]
    # GPU 0 holds replicas 0, 2, 4; GPU 1 holds 1, 3
    assert [round(p.gpu_memory_fraction, 4) for p in ps] == [0.3, 0.45, 0.3, 0.45, 0.3]
    assert all(p.cpu_cores is None for p in ps)


def test_gpu_shared_every_replica_sees_all():
    ps = plan_placement(settings(num_replicas=4, num_gpus=2, gpu_assignment="shared",
                                 gpu_memory_utilization=0.8), ["3", "5"], [0])
    assert {p.cuda_visible_devices for p in ps} == {"3,5"}
    assert all(p.gpu_memory_fraction == pytest.approx(0.2) for p in ps)


def test_more_gpus_requested_than_visible_is_refused():
    with pytest.raises(ConfigError, match="--num-gpus 4"):
        plan_placement(settings(num_gpus=4), ["0"], [0])


def test_visible_gpus_from_env_without_torch():
    assert visible_gpus("auto", {"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert visible_gpus("auto", {"CUDA_VISIBLE_DEVICES": "-1"}) == []
    assert visible_gpus("cpu", {"CUDA_VISIBLE_DEVICES": "0"}) == []


def _launch_round_trip(s, index, placement, parent_pid):
    """What a managed replica reads back from the launch its supervisor hands it."""
    launch = ReplicaLaunch(settings=settings_to_dict(s), index=index,
                           address=f"unix:/tmp/floe-test/replica-{index}.sock",
                           parent_pid=parent_pid, token="t0k", placement=placement)
    env = {ReplicaLaunch.ENV: launch.to_json()}
    return runtime_from_launch(ReplicaLaunch.from_json(env[ReplicaLaunch.ENV]))


def test_launch_carries_the_whole_settings_tree_and_the_slot():
    s = settings_from(env={}, model={"model": "/m", "max_seq_length": 64},
                      batch={"max_batch_tokens": 999}, replicas={"engine": "fake", "workers": 3})
    p = plan_placement(s, [], [0, 1])[1]
    rt = _launch_round_trip(s, 1, p, 4242)
    assert rt.managed and rt.replica_id == "1" and rt.parent_pid == 4242
    assert rt.address == "unix:/tmp/floe-test/replica-1.sock" and rt.token == "t0k"
    assert rt.settings.model.model == "/m" and rt.settings.model.max_seq_length == 64
    assert rt.settings.batch.max_batch_tokens == 999
    assert rt.settings.replicas.engine == "fake" and rt.settings.replicas.workers == 3
    assert rt.settings == s  # every setting, defaults included, reaches the replica
    assert rt.threads == 1 and rt.gpu_memory_fraction is None


def test_launch_gpu_fraction():
    s = settings(num_replicas=2, gpu_assignment="shared", gpu_memory_utilization=0.5)
    p = plan_placement(s, ["0"], [0])[0]
    rt = _launch_round_trip(s, 0, p, 1)
    assert rt.gpu_memory_fraction == pytest.approx(0.25)


def _placement_child(parent_pid: int, cores) -> subprocess.CompletedProcess:
    """``python -m floe.replica``'s first step, alone, in a child of this process."""
    launch = ReplicaLaunch(settings={}, index=0, address="unix:/nonexistent", parent_pid=parent_pid,
                           token="t", placement=Placement(cpu_cores=cores))
    code = ("import os; from floe.replica.__main__ import _apply_launch_placement; "
            "_apply_launch_placement(); print(sorted(os.sched_getaffinity(0)))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, **{ReplicaLaunch.ENV: launch.to_json()}))


def test_a_launched_replica_takes_its_cores_before_anything_else():
    cores = sorted(os.sched_getaffinity(0))[:1]
    r = _placement_child(os.getpid(), cores)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(cores)


def test_a_launched_replica_whose_parent_is_gone_exits_at_once():
    r = _placement_child(1, None)      # "the supervisor" is not its parent: it already died
    assert r.returncode == 0 and r.stdout == ""


def test_port_in_use_is_refused_at_bind():
    """A second server must not share a port (no SO_REUSEPORT): the bind fails, naming it."""
    from floe.transport.grpc import start_server

    async def go():
        first, _, ports = await start_server(None, ["127.0.0.1:0"], receive_limit=1 << 20)
        try:
            with pytest.raises(ConfigError, match=f"127.0.0.1:{ports[0]}"):
                await start_server(None, [f"127.0.0.1:{ports[0]}"], receive_limit=1 << 20)
        finally:
            await first.stop(None)

    asyncio.run(go())


def test_describe_exit():
    assert describe_exit(2) == "exit code 2"
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(None) == "still running"
