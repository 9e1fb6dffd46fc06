"""The `payflow` command."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click

from payflow import runner


@click.group()
def main() -> None:
    """payflow: a double-entry payment ledger."""


@main.group()
def db() -> None:
    """The database: migrations and a shell."""


@db.command("migrate")
def db_migrate() -> None:
    """Apply pending migrations from sql/migrations."""
    from payflow import migrations

    with runner.server_environment(need_redis=False) as environ:
        applied = migrations.migrate(environ["PAYFLOW_DATABASE_URL"])
    for migration in applied:
        click.echo(f"applied {migration.version:04d}_{migration.name}")
    click.echo("database is up to date")


@db.command("status")
def db_status() -> None:
    """List migrations and whether each is applied."""
    from payflow import migrations

    with runner.server_environment(need_redis=False) as environ:
        for migration, done in migrations.status(environ["PAYFLOW_DATABASE_URL"]):
            mark = "applied" if done else "pending"
            click.echo(f"{migration.version:04d}_{migration.name}  {mark}")


@db.command("shell")
def db_shell() -> None:
    """psql on the database payflow uses (embedded or PAYFLOW_DATABASE_URL)."""
    from payflow import embedded

    psql = str(embedded.postgres_bin_dir() / "psql")
    with runner.server_environment(need_redis=False) as environ:
        url = environ["PAYFLOW_DATABASE_URL"]
        # A child, not exec: servers started for this shell alone stop when it ends.
        code = subprocess.call([psql, url])
    sys.exit(code)


@db.command("url")
def db_url() -> None:
    """Print the database URL of the running service."""
    with runner.server_environment(need_redis=False) as environ:
        click.echo(environ["PAYFLOW_DATABASE_URL"])


@main.command()
def seed() -> None:
    """Create demo accounts funded from a system account (idempotent)."""
    from payflow import migrations
    from payflow import seed as seeding
    from payflow.config import Config

    with runner.server_environment(need_redis=False) as environ:
        migrations.migrate(environ["PAYFLOW_DATABASE_URL"])
        for account in seeding.seed(Config.load(environ=environ)):
            click.echo(f"{account.name:<10} {account.currency}  {account.id}  balance {account.balance}")


@main.command()
def run() -> None:
    """Start everything (`make run`): servers, migrations, demo data, the API."""
    sys.exit(runner.run_service())


@main.command()
def serve() -> None:
    """Serve the API with gunicorn (needs PAYFLOW_DATABASE_URL)."""
    gunicorn_conf = str(runner.CHECKOUT / "gunicorn.conf.py")
    os.execv(sys.executable, [sys.executable, "-m", "gunicorn", "-c", gunicorn_conf,
                              "payflow.app:create_app()"])


def _database(environ):
    """A connection with the API pool's session settings (UTC, timeouts)."""
    import psycopg
    from psycopg.rows import dict_row

    from payflow.config import Config
    from payflow.db import CONNECT_TIMEOUT_SECONDS, connection_options

    return psycopg.connect(environ["PAYFLOW_DATABASE_URL"], autocommit=True, row_factory=dict_row,
                           options=connection_options(Config.load(environ=environ)),
                           connect_timeout=CONNECT_TIMEOUT_SECONDS)


@main.group()
def keys() -> None:
    """API keys: create (the secret is printed once), list, revoke."""


@keys.command("create")
@click.option("--name", required=True)
@click.option("--scope", "scopes", multiple=True, required=True,
              type=click.Choice(["read", "transfers:write", "admin"]),
              help="Repeat for several scopes.")
def keys_create(name: str, scopes: tuple[str, ...]) -> None:
    """Create a key; its secret is shown now and never again."""
    from payflow import apikeys

    with runner.server_environment(need_redis=False) as environ, _database(environ) as conn:
        key_id, secret = apikeys.create(conn, name, list(scopes))
    click.echo(f"id:     {key_id}\nsecret: {secret}\n(store the secret now: only its hash is kept)")


