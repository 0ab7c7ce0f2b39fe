"""An error keeps its kind across the gRPC hop: kind in trailing metadata, rebuilt exactly."""

import pytest

from floe import errors
from floe.errors import ErrorKind


@pytest.mark.parametrize("cls", [errors.ValidationError, errors.TooLargeError, errors.OverloadedError,
                                 errors.UnavailableError, errors.ModelNotFoundError,
                                 errors.InternalError, errors.AuthError, errors.DeadlineError,
                                 errors.CancelledError, errors.UnsupportedMediaError])
def test_round_trip(cls):
    sent = cls("boom")
    md = errors.grpc_trailing_metadata(sent)
    got = errors.from_grpc_status(errors.GRPC_STATUS[sent.kind], sent.message, md)
    assert type(got) is cls and got.message == "boom"
    assert got.retry_after == sent.retry_after


def test_too_large_is_not_overloaded():
    md = errors.grpc_trailing_metadata(errors.TooLargeError("too many tokens"))
    got = errors.from_grpc_status("RESOURCE_EXHAUSTED", "too many tokens", md)
    assert got.kind is ErrorKind.TOO_LARGE and got.retry_after is None
    assert errors.HTTP_STATUS[got.kind] == 413
    # a retry-after that came with a non-retryable kind is dropped
    md = md + (("retry-after", "3"),)
    assert errors.from_grpc_status("RESOURCE_EXHAUSTED", "x", md).retry_after is None


def test_overloaded_keeps_retry_after():
    md = errors.grpc_trailing_metadata(errors.OverloadedError("full", retry_after=2.5))
    got = errors.from_grpc_status("RESOURCE_EXHAUSTED", "full", md)
    assert got.kind is ErrorKind.OVERLOADED and got.retry_after == 2.5


def test_without_metadata_falls_back_to_the_code():
    assert errors.from_grpc_status("INVALID_ARGUMENT", "x").kind is ErrorKind.VALIDATION
    assert errors.from_grpc_status("UNKNOWN", "").kind is ErrorKind.INTERNAL
    assert errors.from_grpc_status("RESOURCE_EXHAUSTED", "x", (("floe-error-kind", "bogus"),)
                                   ).kind is ErrorKind.OVERLOADED
