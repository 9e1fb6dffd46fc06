"""The HTTP payout provider against a local server, pruning, the backoff
policy, and the operator's CLI for the queue."""

from __future__ import annotations

import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner

from payflow.cli import main
from payflow.config import Config
from payflow.db import create_pool
from payflow.providers import HttpProvider, PayoutRequest
from payflow.worker import Worker, backoff_seconds
from tests.conftest import make_config
from tests.helpers import Api, create_system_account

REQUEST = PayoutRequest("payflow-task-7", "p-1", 500, "USD", {"iban": "x"})


class Provider:
    """A payout provider on loopback answering the statuses it is given in turn."""

    def __init__(self, answers: list[int], delay_seconds: float = 0) -> None:
        self.answers, self.calls = list(answers), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.calls.append((self.headers["Idempotency-Key"], body))
                threading.Event().wait(delay_seconds)
                status = outer.answers.pop(0) if outer.answers else 200
                payload = json.dumps({"reference": "ref-1"}).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out on purpose (the timeout test)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/payouts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize(("status", "outcome"), [
    (200, "paid"), (201, "paid"), (400, "permanent"), (404, "permanent"), (422, "permanent"),
    (301, "retryable"), (302, "retryable"), (408, "retryable"), (409, "retryable"),
    (425, "retryable"), (429, "retryable"), (500, "unknown"), (503, "unknown")])
def test_http_provider_classifies_answers(status, outcome):
    provider = Provider([status])
    try:
        result = HttpProvider(Config(payout_http_url=provider.url)).pay(REQUEST)
    finally:
        provider.close()
    assert result.outcome == outcome
    assert provider.calls == [("payflow-task-7", {"payout_id": "p-1", "amount": 500, "currency": "USD",
                                                  "destination": {"iban": "x"}})]
    if outcome == "paid":
        assert result.reference == "ref-1"


def test_http_provider_timeouts_are_unknown_and_refused_connections_retryable():
    slow = Provider([200], delay_seconds=1.0)
    try:
        result = HttpProvider(Config(payout_http_url=slow.url, payout_http_timeout_seconds=0.2)).pay(REQUEST)
    finally:
        slow.close()
    assert result.outcome == "unknown"  # it may have paid: only a retry with the key can tell
    result = HttpProvider(Config(payout_http_url=slow.url)).pay(REQUEST)  # nobody listens now
    assert result.outcome == "retryable"


def test_backoff_grows_exponentially_with_jitter_up_to_the_cap():
    config = Config(outbox_backoff_base_seconds=1, outbox_backoff_cap_seconds=60)
    rng = random.Random(1)
    for attempts, ceiling in [(1, 1), (2, 2), (3, 4), (6, 32), (7, 60), (30, 60)]:
        delays = [backoff_seconds(attempts, config, rng) for _ in range(50)]
        assert all(ceiling / 2 <= delay <= ceiling for delay in delays)
        assert len(set(delays)) > 1  # jitter


def test_worker_prunes_expired_keys_and_old_finished_tasks(db, database_url, servers):
    db.execute("INSERT INTO idempotency_keys (scope, key, fingerprint, response_status, response_body,"
               " expires_at) VALUES ('s', 'old', repeat('0', 64), 201, '{}', now() - interval '1 s'),"
               " ('s', 'fresh', repeat('0', 64), 201, '{}', now() + interval '1 h')")
    db.execute("INSERT INTO outbox (topic, payload, status, finished_at) VALUES"
               " ('x', '{}', 'done', now() - interval '8 days'), ('x', '{}', 'done', now()),"
               " ('x', '{}', 'dead', now() - interval '8 days')")
    config = make_config(database_url, "", worker_prune_interval_seconds=0)
    pool = create_pool(config.replace(pool_size_min=1, pool_size_max=1))
    try:
        Worker(config, pool)._prune_when_due()
    finally:
        pool.close()
    assert [r["key"] for r in db.execute("SELECT key FROM idempotency_keys").fetchall()] == ["fresh"]
    left = db.execute("SELECT status FROM outbox ORDER BY id").fetchall()
    assert [r["status"] for r in left] == ["done", "dead"]  # dead tasks wait for an operator


def test_workers_keep_the_health_audit_fresh(db, database_url, client):
    """/health then only reads the audit: a worker advances it in the background."""
    world = create_system_account(db)
    api = Api(client)
    api.ok_transfer(world, api.create_account(), 10)
    assert db.execute("SELECT checkpoint_entry_id FROM audit_state").fetchone()["checkpoint_entry_id"] == 0
    config = make_config(database_url, "", audit_max_age_ms=0)
    pool = create_pool(config.replace(pool_size_min=1, pool_size_max=1))
    try:
        worker = Worker(config, pool)
        for _ in range(3):  # the first step records the horizon, a later one passes it
            worker._last_audit = 0.0
            worker._audit_when_due()
    finally:
        pool.close()
    state = db.execute("SELECT checkpoint_entry_id, audited_at FROM audit_state").fetchone()
    assert state["checkpoint_entry_id"] >= 2 and state["audited_at"] is not None
    assert client.get("/health").get_json()["unaudited_entries"] == 0


def test_a_batch_of_events_alone_counts_as_work_done(db, database_url):
    """run_once reports what it claimed, so a worker draining a backlog of
    events with no subscriber goes straight on rather than waiting to be woken
    (a fan-out to nobody queues nothing and so notifies nobody)."""
    db.execute("INSERT INTO outbox (topic, payload) "
               "SELECT 'transfer.posted', '{}' FROM generate_series(1, 5)")
    config = make_config(database_url, "")
    pool = create_pool(config.replace(pool_size_min=1, pool_size_max=1))
    try:
        assert Worker(config, pool).run_once() == 5
    finally:
        pool.close()
    statuses = [row["status"] for row in db.execute("SELECT status FROM outbox")]
    assert statuses == ["done"] * 5


def test_outbox_cli_stats_list_and_retry_dead(db, database_url):
    db.execute("INSERT INTO outbox (topic, payload, status, attempts, last_error, finished_at) VALUES"
               " ('webhook.deliver', '{}', 'dead', 10, 'endpoint answered 500', now())")
    runner = CliRunner()
    environ = {"PAYFLOW_DATABASE_URL": database_url}
    stats = runner.invoke(main, ["outbox", "stats"], env=environ)
    assert stats.exit_code == 0, stats.output
    assert json.loads(stats.stdout)["dead"] == 1
    listed = runner.invoke(main, ["outbox", "list"], env=environ)
    assert "endpoint answered 500" in listed.stdout
    retried = runner.invoke(main, ["outbox", "retry-dead"], env=environ)
    assert retried.exit_code == 0 and "1 task(s)" in retried.output
    row = db.execute("SELECT status, attempts FROM outbox").fetchone()
    assert row == {"status": "pending", "attempts": 0}
