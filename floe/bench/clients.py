"""The three targets a benchmark can drive: floe's gRPC API, any OpenAI-compatible HTTP server, and
sentence-transformers in the benchmark's own process.

Each client turns one workload ``Request`` into an ``Outcome``. Responses are decoded the way a
real client would (embeddings parsed into numpy), so client-side cost is part of what is measured
for every target alike.
"""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from floe.bench.workload import BenchError, Request
from floe.errors import KIND_METADATA_KEY, RETRY_AFTER_METADATA_KEY


@dataclass
class Outcome:
    ok: bool
    sequences: int = 0
    tokens: int = 0
    server_tokens: bool = True
    error: Optional[str] = None
    refused: bool = False       # the server shed it for load: HTTP 429, gRPC RESOURCE_EXHAUSTED
    retry_after: bool = False   # ... and named a Retry-After


def _ok_tokens(req: Request, reported: Optional[int]) -> Outcome:
    if reported is None or reported <= 0:
        return Outcome(True, len(req.texts), req.client_tokens, server_tokens=False)
    return Outcome(True, len(req.texts), reported, server_tokens=True)


def _grpc_failure(e) -> Outcome:
    """A failed RPC. RESOURCE_EXHAUSTED is a refusal unless a floe server's trailing metadata
    names another kind (it also stands for "request too large")."""
    code = e.code().name
    if code != "RESOURCE_EXHAUSTED":
        return Outcome(False, error=f"grpc:{code}")
    md = {k: v for k, v in (e.trailing_metadata() or ())}
    refused = md.get(KIND_METADATA_KEY, "overloaded") == "overloaded"
    return Outcome(False, error=f"grpc:{code}", refused=refused,
                   retry_after=refused and RETRY_AFTER_METADATA_KEY in md)


