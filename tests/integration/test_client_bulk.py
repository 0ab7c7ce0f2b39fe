"""floe.Client / AsyncClient against a real `floe serve --engine fake` with small limits: chunking
above the item limit, retries that honour Retry-After and stop where they should, no retry on
400/413, the same exception types over HTTP and gRPC, float16 arrays.

Retries are counted on the server's own /metrics (floe_request_failures_total by error), so a test
sees how many requests really reached the server."""

from __future__ import annotations

import signal
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import floe
from floe.client import NO_RETRY, Retry
from floe.errors import OverloadedError, TooLargeError, UnavailableError, ValidationError
from tests.support import floe_serve, free_port

pytestmark = pytest.mark.slow

LIMIT = 4           # --max-client-batch-size of the small server
MAX_CHARS = 2000    # --max-input-chars
TEXTS = [f"text number {i} " + "word " * (i % 7) for i in range(11)]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    with floe_serve("--engine", "fake", "--num-replicas", "1", "--model", "default",
                    "--max-client-batch-size", str(LIMIT), "--max-input-chars", str(MAX_CHARS),
                    tmp_dir=str(tmp_path_factory.mktemp("serve"))) as srv:
        yield srv


@pytest.fixture(scope="module")
def busy(tmp_path_factory):
    """One request admitted at a time: a Holder takes the slot, everything else gets 429."""
    with floe_serve("--engine", "fake", "--num-replicas", "1", "--model", "default",
                    "--max-concurrent-requests", "1",
                    tmp_dir=str(tmp_path_factory.mktemp("serve"))) as srv:
        yield srv


def scrape(server) -> list:
    text = httpx.get(server.url + "/metrics", timeout=60).text
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def failures(server, error: str) -> float:
    return sum(s.value for s in scrape(server)
               if s.name == "floe_request_failures_total" and s.labels.get("error") == error)


