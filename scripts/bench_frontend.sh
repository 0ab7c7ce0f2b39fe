#!/usr/bin/env bash
# The front end's cost per input (issue table): h2load against `floe serve --engine fake`, each
# configuration first checked with real clients, the tokenizers library alone from the same run.
# Installs floe (scripts/install.sh) and h2load (Debian's nghttp2-client) when missing.
# Arguments go to scripts/bench_frontend.py, e.g. --runs 3 --duration 10 --frontend-workers 2.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/floe ] || FLOE_EXTRAS=${FLOE_EXTRAS:-test} bash scripts/install.sh
if ! command -v h2load >/dev/null; then
    apt-get install -y -qq nghttp2-client >/dev/null || { apt-get update -qq && apt-get install -y -qq nghttp2-client >/dev/null; }
fi
exec .venv/bin/python scripts/bench_frontend.py "$@"