class GrpcClient:
    """floe.v1.Embedder/Encode over one HTTP/2 channel (texts, or int32 token ids)."""

    def __init__(self, address: str, model: str = "", send_token_ids: bool = False,
                 timeout: float = 120.0) -> None:
        import grpc

        from floe.proto import floe_pb2, floe_pb2_grpc

        self._grpc, self._pb = grpc, floe_pb2
        # no message size caps: a 64 x 512-token request is well past gRPC's 4 MB default answer
        self._channel = grpc.aio.insecure_channel(address, options=[
            ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)])
        self._stub = floe_pb2_grpc.EmbedderStub(self._channel)
        self.address, self.model = address, model
        self.send_token_ids, self.timeout = send_token_ids, timeout
        self._seq = 0

    async def wait_ready(self, timeout: float) -> str:
        """Polls HealthCheck until the server says ready; returns a line describing the server."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            try:
                h = await self._stub.HealthCheck(self._pb.HealthCheckRequest(), timeout=2.0)
                if h.ready:
                    info = await self._stub.GetReplicaInfo(self._pb.GetReplicaInfoRequest(), timeout=5.0)
                    r = info.replicas[0] if info.replicas else None
                    desc = (f"{r.model} ({r.architecture}, {r.dtype} on {r.device}, "
                            f"max_seq_length {r.max_seq_length})" if r else "unknown model")
                    return f"grpc {self.address}: {desc}, {info.n_healthy_replicas}/{info.n_replicas} replicas healthy"
                last = h.message or "not ready"
            except self._grpc.aio.AioRpcError as e:
                last = f"{e.code().name}: {e.details()}"
            if time.monotonic() >= deadline:
                raise BenchError(f"server {self.address} is not ready ({last})")
            await asyncio.sleep(0.5)

    async def send(self, req: Request) -> Outcome:
        self._seq += 1
        msg = self._pb.EncodeRequest(request_id=f"bench-{self._seq}", model=self.model)
        if self.send_token_ids:
            msg.token_ids = np.fromiter((i for ids in req.ids for i in ids), dtype="<i4").tobytes()
            msg.lengths.extend(len(ids) for ids in req.ids)
        else:
            msg.texts.extend(req.texts)
        try:
            resp = await self._stub.Encode(msg, timeout=self.timeout)
        except self._grpc.aio.AioRpcError as e:
            return _grpc_failure(e)
        itemsize = 4 if resp.dtype == self._pb.FLOAT32 else 2
        if resp.n != len(req.texts) or len(resp.embeddings) != resp.n * resp.dim * itemsize:
            return Outcome(False, error="bad_response:shape")
        np.frombuffer(resp.embeddings, dtype="<f4" if itemsize == 4 else "<u2").reshape(resp.n, resp.dim)
        return _ok_tokens(req, sum(resp.token_counts) if len(resp.token_counts) else None)

    async def close(self) -> None:
        await self._channel.close()


def http_base(server: str) -> str:
    """'host:port' or a URL -> 'http://host:port' (a path prefix in the URL is kept)."""
    return (server if "://" in server else "http://" + server).rstrip("/")


class HttpClient:
    """POST {server}{endpoint} in the OpenAI embeddings format, as TEI, Infinity, vLLM and floe serve
    it: ``input`` a list of strings (or of token-id lists), ``model``, ``encoding_format``."""

    def __init__(self, server: str, model: Optional[str], endpoint: str = "/v1/embeddings",
                 encoding_format: str = "base64", send_token_ids: bool = False,
                 timeout: float = 120.0, max_connections: int = 64, api_key: Optional[str] = None) -> None:
        import httpx

        self._httpx = httpx
        self.base = http_base(server)
        self.url = self.base + "/" + endpoint.lstrip("/")
        self.model, self.encoding_format = model, encoding_format
        self.send_token_ids = send_token_ids
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            timeout=timeout, headers=headers,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections))

    async def wait_ready(self, timeout: float) -> str:
        """Polls GET /health (a 404 means the server has none: then /v1/models answers for it), and
        fills the request's ``model`` from /v1/models when none was given."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            try:
                r = await self._client.get(self.base + "/health", timeout=2.0)
                if r.status_code in (200, 404):
                    break
                last = f"HTTP {r.status_code}"
            except self._httpx.HTTPError as e:
                last = type(e).__name__
            if time.monotonic() >= deadline:
                raise BenchError(f"server {self.base} is not ready ({last})")
            await asyncio.sleep(0.5)
        served = None
        try:
            r = await self._client.get(self.base + "/v1/models", timeout=5.0)
            if r.status_code == 200:
                served = [m.get("id") for m in r.json().get("data", []) if isinstance(m, dict)]
        except (self._httpx.HTTPError, ValueError, AttributeError):
            served = None
        if self.model is None:
            if not served:
                raise BenchError(f"{self.base}/v1/models names no model; pass --served-model-name")
            self.model = served[0]
        return f"http {self.url}: model {self.model!r}" + (f" (served: {', '.join(map(str, served))})" if served else "")

    async def send(self, req: Request) -> Outcome:
        import orjson

        body = {"input": req.ids if self.send_token_ids else req.texts, "model": self.model,
                "encoding_format": self.encoding_format}
        try:
            r = await self._client.post(self.url, content=orjson.dumps(body),
                                        headers={"Content-Type": "application/json"})
        except self._httpx.TimeoutException:
            return Outcome(False, error="timeout")
        except self._httpx.HTTPError as e:
            return Outcome(False, error=f"transport:{type(e).__name__}")
        if r.status_code == 429:
            return Outcome(False, error="http:429", refused=True,
                           retry_after="retry-after" in r.headers)
        if r.status_code != 200:
            return Outcome(False, error=f"http:{r.status_code}")
        try:
            doc = orjson.loads(r.content)
            data = doc["data"]
            if len(data) != len(req.texts):
                return Outcome(False, error="bad_response:count")
            dims = set()
            for item in data:
                emb = item["embedding"]
                vec = (np.frombuffer(base64.b64decode(emb), dtype="<f4") if isinstance(emb, str)
                       else np.asarray(emb, dtype=np.float32))
                dims.add(vec.shape[0])
            if len(dims) != 1:
                return Outcome(False, error="bad_response:dims")
            usage = doc.get("usage") or {}
            reported = usage.get("prompt_tokens")
        except (ValueError, KeyError, TypeError):
            return Outcome(False, error="bad_response:json")
        return _ok_tokens(req, reported if isinstance(reported, int) else None)

    async def close(self) -> None:
        await self._client.aclose()


class InProcessClient:
    """sentence-transformers' ``SentenceTransformer.encode`` in this process: the plain-library
    baseline. One call at a time (it is a library call); tokens counted with the bench tokenizer."""

    def __init__(self, model_dir: str, max_seq_length: int, batch_size: int = 32,
                 dtype: str = "float32", device: Optional[str] = None) -> None:
        # imported here only: the network paths of the benchmark never load torch
        import torch
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(model_dir, device=device)
        self.model.max_seq_length = max_seq_length
        if dtype == "bfloat16":
            self.model = self.model.to(torch.bfloat16)
        elif dtype != "float32":
            raise BenchError(f"--st-dtype {dtype!r}: use float32 or bfloat16")
        self.batch_size, self.dtype = batch_size, dtype
        self.desc = (f"sentence-transformers in-process: {model_dir} ({dtype} on {self.model.device}, "
                     f"batch_size {batch_size}, max_seq_length {max_seq_length}, "
                     f"{torch.get_num_threads()} torch threads)")

    async def wait_ready(self, timeout: float) -> str:
        return self.desc

    def _encode(self, req: Request) -> Outcome:
        emb = self.model.encode(req.texts, batch_size=self.batch_size, convert_to_numpy=False,
                                convert_to_tensor=True, show_progress_bar=False)
        emb.float().cpu().numpy()  # the library user ends with float32 numpy, as a server client does
        return Outcome(True, len(req.texts), req.client_tokens, server_tokens=False)

    async def send(self, req: Request) -> Outcome:
        try:
            return await asyncio.to_thread(self._encode, req)
        except Exception as e:  # a library failure is a failed request, reported by type
            return Outcome(False, error=f"exception:{type(e).__name__}")

    async def close(self) -> None:
        return None
