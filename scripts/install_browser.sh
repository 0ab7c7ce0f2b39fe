#!/usr/bin/env bash
# Installs a Chromium for the /docs browser test (tests/integration/test_docs_page.py) where there
# is none: Debian's `chromium` package, with apt-get, as root. .ci/run calls it; scripts/install.sh
# does not (serving needs no browser, and the quick start stays as fast). It never fails the run:
# where it cannot install one it says why, and the browser test skips saying the same.
set -uo pipefail
for exe in "${FLOE_TEST_CHROMIUM:-}" chromium chromium-browser google-chrome; do
  if [ -n "$exe" ] && command -v "$exe" >/dev/null 2>&1; then exit 0; fi
done
why=""
if [ "$(id -u)" != 0 ]; then
  why="not root, so no apt-get install chromium"
elif ! command -v apt-get >/dev/null 2>&1; then
  why="no apt-get on this system"
else
  export DEBIAN_FRONTEND=noninteractive
  # recommends left out: headless Chromium needs none of them (printing, notifications, U2F)
  if apt-get update -qq >/dev/null && \
     apt-get install -y -qq --no-install-recommends chromium >/dev/null; then
    echo "install_browser.sh: installed $(chromium --version 2>/dev/null)"
    exit 0
  fi
  why="apt-get install chromium failed"
fi
echo "install_browser.sh: no Chromium ($why): tests/integration/test_docs_page.py will skip" >&2
exit 0
