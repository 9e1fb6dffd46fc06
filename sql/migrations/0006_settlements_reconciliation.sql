-- 0006: settlements (what the bank or provider says it paid, imported from its
-- files) and reconciliation runs that match them to our succeeded payouts.

-- When a payout succeeded: the moment a settlement is compared with. Set by a
-- trigger when the status becomes succeeded, so the worker's path
-- (payflow_payout_succeed_v1) is unchanged and a later update of the row (its
-- updated_at) cannot move it. The WHEN clause keeps other updates free of it.
ALTER TABLE payouts ADD COLUMN succeeded_at timestamptz;
UPDATE payouts SET succeeded_at = updated_at WHERE status = 'succeeded';
ALTER TABLE payouts ADD CONSTRAINT payouts_succeeded_at
    CHECK ((status = 'succeeded') = (succeeded_at IS NOT NULL));

CREATE FUNCTION payflow_payout_set_succeeded_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.succeeded_at := now();
    RETURN NEW;
END $$;
CREATE TRIGGER payouts_set_succeeded_at BEFORE INSERT OR UPDATE OF status ON payouts
    FOR EACH ROW WHEN (NEW.status = 'succeeded' AND NEW.succeeded_at IS NULL)
    EXECUTE FUNCTION payflow_payout_set_succeeded_at();

