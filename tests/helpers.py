"""Small helpers shared by the tests."""

from __future__ import annotations

import json
import uuid

import psycopg
from marshmallow import Schema
from psycopg import sql

from payflow.audit import full_audit
from payflow.schemas import AccountSchema, ApiErrorSchema, TransferSchema

JSON = {"Content-Type": "application/json"}


def new_key() -> str:
    return f"test-{uuid.uuid4()}"


def create_system_account(db: psycopg.Connection, currency: str = "USD", name: str | None = None) -> str:
    row = db.execute(
        "SELECT body FROM payflow_create_account_v1('test', NULL, NULL, 60, %s, %s, NULL, true)",
        (name or f"World {currency} {uuid.uuid4().hex[:6]}", currency),
    ).fetchone()
    body = row["body"] if isinstance(row, dict) else row[0]
    return json.loads(body)["id"]


def assert_schema(body: dict, schema: type[Schema]) -> None:
    errors = schema().validate(body)
    assert not errors, f"{body} does not match {schema.__name__}: {errors}"


def assert_error(response, status: int, code: str) -> dict:
    body = response.get_json()
    assert response.status_code == status, (response.status_code, body)
    assert_schema(body, ApiErrorSchema)
    assert body["error"]["code"] == code, body
    return body


class Api:
    """The HTTP API through Flask's test client, with the boilerplate folded."""

    def __init__(self, client) -> None:
        self.client = client

    def create_account(self, currency: str = "USD", overdraft_limit: int = 0, name: str = "acct") -> str:
        response = self.client.post("/v1/accounts", headers=JSON, json={
            "name": name, "currency": currency, "overdraft_limit": overdraft_limit})
        assert response.status_code == 201, response.get_json()
        assert_schema(response.get_json(), AccountSchema)
        return response.get_json()["id"]

    def transfer(self, source: str, destination: str, amount, key: str | None = None, **extra):
        body = {"from_account_id": source, "to_account_id": destination, "amount": amount, **extra}
        return self.client.post("/v1/transfers", json=body,
                                headers={**JSON, "X-Idempotency-Key": key or new_key()})

    def ok_transfer(self, source: str, destination: str, amount: int, **extra) -> dict:
        response = self.transfer(source, destination, amount, **extra)
        assert response.status_code == 201, response.get_json()
        assert_schema(response.get_json(), TransferSchema)
        return response.get_json()

    def balance(self, account_id: str) -> int:
        response = self.client.get(f"/v1/accounts/{account_id}")
        assert response.status_code == 200
        return response.get_json()["balance"]


def assert_ledger_consistent(database_url: str) -> None:
    """The full audit: entries sum to 0 per currency, balances equal their
    entries, every chain is continuous."""
    report = full_audit(database_url)
    assert report.ok, report


def table_counts(db: psycopg.Connection) -> dict[str, int]:
    counts = {}
    for table in ("accounts", "transfers", "entries", "outbox", "idempotency_keys"):
        row = db.execute(sql.SQL("SELECT count(*) AS n FROM {}").format(sql.Identifier(table))).fetchone()
        counts[table] = row["n"] if isinstance(row, dict) else row[0]
    return counts


class HttpClient:
    """A keep-alive HTTP/1.1 client for one thread, against a live server."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_seconds: float = 30) -> None:
        import http.client
        from urllib.parse import urlsplit

        parts = urlsplit(base_url)
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._connection = http.client.HTTPConnection(parts.hostname, parts.port,
                                                      timeout=timeout_seconds)

    def request(self, method: str, path: str, body: dict | None = None,
                headers: dict | None = None) -> tuple[int, dict, dict | None]:
        import http.client

        payload = json.dumps(body) if body is not None else None
        all_headers = {**self._auth, **(JSON if body is not None else {}), **(headers or {})}
        try:
            self._connection.request(method, path, body=payload, headers=all_headers)
            response = self._connection.getresponse()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            # The server closed an idle keep-alive connection: a new one. (Safe to
            # resend: our POSTs carry idempotency keys.)
            self._connection.close()
            self._connection.request(method, path, body=payload, headers=all_headers)
            response = self._connection.getresponse()
        raw = response.read()
        parsed = json.loads(raw) if raw else None
        return response.status, dict(response.getheaders()), parsed

    def request_text(self, path: str) -> str:
        self._connection.request("GET", path, headers=self._auth)
        return self._connection.getresponse().read().decode()

    def transfer(self, source: str, destination: str, amount: int, key: str | None = None):
        return self.request("POST", "/v1/transfers",
                            {"from_account_id": source, "to_account_id": destination,
                             "amount": amount},
                            {"X-Idempotency-Key": key or new_key()})

    def close(self) -> None:
        self._connection.close()
