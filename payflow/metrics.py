"""Prometheus metrics (the official client).

Under gunicorn, every worker process writes its samples to files in
PROMETHEUS_MULTIPROC_DIR (gunicorn.conf.py sets it before any worker starts)
and /metrics aggregates them, so a scrape sees all workers. Figures that live
in the database (outbox depth, audit result) are read at scrape time.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily

# Anything else (gunicorn accepts any upper-case word) would mint new series.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

LATENCY_BUCKETS_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

HTTP_REQUESTS = Counter("payflow_http_requests_total", "HTTP requests", ["method", "route", "status"])
HTTP_LATENCY = Histogram("payflow_http_request_duration_seconds", "HTTP request latency",
                         ["method", "route"], buckets=LATENCY_BUCKETS_SECONDS)
IDEMPOTENT_REPLAYS = Counter("payflow_idempotent_replays_total", "Responses replayed for a retried key")
IDEMPOTENCY_CONFLICTS = Counter("payflow_idempotency_conflicts_total",
                                "Keys in use (409) or reused with another request (422)", ["code"])
TRANSFERS = Counter("payflow_transfers_total", "Transfers posted", ["currency"])
TRANSFERRED_MINOR_UNITS = Counter("payflow_transferred_minor_units_total",
                                  "Amounts posted, in minor units", ["currency"])
TRANSFER_BATCH_SIZE = Histogram("payflow_transfer_batch_size",
                                "Transfers posted per transaction (group commit)",
                                buckets=(1, 2, 4, 8, 16, 32, 64))
REDIS_ERRORS = Counter("payflow_redis_errors_total", "Redis calls that failed (served without Redis)")
POOL_CONNECTIONS = Gauge("payflow_db_pool_connections", "Pooled connections, by state",
                         ["state"], multiprocess_mode="livesum")
POOL_WAITING = Gauge("payflow_db_pool_waiting_requests", "Requests waiting for a connection now",
                     multiprocess_mode="livesum")
POOL_WAIT_SECONDS = Counter("payflow_db_pool_wait_seconds_total", "Time spent waiting for a connection")
POOL_ERRORS = Counter("payflow_db_pool_connection_errors_total", "Failed connection attempts")


# (method, route, status) -> its request counter and latency histogram: labels()
# validates and locks on every call. Bounded: known methods, routes, statuses.
_REQUEST_SERIES: dict[tuple[str, str, int], tuple] = {}


def observe_request(method: str, route: str, status: int, duration_seconds: float, replayed: bool) -> None:
    method = method if method in KNOWN_METHODS else "OTHER"
    series = _REQUEST_SERIES.get((method, route, status))
    if series is None:
        series = _REQUEST_SERIES[method, route, status] = (
            HTTP_REQUESTS.labels(method, route, str(status)), HTTP_LATENCY.labels(method, route))
    series[0].inc()
    series[1].observe(duration_seconds)
    if replayed:
        IDEMPOTENT_REPLAYS.inc()


def observe_pool(pool) -> None:
    stats = pool.pop_stats()  # the counters since the last call, and the current sizes
    POOL_CONNECTIONS.labels("open").set(stats.get("pool_size", 0))
    POOL_CONNECTIONS.labels("idle").set(stats.get("pool_available", 0))
    POOL_WAITING.set(stats.get("requests_waiting", 0))
    POOL_WAIT_SECONDS.inc(stats.get("requests_wait_ms", 0) / 1000)
    POOL_ERRORS.inc(stats.get("connections_errors", 0))


class DatabaseCollector:
    """Figures read from the database at scrape time, as metric families (not
    Gauge objects, which in multiprocess mode would leave per-process files)."""

    def __init__(self, conn, audit_body: dict) -> None:
        self._conn, self._audit = conn, audit_body

    def collect(self):
        from payflow import outbox

        stats = outbox.stats(self._conn)
        tasks = GaugeMetricFamily("payflow_outbox_tasks", "Outbox tasks by status and topic",
                                  labels=["status", "topic"])
        for topic, by_status in stats["by_topic"].items():
            for status, count in by_status.items():
                tasks.add_metric([status, topic], count)
        yield tasks
        yield GaugeMetricFamily("payflow_outbox_oldest_pending_age_seconds",
                                "Age of the oldest due pending task",
                                value=stats["oldest_pending_age_seconds"] or 0)
        yield GaugeMetricFamily("payflow_outbox_dead_tasks", "Tasks that ran out of attempts",
                                value=stats["dead"])
        attempts = GaugeMetricFamily("payflow_outbox_task_attempts",
                                     "Attempts made by unfinished tasks, by topic", labels=["topic"])
        for row in self._conn.execute("SELECT topic, sum(attempts) AS attempts FROM outbox "
                                      "WHERE status IN ('pending', 'running') GROUP BY topic").fetchall():
            attempts.add_metric([row["topic"]], row["attempts"])
        yield attempts
        yield GaugeMetricFamily("payflow_ledger_healthy", "1 when the last audit found nothing wrong",
                                value=1 if self._audit.get("status") == "healthy" else 0)
        yield GaugeMetricFamily("payflow_ledger_integrity_sum", "Sum of all audited entries (0 when sound)",
                                value=self._audit.get("ledger_integrity_sum") or 0)


def exposition(conn, audit_body: dict) -> tuple[bytes, str]:
    """The text of /metrics: the processes' samples, then the database's."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY as registry
    database = CollectorRegistry(auto_describe=False)
    database.register(DatabaseCollector(conn, audit_body))
    return generate_latest(registry) + generate_latest(database), CONTENT_TYPE_LATEST
