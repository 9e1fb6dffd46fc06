"""The gunicorn worker the API runs: gthread, with the errors gunicorn answers
itself in payflow's JSON error shape.

A request gunicorn cannot parse (a malformed request line or header, a line
or header block over its limits, a bad chunked body) never reaches Flask:
gunicorn writes its own HTML page. Here the same status goes out with
{"error": {"code", "message", "details"}} instead. gunicorn still decides
which status each parse error gets; only the page it writes is replaced.
"""

from __future__ import annotations

from http import HTTPStatus

from gunicorn.http.errors import ParseException
from gunicorn.workers.gthread import ThreadWorker

from payflow.api.errors import INTERNAL_ERROR_MESSAGE, error_body
from payflow.api.observability import SECURITY_HEADERS

MESSAGE_CHARS_MAX = 200  # the parse error may quote the client's line back
_CODES = {
    400: "bad_request",
    403: "forbidden",
    414: "uri_too_long",
    417: "expectation_failed",
    431: "header_fields_too_large",
    501: "not_implemented",  # a Transfer-Encoding gunicorn does not support
}


class JsonErrorThreadWorker(ThreadWorker):
    def handle_error(self, req, client, addr, exc):
        super().handle_error(req, _JsonErrorPage(client, exc), addr, exc)

    def _keepalive_after(self, conn, keepalive):
        """gthread reads what a view left of the body before the next request
        on the connection; a malformed chunked body then fails after the
        view's answer went out, and gunicorn would send a second, unasked-for
        error response. The connection is closed instead."""
        try:
            return super()._keepalive_after(conn, keepalive)
        except ParseException:
            return False


class _JsonErrorPage:
    """Stands in for the client's socket while gunicorn writes its error
    page (gunicorn.util.write_error): the page's status is kept, the rest is
    ours."""

    def __init__(self, sock, error: BaseException) -> None:
        self._sock = sock
        self._error = error

    def gettimeout(self):
        return self._sock.gettimeout()

    def setblocking(self, flag) -> None:
        self._sock.setblocking(flag)

    def sendall(self, page: bytes) -> None:
        status = int(page.split(b" ", 2)[1])  # "HTTP/1.1 400 Bad Request\r\n..."
        if status == 500:  # gunicorn's own trouble, not the client's: its log has the details
            code, message = "internal_error", INTERNAL_ERROR_MESSAGE
        else:
            code = _CODES.get(status, "bad_request")
            message = f"This HTTP request cannot be read: {self._error}"
        if len(message) > MESSAGE_CHARS_MAX:
            message = message[: MESSAGE_CHARS_MAX - 3] + "..."
        body = error_body(code, message).encode()
        headers = [("Connection", "close"), ("Content-Type", "application/json"),
                   ("Content-Length", str(len(body))), *SECURITY_HEADERS]
        head = f"HTTP/1.1 {status} {_reason(status)}\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in headers) + "\r\n"
        self._sock.sendall(head.encode("latin-1") + body)


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
