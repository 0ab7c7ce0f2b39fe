"""Pure parts of the replica manager: placement, the replica's argv, port checks, exit text."""

import socket

import pytest

from floe.config import settings_from
from floe.errors import ConfigError
from floe.router.manager import (
    _LAUNCHER,
    describe_exit,
    plan_placement,
    port_in_use,
    replica_command,
    visible_gpus,
)


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


def test_replica_command_passes_non_default_settings():
    s = settings_from(env={}, model={"model": "/m", "max_seq_length": 64},
                      batch={"max_batch_tokens": 999}, replicas={"engine": "fake", "workers": 3})
    p = plan_placement(s, [], [0, 1])[1]
    argv = replica_command(s, 1, 50101, p, 4242)
    assert argv[1:3] == ["-c", _LAUNCHER]
    flags = argv[3:]

    def val(flag):
        return flags[flags.index(flag) + 1]

    pairs = {f: val(f) for f in ("--model", "--port", "--engine", "--replica-id", "--parent-pid",
                                 "--workers", "--threads")}
    assert pairs["--model"] == "/m" and pairs["--port"] == "50101" and pairs["--engine"] == "fake"
    assert pairs["--replica-id"] == "1" and pairs["--parent-pid"] == "4242"
    assert pairs["--workers"] == "3" and pairs["--threads"] == "1"
    assert "--max-batch-tokens" in flags and flags[flags.index("--max-batch-tokens") + 1] == "999"
    assert "--max-seq-length" in flags
    assert "--max-batch-size" not in flags  # defaults are left to the replica
    assert "--gpu-memory-fraction" not in flags


def test_replica_command_gpu_fraction_flag():
    s = settings(num_replicas=2, gpu_assignment="shared", gpu_memory_utilization=0.5)
    p = plan_placement(s, ["0"], [0])[0]
    argv = replica_command(s, 0, 1, p, 1)
    assert argv[argv.index("--gpu-memory-fraction") + 1] == "0.2500"


def test_port_in_use():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert port_in_use("127.0.0.1", port)
    assert not port_in_use("127.0.0.1", port)


def test_describe_exit():
    assert describe_exit(2) == "exit code 2"
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(None) == "still running"
