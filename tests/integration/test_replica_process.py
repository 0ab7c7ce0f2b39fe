"""`python -m floe.replica --engine fake` as a real subprocess, called over gRPC with the stubs."""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from floe.config import ModelSettings, settings_from, settings_to_dict
from floe.engine.fake import FakeEngine
from floe.resolve import CPU_BATCH_TOKENS
from floe.models import load_spec
from floe.proto import arctic_inference_pb2 as apb
from floe.proto import arctic_inference_pb2_grpc as agrpc
from floe.proto import floe_pb2, floe_pb2_grpc
from floe.protocol import EncodeOptions, ReplicaHello, ReplicaLaunch
from floe.proto.convert import request_to_proto, result_from_proto
from floe.tokenize import Tokenizer

READY = "FLOE_REPLICA_READY"
START_TIMEOUT = 60.0


def _env() -> dict:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("FLOE_FAKE_SECONDS_PER_TOKEN", None)
    env.pop("FLOE_FAKE_SECONDS_PER_BATCH", None)
    return env


def _read_lines(stream, q: "queue.Queue[str | None]") -> None:
    for line in iter(stream.readline, ""):
        q.put(line)
    q.put(None)


def start_replica(*extra: str) -> tuple[subprocess.Popen, int]:
    proc, hello = start_process([sys.executable, "-m", "floe.replica", "--engine", "fake",
                                 "--host", "127.0.0.1", "--port", "0", "--workers", "2", *extra])
    assert hello.address.startswith("127.0.0.1:"), hello
    return proc, int(hello.address.rsplit(":", 1)[1])


