"""The public gRPC listener of the front end (floe.v1.Embedder, arctic_inference, health, reflection).

The services themselves are registered by ``floe.grpc_api.add_services`` over an ``EncodeBackend``
(the front end's EmbedService); this module owns what is specific to the public port: message
size limits, binding, and the optional API key.
"""

from __future__ import annotations

import hmac
from typing import Any, Awaitable, Callable, Optional

import grpc

from floe.errors import ConfigError

MAX_MESSAGE_BYTES = 256 * 1024 * 1024

SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Without this a second server could silently share the port (SO_REUSEPORT) and steal traffic.
    ("grpc.so_reuseport", 0),
]

# Probes from orchestrators carry no credentials; liveness must stay answerable.
_OPEN_SERVICES = ("/grpc.health.v1.Health/",)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without ``authorization: Bearer KEY`` (or the bare key) with UNAUTHENTICATED."""

    def __init__(self, api_key: str) -> None:
        self._key = api_key.encode()

    def _allowed(self, details: grpc.HandlerCallDetails) -> bool:
        if details.method.startswith(_OPEN_SERVICES):
            return True
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                token = value.decode() if isinstance(value, bytes) else value
                if token.lower().startswith("bearer "):
                    token = token[7:]
                return hmac.compare_digest(token.strip().encode(), self._key)
        return False

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
            details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or self._allowed(details):
            return handler

        async def deny(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or invalid API key: send metadata 'authorization: Bearer KEY'")

        kw = dict(request_deserializer=handler.request_deserializer,
                  response_serializer=handler.response_serializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(deny, **kw)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(deny, **kw)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(deny, **kw)
        return grpc.stream_stream_rpc_method_handler(deny, **kw)


async def start_grpc_server(backend: Any, host: str, port: int,
                            api_key: Optional[str] = None) -> grpc.aio.Server:
    """Starts the public gRPC server over ``backend`` (a floe.grpc_api.EncodeBackend).

    ``port`` 0 binds an ephemeral port; the bound port is ``server.floe_port``. A port that cannot
    be bound raises ConfigError.
    """
    from floe.grpc_api import add_services  # the replica shares these servicers

    interceptors = [ApiKeyInterceptor(api_key)] if api_key else []
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors)
    add_services(server, backend)
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(target)
    except RuntimeError as e:
        bound = 0
        cause = str(e)
    else:
        cause = "address in use or not available"
    if not bound:
        raise ConfigError(f"cannot bind the gRPC port {target}: {cause}; choose another --grpc-port")
    await server.start()
    server.floe_port = bound  # type: ignore[attr-defined]
    return server
