-- Plans that stay lookups by key as the tables grow.
--
-- A connection plans a function's statement afresh for its first five runs,
-- then may keep one generic plan until the table's catalogue entry changes
-- (an ANALYZE, a VACUUM, DDL). Kept from a time when the table was small (a
-- fresh deployment; statistics taken while it was empty), a lookup by key is
-- a sequential scan, and stays one while the table grows, until autovacuum
-- gets to the table (a minute or more): measured on this schema, a transfer
-- went from 0.9 ms to 53 ms once accounts, transfers and idempotency keys grew
-- from a few rows to 50,000, and the outbox claim scanned every done task the
-- same way.
--
-- The functions below read and lock rows by key or through an index made for
-- it, so they plan with sequential scans disabled (a table with no usable
-- index is still scanned: webhook endpoints). The setting holds for what runs
-- inside them: nested functions, and the foreign-key checks of their inserts
-- when a connection first plans those checks inside them (a connection that
-- ran plain INSERTs into transfers or entries before, e.g. a bulk load, keeps
-- the check plans it made then). With plans made small, the outbox updates by
-- id may walk the running tasks' lease index instead of the primary key:
-- bounded by the tasks running at once, not by the table. Measured on warm,
-- analysed tables, a transfer costs the same with the setting (1.0-1.1 ms per
-- call either way).

-- A batch locks its accounts by key: `id IN (SELECT ... jsonb_array_elements
-- ...)` was planned as a join that read every account (a sequential scan
-- even with fresh statistics, a full index scan with sequential scans off);
-- an array of ids is an index lookup per id. Otherwise as in 0007.
CREATE OR REPLACE FUNCTION payflow_post_transfers_v1(p_items jsonb)
RETURNS TABLE (ordinality bigint, outcome text, status integer, body text)
LANGUAGE plpgsql AS $$
DECLARE
    item record;
BEGIN
    -- Every account of the batch, locked once in id order up front: the
    -- transfers below lock theirs again (already held), so two batches, or a
    -- batch and a single transfer, always lock in one global order and never
    -- deadlock.
    PERFORM 1 FROM accounts
     WHERE id = ANY (ARRAY(SELECT (i ->> 'from_account_id')::uuid FROM jsonb_array_elements(p_items) i
                           UNION
                           SELECT (i ->> 'to_account_id')::uuid FROM jsonb_array_elements(p_items) i))
     ORDER BY id
       FOR UPDATE;
    FOR item IN SELECT i.value, i.ordinality FROM jsonb_array_elements(p_items) WITH ORDINALITY i LOOP
        RETURN QUERY
        SELECT item.ordinality, t.outcome, t.status, t.body
          FROM payflow_post_transfer_v1(
                   item.value ->> 'scope', item.value ->> 'key', item.value ->> 'fingerprint',
                   (item.value ->> 'ttl_seconds')::integer, item.value ->> 'kind',
                   (item.value ->> 'from_account_id')::uuid, (item.value ->> 'to_account_id')::uuid,
                   (item.value ->> 'amount')::bigint, item.value ->> 'currency',
                   item.value ->> 'description', item.value -> 'metadata',
                   (item.value ->> 'owner')::uuid) t;
    END LOOP;
END $$;

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
ALTER FUNCTION payflow_create_payout_v1(text, text, text, integer, uuid, bigint, text, jsonb, uuid)
    SET enable_seqscan = off;
ALTER FUNCTION payflow_payout_start_v1(uuid) SET enable_seqscan = off;
ALTER FUNCTION payflow_payout_succeed_v1(uuid, text, bigint, text) SET enable_seqscan = off;
ALTER FUNCTION payflow_payout_fail_v1(uuid, text, bigint, text) SET enable_seqscan = off;
ALTER FUNCTION payflow_outbox_claim_v1(text, integer, double precision) SET enable_seqscan = off;
ALTER FUNCTION payflow_outbox_renew_v1(bigint, text, double precision) SET enable_seqscan = off;
ALTER FUNCTION payflow_outbox_finish_v1(bigint, text, text, text, timestamptz) SET enable_seqscan = off;
ALTER FUNCTION payflow_outbox_release_v1(bigint[], text, boolean) SET enable_seqscan = off;
ALTER FUNCTION payflow_webhook_fan_out_v1(bigint, text) SET enable_seqscan = off;
ALTER FUNCTION payflow_webhook_fan_out_many_v1(bigint[], text) SET enable_seqscan = off;
