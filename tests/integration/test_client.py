"""floe.Client / floe.AsyncClient against a real `floe serve` (fake engine), over HTTP and gRPC."""

import subprocess
import sys

import httpx
import numpy as np
import pytest

import floe
from floe.errors import UnavailableError, ValidationError
from tests.support import floe_serve, free_port

pytestmark = pytest.mark.slow

TEXTS = ["the quick brown fox", "jumps over", "the lazy dog " * 10]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with floe_serve("--engine", "fake", "--num-replicas", "1", "--model", "default",
                    tmp_dir=str(tmp_path_factory.mktemp("serve"))) as srv:
        yield srv


def test_http_and_grpc_agree_bit_for_bit(server):
    with floe.Client(server.url) as h, floe.Client(server.grpc_address, protocol="grpc") as g:
        a = h.embed(TEXTS)
        b = g.embed(TEXTS, normalize=True)  # /embed normalizes by default, like TEI
        assert a.shape == (3, 384) and a.dtype == np.float32
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
        # the bytes equal the OpenAI route's JSON floats exactly
        body = httpx.post(server.url + "/v1/embeddings",
                          json={"input": TEXTS, "encoding_format": "float"}).json()
        floats = np.asarray([d["embedding"] for d in body["data"]], dtype=np.float32)
        np.testing.assert_array_equal(floats, g.embed(TEXTS))


def test_options_token_ids_and_dtypes(server):
    with floe.Client(server.url) as h, floe.Client(server.grpc_address) as g:
        assert g.protocol == "grpc" and h.protocol == "http"
        ids = [[101, 2023, 2003, 102], [101, 7592, 102]]
        np.testing.assert_array_equal(h.embed(ids), g.embed(ids, normalize=True))
        d = g.embed(TEXTS, dimensions=64, normalize=True)
        assert d.shape == (3, 64)
        np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, rtol=1e-5)
        bf = g.embed(TEXTS, output_dtype="bfloat16", normalize=True)
        assert bf.dtype == np.float32
        assert not (bf.view(np.uint32) & 0xFFFF).any()  # exactly representable in bf16
        np.testing.assert_array_equal(bf, h.embed(TEXTS, output_dtype="bfloat16"))
        assert g.embed("one string").shape == (1, 384)


def test_errors_are_floe_errors(server):
    with floe.Client(server.url) as h, floe.Client(server.grpc_address) as g:
        for c in (h, g):
            with pytest.raises(ValidationError):
                c.embed(["x"], dimensions=100000)
            with pytest.raises(ValidationError):
                c.embed([])
    with floe.Client(f"127.0.0.1:{free_port()}", protocol="grpc", timeout=2) as dead:
        with pytest.raises(UnavailableError):
            dead.embed(["x"])
        assert dead.health()["ready"] is False


def test_health_and_info(server):
    with floe.Client(server.url) as h, floe.Client(server.grpc_address) as g:
        assert h.health()["ready"] and g.health()["ready"]
        assert h.info()["dim"] == 384
        info = g.info()
        assert info["n_replicas"] == 1 and info["replicas"][0]["dim"] == 384


async def test_async_client(server):
    async with floe.AsyncClient(server.url) as h, floe.AsyncClient(server.grpc_address) as g:
        a = await h.embed(TEXTS)
        b = await g.embed(TEXTS, normalize=True)
        np.testing.assert_array_equal(a, b)
        assert (await g.health())["ready"] and (await h.health())["ready"]
        assert (await g.info())["n_healthy_replicas"] == 1
        with pytest.raises(ValidationError):
            await g.embed(["x"], dimensions=100000)


def test_cli_prints_dimension_norm_and_values(server, capsys):
    host, port = server.grpc_address.split(":")
    out = subprocess.run([sys.executable, "-m", "floe.client", "--prompt", "hello world",
                          "--host", host, "--port", port], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "dimension: 384" in out.stdout and "norm: " in out.stdout and "first values: [" in out.stdout
    # the same main in this process (a fresh interpreter costs seconds on a slow machine)
    from floe.client import main as client_main

    assert client_main(["--prompt", "hello world", "--protocol", "http", "--port", str(server.port)]) == 0
    printed = capsys.readouterr()
    assert "norm: 1.0000" in printed.out, printed.out + printed.err
