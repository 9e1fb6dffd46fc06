-- 0002: the posting path as SQL functions, so a transfer is one round trip and
-- the account row locks are held only while PostgreSQL itself works (no network
-- round trip happens under a lock). Names carry a version: a change of
-- behaviour is a new function, so old and new code can run side by side.

-- RFC 3339 in UTC whatever the session's TimeZone: stored responses must not
-- depend on the connection that wrote them.
CREATE FUNCTION payflow_timestamp_json(value timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT to_char(value AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
$$;

-- The one error shape of the HTTP API (the Python handlers build the same).
CREATE FUNCTION payflow_error_json(code text, message text, details jsonb DEFAULT '{}')
RETURNS jsonb LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT jsonb_build_object('error',
        jsonb_build_object('code', code, 'message', message, 'details', details))
$$;

CREATE FUNCTION payflow_account_json(a accounts) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT jsonb_build_object(
        'id', a.id, 'object', 'account', 'name', a.name, 'currency', a.currency,
        'balance', a.balance, 'overdraft_limit', a.overdraft_limit,
        'is_system', a.is_system, 'version', a.version,
        'created_at', payflow_timestamp_json(a.created_at))
$$;

CREATE FUNCTION payflow_transfer_json(t transfers) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT jsonb_build_object(
        'id', t.id, 'object', 'transfer', 'kind', t.kind,
        'from_account_id', t.from_account_id, 'to_account_id', t.to_account_id,
        'amount', t.amount, 'currency', t.currency, 'status', t.status,
        'description', t.description, 'metadata', t.metadata,
        'reverses_transfer_id', t.reverses_transfer_id,
        'created_at', payflow_timestamp_json(t.created_at))
$$;

CREATE FUNCTION payflow_entry_json(e entries) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT jsonb_build_object(
        'id', e.id::text, 'object', 'entry', 'transfer_id', e.transfer_id,
        'account_id', e.account_id, 'amount', e.amount,
        'balance_after', e.balance_after, 'account_version', e.account_version,
        'created_at', payflow_timestamp_json(e.created_at))
$$;

-- Starts an idempotent request. outcome is
--   'new'     nothing stored: execute, then call payflow_idempotency_finish_v1
--   'replay'  completed before: status and body are the stored response
--   'reused'  the key was used for a different request
--   'in_use'  a live transaction is executing this key right now
-- The database, not Redis, decides whether a request is running: the advisory
-- lock lives exactly as long as the transaction executing the request, so a
-- crashed or rolled-back request never blocks or burns its key.
CREATE FUNCTION payflow_idempotency_begin_v1(
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
    SELECT * INTO stored FROM idempotency_keys
     WHERE scope = p_scope AND key = p_key AND expires_at > now();
    IF NOT FOUND THEN
        outcome := 'new';
    ELSIF stored.fingerprint <> p_fingerprint THEN
        outcome := 'reused';
    ELSE
        outcome := 'replay';
        status := stored.response_status;
        body := stored.response_body;
    END IF;
END $$;

CREATE FUNCTION payflow_idempotency_finish_v1(
    p_scope text, p_key text, p_fingerprint text, p_status integer, p_body text,
    p_ttl_seconds integer)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    written integer;
BEGIN
    IF p_key IS NULL THEN
        RETURN;
    END IF;
    INSERT INTO idempotency_keys AS k
           (scope, key, fingerprint, response_status, response_body, expires_at)
    VALUES (p_scope, p_key, p_fingerprint, p_status, p_body,
            now() + make_interval(secs => p_ttl_seconds))
    ON CONFLICT (scope, key) DO UPDATE
        SET fingerprint = EXCLUDED.fingerprint, response_status = EXCLUDED.response_status,
            response_body = EXCLUDED.response_body, created_at = now(),
            expires_at = EXCLUDED.expires_at
        WHERE k.expires_at <= now();  -- only an expired key may be taken over
    GET DIAGNOSTICS written = ROW_COUNT;
    IF written <> 1 THEN  -- impossible while payflow_idempotency_begin_v1 holds the lock
        RAISE EXCEPTION 'idempotency key % already stored', p_key
            USING ERRCODE = 'unique_violation', CONSTRAINT = 'idempotency_keys_pkey';
    END IF;
END $$;

CREATE FUNCTION payflow_create_account_v1(
    p_scope text, p_key text, p_fingerprint text, p_ttl_seconds integer,
    p_name text, p_currency text, p_overdraft_limit bigint, p_is_system boolean,
    p_owner uuid DEFAULT NULL,
    OUT outcome text, OUT status integer, OUT body text)
LANGUAGE plpgsql AS $$
DECLARE
    created accounts;
BEGIN
    SELECT b.outcome, b.status, b.body INTO outcome, status, body
      FROM payflow_idempotency_begin_v1(p_scope, p_key, p_fingerprint) b;
    IF outcome <> 'new' THEN
        RETURN;
    END IF;
    INSERT INTO accounts (name, currency, overdraft_limit, is_system, owner_key_id)
    VALUES (p_name, p_currency, p_overdraft_limit, p_is_system, p_owner)
    RETURNING * INTO created;
    outcome := 'created';
    status := 201;
    body := payflow_account_json(created)::text;
    PERFORM payflow_idempotency_finish_v1(p_scope, p_key, p_fingerprint, status, body, p_ttl_seconds);
END $$;

-- A refusal: the {status, body} of a 4xx business outcome, stored for replay.
CREATE FUNCTION payflow_refusal_v1(p_status integer, p_code text, p_message text, p_details jsonb)
RETURNS jsonb LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT jsonb_build_object('status', p_status,
                              'body', payflow_error_json(p_code, p_message, p_details))
$$;

-- A refusal as the (outcome, status, body) every posting function returns.
CREATE FUNCTION payflow_refused_v1(refusal jsonb, OUT outcome text, OUT status integer, OUT body text)
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT 'refused', (refusal ->> 'status')::integer, (refusal -> 'body')::text
$$;

-- The business checks of a transfer, on the locked rows. NULL when it may go
-- ahead, else {status, body} of the refusal (a 4xx stored for replay).
-- p_owner (a caller without admin scope) may move only its own accounts' money;
-- another owner's account is "not found", so ids cannot be probed across tenants.
CREATE FUNCTION payflow_transfer_refusal_v1(
    source accounts, destination accounts, p_from uuid, p_to uuid,
    p_amount bigint, p_currency text, p_owner uuid, p_allow_overdraft boolean)
RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    bigint_max constant numeric := 9223372036854775807;
BEGIN
    IF p_owner IS NOT NULL AND source.owner_key_id IS DISTINCT FROM p_owner THEN
        source := NULL;
    END IF;
    IF source.id IS NULL OR destination.id IS NULL THEN
        RETURN payflow_refusal_v1(404,
            'account_not_found', 'No account with this id.',
            jsonb_build_object('account_id', CASE WHEN source.id IS NULL THEN p_from ELSE p_to END));
    END IF;
    IF source.currency <> destination.currency
       OR source.currency <> coalesce(p_currency, source.currency) THEN
        -- No detail of the destination: it may be another tenant's account.
        RETURN payflow_refusal_v1(422,
            'currency_mismatch', 'A transfer moves one currency, held by both accounts.',
            jsonb_build_object('from_currency', source.currency,
                               'currency', coalesce(p_currency, source.currency)));
    END IF;
    IF source.overdraft_limit IS NOT NULL
       AND source.balance::numeric - p_amount
           < -(CASE WHEN p_allow_overdraft THEN source.overdraft_limit ELSE 0 END) THEN
        RETURN payflow_refusal_v1(422,
            'insufficient_funds', 'The source account cannot cover this amount.',
            jsonb_build_object('account_id', source.id, 'amount', p_amount));
    END IF;
    IF destination.balance::numeric + p_amount > bigint_max
       OR source.balance::numeric - p_amount < -bigint_max - 1 THEN
        RETURN payflow_refusal_v1(422,
            'balance_limit_exceeded', 'The transfer would take a balance past the 64-bit limit.',
            jsonb_build_object('amount', p_amount));
    END IF;
    RETURN NULL;
END $$;

-- The heart of every money movement, inside the caller's transaction: locks
-- both accounts in ascending id order (to prevent deadlocks between opposite
-- transfers, A->B and B->A), checks them, and writes the transfer, its two
-- entries (balance_after, version) and the new balances. Returns the refusal
-- ({status, body}) when it may not go ahead, else the posted transfer.
CREATE FUNCTION payflow_post_v1(
    p_kind text, p_from uuid, p_to uuid, p_amount bigint, p_currency text,
    p_description text, p_metadata jsonb, p_reverses uuid, p_owner uuid,
    p_allow_overdraft boolean DEFAULT true,
    OUT refusal jsonb, OUT posted transfers)
LANGUAGE plpgsql AS $$
DECLARE
    locked accounts;
    source accounts;
    destination accounts;
BEGIN
    FOR locked IN SELECT * FROM accounts WHERE id IN (p_from, p_to) ORDER BY id FOR UPDATE LOOP
        IF locked.id = p_from THEN
            source := locked;
        ELSE
            destination := locked;
        END IF;
    END LOOP;

    refusal := payflow_transfer_refusal_v1(source, destination, p_from, p_to, p_amount, p_currency,
                                           p_owner, p_allow_overdraft);
    IF refusal IS NOT NULL THEN
        RETURN;
    END IF;

    INSERT INTO transfers (kind, from_account_id, to_account_id, amount, currency,
                           description, metadata, reverses_transfer_id)
    VALUES (p_kind, p_from, p_to, p_amount, source.currency, p_description,
            coalesce(p_metadata, '{}'), p_reverses)
    RETURNING * INTO posted;

    UPDATE accounts SET balance = balance - p_amount, version = version + 1
     WHERE id = p_from RETURNING * INTO source;
    UPDATE accounts SET balance = balance + p_amount, version = version + 1
     WHERE id = p_to RETURNING * INTO destination;

    -- Inserted after the rows above gave this transaction its xid: the
    -- incremental audit relies on entry ids being taken by transactions that
    -- already have one (see payflow_audit_advance_v1).
    INSERT INTO entries (transfer_id, account_id, amount, balance_after, account_version)
    VALUES (posted.id, p_from, -p_amount, source.balance, source.version),
           (posted.id, p_to, p_amount, destination.balance, destination.version);
END $$;

-- One transfer, one transaction, one round trip: idempotency check, the
-- posting, an outbox task (transfer.posted), and the response stored for replay.
CREATE FUNCTION payflow_post_transfer_v1(
    p_scope text, p_key text, p_fingerprint text, p_ttl_seconds integer,
    p_kind text, p_from uuid, p_to uuid, p_amount bigint, p_currency text,
    p_description text, p_metadata jsonb, p_owner uuid DEFAULT NULL,
    OUT outcome text, OUT status integer, OUT body text)
LANGUAGE plpgsql AS $$
DECLARE
    result record;
BEGIN
    SELECT b.outcome, b.status, b.body INTO outcome, status, body
      FROM payflow_idempotency_begin_v1(p_scope, p_key, p_fingerprint) b;
    IF outcome <> 'new' THEN
        RETURN;
    END IF;

    SELECT * INTO result
      FROM payflow_post_v1(p_kind, p_from, p_to, p_amount, p_currency, p_description,
                           p_metadata, NULL, p_owner);
    IF result.refusal IS NOT NULL THEN
        SELECT r.* INTO outcome, status, body FROM payflow_refused_v1(result.refusal) r;
    ELSE
        INSERT INTO outbox (topic, payload)
        VALUES ('transfer.posted', jsonb_build_object('transfer_id', (result.posted).id));
        outcome := 'created';
        status := 201;
        body := payflow_transfer_json(result.posted)::text;
    END IF;
    PERFORM payflow_idempotency_finish_v1(p_scope, p_key, p_fingerprint, status, body, p_ttl_seconds);
END $$;
