-- 0003: the incremental, checkpointed audit behind GET /health.
--
-- A full scan of entries is ~350 ms at 10M rows, too slow for every /health
-- call. Instead each audit step checks only the entries written since the last
-- one: every entry continues its account's chain (previous balance_after +
-- amount = balance_after, version + 1), and running sums per currency must
-- stay 0. Entry ids are bigserial and commit out of order, so the checkpoint
-- only moves past ids that no running transaction can still commit: a step
-- records a horizon (the last id handed out, then a snapshot), and a later step
-- audits up to it once every transaction of that snapshot has ended.

CREATE TABLE audit_state (
    singleton           boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    checkpoint_entry_id bigint NOT NULL DEFAULT 0,
    horizon_entry_id    bigint,
    horizon_snapshot    pg_snapshot,
    -- Chain breaks found so far: they stay until an operator looks (payflow audit).
    chain_problems      jsonb NOT NULL DEFAULT '[]',
    -- What the last step saw of the balances (replaced at every step).
    balance_problems    jsonb NOT NULL DEFAULT '[]',
    audited_at          timestamptz
);
INSERT INTO audit_state DEFAULT VALUES;

-- The audited tail of each account's chain. No foreign key on purpose: its
-- check would take a KEY SHARE lock on the account row and so wait behind
-- every transfer holding that account.
CREATE TABLE audit_accounts (
    account_id      uuid PRIMARY KEY,
    balance_after   bigint NOT NULL,
    account_version bigint NOT NULL
);

CREATE TABLE audit_currency_sums (
    currency    text PRIMARY KEY,
    entries_sum numeric NOT NULL
);

-- Audits the entries from the checkpoint up to a settled horizon (at most
-- p_batch_size of them), then records the next horizon.
CREATE FUNCTION payflow_audit_advance_v1(p_batch_size integer) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    state audit_state;
    upto bigint;
    found_problems jsonb;
BEGIN
    SELECT * INTO state FROM audit_state FOR UPDATE;

    IF state.horizon_entry_id IS NOT NULL
       AND pg_snapshot_xmin(pg_current_snapshot()) >= pg_snapshot_xmax(state.horizon_snapshot) THEN
        upto := least(state.horizon_entry_id, state.checkpoint_entry_id + p_batch_size);

        WITH batch AS (
            SELECT e.account_id, a.currency, e.amount, e.id AS entry_id, e.balance_after,
                   e.account_version,
                   coalesce(tail.balance_after, 0) + sum(e.amount) OVER chain AS expected_balance,
                   coalesce(tail.account_version, 0) + row_number() OVER chain AS expected_version,
                   row_number() OVER chain = count(*) OVER (PARTITION BY e.account_id) AS is_last
              FROM entries e
              JOIN accounts a ON a.id = e.account_id
              LEFT JOIN audit_accounts tail ON tail.account_id = e.account_id
             WHERE e.id > state.checkpoint_entry_id AND e.id <= upto
            WINDOW chain AS (PARTITION BY e.account_id ORDER BY e.id)
        ), tails AS (
            INSERT INTO audit_accounts AS t (account_id, balance_after, account_version)
            SELECT account_id, balance_after, account_version FROM batch WHERE is_last
            ON CONFLICT (account_id) DO UPDATE
               SET balance_after = EXCLUDED.balance_after,
                   account_version = EXCLUDED.account_version
        ), sums AS (
            INSERT INTO audit_currency_sums AS t (currency, entries_sum)
            SELECT currency, sum(amount) FROM batch GROUP BY currency
            ON CONFLICT (currency) DO UPDATE SET entries_sum = t.entries_sum + EXCLUDED.entries_sum
        )
        SELECT coalesce(jsonb_agg(jsonb_build_object(
                   'code', 'entry_chain_broken', 'account_id', account_id, 'entry_id', entry_id,
                   'balance_after', balance_after, 'expected_balance', expected_balance,
                   'account_version', account_version, 'expected_version', expected_version)),
               '[]')
          INTO found_problems
          FROM batch
         WHERE balance_after <> expected_balance OR account_version <> expected_version;

        UPDATE audit_state
           SET checkpoint_entry_id = upto,
               chain_problems = chain_problems || found_problems,
               horizon_entry_id = nullif(horizon_entry_id, upto),
               horizon_snapshot = CASE WHEN horizon_entry_id = upto THEN NULL
                                       ELSE horizon_snapshot END;
    END IF;

    -- Record a new horizon. The order matters: the last id handed out is read
    -- first, the snapshot second, so any transaction that took an id up to the
    -- horizon is either finished or listed as running in the snapshot.
    IF (SELECT s.horizon_entry_id IS NULL FROM audit_state s) THEN
        UPDATE audit_state SET horizon_entry_id = coalesce(
            pg_sequence_last_value(pg_get_serial_sequence('entries', 'id')::regclass), 0);
        UPDATE audit_state SET horizon_snapshot = pg_current_snapshot();
    END IF;

    -- Balances move in balanced pairs inside one transaction, so in any
    -- snapshot each currency's balances sum to exactly 0: a balance edited by
    -- hand shows here at once, whatever the checkpoint.
    UPDATE audit_state SET audited_at = now(), balance_problems = (
        SELECT coalesce(jsonb_agg(jsonb_build_object(
                   'code', 'balances_unbalanced', 'currency', currency, 'balances_sum', total)),
               '[]')
          FROM (SELECT currency, sum(balance) AS total FROM accounts GROUP BY currency) totals
         WHERE total <> 0);
END $$;

-- What GET /health reports: the audit at most p_max_age_ms old. One auditor
-- runs at a time across all API processes; the others report its last result.
CREATE FUNCTION payflow_audit_status_v1(
    p_batch_size integer, p_max_age_ms integer,
    OUT audited_at timestamptz, OUT checkpoint_entry_id bigint,
    OUT entries_sum numeric, OUT problems jsonb)
LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT s.audited_at IS NULL
               OR s.audited_at < clock_timestamp() - make_interval(secs => p_max_age_ms / 1000.0)
          FROM audit_state s)
       AND pg_try_advisory_xact_lock(hashtextextended('payflow audit', 0)) THEN
        PERFORM payflow_audit_advance_v1(p_batch_size);
    END IF;

    SELECT s.audited_at, s.checkpoint_entry_id, s.chain_problems || s.balance_problems
      INTO audited_at, checkpoint_entry_id, problems
      FROM audit_state s;
    SELECT coalesce(sum(c.entries_sum), 0),
           problems || coalesce(jsonb_agg(jsonb_build_object(
               'code', 'entries_unbalanced', 'currency', c.currency, 'entries_sum', c.entries_sum))
               FILTER (WHERE c.entries_sum <> 0), '[]')
      INTO entries_sum, problems
      FROM audit_currency_sums c;
END $$;
