"""Named SQL queries, read once from `sql/queries/*.sql`.

Each block starts with `-- name: query_name` and a line saying what it does;
the SQL that follows uses `%(name)s` placeholders. Python code says
`queries["lock_accounts"]` and never builds SQL from strings.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

# The top-level sql/ folder: payflow runs from its checkout (editable install).
SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
_NAME_LINE = re.compile(r"^--\s*name:\s*(\w+)\s*-*\s*$", re.MULTILINE)


def parse(text: str, source: str = "<string>") -> dict[str, str]:
    parts = _NAME_LINE.split(text)
    found: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in found:
            raise ValueError(f"duplicate query name {name!r} in {source}")
        found[name] = body.strip()
    return found


@functools.cache
def load(directory: Path = SQL_DIR / "queries") -> dict[str, str]:
    found: dict[str, str] = {}
    for path in sorted(directory.glob("*.sql")):
        for name, body in parse(path.read_text(), str(path)).items():
            if name in found:
                raise ValueError(f"duplicate query name {name!r} in {path}")
            found[name] = body
    return found


class _Queries:
    def __getitem__(self, name: str) -> str:
        return load()[name]


queries = _Queries()
