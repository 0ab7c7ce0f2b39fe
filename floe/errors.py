"""One error taxonomy, mapped once per transport.

Code anywhere in floe raises a ``FloeError`` subclass; the HTTP front end turns it into an OpenAI
error envelope with ``HTTP_STATUS[kind]``, the gRPC servers abort with ``GRPC_STATUS[kind]``.
Anything that is not a FloeError is an internal error: it is logged with its traceback and the
client sees a generic message (never the raw exception text).
"""

from __future__ import annotations

import enum
from typing import Optional

MAX_MESSAGE_CHARS = 400


class ErrorKind(str, enum.Enum):
    VALIDATION = "invalid_request_error"
    UNPROCESSABLE = "unprocessable_input"
    AUTH = "authentication_error"
    NOT_FOUND = "not_found_error"
    TOO_LARGE = "request_too_large"
    HEADERS_TOO_LARGE = "request_header_fields_too_large"
    UNSUPPORTED_MEDIA = "unsupported_media_type"
    OVERLOADED = "rate_limit_error"
    UNAVAILABLE = "service_unavailable"
    DEADLINE = "timeout_error"
    CANCELLED = "cancelled"
    INTERNAL = "internal_error"


class FloeError(Exception):
    """Base of every error floe reports to a client. ``message`` is safe to show to the client."""

    kind: ErrorKind = ErrorKind.INTERNAL

    def __init__(self, message: str, *, param: Optional[str] = None,
                 retry_after: Optional[float] = None) -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 3] + "..."
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after


class ValidationError(FloeError):
    kind = ErrorKind.VALIDATION


class PoisonInputError(FloeError):
    """The request's input made the model's process exit on two replicas (floe/fleet/router.py).
    Not retryable: sending it again would take down another replica."""

    kind = ErrorKind.UNPROCESSABLE


class AuthError(FloeError):
    kind = ErrorKind.AUTH


class ModelNotFoundError(FloeError):
    kind = ErrorKind.NOT_FOUND


class TooLargeError(FloeError):
    kind = ErrorKind.TOO_LARGE


class HeadersTooLargeError(FloeError):
    """Too many request headers, or too many bytes of them (HTTP 431, checked as they arrive)."""

    kind = ErrorKind.HEADERS_TOO_LARGE


class UnsupportedMediaError(FloeError):
    kind = ErrorKind.UNSUPPORTED_MEDIA


class OverloadedError(FloeError):
    kind = ErrorKind.OVERLOADED

    def __init__(self, message: str = "server overloaded, retry later", **kw) -> None:
        kw.setdefault("retry_after", 1.0)
        super().__init__(message, **kw)


class UnavailableError(FloeError):
    """Not ready, draining, or no healthy replica."""

    kind = ErrorKind.UNAVAILABLE

    def __init__(self, message: str = "service unavailable, retry later", **kw) -> None:
        kw.setdefault("retry_after", 1.0)
        super().__init__(message, **kw)


class DeadlineError(FloeError):
    kind = ErrorKind.DEADLINE


class CancelledError(FloeError):
    kind = ErrorKind.CANCELLED


class InternalError(FloeError):
    kind = ErrorKind.INTERNAL

    def __init__(self, message: str = "internal error", **kw) -> None:
        super().__init__(message, **kw)


class ConfigError(Exception):
    """A setting that cannot be honoured; raised at start-up, printed, exit code 2."""


class ReplicaStartError(RuntimeError):
    """No replica could be started; the message says why for each (exit status, stderr tail)."""


class WorkerStartError(RuntimeError):
    """A front-end worker could not start (``--frontend-workers``); its log lines say why."""


class ModelLoadError(Exception):
    """The model folder or hub id cannot be loaded; raised at start-up with a clear message."""


# --- transport tables -------------------------------------------------------------------------

HTTP_STATUS: dict[ErrorKind, int] = {
    ErrorKind.VALIDATION: 400,
    ErrorKind.UNPROCESSABLE: 422,
    ErrorKind.AUTH: 401,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.TOO_LARGE: 413,
    ErrorKind.HEADERS_TOO_LARGE: 431,
    ErrorKind.UNSUPPORTED_MEDIA: 415,
    ErrorKind.OVERLOADED: 429,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.DEADLINE: 504,
    ErrorKind.CANCELLED: 499,
    ErrorKind.INTERNAL: 500,
}

# Names of grpc.StatusCode members (kept as strings so this module imports without grpc).
GRPC_STATUS: dict[ErrorKind, str] = {
    ErrorKind.VALIDATION: "INVALID_ARGUMENT",
    ErrorKind.UNPROCESSABLE: "INVALID_ARGUMENT",
    ErrorKind.AUTH: "UNAUTHENTICATED",
    ErrorKind.NOT_FOUND: "NOT_FOUND",
    ErrorKind.TOO_LARGE: "RESOURCE_EXHAUSTED",
    ErrorKind.HEADERS_TOO_LARGE: "RESOURCE_EXHAUSTED",
    ErrorKind.UNSUPPORTED_MEDIA: "INVALID_ARGUMENT",
    ErrorKind.OVERLOADED: "RESOURCE_EXHAUSTED",
    ErrorKind.UNAVAILABLE: "UNAVAILABLE",
    ErrorKind.DEADLINE: "DEADLINE_EXCEEDED",
    ErrorKind.CANCELLED: "CANCELLED",
    ErrorKind.INTERNAL: "INTERNAL",
}

