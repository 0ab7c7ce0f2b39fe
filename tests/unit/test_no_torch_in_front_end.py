"""The front end (HTTP, gRPC, replica supervision and routing, validation, tokenizer, CLI) never
imports torch: it must start fast and leave the cores to the replicas."""

import subprocess
import sys

FRONT_END_MODULES = [
    "floe.entrypoints.cli", "floe.entrypoints.replica_manager",
    "floe.frontend.http", "floe.frontend.service", "floe.frontend.server",
    "floe.frontend.admission", "floe.frontend.connections",
    "floe.transport.grpc", "floe.transport.auth",
    "floe.fleet.manager", "floe.fleet.balance", "floe.fleet.replica_client",
    "floe.fleet.placement", "floe.fleet.router", "floe.fleet.replica_slot",
    "floe.validate", "floe.protocol", "floe.config", "floe.errors",
    "floe.tokenize", "floe.models", "floe.client", "floe.metrics",
]


def test_front_end_modules_do_not_import_torch():
    code = (
        "import importlib, sys\n"
        f"for m in {FRONT_END_MODULES!r}:\n"
        "    importlib.import_module(m)\n"
        "bad = [m for m in ('torch', 'transformers', 'sentence_transformers') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"front end imported {out.stdout.strip()}"
