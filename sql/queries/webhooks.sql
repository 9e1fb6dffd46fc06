-- name: create_webhook_endpoint
-- Registers a webhook endpoint.
INSERT INTO webhook_endpoints (url, event_types, secret)
VALUES (%(url)s, %(event_types)s, %(secret)s)
RETURNING payflow_webhook_endpoint_json(webhook_endpoints) AS endpoint;

-- name: count_webhook_endpoints
-- How many webhook endpoints exist.
SELECT count(*) AS endpoints FROM webhook_endpoints;

-- name: list_webhook_endpoints
-- All webhook endpoints (without their secrets).
SELECT payflow_webhook_endpoint_json(w) AS endpoint FROM webhook_endpoints w ORDER BY created_at;

-- name: webhook_endpoint_for_delivery
-- The URL and secret of an enabled endpoint.
SELECT url, secret FROM webhook_endpoints WHERE id = %(id)s AND enabled;

-- name: webhook_fan_out
-- Turns an event task into one delivery task per subscribed endpoint, ending the event task.
SELECT payflow_webhook_fan_out_v1(%(task_id)s, %(owner)s) AS queued;

-- name: webhook_fan_out_many
-- Fans out several event tasks in one transaction; the ids of those still ours.
SELECT task_id FROM payflow_webhook_fan_out_many_v1(%(task_ids)s, %(owner)s);
