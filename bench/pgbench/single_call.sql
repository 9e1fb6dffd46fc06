-- pgbench: the form payflow uses, the whole transfer transaction as one call
-- (one round trip). %(source)s is filled in: :a (uniform) or 0 (the hot account).
\set a random(1, :naccounts)
\set k random(0, :naccounts - 2)
\set b 1 + (:a + :k) %% :naccounts
\set r random(1, 2000000000)
SELECT * FROM payflow_post_transfer_v1('pgbench', 'pg-' || :client_id || '-' || :r, repeat('0', 64),
    86400, 'transfer', (SELECT id FROM bench_accounts WHERE n = %(source)s),
    (SELECT id FROM bench_accounts WHERE n = :b), 1, NULL, NULL, NULL);
