-- 0005: refunds (partial, never more than the original, never of a refund) and
-- point-in-time balances.

CREATE INDEX transfers_reverses ON transfers (reverses_transfer_id) WHERE reverses_transfer_id IS NOT NULL;

-- Entries take their time when they are written, under the account's row lock,
-- so an account's entries are in time order (now() is the transaction's start:
-- a transaction that waited for the lock would look older than its predecessor).
ALTER TABLE entries ALTER COLUMN created_at SET DEFAULT clock_timestamp();
-- Point-in-time balances: the last entry at or before a moment, by index.
CREATE INDEX entries_account_created_at ON entries (account_id, created_at);

-- A transfer with its refunds, as GET /v1/transfers/{id} shows it.
CREATE FUNCTION payflow_transfer_with_refunds_json(t transfers) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT payflow_transfer_json(t) || jsonb_build_object(
        'amount_refunded', coalesce(sum(r.amount), 0),
        'refunds', coalesce(jsonb_agg(jsonb_build_object('id', r.id, 'amount', r.amount,
                                                         'created_at', payflow_timestamp_json(r.created_at))
                                      ORDER BY r.created_at, r.id) FILTER (WHERE r.id IS NOT NULL), '[]'))
      FROM transfers r
     WHERE r.reverses_transfer_id = t.id AND r.kind = 'refund'
$$;

-- POST /v1/transfers/{id}/refunds in one round trip. The original transfer's
-- row lock serializes concurrent refunds of it, so their sum can never pass
-- the original amount.
CREATE FUNCTION payflow_refund_transfer_v1(
    p_scope text, p_key text, p_fingerprint text, p_ttl_seconds integer,
    p_transfer uuid, p_amount bigint, p_description text, p_metadata jsonb, p_owner uuid DEFAULT NULL,
    OUT outcome text, OUT status integer, OUT body text)
LANGUAGE plpgsql AS $$
DECLARE
    original transfers;
    refunded bigint;
    refund_amount bigint;
    result record;
    refusal jsonb;
BEGIN
    SELECT b.outcome, b.status, b.body INTO outcome, status, body
      FROM payflow_idempotency_begin_v1(p_scope, p_key, p_fingerprint) b;
    IF outcome <> 'new' THEN
        RETURN;
    END IF;

    SELECT t.* INTO original FROM transfers t
     WHERE t.id = p_transfer
       AND (p_owner IS NULL OR EXISTS (SELECT 1 FROM accounts a
                                        WHERE a.id IN (t.from_account_id, t.to_account_id)
                                          AND a.owner_key_id = p_owner))
       FOR UPDATE;
    IF original.id IS NULL THEN
        refusal := payflow_refusal_v1(404, 'transfer_not_found', 'No transfer with this id.',
                                      jsonb_build_object('transfer_id', p_transfer));
    ELSIF original.kind <> 'transfer' THEN
        refusal := payflow_refusal_v1(
            422, 'not_refundable', 'Only transfers can be refunded (not refunds, payouts or reversals).',
            jsonb_build_object('transfer_id', p_transfer, 'kind', original.kind));
    ELSE
        SELECT coalesce(sum(amount), 0) INTO refunded FROM transfers
         WHERE reverses_transfer_id = original.id AND kind = 'refund';
        refund_amount := coalesce(p_amount, original.amount - refunded);
        IF refund_amount <= 0 OR refunded + refund_amount > original.amount THEN
            refusal := payflow_refusal_v1(
                422, 'refund_exceeds_transfer', 'Refunds cannot add up to more than the transfer.',
                jsonb_build_object('transfer_id', p_transfer, 'amount', original.amount,
                                   'amount_refunded', refunded, 'requested', refund_amount));
        END IF;
    END IF;

    IF refusal IS NULL THEN
        -- The money goes back: from the original's destination to its source.
        SELECT * INTO result
          FROM payflow_post_v1('refund', original.to_account_id, original.from_account_id,
                               refund_amount, original.currency, p_description, p_metadata,
                               original.id, p_owner);
        refusal := result.refusal;
    END IF;

    IF refusal IS NOT NULL THEN
        SELECT r.* INTO outcome, status, body FROM payflow_refused_v1(refusal) r;
    ELSE
        INSERT INTO outbox (topic, payload)
        VALUES ('transfer.posted', jsonb_build_object('transfer_id', (result.posted).id));
        outcome := 'created';
        status := 201;
        body := payflow_transfer_json(result.posted)::text;
    END IF;
    PERFORM payflow_idempotency_finish_v1(p_scope, p_key, p_fingerprint, status, body, p_ttl_seconds);
END $$;

-- Transfer search: keyset pages, newest first, by account (either side) or over all.
CREATE INDEX transfers_from_created ON transfers (from_account_id, created_at, id);
CREATE INDEX transfers_to_created ON transfers (to_account_id, created_at, id);
CREATE INDEX transfers_created ON transfers (created_at, id);
