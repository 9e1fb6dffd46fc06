"""Audit benchmarks on a large ledger: `payflow audit` (the full scan) and
`/health` (the incremental audit) at 1M and 10M entries.

    python -m bench.audit [--entries 1000000 10000000] [--accounts N] [--health-calls N] [--smoke]

Starts its own durable PostgreSQL (fsync on) and Redis, seeds N accounts, then
grows the ledger to each entry count in bulk (set-based, yet a sound ledger:
balanced transfers, balance_after and version chains, balances), and for each:
  full audit       payflow audit's check, timed
  health catch-up  until the incremental audit (advanced by an outbox worker,
                   as in production) has caught up with a ledger it has never
                   seen (a bulk import; once)
  health latency   sequential GET /health over HTTP under gunicorn: p50/p99/max,
                   and of calls made a second apart
Writes bench/results/audit.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psycopg
from psycopg.rows import dict_row

from bench.transfers import api_environment, durable_servers, seed, start_api
from payflow import embedded
from payflow.audit import full_audit

CHECKOUT = Path(__file__).resolve().parent.parent
RESULTS = CHECKOUT / "bench" / "results"
TRANSFERS_PER_STATEMENT = 500_000  # bounded transition tables and WAL per statement
ADVANCING_CALLS = 10


def grow(conn, accounts: int, transfers: int) -> None:
    """`transfers` more transfers of 1 between seeded accounts, written in
    bulk with each account's chain continued (running sums over the new
    entries, in id order)."""
    done = 0
    while done < transfers:
        chunk = min(TRANSFERS_PER_STATEMENT, transfers - done)
        with conn.transaction():
            conn.execute("""
                CREATE TEMP TABLE grown ON COMMIT DROP AS
                SELECT g AS n, gen_random_uuid() AS transfer_id,
                       (SELECT id FROM bench_accounts b WHERE b.n = 1 + (g * 7919) %% %(a)s) AS src,
                       (SELECT id FROM bench_accounts b
                         WHERE b.n = 1 + (g * 7919 + 1 + g %% 97) %% %(a)s) AS dst
                  FROM generate_series(%(first)s::bigint, %(last)s::bigint) g""",
                         {"a": accounts, "first": done + 1, "last": done + chunk})
            conn.execute("INSERT INTO transfers (id, kind, from_account_id, to_account_id, amount, currency)"
                         " SELECT transfer_id, 'transfer', src, dst, 1, 'USD' FROM grown WHERE src <> dst")
            conn.execute("""
                INSERT INTO entries (transfer_id, account_id, amount, balance_after, account_version)
                SELECT e.transfer_id, e.account_id, e.amount,
                       a.balance + sum(e.amount) OVER w, a.version + row_number() OVER w
                  FROM (SELECT n, 0 AS side, transfer_id, src AS account_id, -1 AS amount FROM grown
                         WHERE src <> dst
                        UNION ALL
                        SELECT n, 1, transfer_id, dst, 1 FROM grown WHERE src <> dst) e
                  JOIN accounts a ON a.id = e.account_id
                WINDOW w AS (PARTITION BY e.account_id ORDER BY e.n, e.side)
                 ORDER BY e.n, e.side""")
            conn.execute("""
                UPDATE accounts a SET balance = a.balance + d.delta, version = a.version + d.entries
                  FROM (SELECT account_id, sum(amount) AS delta, count(*) AS entries
                          FROM (SELECT src AS account_id, -1 AS amount FROM grown WHERE src <> dst
                                UNION ALL SELECT dst, 1 FROM grown WHERE src <> dst) x
                         GROUP BY account_id) d
                 WHERE a.id = d.account_id""")
        done += chunk
    conn.execute("VACUUM ANALYZE")


def entry_count(conn) -> int:
    return conn.execute("SELECT count(*) AS n FROM entries").fetchone()["n"]


def get_health(port: int) -> tuple[int, dict, float]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    started = time.perf_counter()
    connection.request("GET", "/health")
    response = connection.getresponse()
    body = json.loads(response.read())
    elapsed_ms = (time.perf_counter() - started) * 1000
    connection.close()
    return response.status, body, elapsed_ms


def measure(url: str, port: int, entries: int, calls: int, advancing_calls: int) -> dict:
    started = time.perf_counter()
    report = full_audit(url)
    full_seconds = time.perf_counter() - started
    if not report.ok:
        raise RuntimeError(f"the grown ledger does not audit clean: {report}")
    started, catch_up_calls = time.perf_counter(), 0
    while True:
        status, body, _ = get_health(port)
        catch_up_calls += 1
        if status != 200:
            raise RuntimeError(f"/health answered {status}: {body}")
        if body["unaudited_entries"] == 0:
            break
    catch_up_seconds = time.perf_counter() - started
    latencies = []
    for _ in range(calls):
        status, body, elapsed_ms = get_health(port)
        if status != 200:
            raise RuntimeError(f"/health answered {status}: {body}")
        latencies.append(elapsed_ms)
        time.sleep(0.01)
    latencies.sort()
    # Calls a second apart: were no worker keeping the audit fresh, each would
    # find it older than audit_max_age_ms and advance it first.
    advancing = []
    for _ in range(advancing_calls):
        time.sleep(1.1)
        advancing.append(get_health(port)[2])
    return {"scenario": "audit", "entries": entries, "full_audit_seconds": round(full_seconds, 2),
            "health_catch_up_seconds": round(catch_up_seconds, 2), "health_catch_up_calls": catch_up_calls,
            "health_p50_ms": round(statistics.median(latencies), 2),
            "health_p99_ms": round(latencies[max(0, int(len(latencies) * 0.99) - 1)], 2),
            "health_max_ms": round(latencies[-1], 2),
            "health_advancing_p50_ms": round(statistics.median(advancing), 2),
            "health_advancing_max_ms": round(max(advancing), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, nargs="*", default=[1_000_000, 10_000_000])
    parser.add_argument("--accounts", type=int, default=100_000)
    parser.add_argument("--health-calls", type=int, default=300)
    parser.add_argument("--smoke", action="store_true", help="tiny scale, no results file")
    args = parser.parse_args()
    if args.smoke:
        args.entries, args.accounts, args.health_calls = [5_000], 500, 10

    rows = []
    with durable_servers() as (home, servers):
        url = servers.postgres.url
        port = embedded.free_port()
        environ = api_environment(servers, port)
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            seed(conn, args.accounts)
            api = start_api(environ, home / "gunicorn.log")
            # As in production, a worker keeps the audit fresh; /health reads it.
            with open(home / "worker.log", "ab") as log:
                worker = subprocess.Popen([sys.executable, "-m", "payflow", "worker"], cwd=CHECKOUT,
                                          env=environ, stdout=log, stderr=subprocess.STDOUT,
                                          preexec_fn=embedded.parent_death_signal())
            try:
                for target in sorted(args.entries):
                    missing = target - entry_count(conn)
                    if missing > 0:
                        started = time.perf_counter()
                        grow(conn, args.accounts, -(-missing // 2))
                        print(f"grew to {entry_count(conn):,} entries in "
                              f"{time.perf_counter() - started:.0f} s", flush=True)
                    rows.append(measure(url, port, entry_count(conn), args.health_calls,
                                        advancing_calls=2 if args.smoke else ADVANCING_CALLS))
                    print(rows[-1], flush=True)
            finally:
                for process in (api, worker):
                    process.terminate()
                    process.wait(timeout=60)
    if args.smoke:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {"machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform()},
              "postgres": "embedded, durable (fsync on)", "accounts": args.accounts, "results": rows}
    (RESULTS / "audit.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
