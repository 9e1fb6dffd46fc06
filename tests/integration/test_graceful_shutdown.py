"""SIGTERM to gunicorn lets in-flight requests finish before it exits."""

from __future__ import annotations

import threading
import time

import psycopg

from tests.conftest import Gunicorn, new_api_key
from tests.helpers import HttpClient, create_system_account


def test_sigterm_lets_an_in_flight_transfer_finish(database_url, servers, test_home):
    server = Gunicorn(database_url, servers["redis"], test_home / "graceful.log",
                      PAYFLOW_LOCK_TIMEOUT_MS="10000", PAYFLOW_WEB_WORKERS="1")
    _, api_key = new_api_key(database_url)
    http = HttpClient(server.base_url, api_key)
    with psycopg.connect(database_url, autocommit=True) as db:
        world = create_system_account(db)
    _, _, account = http.request("POST", "/v1/accounts", {"name": "a", "currency": "USD"})
    results = []
    with psycopg.connect(database_url) as blocker:
        # Hold the account's row lock so the transfer waits inside the server.
        blocker.execute("SELECT 1 FROM accounts WHERE id = %s FOR UPDATE", (account["id"],))
        client = HttpClient(server.base_url, api_key)
        request = threading.Thread(target=lambda: results.append(client.transfer(world, account["id"], 42)))
        request.start()
        time.sleep(0.5)  # the request is now waiting on the lock
        server.process.terminate()
        time.sleep(0.5)
        assert server.process.poll() is None, "gunicorn must wait for the in-flight request"
        blocker.rollback()
        request.join(timeout=30)
    assert results and results[0][0] == 201, results
    assert server.stop() == 0
    with psycopg.connect(database_url) as db:
        balance = db.execute("SELECT balance FROM accounts WHERE id = %s", (account["id"],)).fetchone()[0]
    assert balance == 42