-- How a settlement line's payout_reference is compared with a payout's
-- provider_reference or id: banks upper-case references and pad them, and a
-- provider's may carry stray spaces. Both sides go through this one function.
CREATE FUNCTION payflow_reference_key(reference text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT lower(btrim(reference, E' \t\n\r\f\x0B'))
$$;

-- One line of a settlement file. (source, reference) is the file's own
-- reference for the line: importing the same file again inserts nothing.
-- payout_reference names our payout: its provider_reference, or its id.
-- settled_on: the value date, when the file gave a day and no time; then
-- settled_at is that day's first instant (UTC) and a run reads the line as
-- the whole day.
CREATE TABLE settlements (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    source           text NOT NULL CHECK (char_length(source) BETWEEN 1 AND 100),
    reference        text NOT NULL CHECK (char_length(reference) BETWEEN 1 AND 200),
    payout_reference text NOT NULL CHECK (char_length(payout_reference) BETWEEN 1 AND 200),
    amount           bigint NOT NULL CHECK (amount > 0),
    currency         text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    settled_at       timestamptz NOT NULL,
    settled_on       date,
    imported_at      timestamptz NOT NULL DEFAULT now(),
    imported_by      uuid REFERENCES api_keys (id),  -- NULL: the CLI
    CONSTRAINT settlements_source_reference UNIQUE (source, reference),
    CONSTRAINT settlements_value_date
        CHECK (settled_on IS NULL OR settled_at = settled_on::timestamp AT TIME ZONE 'UTC')
);

-- What the bank reported is evidence: never edited, never deleted.
CREATE TRIGGER settlements_immutable BEFORE UPDATE OR DELETE ON settlements
    FOR EACH ROW EXECUTE FUNCTION payflow_refuse_change();
CREATE TRIGGER settlements_no_truncate BEFORE TRUNCATE ON settlements
    FOR EACH STATEMENT EXECUTE FUNCTION payflow_refuse_change();

CREATE FUNCTION payflow_settlement_line_json(
    payout_reference text, amount bigint, currency text, settled_at timestamptz, settled_on date)
RETURNS jsonb LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT jsonb_build_object('payout_reference', payout_reference, 'amount', amount,
                              'currency', currency, 'settled_at', payflow_timestamp_json(settled_at),
                              'settled_on', settled_on)
$$;

-- Imports a batch inside the caller's transaction. A line already present
-- with the same content is counted, not inserted; a line whose reference is
-- present with other content is a conflict: the caller then rolls the whole
-- batch back. Each statement of this (volatile) function takes a fresh
-- snapshot, so the comparison also sees a concurrent import of the same lines
-- that committed while our INSERT waited for it.
CREATE FUNCTION payflow_import_settlements_v1(
    p_source text, p_records jsonb, p_imported_by uuid, p_conflicts_shown_max integer,
    OUT inserted integer, OUT already_present integer, OUT conflict_count integer,
    OUT conflicts jsonb)
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO settlements (source, reference, payout_reference, amount, currency, settled_at,
                             settled_on, imported_by)
    SELECT p_source, r.reference, r.payout_reference, r.amount, r.currency, r.settled_at,
           r.settled_on, p_imported_by
      FROM jsonb_to_recordset(p_records)
           AS r(reference text, payout_reference text, amount bigint, currency text,
                settled_at timestamptz, settled_on date)
     -- In reference order, so two imports of overlapping files wait on each
     -- other's lines in one order and cannot deadlock.
     ORDER BY r.reference
    ON CONFLICT (source, reference) DO NOTHING;
    GET DIAGNOSTICS inserted = ROW_COUNT;

    WITH compared AS (
        SELECT r.reference,
               (s.payout_reference, s.amount, s.currency, s.settled_at, s.settled_on)
               IS DISTINCT FROM (r.payout_reference, r.amount, r.currency, r.settled_at, r.settled_on)
               AS differs,
               payflow_settlement_line_json(s.payout_reference, s.amount, s.currency, s.settled_at,
                                            s.settled_on) AS stored,
               payflow_settlement_line_json(r.payout_reference, r.amount, r.currency, r.settled_at,
                                            r.settled_on) AS received
          FROM jsonb_to_recordset(p_records)
               AS r(reference text, payout_reference text, amount bigint, currency text,
                    settled_at timestamptz, settled_on date)
          JOIN settlements s ON s.source = p_source AND s.reference = r.reference)
    SELECT count(*) FILTER (WHERE NOT differs) - inserted,  -- ours match too: not "already"
           count(*) FILTER (WHERE differs),
           coalesce((SELECT jsonb_agg(shown ORDER BY shown.reference)
                       FROM (SELECT reference, stored, received FROM compared WHERE differs
                              ORDER BY reference LIMIT p_conflicts_shown_max) shown), '[]')
      INTO already_present, conflict_count, conflicts
      FROM compared;
END $$;

-- A reconciliation run: what payflow knew at as_of (the payouts that had
-- succeeded and the settlement lines that had been imported by then),
-- classified at once. A run as of a past moment finds what a run then would
-- have found. since, when given, leaves out the payouts that succeeded before
-- it (and the lines naming them): the history before a deploy, or before a
-- period already closed. Runs are evidence too: never edited or deleted;
-- running again makes a new run.
CREATE TABLE reconciliation_runs (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    as_of       timestamptz NOT NULL,
    since       timestamptz CHECK (since <= as_of),
    window_days integer NOT NULL CHECK (window_days BETWEEN 1 AND 90),
    -- Per class: matched, pending (still within its window) and each exception code.
    counts      jsonb NOT NULL CHECK (jsonb_typeof(counts) = 'object'),
    -- Per currency: expected (payouts), settled (records) and their difference.
    totals      jsonb NOT NULL CHECK (jsonb_typeof(totals) = 'array'),
    created_by  uuid REFERENCES api_keys (id),  -- NULL: the CLI
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TRIGGER reconciliation_runs_immutable BEFORE UPDATE OR DELETE ON reconciliation_runs
    FOR EACH ROW EXECUTE FUNCTION payflow_refuse_change();
CREATE TRIGGER reconciliation_runs_no_truncate BEFORE TRUNCATE ON reconciliation_runs
    FOR EACH STATEMENT EXECUTE FUNCTION payflow_refuse_change();

-- What a run could not match, and how an operator resolved it.
-- difference = settled_amount - expected_amount (a fee of 25 is -25), when
-- the run has both in one currency. An exception an operator resolved in an
-- earlier run is recorded resolved again, with that resolution (who, when,
-- why) and resolution_carried_from naming the exception it was given to.
CREATE TABLE reconciliation_exceptions (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    run_id          uuid NOT NULL REFERENCES reconciliation_runs (id),
    code            text NOT NULL CHECK (code IN (
                        'amount_mismatch', 'currency_mismatch', 'late_settlement', 'early_settlement',
                        'missing_settlement', 'unexpected_settlement', 'duplicate_settlement',
                        'ambiguous_reference')),
    payout_id       uuid REFERENCES payouts (id),
    settlement_id   uuid REFERENCES settlements (id),
    currency        text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    expected_amount bigint,
    settled_amount  bigint,
    difference      bigint,
    details         jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(details) = 'object'),
    resolved_at     timestamptz,
    resolved_by     uuid REFERENCES api_keys (id),
    resolution_note text CHECK (char_length(resolution_note) BETWEEN 1 AND 1000),
    resolution_carried_from uuid REFERENCES reconciliation_exceptions (id),
    CONSTRAINT reconciliation_exceptions_names_something
        CHECK (payout_id IS NOT NULL OR settlement_id IS NOT NULL),
    CONSTRAINT reconciliation_exceptions_difference
        CHECK (difference IS NULL OR difference = settled_amount - expected_amount),
    CONSTRAINT reconciliation_exceptions_resolution
        CHECK ((resolved_at IS NULL) = (resolved_by IS NULL)
               AND (resolved_at IS NULL) = (resolution_note IS NULL)),
    CONSTRAINT reconciliation_exceptions_carried_resolution
        CHECK (resolution_carried_from IS NULL OR resolved_at IS NOT NULL)
);
CREATE INDEX reconciliation_exceptions_run ON reconciliation_exceptions (run_id, code, id);
-- The resolutions operators gave, which every run looks up: few (people write
-- them), while the exceptions of all runs grow with every run.
CREATE INDEX reconciliation_exceptions_resolutions ON reconciliation_exceptions (resolved_at)
    WHERE resolved_at IS NOT NULL AND resolution_carried_from IS NULL;

-- An exception is resolved at most once, and nothing else of it ever changes:
-- the resolution (who, when, why) is the audit record.
CREATE FUNCTION payflow_reconciliation_exception_guard() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    resolution constant text[] := ARRAY['resolved_at', 'resolved_by', 'resolution_note'];
BEGIN
    IF TG_OP <> 'UPDATE' OR OLD.resolved_at IS NOT NULL
       OR to_jsonb(NEW) - resolution IS DISTINCT FROM to_jsonb(OLD) - resolution THEN
        RAISE EXCEPTION 'reconciliation exceptions are only ever resolved, once: % refused', TG_OP
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER reconciliation_exceptions_guard BEFORE UPDATE OR DELETE ON reconciliation_exceptions
    FOR EACH ROW EXECUTE FUNCTION payflow_reconciliation_exception_guard();
CREATE TRIGGER reconciliation_exceptions_no_truncate BEFORE TRUNCATE ON reconciliation_exceptions
    FOR EACH STATEMENT EXECUTE FUNCTION payflow_refuse_change();

-- A run, in one statement (one snapshot: an import committing meanwhile is
-- either wholly in or wholly out).
-- * Naming: each record names a payout by its provider reference, else by its
--   id, both sides compared through payflow_reference_key. A reference that
--   names several payouts is ambiguous and settles none of them.
-- * Settling: per payout, the record that fits best settles it; any other
--   record naming it is a duplicate. Fit is graded: same currency first, then
--   the exact amount within the window, then within the window, then the
--   exact amount, then the nearest to the payout's success; settled_at,
--   source and reference then make the choice repeatable. A record with a
--   value date (settled_on) stands for every instant of that day: its lag is
--   the distance from the payout's success to the nearest of them.
-- * The rest: a record naming no payout that had succeeded by as_of is
--   unexpected; a payout with no record is missing once its window has
--   passed, pending before.
-- * Scope: with p_since, only the payouts that succeeded at or after it, every
--   record naming them, and the records (any instant of them) at or after it
--   that name no payout that succeeded before it.
-- * Resolutions: an exception an operator resolved by as_of (same code,
--   payout and settlement) is recorded resolved again, linked to it.
-- as_of defaults to this statement's start on the database's clock, the
-- clock that stamps succeeded_at and imported_at. outcome: 'created'
-- (run_id), 'as_of_in_future' or 'since_after_as_of'.
CREATE FUNCTION payflow_reconcile_v1(
    p_as_of timestamptz, p_since timestamptz, p_window_days integer, p_created_by uuid,
    OUT outcome text, OUT run_id uuid)
-- No nested loop: every join here is over whole sets, and a nested loop over
-- them took 12 to 20 s instead of 150 ms at 10,000 payouts. The planner
-- picked one with stale statistics right after many payouts succeeded (one
-- row expected, 10,000 found), and in the generic plan plpgsql may switch to
-- after five runs in a session.
LANGUAGE plpgsql SET enable_nestloop = off AS $$
DECLARE
    -- Hours, not days: in a session whose time zone keeps daylight saving
    -- time, timestamptz + N days is sometimes 24 N ± 1 hours.
    tolerance constant interval := make_interval(hours => 24 * p_window_days);
    run_as_of constant timestamptz := coalesce(p_as_of, statement_timestamp());
BEGIN
    IF run_as_of > statement_timestamp() THEN
        -- Payouts would be called missing before their window has passed.
        outcome := 'as_of_in_future';
        RETURN;
    ELSIF p_since > run_as_of THEN
        outcome := 'since_after_as_of';
        RETURN;
    END IF;
    WITH due AS (
        SELECT id, amount, currency, succeeded_at FROM payouts
         WHERE status = 'succeeded' AND succeeded_at <= run_as_of
           AND succeeded_at >= coalesce(p_since, '-infinity')
    ), reported AS (
        SELECT *,
               -- The line's last instant: a value date is the whole day.
               settled_at + CASE WHEN settled_on IS NULL THEN interval '0'
                                 ELSE interval '24 hours' - interval '1 microsecond' END AS settled_until,
               payflow_reference_key(payout_reference) AS payout_key
          FROM settlements
         WHERE imported_at <= run_as_of
    ), named AS (
        -- The payouts each record names: by provider reference, else by id.
        -- Status and success time are read only when it names one payout.
        SELECT DISTINCT ON (settlement_id) settlement_id, payout_ids, payout_status, payout_succeeded_at
          FROM (SELECT settlement_id, preference, array_agg(payout_id ORDER BY payout_id) AS payout_ids,
                       min(status) AS payout_status, min(succeeded_at) AS payout_succeeded_at
                  FROM (SELECT r.id AS settlement_id, p.id AS payout_id, p.status, p.succeeded_at,
                               1 AS preference
                          FROM reported r
                          JOIN payouts p ON payflow_reference_key(p.provider_reference) = r.payout_key
                        UNION ALL
                        SELECT r.id, p.id, p.status, p.succeeded_at, 2
                          FROM reported r JOIN payouts p ON p.id::text = r.payout_key) candidates
                 GROUP BY settlement_id, preference) per_preference
         ORDER BY settlement_id, preference
    ), records AS (
        SELECT r.id AS settlement_id, r.source, r.reference, r.amount, r.currency, r.settled_at,
               CASE WHEN cardinality(n.payout_ids) > 1 THEN n.payout_ids END AS ambiguous_payout_ids,
               CASE WHEN cardinality(n.payout_ids) = 1 THEN n.payout_ids[1] END AS named_payout_id,
               -- What the payout was at as_of, as far as payflow records it.
               CASE WHEN n.payout_succeeded_at > run_as_of THEN 'succeeded_after_as_of'
                    ELSE n.payout_status END AS payout_status,
               d.id AS payout_id, d.amount AS expected_amount, d.currency AS expected_currency,
               CASE WHEN r.settled_until < d.succeeded_at THEN r.settled_until - d.succeeded_at
                    WHEN r.settled_at > d.succeeded_at THEN r.settled_at - d.succeeded_at
                    ELSE interval '0' END AS lag
          FROM reported r
          LEFT JOIN named n ON n.settlement_id = r.id
          LEFT JOIN due d ON d.id = n.payout_ids[1] AND cardinality(n.payout_ids) = 1
         -- With since: the records of the run's payouts, and the others at or
         -- after since unless they name a payout that succeeded before it.
         WHERE p_since IS NULL OR d.id IS NOT NULL
            OR (r.settled_until >= p_since
                AND NOT coalesce(cardinality(n.payout_ids) = 1 AND n.payout_succeeded_at < p_since, false))
    ), ranked AS (
        SELECT *,
               first_value(settlement_id) OVER by_fit AS first_settlement_id,
               row_number() OVER by_fit AS rank
          FROM records
         WHERE payout_id IS NOT NULL
        WINDOW by_fit AS (PARTITION BY payout_id
                          ORDER BY currency = expected_currency DESC,
                                   (amount = expected_amount AND lag BETWEEN -tolerance AND tolerance) DESC,
                                   lag BETWEEN -tolerance AND tolerance DESC,
                                   amount = expected_amount DESC,
                                   abs(extract(epoch FROM lag)),
                                   settled_at, source, reference)
    ), classified AS (
        SELECT CASE WHEN rank > 1 THEN 'duplicate_settlement'
                    WHEN currency <> expected_currency THEN 'currency_mismatch'
                    WHEN amount <> expected_amount THEN 'amount_mismatch'
                    WHEN lag > tolerance THEN 'late_settlement'
                    WHEN lag < -tolerance THEN 'early_settlement'
                    ELSE 'matched' END AS code,
               payout_id, settlement_id, currency, expected_amount, amount AS settled_amount,
               CASE WHEN currency = expected_currency THEN amount - expected_amount END AS difference,
               CASE WHEN rank > 1 THEN jsonb_build_object('matched_settlement_id', first_settlement_id)
                    WHEN currency <> expected_currency
                    THEN jsonb_build_object('expected_currency', expected_currency)
                    ELSE '{}' END AS details
          FROM ranked
        UNION ALL
        SELECT CASE WHEN ambiguous_payout_ids IS NULL THEN 'unexpected_settlement'
                    ELSE 'ambiguous_reference' END,
               named_payout_id, settlement_id, currency, NULL, amount, NULL,
               CASE WHEN ambiguous_payout_ids IS NOT NULL
                    THEN jsonb_build_object('payout_ids', ambiguous_payout_ids)
                    WHEN named_payout_id IS NOT NULL
                    THEN jsonb_build_object('payout_status', payout_status)
                    ELSE '{}' END
          FROM records
         WHERE payout_id IS NULL
        UNION ALL
        SELECT CASE WHEN d.succeeded_at + tolerance < run_as_of THEN 'missing_settlement'
                    ELSE 'pending' END,
               d.id, NULL, d.currency, d.amount, NULL, NULL, '{}'
          FROM due d
         WHERE NOT EXISTS (SELECT 1 FROM records r WHERE r.payout_id = d.id)
    ), counted AS (
        SELECT jsonb_object_agg(codes.code, coalesce(found.n, 0)) AS counts
          FROM unnest(ARRAY['matched', 'pending', 'amount_mismatch', 'currency_mismatch',
                            'late_settlement', 'early_settlement', 'missing_settlement',
                            'unexpected_settlement', 'duplicate_settlement',
                            'ambiguous_reference']) AS codes (code)
          LEFT JOIN (SELECT code, count(*) AS n FROM classified GROUP BY code) found USING (code)
    ), summed AS (
        SELECT coalesce(jsonb_agg(jsonb_build_object(
                   'currency', currency, 'expected_amount', expected, 'settled_amount', settled,
                   'difference', settled - expected) ORDER BY currency), '[]') AS totals
          FROM (SELECT currency, sum(expected) AS expected, sum(settled) AS settled
                  FROM (SELECT currency, amount AS expected, 0 AS settled FROM due
                        UNION ALL
                        SELECT currency, 0, amount FROM records) amounts
                 GROUP BY currency) per_currency
    ), resolutions AS (
        -- The first resolution an operator gave each (code, payout, settlement) by as_of.
        SELECT DISTINCT ON (code, payout_id, settlement_id)
               id, code, payout_id, settlement_id, resolved_at, resolved_by, resolution_note
          FROM reconciliation_exceptions
         WHERE resolved_at <= run_as_of AND resolution_carried_from IS NULL
         ORDER BY code, payout_id, settlement_id, resolved_at, id
    ), run AS (
        INSERT INTO reconciliation_runs (as_of, since, window_days, counts, totals, created_by)
        SELECT run_as_of, p_since, p_window_days, counted.counts, summed.totals, p_created_by
          FROM counted, summed
        RETURNING id
    ), written AS (
        INSERT INTO reconciliation_exceptions (run_id, code, payout_id, settlement_id, currency,
                                               expected_amount, settled_amount, difference, details,
                                               resolved_at, resolved_by, resolution_note,
                                               resolution_carried_from)
        SELECT run.id, c.code, c.payout_id, c.settlement_id, c.currency, c.expected_amount,
               c.settled_amount, c.difference, c.details,
               earlier.resolved_at, earlier.resolved_by, earlier.resolution_note, earlier.id
          FROM classified c CROSS JOIN run
          -- The coalesce equality gives the planner a hash key (IS NOT DISTINCT
          -- FROM has none); exceptions without a settlement name a payout.
          LEFT JOIN resolutions earlier
                 ON earlier.code = c.code
                AND coalesce(earlier.settlement_id, earlier.payout_id)
                    = coalesce(c.settlement_id, c.payout_id)
                AND earlier.payout_id IS NOT DISTINCT FROM c.payout_id
                AND earlier.settlement_id IS NOT DISTINCT FROM c.settlement_id
         WHERE c.code NOT IN ('matched', 'pending')
    )
    SELECT 'created', id INTO outcome, run_id FROM run;
END $$;

CREATE FUNCTION payflow_reconciliation_run_json(r reconciliation_runs) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT jsonb_build_object(
        'id', r.id, 'object', 'reconciliation', 'as_of', payflow_timestamp_json(r.as_of),
        'since', payflow_timestamp_json(r.since), 'window_days', r.window_days,
        'status', CASE WHEN count(e.id) FILTER (WHERE e.resolved_at IS NULL) = 0 THEN 'reconciled'
                       ELSE 'exceptions_open' END,
        'counts', r.counts, 'totals', r.totals,
        'exceptions_total', count(e.id),
        'exceptions_open', count(e.id) FILTER (WHERE e.resolved_at IS NULL),
        'exceptions_resolved_earlier', count(e.id) FILTER (WHERE e.resolution_carried_from IS NOT NULL),
        'created_by', r.created_by, 'created_at', payflow_timestamp_json(r.created_at))
      FROM (SELECT 1) one LEFT JOIN reconciliation_exceptions e ON e.run_id = r.id
$$;

-- An exception with what the operator needs to chase it: the bank's line and
-- the payout's success time.
CREATE FUNCTION payflow_reconciliation_exception_json(e reconciliation_exceptions) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT jsonb_build_object(
        'id', e.id, 'object', 'reconciliation_exception', 'run_id', e.run_id, 'code', e.code,
        'payout_id', e.payout_id, 'settlement_id', e.settlement_id,
        'source', s.source, 'settlement_reference', s.reference,
        'payout_reference', coalesce(s.payout_reference, p.provider_reference),
        'currency', e.currency, 'expected_amount', e.expected_amount,
        'settled_amount', e.settled_amount, 'difference', e.difference,
        'succeeded_at', payflow_timestamp_json(p.succeeded_at),
        'settled_at', payflow_timestamp_json(s.settled_at), 'settled_on', s.settled_on,
        'details', e.details,
        'resolved_at', payflow_timestamp_json(e.resolved_at), 'resolved_by', e.resolved_by,
        'resolution_note', e.resolution_note, 'resolution_carried_from', e.resolution_carried_from)
      FROM (SELECT 1) one
      LEFT JOIN settlements s ON s.id = e.settlement_id
      LEFT JOIN payouts p ON p.id = e.payout_id
$$;

-- Resolves an open exception of a run. outcome: 'resolved', 'already_resolved'
-- (body: the exception, with who resolved it and when) or 'not_found'. A
-- concurrent resolve of the same exception waits for the first, then finds it
-- resolved: the lookup after the UPDATE is a new statement, with a new snapshot.
CREATE FUNCTION payflow_resolve_reconciliation_exception_v1(
    p_run uuid, p_exception uuid, p_note text, p_resolved_by uuid,
    OUT outcome text, OUT body jsonb)
LANGUAGE plpgsql AS $$
DECLARE
    found_exception reconciliation_exceptions;
BEGIN
    UPDATE reconciliation_exceptions
       SET resolved_at = now(), resolved_by = p_resolved_by, resolution_note = p_note
     WHERE id = p_exception AND run_id = p_run AND resolved_at IS NULL
    RETURNING * INTO found_exception;
    IF found_exception.id IS NOT NULL THEN
        outcome := 'resolved';
    ELSE
        SELECT * INTO found_exception FROM reconciliation_exceptions
         WHERE id = p_exception AND run_id = p_run;
        outcome := CASE WHEN found_exception.id IS NULL THEN 'not_found' ELSE 'already_resolved' END;
    END IF;
    IF found_exception.id IS NOT NULL THEN
        body := payflow_reconciliation_exception_json(found_exception);
    END IF;
END $$;
