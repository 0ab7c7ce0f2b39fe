"""The settings tree: flags and FLOE_* variables map onto fields; bad values are refused."""

import argparse

import pytest

from floe.config import Settings, add_arguments, settings_from, settings_from_dict, settings_to_dict
from floe.errors import ConfigError


def parse(argv, env=None):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return settings_from(p.parse_args(argv), env=env or {})


def test_defaults_are_the_documented_ones():
    s = parse([])
    assert s.server.host == "127.0.0.1" and s.server.port == 8080 and s.server.grpc_port == 50050
    assert s.replicas.start_port == 50100 and s.replicas.num_replicas == 2
    assert s.model.model == "default"
    assert s == Settings()


def test_flag_beats_env_beats_default():
    s = parse(["--max-batch-tokens", "512"], env={"FLOE_MAX_BATCH_TOKENS": "1024", "FLOE_PORT": "9000"})
    assert s.batch.max_batch_tokens == 512
    assert s.server.port == 9000


def test_booleans_and_choices():
    s = parse(["--no-auto-truncate", "--load-balancing", "round_robin"])
    assert s.server.auto_truncate is False
    assert s.replicas.load_balancing == "round_robin"
    with pytest.raises(SystemExit):
        parse(["--load-balancing", "fastest"])
    with pytest.raises(ConfigError, match="not one of"):
        parse([], env={"FLOE_DTYPE": "int4"})


@pytest.mark.parametrize("argv,match", [
    (["--tensor-parallel-size", "2"], "tensor-parallel-size"),
    (["--num-replicas", "0"], "num-replicas"),
    (["--gpu-memory-utilization", "1.5"], "gpu-memory-utilization"),
    (["--max-batch-tokens", "0"], "max-batch-tokens"),
    (["--api-key", ""], "--api-key is empty"),
    (["--api-key", "  "], "--api-key is empty"),
    (["--health-interval", "0"], "health-interval"),
    (["--forward-timeout", "-1"], "forward-timeout"),
    (["--replica-wait", "-0.5"], "replica-wait"),
    (["--coalesce-tokens", "-1"], "coalesce-tokens"),
    (["--min-batch-fill", "1.5"], "min-batch-fill"),
    (["--min-batch-fill", "-0.1"], "min-batch-fill"),
])
def test_values_that_cannot_be_honoured_are_refused(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse(argv)


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf"])
def test_a_float_setting_must_be_finite(raw):
    with pytest.raises(ConfigError, match="finite"):
        parse([], env={"FLOE_FORWARD_TIMEOUT": raw})
    with pytest.raises(SystemExit):
        parse(["--health-interval", raw])


def test_every_field_has_help_text():
    import dataclasses
    from floe.config import SECTIONS
    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"


def test_the_tree_crosses_to_a_replica_whole():
    """A managed replica gets the whole tree as JSON (floe/protocol.py ReplicaLaunch)."""
    s = parse(["--max-batch-tokens", "777", "--engine", "fake", "--no-auto-truncate"],
              env={"FLOE_FAKE_SECONDS_PER_TOKEN": "0.25"})
    assert s.replicas.fake_seconds_per_token == 0.25  # the fake engine's knob, through the tree
    back = settings_from_dict(settings_to_dict(s))
    assert back == s
    with pytest.raises(ConfigError, match="unknown batch settings: bogus"):
        settings_from_dict({**settings_to_dict(s), "batch": {"bogus": 1}})
    with pytest.raises(ConfigError, match="max-batch-tokens"):
        settings_from_dict({**settings_to_dict(s), "batch": {"max_batch_tokens": 0}})
