"""floe/transport/grpc.py in-process: a standalone replica's backend over ReplicaCore and the fake
engine, on an ephemeral port. Covers what needs a server but not a subprocess: auth (the
interceptor), status mapping with the error kind and retry-after, internal errors without their
text, validation at the edge, health flips, reflection, client cancellation."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from floe import errors
from floe.config import ModelSettings, settings_from
from floe.engine.fake import FakeEngine
from floe.transport.grpc import channel_options, start_server
from floe.models import load_spec
from floe.proto import arctic_inference_pb2 as apb
from floe.proto import arctic_inference_pb2_grpc as agrpc
from floe.proto import floe_pb2, floe_pb2_grpc
from floe.replica.core import ReplicaCore
from floe.replica.main import ReplicaBackend
from floe.tokenize import TokenizerPool

POISON = 999  # an id that makes the engine below raise


class CrashOnPoison(FakeEngine):
    def run(self, prepared):
        if any(POISON in s for s in prepared):
            raise RuntimeError("secret internal detail")
        return super().run(prepared)


class BrokenInfoBackend(ReplicaBackend):
    async def replica_info(self):
        raise KeyError("secret internal detail")


@pytest.fixture
async def serve():
    spec = load_spec(ModelSettings())
    started = []

    async def _serve(backend_cls=ReplicaBackend, api_key=None, trusted=False, model=None, **batch_kw):
        engine = CrashOnPoison(spec, seconds_per_batch=batch_kw.pop("seconds_per_batch", 0.0),
                               seconds_per_token=0.0)
        settings = settings_from(env={}, batch=batch_kw, model=model or {})
        core = ReplicaCore(engine, settings.batch, replica_id="x")
        tokenizers = TokenizerPool(spec, workers=1)
        backend = backend_cls(core, tokenizers, settings, address="", trusted=trusted)
        limit = 64 * 1024 * 1024
        server, health, ports = await start_server(backend, ["127.0.0.1:0"], receive_limit=limit,
                                                   api_key=api_key)
        backend.address = f"127.0.0.1:{ports[0]}"
        core.start()
        channel = grpc.aio.insecure_channel(backend.address, options=channel_options(limit))
        started.append((server, core, channel, tokenizers))
        return channel, core, health, backend

    yield _serve
    for server, core, channel, tokenizers in started:
        await channel.close()
        await server.stop(grace=None)
        core.stop(0.0)
        tokenizers.close()


async def _until(condition, timeout: float = 30.0) -> None:
    """Waits for a state of the core (never a guess of how long it takes: machines get loaded)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def ids_request(items, request_id=""):
    ids = np.concatenate([np.asarray(x, dtype="<i4") for x in items]).tobytes()
    return floe_pb2.EncodeRequest(request_id=request_id, token_ids=ids, lengths=[len(x) for x in items])


async def test_api_key_required(serve):
    channel, *_ = await serve(api_key="s3cret")
    stub = floe_pb2_grpc.EmbedderStub(channel)
    req = floe_pb2.EncodeRequest(texts=["hi"])
    for meta in (None, (("authorization", "Bearer wrong"),), (("authorization", "s3cret"),),
                 (("authorization", "Basic s3cret"),)):
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await stub.Encode(req, metadata=meta, timeout=10)
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert dict(ei.value.trailing_metadata())[errors.KIND_METADATA_KEY] == "auth"
    for good in ("Bearer s3cret", "bearer  s3cret"):  # RFC 6750: the scheme is case-insensitive
        ok = await stub.Encode(req, metadata=(("authorization", good),), timeout=10)
        assert ok.n == 1
    astub = agrpc.InferenceServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await astub.Encode(apb.EncodeRequest(n_prompts=1, prompts=["hi"]), timeout=10)
    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # probes work without the key
    h = health_pb2_grpc.HealthStub(channel)
    assert (await h.Check(health_pb2.HealthCheckRequest(), timeout=10)).status == \
        health_pb2.HealthCheckResponse.SERVING


async def test_engine_failure_is_internal_without_details(serve):
    channel, core, *_ = await serve()
    stub = floe_pb2_grpc.EmbedderStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await stub.Encode(ids_request([[101, POISON, 102]]), timeout=10)
    assert ei.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in ei.value.details()
    assert dict(ei.value.trailing_metadata())[errors.KIND_METADATA_KEY] == "internal"
    assert (await stub.Encode(ids_request([[101, 5, 102]]), timeout=10)).n == 1


async def test_a_standalone_replica_validates_at_the_edge(serve):
    channel, *_ = await serve(model={"strict_model_name": True})
    stub = floe_pb2_grpc.EmbedderStub(channel)
    for req, match in ((ids_request([[101, 10 ** 6, 102]]), "out of vocabulary"),
                       (floe_pb2.EncodeRequest(token_ids=np.asarray([1, 2], "<i4").tobytes(),
                                               lengths=[2], model="not-this-one"),
                        "not served here")):
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await stub.Encode(req, timeout=10)
        assert match in ei.value.details()
        kind = dict(ei.value.trailing_metadata())[errors.KIND_METADATA_KEY]
        assert errors.from_grpc_status(ei.value.code().name, ei.value.details(),
                                       ei.value.trailing_metadata()).kind.name.lower() == kind
    long = await stub.Encode(ids_request([[101] + [5] * 600 + [102]]), timeout=10)
    assert long.n == 1 and list(long.token_counts) == [256]  # truncated at the edge (auto-truncate)


async def test_a_standalone_replica_answers_any_model_name_by_default(serve):
    # what LangChain & co. send (their own default model name) is served by the one model here
    channel, *_ = await serve()
    stub = floe_pb2_grpc.EmbedderStub(channel)
    resp = await stub.Encode(floe_pb2.EncodeRequest(texts=["hello"], model="text-embedding-ada-002"),
                             timeout=10)
    assert resp.n == 1


