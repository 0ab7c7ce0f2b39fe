#!/usr/bin/env bash
# Builds Infinity (the peer server) in its own environment, never floe's: infinity-emb needs
# sentence-transformers < 4 and numpy < 2. CPU torch is installed first so nothing pulls CUDA.
#   bash scripts/setup_infinity.sh [VENV]          (default .venv-infinity)
# Then: VENV/bin/infinity_emb v2 --model-id PATH --engine torch --dtype bfloat16 --port 7997
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-infinity}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q "torch==2.13.0" "infinity-emb[server,torch]==0.0.78" \
    "sentence-transformers<4" "numpy<2" "transformers<4.50"
"$VENV/bin/infinity_emb" v2 --help >/dev/null && echo "infinity ready in $VENV"
