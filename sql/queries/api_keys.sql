-- name: create_api_key
-- Stores a new API key (its secret's hash only).
INSERT INTO api_keys (name, scopes, secret_sha256, prefix)
VALUES (%(name)s, %(scopes)s, %(secret_sha256)s, %(prefix)s)
RETURNING id;

-- name: authenticate_api_key
-- The live key with this secret hash, if any.
SELECT id, name, scopes, secret_sha256 FROM api_keys
 WHERE secret_sha256 = %(secret_sha256)s AND revoked_at IS NULL;

-- name: list_api_keys
-- Every key, newest first (no secrets: only their prefixes).
SELECT id, name, scopes, prefix, created_at, revoked_at FROM api_keys ORDER BY created_at DESC;

-- name: revoke_api_key
-- Revokes a key at once; a row (was it live?) whenever the key exists.
WITH revoked AS (
    UPDATE api_keys SET revoked_at = now() WHERE id = %(id)s AND revoked_at IS NULL RETURNING id)
SELECT k.id, EXISTS (SELECT FROM revoked) AS was_live FROM api_keys k WHERE k.id = %(id)s;
