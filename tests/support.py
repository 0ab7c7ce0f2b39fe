"""Helpers shared by integration tests: free ports and a real `floe serve` subprocess."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Iterator, Optional

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, proc: subprocess.Popen, port: int, grpc_port: int, log_path: str) -> None:
        self.proc, self.port, self.grpc_port, self.log_path = proc, port, grpc_port, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.grpc_address = f"127.0.0.1:{grpc_port}"

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-4000:]


@contextlib.contextmanager
def floe_serve(*args: str, env: Optional[dict] = None, ready_timeout: float = 300.0,
               tmp_dir: Optional[str] = None) -> Iterator[ServerProcess]:
    """Runs `python -m floe serve` on ephemeral ports until /ready answers 200; always cleans up."""
    port, grpc_port, start_port = free_port(), free_port(), free_port()
    cmd = [sys.executable, "-m", "floe", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--grpc-port", str(grpc_port), "--start-port", str(start_port), *args]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    log_dir = tmp_dir or os.environ.get("TMPDIR", "/tmp")
    log_path = os.path.join(log_dir, f"floe-serve-{port}.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                                start_new_session=True)
    server = ServerProcess(proc, port, grpc_port, log_path)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"floe serve exited with {proc.returncode}:\n{server.log()}")
            try:
                if httpx.get(server.url + "/ready", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"floe serve not ready after {ready_timeout}s:\n{server.log()}")
            time.sleep(0.2)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # any replica left behind


def floe_cli(*argv: str, stdin: str = "") -> subprocess.CompletedProcess:
    """Runs ``floe ARGV`` in this process (floe.entrypoints.cli.main) with its own stdin, stdout and stderr.

    The same parsing, exit codes and messages as ``python -m floe``, without a fresh interpreter
    importing everything again (5-10 s each on a slow 2-core machine). Each CLI module keeps one
    test that starts the real entry point as a subprocess."""
    from floe.entrypoints.cli import main

    out_bytes, err_bytes = io.BytesIO(), io.BytesIO()
    out = io.TextIOWrapper(out_bytes, encoding="utf-8", write_through=True)
    err = io.TextIOWrapper(err_bytes, encoding="utf-8", write_through=True)
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_streams = sys.stdin, sys.stdout, sys.stderr
    sys.stdin, sys.stdout, sys.stderr = io.StringIO(stdin), out, err
    try:
        try:
            code = main(list(argv))
        except SystemExit as e:  # argparse usage errors
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out.flush()
        err.flush()
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved_streams
        root.handlers[:] = saved_handlers  # the CLI installs its own handler on stderr
        root.setLevel(saved_level)
    return subprocess.CompletedProcess(["floe", *argv], int(code or 0),
                                       out_bytes.getvalue().decode("utf-8", "replace"),
                                       err_bytes.getvalue().decode("utf-8", "replace"))


class ModuleMemo:
    """Expensive objects (model specs, engines, sentence-transformers models) built once per test
    module: ``get(key, make)``; ``clear_fixture()`` gives the module-scoped autouse fixture that
    drops them when the module ends, so one module's engines never hold memory into the next."""

    def __init__(self) -> None:
        self._cache: dict = {}

    def get(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def clear_fixture(self):
        import pytest

        @pytest.fixture(scope="module", autouse=True)
        def _clear_memo():
            yield
            self._cache.clear()
        return _clear_memo


def edit_json(path: str, fn) -> None:
    """Rewrites a JSON file through ``fn`` (which edits the object in place or returns a new one):
    the tests' way to make a model folder say something else."""
    import json

    with open(path) as f:
        obj = json.load(f)
    obj = fn(obj) or obj
    with open(path, "w") as f:
        json.dump(obj, f)
