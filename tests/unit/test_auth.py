"""The one bearer check (HTTP and gRPC share it): RFC 6750, scheme case-insensitive."""

import pytest

from floe.transport.auth import bearer_ok


@pytest.mark.parametrize("header", ["Bearer k3y", "bearer k3y", "BEARER   k3y", " Bearer k3y ",
                                    b"Bearer k3y"])
def test_accepted(header):
    assert bearer_ok(header, "k3y")


@pytest.mark.parametrize("header", [None, "", "k3y", "Bearer", "Bearer k3y2", "Basic k3y",
                                    "Bearerk3y", "Bearer k3"])
def test_refused(header):
    assert not bearer_ok(header, "k3y")
