"""One rule for request ids, whichever transport brought the request (floe/request_id.py)."""

from floe.request_id import MAX_LENGTH, new_request_id, request_id


def test_a_clients_id_is_kept_when_fit_to_echo():
    assert request_id("trace-1") == "trace-1"
    assert request_id("x" * MAX_LENGTH) == "x" * MAX_LENGTH


def test_a_new_id_otherwise():
    for given in (None, "", "x" * (MAX_LENGTH + 1), "line\nbreak", "bell\x07"):
        rid = request_id(given)
        assert rid != given and len(rid) == 32 and int(rid, 16) >= 0
    assert new_request_id() != new_request_id()


def test_grpc_and_http_share_the_rule():
    import floe.frontend.http as http
    import floe.transport.grpc as grpc_transport

    assert grpc_transport.client_request_id is request_id
    assert http.request_id is request_id
