"""The outbox worker: claims tasks with FOR UPDATE SKIP LOCKED and a lease,
runs each effect outside any transaction, then ends the task in a new
transaction that checks the task is still ours.

Run any number of them (`payflow worker`), on any number of hosts. A crashed
worker's tasks come back when their lease expires; a stopping one (SIGTERM)
finishes the task at hand and hands the rest of its batch back. Delivery is at
least once, so every effect carries an idempotency key derived from the task.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg
import psycopg_pool
from psycopg import errors as pg_errors

from payflow import webhooks
from payflow.config import Config
from payflow.db import connection_options
from payflow.providers import PayoutProvider, PayoutRequest, create_provider
from payflow.queries import queries

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "payflow_outbox"
EVENT_TOPICS = frozenset({"transfer.posted", "payout.succeeded", "payout.failed"})
ERROR_PAUSE_SECONDS = 1.0


@dataclass(frozen=True)
class Task:
    id: int
    topic: str
    payload: dict
    attempts: int


# Errors of one statement (a timeout, a lock wait, a deadlock): the connection
# is fine, so the task failed and is retried with backoff like any other failure.
PAYOUT_TOPIC = "payout.requested"
PAID_END_DELAY_MAX_SECONDS = 0.05
AUDIT_INTERVAL_MIN_SECONDS = 0.1  # even when /health wants an audit per call (max age 0)
STATEMENT_ERRORS = (pg_errors.QueryCanceled, pg_errors.LockNotAvailable, pg_errors.TransactionRollback)


class Retry(Exception):
    """The effect failed in a way worth retrying later."""


def backoff_seconds(attempts: int, config: Config, rng: random.Random) -> float:
    """Capped exponential backoff with full jitter, after `attempts` tries."""
    ceiling = min(config.outbox_backoff_cap_seconds,
                  config.outbox_backoff_base_seconds * 2 ** max(attempts - 1, 0))
    return rng.uniform(ceiling / 2, ceiling)


class Worker:
    def __init__(self, config: Config, pool: psycopg_pool.ConnectionPool,
                 provider: PayoutProvider | None = None, owner: str | None = None) -> None:
        self.config = config
        self.pool = pool
        self.provider = provider or create_provider(config, pool)
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.stopping = threading.Event()
        self._rng = random.Random()
        self._last_prune = 0.0
        self._last_audit = 0.0
        # Claimed tasks not yet ended. If the database goes away mid-batch, they
        # are handed back once it returns rather than waiting out their lease.
        self._held: list[Task] = []
        self._current: Task | None = None
        self._claimed_at = 0.0  # monotonic time just before the last claim was sent
        self._handlers = {PAYOUT_TOPIC: self._run_payout, "webhook.deliver": self._deliver_webhook}
        self._started: dict[int, dict | None] = {}  # payouts marked processing with their batch
        self._paid: list[tuple[Task, str]] = []  # paid payouts (task, reference) to end together
        self._paid_since = 0.0  # when the first of them was paid

    # -- the loop -------------------------------------------------------------

    def run(self) -> None:
        log.info("worker %s started", self.owner)
        listener = None
        while not self.stopping.is_set():
            try:
                if listener is None and self.config.worker_listen:
                    listener = self._listen()
                self._release_held()
                claimed = self.run_once()
                self._prune_when_due()
                self._audit_when_due()
                if not claimed:
                    self._wait(listener)
            except (psycopg.Error, psycopg_pool.PoolTimeout) as error:
                log.warning("database unavailable, pausing: %s", error)
                listener = _close_quietly(listener)
                self.stopping.wait(ERROR_PAUSE_SECONDS)
        _close_quietly(listener)
        log.info("worker %s stopped", self.owner)

    def run_once(self) -> int:
        """Claims one batch and runs it; returns how many tasks it claimed."""
        claimed = self._claim()
        self._held = list(claimed)
        tasks = self._fan_out_events(claimed)
        self._started = self._start_payouts([task for task in tasks if task.topic == PAYOUT_TOPIC])
        for task in tasks:
            if self.stopping.is_set():
                break
            self._current = task
            self._held.remove(task)
            if self._renew(task):
                self._run(task)
            else:
                self._started.pop(task.id, None)  # its new owner has the payout now
            self._current = None
        self._end_paid_payouts()
        self._release_held()
        return len(claimed)

    def _listen(self) -> psycopg.Connection:
        connection = psycopg.connect(self.config.database_url, autocommit=True, connect_timeout=5,
                                     options=connection_options(self.config))
        connection.execute(f"LISTEN {NOTIFY_CHANNEL}")
        return connection

    def _wait(self, listener: psycopg.Connection | None) -> None:
        """Until a NOTIFY, the poll interval, or a stop request."""
        timeout = min(self.config.worker_poll_interval_seconds, self._audit_interval_seconds)
        if listener is None:
            self.stopping.wait(timeout)
            return
        for _ in listener.notifies(timeout=timeout, stop_after=1):
            pass

    # -- claiming and ending tasks --------------------------------------------

    def _claim(self) -> list[Task]:
        self._claimed_at = time.monotonic()
        with self.pool.connection() as conn:
            rows = conn.execute(queries["outbox_claim"], {
                "owner": self.owner, "batch_size": self.config.worker_batch_size_max,
                "lease_seconds": self.config.worker_lease_seconds}).fetchall()
        return [Task(row["id"], row["topic"], row["payload"], row["attempts"]) for row in rows]

    def _release_held(self) -> None:
        """Hands back what this worker claimed and has not ended: the rest of a
        batch when stopping, and, after the database went away, the task it was
        running too (keeping that task's attempt). Payouts marked processing
        with the batch but never sent become what they were before."""
        unsent = [payout["id"] for payout in self._started.values() if payout is not None]
        if unsent:
            with self.pool.connection() as conn:
                conn.execute(queries["payouts_unstart"], {"ids": unsent})
        self._started = {}
        for tasks, started in ((self._held, False), ([self._current] if self._current else [], True)):
            if tasks:
                with self.pool.connection() as conn:
                    conn.execute(queries["outbox_release"], {
                        "ids": [task.id for task in tasks], "owner": self.owner, "started": started})
                log.info("handed back %d claimed tasks", len(tasks))
        self._held, self._current = [], None

    def _renew(self, task: Task) -> bool:
        """The lease covers the whole batch from the claim. While less than half
        of it has passed, nobody else can have the task (a lease only ends by
        expiring), so no round trip; later, each task renews its own lease
        before its effect, unless another worker has taken it."""
        if time.monotonic() - self._claimed_at < self.config.worker_lease_seconds / 2:
            return True
        with self.pool.connection() as conn:
            ours = conn.execute(queries["outbox_renew"], {
                "id": task.id, "owner": self.owner,
                "lease_seconds": self.config.worker_lease_seconds}).fetchone()["ours"]
        if not ours:
            log.warning("task %d was taken by another worker (our lease ran out); skipped", task.id,
                        extra=_fields(task))
        return ours

    def _finish(self, task: Task, outcome: str, error: str | None = None,
                run_at: datetime | None = None) -> None:
        with self.pool.connection() as conn:
            ours = conn.execute(queries["outbox_finish"], {
                "id": task.id, "owner": self.owner, "outcome": outcome, "error": error,
                "run_at": run_at}).fetchone()["ours"]
        if not ours:
            log.warning("task %d was no longer ours (lease expired); left to its new owner", task.id,
                        extra=_fields(task))

    def _run(self, task: Task) -> None:
        try:
            if task.topic in EVENT_TOPICS:
                self._fan_out(task)
            elif task.topic in self._handlers:
                self._handlers[task.topic](task)
            else:
                self._finish(task, "dead", f"no handler for topic {task.topic!r}")
        except STATEMENT_ERRORS as error:
            self._retry_or_bury(task, error)
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout):
            raise  # the connection is gone: the task is handed back when it returns
        except Exception as error:  # noqa: BLE001 - any failure of an effect is retried
            self._retry_or_bury(task, error)

    def _retry_or_bury(self, task: Task, error: Exception) -> None:
        reason = f"{type(error).__name__}: {error}"
        if task.attempts >= self.config.outbox_attempts_max:
            log.error("task %d (%s) is dead after %d attempts: %s",
                      task.id, task.topic, task.attempts, reason, extra=_fields(task))
            self._finish(task, "dead", reason)
            return
        delay = backoff_seconds(task.attempts, self.config, self._rng)
        log.info("task %d (%s) will retry in %.1f s: %s", task.id, task.topic, delay, reason,
                 extra=_fields(task))
        self._finish(task, "retry", reason, datetime.now(UTC) + timedelta(seconds=delay))

    # -- the effects ------------------------------------------------------------

    def _fan_out_events(self, tasks: list[Task]) -> list[Task]:
        """Ends the batch's event tasks in one transaction (one commit, not one
        per task) while the batch's lease is young; returns the tasks left to
        run one by one. If that transaction fails, the events run one by one
        too, each with its own retry."""
        events = [task for task in tasks if task.topic in EVENT_TOPICS]
        if len(events) < 2 or time.monotonic() - self._claimed_at >= self.config.worker_lease_seconds / 2:
            return tasks
        try:
            with self.pool.connection() as conn:
                ours = {row["task_id"] for row in conn.execute(queries["webhook_fan_out_many"], {
                    "task_ids": [task.id for task in events], "owner": self.owner})}
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout):
            raise  # the connection is gone: the batch is handed back when it returns
        except psycopg.Error as error:
            log.warning("fanning out %d events at once failed (%s); one by one", len(events), error)
            return tasks
        for task in events:
            self._held.remove(task)
            if task.id not in ours:
                log.warning("task %d was no longer ours (lease expired); left to its new owner",
                            task.id, extra=_fields(task))
        return [task for task in tasks if task.topic not in EVENT_TOPICS]

    def _fan_out(self, task: Task) -> None:
        with self.pool.connection() as conn:
            conn.execute(queries["webhook_fan_out"], {"task_id": task.id, "owner": self.owner})

    def _start_payouts(self, tasks: list[Task]) -> dict[int, dict | None]:
        """Marks the batch's payouts processing in one transaction (one commit,
        not one per payout) while the batch's lease is young: task id -> the
        payout, or None when an earlier run finished it. Each is marked before
        its provider call, as one by one."""
        if len(tasks) < 2 or time.monotonic() - self._claimed_at >= self.config.worker_lease_seconds / 2:
            return {}
        with self.pool.connection() as conn:
            rows = {row["id"]: row for row in conn.execute(queries["payouts_start"], {
                "ids": [task.payload["payout_id"] for task in tasks]})}
        return {task.id: rows.get(uuid.UUID(str(task.payload["payout_id"]))) for task in tasks}

    def _end_paid_payouts(self) -> None:
        """Ends the batch's paid payouts and their tasks in one transaction. A
        crash before it only means their tasks run again, and the provider,
        deduping on the payout's key, answers "paid" again."""
        paid, self._paid = self._paid, []
        if not paid:
            return
        with self.pool.connection() as conn:
            ours = {row["task_id"]: row["ours"] for row in conn.execute(queries["payouts_succeed"], {
                "payout_ids": [task.payload["payout_id"] for task, _ in paid],
                "references": [reference for _, reference in paid],
                "task_ids": [task.id for task, _ in paid], "owner": self.owner})}
        for task, _ in paid:
            if not ours.get(task.id):
                log.warning("payout task %d was no longer ours; its new owner finishes it", task.id,
                            extra=_fields(task))

    def _run_payout(self, task: Task) -> None:
        payout_id = task.payload["payout_id"]
        if task.id in self._started:
            payout = self._started.pop(task.id)
        else:
            with self.pool.connection() as conn:
                payout = conn.execute(queries["payout_start"], {"id": payout_id}).fetchone()
        if payout is None:  # finished by an earlier run of this task
            self._finish(task, "done")
            return
        # The key is the payout's own id: unique for good, the same on every
        # run of its task (a sequence-based task id could repeat after a restore).
        result = self.provider.pay(PayoutRequest(
            idempotency_key=f"payflow-payout-{payout_id}", payout_id=str(payout_id),
            amount=payout["amount"], currency=payout["currency"], destination=payout["destination"]))
        exhausted = task.attempts >= self.config.outbox_attempts_max
        if result.outcome == "paid":
            # Ended together with the batch's other paid payouts, unless the
            # first of them has waited PAID_END_DELAY_MAX_SECONDS already: a
            # slow provider must not hold back every success of its batch.
            if not self._paid:
                self._paid_since = time.monotonic()
            self._paid.append((task, result.reference))
            if time.monotonic() - self._paid_since >= PAID_END_DELAY_MAX_SECONDS:
                self._end_paid_payouts()
        elif result.outcome == "permanent":
            self._end_payout("payout_fail", task, {"reason": result.reason})
        elif result.outcome == "retryable" and exhausted:
            # The last call, with the same key, was a definite "not paid": a
            # deduping provider would have answered "paid" had any call paid.
            reason = f"retries exhausted after {task.attempts} attempts: {result.reason}"
            self._end_payout("payout_fail", task, {"reason": reason})
        else:
            # Retry; an unknown outcome at the last attempt makes the task dead
            # and leaves the payout processing for an operator (retry-dead).
            raise Retry(result.reason)

    def _end_payout(self, query_name: str, task: Task, params: dict) -> None:
        with self.pool.connection() as conn:
            ours = conn.execute(queries[query_name], {
                "id": task.payload["payout_id"], "task_id": task.id, "owner": self.owner,
                **params}).fetchone()["ours"]
        if not ours:
            log.warning("payout task %d was no longer ours; its new owner finishes it", task.id,
                        extra=_fields(task))

    def _deliver_webhook(self, task: Task) -> None:
        with self.pool.connection() as conn:
            endpoint = conn.execute(queries["webhook_endpoint_for_delivery"],
                                    {"id": task.payload["endpoint_id"]}).fetchone()
        if endpoint is None:  # deleted or disabled since
            self._finish(task, "done", "endpoint gone or disabled")
            return
        event = task.payload["event"]
        body = json.dumps(event, separators=(",", ":")).encode()
        failure = webhooks.deliver(endpoint["url"], endpoint["secret"], event["id"], body,
                                   self.config.webhook_timeout_seconds)
        if failure:
            raise Retry(failure)
        self._finish(task, "done")

    # -- housekeeping -------------------------------------------------------------

    @property
    def _audit_interval_seconds(self) -> float:
        return max(self.config.audit_max_age_ms / 2000, AUDIT_INTERVAL_MIN_SECONDS)

    def _audit_when_due(self) -> None:
        """Keeps the incremental audit behind /health fresh (at most half its
        max age old), so that /health only reads it: advancing it costs tens
        of milliseconds on a large ledger. Any number of workers may try; one
        advances it at a time (an advisory lock), the rest find it fresh."""
        now = time.monotonic()
        if now - self._last_audit < self._audit_interval_seconds:
            return
        self._last_audit = now
        with self.pool.connection() as conn:
            conn.execute(queries["audit_status"], {
                "batch_size": self.config.audit_batch_entries_max,
                "accounts_per_step": self.config.audit_accounts_per_step,
                "max_age_ms": self.config.audit_max_age_ms // 2})

    def _prune_when_due(self) -> None:
        now = time.monotonic()
        if now - self._last_prune < self.config.worker_prune_interval_seconds:
            return
        self._last_prune = now
        with self.pool.connection() as conn:
            keys = conn.execute(queries["prune_idempotency_keys"],
                                {"batch_size": self.config.worker_prune_batch_size}).rowcount
            tasks = conn.execute(queries["prune_outbox"], {
                "batch_size": self.config.worker_prune_batch_size,
                "retention_seconds": self.config.outbox_retention_seconds}).rowcount
        if keys or tasks:
            log.info("pruned %d expired idempotency keys and %d finished tasks", keys, tasks)


def _fields(task: Task) -> dict:
    """Structured fields of a task's log lines."""
    return {"task_id": task.id, "topic": task.topic, "attempts": task.attempts}


def _close_quietly(connection: psycopg.Connection | None) -> None:
    if connection is not None:
        try:
            connection.close()
        except psycopg.Error:
            pass
    return None


def run_worker(config: Config) -> None:
    """`payflow worker`: until SIGTERM or SIGINT, which finish the task at hand."""
    from payflow import logs
    from payflow.db import create_pool

    logs.configure()
    pool = create_pool(config.replace(pool_size_min=1, pool_size_max=2))
    worker = Worker(config, pool)

    def stop(signum, frame) -> None:
        log.info("signal %d: finishing the task at hand, then stopping", signum)
        worker.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        worker.run()
    finally:
        pool.close()
