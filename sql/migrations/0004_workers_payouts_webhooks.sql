-- 0004: what the outbox workers need: claiming with leases, payouts through a
-- clearing account with compensation, and signed webhooks.

-- Workers wake on NOTIFY (one per inserting statement) and poll as a fallback.
CREATE FUNCTION payflow_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('payflow_outbox', '');
    RETURN NULL;
END $$;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION payflow_outbox_notify();

-- When a worker last claimed the task: started_at - created_at is the queue's
-- wake-up latency (measured by make bench).
ALTER TABLE outbox ADD COLUMN started_at timestamptz;

CREATE INDEX outbox_running_lease ON outbox (lease_expires_at) WHERE status = 'running';
CREATE INDEX outbox_dead ON outbox (id) WHERE status = 'dead';
CREATE INDEX outbox_done_finished_at ON outbox (finished_at) WHERE status = 'done';

-- Claims up to p_batch_size runnable tasks: pending ones that are due, and
-- running ones whose lease expired (their worker died). SKIP LOCKED in each
-- branch lets any number of workers claim at once, each taking other rows.
CREATE FUNCTION payflow_outbox_claim_v1(p_owner text, p_batch_size integer, p_lease_seconds double precision)
RETURNS SETOF outbox LANGUAGE sql AS $$
    WITH expired AS (
        SELECT id FROM outbox WHERE status = 'running' AND lease_expires_at < now()
         ORDER BY lease_expires_at LIMIT p_batch_size FOR UPDATE SKIP LOCKED
    ), pending AS (
        SELECT id FROM outbox WHERE status = 'pending' AND run_at <= now()
         ORDER BY run_at LIMIT p_batch_size FOR UPDATE SKIP LOCKED
    )
    UPDATE outbox o
       SET status = 'running', lease_owner = p_owner, attempts = o.attempts + 1,
           lease_expires_at = now() + make_interval(secs => p_lease_seconds), started_at = now()
      FROM (SELECT id FROM expired UNION ALL SELECT id FROM pending LIMIT p_batch_size) c
     WHERE o.id = c.id
    RETURNING o.*;
$$;

-- Before each effect: extends our lease on the task, or returns false when it
-- is no longer ours (the lease ran out while earlier tasks of the batch ran
-- and another worker took it): the effect must then not run.
CREATE FUNCTION payflow_outbox_renew_v1(p_id bigint, p_owner text, p_lease_seconds double precision)
RETURNS boolean LANGUAGE sql AS $$
    WITH renewed AS (
        UPDATE outbox SET lease_expires_at = now() + make_interval(secs => p_lease_seconds)
         WHERE id = p_id AND status = 'running' AND lease_owner = p_owner
        RETURNING 1)
    SELECT EXISTS (SELECT 1 FROM renewed);
$$;

-- Ends a task we hold: 'done', 'retry' (pending again at p_run_at) or 'dead'.
-- Returns false when the task is no longer ours (our lease expired and another
-- worker took it): the caller then leaves it alone.
CREATE FUNCTION payflow_outbox_finish_v1(
    p_id bigint, p_owner text, p_outcome text, p_error text, p_run_at timestamptz)
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    IF p_outcome NOT IN ('done', 'retry', 'dead') THEN
        RAISE EXCEPTION 'unknown outcome %', p_outcome USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE outbox
       SET status = CASE p_outcome WHEN 'retry' THEN 'pending' ELSE p_outcome END,
           lease_owner = NULL, lease_expires_at = NULL,
           last_error = left(p_error, 4000),
           run_at = CASE p_outcome WHEN 'retry' THEN p_run_at ELSE run_at END,
           finished_at = CASE p_outcome WHEN 'retry' THEN NULL ELSE now() END
     WHERE id = p_id AND status = 'running' AND lease_owner = p_owner;
    RETURN FOUND;
END $$;

