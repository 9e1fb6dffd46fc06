"""Outbox benchmarks: drain throughput with 1/2/4 workers (noop effects), and
wake-up latency from commit to task start with idle workers (LISTEN/NOTIFY).

    python -m bench.outbox [--tasks N] [--payouts N] [--wakeups N] [--workers 1 2 4] [--smoke]

Starts its own durable PostgreSQL (fsync on), so numbers are comparable from
run to run on one machine; only ratios measured in the same run count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg

from bench.processes import peak_rss_mib
from bench.transfers import durable_servers
from payflow import embedded

CHECKOUT = Path(__file__).resolve().parent.parent
RESULTS = CHECKOUT / "bench" / "results"
PAYOUTS_PER_TRANSACTION = 500


def start_workers(database_url: str, count: int, log_dir: Path) -> list[subprocess.Popen]:
    environ = {key: value for key, value in os.environ.items() if not key.startswith("PAYFLOW_")}
    environ.update({"PAYFLOW_DATABASE_URL": database_url, "PAYFLOW_REDIS_URL": "",
                    "PAYFLOW_PAYOUT_PROVIDER": "noop", "PAYFLOW_WORKER_BATCH_SIZE_MAX": "100",
                    "PAYFLOW_WORKER_POLL_INTERVAL_SECONDS": "5"})  # wake-ups must come from NOTIFY
    processes = []
    for index in range(count):
        with open(log_dir / f"worker-{index}.log", "ab") as log:
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "payflow", "worker"], cwd=CHECKOUT, env=environ,
                stdout=log, stderr=subprocess.STDOUT, preexec_fn=embedded.parent_death_signal()))
    return processes


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.send_signal(signal.SIGTERM)
    for process in processes:
        process.wait(timeout=60)


def left(conn) -> int:
    return conn.execute("SELECT count(*) FROM outbox WHERE status IN ('pending', 'running')").fetchone()[0]


def queue_events(conn, tasks: int) -> None:
    """Event tasks with no webhook endpoint: the worker's cheapest real path."""
    conn.execute("INSERT INTO outbox (topic, payload) SELECT 'transfer.posted', '{}' "
                 "FROM generate_series(1, %s)", (tasks,))


def queue_payouts(conn, tasks: int) -> None:
    """Real payouts (money to the clearing account, a payout.requested task),
    paid by the no-op provider: each ends in its own ledger transaction."""
    world = conn.execute("SELECT payflow_system_account_v1('world', 'USD')").fetchone()[0]
    account = conn.execute("INSERT INTO accounts (name, currency, overdraft_limit) "
                           "VALUES ('bench payouts', 'USD', 0) RETURNING id").fetchone()[0]
    run = uuid.uuid4().hex  # fresh idempotency keys for every drain
    conn.execute("SELECT payflow_post_transfer_v1('bench', %s, repeat('0', 64), 86400, 'transfer',"
                 " %s, %s, %s, NULL, NULL, '{}')", (f"fund-{run}", world, account, tasks))
    for start in range(0, tasks, PAYOUTS_PER_TRANSACTION):  # short transactions: see the README
        with conn.transaction():
            conn.execute("SELECT payflow_create_payout_v1('bench', %s || n, repeat('0', 64), 86400,"
                         " %s, 1, 'USD', '{\"iban\": \"bench\"}') FROM generate_series(%s::int, %s::int) n",
                         (f"payout-{run}-", account, start + 1, min(start + PAYOUTS_PER_TRANSACTION, tasks)))


def drain(database_url: str, tasks: int, workers: int, log_dir: Path, kind: str = "events") -> dict:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("TRUNCATE outbox")
        (queue_payouts if kind == "payouts" else queue_events)(conn, tasks)
        conn.execute("VACUUM ANALYZE outbox")
        started = time.perf_counter()
        processes = start_workers(database_url, workers, log_dir)
        while left(conn):
            time.sleep(0.05)
        elapsed = time.perf_counter() - started
        rss = [peak_rss_mib(process.pid) for process in processes]
        stop(processes)
    return {"scenario": f"outbox-drain-{kind}", "workers": workers, "tasks": tasks,
            "seconds": round(elapsed, 3), "tasks_per_second": round(tasks / elapsed, 1),
            "worker_peak_rss_mib": rss}


def wakeup(database_url: str, count: int, workers: int, log_dir: Path) -> dict:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("TRUNCATE outbox")
        processes = start_workers(database_url, workers, log_dir)
        time.sleep(2)  # idle, listening
        for _ in range(count):
            conn.execute("INSERT INTO outbox (topic, payload) VALUES ('transfer.posted', '{}')")
            time.sleep(0.05)
        while left(conn):
            time.sleep(0.05)
        latencies = [float(row[0]) for row in conn.execute(
            "SELECT extract(epoch FROM started_at - created_at) * 1000 FROM outbox").fetchall()]
        stop(processes)
    latencies.sort()
    return {"scenario": "outbox-wakeup", "workers": workers, "tasks": count,
            "p50_ms": round(statistics.median(latencies), 2),
            "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1], 2),
            "max_ms": round(latencies[-1], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--payouts", type=int, default=20_000)
    parser.add_argument("--wakeups", type=int, default=200)
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument("--smoke", action="store_true", help="tiny scale, no results file")
    args = parser.parse_args()
    if args.smoke:
        args.tasks, args.payouts, args.wakeups, args.workers = 500, 200, 10, [1, 2]

    with durable_servers(redis=False) as (home, servers):
        url = servers.postgres.url
        rows = [drain(url, args.tasks, workers, home) for workers in args.workers]
        rows += [drain(url, args.payouts, workers, home, kind="payouts") for workers in args.workers]
        rows.append(wakeup(url, args.wakeups, 2, home))
    for row in rows:
        print("  ".join(f"{key}={value}" for key, value in row.items()))
    if args.smoke:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {"machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform()},
              "postgres": "embedded, durable (fsync on)", "results": rows}
    (RESULTS / "outbox.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
