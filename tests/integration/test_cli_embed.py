"""`floe embed` against a real `floe serve --engine fake` with a small item limit: texts from
arguments, a file or stdin, chunked through floe.Client, JSON lines or .npy out, progress on a
terminal, and every failure as one line on stderr with a non-zero exit status."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys

import numpy as np
import pytest

import floe
from tests.support import floe_cli, floe_serve, free_port

pytestmark = pytest.mark.slow

LIMIT = 4
TEXTS = [f"line {i}: " + "some words " * (i % 5) for i in range(10)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with floe_serve("--engine", "fake", "--num-replicas", "1", "--model", "default",
                    "--max-client-batch-size", str(LIMIT), "--max-input-chars", "500",
                    tmp_dir=str(tmp_path_factory.mktemp("serve"))) as srv:
        yield srv


@pytest.fixture(scope="module")
def expected(server):
    with floe.Client(server.url) as c:
        return c.embed(TEXTS)


def floe_embed(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return floe_cli("embed", *args, stdin=stdin)


def floe_embed_process(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    """The real entry point, `python -m floe embed`, in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "floe", "embed", *args], input=stdin,
                          capture_output=True, text=True, timeout=300)


def rows(stdout: str) -> tuple[list[str], np.ndarray]:
    lines = [json.loads(x) for x in stdout.splitlines()]
    return [x["text"] for x in lines], np.asarray([x["embedding"] for x in lines], dtype=np.float32)


def test_file_with_more_lines_than_the_server_takes(server, expected, tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(TEXTS[:5]) + "\n\n   \n" + "\n".join(TEXTS[5:]) + "\n")
    out = floe_embed("--server", server.url, "--file", str(path))
    assert out.returncode == 0, out.stderr
    texts, arr = rows(out.stdout)
    assert texts == TEXTS  # blank lines skipped, order kept across the 3 requests
    np.testing.assert_array_equal(arr, expected)


def test_stdin_and_arguments(server, expected):
    out = floe_embed_process("--server", server.url, stdin="\n".join(TEXTS) + "\n")
    assert out.returncode == 0, out.stderr
    np.testing.assert_array_equal(rows(out.stdout)[1], expected)
    out = floe_embed("--server", server.url, TEXTS[0], TEXTS[1])
    assert out.returncode == 0, out.stderr
    assert rows(out.stdout)[0] == TEXTS[:2]


def test_npy_output_over_grpc(server, expected, tmp_path):
    path, npy = tmp_path / "texts.txt", tmp_path / "out.npy"
    path.write_text("\n".join(TEXTS))
    out = floe_embed("--server", server.grpc_address, "--protocol", "grpc", "--batch-size",
                     str(LIMIT), "--normalize", "--file", str(path), "-o", str(npy))
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""
    np.testing.assert_array_equal(np.load(npy), expected)
    out = floe_embed("--server", server.url, "--output-dtype", "float16", "--file", str(path),
                     "-o", str(npy))
    assert out.returncode == 0, out.stderr
    arr = np.load(npy)
    assert arr.dtype == np.float16
    np.testing.assert_array_equal(arr, expected.astype(np.float16))


def one_line_error(out: subprocess.CompletedProcess) -> str:
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("floe embed: error: ")
    return lines[0]


def test_server_errors_are_one_line(server, tmp_path):
    line = one_line_error(floe_embed("--server", server.url, "--no-normalize", "--dimensions",
                                     "100000", "hello"))
    assert "invalid_request_error (400)" in line and "dimensions" in line
    with floe.Client(server.url) as c:  # an input too long for --max-input-chars, not truncated
        with pytest.raises(floe.errors.TooLargeError):
            c.embed(["z" * 501], truncate=False)
    grpc_too_many = floe_embed("--server", server.grpc_address, "--protocol", "grpc",
                               *TEXTS)  # the 2048 default is over this server's 4
    assert grpc_too_many.returncode == 1
    assert "request_too_large (413)" in one_line_error(grpc_too_many)


def test_connection_failure_and_usage_errors_are_one_line(tmp_path):
    dead = floe_embed("--server", f"http://127.0.0.1:{free_port()}", "hello")
    assert dead.returncode == 1
    assert "cannot reach" in one_line_error(dead)
    missing = floe_embed("--file", str(tmp_path / "nope.txt"))
    assert missing.returncode == 2 and "cannot read" in one_line_error(missing)
    empty = floe_embed(stdin="\n\n")
    assert empty.returncode == 2 and "nothing to embed" in one_line_error(empty)


@pytest.mark.full  # a pseudo-terminal run of the CLI; the line output is tested without one
def test_progress_on_a_terminal(server, tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(TEXTS))
    leader, follower = pty.openpty()
    try:
        out = subprocess.run([sys.executable, "-m", "floe", "embed", "--server", server.url,
                              "--file", str(path), "-o", str(tmp_path / "o.jsonl")],
                             stderr=follower, stdout=subprocess.PIPE, timeout=300)
        os.close(follower)
        follower = -1
        seen = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal's other side is closed: all read
                break
            if not chunk:
                break
            seen += chunk
    finally:
        if follower >= 0:
            os.close(follower)
        os.close(leader)
    assert out.returncode == 0
    assert b"4/10 texts" in seen and b"10/10 texts (100%)" in seen
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == len(TEXTS)
    # and none when stderr is not a terminal
    quiet = floe_embed("--server", server.url, "--file", str(path))
    assert quiet.stderr == ""
