"""The control plane's messages round-trip (floe/protocol.py), settings included."""

from floe.config import Settings, settings_from, settings_from_dict, settings_to_dict
from floe.protocol import Placement, ReplicaHello, ReplicaLaunch


def test_launch_round_trip():
    s = settings_from(env={}, server={"log_format": "json", "drain_timeout": 7.0},
                      replicas={"engine": "fake", "fake_seconds_per_token": 0.001})
    launch = ReplicaLaunch(settings=settings_to_dict(s), index=1, address="unix:/run/r1.sock",
                           parent_pid=42, token="t0k",
                           placement=Placement(cpu_cores=[0, 1], threads=2))
    back = ReplicaLaunch.from_json(launch.to_json())
    assert back == launch
    assert settings_from_dict(back.settings) == s   # every setting reaches the replica


def test_unknown_settings_are_refused():
    import pytest
    from floe.errors import ConfigError

    d = settings_to_dict(Settings())
    d["server"]["no_such_knob"] = 1
    with pytest.raises(ConfigError, match="no_such_knob"):
        settings_from_dict(d)


def test_hello_round_trip():
    h = ReplicaHello(address="unix:/run/r0.sock", pid=7, engine="fake", dtype="float32", device="cpu")
    assert ReplicaHello.from_line(h.to_line()) == h
    kernel = ReplicaHello(address="127.0.0.1:1", pid=8, engine="openvino", dtype="bfloat16",
                          device="cpu", attention="yes: floe's attention kernel")
    assert ReplicaHello.from_line(kernel.to_line()) == kernel
    # a replica of a floe from before `attention` was in its hello
    old = ReplicaHello.from_line('FLOE_REPLICA_READY {"address":"a","pid":1,"engine":"torch",'
                                 '"dtype":"float32","device":"cpu"}')
    assert old is not None and old.attention == ""
    assert ReplicaHello.from_line("some other line") is None
    assert ReplicaHello.from_line("FLOE_REPLICA_READY {not json") is None