@keys.command("list")
def keys_list() -> None:
    """Every key: id, name, scopes, prefix, created, revoked."""
    from payflow import apikeys

    with runner.server_environment(need_redis=False) as environ, _database(environ) as conn:
        for key in apikeys.list_keys(conn):
            click.echo(json.dumps(key, default=str))


# Revocations are rare: the mark outlives any key cache TTL an API process may use.
REVOCATION_MARK_MS = 24 * 3600 * 1000


@keys.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    """Revoke a key; it stops working at once."""
    import uuid

    from payflow import apikeys
    from payflow.config import Config
    from payflow.idempotency import RedisGuard

    with runner.server_environment(need_redis=False) as environ:
        with _database(environ) as conn:
            revoked = apikeys.revoke(conn, key_id)
        if revoked is None:
            click.echo("no key with this id")
            sys.exit(1)
        # API processes cache live keys; the mark in Redis reaches them at once
        # (again, for a key revoked already: a first attempt may not have).
        config = Config.load(environ=environ)
        guard = RedisGuard(config)
        told = guard.mark_revoked(str(uuid.UUID(key_id)), keep_ms=REVOCATION_MARK_MS)
        guard.close()
    click.echo(revoked if told else
               f"{revoked} (Redis not reachable: API processes stop accepting it within "
               f"{config.api_key_cache_seconds:g} s)")


@main.command()
def worker() -> None:
    """Run an outbox worker (payouts, webhooks) until SIGTERM; start as many as you like."""
    from payflow.config import Config
    from payflow.worker import run_worker

    with runner.server_environment(need_redis=False) as environ:
        run_worker(Config.load(environ=environ))


@main.group()
def outbox() -> None:
    """The outbox task queue."""


@outbox.command("stats")
def outbox_stats() -> None:
    """Counts by status and topic, oldest pending age, dead tasks."""
    from payflow import outbox as queue

    with runner.server_environment(need_redis=False) as environ, _database(environ) as conn:
        click.echo(json.dumps(queue.stats(conn), indent=2))


@outbox.command("list")
@click.option("--status", type=click.Choice(["pending", "running", "done", "dead"]), default="dead")
@click.option("--limit", type=click.IntRange(1, 1000), default=20)
def outbox_list(status: str, limit: int) -> None:
    """The newest tasks of one status (dead by default), with their last error."""
    from payflow import outbox as queue

    with runner.server_environment(need_redis=False) as environ, _database(environ) as conn:
        for task in queue.list_tasks(conn, status, limit):
            click.echo(json.dumps(task, default=str))


@outbox.command("retry-dead")
@click.option("--id", "task_id", type=int, default=None, help="Only this task.")
def outbox_retry_dead(task_id: int | None) -> None:
    """Put dead tasks back in the queue, attempts reset."""
    from payflow import outbox as queue

    with runner.server_environment(need_redis=False) as environ, _database(environ) as conn:
        ids = queue.retry_dead(conn, task_id)
    click.echo(f"{len(ids)} task(s) queued again: {ids}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--rebuild", is_flag=True,
              help="Then, if the ledger is sound, start /health's incremental audit over "
                   "(clears the problems it reported).")
def audit(as_json: bool, rebuild: bool) -> None:
    """Full audit: entries sum to zero per currency; every balance equals its
    entries; every entry continues its account's chain. Exit 1 on any problem."""
    from payflow import audit as auditing

    with runner.server_environment(need_redis=False) as environ:
        report = auditing.full_audit(environ["PAYFLOW_DATABASE_URL"])
        if rebuild and report.ok:
            auditing.rebuild(environ["PAYFLOW_DATABASE_URL"])
    if as_json:
        click.echo(json.dumps(report.__dict__ | {"ok": report.ok}, default=str, indent=2))
    else:
        for row in report.currency_sums:
            click.echo(f"{row['currency']}: {row['entries']} entries, sum {row['entries_sum']}")
        for row in report.balance_mismatches:
            click.echo(f"BALANCE MISMATCH account {row['id']} ({row['name']}): "
                       f"balance {row['balance']} but entries sum to {row['entries_sum']}")
        for row in report.broken_chains:
            click.echo(f"CHAIN BROKEN account {row['account_id']} at entry {row['entry_id']}: "
                       f"balance_after {row['balance_after']}, expected {row['expected_balance']}; "
                       f"version {row['account_version']}, expected {row['expected_version']}")
        click.echo("ledger OK" if report.ok else "ledger has problems")
    sys.exit(0 if report.ok else 1)


