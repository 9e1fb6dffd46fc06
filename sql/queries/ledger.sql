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
-- One transfer (with its refunds) as its API JSON, if the caller owns one of its
-- accounts (owner NULL: any).
SELECT payflow_transfer_with_refunds_json(t)::text AS body FROM transfers t
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
   AND e.created_at >= %(since)s AND e.created_at < %(until)s
 ORDER BY e.id DESC
 LIMIT %(limit)s + 1;

-- name: refund_transfer
-- Refunds a transfer (all that is left, or an amount), idempotently; one round trip.
SELECT outcome, status, body
  FROM payflow_refund_transfer_v1(%(scope)s, %(key)s, %(fingerprint)s, %(ttl_seconds)s,
                                  %(transfer_id)s, %(amount)s, %(description)s, %(metadata)s, %(owner)s);

-- name: balance_as_of
-- An account's balance at a moment: the balance_after of its last entry at or
-- before it (an index lookup on (account_id, created_at)).
SELECT a.id AS account_id, a.currency,
       coalesce((SELECT e.balance_after FROM entries e
                  WHERE e.account_id = a.id AND e.created_at <= %(as_of)s
                  ORDER BY e.created_at DESC, e.id DESC LIMIT 1), 0) AS balance
  FROM accounts a
 WHERE a.id = %(id)s AND (%(owner)s::uuid IS NULL OR a.owner_key_id = %(owner)s::uuid);

-- name: transfers_by_account
-- A page of an account's transfers (either side), newest first, before a
-- (created_at, id) cursor and within [created_after, created_before): one index
-- range scan per side, merged.
SELECT id, created_at, payflow_transfer_json(t) AS transfer FROM (
    (SELECT * FROM transfers
      WHERE from_account_id = %(account_id)s
        AND (created_at, id) < (%(before_at)s, %(before_id)s)
        AND created_at >= %(created_after)s AND created_at < %(created_before)s
        AND (%(kind)s::text IS NULL OR kind = %(kind)s) AND (%(status)s::text IS NULL OR status = %(status)s)
      ORDER BY created_at DESC, id DESC LIMIT %(limit)s + 1)
    UNION ALL
    (SELECT * FROM transfers
      WHERE to_account_id = %(account_id)s
        AND (created_at, id) < (%(before_at)s, %(before_id)s)
        AND created_at >= %(created_after)s AND created_at < %(created_before)s
        AND (%(kind)s::text IS NULL OR kind = %(kind)s) AND (%(status)s::text IS NULL OR status = %(status)s)
      ORDER BY created_at DESC, id DESC LIMIT %(limit)s + 1)
) t
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s + 1;

-- name: transfers_all
-- A page of all transfers, newest first (admin), on the (created_at, id) index.
SELECT id, created_at, payflow_transfer_json(t) AS transfer FROM transfers t
 WHERE (created_at, id) < (%(before_at)s, %(before_id)s)
   AND created_at >= %(created_after)s AND created_at < %(created_before)s
   AND (%(kind)s::text IS NULL OR kind = %(kind)s) AND (%(status)s::text IS NULL OR status = %(status)s)
 ORDER BY created_at DESC, id DESC
 LIMIT %(limit)s + 1;

-- name: account_audit
-- One account recomputed from its entries, in one snapshot: the balance against
-- the sum of its entries, and every entry that breaks the chain (previous
-- balance_after + amount = balance_after; versions 1, 2, 3, ...).
SELECT a.id AS account_id, a.currency, a.balance, a.version,
       coalesce(totals.entries_sum, 0) AS entries_sum, coalesce(totals.entries, 0) AS entries,
       coalesce((SELECT jsonb_agg(jsonb_build_object(
                     'entry_id', c.id::text, 'balance_after', c.balance_after,
                     'expected_balance', c.expected_balance, 'account_version', c.account_version,
                     'expected_version', c.expected_version) ORDER BY c.id)
                   FROM (SELECT e.id, e.balance_after, e.account_version,
                                sum(e.amount) OVER chain AS expected_balance,
                                row_number() OVER chain AS expected_version
                           FROM entries e WHERE e.account_id = a.id
                         WINDOW chain AS (ORDER BY e.id)) c
                  WHERE c.balance_after <> c.expected_balance
                     OR c.account_version <> c.expected_version), '[]') AS chain_breaks
  FROM accounts a
  LEFT JOIN LATERAL (SELECT sum(amount) AS entries_sum, count(*) AS entries
                       FROM entries WHERE account_id = a.id) totals ON true
 WHERE a.id = %(id)s AND (%(owner)s::uuid IS NULL OR a.owner_key_id = %(owner)s::uuid);

-- name: post_transfers
-- Posts a batch of transfers in one transaction (group commit); one row per
-- item, in order.
SELECT ordinality, outcome, status, body FROM payflow_post_transfers_v1(%(items)s) ORDER BY ordinality;
