-- Group commit for transfers: one transaction posts a batch of transfers, each
-- with its own idempotency key and its own outcome (one transfer's refusal,
-- e.g. insufficient funds, leaves its neighbours posted). A hot account is then
-- locked once per batch instead of once per transfer.
--
-- p_items: a JSON array of objects with the arguments of
-- payflow_post_transfer_v1 (scope, key, fingerprint, ttl_seconds, kind,
-- from_account_id, to_account_id, amount, currency, description, metadata,
-- owner). Returns one row per item, in the items' order (ordinality).
CREATE FUNCTION payflow_post_transfers_v1(p_items jsonb)
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
     WHERE id IN (SELECT (i ->> 'from_account_id')::uuid FROM jsonb_array_elements(p_items) i
                  UNION
                  SELECT (i ->> 'to_account_id')::uuid FROM jsonb_array_elements(p_items) i)
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

-- Event tasks of one claimed batch fan out in one transaction: each ends
-- (if still ours) and queues one delivery per subscribed endpoint, as
-- payflow_webhook_fan_out_v1 does for one. Returns the ids that were ours.
CREATE FUNCTION payflow_webhook_fan_out_many_v1(p_tasks bigint[], p_owner text)
RETURNS TABLE (task_id bigint)
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY
    WITH ended AS (
        UPDATE outbox
           SET status = 'done', lease_owner = NULL, lease_expires_at = NULL,
               last_error = NULL, finished_at = now()
         WHERE id = ANY (p_tasks) AND status = 'running' AND lease_owner = p_owner
        RETURNING id, topic, payload, created_at),
    queued AS (
        INSERT INTO outbox (topic, payload)
        SELECT 'webhook.deliver', jsonb_build_object(
                   'endpoint_id', w.id,
                   'event', jsonb_build_object('id', 'evt_' || e.id, 'type', e.topic,
                                               'created_at', payflow_timestamp_json(e.created_at),
                                               'data', e.payload))
          FROM ended e
          JOIN webhook_endpoints w
            ON w.enabled AND e.topic = ANY (w.event_types)
           AND w.created_at <= e.created_at  -- an endpoint gets events from its creation on
         ORDER BY e.id, w.id)
    SELECT id FROM ended;
END $$;

-- Workers wake on NOTIFY, but a statement that inserted no task (a fan-out
-- to no endpoint) has nothing to announce: NOTIFY takes a database-wide lock
-- at commit, so it is sent only when a task was queued.
CREATE OR REPLACE FUNCTION payflow_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT FROM inserted) THEN
        PERFORM pg_notify('payflow_outbox', '');
    END IF;
    RETURN NULL;
END $$;
DROP TRIGGER outbox_notify ON outbox;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION payflow_outbox_notify();
