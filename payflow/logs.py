"""Structured logs: one JSON object per line, on stderr.

Never logged: secrets (API keys, webhook secrets), request or response bodies,
Authorization headers. Requests log their method, route, status, duration,
request id, idempotency key and the caller's key id (never the key itself).
"""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
RENAMED_FIELDS = {"asctime": "time", "levelname": "level", "name": "logger"}


def formatter() -> logging.Formatter:
    return JsonFormatter(FORMAT, rename_fields=RENAMED_FIELDS)


def configure(level: int = logging.INFO) -> None:
    """JSON on stderr for the whole process (idempotent)."""
    root = logging.getLogger()
    if any(getattr(handler, "payflow_json", False) for handler in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter())
    handler.payflow_json = True
    root.handlers = [handler]
    root.setLevel(level)