def wait_for(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class Holder:
    """Takes the server's only admission slot and keeps it until the block ends (or ``release``).

    The server admits a request when its headers arrive, before it reads the body, so a request
    whose body is held back stays in flight exactly as long as the test wants, costing nothing."""

    def __init__(self, server) -> None:
        self.server = server
        self.body = b'{"inputs": ["held"]}'
        self.sock = None
        self.status = None

    def __enter__(self) -> "Holder":
        self.sock = socket.create_connection(("127.0.0.1", self.server.port), timeout=60)
        self.sock.sendall(b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          b"Content-Type: application/json\r\n"
                          b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(self.body)
                          + self.body[:5])
        wait_for(lambda: any(s.name == "floe_in_flight_requests" and s.value >= 1
                             for s in scrape(self.server)), "the held request to be admitted")
        return self

    def release(self) -> None:
        if self.sock is None:
            return
        self.sock.sendall(self.body[5:])
        reply = b""
        while chunk := self.sock.recv(65536):
            reply += chunk
        self.sock.close()
        self.sock = None
        self.status = int(reply.split(b" ", 2)[1])

    def __exit__(self, *exc) -> None:
        self.release()


def clients(server, **kw):
    return (floe.Client(server.url, **kw),
            floe.Client(server.grpc_address, protocol="grpc", max_batch_size=LIMIT, **kw))


# --- chunking ---------------------------------------------------------------------------------

def test_http_learns_the_item_limit_and_chunks_in_order(small):
    with floe.Client(small.url) as c:
        assert c.max_batch_size() == LIMIT
        out = c.embed(TEXTS)
        assert out.shape == (len(TEXTS), 384) and out.dtype == np.float32
        alone = np.concatenate([c.embed([t]) for t in TEXTS])
        np.testing.assert_array_equal(out, alone)
        chunks = list(c.iter_embed(TEXTS))
        assert [len(a) for a in chunks] == [4, 4, 3]
        # a limit asked of the client never exceeds the server's
        with floe.Client(small.url, max_batch_size=100) as big:
            assert big.max_batch_size() == LIMIT
            np.testing.assert_array_equal(big.embed(TEXTS), out)
        ids = [[101, 2000 + i, 102] for i in range(9)]
        np.testing.assert_array_equal(c.embed(ids), np.concatenate([c.embed([x]) for x in ids]))


def test_grpc_chunks_with_the_limit_it_is_given(small):
    with floe.Client(small.url) as h, \
            floe.Client(small.grpc_address, protocol="grpc", max_batch_size=LIMIT) as g:
        np.testing.assert_array_equal(g.embed(TEXTS, normalize=True), h.embed(TEXTS))
        # without it the default of 2048 is over this server's limit: a distinct too-large error
        with floe.Client(small.grpc_address, protocol="grpc") as unaware:
            assert unaware.max_batch_size() == 2048
            with pytest.raises(TooLargeError):
                unaware.embed(TEXTS)


async def test_async_client_chunks_too(small):
    with floe.Client(small.url) as c:
        want = c.embed(TEXTS)
    async with floe.AsyncClient(small.url) as h, \
            floe.AsyncClient(small.grpc_address, max_batch_size=LIMIT) as g:
        np.testing.assert_array_equal(await h.embed(TEXTS), want)
        np.testing.assert_array_equal(await g.embed(TEXTS, normalize=True), want)
        assert [len(a) async for a in h.iter_embed(TEXTS)] == [4, 4, 3]
        with pytest.raises(TooLargeError):
            await h.embed(["y" * (MAX_CHARS + 1)], truncate=False)


# --- errors: distinct, and never retried on 400 / 413 ------------------------------------------

def test_too_large_and_invalid_are_raised_once_over_both_protocols(small):
    h, g = clients(small, retry=Retry(attempts=5))
    with h, g:
        for c in (h, g):
            before = failures(small, "too_large")
            with pytest.raises(TooLargeError) as e:
                c.embed(["short", "y" * (MAX_CHARS + 1)], truncate=False)
            assert not isinstance(e.value, OverloadedError) and e.value.retry_after is None
            assert failures(small, "too_large") == before + 1, c.protocol
            before = failures(small, "validation")
            with pytest.raises(ValidationError):
                c.embed(["x"], dimensions=100000)
            assert failures(small, "validation") == before + 1, c.protocol


def test_unreachable_server_fails_fast_without_retry():
    for c in (floe.Client(f"http://127.0.0.1:{free_port()}", retry=Retry(attempts=5)),
              floe.Client(f"127.0.0.1:{free_port()}", protocol="grpc", timeout=5,
                          retry=Retry(attempts=5))):
        with c:
            t0 = time.monotonic()
            with pytest.raises(UnavailableError) as e:
                c.embed(["x"])
            assert e.value.retry_after is None
            assert time.monotonic() - t0 < 10.0


# --- overloaded: distinct error, retries that honour Retry-After -------------------------------

def address_of(server, protocol: str) -> str:
    return server.url if protocol == "http" else server.grpc_address


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_overloaded_is_distinct_and_carries_retry_after(busy, protocol):
    with floe.Client(address_of(busy, protocol), protocol=protocol, retry=NO_RETRY) as c, \
            Holder(busy):
        before = failures(busy, "overloaded")
        with pytest.raises(OverloadedError) as e:
            c.embed(["hello"])
        assert e.value.retry_after == pytest.approx(1.0)
        assert failures(busy, "overloaded") == before + 1


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_retry_waits_retry_after_then_succeeds(busy, protocol):
    with floe.Client(address_of(busy, protocol), protocol=protocol,
                     retry=Retry(attempts=30, max_wait=60)) as c:
        want = c.embed(["hello"])
        result: dict = {}

        def call() -> None:
            t0 = time.monotonic()
            result["array"] = c.embed(["hello"])
            result["elapsed"] = time.monotonic() - t0

        with Holder(busy) as held:
            before = failures(busy, "overloaded")
            caller = threading.Thread(target=call)
            caller.start()
            wait_for(lambda: failures(busy, "overloaded") >= before + 1, "a 429")
            held.release()
        caller.join(timeout=120)
        np.testing.assert_array_equal(result["array"], want)
        refused = failures(busy, "overloaded") - before
        assert refused >= 1 and held.status == 200
        # each refusal was followed by the server's Retry-After (1 s), never sooner
        assert result["elapsed"] >= refused * 1.0


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_retries_stop_at_the_attempt_bound_and_the_wait_bound(busy, protocol):
    address = address_of(busy, protocol)
    with Holder(busy):
        with floe.Client(address, protocol=protocol, retry=Retry(attempts=3, max_wait=60)) as c:
            before = failures(busy, "overloaded")
            t0 = time.monotonic()
            with pytest.raises(OverloadedError):
                c.embed(["hello"])
            assert time.monotonic() - t0 >= 2.0
            assert failures(busy, "overloaded") == before + 3
        # a Retry-After (1 s) longer than what is left of max_wait is not waited for
        with floe.Client(address, protocol=protocol, retry=Retry(attempts=9, max_wait=0.5)) as c:
            before = failures(busy, "overloaded")
            with pytest.raises(OverloadedError):
                c.embed(["hello"])
            assert failures(busy, "overloaded") == before + 1


def test_draining_server_is_unavailable_with_retry_after(tmp_path):
    with floe_serve("--engine", "fake", "--num-replicas", "1", "--model", "default",
                    "--drain-timeout", "60", tmp_dir=str(tmp_path)) as srv:
        with Holder(srv), floe.Client(srv.url, retry=NO_RETRY) as h, \
                floe.Client(srv.grpc_address, protocol="grpc", retry=NO_RETRY) as g:
            srv.proc.send_signal(signal.SIGTERM)  # drains: the held request keeps it alive
            wait_for(lambda: httpx.get(srv.url + "/ready", timeout=60).status_code == 503,
                     "the server to drain")
            for c in (h, g):
                with pytest.raises(UnavailableError) as e:
                    c.embed(["hello"])
                assert e.value.retry_after == pytest.approx(1.0), c.protocol


# --- output dtypes ------------------------------------------------------------------------------

def test_float16_arrays_over_both_protocols(small):
    h, g = clients(small)
    with h, g:
        f32 = h.embed(TEXTS)
        for c in (h, g):
            f16 = c.embed(TEXTS, output_dtype="float16", normalize=True)
            assert f16.dtype == np.float16 and f16.shape == f32.shape
            np.testing.assert_array_equal(f16, f32.astype(np.float16))
            bf = c.embed(TEXTS, output_dtype="bfloat16", normalize=True)
            assert bf.dtype == np.float32 and not (bf.view(np.uint32) & 0xFFFF).any()
            np.testing.assert_allclose(bf, f32, atol=1e-2)
