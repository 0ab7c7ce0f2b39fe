"""ReplicaManager in-process over real `python -m floe.replica` processes (fake engine).

Balancing, failover with zero lost requests, restart, crash-loop give-up, drain, health-probe kill.
Replicas listen on Unix sockets (the default) unless a test asks for --replica-transport tcp.
"""

import asyncio
import contextlib
import os
import signal
import socket
import time

import numpy as np
import pytest

from floe.config import settings_from
from floe.engine.fake import FakeEngine
from floe.errors import UnavailableError
from floe.frontend.admission import Admission
from floe.models import load_spec
from floe.protocol import EncodeOptions, TokenBatch
from floe.fleet.manager import ReplicaManager, ReplicaStartError

pytestmark = pytest.mark.slow


def free_port_range(n: int) -> int:
    """A port p such that p .. p+n-1 are free right now."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n < 65000 and all(_free(base + k) for k in range(n)):
            return base
    raise RuntimeError("no free port range")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def make_settings(**replicas):
    """Replicas get the whole settings tree: fake_seconds_per_batch / fake_seconds_per_token make
    the fake engine slow enough to overlap requests."""
    base = dict(num_replicas=2, engine="fake", start_port=free_port_range(2), health_interval=0.2,
                startup_timeout=60.0, forward_timeout=10.0)
    base.update(replicas)
    return settings_from(env={}, model={"model": "default"}, batch={"batch_timeout_ms": 0.5},
                         replicas=base)


@pytest.fixture
def fake_env(monkeypatch):
    """Replicas inherit the environment, but their settings come from the launch, not from it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FLOE_FAKE_SECONDS_PER_BATCH", "5")  # must not reach a managed replica


async def started(settings):
    spec = load_spec(settings.model)
    m = ReplicaManager(settings, spec)
    await m.start()
    deadline = time.monotonic() + 60
    while not all(r.healthy for r in m.slots):
        assert time.monotonic() < deadline, m.status()
        await asyncio.sleep(0.05)
    return m, spec


def tokens(k: int, n_items: int = 1, length: int = 8) -> TokenBatch:
    return TokenBatch.from_lists([[101 + (k * 7 + i * 3 + j) % 900 for j in range(length)]
                                  for i in range(n_items)])


def completed(m):
    return [r.client.completed if r.client else 0 for r in m.slots]


@pytest.mark.parametrize("policy", [
    pytest.param("round_robin", marks=pytest.mark.full), "least_loaded",
    pytest.param("random", marks=pytest.mark.full)])
async def test_policy_distribution(fake_env, policy):
    # No health probe during the loop: a probe answered late on a loaded machine must not take a
    # replica out of rotation for one pick and turn the exact alternation checked below into 21/19.
    m, spec = await started(make_settings(load_balancing=policy, health_interval=60.0))
    try:
        engine = FakeEngine(spec)
        for k in range(40):
            tb = tokens(k)
            r = await m.encode(tb, EncodeOptions(normalize=False), f"r{k}")
            expected = engine.run(engine.prepare([tb.item(0)]))
            np.testing.assert_allclose(r.as_float32(), expected, rtol=1e-6, atol=1e-6)
        counts = completed(m)
        if policy == "random":
            assert min(counts) >= 8 and sum(counts) == 40, counts
        else:
            # sequential requests: round robin alternates; least_loaded sees equal (zero) loads
            # and breaks ties from a rotating offset, so it alternates too
            failed = [r.client.failed if r.client else 0 for r in m.slots]
            assert counts == [20, 20], (counts, failed, m.router.retried, m.status())
        # the replicas' own counters agree with the manager's
        infos = await m.replica_infos()
        assert [i.stats.requests for i in infos] == counts
        assert all(i.healthy and i.ready for i in infos)
    finally:
        await m.stop()


async def test_least_loaded_avoids_the_busy_replica(fake_env):
    # a 4000-token request takes ~16 s: six small ones must finish while it runs, on a loaded
    # machine; no health probe meanwhile (see test_policy_distribution)
    # (nor handing back: the idle replica would take part of the large request,
    # test_a_busy_replica_hands_back_queued_inputs_to_an_idle_one)
    m, _ = await started(make_settings(load_balancing="least_loaded", fake_seconds_per_token=0.004,
                                       forward_timeout=60.0, health_interval=60.0,
                                       split_min_tokens=0, hand_back_min_tokens=0))
    try:
        big = asyncio.create_task(m.encode(tokens(0, n_items=16, length=250), EncodeOptions(), "big"))
        await asyncio.sleep(0.1)
        busy = next(r.index for r in m.slots if r.client.in_flight_tokens)
        for k in range(6):
            await m.encode(tokens(k, length=4), EncodeOptions(), f"s{k}")
        counts = completed(m)
        assert counts[busy] == 0 and counts[1 - busy] == 6, counts
        await big
        assert [r.client.in_flight_tokens for r in m.slots] == [0, 0]
    finally:
        await m.stop()


