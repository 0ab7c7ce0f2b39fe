"""Ray is an optional extra: `floe serve` (front end and replicas) never imports it, nor the
corpus package; the CLI's embed-corpus parser stays light too."""

import subprocess
import sys

from tests.unit.test_no_torch_in_front_end import FRONT_END_MODULES

SERVE_MODULES = FRONT_END_MODULES + [
    "floe.frontend.server", "floe.replica.main", "floe.replica.core", "floe.replica.scheduler",
    "floe.engine", "floe.corpus.args",
]


def test_serve_modules_do_not_import_ray():
    code = (
        "import importlib, sys\n"
        f"for m in {SERVE_MODULES!r}:\n"
        "    importlib.import_module(m)\n"
        "from floe.entrypoints.cli import build_parser\n"
        "build_parser().parse_args(['embed-corpus', 'in.jsonl', '-o', 'out'])\n"
        "bad = [m for m in ('ray', 'floe.ray', 'floe.corpus.ray_pool', 'floe.corpus.local',"
        " 'pyarrow') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"floe serve's modules imported {out.stdout.strip()}"
