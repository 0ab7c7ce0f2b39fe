"""The committed generated code matches what protoc makes from the committed protos."""

import pathlib

import pytest

from floe.proto.generate import PROTOS, generate

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_generated_code_matches_the_protos(tmp_path):
    pytest.importorskip("grpc_tools")
    generate(tmp_path, REPO)
    checked = 0
    for proto in PROTOS:
        stem = proto[: -len(".proto")]
        for suffix in ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi"):
            fresh = (tmp_path / (stem + suffix)).read_text()
            committed = (REPO / (stem + suffix)).read_text()
            assert fresh == committed, f"{stem + suffix} drifted: run `python -m floe.proto.generate`"
            checked += 1
    assert checked == 6
