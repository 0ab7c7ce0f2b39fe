"""`python -m floe.entrypoints.replica_manager` as a process: ArcticInference clients, SIGTERM drain, SIGKILL.

The ArcticInference-style client below speaks arctic_inference.InferenceService the way that
project's client does: prompts or one int32 LE byte string per prompt in, one float32 LE byte
string per prompt out.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

from floe.proto import arctic_inference_pb2 as apb
from floe.proto import arctic_inference_pb2_grpc as agrpc
from floe.proto import floe_pb2, floe_pb2_grpc
from floe.protocol import EncodeOptions, TokenBatch
from floe.proto.convert import request_to_proto, result_from_proto

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_range(n: int) -> int:
    for _ in range(50):
        base = free_port()
        ok = True
        for k in range(n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", base + k))
                except OSError:
                    ok = False
        if ok:
            return base
    raise RuntimeError("no free port range")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by anyone) counts as gone
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    return True


@contextlib.contextmanager
def replica_manager(tmp_path, *extra, env=None):
    port, start = free_port(), free_port_range(2)
    cmd = [sys.executable, "-m", "floe.entrypoints.replica_manager", "--engine", "fake", "--model", "default",
           "--host", "127.0.0.1", "--port", str(port), "--start-port", str(start),
           "--num-replicas", "2", "--health-interval", "0.2", *extra]
    log_path = tmp_path / f"manager-{port}.log"
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                                start_new_session=True)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    replica_pids: list[int] = []
    try:
        stub = floe_pb2_grpc.EmbedderStub(channel)
        deadline = time.monotonic() + 180  # generous: the test machine may be heavily loaded
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            with contextlib.suppress(grpc.RpcError):
                key = extra[extra.index("--api-key") + 1] if "--api-key" in extra else None
                info = stub.GetReplicaInfo(floe_pb2.GetReplicaInfoRequest(), timeout=1,
                                           metadata=(("authorization", f"Bearer {key}"),) if key else None)
                if info.n_healthy_replicas == 2:
                    replica_pids = [r.pid for r in info.replicas]
                    break
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.1)
        yield proc, channel, replica_pids, log_path
    finally:
        channel.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for pid in replica_pids:  # never leave a replica behind, whatever the test did
            with contextlib.suppress(ProcessLookupError):
                if pid_alive(pid):
                    os.kill(pid, signal.SIGKILL)


def floe_encode(channel, **kw) -> np.ndarray:
    stub = floe_pb2_grpc.EmbedderStub(channel)
    reply = stub.Encode(request_to_proto("f1", EncodeOptions(), **kw), timeout=10)
    return result_from_proto(reply).as_float32()


def test_arctic_inference_client_gets_correct_embeddings(tmp_path):
    with replica_manager(tmp_path) as (_, channel, pids, _):
        assert len(set(pids)) == 2 and all(pids)
        arctic = agrpc.InferenceServiceStub(channel)
        prompts = ["what is an embedding?", "floe serves embeddings", "a third, longer prompt " * 5]

        reply = arctic.Encode(apb.EncodeRequest(request_id="a1", n_prompts=len(prompts),
                                                prompts=prompts), timeout=10)
        assert reply.n_prompts == 3 and reply.embedding_dim == 384 and not reply.error
        got = np.stack([np.frombuffer(b, dtype="<f4") for b in reply.embedding_bytes_fp32])
        np.testing.assert_array_equal(got, floe_encode(channel, texts=prompts))

        ids = [[101, 2054, 2003, 102], [101, 7592, 102]]
        reply = arctic.Encode(apb.EncodeRequest(
            request_id="a2", n_prompts=2,
            token_id_bytes_i32=[np.asarray(x, dtype="<i4").tobytes() for x in ids]), timeout=10)
        got = np.stack([np.frombuffer(b, dtype="<f4") for b in reply.embedding_bytes_fp32])
        np.testing.assert_array_equal(got, floe_encode(channel, tokens=TokenBatch.from_lists(ids)))

        h = arctic.HealthCheck(apb.HealthCheckRequest(), timeout=5)
        assert h.healthy
        info = arctic.GetReplicaInfo(apb.ReplicaInfoRequest(), timeout=5)
        assert info.n_replicas == 2 and info.n_healthy_replicas == 2
        assert all(r.ready for r in info.replica_infos)

        with pytest.raises(grpc.RpcError) as ei:
            arctic.Encode(apb.EncodeRequest(request_id="a3", n_prompts=5, prompts=["x"]), timeout=10)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_sigterm_drains_and_replicas_exit(tmp_path):
    with replica_manager(tmp_path, env={"FLOE_FAKE_SECONDS_PER_BATCH": "0.5"}) as (
            proc, channel, pids, log_path):
        stub = floe_pb2_grpc.EmbedderStub(channel)
        futures = [stub.Encode.future(request_to_proto(f"d{k}", EncodeOptions(), texts=[f"t{k}"]),
                                      timeout=30) for k in range(4)]
        # at least one request is at a replica (a loaded machine may not have delivered the
        # others yet: those arrive after the SIGTERM)
        deadline = time.monotonic() + 30
        while sum(r.stats.in_flight_requests for r in stub.GetReplicaInfo(
                floe_pb2.GetReplicaInfoRequest(), timeout=10).replicas) == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        # what was accepted is answered; what arrived after the SIGTERM is refused as retryable
        # elsewhere, never cut off
        answered = 0
        for f in futures:
            try:
                answered += result_from_proto(f.result()).n
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE and "draining" in e.details(), e
        assert answered >= 1
        assert proc.wait(timeout=30) == 0, log_path.read_text()[-3000:]
        deadline = time.monotonic() + 10
        while any(pid_alive(p) for p in pids):
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_manager_sigkill_replicas_exit_by_themselves(tmp_path):
    with replica_manager(tmp_path) as (proc, _, pids, _):
        assert all(pid_alive(p) for p in pids)
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 15  # each drains (nothing in flight) and exits
        while any(pid_alive(p) for p in pids):
            assert time.monotonic() < deadline, [p for p in pids if pid_alive(p)]
            time.sleep(0.05)


def test_refused_settings_exit_2_with_message():
    out = subprocess.run([sys.executable, "-m", "floe.entrypoints.replica_manager", "--engine", "fake",
                          "--tensor-parallel-size", "2"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2
    assert "--tensor-parallel-size 2 is not supported" in out.stderr


def test_api_key_required_on_public_grpc_except_health(tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with replica_manager(tmp_path, "--api-key", "s3cret") as (_, channel, _, _):
        stub = floe_pb2_grpc.EmbedderStub(channel)
        req = request_to_proto("k", EncodeOptions(), texts=["hi"])
        with pytest.raises(grpc.RpcError) as ei:
            stub.Encode(req, timeout=10)
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as ei:
            stub.Encode(req, timeout=10, metadata=(("authorization", "Bearer wrong"),))
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as ei:  # a bare key (no Bearer scheme) is refused
            stub.Encode(req, timeout=10, metadata=(("authorization", "s3cret"),))
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = stub.Encode(req, timeout=10, metadata=(("authorization", "Bearer s3cret"),))
        assert ok.n == 1
        ok = stub.Encode(req, timeout=10, metadata=(("authorization", "bearer s3cret"),))
        assert ok.n == 1  # the scheme is case-insensitive
        h = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert h.status == health_pb2.HealthCheckResponse.SERVING
