#!/usr/bin/env bash
# Installs floe and everything it needs into ./.venv (idempotent: a second run only checks).
# FLOE_TORCH_SPEC picks the torch build (default: the pinned CPU-resolvable version; on a GPU
# machine the same pin resolves to the CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${FLOE_VENV:-.venv}
TORCH_SPEC=${FLOE_TORCH_SPEC:-torch==2.13.0}
EXTRAS=${FLOE_EXTRAS:-test}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.floe-install-stamp"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)-$TORCH_SPEC-$EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first, on its own, so that nothing else can pull a different (CUDA) build.
# --no-compile: byte-compiling every installed file (torch, ray, openvino ...) is most of the
# install time on 2 cores; Python compiles what it imports, on first import.
"$VENV/bin/python" -m pip install -q --no-compile "$TORCH_SPEC"
"$VENV/bin/python" -m pip install -q --no-compile -c constraints.txt -e ".[${EXTRAS}]"
echo "$want" > "$stamp"
