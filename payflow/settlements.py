"""Settlement files from a bank or payout provider: read (CSV or JSON),
validated like any API request, and imported idempotently by the file's own
line references, so that importing the same file twice changes nothing.

A batch is all or nothing: a record whose (source, reference) was imported
before with other content is a conflict, and then nothing of the batch is kept.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import psycopg
from psycopg.types.json import Jsonb

from payflow import errors, schemas
from payflow.config import Config
from payflow.db import run_with_retries
from payflow.queries import queries

SETTLEMENT_FILE_BYTES_MAX = 16 * 1024 * 1024
CSV_COLUMNS = ("reference", "payout_reference", "amount", "currency", "settled_at")
CONFLICTS_SHOWN_MAX = 20
# A CSV cell becomes an integer only when it is written as one: "12.50" or
# "1e3" stay strings and fail validation, as they would in JSON.
_INTEGER_CELL = re.compile(r"-?[0-9]{1,40}")


def read_file(path: Path, file_format: str | None, source: str | None) -> dict:
    """The batch a file holds, as an API body ({source, records}), not yet
    validated. file_format: csv or json (default: the file's extension);
    source: overrides a JSON file's own."""
    file_format = file_format or path.suffix.lower().removeprefix(".")
    if file_format not in ("csv", "json"):
        raise errors.ValidationFailed("Say --format csv or --format json for this file.")
    if path.stat().st_size > SETTLEMENT_FILE_BYTES_MAX:
        raise errors.ValidationFailed(f"The file is over {SETTLEMENT_FILE_BYTES_MAX} bytes: split it.")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte order mark is not part of the header
    except UnicodeDecodeError as error:
        raise errors.ValidationFailed(f"The file is not UTF-8: {error}") from None
    batch = parse_csv(text) if file_format == "csv" else parse_json(text)
    return {**batch, "source": source} if source is not None else batch


def parse_csv(text: str) -> dict:
    """A header line naming CSV_COLUMNS (in any order), then one record a line.
    Every cell is trimmed: padding is a CSV file's layout, not part of a value
    (a JSON value, sent as meant, is refused with surrounding whitespace)."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        columns = [name.strip() for name in next(reader, [])]
        if sorted(columns) != sorted(CSV_COLUMNS):
            raise errors.ValidationFailed(
                "The CSV header must name exactly these columns: " + ",".join(CSV_COLUMNS),
                details={"columns": columns})
        records = []
        for cells in reader:
            if not cells:
                continue  # a blank line
            if len(records) == schemas.SETTLEMENT_RECORDS_PER_BATCH_MAX:
                raise errors.ValidationFailed(
                    f"At most {schemas.SETTLEMENT_RECORDS_PER_BATCH_MAX} records a batch: split the file.")
            if len(cells) != len(CSV_COLUMNS):
                raise errors.ValidationFailed(
                    f"Line {reader.line_num} does not have {len(CSV_COLUMNS)} cells.")
            records.append(_typed(dict(zip(columns, (cell.strip() for cell in cells), strict=True))))
    except csv.Error as error:
        raise errors.ValidationFailed(f"Line {reader.line_num} is not valid CSV: {error}") from None
    return {"records": records}


def _typed(row: dict) -> dict:
    amount = row["amount"]
    return {**row, "amount": int(amount) if _INTEGER_CELL.fullmatch(amount) else amount}


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(text: str) -> dict:
    """The body of POST /v1/settlements ({source?, records}), or a bare list of records."""
    try:
        parsed = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as error:
        raise errors.InvalidJson("The file is not valid JSON.",
                                 details={"reason": str(error)[:200]}) from None
    if isinstance(parsed, list):
        return {"records": parsed}
    if not isinstance(parsed, dict):
        raise errors.ValidationFailed('A JSON settlement file holds {"source", "records"} '
                                      "or a list of records.")
    return parsed


def load_batch(raw: object) -> dict:
    return schemas.load(schemas.SettlementBatchSchema(), raw)


def import_batch(conn: psycopg.Connection, config: Config, batch: dict, imported_by: str | None) -> dict:
    """Imports a validated batch in one transaction (retried after a deadlock);
    SettlementConflict (and nothing imported) when a reference is already there
    with other content."""
    records = [{**record, "settled_at": record["settled_at"].isoformat(),
                "settled_on": record["settled_on"] and record["settled_on"].isoformat()}
               for record in batch["records"]]

    def transaction() -> dict:
        with conn.transaction():
            row = conn.execute(queries["import_settlements"], {
                "source": batch["source"], "records": Jsonb(records), "imported_by": imported_by,
                "conflicts_shown_max": CONFLICTS_SHOWN_MAX}).fetchone()
            if row["conflict_count"]:
                # Raised inside the transaction: it rolls back, the batch leaves nothing.
                raise errors.SettlementConflict(details={
                    "conflict_count": row["conflict_count"], "conflicts": row["conflicts"]})
        return row

    row = run_with_retries(config, transaction)
    return {"object": "settlement_import", "source": batch["source"], "records": len(records),
            "inserted": row["inserted"], "already_present": row["already_present"]}
