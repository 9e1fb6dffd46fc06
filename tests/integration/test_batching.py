"""Group commit (payflow/batching.py): concurrent transfers share a
transaction, yet each keeps its own outcome, key and response bytes."""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from payflow import errors
from payflow.batching import TransferBatcher
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


def test_a_batch_that_fails_as_a_whole_posts_each_transfer_on_its_own(app, db, database_url):
    api, source, destinations = _hot_ledger(app, db)
    batcher = app.extensions["payflow"].ledger._batcher
    failures = []

    def failing(params_list):
        failures.append(len(params_list))
        time.sleep(0.05)  # let the others queue behind this batch
        raise errors.Unavailable("the batch's transaction failed")

    batcher._post_many = failing
    results = _race(api, source, destinations[:10])
    assert failures  # the batch path ran and failed...
    assert [response.status_code for _, response in results] == [201] * 10  # ...nobody noticed
    assert api.balance(source) == FUNDS - 10 * AMOUNT
    assert_ledger_consistent(database_url)


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


def test_the_batcher_runs_one_batch_at_a_time_and_loses_nobody():
    """The coordination alone: 64 threads, batches of at most 8, each request
    answered with its own row exactly once."""
    running, overlaps, sizes = [0], [], []
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

    batcher = TransferBatcher(lambda params: {"echo": params["n"]}, post_many, batch_size_max=8)
    answers = {}

    def one(n: int) -> None:
        answers[n] = batcher.post({"n": n})

    threads = [threading.Thread(target=one, args=(n,)) for n in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == {n: {"echo": n} for n in range(64)}
    assert max(overlaps, default=1) == 1 and max(sizes, default=1) <= 8
