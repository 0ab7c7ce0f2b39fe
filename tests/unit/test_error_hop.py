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


ALL_KINDS = [errors.ValidationError, errors.PoisonInputError, errors.AuthError, errors.HeadersTooLargeError,
             errors.ModelNotFoundError, errors.TooLargeError, errors.UnsupportedMediaError,
             errors.OverloadedError, errors.UnavailableError, errors.DeadlineError,
             errors.CancelledError, errors.InternalError]


def test_every_kind_is_covered_by_both_tables():
    assert {c.kind for c in ALL_KINDS} == set(ErrorKind)
    assert set(errors.HTTP_STATUS) == set(ErrorKind) == set(errors.GRPC_STATUS)


@pytest.mark.parametrize("cls", ALL_KINDS)
@pytest.mark.parametrize("param", [None, "input[3]"])
def test_an_error_is_the_same_after_either_transport(cls, param):
    """Frames and gRPC carry one codec (errors.error_fields): kind, message, param and
    Retry-After come back identical, never guessed from the text."""
    from floe.protocol import error_from_frame, error_to_frame

    sent = cls("something precise went wrong", param=param)
    if cls in (errors.OverloadedError, errors.UnavailableError):
        sent.retry_after = 2.5
    by_frames = error_from_frame(error_to_frame(sent))
    by_grpc = errors.from_grpc_status(errors.GRPC_STATUS[sent.kind], sent.message,
                                      errors.grpc_trailing_metadata(sent))
    for got in (by_frames, by_grpc):
        assert type(got) is cls
        assert (got.message, got.param, got.retry_after) == (sent.message, param, sent.retry_after)
    assert errors.error_fields(by_frames) == errors.error_fields(by_grpc) == errors.error_fields(sent)


def test_an_unreadable_error_frame_is_internal():
    from floe.protocol import error_from_frame

    for junk in (b"", b"{", b'{"message": "no kind"}', b"[1, 2]"):
        got = error_from_frame(junk)
        assert got.kind in (ErrorKind.INTERNAL,)
