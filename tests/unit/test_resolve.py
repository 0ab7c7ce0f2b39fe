"""Settings resolved once (floe/resolve.py): the machine's defaults settled from a made-up machine,
kept when given, and settled the same way wherever a replica is built."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from types import SimpleNamespace

import pytest

from floe.config import (BatchSettings, ModelSettings, ReplicaSetSettings, ServerSettings, Settings,
                         sections_of, settings_from)
from floe.errors import ConfigError
from floe.resolve import (CPU_BATCH_TOKENS, CPU_MIN_BATCH_FILL, GPU_BATCH_TOKENS, Hardware,
                          core_count, resolve, resolve_batch, usable_cores)

CPU16 = Hardware(gpus=(), cores=tuple(range(16)))
GPU16 = Hardware(gpus=("0",), cores=tuple(range(16)))


def spec(max_len: int = 256):
    return SimpleNamespace(max_seq_length=max_len, name="m", task="embed")


def test_cpu_host_defaults():
    s = resolve(Settings(), spec(), CPU16)
    assert s.batch.max_batch_tokens == CPU_BATCH_TOKENS
    assert s.batch.min_batch_fill == CPU_MIN_BATCH_FILL
    assert s.server.frontend_workers == 1            # CPU replicas use the cores
    assert s.server.tokenization_workers == 16       # one front end: every core
    assert s.model.max_seq_length is None            # the model's own: within the budget


def test_gpu_host_defaults():
    s = resolve(Settings(), spec(), GPU16)
    assert s.batch.max_batch_tokens == GPU_BATCH_TOKENS and s.batch.min_batch_fill == 0.0
    assert s.server.frontend_workers == 3            # (16 cores - 2 replicas) // 4
    assert s.server.tokenization_workers == 5        # 16 cores // 3 front ends


def test_several_models_run_one_front_end():
    s = Settings(model=ModelSettings(also_serve=("other",)))
    assert resolve(s, spec(), GPU16).server.frontend_workers == 1


def test_given_values_are_kept_and_a_resolved_tree_is_a_fixed_point():
    s = Settings(batch=BatchSettings(max_batch_tokens=1000, min_batch_fill=0.5),
                 server=ServerSettings(frontend_workers=2, tokenization_workers=3))
    r = resolve(s, spec(), GPU16)
    assert (r.batch.max_batch_tokens, r.batch.min_batch_fill) == (1000, 0.5)
    assert (r.server.frontend_workers, r.server.tokenization_workers) == (2, 3)
    once = resolve(Settings(), spec(), GPU16)
    assert resolve(once, spec(), GPU16) is once
    assert resolve(once, spec(), CPU16) is once       # settled: another machine changes nothing


def test_long_model_is_fitted_to_the_budget():
    r = resolve(Settings(), spec(8192), CPU16)
    assert r.batch.max_batch_tokens == 8192          # raised on CPU so the longest input batches
    r = resolve(Settings(), spec(32768), GPU16)
    assert r.batch.max_batch_tokens == GPU_BATCH_TOKENS
    assert r.model.max_seq_length == GPU_BATCH_TOKENS   # lowered (auto-truncate)
    with pytest.raises(ConfigError, match="max-batch-tokens"):
        resolve(Settings(server=ServerSettings(auto_truncate=False)), spec(32768), GPU16)


def test_resolve_batch_keeps_a_settled_section():
    settled = BatchSettings(max_batch_tokens=4096, min_batch_fill=0.0)
    assert resolve_batch(settled, False, 256) is settled
    assert resolve_batch(BatchSettings(), False, 256).min_batch_fill == CPU_MIN_BATCH_FILL


def test_placement_uses_the_same_cores():
    from floe.fleet.placement import plan_placement

    s = Settings(replicas=ReplicaSetSettings(num_replicas=2))
    placements = plan_placement(s, list(CPU16.gpus), list(CPU16.cores))
    assert [p.threads for p in placements] == [8, 8]


def test_this_machine():
    hw = Hardware.detect("cpu")
    assert hw.gpus == () and list(hw.cores) == usable_cores()
    assert core_count() == len(usable_cores()) >= 1


def test_manager_hands_replicas_a_settled_batch_section():
    from floe.fleet.manager import ReplicaManager

    m = ReplicaManager(Settings(replicas=ReplicaSetSettings(num_replicas=1)), spec(), CPU16)
    try:
        assert m.settings.batch.max_batch_tokens == CPU_BATCH_TOKENS
        assert m.settings.batch.min_batch_fill == CPU_MIN_BATCH_FILL
        assert m.slots[0].settings.batch == m.settings.batch
    finally:
        import asyncio
        asyncio.run(m.stop())


def test_replica_core_imports_nothing_from_the_fleet():
    code = ("import sys, floe.replica.core, floe.replica.main\n"
            "print(','.join(m for m in sys.modules if m.startswith('floe.fleet')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == ""


def test_flat_settings_by_field_name():
    sections = sections_of({"max_batch_tokens": "4096", "engine": "fake", "model": "default",
                            "max_client_batch_size": 16, "batch_timeout_ms": "2.5"})
    s = settings_from(env={}, **sections)
    assert s.batch.max_batch_tokens == 4096 and s.batch.batch_timeout_ms == 2.5
    assert s.replicas.engine == "fake" and s.server.max_client_batch_size == 16
    with pytest.raises(ConfigError, match="unknown setting"):
        sections_of({"max_batch_tokenz": 1})
    with pytest.raises(ConfigError, match="engine"):
        sections_of({"engine": "onnx"})
    assert dataclasses.asdict(settings_from(env={}, **sections_of({}))) == dataclasses.asdict(
        Settings())
