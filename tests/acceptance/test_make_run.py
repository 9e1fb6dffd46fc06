"""The README's first command, `make run`, as a user runs it: a real
subprocess on embedded servers, called over HTTP, then stopped by Ctrl-C,
SIGTERM or SIGKILL, leaving no process behind. The CLI commands that talk to
the running service (`payflow db url`, `seed`, `audit`) are checked too."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from payflow import embedded
from payflow.runner import CHECKOUT
from tests.helpers import HttpClient

START_TIMEOUT_SECONDS = 120
STOP_TIMEOUT_SECONDS = 45


@pytest.fixture
def run_home():
    home = Path(tempfile.mkdtemp(prefix=f"payflow-test-{os.getpid()}-run-"))
    home.chmod(0o755)
    yield home
    # A test that failed half-way must not leave its service running: SIGKILL
    # the runner's process group; the kernel's parent-death signals do the rest.
    for service in Service.started:
        if service.process.poll() is None:
            os.killpg(service.process.pid, signal.SIGKILL)
            service.process.wait()
    Service.started.clear()
    import shutil

    shutil.rmtree(home, ignore_errors=True)


def _environment(home: Path, port: int) -> dict[str, str]:
    environ = {key: value for key, value in os.environ.items()
               if not key.startswith("PAYFLOW_") and key not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    return {**environ, "PAYFLOW_HOME": str(home), "PAYFLOW_PORT": str(port), "PAYFLOW_WEB_WORKERS": "1"}


class Service:
    started: list[Service] = []

    def __init__(self, command: list[str], home: Path) -> None:
        self.home, self.port = home, embedded.free_port()
        self.environ = _environment(home, self.port)
        self.process = subprocess.Popen(command, cwd=CHECKOUT, env=self.environ, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        start_new_session=True)  # like a terminal's job
        Service.started.append(self)
        self.output = self._read_until("Ctrl-C stops everything.")
        self.urls = json.loads((home / "servers.json").read_text())

    def _read_until(self, marker: str) -> str:
        lines, deadline = [], time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise AssertionError("make run ended early:\n" + "".join(lines))
            lines.append(line)
            if marker in line:
                return "".join(lines)
        raise AssertionError("make run did not start in time:\n" + "".join(lines))

    @property
    def api_key(self) -> str:
        return re.search(r"API key \(admin, for this machine only\): (\S+)", self.output)[1]

    def http(self) -> HttpClient:
        return HttpClient(f"http://127.0.0.1:{self.port}", self.api_key)

    def account_id(self, name: str) -> str:
        return re.search(rf"^\s+{name}\s+\w{{3}}\s+([0-9a-f-]{{36}})", self.output, re.MULTILINE)[1]

    def ports(self) -> list[int]:
        ports = [self.port]
        for key in ("PAYFLOW_DATABASE_URL", "PAYFLOW_REDIS_URL"):
            ports.append(int(re.search(r":(\d+)/", self.urls[key])[1]))
        return ports

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "payflow", *args], cwd=CHECKOUT, env=self.environ,
                              capture_output=True, text=True, timeout=120)

    def wait_stopped(self) -> str:
        rest, _ = self.process.communicate(timeout=STOP_TIMEOUT_SECONDS)
        return rest


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _processes_using(home: Path) -> list[str]:
    """Processes whose command line names `home` (the servers) or whose
    environment carries it (gunicorn, the worker: children of make run)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                environ = (proc / "environ").read_bytes()
            except OSError:
                continue
            if str(home) in cmdline or f"PAYFLOW_HOME={home}".encode() in environ:
                found.append(f"{proc.name}: {cmdline}")
    return found


def _assert_nothing_left(service: Service) -> None:
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if not any(map(_listening, service.ports())) and not _processes_using(service.home):
            break
        time.sleep(0.2)
    assert not [port for port in service.ports() if _listening(port)]
    assert not _processes_using(service.home)
    assert not (service.home / "servers.json").exists() or service.process.returncode == -9


@pytest.mark.acceptance
def test_make_run_serves_the_readme_walkthrough_and_stops_on_ctrl_c(run_home):
    service = Service(["make", "--no-print-directory", "run"], run_home)
    try:
        alice, bob = service.account_id("Alice"), service.account_id("Bob")
        http = service.http()
        first = http.transfer(alice, bob, 5000, key="tx-101")
        again = http.transfer(alice, bob, 5000, key="tx-101")
        assert first[0] == again[0] == 201 and first[2] == again[2]
        assert again[1]["Idempotent-Replayed"] == "true"
        status, _, health = http.request("GET", "/health")
        assert status == 200 and health["status"] == "healthy" and health["ledger_integrity_sum"] == 0
        http.close()

        # The CLI finds the running service's database (what make db-shell uses).
        url = service.cli("db", "url")
        assert url.stdout.strip() == service.urls["PAYFLOW_DATABASE_URL"], url.stderr
        seeded = service.cli("seed")
        assert seeded.returncode == 0 and alice in seeded.stdout, seeded.stderr
        audit = service.cli("audit")
        assert audit.returncode == 0 and "ledger OK" in audit.stdout, audit.stdout + audit.stderr
        assert "applied" in service.cli("db", "status").stdout
    finally:
        os.killpg(service.process.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        service.wait_stopped()
    _assert_nothing_left(service)


@pytest.mark.acceptance
def test_data_survives_a_restart_and_sigterm_then_sigkill_leave_nothing(run_home):
    command = [sys.executable, "-m", "payflow", "run"]
    service = Service(command, run_home)
    alice, bob = service.account_id("Alice"), service.account_id("Bob")
    http = service.http()
    assert http.transfer(alice, bob, 123, key="survives")[0] == 201
    http.close()
    service.process.send_signal(signal.SIGTERM)
    service.wait_stopped()
    assert service.process.returncode == 0
    _assert_nothing_left(service)

    first_key = service.api_key
    service = Service(command, run_home)
    assert service.account_id("Alice") == alice  # seeding again created nothing
    assert service.api_key == first_key  # the dev key is kept with the data
    http = service.http()
    assert _processes_using(run_home), "the check must see make run's own processes"
    status, _, account = http.request("GET", f"/v1/accounts/{alice}")
    assert status == 200 and account["balance"] == 100_000_00 - 123
    status, headers, _ = http.transfer(alice, bob, 123, key="survives")
    assert status == 201 and headers["Idempotent-Replayed"] == "true"
    http.close()
    service.process.kill()  # no handler runs: the kernel's parent-death signal must do it
    service.wait_stopped()
    _assert_nothing_left(service)
