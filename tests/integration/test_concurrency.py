"""Many clients at once against the API under gunicorn: opposite transfers
between the same few accounts never deadlock into a 5xx, and every balance
ends exact."""

from __future__ import annotations

import random
import threading
from collections import Counter

import psycopg
import pytest

from tests.helpers import HttpClient, assert_ledger_consistent, create_system_account

THREADS = 8
TRANSFERS_PER_THREAD = 200


@pytest.fixture
def http(live_server):
    client = HttpClient(live_server["base_url"], live_server["api_key"])
    yield client
    client.close()


def _open_accounts(http, live_server, count: int, funding: int, overdraft_limit: int = 0) -> list[str]:
    with psycopg.connect(live_server["database_url"], autocommit=True) as db:
        world = create_system_account(db)
    ids = []
    for index in range(count):
        status, _, body = http.request("POST", "/v1/accounts", {
            "name": f"c{index}", "currency": "USD", "overdraft_limit": overdraft_limit})
        assert status == 201
        ids.append(body["id"])
        assert http.transfer(world, body["id"], funding)[0] == 201
    return ids


def _run_threads(live_server, plan) -> tuple[Counter, list]:
    """plan(thread_index) -> list of (source, destination, amount)."""
    statuses, outcomes, lock = Counter(), [], threading.Lock()

    def worker(index: int) -> None:
        client = HttpClient(live_server["base_url"], live_server["api_key"])
        for source, destination, amount in plan(index):
            status, _, body = client.transfer(source, destination, amount)
            with lock:
                statuses[status] += 1
                outcomes.append((status, source, destination, amount, body))
        client.close()

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses, outcomes


def _balances(http, ids) -> dict[str, int]:
    return {account: http.request("GET", f"/v1/accounts/{account}")[2]["balance"] for account in ids}


def test_opposite_transfers_between_two_accounts_end_exact(http, live_server):
    a, b = _open_accounts(http, live_server, 2, funding=1_000_000)

    def amount(index: int, step: int) -> int:
        return 1 + step % 7 if index % 2 == 0 else 2 + step % 5

    def plan(index):
        # Half the threads send A->B, half B->A, at the same time.
        source, destination = (a, b) if index % 2 == 0 else (b, a)
        return [(source, destination, amount(index, step)) for step in range(TRANSFERS_PER_THREAD)]

    statuses, _ = _run_threads(live_server, plan)
    assert statuses == Counter({201: THREADS * TRANSFERS_PER_THREAD})
    a_to_b = sum(amount(i, s) for i in range(0, THREADS, 2) for s in range(TRANSFERS_PER_THREAD))
    b_to_a = sum(amount(i, s) for i in range(1, THREADS, 2) for s in range(TRANSFERS_PER_THREAD))
    assert a_to_b != b_to_a
    assert _balances(http, [a, b]) == {a: 1_000_000 - a_to_b + b_to_a, b: 1_000_000 + a_to_b - b_to_a}
    assert_ledger_consistent(live_server["database_url"])


def test_random_transfers_among_few_accounts_with_overdrafts(http, live_server):
    """Funds run out on purpose: refused transfers are 422, never 5xx, and no
    balance ever goes below its overdraft limit."""
    ids = _open_accounts(http, live_server, 4, funding=2_000, overdraft_limit=300)

    def plan(index):
        rng = random.Random(index)
        return [tuple(rng.sample(ids, 2)) + (rng.randint(1, 400),) for _ in range(TRANSFERS_PER_THREAD)]

    statuses, outcomes = _run_threads(live_server, plan)
    assert set(statuses) <= {201, 422}, statuses
    assert statuses[201] > 0 and statuses[422] > 0, statuses
    refusals = {body["error"]["code"] for status, *_, body in outcomes if status == 422}
    assert refusals == {"insufficient_funds"}

    expected = dict.fromkeys(ids, 2_000)
    for status, source, destination, amount, _ in outcomes:
        if status == 201:
            expected[source] -= amount
            expected[destination] += amount
    balances = _balances(http, ids)
    assert balances == expected
    assert min(balances.values()) >= -300
    assert_ledger_consistent(live_server["database_url"])