# The error kind also travels as trailing metadata, so that a hop keeps it exactly: the gRPC code
# alone is ambiguous (RESOURCE_EXHAUSTED is both "too large" and "overloaded"). Every floe gRPC
# server sets it; every floe gRPC client reads it first and falls back to the code.
KIND_METADATA_KEY = "floe-error-kind"
PARAM_METADATA_KEY = "floe-error-param"
RETRY_AFTER_METADATA_KEY = "retry-after"
_RETRYABLE = ("OVERLOADED", "UNAVAILABLE")

_CLASS_OF_KIND: dict[ErrorKind, type[FloeError]] = {}  # filled below, once the classes exist

# The reverse for servers that send no kind (not floe): which FloeError a bare gRPC code becomes.
_FROM_GRPC: dict[str, type[FloeError]] = {
    "INVALID_ARGUMENT": ValidationError,
    "UNAUTHENTICATED": AuthError,
    "NOT_FOUND": ModelNotFoundError,
    "RESOURCE_EXHAUSTED": OverloadedError,
    "UNAVAILABLE": UnavailableError,
    "DEADLINE_EXCEEDED": DeadlineError,
    "CANCELLED": CancelledError,
}


def error_of_kind(kind: ErrorKind, message: str = "", **kw) -> FloeError:
    """A FloeError of exactly ``kind`` (the class that declares it)."""
    cls = _CLASS_OF_KIND[kind]
    return cls(message, **kw) if message else cls(**kw)


# --- the one codec of an error's fields, for every hop ------------------------------------------

def error_fields(err: FloeError) -> dict:
    """What crosses a process boundary of an error: ``kind`` (the ErrorKind's name, lower case),
    ``message``, ``param``, ``retry_after`` (only for the kinds a client should retry). Frames
    carry it as JSON (floe/protocol.py), gRPC as trailing metadata (``grpc_trailing_metadata``),
    HTTP as the OpenAI envelope plus Retry-After; each side rebuilds it with ``error_from_fields``."""
    retry = err.retry_after if err.kind.name in _RETRYABLE else None
    return {"kind": err.kind.name.lower(), "message": err.message, "param": err.param,
            "retry_after": retry}


def error_from_fields(kind: Optional[str], message: str, param: Optional[str] = None,
                      retry_after: Optional[float] = None, *, fallback: type = None) -> FloeError:
    """The FloeError ``error_fields`` described: exactly its kind, message, param and
    Retry-After. An unknown or missing kind becomes ``fallback`` (default InternalError)."""
    member = ErrorKind.__members__.get(str(kind or "").upper())
    if member is not None:
        err = error_of_kind(member, message)
    else:
        cls = fallback or InternalError
        err = cls(message) if message else cls()
    err.param = param if isinstance(param, str) and param else None
    if err.kind.name in _RETRYABLE:
        if isinstance(retry_after, (int, float)) and retry_after == retry_after and retry_after >= 0:
            err.retry_after = float(retry_after)
    else:
        err.retry_after = None
    return err


def grpc_trailing_metadata(err: FloeError) -> tuple[tuple[str, str], ...]:
    """What a floe gRPC server sends with ``err``'s status: its fields (``error_fields``)."""
    f = error_fields(err)
    md = [(KIND_METADATA_KEY, f["kind"])]
    if f["param"]:
        md.append((PARAM_METADATA_KEY, f["param"]))
    if f["retry_after"] is not None:
        md.append((RETRY_AFTER_METADATA_KEY, f"{f['retry_after']:g}"))
    return tuple(md)


def from_grpc_status(code_name: str, details: str, metadata=()) -> FloeError:
    """Rebuilds the FloeError a gRPC status stands for: the fields a floe server sent in the
    trailing metadata, else the code's usual meaning (a server that is not floe)."""
    kind, param, retry_after = None, None, None
    for key, value in metadata or ():
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        if key == KIND_METADATA_KEY:
            kind = value
        elif key == PARAM_METADATA_KEY:
            param = value
        elif key == RETRY_AFTER_METADATA_KEY:
            try:
                retry_after = float(value)
            except ValueError:
                retry_after = None
    return error_from_fields(kind, details, param, retry_after,
                             fallback=_FROM_GRPC.get(code_name, InternalError))


def from_grpc_code(code_name: str, details: str) -> FloeError:
    """``from_grpc_status`` without metadata (a bare status from a server that is not floe)."""
    return from_grpc_status(code_name, details)


for _cls in (ValidationError, PoisonInputError, AuthError, ModelNotFoundError, TooLargeError,
             HeadersTooLargeError, UnsupportedMediaError,
             OverloadedError, UnavailableError, DeadlineError, CancelledError, InternalError):
    _CLASS_OF_KIND[_cls.kind] = _cls


def error_envelope(err: FloeError) -> dict:
    """The OpenAI error body: {"error": {"message", "type", "param", "code"}}.

    ``code`` is a string, as OpenAI sends it: the kind's name (the same name gRPC carries in
    ``floe-error-kind``), e.g. "too_large", "overloaded"; the HTTP status is the response's own.
    """
    return {
        "error": {
            "message": err.message,
            "type": err.kind.value,
            "param": err.param,
            "code": err.kind.name.lower(),
        }
    }
