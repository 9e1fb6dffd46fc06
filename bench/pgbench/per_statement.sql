-- pgbench: the same transaction written out, one statement per round trip, as
-- an application without a SQL function would send it.
\set a random(1, :naccounts)
\set k random(0, :naccounts - 2)
\set b 1 + (:a + :k) %% :naccounts
\set r random(1, 2000000000)
BEGIN;
SELECT outcome FROM payflow_idempotency_begin_v1('pgbench', 'ps-' || :client_id || '-' || :r, repeat('0', 64));
SELECT gen_random_uuid() AS tid, (SELECT id FROM bench_accounts WHERE n = %(source)s) AS src,
       (SELECT id FROM bench_accounts WHERE n = :b) AS dst \gset
SELECT id, balance FROM accounts WHERE id IN (:src, :dst) ORDER BY id FOR UPDATE;
INSERT INTO transfers (id, kind, from_account_id, to_account_id, amount, currency)
    VALUES (:tid, 'transfer', :src, :dst, 1, 'USD');
UPDATE accounts SET balance = balance - 1, version = version + 1 WHERE id = :src
    RETURNING balance AS sb, version AS sv \gset
UPDATE accounts SET balance = balance + 1, version = version + 1 WHERE id = :dst
    RETURNING balance AS db, version AS dv \gset
INSERT INTO entries (transfer_id, account_id, amount, balance_after, account_version)
    VALUES (:tid, :src, -1, :sb, :sv), (:tid, :dst, 1, :db, :dv);
INSERT INTO outbox (topic, payload)
    VALUES ('transfer.posted', jsonb_build_object('transfer_id', :tid::uuid));
SELECT payflow_idempotency_finish_v1('pgbench', 'ps-' || :client_id || '-' || :r, repeat('0', 64),
    201, '{}', 86400);
COMMIT;
