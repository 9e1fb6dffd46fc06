-- name: import_settlements
-- Imports a batch of settlement records; counts inserted, already present, and conflicts.
SELECT inserted, already_present, conflict_count, conflicts
  FROM payflow_import_settlements_v1(%(source)s, %(records)s, %(imported_by)s,
                                     %(conflicts_shown_max)s);
