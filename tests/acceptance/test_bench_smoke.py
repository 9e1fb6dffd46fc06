"""make bench-smoke: the benchmark machinery end to end at tiny scale (own
durable servers, gunicorn, the load driver, pgbench). It fails on errors,
never on times."""

from __future__ import annotations

import subprocess
import sys

import pytest

from payflow.runner import CHECKOUT


@pytest.mark.acceptance
def test_bench_smoke_runs_without_errors():
    result = subprocess.run([sys.executable, "-m", "bench.transfers", "--smoke"], cwd=CHECKOUT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "errors: 0" in result.stdout
    for scenario in ("transfer-uniform", "transfer-hot", "idempotent-replay"):
        assert scenario in result.stdout


@pytest.mark.acceptance
def test_outbox_and_audit_bench_smoke_run_without_errors():
    for module, expected in (("bench.outbox", ("outbox-drain-events", "outbox-drain-payouts",
                                              "outbox-wakeup")),
                             ("bench.audit", ("audit",))):
        result = subprocess.run([sys.executable, "-m", module, "--smoke"], cwd=CHECKOUT,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        for scenario in expected:
            assert f"'scenario': '{scenario}'" in result.stdout or f"scenario={scenario}" in result.stdout
