"""Which servers a command talks to, and the `make run` supervisor.

Order of precedence: PAYFLOW_DATABASE_URL / PAYFLOW_REDIS_URL from the
environment; else the embedded servers of a live `make run` (found through
`<home>/servers.json`); else embedded servers started for this command alone,
on the same data folder, and stopped when it ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from payflow import embedded

CHECKOUT = Path(__file__).resolve().parent.parent
GUNICORN_START_TIMEOUT_SECONDS = 60
GUNICORN_STOP_TIMEOUT_SECONDS = 40


def home() -> Path:
    configured = os.environ.get("PAYFLOW_HOME")
    return Path(configured).resolve() if configured else embedded.default_home(CHECKOUT)


def _wanted(environ) -> tuple[bool, bool]:
    return not environ.get("PAYFLOW_DATABASE_URL"), not environ.get("PAYFLOW_REDIS_URL")


@contextlib.contextmanager
def server_environment(need_redis: bool = True) -> Iterator[dict[str, str]]:
    """Yields PAYFLOW_* URLs to use, starting embedded servers if none are given."""
    environ = dict(os.environ)
    want_postgres, want_redis = _wanted(environ)
    want_redis = want_redis and need_redis
    if not (want_postgres or want_redis):
        yield environ
        return
    running = embedded.running_servers(home())
    if running:
        yield {**running, **{k: v for k, v in environ.items() if k.startswith("PAYFLOW_") and v}}
        return
    with embedded.stop_on_signals(), embedded.EmbeddedServers(
        home(), durable=True, postgres=want_postgres, redis=want_redis
    ) as servers:
        yield {**environ, **servers.environment()}


def run_service(seed_demo: bool = True) -> int:
    """`make run`: servers, migrations, demo data, then gunicorn and one outbox
    worker until Ctrl-C/SIGTERM."""
    from payflow import migrations, seed
    from payflow.config import Config

    if embedded.running_servers(home()) and any(_wanted(os.environ)):
        print(f"payflow is already running with the data in {home()}", file=sys.stderr)
        return 1
    config = Config.load()
    if not _port_free(config.host, config.port):
        print(f"{config.host}:{config.port} is in use; set PAYFLOW_PORT to another port",
              file=sys.stderr)
        return 1
    with server_environment() as environ:
        database_url = environ["PAYFLOW_DATABASE_URL"]
        migrations.migrate(database_url)
        accounts = seed.seed(Config.load(environ=environ)) if seed_demo else []
        config = Config.load(environ=environ)
        api_key = _dev_api_key(database_url)
        gunicorn = _child([sys.executable, "-m", "gunicorn", "-c", str(CHECKOUT / "gunicorn.conf.py"),
                           "payflow.app:create_app()"], environ)
        worker = _child([sys.executable, "-m", "payflow", "worker"], environ)
        try:
            if not _wait_listening(gunicorn, config.host, config.port):
                return gunicorn.wait()
            _print_welcome(config, database_url, accounts, api_key)
            return gunicorn.wait()
        except KeyboardInterrupt:
            print("\nstopping payflow (in-flight requests finish first)...", file=sys.stderr)
            return 0
        finally:
            _stop_gracefully(worker)
            _stop_gracefully(gunicorn)


def _child(command: list[str], environ: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        command, env=environ, cwd=CHECKOUT,
        # Its own session: Ctrl-C reaches us only, and we stop it gracefully.
        start_new_session=True,
        preexec_fn=embedded.parent_death_signal(),
    )


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _wait_listening(process: subprocess.Popen, host: str, port: int) -> bool:
    """True once the API accepts connections (the printed curl commands work
    at once); False if gunicorn exited instead."""
    deadline = time.monotonic() + GUNICORN_START_TIMEOUT_SECONDS
    while process.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return True
        time.sleep(0.05)
    return process.poll() is None


def _stop_gracefully(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)  # graceful: in-flight work finishes
        try:
            process.wait(timeout=GUNICORN_STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _dev_api_key(database_url: str) -> str:
    """The admin key `make run` prints, kept (0600) in the data folder and
    reused while it still works; a new one when it does not."""
    import psycopg
    from psycopg.rows import dict_row

    from payflow import apikeys

    path = home() / "dev-api-key"
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        if path.exists() and apikeys.authenticate(conn, path.read_text().strip()):
            return path.read_text().strip()
        _, secret = apikeys.create(conn, "make run (dev)", ["admin"])
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(secret)
    return secret


def _print_welcome(config, database_url: str, accounts, api_key: str) -> None:
    base = f"http://{config.host}:{config.port}"
    print(f"\npayflow is serving on {base}  (database: {database_url}, data: {home()})")
    print(f"\nAPI key (admin, for this machine only): {api_key}")
    if accounts:
        print("\nAccounts:")
        for account in accounts:
            print(f"  {account.name:<10} {account.currency}  {account.id}  balance {account.balance}")
        source = next(a for a in accounts if a.name == "Alice")
        target = next(a for a in accounts if a.name == "Bob")
        print(f"""
Try:
  export PAYFLOW_KEY={api_key}
  curl -X POST {base}/v1/transfers -H "Authorization: Bearer $PAYFLOW_KEY" \\
       -H 'Content-Type: application/json' -H 'X-Idempotency-Key: tx-101' \\
       -d '{{"from_account_id":"{source.id}","to_account_id":"{target.id}","amount":5000}}'
  curl -H "Authorization: Bearer $PAYFLOW_KEY" {base}/v1/accounts/{source.id}
  curl -H "Authorization: Bearer $PAYFLOW_KEY" {base}/v1/accounts/{source.id}/entries
  curl {base}/health
""")
    print("Ctrl-C stops everything.", flush=True)
