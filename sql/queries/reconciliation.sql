-- name: reconciliation_statement_timeout
-- Gives this transaction's run its own (longer) statement timeout.
SELECT set_config('statement_timeout', %(timeout_ms)s, true);

-- name: reconcile
-- Runs a reconciliation (the payouts and settlements as of a moment, optionally since another).
SELECT outcome, run_id FROM payflow_reconcile_v1(%(as_of)s, %(since)s, %(window_days)s, %(created_by)s);

-- name: reconciliation_run_json
-- One run, with its counts, totals and how many exceptions are still open.
SELECT payflow_reconciliation_run_json(r) AS run FROM reconciliation_runs r WHERE r.id = %(id)s;

-- name: reconciliation_exceptions_page
-- A page of a run's exceptions by (code, id), after a cursor, optionally of one code or status.
SELECT e.code, e.id, payflow_reconciliation_exception_json(e) AS exception
  FROM reconciliation_exceptions e
 WHERE e.run_id = %(run_id)s
   AND (e.code, e.id) > (%(after_code)s, %(after_id)s)
   AND (%(code)s::text IS NULL OR e.code = %(code)s::text)
   AND (%(status)s::text IS NULL OR (e.resolved_at IS NULL) = (%(status)s::text = 'open'))
 ORDER BY e.code, e.id
 LIMIT %(limit)s + 1;

-- name: resolve_reconciliation_exception
-- Resolves an open exception of a run with a note; says if it was already resolved or not found.
SELECT outcome, body
  FROM payflow_resolve_reconciliation_exception_v1(%(run_id)s, %(exception_id)s, %(note)s,
                                                    %(resolved_by)s);
