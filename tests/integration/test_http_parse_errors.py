"""Requests gunicorn cannot parse never reach Flask; they still get payflow's
JSON error shape (payflow/web_worker.py), with gunicorn's status."""

from __future__ import annotations

import json
import socket
import uuid
from urllib.parse import urlsplit

import psycopg
import pytest

from tests.helpers import HttpClient, create_system_account, new_key


def _raw_exchange(base_url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    address = urlsplit(base_url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in
               (line.partition(":") for line in header_lines)}
    return int(status_line.split(" ")[1]), headers, body


@pytest.mark.parametrize(("request_bytes", "status", "code"), [
    (b"GARBAGE\r\n\r\n", 400, "bad_request"),
    (b"GET /health HTTP/9.9\r\n\r\n", 400, "bad_request"),
    (b"G\xc3\xa9T /health HTTP/1.1\r\n\r\n", 400, "bad_request"),
    (b"GET /health HTTP/1.1\r\nBad Header: x\r\n\r\n", 400, "bad_request"),
    (b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\n\r\n", 414, "uri_too_long"),
    (b"GET /health HTTP/1.1\r\nX-Big: " + b"b" * 10_000 + b"\r\n\r\n", 431, "header_fields_too_large"),
    (b"GET /health HTTP/1.1\r\n" + b"".join(b"X-H%d: 1\r\n" % n for n in range(150)) + b"\r\n",
     431, "header_fields_too_large"),
    (b"POST /v1/transfers HTTP/1.1\r\nTransfer-Encoding: foo\r\n\r\n", 501, "not_implemented"),
], ids=["request-line", "http-version", "non-ascii-method", "header-name", "long-uri", "long-header",
        "many-headers", "transfer-coding"])
def test_an_unparseable_request_gets_a_json_error(live_server, request_bytes, status, code):
    got_status, headers, body = _raw_exchange(live_server["base_url"], request_bytes)
    assert (got_status, headers["content-type"]) == (status, "application/json")
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    assert headers["x-content-type-options"] == "nosniff"
    error = json.loads(body)["error"]
    assert error["code"] == code and error["message"] and error["details"] == {}
    assert len(error["message"]) <= 200


def test_a_malformed_chunked_body_is_400_and_burns_no_key(live_server):
    key = f"chunked-{uuid.uuid4()}"
    with psycopg.connect(live_server["database_url"], autocommit=True) as db:
        world = create_system_account(db)
    http = HttpClient(live_server["base_url"], live_server["api_key"])
    status, _, account = http.request("POST", "/v1/accounts", {"name": "chunked", "currency": "USD"},
                                      {"X-Idempotency-Key": new_key()})
    assert status == 201
    request = (b"POST /v1/transfers HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
               + live_server["api_key"].encode() + b"\r\nContent-Type: application/json\r\n"
               b"X-Idempotency-Key: " + key.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"ZZ\r\n{}\r\n0\r\n\r\n")
    status, headers, body = _raw_exchange(live_server["base_url"], request)
    assert (status, headers["content-type"]) == (400, "application/json")
    assert json.loads(body)["error"]["code"] == "unreadable_body"
    # The key is not burned: the same key with a good body posts the transfer.
    status, _, transfer = http.transfer(world, account["id"], 5, key=key)
    http.close()
    assert (status, transfer["amount"]) == (201, 5)


def test_a_body_the_view_never_read_gets_one_answer_only(live_server):
    """/health reads no body: gunicorn drains it before the next request and
    finds it malformed after the 200 went out. One answer, then the
    connection closes (no second, unasked-for error response)."""
    request = (b"GET /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"ZZ\r\n{}\r\n0\r\n\r\n")
    address = urlsplit(live_server["base_url"])
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 200 ")
    assert received.count(b"HTTP/1.1 ") == 1
