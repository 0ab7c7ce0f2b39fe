"""The HTTP connection guard: deadlines and a connection cap in front of the ASGI app.

floe serves HTTP/1.1 with uvicorn's httptools protocol (llhttp). llhttp is strict about framing:
a request with both Content-Length and Transfer-Encoding, or two Content-Length headers, is a
parse error; uvicorn then answers 400 and closes the connection, so nothing smuggled behind it on
the same connection is ever read. What uvicorn lacks, this subclass adds:

* a deadline to receive a request's headers, armed when a connection opens (so a connection that
  never sends a byte is closed too) and again when each request begins;
* a deadline to receive the request's body once its headers are in;
* a cap on open connections: past it a new connection gets 503 with Retry-After and is closed;
* bounds on a request's headers, counted as the parser delivers them (so a flood of headers is
  never held): past ``max_header_count`` headers or ``max_header_bytes`` of request line and
  headers, 431 in the OpenAI envelope and the connection closed, before the app sees anything;
* a call to the request's ``floe.on_disconnect`` scope entry when its client goes away before the
  response is complete, so the handler cancels its queued work at once (no watcher task per
  request).

The idle keep-alive timeout between requests is uvicorn's own ``timeout_keep_alive``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Optional

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from floe import metrics
from floe.errors import HeadersTooLargeError, UnavailableError, error_envelope

log = logging.getLogger("floe.http")


def _overload_bytes() -> bytes:
    body = orjson.dumps(error_envelope(UnavailableError(
        "too many open connections, retry later")))
    return (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            b"retry-after: 1\r\nconnection: close\r\ncontent-length: " + str(len(body)).encode()
            + b"\r\n\r\n" + body)


def _refusal_bytes(err) -> bytes:
    body = orjson.dumps(error_envelope(err))
    return (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def guarded_protocol(header_timeout: float, body_timeout: float, max_connections: int,
                     max_header_count: int = 100, max_header_bytes: int = 32 * 1024) -> type:
    """The protocol class uvicorn should use (``uvicorn.Config(http=...)``) for these limits."""

    overload = _overload_bytes()
    too_many = _refusal_bytes(HeadersTooLargeError(
        f"the request has more than {max_header_count} headers", param="headers"))
    too_big = _refusal_bytes(HeadersTooLargeError(
        f"the request line and headers are larger than {max_header_bytes} bytes", param="headers"))

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _deadline: Optional[asyncio.TimerHandle] = None
        _header_bytes = 0
        _header_count = 0
        _refused = False   # this connection's request was refused: nothing more is read

        def _refuse(self, answer: bytes, why: str) -> None:
            self._refused = True
            self._disarm()
            metrics.HTTP_CONNECTIONS_CLOSED.labels(reason="headers_too_large").inc()
            log.info("refusing a request from %s: %s", self.client[0] if self.client else "?", why)
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(answer)
                self.transport.pause_reading()
                # close a moment later: closing with the request unread would reset the
                # connection and lose the 431 before the client reads it
                self.loop.call_later(0.5, self.transport.close)

        def _count(self, n: int) -> bool:
            self._header_bytes += n
            if self._header_bytes > max_header_bytes:
                self._refuse(too_big, "headers too large")
                return False
            return True

        def _arm(self, seconds: float, what: str) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self._expire, what)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self, what: str) -> None:
            self._deadline = None
            if self.transport is not None and not self.transport.is_closing():
                metrics.HTTP_CONNECTIONS_CLOSED.labels(reason=f"{what}_timeout").inc()
                log.info("closing connection from %s: no complete request %s within the deadline",
                         self.client[0] if self.client else "?", what)
                self.transport.close()

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            if len(self.connections) >= max_connections:
                metrics.HTTP_CONNECTIONS_CLOSED.labels(reason="connection_limit").inc()
                transport.write(overload)
                # Close a moment later, not at once: closing with the client's request unread
                # would reset the connection and lose the 503 before the client reads it.
                self.loop.call_later(0.5, transport.close)
                return
            super().connection_made(transport)
            self._arm(header_timeout, "headers")

        def connection_lost(self, exc: Optional[Exception]) -> None:
            self._disarm()
            if self.transport is None:  # refused at the cap: uvicorn never saw it
                return
            cycle = self.cycle
            super().connection_lost(exc)
            if cycle is not None and not cycle.response_complete:
                # the client went away mid-request: tell the handler (floe/frontend/http.py)
                on_disconnect = cycle.scope.get("floe.on_disconnect")
                if on_disconnect is not None:
                    on_disconnect()

        def data_received(self, data: bytes) -> None:
            if self.transport is None or self._refused:
                return
            super().data_received(data)

        def on_message_begin(self) -> None:
            self._header_bytes = self._header_count = 0
            super().on_message_begin()
            self._arm(header_timeout, "headers")

        def on_url(self, url: bytes) -> None:
            if not self._refused and self._count(len(url)):
                super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            if self._refused:
                return
            self._header_count += 1
            if self._header_count > max_header_count:
                self._refuse(too_many, "too many headers")
                return
            if self._count(len(name) + len(value) + 4):
                super().on_header(name, value)

        def on_headers_complete(self) -> None:
            if self._refused:
                return
            super().on_headers_complete()
            self._arm(body_timeout, "body")

        def on_body(self, body: bytes) -> None:
            if not self._refused:
                super().on_body(body)

        def on_message_complete(self) -> None:
            if self._refused:
                return
            self._disarm()
            super().on_message_complete()

    return GuardedHttpToolsProtocol
