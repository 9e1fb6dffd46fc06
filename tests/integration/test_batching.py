"""Group commit (payflow/batching.py): concurrent transfers share a
transaction, yet each keeps its own outcome, key and response bytes."""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections import Counter

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from payflow import errors
from payflow.batching import TransferBatcher, _Pending
from tests.conftest import make_app, make_config
from tests.helpers import Api, assert_ledger_consistent, create_system_account, new_key

THREADS = 40
AMOUNT = 50
FUNDS = 1_000  # room for exactly FUNDS // AMOUNT of the THREADS transfers


def _hot_ledger(app, db) -> tuple[Api, str, list[str]]:
    api = Api(app.test_client())
    world = create_system_account(db)
    source = api.create_account(name="hot")
    api.ok_transfer(world, source, FUNDS)
    return api, source, [api.create_account(name=f"d{n}") for n in range(THREADS)]


def _race(api: Api, source: str, destinations: list[str]) -> list:
    barrier, responses = threading.Barrier(len(destinations)), {}

    def one(index: int) -> None:
        key = new_key()
        barrier.wait()
        responses[index] = (key, api.transfer(source, destinations[index], AMOUNT, key=key))

    threads = [threading.Thread(target=one, args=(index,)) for index in range(len(destinations))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [responses[index] for index in range(len(destinations))]


def _slow_batches(app, sizes: list[int], delay_seconds: float = 0.05) -> None:
    """Each batch takes a little longer, as on a slow disk, so that requests
    queue behind it; records the batch sizes."""
    batcher = app.extensions["payflow"].ledger._batcher
    post_many = batcher._post_many

    def slow(params_list):
        sizes.append(len(params_list))
        time.sleep(delay_seconds)
        return post_many(params_list)

    batcher._post_many = slow


def test_a_hot_account_posts_in_batches_and_each_transfer_keeps_its_outcome(app, db, database_url):
    api, source, destinations = _hot_ledger(app, db)
    sizes: list[int] = []
    _slow_batches(app, sizes)
    results = _race(api, source, destinations)

    statuses = Counter(response.status_code for _, response in results)
    assert statuses == {201: FUNDS // AMOUNT, 422: THREADS - FUNDS // AMOUNT}, statuses
    assert all(response.get_json()["error"]["code"] == "insufficient_funds"
               for _, response in results if response.status_code == 422)
    assert sizes and max(sizes) > 1, sizes  # some transfers did share a transaction
    assert api.balance(source) == 0
    for destination, (key, response) in zip(destinations, results, strict=True):
        assert api.balance(destination) == (AMOUNT if response.status_code == 201 else 0)
        again = api.transfer(source, destination, AMOUNT, key=key)  # each key kept its own answer
        assert again.status_code == response.status_code and again.get_data() == response.get_data()
        assert again.headers["Idempotent-Replayed"] == "true"
    assert_ledger_consistent(database_url)


def test_a_batch_refused_by_a_constraint_posts_each_transfer_on_its_own(app, db, database_url):
    """An error one transfer may cause: each gets its own attempt and outcome."""
    api, source, destinations = _hot_ledger(app, db)
    batcher = app.extensions["payflow"].ledger._batcher
    failures = []

    def failing(params_list):
        failures.append(len(params_list))
        time.sleep(0.05)  # let the others queue behind this batch
        raise errors.ConstraintViolated(details={"constraint": "some_check"})

    batcher._post_many = failing
    results = _race(api, source, destinations[:10])
    assert failures and max(failures) > 1  # the batch path ran and failed...
    assert [response.status_code for _, response in results] == [201] * 10  # ...nobody noticed
    assert api.balance(source) == FUNDS - 10 * AMOUNT
    assert_ledger_consistent(database_url)


def test_a_batch_that_fails_for_all_answers_503_to_all_and_changes_nothing(app, db, database_url):
    """No connection, a timeout, a commit whose fate is unknown: reposting would
    only wait again; each client retries with its key instead."""
    api, source, destinations = _hot_ledger(app, db)
    batcher = app.extensions["payflow"].ledger._batcher
    sizes = []

    def unavailable(params_list):
        sizes.append(len(params_list))
        time.sleep(0.05)
        raise errors.Unavailable()

    batcher._post_many = unavailable
    batcher._post_one = lambda params: unavailable([params])
    results = _race(api, source, destinations[:10])
    assert [response.status_code for _, response in results] == [503] * 10
    assert max(sizes) > 1 and len(sizes) < 10  # not reposted one by one
    assert api.balance(source) == FUNDS
    assert_ledger_consistent(database_url)


def test_a_transfer_waiting_on_a_lock_does_not_hold_up_the_others(database_url, servers, db):
    """One batch waits on a row lock held elsewhere; the next batch slot
    serves the process's other transfers meanwhile."""
    app = make_app(make_config(database_url, servers["redis"], lock_timeout_ms=30_000,
                               statement_timeout_ms=30_000))
    api, source, destinations = _hot_ledger(app, db)
    other = api.create_account(name="other")
    spare = api.create_account(name="spare")  # unrelated to the blocked transfer's accounts
    api.ok_transfer(create_system_account(db, name="spare world"), spare, FUNDS)
    results = {}
    with psycopg.connect(database_url) as holder:
        holder.execute("SELECT 1 FROM accounts WHERE id = %s FOR UPDATE", (other,))
        blocked = threading.Thread(target=lambda: results.update(
            blocked=api.transfer(source, other, AMOUNT).status_code))
        blocked.start()
        while not db.execute("SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                             " AND datname = current_database()").fetchone()["n"]:
            time.sleep(0.01)
        # With the lock still held, other transfers of this process go through.
        assert [api.transfer(spare, d, AMOUNT).status_code for d in destinations[:3]] == [201] * 3
        holder.rollback()
    blocked.join()
    assert results["blocked"] == 201
    assert api.balance(source) == FUNDS - AMOUNT and api.balance(spare) == FUNDS - 3 * AMOUNT
    app.extensions["payflow"].close()


def test_an_account_locked_elsewhere_fails_only_its_own_transfer(database_url, servers, db):
    """The batch locks all its accounts up front; one of them held past
    lock_timeout must not fail the transfers between other accounts. The
    batch is built by hand, so that it surely holds all four transfers."""
    app = make_app(make_config(database_url, servers["redis"], lock_timeout_ms=300))
    api, source, destinations = _hot_ledger(app, db)
    ledger = app.extensions["payflow"].ledger
    batch = [_Pending({"kind": "transfer", "from_account_id": uuid.UUID(source),
                       "to_account_id": uuid.UUID(destination), "amount": AMOUNT, "currency": None,
                       "description": None, "metadata": Jsonb({}), "owner": None, "scope": "test",
                       "key": new_key(), "fingerprint": "0" * 64, "ttl_seconds": 3600})
             for destination in destinations[:4]]
    with psycopg.connect(database_url) as holder:
        holder.execute("SELECT 1 FROM accounts WHERE id = %s FOR UPDATE", (destinations[0],))
        ledger._batcher._run(batch)
        holder.rollback()
    assert all(pending.done for pending in batch)
    assert isinstance(batch[0].error, errors.LockUnavailable)
    assert [pending.row["outcome"] for pending in batch[1:]] == ["created"] * 3
    assert api.balance(source) == FUNDS - 3 * AMOUNT
    app.extensions["payflow"].close()


def test_a_broken_batch_answer_fails_its_requests_and_hangs_nobody(app, db):
    api, source, destinations = _hot_ledger(app, db)
    batcher = app.extensions["payflow"].ledger._batcher
    post_many = batcher._post_many

    def short(params_list):
        time.sleep(0.05)
        return post_many(params_list)[:-1]  # one row missing: a bug

    batcher._post_many = short
    results = _race(api, source, destinations[:8])  # returns: nobody hangs
    assert {response.status_code for _, response in results} <= {201, 500}


def test_a_batch_size_below_two_turns_batching_off(database_url, servers):
    app = make_app(make_config(database_url, servers["redis"], transfer_batch_size_max=0))
    assert app.extensions["payflow"].ledger._batcher is None
    with pytest.raises(ValueError):
        TransferBatcher(lambda params: params, lambda many: many, batch_size_max=1, in_flight_max=1)
    app.extensions["payflow"].close()


def test_the_batch_function_gives_every_item_its_own_outcome(db, database_url):
    """Straight at SQL: a replay of a key posted earlier in the same batch, a
    refusal between two successes, an unknown account."""
    world = create_system_account(db)
    rows = db.execute("INSERT INTO accounts (name, currency, overdraft_limit) "
                      "SELECT 'a' || n, 'USD', 0 FROM generate_series(1, 2) n RETURNING id").fetchall()
    rich, poor = (str(row["id"]) for row in rows)

    def item(key, source, destination, amount):
        return {"scope": "s", "key": key, "ttl_seconds": 3600,
                "fingerprint": hashlib.sha256(f"{key}-{amount}".encode()).hexdigest(),
                "kind": "transfer", "from_account_id": source, "to_account_id": destination,
                "amount": amount, "currency": None, "description": None, "metadata": {}, "owner": None}

    items = [item("k1", world, rich, 500), item("k1", world, rich, 500), item("k2", poor, rich, 1),
             item("k3", rich, poor, 200), item("k4", rich, "00000000-0000-0000-0000-000000000000", 1),
             item("k1", world, rich, 7)]
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        out = conn.execute("SELECT * FROM payflow_post_transfers_v1(%s) ORDER BY ordinality",
                           (Jsonb(items),)).fetchall()
    assert [(row["outcome"], row["status"]) for row in out] == [
        ("created", 201), ("replay", 201), ("refused", 422), ("created", 201), ("refused", 404),
        ("reused", None)]
    assert out[1]["body"] == out[0]["body"]
    assert '"insufficient_funds"' in out[2]["body"] and '"account_not_found"' in out[4]["body"]
    balances = {row["id"]: row["balance"] for row in db.execute(
        "SELECT id::text, balance FROM accounts WHERE id IN (%s, %s)", (rich, poor))}
    assert balances == {rich: 300, poor: 200}
    assert_ledger_consistent(database_url)


def test_the_batcher_bounds_batches_and_loses_nobody():
    """The coordination alone: 64 threads, batches of at most 8, at most 2 at
    once, each request answered with its own row exactly once."""
    running, overlaps, sizes = [0], [], []  # batches at once, and their sizes
    lock = threading.Lock()

    def post_many(params_list):
        with lock:
            running[0] += 1
            overlaps.append(running[0])
            sizes.append(len(params_list))
        time.sleep(0.002)
        with lock:
            running[0] -= 1
        return [{"echo": params["n"]} for params in params_list]

    batcher = TransferBatcher(lambda params: {"echo": params["n"]}, post_many, batch_size_max=8,
                              in_flight_max=2)
    answers = {}

    def one(n: int) -> None:
        answers[n] = batcher.post({"n": n})

    threads = [threading.Thread(target=one, args=(n,)) for n in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == {n: {"echo": n} for n in range(64)}
    assert max(overlaps, default=1) <= 2 and max(sizes, default=1) <= 8
