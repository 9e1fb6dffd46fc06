-- name: audit_status
-- The incremental audit behind /health, advanced when older than the max age.
SELECT audited_at, checkpoint_entry_id, unaudited_entries, horizon_age_seconds, entries_sum, problems
  FROM payflow_audit_status_v1(%(batch_size)s, %(accounts_per_step)s, %(max_age_ms)s);

-- name: audit_rebuild
-- Starts the incremental audit over from the first entry.
SELECT payflow_audit_rebuild_v1();

-- name: audit_currency_sums
-- Full audit: the sum of all entries per currency (must be 0).
SELECT a.currency, sum(e.amount) AS entries_sum, count(*) AS entries
  FROM entries e JOIN accounts a ON a.id = e.account_id
 GROUP BY a.currency
 ORDER BY a.currency;

-- name: audit_account_balances
-- Full audit: every account whose balance differs from the sum of its entries.
SELECT a.id, a.name, a.currency, a.balance, coalesce(s.entries_sum, 0) AS entries_sum
  FROM accounts a
  LEFT JOIN (SELECT account_id, sum(amount) AS entries_sum FROM entries GROUP BY account_id) s
         ON s.account_id = a.id
 WHERE a.balance <> coalesce(s.entries_sum, 0)
 ORDER BY a.id;

-- name: audit_entry_chains
-- Full audit: every entry that does not continue its account's chain
-- (previous balance_after + amount = balance_after; versions 1, 2, 3, ...).
SELECT account_id, id AS entry_id, balance_after, expected_balance, account_version, expected_version
  FROM (SELECT e.account_id, e.id, e.balance_after, e.account_version,
               sum(e.amount) OVER chain AS expected_balance,
               row_number() OVER chain AS expected_version
          FROM entries e
        WINDOW chain AS (PARTITION BY e.account_id ORDER BY e.id)) c
 WHERE balance_after <> expected_balance OR account_version <> expected_version
 ORDER BY account_id, id;
