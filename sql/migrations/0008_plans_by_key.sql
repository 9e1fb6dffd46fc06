-- Plans that stay lookups by key as the tables grow.
--
-- A connection plans each statement of a function once and keeps the plan
-- until the table's statistics change. Planned while a table was small (a
-- fresh deployment; statistics taken while it was empty), a lookup by key is
-- a sequential scan, and stays one while the table grows, until autovacuum
-- analyses it again (a minute or more): measured on this schema, a transfer
-- went from 0.9 ms to 53 ms once accounts, transfers and idempotency keys grew
-- from a few rows to 50,000, and the outbox claim scanned every done task the
-- same way.
--
-- Every statement of the functions below reads or locks rows by key or
-- through an index made for it, so they plan with sequential scans disabled
-- (a table with no usable index is still scanned: webhook endpoints). The
-- setting holds for what runs inside them: nested functions, and the
-- foreign-key checks of their inserts. Measured on warm, analysed tables, a
-- transfer costs the same with it (1.0-1.1 ms per call either way).

-- The idempotency lookup by primary key alone: with `expires_at > now()` in
-- the WHERE clause the planner could walk the expires_at index instead (every
-- live key). An expired key is new, as before.
CREATE OR REPLACE FUNCTION payflow_idempotency_begin_v1(
    p_scope text, p_key text, p_fingerprint text,
    OUT outcome text, OUT status integer, OUT body text)
LANGUAGE plpgsql AS $$
DECLARE
    stored idempotency_keys;
BEGIN
    IF p_key IS NULL THEN
        outcome := 'new';
        RETURN;
    END IF;
    IF NOT pg_try_advisory_xact_lock(hashtextextended(p_scope || E'\n' || p_key, 0)) THEN
        outcome := 'in_use';
        RETURN;
    END IF;
    -- A fresh snapshot (volatile plpgsql): a request that held the lock and
    -- committed just before we took it is visible here.
    SELECT * INTO stored FROM idempotency_keys WHERE scope = p_scope AND key = p_key;
    IF NOT FOUND OR stored.expires_at <= now() THEN
        outcome := 'new';
    ELSIF stored.fingerprint <> p_fingerprint THEN
        outcome := 'reused';
    ELSE
        outcome := 'replay';
        status := stored.response_status;
        body := stored.response_body;
    END IF;
END $$;

ALTER FUNCTION payflow_idempotency_begin_v1(text, text, text) SET enable_seqscan = off;
ALTER FUNCTION payflow_post_v1(text, uuid, uuid, bigint, text, text, jsonb, uuid, uuid, boolean)
    SET enable_seqscan = off;
ALTER FUNCTION payflow_post_transfers_v1(jsonb) SET enable_seqscan = off;
ALTER FUNCTION payflow_refund_transfer_v1(text, text, text, integer, uuid, bigint, text, jsonb, uuid)
    SET enable_seqscan = off;
ALTER FUNCTION payflow_system_account_v1(text, text) SET enable_seqscan = off;
ALTER FUNCTION payflow_create_payout_v1 SET enable_seqscan = off;
ALTER FUNCTION payflow_payout_start_v1(uuid) SET enable_seqscan = off;
ALTER FUNCTION payflow_payout_succeed_v1 SET enable_seqscan = off;
ALTER FUNCTION payflow_payout_fail_v1 SET enable_seqscan = off;
ALTER FUNCTION payflow_outbox_claim_v1(text, integer, double precision) SET enable_seqscan = off;
ALTER FUNCTION payflow_outbox_renew_v1(bigint, text, double precision) SET enable_seqscan = off;
ALTER FUNCTION payflow_outbox_finish_v1(bigint, text, text, text, timestamptz) SET enable_seqscan = off;
ALTER FUNCTION payflow_outbox_release_v1(bigint[], text, boolean) SET enable_seqscan = off;
ALTER FUNCTION payflow_webhook_fan_out_v1(bigint, text) SET enable_seqscan = off;
ALTER FUNCTION payflow_webhook_fan_out_many_v1(bigint[], text) SET enable_seqscan = off;
