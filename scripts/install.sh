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
# uv installs the same packages as pip, from the same sources (scripts/pip_sources.py), in a
# fraction of the time: most of a pip install on 2 cores is unpacking torch and openvino one file
# at a time. pip stays the fallback wherever uv cannot be had.
# torch first, on its own, so that nothing else can pull a different (CUDA) build.
install_with_uv() {
  "$VENV/bin/python" -m pip install -q uv >/dev/null 2>&1 || return 1
  local sources
  mapfile -t sources < <("$VENV/bin/python" scripts/pip_sources.py) || return 1
  # unsafe-best-match: pick the best version across every index, as pip does, rather than uv's
  # default of the first index that has the package
  local uv=("$VENV/bin/uv" pip install -q --python "$VENV/bin/python"
            --index-strategy unsafe-best-match "${sources[@]}")
  "${uv[@]}" "$TORCH_SPEC" && "${uv[@]}" -c constraints.txt -e ".[${EXTRAS}]"
}
install_with_pip() {
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  # --no-compile: byte-compiling every installed file (torch, ray, openvino ...) is most of the
  # install time on 2 cores; Python compiles what it imports, on first import.
  "$VENV/bin/python" -m pip install -q --no-compile "$TORCH_SPEC"
  "$VENV/bin/python" -m pip install -q --no-compile -c constraints.txt -e ".[${EXTRAS}]"
}
if [ "${FLOE_INSTALLER:-uv}" != uv ] || ! install_with_uv; then
  [ "${FLOE_INSTALLER:-uv}" = uv ] && echo "install.sh: uv failed; installing with pip" >&2
  install_with_pip
fi
echo "$want" > "$stamp"