async def test_a_managed_replica_takes_token_ids_only(serve):
    channel, *_ = await serve(trusted=True)
    stub = floe_pb2_grpc.EmbedderStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await stub.Encode(floe_pb2.EncodeRequest(texts=["hi"]), timeout=10)
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
    assert (await stub.Encode(ids_request([[101, 5, 102]]), timeout=10)).n == 1


@pytest.mark.parametrize("service", ["grpc.reflection.v1alpha.ServerReflection",
                                     "grpc.reflection.v1.ServerReflection"])
async def test_reflection_v1_and_v1alpha_follow_the_key(serve, service):
    from grpc_reflection.v1alpha import reflection_pb2 as rpb

    channel, *_ = await serve(api_key="s3cret")
    call = channel.stream_stream(f"/{service}/ServerReflectionInfo",
                                 request_serializer=rpb.ServerReflectionRequest.SerializeToString,
                                 response_deserializer=rpb.ServerReflectionResponse.FromString)
    req = rpb.ServerReflectionRequest(list_services="")
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        async for _ in call(iter([req]), timeout=10):
            pass
    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    replies = [r async for r in call(iter([req]), timeout=10,
                                     metadata=(("authorization", "Bearer s3cret"),))]
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"floe.v1.Embedder", "arctic_inference.InferenceService", "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= names


async def test_unexpected_exception_is_generic_internal(serve, caplog):
    channel, *_ = await serve(BrokenInfoBackend)
    stub = floe_pb2_grpc.EmbedderStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await stub.GetReplicaInfo(floe_pb2.GetReplicaInfoRequest(), timeout=10)
    assert ei.value.code() == grpc.StatusCode.INTERNAL
    assert ei.value.details() == "internal error"
    assert "secret internal detail" in caplog.text


async def test_overload_is_resource_exhausted_with_retry_after(serve):
    # passes long enough that the queue still holds item 3 when the second call arrives
    channel, core, *_ = await serve(max_batch_size=1, max_queued_tokens=10, seconds_per_batch=2.0)
    stub = floe_pb2_grpc.EmbedderStub(channel)
    first = asyncio.ensure_future(stub.Encode(ids_request([[1, 2, 3]] * 3), timeout=60))
    await _until(lambda: core.stats().queued_tokens == 3)  # item 1 runs, 2 prepared, 3 queued
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await stub.Encode(ids_request([[1] * 8]), timeout=10)  # 3 + 8 > 10
    assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert float(dict(ei.value.trailing_metadata())["retry-after"]) > 0
    assert (await first).n == 3


async def test_health_follows_set_serving_and_draining(serve):
    channel, core, health, backend = await serve()
    h = health_pb2_grpc.HealthStub(channel)
    stub = floe_pb2_grpc.EmbedderStub(channel)
    SERVING, NOT = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    # not flipped yet: follows the backend's readiness
    assert (await h.Check(health_pb2.HealthCheckRequest(service="floe.v1.Embedder"))).status == SERVING
    watch = h.Watch(health_pb2.HealthCheckRequest(service=""))
    assert (await watch.read()).status == SERVING
    health.set_serving(False)
    assert (await asyncio.wait_for(watch.read(), 5)).status == NOT
    watch.cancel()
    for svc in ("", "floe.v1.Embedder", "arctic_inference.InferenceService"):
        assert (await h.Check(health_pb2.HealthCheckRequest(service=svc))).status == NOT
    health.set_serving(None)
    backend.draining = True
    assert (await h.Check(health_pb2.HealthCheckRequest())).status == NOT
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await stub.Encode(floe_pb2.EncodeRequest(texts=["a"]), timeout=10)
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "retry-after" in dict(ei.value.trailing_metadata())
    hc = await stub.HealthCheck(floe_pb2.HealthCheckRequest())
    assert hc.healthy and not hc.ready and hc.message == "draining"


async def test_client_cancellation_drops_queued_work(serve):
    # passes long enough that the queue is still there when the call is cancelled; the test
    # waits for states, not for a guess of how long they take (a loaded machine is slow)
    channel, core, *_ = await serve(max_batch_size=1, seconds_per_batch=1.0)
    stub = floe_pb2_grpc.EmbedderStub(channel)
    call = stub.Encode(ids_request([[7, 8]] * 5, request_id="gone"), timeout=60)
    deadline = asyncio.get_running_loop().time() + 30
    while not core.stats().queued_sequences:
        assert asyncio.get_running_loop().time() < deadline, "the request never queued"
        await asyncio.sleep(0.01)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    deadline = asyncio.get_running_loop().time() + 30
    while (st := core.stats()).in_flight_requests:
        assert asyncio.get_running_loop().time() < deadline, st
        await asyncio.sleep(0.01)
    assert st.in_flight_requests == 0 and st.queued_sequences == 0
    assert st.dropped_sequences >= 3  # at most one running and one prepared were computed


async def test_abort_rpc(serve):
    channel, core, *_ = await serve(max_batch_size=1, seconds_per_batch=1.0)
    stub = floe_pb2_grpc.EmbedderStub(channel)
    call = asyncio.ensure_future(stub.Encode(ids_request([[7, 8]] * 4, request_id="victim"), timeout=60))
    await _until(lambda: core.stats().in_flight_requests > 0)
    resp = await stub.Abort(floe_pb2.AbortRequest(request_id="victim"), timeout=10)
    assert resp.success
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await call
    assert ei.value.code() == grpc.StatusCode.CANCELLED
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await stub.Abort(floe_pb2.AbortRequest(), timeout=10)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
