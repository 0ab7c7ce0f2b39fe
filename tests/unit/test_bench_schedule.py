"""`floe bench`'s open loop over time: rate schedules, the per-window timeline, refusals, the
options that go with them, and the PNG."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from floe.bench import build_parser, main, schedule_of
from floe.bench.clients import Outcome, _grpc_failure
from floe.bench.schedule import RateSchedule
from floe.bench.stats import Sample, format_timeline, summarize, timeline
from floe.bench.workload import BenchError, Request

STEP = RateSchedule("step", 20.0, step_rate=180.0, step_at=10.0)
BURST = RateSchedule("burst", 20.0, burst_rate=200.0, burst_seconds=2.0, burst_every=10.0)

# --- schedules ----------------------------------------------------------------------------------


def test_rate_at():
    assert RateSchedule("steady", 7.0).rate_at(123.0) == 7.0
    assert [STEP.rate_at(t) for t in (0.0, 9.999, 10.0, 50.0)] == [20.0, 20.0, 180.0, 180.0]
    # bursts at [10, 12), [20, 22), ...: none at the start
    got = [BURST.rate_at(t) for t in (0.0, 1.0, 9.99, 10.0, 11.99, 12.0, 19.9, 20.5, 22.0)]
    assert got == [20, 20, 20, 200, 200, 20, 20, 200, 20]


def test_segments_cover_the_duration():
    assert STEP.segments(30.0) == [(0.0, 10.0, 20.0), (10.0, 30.0, 180.0)]
    assert STEP.segments(5.0) == [(0.0, 5.0, 20.0)]
    assert BURST.segments(21.0) == [(0.0, 10.0, 20.0), (10.0, 12.0, 200.0), (12.0, 20.0, 20.0),
                                    (20.0, 21.0, 200.0)]
    for sched in (STEP, BURST, RateSchedule("steady", 3.0)):
        segs = sched.segments(47.0)
        assert segs[0][0] == 0.0 and segs[-1][1] == 47.0
        assert all(a[1] == b[0] for a, b in zip(segs, segs[1:]))
    assert BURST.expected_arrivals(30.0) == pytest.approx(26 * 20 + 4 * 200)


@pytest.mark.parametrize("sched", [RateSchedule("steady", 50.0), STEP, BURST])
def test_mean_rate_over_a_long_run(sched):
    duration = 400.0
    off = sched.arrivals(duration, np.random.default_rng(3))
    want = sched.expected_arrivals(duration)
    # Poisson: sd = sqrt(want); 4 sd is a bound a correct generator passes for any seed
    assert abs(len(off) - want) < 4 * math.sqrt(want)
    assert np.all(np.diff(off) >= 0) and off[0] >= 0 and off[-1] < duration


def test_step_boundary():
    off = STEP.arrivals(40.0, np.random.default_rng(5))
    before, after = np.sum(off < 10.0), np.sum(off >= 10.0)
    assert abs(before - 200) < 4 * math.sqrt(200)     # 10 s at 20/s
    assert abs(after - 5400) < 4 * math.sqrt(5400)    # 30 s at 180/s
    # the rate changes at the boundary: the second before it is sparse, the second after dense
    assert np.sum((off >= 9) & (off < 10)) < 50 < np.sum((off >= 10) & (off < 11))


def test_burst_windows():
    duration = 200.0
    off = BURST.arrivals(duration, np.random.default_rng(9))
    phase = off % 10.0
    in_burst = (off >= 10.0) & (phase < 2.0)
    n_bursts = 19  # at 10, 20, ..., 190
    want_in, want_out = n_bursts * 2 * 200, (duration - n_bursts * 2) * 20
    assert abs(in_burst.sum() - want_in) < 4 * math.sqrt(want_in)
    assert abs((~in_burst).sum() - want_out) < 4 * math.sqrt(want_out)
    assert np.sum(off < 10.0) < 400  # no burst in the first period


def test_arrivals_are_deterministic_by_seed():
    a = BURST.arrivals(60.0, np.random.default_rng(42))
    b = BURST.arrivals(60.0, np.random.default_rng(42))
    c = BURST.arrivals(60.0, np.random.default_rng(43))
    assert np.array_equal(a, b) and not np.array_equal(a[: min(len(a), len(c))], c[: min(len(a), len(c))])


@pytest.mark.parametrize("kw", [
    dict(kind="ramp"), dict(kind="steady", rate=0.0), dict(kind="step", step_at=5.0),
    dict(kind="step", step_rate=5.0), dict(kind="burst", burst_rate=9.0, burst_every=5.0),
    dict(kind="burst", burst_rate=9.0, burst_seconds=5.0, burst_every=5.0),
])
def test_bad_schedules(kw):
    with pytest.raises(BenchError):
        RateSchedule(**{"rate": 1.0, **kw})


def test_describe_round_trips():
    for s in (STEP, BURST, RateSchedule("steady", 2.5)):
        assert RateSchedule(**s.describe()) == s


# --- the timeline -------------------------------------------------------------------------------


def _ok(start, lat, tokens=10):
    return Sample(start=start, end=start + lat, ok=True, sequences=1, tokens=tokens)


def _refused(start, lat, retry_after=True):
    return Sample(start=start, end=start + lat, ok=False, error="http:429", refused=True,
                  retry_after=retry_after)


def test_timeline_known_answers():
    t0 = 100.0
    samples = [
        # window [0, 1): three ok (latencies 0.1, 0.2, 0.3), one refusal answered in 5 ms
        _ok(t0 + 0.0, 0.1), _ok(t0 + 0.5, 0.2), _ok(t0 + 0.9, 0.3), _refused(t0 + 0.2, 0.005),
        # window [1, 2): one ok sent at 1.8 that answers at 2.8 (counted by send time), one error
        _ok(t0 + 1.8, 1.0, tokens=40), Sample(t0 + 1.1, t0 + 1.2, False, error="grpc:UNAVAILABLE"),
        # window [2, 3): two refusals (10 and 30 ms), one without Retry-After
        _refused(t0 + 2.0, 0.01), _refused(t0 + 2.5, 0.03, retry_after=False),
    ]
    rows = timeline(samples, t0, window=1.0)
    assert [r["t"] for r in rows] == [0.0, 1.0, 2.0] and rows[-1]["t_end"] == 3.0
    w0, w1, w2 = rows
    assert (w0["offered"], w0["ok"], w0["refused"], w0["errors"]) == (4, 3, 1, 0)
    assert w0["offered_rps"] == 4.0 and w0["ok_rps"] == 3.0 and w0["ok_tokens_per_s"] == 30.0
    assert w0["latency_s"]["p50"] == pytest.approx(0.2)
    assert w0["latency_s"]["p90"] == pytest.approx(0.28)
    assert w0["latency_s"]["p99"] == pytest.approx(0.298)
    assert w0["refusal_latency_p50_s"] == pytest.approx(0.005)
    assert (w1["offered"], w1["ok"], w1["refused"], w1["errors"]) == (2, 1, 0, 1)
    assert w1["errors_rps"] == 1.0 and w1["ok_tokens_per_s"] == 40.0
    assert math.isnan(w1["refusal_latency_p50_s"])
    assert (w2["offered"], w2["ok"], w2["refused"]) == (2, 0, 2) and w2["refused_rps"] == 2.0
    assert math.isnan(w2["latency_s"]["p50"])
    assert w2["refusal_latency_p50_s"] == pytest.approx(0.02)
    # outstanding request-seconds: w0 0.1 + 0.2 + 0.1 (0.9..1.0) + 0.005; w1 0.2 (0.9+0.3 ends
    # at 1.2) + 0.1 + 0.2 (1.8..2.0); w2 0.8 (the 1.8 request until 2.8) + 0.01 + 0.03
    assert [r["in_flight"] for r in rows] == pytest.approx([0.405, 0.5, 0.84])


def test_timeline_duration_and_short_last_window():
    samples = [_ok(0.1, 0.01), _ok(1.2, 0.01)]
    rows = timeline(samples, 0.0, window=0.5, duration=2.25)
    assert [r["t"] for r in rows] == [0.0, 0.5, 1.0, 1.5, 2.0] and rows[-1]["t_end"] == 2.25
    assert [r["offered"] for r in rows] == [1, 0, 1, 0, 0]
    assert rows[0]["offered_rps"] == 2.0 and rows[-1]["offered_rps"] == 0.0
    assert math.isnan(rows[1]["latency_s"]["p99"])
    # windows of another width: the same samples, other buckets
    assert [r["offered"] for r in timeline(samples, 0.0, window=2.0)] == [2]
    assert timeline([], 0.0) == []
    with pytest.raises(ValueError):
        timeline(samples, 0.0, window=0.0)


def test_timeline_table_has_one_line_per_window():
    rows = timeline([_ok(0.1, 0.01), _refused(2.2, 0.002)], 0.0)
    lines = format_timeline(rows).splitlines()
    assert len(lines) == 1 + 3 and "refused/s" in lines[0]
    assert lines[1].split()[:2] == ["0.0", "1.0"] and lines[3].split()[-2] == "2.0"


def test_summary_counts_refusals_and_keeps_its_keys():
    samples = [_ok(0.0, 0.1), _refused(0.1, 0.002), _refused(0.2, 0.004, retry_after=False),
               Sample(0.3, 0.4, False, error="http:503")]
    row = summarize(samples, 1)
    assert row["refused"] == 2 and row["refusals_with_retry_after"] == 1 and row["failed"] == 3
    assert row["refusal_latency_s"]["p50"] == pytest.approx(0.003)
    assert row["refusal_latency_s"]["p99"] == pytest.approx(0.00398)
    assert row["errors"] == {"http:429": 2, "http:503": 1}
    assert {"requests", "successful", "success_rate", "latency_s", "tokens_per_s"} <= row.keys()
    assert math.isnan(summarize([_ok(0, 1)], 1)["refusal_latency_s"]["p50"])


# --- refusals as the clients see them -----------------------------------------------------------


async def test_http_429_is_a_refusal_with_retry_after():
    import httpx

    from floe.bench.clients import HttpClient

    codes = iter([(429, {"Retry-After": "1"}), (429, {}), (503, {"Retry-After": "1"})])

    def answer(request):
        status, headers = next(codes)
        return httpx.Response(status, headers=headers, json={"error": {"message": "busy"}})

    c = HttpClient("localhost:1", "m")
    await c._client.aclose()
    c._client = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    req = Request(texts=["a"], ids=[[1, 2]], client_tokens=2)
    try:
        got = [await c.send(req) for _ in range(3)]
    finally:
        await c.close()
    assert [(o.error, o.refused, o.retry_after) for o in got] == [
        ("http:429", True, True), ("http:429", True, False), ("http:503", False, False)]


class _RpcError:
    def __init__(self, code, md=()):
        import grpc

        self._code, self._md = getattr(grpc.StatusCode, code), md

    def code(self):
        return self._code

    def trailing_metadata(self):
        return self._md


def test_grpc_resource_exhausted_is_a_refusal_unless_floe_says_too_large():
    o = _grpc_failure(_RpcError("RESOURCE_EXHAUSTED", (("floe-error-kind", "overloaded"),
                                                       ("retry-after", "0.5"))))
    assert (o.error, o.refused, o.retry_after) == ("grpc:RESOURCE_EXHAUSTED", True, True)
    o = _grpc_failure(_RpcError("RESOURCE_EXHAUSTED"))  # not floe: the code alone
    assert (o.refused, o.retry_after) == (True, False)
    o = _grpc_failure(_RpcError("RESOURCE_EXHAUSTED", (("floe-error-kind", "too_large"),)))
    assert (o.error, o.refused) == ("grpc:RESOURCE_EXHAUSTED", False)
    o = _grpc_failure(_RpcError("UNAVAILABLE", (("retry-after", "1"),)))
    assert (o.error, o.refused) == ("grpc:UNAVAILABLE", False)


# --- options ------------------------------------------------------------------------------------


def test_schedule_options_parse():
    a = build_parser().parse_args("--schedule burst --rate 20 --burst-rate 200 --burst-seconds 2 "
                                  "--burst-every 10 --duration 60 --window 0.5 --plot r.png".split())
    assert schedule_of(a) == BURST and a.window == 0.5 and a.plot == "r.png"
    a = build_parser().parse_args("--schedule step --rate 20 --step-rate 180 --step-at 10 "
                                  "--duration 30".split())
    assert schedule_of(a) == STEP
    a = build_parser().parse_args([])
    assert a.schedule == "steady" and a.window == 1.0 and schedule_of(a) is None
    assert schedule_of(build_parser().parse_args(["--rate", "4"])) == RateSchedule("steady", 4.0)


@pytest.mark.parametrize("argv, says", [
    ("--schedule step --rate 20 --step-rate 180 --step-at 10", "needs --duration"),
    ("--schedule step --step-rate 180 --step-at 10 --duration 30", "needs --rate"),
    ("--schedule step --rate 20 --step-at 10 --duration 30", "needs --step-rate"),
    ("--schedule step --rate 20 --step-rate 9 --step-at 30 --duration 30", "must be before --duration"),
    ("--schedule burst --rate 20 --burst-rate 200 --duration 30", "--burst-seconds, --burst-every"),
    ("--schedule burst --rate 1 --burst-rate 9 --burst-seconds 10 --burst-every 10 --duration 30",
     "must be shorter than"),
    ("--rate 20 --step-rate 180", "--step-rate is for --schedule step"),
    ("--schedule step --rate 2 --step-rate 3 --step-at 1 --burst-every 4 --duration 9",
     "--burst-every is for --schedule burst"),
])
def test_schedule_option_errors_are_argparse_errors(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv.split())
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and says in err


@pytest.mark.parametrize("bad", [["--window", "0"], ["--schedule", "ramp"], ["--burst-rate", "-1"]])
def test_bad_values_exit_2(bad, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(bad)
    assert e.value.code == 2


def test_plot_needs_an_open_loop(capsys):
    assert main(["--plot", "x.png", "--wait-ready", "0"]) == 2
    assert "--plot draws an open-loop run" in capsys.readouterr().err


def test_plot_without_matplotlib_says_how_to_install(monkeypatch):
    import importlib.util

    from floe.bench import plot

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(BenchError, match=r"pip install 'floe\[plot\]'"):
        plot.require_matplotlib()


# --- the PNG ------------------------------------------------------------------------------------


def _synthetic_timeline():
    rng = np.random.default_rng(1)
    samples = []
    for off in BURST.arrivals(30.0, rng):
        burst = BURST.rate_at(off) > 100
        if burst and rng.random() < 0.4:
            samples.append(_refused(off, 0.002))
        else:
            samples.append(_ok(off, rng.lognormal(np.log(0.2 if burst else 0.02), 0.4)))
    return timeline(samples, 0.0, 1.0, 30.0)


def test_plot_renders_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from floe.bench.plot import plot_path, plot_timeline

    rows = _synthetic_timeline()
    rows[3]["latency_s"]["p50"] = None  # as a JSON report has it for a window with no success
    segs = BURST.segments(30.0)
    out = plot_timeline(rows, str(tmp_path / "t.png"), "burst 20 -> 200 req/s",
                        [p for a, b, r in segs for p in ((a, r), (b, r))])
    data = open(out, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert plot_path("r.png", 16, 1) == "r.png"
    assert plot_path("out/r.png", 16, 3) == "out/r-b16.png"


# --- a whole run against a scripted client ------------------------------------------------------


class RefusingClient:
    """Refuses every third request (429 with Retry-After), answers the others at once."""

    def __init__(self) -> None:
        self.calls = 0

    async def wait_ready(self, timeout):
        return "scripted"

    async def send(self, req: Request) -> Outcome:
        self.calls += 1
        if self.calls % 3 == 0:
            return Outcome(False, error="http:429", refused=True, retry_after=True)
        return Outcome(True, len(req.texts), 5 * len(req.texts))

    async def close(self):
        return None


def test_scheduled_run_reports_the_timeline(monkeypatch, tmp_path, capsys):
    import floe.bench as bench

    monkeypatch.setattr(bench, "_make_client", lambda args, tok: RefusingClient())
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["--schedule", "step", "--rate", "20", "--step-rate", "60", "--step-at", "0.5",
               "--duration", "1", "--window", "0.25", "--batch-sizes", "1,2", "--warmup", "0",
               "--prompt-length", "8", "--requests", "1", "--output-json", str(out),
               "--plot", str(png), "--seed", "4"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["config"]["schedule"] == {"kind": "step", "rate": 20.0, "step_rate": 60.0,
                                            "step_at": 0.5}
    assert report["config"]["window"] == 0.25
    # --requests 1 is not used: the schedule's arrivals decide the count (the first batch size
    # draws them first from the seeded generator)
    want = len(RateSchedule("step", 20.0, step_rate=60.0, step_at=0.5)
               .arrivals(1.0, np.random.default_rng(4)))
    assert want > 1 and report["results"][0]["requests"] == want
    for row in report["results"]:
        tl = row["timeline"]
        assert [r["t"] for r in tl] == [0.0, 0.25, 0.5, 0.75]
        assert sum(r["offered"] for r in tl) == row["requests"]
        assert sum(r["refused"] for r in tl) == row["refused"] == row["refusals_with_retry_after"]
        assert row["refused"] == row["requests"] // 3 and row["errors"] == {"http:429": row["refused"]}
        assert set(tl[0]) >= {"offered_rps", "ok_rps", "ok_tokens_per_s", "refused_rps",
                              "errors_rps", "latency_s", "refusal_latency_p50_s", "in_flight"}
    for bs in (1, 2):
        assert (tmp_path / f"r-b{bs}.png").read_bytes()[:4] == b"\x89PNG"
    err = capsys.readouterr().err
    assert "over time (0.25 s windows" in err and "refused/s" in err
