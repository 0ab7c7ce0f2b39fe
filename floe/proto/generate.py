"""Regenerates the Python code beside the protos: `python -m floe.proto.generate`.

tests/unit/test_proto_drift.py regenerates into a temporary folder and fails when the committed
files differ, so the protos and their code cannot drift apart.
"""

from __future__ import annotations

import pathlib
import sys

PROTOS = ("floe/proto/floe.proto", "floe/proto/arctic_inference.proto")


def generate(out_dir: pathlib.Path, root: pathlib.Path) -> None:
    from grpc_tools import protoc  # only needed when regenerating
    import grpc_tools

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    for proto in PROTOS:
        rc = protoc.main([
            "protoc", f"-I{root}", f"-I{include}",
            f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", f"--pyi_out={out_dir}",
            str(root / proto),
        ])
        if rc != 0:
            raise SystemExit(f"protoc failed on {proto}")


if __name__ == "__main__":
    repo = pathlib.Path(__file__).resolve().parents[2]
    generate(repo, repo)
    sys.exit(0)
