-- name: account_by_name
-- The account with this name and currency, if any (seed data is found by name).
SELECT id, name, currency, balance, version, is_system FROM accounts
 WHERE name = %(name)s AND currency = %(currency)s
 ORDER BY created_at LIMIT 1;
