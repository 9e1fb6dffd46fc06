-- 0001: the ledger: accounts, transfers, immutable double-entry entries, the outbox
-- and idempotency keys. Every rule the code enforces is repeated here as a
-- constraint or trigger, so a bug or a hand-written UPDATE cannot break it.

-- Callers. Only a hash of each secret is kept; the secret is shown once.
CREATE TABLE api_keys (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name          text NOT NULL CHECK (char_length(name) BETWEEN 1 AND 100),
    scopes        text[] NOT NULL CHECK (cardinality(scopes) >= 1
                                         AND scopes <@ ARRAY['read', 'transfers:write', 'admin']),
    secret_sha256 bytea NOT NULL UNIQUE CHECK (octet_length(secret_sha256) = 32),
    prefix        text NOT NULL CHECK (char_length(prefix) <= 20),  -- shown in lists
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz
);

CREATE TABLE accounts (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name            text NOT NULL CHECK (char_length(name) BETWEEN 1 AND 200),
    currency        text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    balance         bigint NOT NULL DEFAULT 0,
    -- NULL = unlimited, allowed only for system accounts (World / Treasury),
    -- which are where money enters the ledger.
    overdraft_limit bigint CHECK (overdraft_limit >= 0),
    is_system       boolean NOT NULL DEFAULT false,
    version         bigint NOT NULL DEFAULT 0 CHECK (version >= 0),
    -- The key that created it: a key without admin scope sees and moves only
    -- the money of accounts it owns.
    owner_key_id    uuid REFERENCES api_keys (id),
    created_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT accounts_overdraft_limit CHECK (overdraft_limit IS NULL OR balance >= -overdraft_limit),
    CONSTRAINT accounts_unlimited_only_system CHECK (overdraft_limit IS NOT NULL OR is_system),
    -- Target of the transfers' (account, currency) foreign keys.
    CONSTRAINT accounts_id_currency UNIQUE (id, currency)
);

CREATE TABLE transfers (
    id                   uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    kind                 text NOT NULL CHECK (kind IN ('transfer', 'payout', 'refund', 'reversal')),
    from_account_id      uuid NOT NULL,
    to_account_id        uuid NOT NULL,
    amount               bigint NOT NULL CHECK (amount > 0),
    currency             text NOT NULL,
    status               text NOT NULL DEFAULT 'posted' CHECK (status IN ('posted')),
    description          text CHECK (char_length(description) <= 1000),
    metadata             jsonb NOT NULL DEFAULT '{}'
                         CHECK (jsonb_typeof(metadata) = 'object' AND octet_length(metadata::text) <= 16384),
    reverses_transfer_id uuid REFERENCES transfers (id),
    created_at           timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT transfers_distinct_accounts CHECK (from_account_id <> to_account_id),
    -- A transfer moves one currency: both accounts must hold it (invariant 1).
    CONSTRAINT transfers_from_currency FOREIGN KEY (from_account_id, currency)
        REFERENCES accounts (id, currency),
    CONSTRAINT transfers_to_currency FOREIGN KEY (to_account_id, currency)
        REFERENCES accounts (id, currency)
);

CREATE TABLE entries (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    transfer_id     uuid NOT NULL REFERENCES transfers (id),
    account_id      uuid NOT NULL REFERENCES accounts (id),
    amount          bigint NOT NULL CHECK (amount <> 0),  -- signed: credit > 0
    balance_after   bigint NOT NULL,
    account_version bigint NOT NULL CHECK (account_version > 0),
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- One entry per account version: a gap or a duplicate in the chain is detectable.
    CONSTRAINT entries_account_version UNIQUE (account_id, account_version)
);
CREATE INDEX entries_account_id_id ON entries (account_id, id);
CREATE INDEX entries_transfer_id ON entries (transfer_id);

-- Entries are immutable: corrections are new transfers, never edits.
CREATE FUNCTION payflow_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is immutable: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE TRIGGER entries_immutable BEFORE UPDATE OR DELETE ON entries
    FOR EACH ROW EXECUTE FUNCTION payflow_refuse_change();
CREATE TRIGGER entries_no_truncate BEFORE TRUNCATE ON entries
    FOR EACH STATEMENT EXECUTE FUNCTION payflow_refuse_change();
CREATE TRIGGER transfers_immutable BEFORE UPDATE OR DELETE ON transfers
    FOR EACH ROW EXECUTE FUNCTION payflow_refuse_change();
CREATE TRIGGER transfers_no_truncate BEFORE TRUNCATE ON transfers
    FOR EACH STATEMENT EXECUTE FUNCTION payflow_refuse_change();

-- Every statement that writes entries writes balanced sets (invariant 2): the
-- entries it inserts for each transfer sum to zero.
CREATE FUNCTION payflow_entries_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM new_entries GROUP BY transfer_id HAVING sum(amount) <> 0) THEN
        RAISE EXCEPTION 'the entries of a transfer must sum to zero'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'entries_balanced';
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER entries_balanced AFTER INSERT ON entries
    REFERENCING NEW TABLE AS new_entries
    FOR EACH STATEMENT EXECUTE FUNCTION payflow_entries_balanced();

CREATE TABLE outbox (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic            text NOT NULL CHECK (char_length(topic) BETWEEN 1 AND 100),
    payload          jsonb NOT NULL,
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'running', 'done', 'dead')),
    attempts         integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    run_at           timestamptz NOT NULL DEFAULT now(),
    lease_owner      text CHECK (char_length(lease_owner) <= 200),
    lease_expires_at timestamptz,
    last_error       text CHECK (char_length(last_error) <= 4000),
    created_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    CONSTRAINT outbox_lease_when_running
        CHECK ((status = 'running') = (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL))
);
CREATE INDEX outbox_pending_run_at ON outbox (run_at) WHERE status = 'pending';

CREATE TABLE idempotency_keys (
    scope           text NOT NULL CHECK (char_length(scope) BETWEEN 1 AND 200),
    key             text NOT NULL CHECK (char_length(key) BETWEEN 1 AND 255),
    fingerprint     text NOT NULL CHECK (char_length(fingerprint) = 64),
    response_status smallint NOT NULL CHECK (response_status BETWEEN 200 AND 499),
    -- Text, not jsonb: a replay must return the very bytes first sent.
    response_body   text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_keys_expires_at ON idempotency_keys (expires_at);