async def test_a_large_request_is_cut_across_the_replicas_and_loses_nothing_to_a_crash(fake_env):
    """One request at a time, as a sequential indexing client sends them: each is cut across
    both replicas (their counters say so), answered exactly as the engine answers it whole, and
    a replica killed under the cut requests costs none of them."""
    m, spec = await started(make_settings(load_balancing="least_loaded", health_interval=60.0,
                                          fake_seconds_per_token=0.0002))
    try:
        engine = FakeEngine(spec)
        for k in range(6):
            tb = tokens(k, n_items=64, length=16)   # 1,024 tokens: two parts of 512
            r = await m.encode(tb, EncodeOptions(normalize=False), f"big{k}")
            expected = engine.run(engine.prepare([tb.item(i) for i in range(tb.n)]))
            np.testing.assert_allclose(r.as_float32(), expected, rtol=1e-6, atol=1e-6)
            assert r.n == 64 and r.request_id == f"big{k}"
        assert completed(m) == [6, 6] and m.router.split == 6
        assert m.status()["split_requests"] == 6

        victim = m.slots[1]
        tasks = [asyncio.create_task(m.encode(tokens(k, n_items=64, length=16),
                                              EncodeOptions(normalize=False), f"c{k}"))
                 for k in range(8)]
        await asyncio.sleep(0.05)
        os.kill(victim.proc.pid, signal.SIGKILL)
        results = await asyncio.wait_for(asyncio.gather(*tasks), 60)   # raises on any failure
        for k, r in enumerate(results):
            tb = tokens(k, n_items=64, length=16)
            expected = engine.run(engine.prepare([tb.item(i) for i in range(tb.n)]))
            np.testing.assert_allclose(r.as_float32(), expected, rtol=1e-6, atol=1e-6)
    finally:
        await m.stop()


async def test_a_busy_replica_hands_back_queued_inputs_to_an_idle_one(fake_env):
    """A 4,000-token request on one replica, a small one on the other: when the small one is
    answered, the busy replica gives back the inputs it has not started (the batch it prepared
    included), the idle one computes them, and the large request's answer is whole and exact."""
    m, spec = await started(make_settings(load_balancing="least_loaded", health_interval=60.0,
                                          fake_seconds_per_token=0.0002, split_min_tokens=0,
                                          forward_timeout=60.0))
    try:
        engine = FakeEngine(spec)
        big_tokens = tokens(0, n_items=40, length=100)
        big = asyncio.create_task(m.encode(big_tokens, EncodeOptions(normalize=False), "big"))
        await asyncio.sleep(0.2)
        busy = next(r.index for r in m.slots if r.client.in_flight_tokens)
        small = await m.encode(tokens(1, length=8), EncodeOptions(normalize=False), "small")
        assert small.n == 1
        r = await asyncio.wait_for(big, 60)
        expected = engine.run(engine.prepare([big_tokens.item(i) for i in range(40)]))
        np.testing.assert_allclose(r.as_float32(), expected, rtol=1e-6, atol=1e-6)
        assert r.n == 40 and r.request_id == "big" and r.token_counts.tolist() == [100] * 40
        # the busy replica's running batch is its own; of the rest, up to half went
        assert 1 <= m.router.handed_back <= 20, m.router.handed_back
        assert m.status()["handed_back_rows"] == m.router.handed_back
        infos = await m.replica_infos()
        assert infos[busy].stats.sequences == 40 - m.router.handed_back
        assert infos[1 - busy].stats.sequences == 1 + m.router.handed_back
        assert [s.client.in_flight_tokens for s in m.slots] == [0, 0]
    finally:
        await m.stop()


