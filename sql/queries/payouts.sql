-- name: create_payout
-- Creates a payout (money to the clearing account + task), idempotently; one round trip.
SELECT outcome, status, body
  FROM payflow_create_payout_v1(%(scope)s, %(key)s, %(fingerprint)s, %(ttl_seconds)s,
                                %(account_id)s, %(amount)s, %(currency)s, %(destination)s, %(owner)s);

-- name: payout_json
-- One payout as its API JSON, if the caller owns its account (owner NULL: any).
SELECT payflow_payout_json(p)::text AS body FROM payouts p
 WHERE p.id = %(id)s
   AND (%(owner)s::uuid IS NULL OR EXISTS (
        SELECT 1 FROM accounts a WHERE a.id = p.account_id AND a.owner_key_id = %(owner)s::uuid));

-- name: payout_start
-- Marks a payout processing (attempt + 1); no row when it is already finished.
SELECT id, account_id, amount, currency, destination, attempts
  FROM payflow_payout_start_v1(%(id)s) WHERE id IS NOT NULL;

-- name: payout_succeed
-- The provider paid: payout succeeded, event queued, task done; false if the task is not ours.
SELECT payflow_payout_succeed_v1(%(id)s, %(reference)s, %(task_id)s, %(owner)s) AS ours;

-- name: payout_fail
-- Permanent failure: compensating transfer, payout failed, event queued, task done.
SELECT payflow_payout_fail_v1(%(id)s, %(reason)s, %(task_id)s, %(owner)s) AS ours;

-- name: simulated_record_call
-- The simulated provider logs a call; returns how many calls this key has had.
WITH logged AS (
    INSERT INTO simulated_provider_calls (idempotency_key, payout_id, amount)
    VALUES (%(key)s, %(payout_id)s, %(amount)s) RETURNING id)
SELECT (SELECT id FROM logged) AS call_id,
       (SELECT count(*) FROM simulated_provider_calls WHERE idempotency_key = %(key)s) + 1 AS call_number;

-- name: simulated_set_outcome
-- Records what the simulated provider answered to a call.
UPDATE simulated_provider_calls SET outcome = %(outcome)s WHERE id = %(call_id)s;

-- name: simulated_find_payment
-- The payment the simulated provider already made for this key, if any.
SELECT reference FROM simulated_provider_payouts WHERE idempotency_key = %(key)s;

-- name: simulated_pay
-- Pays once per idempotency key; returns the reference of the one payment.
WITH paid AS (
    INSERT INTO simulated_provider_payouts (idempotency_key, payout_id, amount, reference)
    VALUES (%(key)s, %(payout_id)s, %(amount)s, %(reference)s)
    ON CONFLICT (idempotency_key) DO NOTHING RETURNING reference)
SELECT reference FROM paid
UNION ALL
SELECT reference FROM simulated_provider_payouts WHERE idempotency_key = %(key)s
LIMIT 1;

-- name: payouts_start
-- Marks a batch's payouts processing (attempt + 1) in one transaction, in id
-- order (two workers never deadlock); payouts already finished are absent.
SELECT p.id, p.account_id, p.amount, p.currency, p.destination, p.attempts
  FROM (SELECT DISTINCT unnest(%(ids)s::uuid[]) AS id ORDER BY 1) i,
       LATERAL payflow_payout_start_v1(i.id) p
 WHERE p.id IS NOT NULL;

-- name: payouts_succeed
-- Ends a batch's paid payouts and their tasks in one transaction, in task
-- order; per task, false if it is no longer ours.
SELECT i.task_id, payflow_payout_succeed_v1(i.payout_id, i.reference, i.task_id, %(owner)s) AS ours
  FROM (SELECT * FROM unnest(%(payout_ids)s::uuid[], %(references)s::text[], %(task_ids)s::bigint[])
            AS u(payout_id, reference, task_id)
         ORDER BY task_id) i;

-- name: payouts_unstart
-- Payouts a stopping worker marked processing with its batch but never sent:
-- their attempt back, and pending again if it was their first.
UPDATE payouts
   SET attempts = attempts - 1, updated_at = now(),
       status = CASE WHEN attempts = 1 THEN 'pending' ELSE status END
 WHERE id = ANY (%(ids)s::uuid[]) AND status = 'processing';
