"""Workers as real subprocesses: several drain one queue with every effect
executed once; a SIGKILLed worker's tasks come back after the lease; a
SIGTERMed one exits cleanly, handing back its batch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psycopg
import pytest
from psycopg.rows import dict_row

from payflow import embedded
from payflow.runner import CHECKOUT
from tests.helpers import assert_ledger_consistent, create_system_account

DRAIN_TIMEOUT_SECONDS = 240


class Workers:
    def __init__(self, database_url: str, log_dir, **settings) -> None:
        self.environ = {key: value for key, value in os.environ.items() if not key.startswith("PAYFLOW_")}
        self.environ.update({"PAYFLOW_DATABASE_URL": database_url, "PAYFLOW_REDIS_URL": "",
                             "PAYFLOW_OUTBOX_BACKOFF_BASE_SECONDS": "0.01",
                             **{f"PAYFLOW_{name.upper()}": str(value) for name, value in settings.items()}})
        self.log_dir, self.processes = log_dir, []

    def start(self, count: int = 1) -> list[subprocess.Popen]:
        started = []
        for _ in range(count):
            log = open(self.log_dir / f"worker-{len(self.processes)}.log", "wb")
            process = subprocess.Popen([sys.executable, "-m", "payflow", "worker"], cwd=CHECKOUT,
                                       env=self.environ, stdout=log, stderr=subprocess.STDOUT,
                                       preexec_fn=embedded.parent_death_signal(signal.SIGKILL))
            log.close()
            self.processes.append(process)
            started.append(process)
        return started

    def stop_all(self) -> list[int]:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        return [process.wait(timeout=60) for process in self.processes]


@pytest.fixture
def workers(database_url, tmp_path):
    made = []

    def make(**settings) -> Workers:
        made.append(Workers(database_url, tmp_path, **settings))
        return made[-1]

    yield make
    for group in made:
        group.stop_all()


@pytest.fixture
def db_rows(database_url):
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        yield conn


def queue_payouts(db, count: int, amount: int = 1) -> str:
    """`count` payouts of one funded account, created in one statement."""
    world = create_system_account(db)
    account = db.execute("SELECT (payflow_create_account_v1('s', NULL, NULL, 60, 'payee', 'USD', 0,"
                         " false)).body::jsonb ->> 'id' AS id").fetchone()["id"]
    db.execute("SELECT payflow_post_transfer_v1('s', NULL, NULL, 60, 'transfer', %s, %s, %s, NULL,"
               " NULL, NULL)", (world, account, count * amount))
    db.execute("SELECT payflow_create_payout_v1('s', NULL, NULL, 60, %s, %s, NULL, '{\"iban\": \"x\"}')"
               " FROM generate_series(1, %s)", (account, amount, count))
    return account


def wait_drained(db, timeout_seconds: float = DRAIN_TIMEOUT_SECONDS) -> None:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        left = db.execute("SELECT count(*) AS n FROM outbox WHERE status IN ('pending', 'running')"
                          ).fetchone()["n"]
        if left == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"{left} tasks still pending or running")


def assert_each_payout_paid_once(db, count: int, no_reruns: bool = False) -> None:
    """Every payout succeeded and the provider paid it once. With no_reruns
    (no worker crashed), no payout's task ran again after the provider paid:
    exactly one call per key was answered 'paid'."""
    statuses = db.execute("SELECT status, count(*) AS n FROM payouts GROUP BY status").fetchall()
    assert statuses == [{"status": "succeeded", "n": count}]
    paid = db.execute("SELECT count(*) AS payments, count(DISTINCT payout_id) AS payouts "
                      "FROM simulated_provider_payouts").fetchone()
    assert paid == {"payments": count, "payouts": count}
    unpaid = db.execute("SELECT count(*) AS n FROM payouts p WHERE NOT EXISTS (SELECT 1 FROM "
                        "simulated_provider_payouts s WHERE s.payout_id = p.id)").fetchone()["n"]
    assert unpaid == 0
    assert db.execute("SELECT count(*) AS n FROM outbox WHERE status = 'dead'").fetchone()["n"] == 0
    if no_reruns:
        rerun = db.execute("SELECT count(*) AS n FROM (SELECT idempotency_key FROM simulated_provider_calls"
                           " WHERE outcome = 'paid' GROUP BY 1 HAVING count(*) > 1) twice").fetchone()["n"]
        assert rerun == 0


def test_four_workers_drain_5000_payouts_each_paid_exactly_once(workers, db_rows, database_url):
    """With 10% of provider calls failing (retryable): every payout is paid
    exactly once, and no task ran twice after its payment."""
    queue_payouts(db_rows, 5000)
    group = workers(worker_batch_size_max=50, simulated_failure_rate=0.1, simulated_seed=7,
                    outbox_backoff_cap_seconds=0.2)
    group.start(4)
    wait_drained(db_rows)
    assert group.stop_all() == [0, 0, 0, 0]
    assert_each_payout_paid_once(db_rows, 5000, no_reruns=True)
    rows = db_rows.execute("SELECT outcome, count(*) AS n FROM simulated_provider_calls GROUP BY 1"
                           ).fetchall()
    outcomes = {row["outcome"]: row["n"] for row in rows}
    assert outcomes["paid"] == 5000 and outcomes["retryable"] > 100  # the failures did happen
    assert_ledger_consistent(database_url)


def test_a_sigkilled_workers_tasks_are_reclaimed_after_the_lease(workers, db_rows, database_url):
    queue_payouts(db_rows, 40)
    group = workers(worker_batch_size_max=20, worker_lease_seconds=2, simulated_latency_ms=100)
    (victim,) = group.start(1)
    deadline = time.monotonic() + 60
    while db_rows.execute("SELECT count(*) AS n FROM payouts WHERE status = 'succeeded'"
                          ).fetchone()["n"] < 3:
        assert time.monotonic() < deadline, "the worker made no progress"
        time.sleep(0.05)
    victim.kill()
    victim.wait()
    held = db_rows.execute("SELECT count(*) AS n FROM outbox WHERE status = 'running'").fetchone()["n"]
    assert held > 0, "the killed worker held no claimed tasks"
    group.start(1)
    wait_drained(db_rows)
    assert_each_payout_paid_once(db_rows, 40)
    reclaimed = db_rows.execute("SELECT count(*) AS n FROM outbox WHERE topic = 'payout.requested' "
                                "AND attempts > 1").fetchone()["n"]
    assert reclaimed > 0
    assert_ledger_consistent(database_url)


def test_a_sigtermed_worker_exits_cleanly_and_hands_its_batch_back(workers, db_rows):
    queue_payouts(db_rows, 30)
    group = workers(worker_batch_size_max=30, simulated_latency_ms=200)
    (worker,) = group.start(1)
    deadline = time.monotonic() + 60
    while db_rows.execute("SELECT count(*) AS n FROM outbox WHERE status = 'running'").fetchone()["n"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    worker.terminate()
    assert worker.wait(timeout=10) == 0
    rows = db_rows.execute("SELECT status, count(*) AS n FROM outbox WHERE topic = 'payout.requested' "
                           "GROUP BY status").fetchall()
    counts = {row["status"]: row["n"] for row in rows}
    assert "running" not in counts and counts.get("pending", 0) > 0, counts
    processing = db_rows.execute("SELECT count(*) AS n FROM payouts WHERE status = 'processing'"
                                 ).fetchone()["n"]
    assert processing == 0  # the task at hand was finished, not abandoned


def test_workers_ride_out_a_database_restart(test_home, tmp_path):
    """PostgreSQL stops mid-drain and comes back on the same port: the workers
    pause, reconnect (LISTEN included) and finish every payout exactly once."""
    from payflow import migrations

    server = embedded.EmbeddedPostgres(test_home / f"restart-{os.getpid()}" / "data", durable=False)
    server.start()
    try:
        migrations.migrate(server.url)
        with psycopg.connect(server.url, autocommit=True, row_factory=dict_row) as db:
            queue_payouts(db, 1000)
        group = Workers(server.url, tmp_path, worker_batch_size_max=10, simulated_latency_ms=5)
        group.start(2)
        time.sleep(1.0)
        with psycopg.connect(server.url, autocommit=True, row_factory=dict_row) as db:
            assert wait_for_progress(db) > 0, "the outage must hit mid-drain"
        server.stop()
        time.sleep(1.5)
        server.start()  # same data folder, same port
        with psycopg.connect(server.url, autocommit=True, row_factory=dict_row) as db:
            wait_drained(db)
            assert group.stop_all() == [0, 0]
            assert_each_payout_paid_once(db, 1000)
        assert_ledger_consistent(server.url)
        logs = "".join(path.read_text() for path in tmp_path.glob("worker-*.log"))
        assert "database unavailable" in logs  # the restart was seen, and survived
    finally:
        server.stop()


def wait_for_progress(db) -> int:
    """Waits until some payouts succeeded; returns how many tasks are still to run."""
    deadline = time.monotonic() + 60
    while db.execute("SELECT count(*) AS n FROM payouts WHERE status = 'succeeded'").fetchone()["n"] < 10:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return db.execute("SELECT count(*) AS n FROM outbox WHERE status IN ('pending', 'running')"
                      ).fetchone()["n"]


def test_a_poll_only_worker_drains_too(workers, db_rows):
    """worker_listen=false (PgBouncer in transaction mode breaks LISTEN)."""
    queue_payouts(db_rows, 20)
    group = workers(worker_listen="false", worker_poll_interval_seconds=0.1)
    group.start(1)
    wait_drained(db_rows, timeout_seconds=60)
    assert group.stop_all() == [0]
    assert_each_payout_paid_once(db_rows, 20)
