"""One taxonomy, one table per transport: every kind maps to an HTTP status and a gRPC code."""

import grpc

from floe import errors


def test_every_kind_is_mapped_on_both_transports():
    for kind in errors.ErrorKind:
        assert kind in errors.HTTP_STATUS
        assert hasattr(grpc.StatusCode, errors.GRPC_STATUS[kind])


def test_envelope_shape_and_retry_after():
    err = errors.OverloadedError()
    body = errors.error_envelope(err)
    assert body["error"]["code"] == "overloaded" and body["error"]["type"] == "rate_limit_error"
    assert err.retry_after is not None


def test_messages_are_bounded():
    err = errors.ValidationError("x" * 10_000)
    assert len(err.message) <= errors.MAX_MESSAGE_CHARS


def test_grpc_round_trip_keeps_the_kind():
    for cls in (errors.ValidationError, errors.OverloadedError, errors.UnavailableError,
                errors.ModelNotFoundError, errors.AuthError):
        err = cls("boom")
        back = errors.from_grpc_code(errors.GRPC_STATUS[err.kind], "boom")
        assert back.kind in (err.kind, errors.ErrorKind.OVERLOADED)
    assert isinstance(errors.from_grpc_code("UNKNOWN", "x"), errors.InternalError)
