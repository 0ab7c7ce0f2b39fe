"""floe.client's pure parts: how inputs are cut into requests, and when a refusal is retried."""

import pytest

from floe import errors
from floe.client import Retry, chunk_bounds


def test_chunks_cover_every_item_once_in_order():
    sizes = [3] * 11
    bounds = list(chunk_bounds(sizes, max_items=4, max_chars=10**9))
    assert bounds == [(0, 4), (4, 8), (8, 11)]
    assert list(chunk_bounds(sizes, max_items=11, max_chars=10**9)) == [(0, 11)]
    assert list(chunk_bounds([], max_items=4, max_chars=10)) == []


def test_chunks_respect_the_character_budget_but_never_split_an_item():
    # 40 + 40 fits 100, a third would not; an item larger than the budget goes alone.
    assert list(chunk_bounds([40, 40, 40, 500, 10, 10], max_items=100, max_chars=100)) == [
        (0, 2), (2, 3), (3, 4), (4, 6)]
    assert list(chunk_bounds([500], max_items=4, max_chars=100)) == [(0, 1)]


def test_retry_waits_what_the_server_said_and_only_for_overloaded_or_unavailable():
    r = Retry(attempts=3, max_wait=10.0, jitter=0.1)
    overloaded = errors.OverloadedError(retry_after=2.0)
    assert r.delay(overloaded, attempt=1, waited=0.0, rand=lambda: 0.0) == 2.0
    assert r.delay(overloaded, attempt=1, waited=0.0, rand=lambda: 1.0) == pytest.approx(2.2)
    assert r.delay(errors.UnavailableError(retry_after=1.0), 1, 0.0, rand=lambda: 0.0) == 1.0
    for err in (errors.TooLargeError("too many"), errors.ValidationError("bad"),
                errors.InternalError(), errors.DeadlineError("slow"), errors.AuthError("key")):
        assert r.delay(err, 1, 0.0) is None
    # a connection failure carries no Retry-After: raised at once
    assert r.delay(errors.UnavailableError("cannot reach", retry_after=None), 1, 0.0) is None


def test_retry_is_bounded_by_attempts_and_by_total_wait():
    r = Retry(attempts=3, max_wait=5.0, jitter=0.0)
    err = errors.OverloadedError(retry_after=2.0)
    assert r.delay(err, attempt=2, waited=2.0) == 2.0
    assert r.delay(err, attempt=3, waited=4.0) is None           # third try was the last
    assert r.delay(err, attempt=2, waited=4.0) is None           # 4 + 2 > 5: not worth waiting
    assert Retry(attempts=1).delay(err, 1, 0.0) is None
    # the jitter never pushes the total past max_wait
    assert Retry(attempts=9, max_wait=5.0, jitter=1.0).delay(err, 1, 2.5, rand=lambda: 1.0) == 2.5
    with pytest.raises(ValueError):
        Retry(attempts=0)
