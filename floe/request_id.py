"""Request ids: one rule for every transport.

A request carries the id its client gave (HTTP's ``x-request-id`` header, the ``request_id`` field
of a gRPC message) or none. The id is echoed in the response and written in log lines, so a
client's id is kept only when it is at most ``MAX_LENGTH`` printable characters; otherwise, and
when none was given, the request gets a new one.
"""

from __future__ import annotations

import uuid
from typing import Optional

MAX_LENGTH = 128


def new_request_id() -> str:
    """A fresh id: 32 hex digits."""
    return uuid.uuid4().hex


def request_id(given: Optional[str]) -> str:
    """The id a request goes by: the client's ``given`` one if it is fit to echo, else a new one."""
    if given and len(given) <= MAX_LENGTH and given.isprintable():
        return given
    return new_request_id()
