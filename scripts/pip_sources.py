"""Prints pip's package sources as uv flags, one per line, so that uv installs from exactly where
pip would: the same index, extra indexes and find-links, from pip's config files and PIP_*
variables (`pip config list`). Used by scripts/install.sh."""

from __future__ import annotations

import ast
import subprocess
import sys

FLAGS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url",
         "find-links": "--find-links"}


def uv_flags(listing: str) -> list[str]:
    """uv flags for the sources in ``pip config list`` output, each source once, in order."""
    flags: list[str] = []
    seen: set[tuple[str, str]] = set()
    for line in listing.splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        if name not in FLAGS or not value:
            continue
        for source in ast.literal_eval(value).split():
            if (name, source) not in seen:
                seen.add((name, source))
                flags += [FLAGS[name], source]
    return flags


def main() -> int:
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                             capture_output=True, text=True, check=True).stdout
    for flag in uv_flags(listing):   # one per line: install.sh reads them with mapfile
        print(flag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