@pytest.mark.parametrize("transport", ["unix", pytest.param("tcp", marks=pytest.mark.full)])
async def test_sigkill_replica_mid_load_loses_nothing_and_it_comes_back(fake_env, transport):
    m, spec = await started(make_settings(load_balancing="round_robin", fake_seconds_per_batch=0.005,
                                          replica_transport=transport))
    try:
        # the private link's frames on either transport, at the address the replica reported
        kinds = {type(s.client.link).__name__ for s in m.slots}
        assert kinds == {"FramesLink"}
        assert all(s.client.address.startswith("unix:") == (transport == "unix") for s in m.slots)
        engine = FakeEngine(spec)
        victim = m.slots[0]
        old_pid = victim.proc.pid
        sem = asyncio.Semaphore(16)
        done = 0

        async def one(k):
            nonlocal done
            async with sem:
                tb = tokens(k, n_items=2)
                r = await m.encode(tb, EncodeOptions(normalize=False), f"q{k}")
                done += 1
                return tb, r

        tasks = [asyncio.create_task(one(k)) for k in range(200)]
        while done < 40:
            await asyncio.sleep(0.005)
        os.kill(old_pid, signal.SIGKILL)
        results = await asyncio.wait_for(asyncio.gather(*tasks), 60)  # raises on any failure
        for tb, r in results[:20] + results[-20:]:
            expected = engine.run(engine.prepare([tb.item(0), tb.item(1)]))
            np.testing.assert_allclose(r.as_float32(), expected, rtol=1e-6, atol=1e-6)
        # it is restarted and takes traffic again
        deadline = time.monotonic() + 30
        while not (victim.healthy and victim.proc.pid != old_pid):
            assert time.monotonic() < deadline, m.status()
            await asyncio.sleep(0.05)
        assert victim.restarts == 1
        for k in range(10):
            await m.encode(tokens(k), EncodeOptions(), f"after{k}")
        assert victim.client.completed >= 4
        assert m.status()["ready"]
    finally:
        await m.stop()


async def test_busy_port_crash_loops_then_given_up(fake_env):
    # --replica-transport tcp: replica i binds replica_host:start_port + i (no SO_REUSEPORT)
    s = make_settings(max_restarts=2, restart_window=60.0, replica_transport="tcp")
    port = s.replicas.start_port + 1
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", port))
    blocker.listen()
    m = ReplicaManager(s, load_spec(s.model))
    try:
        await m.start()  # replica 0 is enough
        deadline = time.monotonic() + 60
        while m.slots[1].state != "failed":
            assert time.monotonic() < deadline, m.status()
            await asyncio.sleep(0.05)
        st = m.status()
        r1 = st["replicas"][1]
        assert r1["restarts"] == 2 and not r1["healthy"]
        assert "crash-looped" in r1["message"], r1
        assert f"cannot bind 127.0.0.1:{port}" in r1["message"], r1
        assert st["ready"] and st["healthy_replicas"] == 1
        info = (await m.replica_infos())[1]
        assert not info.healthy and f"cannot bind 127.0.0.1:{port}" in info.status_message
        assert info.address == ""  # internal addresses are never shown
        r = await m.encode(tokens(1), EncodeOptions(), "x")
        assert r.n == 1
    finally:
        blocker.close()
        await m.stop()


async def test_bad_model_path_is_given_up_with_the_reason(fake_env, tmp_path):
    s = make_settings(num_replicas=1)
    spec = load_spec(s.model)
    bad = settings_from(env={}, model={"model": str(tmp_path / "missing")},
                        replicas={**s.replicas.__dict__})
    m = ReplicaManager(bad, spec)
    t0 = time.monotonic()
    with pytest.raises(ReplicaStartError, match="exit code 2") as ei:
        await m.start()
    assert "missing" in str(ei.value)  # the replica's own stderr line names the path
    assert time.monotonic() - t0 < 30
    st = m.status()
    assert st["replicas"][0]["state"] == "failed" and not st["ready"]
    assert st["replicas"][0]["stderr_tail"]


async def test_drain_finishes_in_flight_then_stops_replicas(fake_env):
    """The front end's drain (floe/frontend/admission.py), then manager.stop(), as floe serve does."""
    m, _ = await started(make_settings(fake_seconds_per_batch=0.3))
    admission = Admission(100, m.ready)
    procs = [r.proc for r in m.slots]

    async def request(k):
        with admission.admitted():
            return await m.encode(tokens(k), EncodeOptions(), f"d{k}")

    tasks = [asyncio.create_task(request(k)) for k in range(8)]
    await asyncio.sleep(0.1)
    assert admission.in_flight == 8

    async def drain_then_stop():
        assert await admission.drain(timeout=20)
        await m.stop()

    drain = asyncio.create_task(drain_then_stop())
    await asyncio.sleep(0.05)
    with pytest.raises(UnavailableError, match="draining"):
        await request(99)
    results = await asyncio.gather(*tasks)
    assert all(r.n == 1 for r in results)
    await asyncio.wait_for(drain, 30)
    assert not m.ready()
    assert all(p.returncode is not None for p in procs)
    assert all(r.state == "stopped" for r in m.slots)


