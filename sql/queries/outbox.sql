-- name: outbox_claim
-- Claims up to batch_size runnable tasks for this worker, with a lease.
SELECT id, topic, payload, attempts, lease_expires_at
  FROM payflow_outbox_claim_v1(%(owner)s, %(batch_size)s, %(lease_seconds)s);

-- name: outbox_finish
-- Ends a task we hold (done, retry at run_at, dead); false if no longer ours.
SELECT payflow_outbox_finish_v1(%(id)s, %(owner)s, %(outcome)s, %(error)s, %(run_at)s) AS ours;

-- name: outbox_release
-- Hands claimed tasks back (a stopping worker, or one whose database went away).
SELECT payflow_outbox_release_v1(%(ids)s, %(owner)s, %(started)s) AS released;

-- name: outbox_renew
-- Extends our lease before an effect; false if the task is no longer ours.
SELECT payflow_outbox_renew_v1(%(id)s, %(owner)s, %(lease_seconds)s) AS ours;

-- name: outbox_stats
-- Task counts by status and topic.
SELECT status, topic, count(*) AS tasks FROM outbox GROUP BY status, topic ORDER BY status, topic;

-- name: outbox_oldest_pending
-- Age in seconds of the oldest due pending task.
SELECT extract(epoch FROM now() - min(run_at))::double precision AS age_seconds
  FROM outbox WHERE status = 'pending' AND run_at <= now();

-- name: outbox_list
-- Tasks of one status, newest first.
SELECT id, topic, payload, status, attempts, run_at, lease_owner, last_error, created_at, finished_at
  FROM outbox WHERE status = %(status)s ORDER BY id DESC LIMIT %(limit)s;

-- name: outbox_retry_dead
-- Puts dead tasks (all, or one) back in the queue with their attempts reset.
UPDATE outbox SET status = 'pending', attempts = 0, run_at = now(), finished_at = NULL
 WHERE status = 'dead' AND (%(id)s::bigint IS NULL OR id = %(id)s::bigint)
RETURNING id;

-- name: prune_idempotency_keys
-- Deletes up to batch_size expired idempotency keys.
DELETE FROM idempotency_keys WHERE ctid IN (
    SELECT ctid FROM idempotency_keys WHERE expires_at < now() LIMIT %(batch_size)s);

-- name: prune_outbox
-- Deletes up to batch_size done tasks finished before the retention window.
DELETE FROM outbox WHERE id IN (
    SELECT id FROM outbox
     WHERE status = 'done' AND finished_at < now() - make_interval(secs => %(retention_seconds)s)
     LIMIT %(batch_size)s);