def start_process(cmd: list[str], env: dict | None = None) -> tuple[subprocess.Popen, ReplicaHello]:
    """Starts a replica process and waits for its hello line (FLOE_REPLICA_READY {json})."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or _env())
    q: "queue.Queue[str | None]" = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, q), daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            line = q.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        hello = ReplicaHello.from_line(line.rstrip("\n"))
        if hello is not None:
            assert hello.pid == proc.pid and hello.engine == "fake", hello
            return proc, hello
    proc.kill()
    _, err = proc.communicate(timeout=10)
    raise AssertionError(f"replica did not become ready: {err[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=10)


@pytest.fixture(scope="module")
def replica():
    # strict model names, so that an unknown name is the NOT_FOUND these tests expect (the
    # forgiving default is test_a_standalone_replica_answers_any_model_name_by_default)
    proc, port = start_replica("--replica-id", "it", "--strict-model-name")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=10)
    try:
        yield proc, port, channel
    finally:
        channel.close()
        stop(proc)


@pytest.fixture(scope="module")
def spec():
    return load_spec(ModelSettings())


@pytest.fixture(scope="module")
def reference(spec):
    """Expected embeddings: the same tokenizer and fake engine, in-process."""
    tok = Tokenizer(spec)
    engine = FakeEngine(spec, seconds_per_token=0.0, seconds_per_batch=0.0)

    def embed_ids(items: list[list[int]]) -> np.ndarray:
        out = engine.run(engine.prepare([np.asarray(x) for x in items]))
        return out / np.linalg.norm(out, axis=1, keepdims=True)  # MiniLM ends in Normalize

    def embed(texts: list[str]) -> np.ndarray:
        tb = tok.encode(texts, EncodeOptions())
        return embed_ids([tb.item(i).tolist() for i in range(tb.n)])

    return embed, embed_ids, tok


TEXTS = ["the quick brown fox", "jumps over the lazy dog", "x"]


def test_encode_texts_and_trailing_metadata(replica, spec, reference):
    _, _, channel = replica
    embed, _, _ = reference
    stub = floe_pb2_grpc.EmbedderStub(channel)
    req = request_to_proto("req-1", EncodeOptions(), texts=TEXTS)
    resp, call = stub.Encode.with_call(req, timeout=10)
    r = result_from_proto(resp)
    assert (r.n, r.dim, r.request_id, r.model) == (3, spec.dim, "req-1", spec.name)
    np.testing.assert_allclose(r.as_float32(), embed(TEXTS), rtol=1e-5, atol=1e-6)
    meta = dict(call.trailing_metadata())
    for k in ("x-tokenization-time", "x-queue-time", "x-inference-time", "x-total-time"):
        assert float(meta[k]) >= 0
    assert int(meta["x-tokens"]) == int(r.token_counts.sum()) > 0
    assert r.timings.total_s >= r.timings.inference_s


def test_encode_token_ids_options(replica, spec, reference):
    _, _, channel = replica
    _, embed_ids, tok = reference
    stub = floe_pb2_grpc.EmbedderStub(channel)
    tb = tok.encode(TEXTS, EncodeOptions())
    items = [tb.item(i).tolist() for i in range(tb.n)]
    resp = stub.Encode(request_to_proto("", EncodeOptions(), tokens=tb), timeout=10)
    r = result_from_proto(resp)
    assert len(r.request_id) == 32  # generated uuid4 hex
    np.testing.assert_allclose(r.as_float32(), embed_ids(items), rtol=1e-5, atol=1e-6)
    # Matryoshka slice + float16 through the wire
    resp = stub.Encode(request_to_proto("d", EncodeOptions(dimensions=16, output_dtype="float16"),
                                        tokens=tb), timeout=10)
    r = result_from_proto(resp)
    assert (r.dim, r.dtype) == (16, "float16")
    np.testing.assert_allclose(np.linalg.norm(r.as_float32(), axis=1), 1.0, atol=2e-3)


def _code(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as ei:
        fn()
    return ei.value.code(), ei.value.details()


def test_bad_token_bytes_are_invalid_argument(replica, spec):
    _, _, channel = replica
    stub = floe_pb2_grpc.EmbedderStub(channel)
    ok_ids = np.array([101, 2000, 102], dtype="<i4").tobytes()
    cases = [
        floe_pb2.EncodeRequest(token_ids=ok_ids[:-1], lengths=[3]),              # not a multiple of 4
        floe_pb2.EncodeRequest(token_ids=ok_ids, lengths=[2]),                    # lengths mismatch
        floe_pb2.EncodeRequest(token_ids=np.array([1, spec.vocab_size], dtype="<i4").tobytes(),
                               lengths=[2]),                                      # id >= vocab
        floe_pb2.EncodeRequest(token_ids=ok_ids, lengths=[3], texts=["both"]),    # ids and texts
        floe_pb2.EncodeRequest(),                                                 # nothing
        floe_pb2.EncodeRequest(token_ids=ok_ids, lengths=[3, 0]),                 # empty item
        floe_pb2.EncodeRequest(texts=["a"], options=floe_pb2.EncodeOptions(dimensions=spec.dim + 1)),
    ]
    for req in cases:
        code, details = _code(lambda: stub.Encode(req, timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (req, details)
        assert details
    code, details = _code(lambda: stub.Encode(floe_pb2.EncodeRequest(texts=["a"], model="other"),
                                              timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND and "other" in details


def test_arctic_inference_client(replica, spec, reference):
    _, _, channel = replica
    embed, embed_ids, tok = reference
    stub = agrpc.InferenceServiceStub(channel)
    resp = stub.Encode(apb.EncodeRequest(request_id="a1", n_prompts=3, prompts=TEXTS,
                                         model_name=spec.name), timeout=10)
    assert (resp.request_id, resp.n_prompts, resp.embedding_dim, resp.error) == ("a1", 3, spec.dim, "")
    got = np.stack([np.frombuffer(b, dtype="<f4") for b in resp.embedding_bytes_fp32])
    np.testing.assert_allclose(got, embed(TEXTS), rtol=1e-5, atol=1e-6)

    tb = tok.encode(TEXTS, EncodeOptions())
    entries = [tb.item(i).astype("<i4").tobytes() for i in range(tb.n)]
    resp = stub.Encode(apb.EncodeRequest(n_prompts=3, token_id_bytes_i32=entries), timeout=10)
    got = np.stack([np.frombuffer(b, dtype="<f4") for b in resp.embedding_bytes_fp32])
    np.testing.assert_allclose(got, embed(TEXTS), rtol=1e-5, atol=1e-6)

    bad = [
        apb.EncodeRequest(n_prompts=2, prompts=TEXTS),                         # count mismatch
        apb.EncodeRequest(n_prompts=1, token_id_bytes_i32=[b"\x01\x00\x00"]),  # 3 bytes
        apb.EncodeRequest(n_prompts=1, token_id_bytes_i32=[
            np.array([spec.vocab_size + 5], dtype="<i4").tobytes()]),          # out of vocabulary
        apb.EncodeRequest(n_prompts=0),
    ]
    for req in bad:
        code, _ = _code(lambda: stub.Encode(req, timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, req
    code, _ = _code(lambda: stub.Encode(apb.EncodeRequest(n_prompts=1, prompts=["a"],
                                                          model_name="nope"), timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND

    info = stub.GetReplicaInfo(apb.ReplicaInfoRequest(), timeout=10)
    assert info.n_replicas == 1 and info.n_healthy_replicas == 1
    ri = info.replica_infos[0]
    assert (ri.model_name, ri.task, ri.ready) == (spec.name, "embed", True)
    assert f'"max_batch_tokens": {CPU_BATCH_TOKENS}' in ri.scheduler_config   # the CPU default
    assert stub.HealthCheck(apb.HealthCheckRequest(), timeout=10).healthy
    ab = stub.Abort(apb.AbortRequest(request_id="not-there"), timeout=10)
    assert ab.success is False


def test_health_info_and_reflection(replica, spec):
    proc, port, channel = replica
    h = health_pb2_grpc.HealthStub(channel)
    for service in ("", "floe.v1.Embedder", "arctic_inference.InferenceService"):
        assert h.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
    code, _ = _code(lambda: h.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND

    stub = floe_pb2_grpc.EmbedderStub(channel)
    hc = stub.HealthCheck(floe_pb2.HealthCheckRequest(), timeout=10)
    assert hc.healthy and hc.ready
    info = stub.GetReplicaInfo(floe_pb2.GetReplicaInfoRequest(), timeout=10)
    ri = info.replicas[0]
    assert (ri.replica_id, ri.model, ri.dim, ri.pid, ri.vocab_size) == (
        "it", spec.name, spec.dim, proc.pid, spec.vocab_size)
    assert ri.address.endswith(f":{port}") and ri.stats.rss_bytes > 0
    assert {h.name for h in ri.stats.histograms} >= {"batch_size", "inference_seconds"}

    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = list(refl.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
    names = {s.name for s in responses[0].list_services_response.service}
    assert {"floe.v1.Embedder", "arctic_inference.InferenceService", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= names


def test_sigterm_drains_and_exits_zero():
    proc, port = start_replica()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = floe_pb2_grpc.EmbedderStub(ch)
            assert stub.Encode(floe_pb2.EncodeRequest(texts=["hello"]), timeout=10).n == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        stop(proc)


_PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-m", "floe.replica", "--engine", "fake", "--port", "0",
                          "--parent-pid", str(__import__("os").getpid())],
                         stdout=subprocess.PIPE, text=True)
line = child.stdout.readline()
print(child.pid, line.strip(), flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    # a zombie (exited, not yet reaped by whoever adopted it) counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_replica_exits_when_parent_dies():
    parent = subprocess.Popen([sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, text=True,
                              env=_env())
    child_pid = None
    try:
        q: "queue.Queue[str | None]" = queue.Queue()
        threading.Thread(target=_read_lines, args=(parent.stdout, q), daemon=True).start()
        line = q.get(timeout=START_TIMEOUT)
        assert line and READY in line, line
        child_pid = int(line.split()[0])
        os.kill(child_pid, 0)  # alive
        parent.kill()
        parent.wait(timeout=10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if not _alive(child_pid):
                break
            time.sleep(0.1)
        else:
            pytest.fail("replica outlived its parent")
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.communicate(timeout=10)
        if child_pid is not None:
            try:
                os.kill(child_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_bad_model_path_exits_2_with_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "floe.replica", "--engine", "fake", "--port", "0",
         "--model", "/nonexistent/model-folder"],
        capture_output=True, text=True, timeout=60, env=_env())
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("floe.replica: error:") and "nonexistent" in last
    assert READY not in proc.stdout


def test_standalone_api_key_is_required_except_for_health():
    proc, port = start_replica("--api-key", "k3y")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = floe_pb2_grpc.EmbedderStub(ch)
            req = floe_pb2.EncodeRequest(texts=["hello"])
            for meta in (None, (("authorization", "k3y"),), (("authorization", "Bearer nope"),)):
                code, _ = _code(lambda: stub.Encode(req, timeout=10, metadata=meta))
                assert code == grpc.StatusCode.UNAUTHENTICATED
            assert stub.Encode(req, timeout=10, metadata=(("authorization", "Bearer k3y"),)).n == 1
            h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert h.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        stop(proc)


def test_empty_api_key_is_refused_at_start():
    proc = subprocess.run([sys.executable, "-m", "floe.replica", "--engine", "fake", "--port", "0",
                           "--api-key", ""], capture_output=True, text=True, timeout=60, env=_env())
    assert proc.returncode == 2
    assert "--api-key is empty" in proc.stderr
    assert READY not in proc.stdout


def test_managed_launch_unix_socket_and_token(tmp_path):
    """What the supervisor starts: a ReplicaLaunch in the environment, a Unix socket, a token."""
    settings = settings_from(env={}, batch={"max_batch_tokens": 4096}, replicas={"engine": "fake"})
    sock = tmp_path / "replica-3.sock"
    launch = ReplicaLaunch(settings=settings_to_dict(settings), index=3, address=f"unix:{sock}",
                           parent_pid=os.getpid(), token="t0ken")
    env = {**_env(), ReplicaLaunch.ENV: launch.to_json()}
    proc, hello = start_process([sys.executable, "-m", "floe.replica"], env=env)
    try:
        assert hello.address == f"unix:{sock}"
        assert (os.stat(sock).st_mode & 0o777) == 0o600  # only this user may connect
        asyncio.run(_managed_link_checks(hello.address))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        stop(proc)


async def _managed_link_checks(address: str) -> None:
    """A managed replica on a Unix socket speaks the link's frames, and only with its token."""
    from floe.fleet.replica_client import ReplicaClient
    from floe.fleet.link import ReplicaLost
    from floe.protocol import EncodeOptions, TokenBatch

    ids = TokenBatch.from_lists([[101, 7, 102]])
    stranger = ReplicaClient(address, 3, token="not-it")
    with pytest.raises(ReplicaLost):   # no token, no call: the connection is closed
        await stranger.encode(ids, EncodeOptions(), "a", timeout=10)
    await stranger.close()
    c = ReplicaClient(address, 3, token="t0ken")
    try:
        assert (await c.encode(ids, EncodeOptions(), "b", timeout=10)).n == 1
        info = await c.info(timeout=10)
        ri = info.replicas[0]
        assert ri.replica_id == "3" and ri.max_batch_tokens == 4096   # the tree arrived whole
        h = await c.health(timeout=10)
        assert h.healthy and h.ready
    finally:
        await c.close()