async def test_stop_lets_each_replica_drain_its_in_flight_work(fake_env):
    m, _ = await started(make_settings(fake_seconds_per_batch=0.3))
    procs = [r.proc for r in m.slots]
    done_before = sum(s.client.completed for s in m.slots)
    tasks = [asyncio.create_task(m.encode(tokens(k), EncodeOptions(), f"s{k}")) for k in range(4)]
    # every request has reached its replica: what a replica has not received when it is stopped
    # is not its in-flight work (floe serve stops the replicas only after its own in-flight
    # requests have finished). Each Encode call on the wire (one or several merged requests) must
    # be registered in its replica's core, not just one of them.
    deadline = time.monotonic() + 30
    while True:
        infos = await m.replica_infos()
        clients = [s.client for s in m.slots]
        sent = sum(c.in_flight_requests + c.completed for c in clients) - done_before
        if (sent == len(tasks)
                and not any(c.queued_requests for c in clients)
                and all(i.stats.in_flight_requests == c.calls_in_flight
                        for i, c in zip(infos, clients))):
            break
        assert time.monotonic() < deadline, (infos, [c.calls_in_flight for c in clients])
        await asyncio.sleep(0.02)
    await asyncio.wait_for(m.stop(), 30)
    assert all(p.returncode == 0 for p in procs)  # SIGTERM: drained and exited cleanly
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(not isinstance(r, BaseException) and r.n == 1 for r in results), results


async def test_hung_replica_times_out_with_503_not_retried_and_probes_kill_it(fake_env):
    # a timeout that a healthy replica meets even on a heavily loaded machine
    m, _ = await started(make_settings(forward_timeout=10.0, load_balancing="round_robin"))
    try:
        victim = m.slots[1]
        pid = victim.proc.pid
        os.kill(pid, signal.SIGSTOP)  # alive but answering nothing
        results = await asyncio.gather(*(m.encode(tokens(k), EncodeOptions(), f"h{k}")
                                         for k in range(6)), return_exceptions=True)
        # round robin: half went to the hung replica. A request that reached it and timed out is
        # the server being busy, not the replica being dead: 503 with Retry-After, not retried
        # (that would double the load). A request that never got through (the stopped process
        # never finished the connection handshake) did not reach it: that one is retried on the
        # other replica. Which of the two happens depends on whether the channel was connected.
        failed = [r for r in results if isinstance(r, BaseException)]
        assert len(failed) + m.router.retried == 3, (results, m.router.retried)
        for e in failed:
            assert isinstance(e, UnavailableError) and e.retry_after, repr(e)
            assert "did not answer within 10 s" in e.message
            assert "unix:" not in e.message and "replica-" not in e.message  # no internal address
        assert all(r.n == 1 for r in results if not isinstance(r, BaseException))
        assert m.router.failed_retries == 0
        # the health probes find the replica hung, kill it, and it is restarted (a fresh replica
        # process takes tens of seconds to start on a 2-core machine busy with other tests)
        deadline = time.monotonic() + 90
        while not (victim.healthy and victim.proc.pid != pid):
            assert time.monotonic() < deadline, m.status()
            await asyncio.sleep(0.05)
        assert victim.restarts == 1
        results = await asyncio.gather(*(m.encode(tokens(k), EncodeOptions(), f"a{k}")
                                         for k in range(4)))
        assert all(r.n == 1 for r in results)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        await m.stop()


async def test_no_healthy_replica_is_unavailable(fake_env):
    m, _ = await started(make_settings(num_replicas=1, max_restarts=0))
    try:
        proc = m.slots[0].proc
        proc.kill()
        await proc.wait()
        deadline = time.monotonic() + 5
        while m.ready():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        with pytest.raises(UnavailableError) as ei:
            await m.encode(tokens(1), EncodeOptions(), "x")
        assert ei.value.retry_after
        assert "killed by SIGKILL" in m.status()["replicas"][0]["message"]
    finally:
        await m.stop()
