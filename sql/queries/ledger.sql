-- name: create_account
-- Creates an account (idempotently when a key is given); one round trip.
SELECT outcome, status, body
  FROM payflow_create_account_v1(%(scope)s, %(key)s, %(fingerprint)s, %(ttl_seconds)s,
                                 %(name)s, %(currency)s, %(overdraft_limit)s, %(is_system)s,
                                 %(owner)s);

-- name: post_transfer
-- Posts a transfer (idempotency, locks, entries, balances, outbox) in one round trip.
SELECT outcome, status, body
  FROM payflow_post_transfer_v1(%(scope)s, %(key)s, %(fingerprint)s, %(ttl_seconds)s,
                                %(kind)s, %(from_account_id)s, %(to_account_id)s, %(amount)s,
                                %(currency)s, %(description)s, %(metadata)s, %(owner)s);

-- name: stored_response
-- The completed response stored under an idempotency key, if any.
SELECT fingerprint, response_status AS status, response_body AS body
  FROM idempotency_keys
 WHERE scope = %(scope)s AND key = %(key)s AND expires_at > now();

-- name: account_json
-- One account as its API JSON, if the caller may see it (owner NULL: any).
SELECT payflow_account_json(a)::text AS body FROM accounts a
 WHERE a.id = %(id)s AND (%(owner)s::uuid IS NULL OR a.owner_key_id = %(owner)s::uuid);

-- name: transfer_json
-- One transfer as its API JSON, if the caller owns one of its accounts (owner NULL: any).
SELECT payflow_transfer_json(t)::text AS body FROM transfers t
 WHERE t.id = %(id)s
   AND (%(owner)s::uuid IS NULL OR EXISTS (
        SELECT 1 FROM accounts a WHERE a.id IN (t.from_account_id, t.to_account_id)
           AND a.owner_key_id = %(owner)s::uuid));

-- name: account_exists
-- Whether an account exists and the caller may see it (owner NULL: any).
SELECT EXISTS (SELECT 1 FROM accounts WHERE id = %(id)s
                  AND (%(owner)s::uuid IS NULL OR owner_key_id = %(owner)s::uuid)) AS found;

-- name: entries_page
-- An account's entries, newest first, before an entry id (keyset pagination on
-- the (account_id, id) index); one extra row tells whether another page exists.
SELECT e.id, payflow_entry_json(e) AS entry
  FROM entries e
 WHERE e.account_id = %(account_id)s
   AND (%(before_id)s::bigint IS NULL OR e.id < %(before_id)s::bigint)
 ORDER BY e.id DESC
 LIMIT %(limit)s + 1;
