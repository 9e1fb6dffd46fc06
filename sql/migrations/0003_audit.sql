-- 0003: the incremental, checkpointed audit behind GET /health.
--
-- A full scan of entries is ~350 ms at 10M rows, too slow for every /health
-- call. Instead each audit step
--   * checks the entries written since the last step: every entry continues
--     its account's chain (previous balance_after + amount = balance_after,
--     version + 1), and the running sum of entries per currency stays 0;
--   * checks that each currency's balances sum to 0 (one scan of accounts);
--   * checks a window of accounts (rotating through all of them) against the
--     entry of their current version: balance = balance_after.
--
-- Entry ids are bigserial and commit out of order, so the checkpoint only
-- moves past ids that no running transaction can still commit. A step reads
-- the last id handed out (the horizon) and only then takes an xid of its own;
-- every transaction that took an id up to the horizon already had an xid (the
-- posting function writes before it inserts entries) and so a smaller one. A
-- later step audits up to the horizon once the oldest running xid is past the
-- recorded one: every such transaction has then ended.

CREATE TABLE audit_state (
    singleton             boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    checkpoint_entry_id   bigint NOT NULL DEFAULT 0,
    horizon_entry_id      bigint,
    horizon_xid           xid8,
    horizon_recorded_at   timestamptz,
    -- Where the rotating balance check resumes.
    balance_check_after   uuid,
    -- Chain breaks found so far. They stay until an operator has looked and
    -- rebuilt the audit (`payflow audit --rebuild`).
    chain_problems        jsonb NOT NULL DEFAULT '[]',
    -- What the last step saw of the balance sums (replaced at every step).
    balance_sum_problems  jsonb NOT NULL DEFAULT '[]',
    audited_at            timestamptz
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

-- Accounts whose balance disagreed with their latest entry when last checked.
CREATE TABLE audit_balance_problems (
    account_id uuid PRIMARY KEY,
    problem    jsonb NOT NULL
);

-- Audits the entries from the checkpoint up to a settled horizon (at most
-- p_batch_size of them), checks the balances, then records the next horizon.
CREATE FUNCTION payflow_audit_advance_v1(p_batch_size integer, p_accounts_per_step integer)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    next_horizon bigint;
    own_xid xid8;
    state audit_state;
    upto bigint;
    found_problems jsonb;
    window_last uuid;
    window_size integer;
BEGIN
    -- First the last id handed out, then our own xid (see the header).
    next_horizon := coalesce(
        pg_sequence_last_value(pg_get_serial_sequence('entries', 'id')::regclass), 0);
    own_xid := pg_current_xact_id();

    SELECT * INTO state FROM audit_state FOR UPDATE;

    IF state.horizon_entry_id IS NOT NULL
       AND pg_snapshot_xmin(pg_current_snapshot()) > state.horizon_xid THEN
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
               chain_problems = chain_problems || found_problems;
        IF upto = state.horizon_entry_id THEN
            UPDATE audit_state
               SET horizon_entry_id = NULL, horizon_xid = NULL, horizon_recorded_at = NULL;
        END IF;
    END IF;

    IF (SELECT s.horizon_entry_id IS NULL FROM audit_state s) THEN
        UPDATE audit_state
           SET horizon_entry_id = greatest(next_horizon, checkpoint_entry_id),
               horizon_xid = own_xid, horizon_recorded_at = now();
    END IF;

    -- Balances move in balanced pairs inside one transaction, so in any
    -- snapshot each currency's balances sum to exactly 0.
    UPDATE audit_state SET balance_sum_problems = (
        SELECT coalesce(jsonb_agg(jsonb_build_object(
                   'code', 'balances_unbalanced', 'currency', currency, 'balances_sum', total)),
               '[]')
          FROM (SELECT currency, sum(balance) AS total FROM accounts GROUP BY currency) totals
         WHERE total <> 0);

    -- A window of accounts against the entry of their current version (an
    -- index lookup each); the window wraps around, covering every account.
    WITH checked AS (
        SELECT a.id, a.balance IS DISTINCT FROM
                     CASE WHEN a.version = 0 THEN 0 ELSE e.balance_after END AS bad,
               jsonb_build_object('code', 'balance_disagrees_with_entries', 'account_id', a.id,
                                  'balance', a.balance, 'version', a.version,
                                  'entry_balance_after', e.balance_after) AS problem
          FROM (SELECT * FROM accounts
                 WHERE id > coalesce(state.balance_check_after,
                                     '00000000-0000-0000-0000-000000000000')
                 ORDER BY id LIMIT p_accounts_per_step) a
          LEFT JOIN entries e ON e.account_id = a.id AND e.account_version = a.version
    ), cleared AS (
        DELETE FROM audit_balance_problems p USING checked c WHERE p.account_id = c.id AND NOT c.bad
    ), recorded AS (
        INSERT INTO audit_balance_problems (account_id, problem)
        SELECT id, problem FROM checked WHERE bad
        ON CONFLICT (account_id) DO UPDATE SET problem = EXCLUDED.problem
    )
    SELECT max(id::text)::uuid, count(*) INTO window_last, window_size FROM checked;
    IF window_size < p_accounts_per_step THEN
        window_last := NULL;  -- the end: the next window starts over
    END IF;

    UPDATE audit_state SET balance_check_after = window_last, audited_at = now();
END $$;

-- What GET /health reports: the audit at most p_max_age_ms old. One auditor
-- runs at a time across all API processes; the others report its last result.
CREATE FUNCTION payflow_audit_status_v1(
    p_batch_size integer, p_accounts_per_step integer, p_max_age_ms integer,
    OUT audited_at timestamptz, OUT checkpoint_entry_id bigint,
    OUT unaudited_entries bigint, OUT horizon_age_seconds double precision,
    OUT entries_sum numeric, OUT problems jsonb)
LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT s.audited_at IS NULL
               OR s.audited_at < clock_timestamp() - make_interval(secs => p_max_age_ms / 1000.0)
          FROM audit_state s)
       AND pg_try_advisory_xact_lock(hashtextextended('payflow audit', 0)) THEN
        PERFORM payflow_audit_advance_v1(p_batch_size, p_accounts_per_step);
    END IF;

    SELECT s.audited_at, s.checkpoint_entry_id,
           coalesce(pg_sequence_last_value(pg_get_serial_sequence('entries', 'id')::regclass), 0)
               - s.checkpoint_entry_id,
           extract(epoch FROM clock_timestamp() - s.horizon_recorded_at),
           s.chain_problems || s.balance_sum_problems
              || coalesce((SELECT jsonb_agg(p.problem ORDER BY p.account_id)
                             FROM audit_balance_problems p), '[]')
      INTO audited_at, checkpoint_entry_id, unaudited_entries, horizon_age_seconds, problems
      FROM audit_state s;
    SELECT coalesce(sum(c.entries_sum), 0),
           problems || coalesce(jsonb_agg(jsonb_build_object(
               'code', 'entries_unbalanced', 'currency', c.currency, 'entries_sum', c.entries_sum))
               FILTER (WHERE c.entries_sum <> 0), '[]')
      INTO entries_sum, problems
      FROM audit_currency_sums c;
END $$;

-- Starts the incremental audit over from the first entry (after an operator
-- has looked at the problems it reported).
CREATE FUNCTION payflow_audit_rebuild_v1() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('payflow audit', 0));
    DELETE FROM audit_accounts;
    DELETE FROM audit_currency_sums;
    DELETE FROM audit_balance_problems;
    UPDATE audit_state
       SET checkpoint_entry_id = 0, horizon_entry_id = NULL, horizon_xid = NULL,
           horizon_recorded_at = NULL, balance_check_after = NULL, chain_problems = '[]',
           balance_sum_problems = '[]', audited_at = NULL;
END $$;
