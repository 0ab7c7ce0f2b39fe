#!/usr/bin/env bash
# Quick start: install everything, then serve the embedded default model (all-MiniLM-L6-v2)
# on 127.0.0.1:8080 (HTTP) and 127.0.0.1:50050 (gRPC). Extra arguments go to `floe serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
FLOE_EXTRAS=${FLOE_EXTRAS:-test} bash scripts/install.sh
exec .venv/bin/floe serve "$@"
