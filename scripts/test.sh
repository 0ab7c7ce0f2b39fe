#!/usr/bin/env bash
# Install everything, then run the test suite (unit + integration; GPU tests skip without a GPU).
#   bash scripts/test.sh [pytest args]         the default tier (what CI runs)
#   FLOE_EXTRAS=test,ray FLOE_TEST_FULL=1 bash scripts/test.sh
#                                               every test, Ray included (tests/conftest.py, "tiers")
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Most of a test run is processes importing torch, transformers and OpenVINO. Let the first import
# of each module leave its bytecode (install.sh skips compiling the whole tree) so every later
# process reads it instead of compiling the sources again.
unset PYTHONDONTWRITEBYTECODE
# Two workers (pytest-xdist, a test file each at a time): most of a run is single-threaded imports
# in fresh processes, so both cores are busy instead of one. FLOE_TEST_WORKERS=0 runs in-process.
WORKERS=${FLOE_TEST_WORKERS:-2}
PARALLEL=()
if [ "$WORKERS" -gt 0 ]; then PARALLEL=(-n "$WORKERS" --dist loadfile); fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider "${PARALLEL[@]}" "$@"
