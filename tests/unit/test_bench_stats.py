"""Benchmark statistics, argument parsing and the JSON report's shape."""

from __future__ import annotations

import asyncio
import json
import math

import numpy as np
import pytest

from floe.bench import REPORT_SCHEMA, BenchError, build_parser, main
from floe.bench.clients import Outcome, http_base
from floe.bench.runner import Progress, run_closed, run_open
from floe.bench.stats import Sample, format_table, percentile, summarize
from floe.bench.workload import Request

# --- percentiles and rates ---------------------------------------------------------------------


@pytest.mark.parametrize("data", [
    [1.0], [3.0, 1.0], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], list(range(1, 1001)),
    np.random.default_rng(0).lognormal(size=777).tolist(), [5.0] * 9 + [500.0],
])
@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 99.9, 100])
def test_percentile_matches_numpy(data, q):
    assert percentile(data, q) == pytest.approx(float(np.percentile(data, q)), rel=1e-12)


def test_percentile_edges():
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarize_rates_and_latencies():
    # 10 requests over exactly 2 s: 8 ok (4 inputs, 100 tokens each), two failures
    samples = [Sample(start=0.2 * i, end=0.2 * i + 0.01 * (i + 1), ok=True, sequences=4, tokens=100)
               for i in range(8)]
    samples += [Sample(start=1.6, end=1.7, ok=False, error="http:429"),
                Sample(start=1.8, end=2.0, ok=False, error="grpc:UNAVAILABLE")]
    row = summarize(samples, batch_size=4)
    assert row["elapsed_s"] == pytest.approx(2.0)
    assert row["requests"] == 10 and row["successful"] == 8 and row["failed"] == 2
    assert row["success_rate"] == pytest.approx(0.8)
    assert row["requests_per_s"] == pytest.approx(4.0)
    assert row["sequences_per_s"] == pytest.approx(16.0)
    assert row["tokens_per_s"] == pytest.approx(400.0)
    lat = [0.01 * (i + 1) for i in range(8)]  # failures do not enter the latencies
    assert row["latency_s"]["mean"] == pytest.approx(np.mean(lat))
    assert row["latency_s"]["p50"] == pytest.approx(np.percentile(lat, 50))
    assert row["latency_s"]["p99"] == pytest.approx(np.percentile(lat, 99))
    assert row["errors"] == {"grpc:UNAVAILABLE": 1, "http:429": 1}
    assert row["token_source"] == "server"
    assert row["mean_tokens_per_sequence"] == pytest.approx(25.0)


def test_summarize_token_source_and_empty():
    s = [Sample(0, 1, True, 1, 5, server_tokens=False), Sample(0, 1, True, 1, 5, server_tokens=True)]
    assert summarize(s[:1], 1)["token_source"] == "client"
    assert summarize(s, 1)["token_source"] == "mixed"
    empty = summarize([], 1)
    assert empty["requests"] == 0 and empty["tokens_per_s"] == 0.0 and math.isnan(empty["latency_s"]["p50"])
    all_failed = summarize([Sample(0, 1, False, error="timeout")], 1)
    assert all_failed["success_rate"] == 0.0 and all_failed["token_source"] == "none"
    assert "timeout=1" in format_table([all_failed])


# --- load loops with a scripted client ----------------------------------------------------------


class SlowClient:
    """Answers after ``delay`` seconds; counts how many requests were in flight at once."""

    def __init__(self, delay: float, fail_every: int = 0) -> None:
        self.delay, self.fail_every = delay, fail_every
        self.in_flight = self.peak = self.calls = 0

    async def send(self, req: Request) -> Outcome:
        self.calls += 1
        n = self.calls
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        await asyncio.sleep(self.delay)
        self.in_flight -= 1
        if self.fail_every and n % self.fail_every == 0:
            return Outcome(False, error="http:503")
        return Outcome(True, len(req.texts), 7 * len(req.texts))


def _reqs(n: int) -> list[Request]:
    return [Request(texts=["a", "b"], ids=[[1, 2, 3], [1, 4, 3]], client_tokens=6) for _ in range(n)]


async def test_closed_loop_keeps_concurrency_and_counts():
    client = SlowClient(0.01, fail_every=5)
    samples = await run_closed(client, _reqs(40), concurrency=4)
    assert len(samples) == 40 and client.peak == 4
    row = summarize(samples, 2)
    assert row["errors"] == {"http:503": 8}
    assert row["tokens"] == 32 * 14  # the reported counts, not the client's 6 per request


async def test_closed_loop_duration_cap():
    samples = await run_closed(SlowClient(0.02), _reqs(1000), concurrency=2, duration=0.2)
    # it stopped at the duration, far short of the 1000 requests (at most 2 x 0.2 / 0.02 = 20 fit;
    # a loaded machine fits fewer, never more)
    assert 2 <= len(samples) <= 30


