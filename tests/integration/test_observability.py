"""Metrics under gunicorn with several workers, JSON logs without secrets,
request ids and security headers."""

from __future__ import annotations

import json
import re

import psycopg

from tests.conftest import Gunicorn, new_api_key
from tests.helpers import HttpClient, create_system_account, new_key

BODY_MARKER = "body-marker-must-not-be-logged"


def sample(metrics_text: str, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in metrics_text.splitlines():
        match = re.match(rf"^{name}(?:{{(.*)}})? (\S+)$", line)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match[1] or ""))
        if all(found.get(key) == value for key, value in labels.items()):
            total += float(match[2])
    return total


def test_metrics_and_logs_under_gunicorn_with_several_workers(database_url, servers, test_home):
    log_path = test_home / "observability.log"
    server = Gunicorn(database_url, servers["redis"], log_path, PAYFLOW_WEB_WORKERS="2",
                      PAYFLOW_WEB_THREADS="2")
    _, api_key = new_api_key(database_url)
    try:
        with psycopg.connect(database_url, autocommit=True) as db:
            world = create_system_account(db)
        clients = [HttpClient(server.base_url, api_key) for _ in range(4)]  # spread over both workers
        status, _, account = clients[0].request("POST", "/v1/accounts", {"name": "m", "currency": "USD"})
        assert status == 201
        keys = []
        for index in range(12):
            key = new_key()
            keys.append(key)
            status, headers, _ = clients[index % 4].request(
                "POST", "/v1/transfers",
                {"from_account_id": world, "to_account_id": account["id"], "amount": 100 + index,
                 "description": BODY_MARKER},
                {"X-Idempotency-Key": key, "X-Request-Id": f"req-{index}"})
            assert status == 201 and headers["X-Request-Id"] == f"req-{index}"
        for key in keys[:3]:  # three replays
            status, headers, _ = clients[0].request(
                "POST", "/v1/transfers",
                {"from_account_id": world, "to_account_id": account["id"], "amount": 100 + keys.index(key),
                 "description": BODY_MARKER}, {"X-Idempotency-Key": key})
            assert headers["Idempotent-Replayed"] == "true"
        status, _, _ = clients[1].request("POST", "/v1/transfers", {"from_account_id": world,
                                          "to_account_id": account["id"], "amount": 1},
                                          {"X-Idempotency-Key": keys[0]})
        assert status == 422  # reused

        # Odd methods share one label value, whatever they are.
        for method in ("AAAA", "BREW"):
            clients[0]._connection.request(method, "/health")
            clients[0]._connection.getresponse().read()
        HttpClient(server.base_url).request_text("/metrics")  # a first scrape
        text = HttpClient(server.base_url).request_text("/metrics")
        types = [line for line in text.splitlines() if line.startswith("# TYPE")]
        assert len(types) == len(set(types)), "a metric family appears twice"
        assert sample(text, "payflow_http_requests_total", method="OTHER") == 2
        assert "AAAA" not in text and "BREW" not in text
        assert sample(text, "payflow_http_requests_total", method="POST", route="/v1/transfers",
                      status="201") == 15
        assert sample(text, "payflow_transfers_total", currency="USD") == 12
        assert sample(text, "payflow_transferred_minor_units_total", currency="USD") == sum(
            100 + index for index in range(12))
        assert sample(text, "payflow_idempotent_replays_total") == 3
        assert sample(text, "payflow_idempotency_conflicts_total", code="idempotency_key_reused") == 1
        assert sample(text, "payflow_http_request_duration_seconds_count", route="/v1/transfers") == 16
        assert sample(text, "payflow_outbox_tasks", status="pending", topic="transfer.posted") == 12
        assert sample(text, "payflow_ledger_healthy") == 1
        assert "payflow_db_pool_connections" in text and "payflow_redis_errors_total" in text
        for client in clients:
            client.close()
    finally:
        server.stop()

    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is JSON
    requests = [record for record in records if record.get("logger") == "payflow.request"]
    assert not [record for record in records if record.get("logger") == "gunicorn.access"]  # off
    transfers = [r for r in requests if r["route"] == "/v1/transfers" and r["status"] == 201]
    assert len(transfers) == 15
    assert {r["request_id"] for r in transfers} >= {f"req-{index}" for index in range(12)}
    assert all(r["key_id"] and r["idempotency_key"] and r["duration_ms"] >= 0 for r in transfers)
    text = log_path.read_text()
    assert api_key not in text and BODY_MARKER not in text


def test_gunicorn_access_lines_go_where_payflow_access_log_says(database_url, servers, test_home):
    access_path = test_home / f"access-{new_key()}.log"
    server = Gunicorn(database_url, servers["redis"], test_home / f"gunicorn-{new_key()}.log",
                      PAYFLOW_WEB_WORKERS="1", PAYFLOW_ACCESS_LOG=str(access_path))
    try:
        HttpClient(server.base_url).request_text("/health")
    finally:
        server.stop()
    records = [json.loads(line) for line in access_path.read_text().splitlines() if line.strip()]
    assert any(record["logger"] == "gunicorn.access" and "GET /health" in record["message"]
               for record in records)
    assert "gunicorn.access" not in server.log_path.read_text()


def test_responses_carry_security_headers_and_a_request_id(client):
    response = client.get("/health")
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Cache-Control"] == "no-store"
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    assert len(response.headers["X-Request-Id"]) == 32
    odd = client.get("/health", headers={"X-Request-Id": "bad id with spaces"})
    assert odd.headers["X-Request-Id"] != "bad id with spaces"