-- A worker hands back tasks it claimed: unstarted ones (a stop) get their
-- attempt back; a started one (the database went away under it) keeps it.
CREATE FUNCTION payflow_outbox_release_v1(p_ids bigint[], p_owner text, p_started boolean)
RETURNS integer LANGUAGE sql AS $$
    WITH released AS (
        UPDATE outbox
           SET status = 'pending', lease_owner = NULL, lease_expires_at = NULL,
               attempts = CASE WHEN p_started THEN attempts ELSE greatest(attempts - 1, 0) END
         WHERE id = ANY (p_ids) AND status = 'running' AND lease_owner = p_owner
        RETURNING 1)
    SELECT count(*)::integer FROM released;
$$;

-- System accounts by role: 'world' (where money enters) and 'payout_clearing'
-- (money on its way out, per currency, never below zero).
ALTER TABLE accounts ADD COLUMN system_role text
    CHECK (system_role IN ('world', 'payout_clearing'));
ALTER TABLE accounts ADD CONSTRAINT accounts_role_is_system CHECK (system_role IS NULL OR is_system);
CREATE UNIQUE INDEX accounts_system_role_currency ON accounts (system_role, currency)
    WHERE system_role IS NOT NULL;

CREATE TABLE payouts (
    id                   uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    account_id           uuid NOT NULL REFERENCES accounts (id),
    amount               bigint NOT NULL CHECK (amount > 0),
    currency             text NOT NULL,
    destination          jsonb NOT NULL
                         CHECK (jsonb_typeof(destination) = 'object' AND octet_length(destination::text) <= 4096),
    status               text NOT NULL DEFAULT 'pending'
                         CHECK (status IN ('pending', 'processing', 'succeeded', 'failed')),
    failure_reason       text CHECK (char_length(failure_reason) <= 1000),
    attempts             integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    provider_reference   text CHECK (char_length(provider_reference) <= 200),
    transfer_id          uuid NOT NULL REFERENCES transfers (id),
    reversal_transfer_id uuid REFERENCES transfers (id),
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    -- A failed payout's money is back: exactly the failed ones have a reversal.
    CONSTRAINT payouts_failed_reversed CHECK ((status = 'failed') = (reversal_transfer_id IS NOT NULL)),
    CONSTRAINT payouts_failed_reason CHECK (status <> 'failed' OR failure_reason IS NOT NULL),
    CONSTRAINT payouts_succeeded_reference CHECK (status <> 'succeeded' OR provider_reference IS NOT NULL)
);
CREATE INDEX payouts_account_id ON payouts (account_id, created_at);

CREATE FUNCTION payflow_payout_json(p payouts) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT jsonb_build_object(
        'id', p.id, 'object', 'payout', 'account_id', p.account_id, 'amount', p.amount,
        'currency', p.currency, 'destination', p.destination, 'status', p.status,
        'failure_reason', p.failure_reason, 'attempts', p.attempts,
        'provider_reference', p.provider_reference, 'transfer_id', p.transfer_id,
        'reversal_transfer_id', p.reversal_transfer_id,
        'created_at', payflow_timestamp_json(p.created_at),
        'updated_at', payflow_timestamp_json(p.updated_at))
$$;

CREATE FUNCTION payflow_system_account_v1(p_role text, p_currency text) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    found_id uuid;
BEGIN
    SELECT id INTO found_id FROM accounts WHERE system_role = p_role AND currency = p_currency;
    IF found_id IS NULL THEN
        INSERT INTO accounts (name, currency, overdraft_limit, is_system, system_role)
        VALUES (initcap(replace(p_role, '_', ' ')) || ' ' || p_currency, p_currency,
                CASE p_role WHEN 'payout_clearing' THEN 0 END, true, p_role)
        ON CONFLICT (system_role, currency) WHERE system_role IS NOT NULL DO NOTHING;
        SELECT id INTO found_id FROM accounts WHERE system_role = p_role AND currency = p_currency;
    END IF;
    RETURN found_id;
END $$;

