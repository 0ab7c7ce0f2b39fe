"""Python client for a floe server: HTTP or gRPC, sync (``Client``) or async (``AsyncClient``).

Embeddings come back as an (n, dim) float32 numpy array decoded straight from the server's bytes
(gRPC: floe.v1.Embedder's embedding buffer; HTTP: /embed with ``Accept: application/octet-stream``),
never through a list of Python floats. Server errors are raised as floe.errors types.

    with floe.Client("127.0.0.1:50050", protocol="grpc") as c:
        vectors = c.embed(["a query", "a document"])

``python -m floe.client --prompt TEXT`` prints one embedding's dimension, norm and first values.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from typing import Any, Optional, Sequence, Union

import numpy as np

from floe import errors
from floe.errors import FloeError
from floe.protocol import EmbedResult, EncodeOptions, TokenBatch

Inputs = Union[str, Sequence[str], Sequence[Sequence[int]]]

DEFAULT_TIMEOUT = 60.0
_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
_HTTP_KIND = {status: kind for kind, status in errors.HTTP_STATUS.items()}
_KIND_CLASS = {cls.kind: cls for cls in (
    errors.ValidationError, errors.AuthError, errors.ModelNotFoundError, errors.TooLargeError,
    errors.UnsupportedMediaError, errors.OverloadedError, errors.UnavailableError,
    errors.DeadlineError, errors.CancelledError, errors.InternalError)}


def _split_inputs(inputs: Inputs) -> tuple[Optional[list[str]], Optional[list[list[int]]]]:
    """Texts or token-id lists; anything else is a ValidationError raised before any I/O."""
    if isinstance(inputs, str):
        return [inputs], None
    items = list(inputs)
    if not items:
        raise errors.ValidationError("embed() needs at least one input", param="input")
    if all(isinstance(x, str) for x in items):
        return items, None
    if all(not isinstance(x, (str, bytes)) and hasattr(x, "__iter__") for x in items):
        ids = [[int(t) for t in x] for x in items]
        return None, ids
    raise errors.ValidationError("inputs must be a string, a list of strings or a list of token-id "
                                 "lists", param="input")


def _options(normalize, dimensions, prompt_name, truncate, output_dtype) -> EncodeOptions:
    if output_dtype not in ("float32", "float16", "bfloat16"):
        raise errors.ValidationError(f"unknown output_dtype {output_dtype!r}", param="output_dtype")
    return EncodeOptions(normalize=normalize, dimensions=dimensions, prompt_name=prompt_name,
                         truncate=truncate, output_dtype=output_dtype)


def _http_body(texts, ids, o: EncodeOptions) -> dict:
    body: dict[str, Any] = {"inputs": texts if texts is not None else ids}
    for key in ("normalize", "truncate", "prompt_name", "dimensions"):
        value = getattr(o, key)
        if value is not None:
            body[key] = value
    return body


def _http_error(status: int, payload: Any, retry_after: Optional[str]) -> FloeError:
    message = f"HTTP {status}"
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        message = str(payload["error"].get("message") or message)
    cls = _KIND_CLASS.get(_HTTP_KIND.get(status, errors.ErrorKind.INTERNAL), errors.InternalError)
    err = cls(message)
    if retry_after:
        try:
            err.retry_after = float(retry_after)
        except ValueError:
            pass
    return err


def _http_array(content: bytes, headers, o: EncodeOptions) -> np.ndarray:
    n, dim = int(headers["x-embedding-count"]), int(headers["x-embedding-dim"])
    arr = np.frombuffer(content, dtype="<f4").reshape(n, dim)
    if o.output_dtype != "float32":
        # HTTP ships float32; apply the same round-to-nearest-even cast the replica would.
        return EmbedResult.from_array(arr, o.output_dtype, np.zeros(n)).as_float32().copy()
    return arr.astype(np.float32, copy=True)


def _grpc_request(texts, ids, o: EncodeOptions):
    from floe.protocol import request_to_proto
    tokens = TokenBatch.from_lists(ids) if ids is not None else None
    return request_to_proto(uuid.uuid4().hex, o, tokens=tokens, texts=texts)


def _grpc_error(e) -> FloeError:
    return errors.from_grpc_code(e.code().name, e.details() or "")


def _grpc_array(reply) -> np.ndarray:
    from floe.protocol import result_from_proto
    return result_from_proto(reply).as_float32().copy()


def _target(url_or_address: str, protocol: Optional[str]) -> tuple[str, str]:
    proto = protocol or ("http" if url_or_address.startswith(("http://", "https://")) else "grpc")
    if proto not in ("http", "grpc"):
        raise ValueError(f"protocol must be 'http' or 'grpc', not {proto!r}")
    if proto == "http":
        url = url_or_address if "://" in url_or_address else "http://" + url_or_address
        return proto, url.rstrip("/")
    return proto, url_or_address.split("://", 1)[-1].rstrip("/")


def _grpc_metadata(api_key: Optional[str]):
    return (("authorization", f"Bearer {api_key}"),) if api_key else None


def _grpc_channel_options():
    return [("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES)]


class Client:
    """Blocking client. ``protocol`` defaults from the address: http(s):// -> HTTP, else gRPC."""

    def __init__(self, url_or_address: str = "127.0.0.1:50050", protocol: Optional[str] = None,
                 api_key: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.protocol, self.target = _target(url_or_address, protocol)
        self.api_key = api_key
        self.timeout = timeout
        if self.protocol == "http":
            import httpx
            headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
            self._http = httpx.Client(base_url=self.target, timeout=timeout, headers=headers)
        else:
            import grpc
            from floe.proto import floe_pb2_grpc
            self._channel = grpc.insecure_channel(self.target, options=_grpc_channel_options())
            self._stub = floe_pb2_grpc.EmbedderStub(self._channel)

    def embed(self, inputs: Inputs, *, normalize: Optional[bool] = None,
              dimensions: Optional[int] = None, prompt_name: Optional[str] = None,
              truncate: Optional[bool] = None, output_dtype: str = "float32") -> np.ndarray:
        """Embeds strings or token-id lists; returns an (n, dim) float32 array."""
        texts, ids = _split_inputs(inputs)
        o = _options(normalize, dimensions, prompt_name, truncate, output_dtype)
        if self.protocol == "http":
            import httpx
            try:
                r = self._http.post("/embed", json=_http_body(texts, ids, o),
                                    headers={"accept": "application/octet-stream"})
            except httpx.TransportError as e:
                raise errors.UnavailableError(f"cannot reach {self.target}: {e}") from None
            if r.status_code != 200:
                raise _http_error(r.status_code, _json_or_none(r), r.headers.get("retry-after"))
            return _http_array(r.content, r.headers, o)
        import grpc
        try:
            reply = self._stub.Encode(_grpc_request(texts, ids, o), timeout=self.timeout,
                                      metadata=_grpc_metadata(self.api_key))
        except grpc.RpcError as e:
            raise _grpc_error(e) from None
        return _grpc_array(reply)

    def health(self) -> dict:
        """{"healthy", "ready", "message"}: the server answers, and can embed right now."""
        if self.protocol == "http":
            import httpx
            try:
                live = self._http.get("/health").status_code == 200
                ready = self._http.get("/ready")
            except httpx.TransportError as e:
                return {"healthy": False, "ready": False, "message": str(e)}
            body = _json_or_none(ready) or {}
            return {"healthy": live, "ready": ready.status_code == 200,
                    "message": str(body.get("reason") or body.get("status", ""))}
        import grpc
        from floe.proto import floe_pb2
        try:
            h = self._stub.HealthCheck(floe_pb2.HealthCheckRequest(), timeout=self.timeout,
                                       metadata=_grpc_metadata(self.api_key))
        except grpc.RpcError as e:
            return {"healthy": False, "ready": False, "message": e.details() or e.code().name}
        return {"healthy": h.healthy, "ready": h.ready, "message": h.message}

    def info(self) -> dict:
        """HTTP: the server's /info; gRPC: GetReplicaInfo as a dict."""
        if self.protocol == "http":
            r = self._http.get("/info")
            if r.status_code != 200:
                raise _http_error(r.status_code, _json_or_none(r), r.headers.get("retry-after"))
            return r.json()
        import grpc
        from google.protobuf.json_format import MessageToDict
        from floe.proto import floe_pb2
        try:
            reply = self._stub.GetReplicaInfo(floe_pb2.GetReplicaInfoRequest(), timeout=self.timeout,
                                              metadata=_grpc_metadata(self.api_key))
        except grpc.RpcError as e:
            raise _grpc_error(e) from None
        return MessageToDict(reply, preserving_proto_field_name=True)

    def close(self) -> None:
        if self.protocol == "http":
            self._http.close()
        else:
            self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    """The asyncio twin of ``Client`` (httpx.AsyncClient / grpc.aio); same arguments and results."""

    def __init__(self, url_or_address: str = "127.0.0.1:50050", protocol: Optional[str] = None,
                 api_key: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.protocol, self.target = _target(url_or_address, protocol)
        self.api_key = api_key
        self.timeout = timeout
        if self.protocol == "http":
            import httpx
            headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
            self._http = httpx.AsyncClient(base_url=self.target, timeout=timeout, headers=headers)
        else:
            import grpc
            from floe.proto import floe_pb2_grpc
            self._channel = grpc.aio.insecure_channel(self.target, options=_grpc_channel_options())
            self._stub = floe_pb2_grpc.EmbedderStub(self._channel)

    async def embed(self, inputs: Inputs, *, normalize: Optional[bool] = None,
                    dimensions: Optional[int] = None, prompt_name: Optional[str] = None,
                    truncate: Optional[bool] = None, output_dtype: str = "float32") -> np.ndarray:
        texts, ids = _split_inputs(inputs)
        o = _options(normalize, dimensions, prompt_name, truncate, output_dtype)
        if self.protocol == "http":
            import httpx
            try:
                r = await self._http.post("/embed", json=_http_body(texts, ids, o),
                                          headers={"accept": "application/octet-stream"})
            except httpx.TransportError as e:
                raise errors.UnavailableError(f"cannot reach {self.target}: {e}") from None
            if r.status_code != 200:
                raise _http_error(r.status_code, _json_or_none(r), r.headers.get("retry-after"))
            return _http_array(r.content, r.headers, o)
        import grpc
        try:
            reply = await self._stub.Encode(_grpc_request(texts, ids, o), timeout=self.timeout,
                                            metadata=_grpc_metadata(self.api_key))
        except grpc.aio.AioRpcError as e:
            raise _grpc_error(e) from None
        return _grpc_array(reply)

    async def health(self) -> dict:
        if self.protocol == "http":
            import httpx
            try:
                live = (await self._http.get("/health")).status_code == 200
                ready = await self._http.get("/ready")
            except httpx.TransportError as e:
                return {"healthy": False, "ready": False, "message": str(e)}
            body = _json_or_none(ready) or {}
            return {"healthy": live, "ready": ready.status_code == 200,
                    "message": str(body.get("reason") or body.get("status", ""))}
        import grpc
        from floe.proto import floe_pb2
        try:
            h = await self._stub.HealthCheck(floe_pb2.HealthCheckRequest(), timeout=self.timeout,
                                             metadata=_grpc_metadata(self.api_key))
        except grpc.aio.AioRpcError as e:
            return {"healthy": False, "ready": False, "message": e.details() or e.code().name}
        return {"healthy": h.healthy, "ready": h.ready, "message": h.message}

    async def info(self) -> dict:
        if self.protocol == "http":
            r = await self._http.get("/info")
            if r.status_code != 200:
                raise _http_error(r.status_code, _json_or_none(r), r.headers.get("retry-after"))
            return r.json()
        import grpc
        from google.protobuf.json_format import MessageToDict
        from floe.proto import floe_pb2
        try:
            reply = await self._stub.GetReplicaInfo(floe_pb2.GetReplicaInfoRequest(),
                                                    timeout=self.timeout,
                                                    metadata=_grpc_metadata(self.api_key))
        except grpc.aio.AioRpcError as e:
            raise _grpc_error(e) from None
        return MessageToDict(reply, preserving_proto_field_name=True)

    async def close(self) -> None:
        if self.protocol == "http":
            await self._http.aclose()
        else:
            await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def _json_or_none(response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m floe.client",
                                description="Embed one prompt with a running floe server.")
    p.add_argument("--prompt", required=True, help="text to embed")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="default 50050 (gRPC) or 8080 (HTTP)")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    p.add_argument("--api-key", default=None)
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    args = p.parse_args(argv)
    port = args.port or (50050 if args.protocol == "grpc" else 8080)
    address = f"{args.host}:{port}"
    try:
        with Client(address, protocol=args.protocol, api_key=args.api_key,
                    timeout=args.timeout) as c:
            vec = c.embed([args.prompt])[0]
    except FloeError as e:
        print(f"error ({e.kind.value}): {e.message}", file=sys.stderr)
        return 1
    first = ", ".join(f"{x:.6f}" for x in vec[:8])
    print(f"dimension: {vec.shape[0]}")
    print(f"norm: {float(np.linalg.norm(vec)):.6f}")
    print(f"first values: [{first}{', ...' if vec.shape[0] > 8 else ''}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
