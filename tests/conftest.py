"""Shared fixtures: one embedded PostgreSQL + Redis per test session; each test
that writes gets a fresh database copied from a migrated template (fast and
isolated), and its own Redis key prefix.

Set PAYFLOW_TEST_DATABASE_URL (a superuser URL; databases are created next to
it) and PAYFLOW_TEST_REDIS_URL to use servers of your own instead.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import psycopg
import pytest
from flask.testing import FlaskClient
from werkzeug.datastructures import Headers

from payflow import embedded, migrations
from payflow.app import create_app
from payflow.config import Config

TEMPLATE_DATABASE = "payflow_template"
_HOME_PREFIX = "payflow-test-"
_counter = itertools.count()


def _sweep_stale_homes() -> None:
    """Remove the data of test sessions that died without cleaning up."""
    for path in Path(tempfile.gettempdir()).glob(f"{_HOME_PREFIX}*"):
        try:
            pid = int(path.name.removeprefix(_HOME_PREFIX).split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


@pytest.fixture(scope="session")
def test_home():
    _sweep_stale_homes()
    home = Path(tempfile.mkdtemp(prefix=f"{_HOME_PREFIX}{os.getpid()}-"))
    home.chmod(0o755)  # our own folder: the unprivileged server user must enter it
    yield home
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def servers(test_home):
    """URLs of the session's PostgreSQL (superuser) and Redis."""
    given_database = os.environ.get("PAYFLOW_TEST_DATABASE_URL")
    given_redis = os.environ.get("PAYFLOW_TEST_REDIS_URL")
    started = embedded.EmbeddedServers(
        test_home / "servers", durable=False,
        postgres=not given_database, redis=not given_redis,
    )
    started.start()
    try:
        environment = started.environment()
        yield {
            "database": given_database or environment["PAYFLOW_DATABASE_URL"],
            "redis": given_redis or environment["PAYFLOW_REDIS_URL"],
        }
    finally:
        started.stop()


def database_url_named(base_url: str, name: str) -> str:
    return base_url.rsplit("/", 1)[0] + "/" + name


def admin_connection(servers) -> psycopg.Connection:
    return psycopg.connect(database_url_named(servers["database"], "postgres"), autocommit=True)


@pytest.fixture(scope="session")
def template_database(servers) -> str:
    with admin_connection(servers) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE_DATABASE} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {TEMPLATE_DATABASE}")
    migrations.migrate(database_url_named(servers["database"], TEMPLATE_DATABASE))
    return TEMPLATE_DATABASE


def create_database(servers, template: str | None) -> str:
    name = f"payflow_test_{os.getpid()}_{next(_counter)}"
    with admin_connection(servers) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        suffix = f" TEMPLATE {template} STRATEGY FILE_COPY" if template else ""
        conn.execute(f"CREATE DATABASE {name}{suffix}")
    return database_url_named(servers["database"], name)


def drop_database(servers, url: str) -> None:
    with admin_connection(servers) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)")


@pytest.fixture
def database_url(servers, template_database):
    """A fresh, migrated database for this test alone."""
    url = create_database(servers, template_database)
    yield url
    drop_database(servers, url)


@pytest.fixture
def empty_database_url(servers):
    url = create_database(servers, None)
    yield url
    drop_database(servers, url)


@pytest.fixture
def db(database_url):
    """A direct connection to the test's database, for setup and assertions."""
    with psycopg.connect(database_url, autocommit=True, row_factory=psycopg.rows.dict_row) as conn:
        yield conn


def make_config(database_url: str, redis_url: str, **overrides) -> Config:
    return Config.load(
        {"database_url": database_url, "redis_url": redis_url,
         "redis_key_prefix": f"test-{uuid.uuid4().hex[:12]}", "audit_max_age_ms": 0,
         "pool_size_max": 16, "rate_limit_requests_per_minute": 0, **overrides},
        environ={},
    )


@pytest.fixture
def config(database_url, servers) -> Config:
    return make_config(database_url, servers["redis"])


class KeyedClient(FlaskClient):
    """Flask's test client, sending the app's test API key unless told otherwise."""

    def open(self, *args, **kwargs):
        api_key = self.application.config.get("TEST_API_KEY")
        headers = Headers(kwargs.pop("headers", None) or {})
        if headers.get("Authorization", "") is None or headers.get("Authorization") == "<none>":
            del headers["Authorization"]  # "<none>": send no Authorization header at all
        elif api_key and "Authorization" not in headers:
            headers["Authorization"] = f"Bearer {api_key}"
        return super().open(*args, headers=headers, **kwargs)


def new_api_key(database_url: str, scopes=("admin",), name: str = "test") -> tuple[str, str]:
    """(key id, secret) of a new API key in that database."""
    from psycopg.rows import dict_row

    from payflow import apikeys

    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        return apikeys.create(conn, name, list(scopes))


def make_app(config: Config, scopes=("admin",)):
    """create_app, plus an API key its test clients send."""
    app = create_app(config)
    app.testing = True
    app.test_client_class = KeyedClient
    app.config["TEST_API_KEY_ID"], app.config["TEST_API_KEY"] = new_api_key(config.database_url, scopes)
    return app


@pytest.fixture
def app(config):
    app = make_app(config)
    yield app
    app.extensions["payflow"].close()


@pytest.fixture
def client(app):
    return app.test_client()


class Gunicorn:
    """The API under gunicorn with its production settings, as a subprocess."""

    def __init__(self, database_url: str, redis_url: str, log_path: Path, **environment: str) -> None:
        import subprocess
        import sys

        from payflow.runner import CHECKOUT

        self.port = embedded.free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        environ = {**os.environ, "PAYFLOW_DATABASE_URL": database_url, "PAYFLOW_REDIS_URL": redis_url,
                   "PAYFLOW_PORT": str(self.port), "PAYFLOW_REDIS_KEY_PREFIX": uuid.uuid4().hex,
                   "PAYFLOW_AUDIT_MAX_AGE_MS": "0", "PAYFLOW_ACCESS_LOG": "", **environment}
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(CHECKOUT / "gunicorn.conf.py"),
             "payflow.app:create_app()"],
            env=environ, cwd=CHECKOUT, stdout=self._log, stderr=subprocess.STDOUT,
            preexec_fn=embedded.parent_death_signal(),
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        import time
        import urllib.request

        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.base_url + "/ready", timeout=1).read()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(self.log_path.read_text()) from None
                time.sleep(0.1)

    def stop(self) -> int:
        self.process.terminate()
        code = self.process.wait(timeout=40)
        self._log.close()
        return code


@pytest.fixture(scope="session")
def live_server(servers, template_database, test_home):
    """One gunicorn for the session, on its own database."""
    url = create_database(servers, template_database)
    server = Gunicorn(url, servers["redis"], test_home / "gunicorn.log")
    _, api_key = new_api_key(url)
    yield {"base_url": server.base_url, "database_url": url, "process": server.process,
           "api_key": api_key}
    server.stop()
    drop_database(servers, url)