async def test_open_loop_counts_latency_from_schedule():
    # arrivals every 10 ms, but the server takes 50 ms and only one request may be in flight:
    # queueing behind earlier requests must show in the latency (no coordinated omission)
    client = SlowClient(0.05)
    offsets = np.arange(10) * 0.01
    samples = await run_open(client, _reqs(10), offsets, max_in_flight=1)
    lat = sorted(s.latency for s in samples)
    assert client.peak == 1
    assert lat[-1] > 0.35  # the last one waited for nine others
    assert lat[-1] - lat[0] > 0.3  # ... and the first did not


class HeldClient(SlowClient):
    """Holds every answer until ``n`` requests are in flight at once (or the test's bound passes)."""

    def __init__(self, n: int) -> None:
        super().__init__(0.0)
        self.n, self.all_in = n, asyncio.Event()

    async def send(self, req: Request) -> Outcome:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        if self.in_flight >= self.n:
            self.all_in.set()
        try:
            await asyncio.wait_for(self.all_in.wait(), 30)
        except asyncio.TimeoutError:
            return Outcome(False, error="held")
        finally:
            self.in_flight -= 1
        return Outcome(True, len(req.texts), 7 * len(req.texts))


async def test_open_loop_does_not_wait_for_answers():
    # no answer comes until all ten are in flight: a loop that waited for answers before sending
    # the next request would hold them all for the 30 s bound and record ten failures
    client = HeldClient(10)
    samples = await run_open(client, _reqs(10), np.arange(10) * 0.01, max_in_flight=100)
    assert client.peak == 10 and len(samples) == 10 and all(s.ok for s in samples)


def test_progress_line_only_when_enabled():
    import io

    buf = io.StringIO()

    async def go():
        p = Progress("batch 4", 5, stream=buf, enabled=False)
        await run_closed(SlowClient(0.0), _reqs(5), 2, progress=p)
        q = Progress("batch 4", 5, stream=buf, enabled=True, interval=0.01)
        await run_closed(SlowClient(0.01), _reqs(5), 1, progress=q)

    asyncio.run(go())
    out = buf.getvalue()
    assert out.count("\n") == 1 and "batch 4: 5/5 requests" in out


# --- arguments ----------------------------------------------------------------------------------


def test_defaults_follow_arcticinference():
    a = build_parser().parse_args([])
    assert a.batch_sizes == [1, 16, 64] and a.protocol == "grpc" and a.distribution == "fixed"
    assert a.rate is None and a.encoding_format == "base64" and not a.in_process


def test_parse_full_command():
    a = build_parser().parse_args(
        "--server h:1 --protocol http --batch-sizes 2,8 --requests 10 --concurrency 3 "
        "--prompt-length 512 --max-seq-length 512 --distribution normal --rate 5.5 --duration 9 "
        "--warmup 2 --seed 7 --encoding-format float --send-token-ids --output-json r.json".split())
    assert (a.server, a.protocol, a.batch_sizes, a.requests, a.concurrency) == ("h:1", "http", [2, 8], 10, 3)
    assert (a.prompt_length, a.max_seq_length, a.distribution) == (512, 512, "normal")
    assert (a.rate, a.duration, a.warmup, a.seed) == (5.5, 9.0, 2, 7)
    assert a.encoding_format == "float" and a.send_token_ids and a.output_json == "r.json"


@pytest.mark.parametrize("bad", [
    ["--batch-sizes", "1,x"], ["--batch-sizes", "0,4"], ["--batch-sizes", ""], ["--requests", "0"],
    ["--concurrency", "-1"], ["--rate", "0"], ["--rate", "nan"], ["--distribution", "zipf"],
    ["--protocol", "ws"], ["--st-dtype", "float16"], ["--prompt-length", "1.5"],
])
def test_bad_arguments_exit_2(bad, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(bad)
    assert e.value.code == 2


def test_inconsistent_options_are_refused(capsys):
    assert main(["--in-process", "--rate", "3"]) == 2
    assert "--rate needs a server" in capsys.readouterr().err
    assert main(["--prompt-length", "300", "--wait-ready", "0"]) == 2
    assert "exceeds max_seq_length 256" in capsys.readouterr().err


def test_unreachable_server_is_a_clear_error(capsys):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = main(["--protocol", "http", "--server", f"127.0.0.1:{port}", "--wait-ready", "0",
               "--requests", "1", "--batch-sizes", "1"])
    assert rc == 2 and "is not ready" in capsys.readouterr().err


def test_http_base():
    assert http_base("localhost:8080") == "http://localhost:8080"
    assert http_base("https://x.example/prefix/") == "https://x.example/prefix"


def test_bench_error_is_exception():
    assert issubclass(BenchError, Exception) and REPORT_SCHEMA == 1


def test_report_is_strict_json():
    # NaN latencies (a batch size with no success) must be written as null, not NaN
    from floe.bench import _nan_to_none

    row = summarize([Sample(0, 1, False, error="timeout")], 1)
    text = json.dumps(_nan_to_none({"results": [row]}), allow_nan=False)
    assert json.loads(text)["results"][0]["latency_s"]["p50"] is None