-- POST /v1/payouts in one round trip: the amount moves from the account to
-- the currency's clearing account, the payout row and its outbox task are
-- written, and the 202 response is stored for replay.
CREATE FUNCTION payflow_create_payout_v1(
    p_scope text, p_key text, p_fingerprint text, p_ttl_seconds integer,
    p_account uuid, p_amount bigint, p_currency text, p_destination jsonb,
    p_owner uuid DEFAULT NULL,
    OUT outcome text, OUT status integer, OUT body text)
LANGUAGE plpgsql AS $$
DECLARE
    account accounts;
    clearing uuid;
    result record;
    refusal jsonb;
    created payouts;
BEGIN
    SELECT b.outcome, b.status, b.body INTO outcome, status, body
      FROM payflow_idempotency_begin_v1(p_scope, p_key, p_fingerprint) b;
    IF outcome <> 'new' THEN
        RETURN;
    END IF;

    SELECT * INTO account FROM accounts
     WHERE id = p_account AND (p_owner IS NULL OR owner_key_id = p_owner);
    IF account.id IS NULL THEN
        refusal := payflow_refusal_v1(404, 'account_not_found', 'No account with this id.',
                                      jsonb_build_object('account_id', p_account));
    ELSIF account.is_system THEN  -- unlimited overdraft: it could pay out money nobody has
        refusal := payflow_refusal_v1(422, 'account_not_eligible', 'System accounts cannot be paid out.',
                                      jsonb_build_object('account_id', p_account));
    ELSE
        clearing := payflow_system_account_v1('payout_clearing', account.currency);
        SELECT * INTO result
          -- Money leaves only from money held: never from an overdraft.
          FROM payflow_post_v1('payout', p_account, clearing, p_amount, p_currency,
                               'payout', '{}', NULL, p_owner, false);
        refusal := result.refusal;
    END IF;

    IF refusal IS NOT NULL THEN
        SELECT r.* INTO outcome, status, body FROM payflow_refused_v1(refusal) r;
    ELSE
        INSERT INTO payouts (account_id, amount, currency, destination, transfer_id)
        VALUES (p_account, p_amount, account.currency, p_destination, (result.posted).id)
        RETURNING * INTO created;
        INSERT INTO outbox (topic, payload)
        VALUES ('payout.requested', jsonb_build_object('payout_id', created.id));
        outcome := 'created';
        status := 202;
        body := payflow_payout_json(created)::text;
    END IF;
    PERFORM payflow_idempotency_finish_v1(p_scope, p_key, p_fingerprint, status, body, p_ttl_seconds);
END $$;

-- The worker starts (or restarts, after a crash) a payout. NULL when it is
-- already finished: the provider must not be called again.
CREATE FUNCTION payflow_payout_start_v1(p_payout uuid) RETURNS payouts
LANGUAGE sql AS $$
    UPDATE payouts SET status = 'processing', attempts = attempts + 1, updated_at = now()
     WHERE id = p_payout AND status IN ('pending', 'processing')
    RETURNING *;
$$;

-- The provider paid: the payout succeeds and its event is queued, together
-- with the task's end, in one transaction (the task must still be ours).
CREATE FUNCTION payflow_payout_succeed_v1(
    p_payout uuid, p_reference text, p_task bigint, p_owner text) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    done payouts;
BEGIN
    IF NOT payflow_outbox_finish_v1(p_task, p_owner, 'done', NULL, NULL) THEN
        RETURN false;
    END IF;
    UPDATE payouts SET status = 'succeeded', provider_reference = p_reference, updated_at = now()
     WHERE id = p_payout AND status = 'processing'
    RETURNING * INTO done;
    IF done.id IS NOT NULL THEN
        INSERT INTO outbox (topic, payload)
        VALUES ('payout.succeeded', jsonb_build_object('payout_id', done.id));
    END IF;
    RETURN true;
END $$;

-- The provider refused for good (or retries ran out): a compensating transfer
-- returns the money from the clearing account, the payout fails and its event
-- is queued, with the task's end, in one transaction.
CREATE FUNCTION payflow_payout_fail_v1(
    p_payout uuid, p_reason text, p_task bigint, p_owner text) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    payout payouts;
    result record;
