"""Numbered plain-SQL migrations from sql/migrations, applied in order and
recorded in `schema_migrations`. Each runs in its own transaction."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import psycopg

from payflow.queries import SQL_DIR

MIGRATIONS_DIR = SQL_DIR / "migrations"
_FILE_NAME = re.compile(r"^(\d{4})_(\w+)\.sql$")
# Two processes migrating at once take turns.
_MIGRATION_LOCK_KEY = 0x7061796D6967  # "paymig"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text()


def available(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if not match:
            raise ValueError(f"migration file name must be NNNN_name.sql: {path.name}")
        found.append(Migration(int(match[1]), match[2], path))
    versions = [migration.version for migration in found]
    if len(set(versions)) != len(versions):
        raise ValueError("two migrations share a number")
    return found


def _ensure_table(conn: psycopg.Connection) -> None:
    conn.execute(
        """CREATE TABLE IF NOT EXISTS schema_migrations (
               version    integer PRIMARY KEY,
               name       text NOT NULL,
               applied_at timestamptz NOT NULL DEFAULT now())"""
    )


def applied(conn: psycopg.Connection) -> dict[int, str]:
    _ensure_table(conn)
    rows = conn.execute("SELECT version, name FROM schema_migrations ORDER BY version").fetchall()
    return dict(rows)


def migrate(database_url: str) -> list[Migration]:
    """Apply every pending migration; returns those applied."""
    done = []
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK_KEY,))
        try:
            already = applied(conn)
            for migration in available():
                if migration.version in already:
                    continue
                with conn.transaction():
                    conn.execute(migration.sql)
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                        (migration.version, migration.name),
                    )
                done.append(migration)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK_KEY,))
    return done


def status(database_url: str) -> list[tuple[Migration, bool]]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        already = applied(conn)
    return [(migration, migration.version in already) for migration in available()]
