"""What operators see of the outbox: stats, lists, and putting dead tasks back."""

from __future__ import annotations

import psycopg

from payflow.queries import queries


def stats(conn: psycopg.Connection) -> dict:
    by_status: dict[str, int] = dict.fromkeys(("pending", "running", "done", "dead"), 0)
    by_topic: dict[str, dict[str, int]] = {}
    for row in conn.execute(queries["outbox_stats"]).fetchall():
        by_status[row["status"]] += row["tasks"]
        by_topic.setdefault(row["topic"], {})[row["status"]] = row["tasks"]
    oldest = conn.execute(queries["outbox_oldest_pending"]).fetchone()["age_seconds"]
    return {"by_status": by_status, "by_topic": by_topic,
            "oldest_pending_age_seconds": oldest, "dead": by_status["dead"]}


def list_tasks(conn: psycopg.Connection, status: str, limit: int) -> list[dict]:
    return conn.execute(queries["outbox_list"], {"status": status, "limit": limit}).fetchall()


def retry_dead(conn: psycopg.Connection, task_id: int | None) -> list[int]:
    return [row["id"] for row in conn.execute(queries["outbox_retry_dead"], {"id": task_id}).fetchall()]