BEGIN
    IF NOT payflow_outbox_finish_v1(p_task, p_owner, 'done', p_reason, NULL) THEN
        RETURN false;
    END IF;
    SELECT * INTO payout FROM payouts WHERE id = p_payout FOR UPDATE;
    IF payout.status <> 'processing' THEN
        RETURN true;  -- already finished by an earlier run of this task
    END IF;
    SELECT * INTO result
      FROM payflow_post_v1('reversal',
                           payflow_system_account_v1('payout_clearing', payout.currency),
                           payout.account_id, payout.amount, payout.currency,
                           'payout failed: returned', '{}', payout.transfer_id, NULL);
    IF result.refusal IS NOT NULL THEN  -- the clearing account always holds it
        RAISE EXCEPTION 'payout % cannot be reversed: %', p_payout, result.refusal
            USING ERRCODE = 'check_violation', CONSTRAINT = 'payouts_failed_reversed';
    END IF;
    UPDATE payouts
       SET status = 'failed', failure_reason = left(p_reason, 1000),
           reversal_transfer_id = (result.posted).id, updated_at = now()
     WHERE id = p_payout;
    INSERT INTO outbox (topic, payload)
    VALUES ('payout.failed', jsonb_build_object('payout_id', p_payout));
    RETURN true;
END $$;

CREATE TABLE webhook_endpoints (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    url         text NOT NULL CHECK (char_length(url) BETWEEN 8 AND 2000 AND url ~ '^https?://'),
    event_types text[] NOT NULL CHECK (cardinality(event_types) BETWEEN 1 AND 20),
    secret      text NOT NULL CHECK (char_length(secret) BETWEEN 32 AND 200),
    enabled     boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION payflow_webhook_endpoint_json(w webhook_endpoints) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT jsonb_build_object(
        'id', w.id, 'object', 'webhook_endpoint', 'url', w.url,
        'event_types', to_jsonb(w.event_types), 'enabled', w.enabled,
        'created_at', payflow_timestamp_json(w.created_at))
$$;

-- An event task (transfer.posted, payout.succeeded, ...) becomes one delivery
-- task per subscribed endpoint, in the same transaction that ends the event
-- task: each endpoint gets each event once.
CREATE FUNCTION payflow_webhook_fan_out_v1(p_task bigint, p_owner text) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    event outbox;
    queued integer;
BEGIN
    SELECT * INTO event FROM outbox WHERE id = p_task;
    IF NOT payflow_outbox_finish_v1(p_task, p_owner, 'done', NULL, NULL) THEN
        RETURN NULL;
    END IF;
    INSERT INTO outbox (topic, payload)
    SELECT 'webhook.deliver', jsonb_build_object(
               'endpoint_id', w.id,
               'event', jsonb_build_object('id', 'evt_' || event.id, 'type', event.topic,
                                           'created_at', payflow_timestamp_json(event.created_at),
                                           'data', event.payload))
      FROM webhook_endpoints w
     WHERE w.enabled AND event.topic = ANY (w.event_types)
       AND w.created_at <= event.created_at;  -- an endpoint gets events from its creation on
    GET DIAGNOSTICS queued = ROW_COUNT;
    RETURN queued;
END $$;

-- The simulated payout provider (the default) keeps its books here: every
-- call it received, and the payouts it made, one per idempotency key (that is
-- how a real provider dedupes a retried call).
CREATE TABLE simulated_provider_calls (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    idempotency_key text NOT NULL,
    payout_id       uuid NOT NULL,
    amount          bigint NOT NULL,
    outcome         text,
    called_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX simulated_provider_calls_key ON simulated_provider_calls (idempotency_key);

CREATE TABLE simulated_provider_payouts (
    idempotency_key text PRIMARY KEY,
    payout_id       uuid NOT NULL,
    amount          bigint NOT NULL,
    reference       text NOT NULL,
    paid_at         timestamptz NOT NULL DEFAULT now()
);