def _fail(error) -> None:
    """A refused command: its message, details and cause on stderr, exit 1."""
    click.echo(f"error: {error.message}", err=True)
    if error.details:
        click.echo(json.dumps(error.details, indent=2, default=str), err=True)
    if error.__cause__ is not None:
        click.echo(f"cause: {error.__cause__}", err=True)
    sys.exit(1)


@contextlib.contextmanager
def _failures_reported() -> Iterator[None]:
    """Refusals and database errors (down, timeouts, refused input) end the
    command with a message on stderr and exit 1, never a traceback."""
    from payflow import errors
    from payflow.db import wrap_errors

    try:
        with wrap_errors():
            yield
    except errors.ApiError as error:
        _fail(error)


@main.group()
def settlements() -> None:
    """Settlement files from the bank or payout provider."""


@settlements.command("import")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--format", "file_format", type=click.Choice(["csv", "json"]), default=None,
              help="Default: the file's extension.")
@click.option("--source", default=None,
              help="Who sent the file (references are unique per source); default: a JSON "
                   "file's own, else 'bank'.")
def settlements_import(path: Path, file_format: str | None, source: str | None) -> None:
    """Import a CSV or JSON settlement file; importing it again changes nothing."""
    from payflow import settlements as settling
    from payflow.config import Config

    with _failures_reported():
        batch = settling.load_batch(settling.read_file(path, file_format, source))
        with runner.server_environment(need_redis=False) as environ, _database(environ) as conn:
            result = settling.import_batch(conn, Config.load(environ=environ), batch, imported_by=None)
    click.echo(f"{result['records']} records from {result['source']}: {result['inserted']} inserted, "
               f"{result['already_present']} already present")


@main.command()
@click.option("--window-days", type=click.IntRange(1, None), default=None,
              help="Days a settlement may be from its payout's success "
                   "(default: PAYFLOW_RECONCILIATION_WINDOW_DAYS).")
@click.option("--as-of", default=None, help="An RFC 3339 moment, not in the future (default: now).")
@click.option("--since", default=None,
              help="An RFC 3339 moment: leave out the payouts that succeeded before it (and their "
                   "lines) and other lines dated before it (default: all history).")
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON.")
def reconcile(window_days: int | None, as_of: str | None, since: str | None, as_json: bool) -> None:
    """Match settlements to succeeded payouts; print the counts per class and
    the totals. GET /v1/reconciliations/<id> lists the exceptions."""
    from payflow import reconciliation, schemas
    from payflow.config import Config

    given = {name: value for name, value in
             (("window_days", window_days), ("as_of", as_of), ("since", since)) if value is not None}
    with _failures_reported():
        parameters = schemas.load(schemas.ReconciliationCreateSchema(), given)
        with runner.server_environment(need_redis=False) as environ, _database(environ) as conn:
            run_id = reconciliation.run(conn, Config.load(environ=environ), created_by=None,
                                        **parameters)
            run = reconciliation.summary(conn, run_id)
    if as_json:
        click.echo(json.dumps(run, indent=2))
        return
    since_text = f" since {run['since']}" if run["since"] else ""
    click.echo(f"reconciliation {run['id']} as of {run['as_of']}{since_text}, window "
               f"{run['window_days']} days: {run['status']}")
    for code in ("matched", "pending", *schemas.EXCEPTION_CODES):
        click.echo(f"  {code:<22} {run['counts'][code]:>9}")
    for total in run["totals"]:
        click.echo(f"  {total['currency']}: expected {total['expected_amount']}, settled "
                   f"{total['settled_amount']}, difference {total['difference']}")
    click.echo(f"{run['exceptions_open']} open exceptions, {run['exceptions_resolved_earlier']} more "
               f"resolved in earlier runs: GET /v1/reconciliations/{run['id']}")
