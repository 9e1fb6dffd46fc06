"""The payout saga, run by an in-process worker: success, retries then
success, permanent failure with compensation, exhausted retries; and webhook
deliveries, signed and retried. After each: balances equal entries, the
ledger sums to zero, the account's balance is right."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from payflow import webhooks
from payflow.db import create_pool
from payflow.schemas import PayoutSchema
from payflow.worker import Worker
from tests.conftest import make_config
from tests.helpers import (
    JSON,
    Api,
    assert_error,
    assert_ledger_consistent,
    assert_schema,
    create_system_account,
    new_key,
)

FAST_RETRIES = {"outbox_backoff_base_seconds": 0.001, "outbox_backoff_cap_seconds": 0.01}


@pytest.fixture
def make_worker(database_url, servers):
    pools = []

    def make(**overrides) -> Worker:
        config = make_config(database_url, servers["redis"], **{**FAST_RETRIES, **overrides})
        pool = create_pool(config.replace(pool_size_min=1, pool_size_max=2))
        pools.append(pool)
        return Worker(config, pool)

    yield make
    for pool in pools:
        pool.close()


def drain(worker: Worker, rounds_max: int = 200) -> None:
    """Run the worker until no task is due (retries are due almost at once)."""
    import time

    idle = 0
    for _ in range(rounds_max):
        if worker.run_once():
            idle = 0
        else:
            idle += 1
            if idle > 5:
                return
            time.sleep(0.02)
    raise AssertionError("the worker never ran out of tasks")


@pytest.fixture
def funded(client, db):
    api = Api(client)
    world = create_system_account(db)
    account = api.create_account()
    api.ok_transfer(world, account, 10_000)
    return api, account


def request_payout(client, account, amount, key=None, **extra):
    body = {"account_id": account, "amount": amount, "destination": {"iban": "DE00 1234"}, **extra}
    return client.post("/v1/payouts", json=body, headers={**JSON, "X-Idempotency-Key": key or new_key()})


def payout(client, payout_id) -> dict:
    response = client.get(f"/v1/payouts/{payout_id}")
    assert response.status_code == 200
    assert_schema(response.get_json(), PayoutSchema)
    return response.get_json()


def clearing_balance(db) -> int:
    row = db.execute("SELECT balance FROM accounts WHERE system_role = 'payout_clearing'").fetchone()
    return row["balance"] if row else 0


def provider_books(db, payout_id) -> tuple[int, int]:
    calls = db.execute("SELECT count(*) AS n FROM simulated_provider_calls WHERE payout_id = %s",
                       (payout_id,)).fetchone()["n"]
    paid = db.execute("SELECT count(*) AS n FROM simulated_provider_payouts WHERE payout_id = %s",
                      (payout_id,)).fetchone()["n"]
    return calls, paid


def test_payout_succeeds(client, db, funded, make_worker, database_url):
    api, account = funded
    response = request_payout(client, account, 2_500)
    assert response.status_code == 202
    created = response.get_json()
    assert response.headers["Location"] == f"/v1/payouts/{created['id']}"
    assert created["status"] == "pending"
    assert api.balance(account) == 7_500 and clearing_balance(db) == 2_500

    drain(make_worker())
    done = payout(client, created["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 1 and done["provider_reference"]
    assert provider_books(db, created["id"]) == (1, 1)
    assert api.balance(account) == 7_500 and clearing_balance(db) == 2_500
    events = db.execute("SELECT topic, status FROM outbox WHERE topic LIKE 'payout.%%' "
                        "ORDER BY id").fetchall()
    assert events == [{"topic": "payout.requested", "status": "done"},
                      {"topic": "payout.succeeded", "status": "done"}]
    assert_ledger_consistent(database_url)


def test_retryable_failures_then_success_pay_once(client, db, funded, make_worker, database_url):
    api, account = funded
    created = request_payout(client, account, 1_000).get_json()
    drain(make_worker(simulated_fail_first_calls=2))
    done = payout(client, created["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 3
    assert provider_books(db, created["id"]) == (3, 1)
    assert api.balance(account) == 9_000
    assert_ledger_consistent(database_url)


def test_permanent_failure_returns_the_money(client, db, funded, make_worker, database_url):
    api, account = funded
    created = request_payout(client, account, 4_000).get_json()
    drain(make_worker(simulated_permanent_failure_rate=1.0))
    failed = payout(client, created["id"])
    assert failed["status"] == "failed" and "closed" in failed["failure_reason"]
    assert failed["reversal_transfer_id"]
    assert provider_books(db, created["id"]) == (1, 0)
    assert api.balance(account) == 10_000 and clearing_balance(db) == 0
    reversal = client.get(f"/v1/transfers/{failed['reversal_transfer_id']}").get_json()
    assert reversal["kind"] == "reversal" and reversal["reverses_transfer_id"] == failed["transfer_id"]
    assert reversal["to_account_id"] == account and reversal["amount"] == 4_000
    assert_ledger_consistent(database_url)


def test_exhausted_retries_fail_and_return_the_money(client, db, funded, make_worker, database_url):
    api, account = funded
    created = request_payout(client, account, 300).get_json()
    drain(make_worker(simulated_failure_rate=1.0, outbox_attempts_max=3))
    failed = payout(client, created["id"])
    assert failed["status"] == "failed" and "retries exhausted" in failed["failure_reason"]
    assert failed["attempts"] == 3 and provider_books(db, created["id"]) == (3, 0)
    assert api.balance(account) == 10_000
    assert_ledger_consistent(database_url)


class CrashAfterPaying:
    """A worker that dies right after the provider paid, before it could record
    it (a test double of the outside world around the real simulated provider)."""

    def __init__(self, provider) -> None:
        self.provider, self.crashed = provider, False

    def pay(self, request):
        result = self.provider.pay(request)
        if not self.crashed:
            self.crashed = True
            raise RuntimeError("worker died after the provider paid")
        return result


def test_a_crash_after_the_provider_paid_does_not_pay_again(client, db, funded, make_worker,
                                                            database_url):
    """At-least-once delivery: the task runs again with the same key, and the
    provider's dedupe answers with the first payment."""
    api, account = funded
    created = request_payout(client, account, 100).get_json()
    worker = make_worker()
    worker.provider = CrashAfterPaying(worker.provider)
    drain(worker)
    done = payout(client, created["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 2
    assert provider_books(db, created["id"]) == (2, 1)
    assert api.balance(account) == 9_900 and clearing_balance(db) == 100
    assert_ledger_consistent(database_url)


class AlwaysUnknown:
    """A provider that always times out after sending: the outcome is unknown."""

    def pay(self, request):
        from payflow.providers import PayoutResult

        return PayoutResult.unknown("timed out after sending")


def test_an_unknown_outcome_at_the_last_attempt_is_never_refunded(client, db, funded, make_worker,
                                                                  database_url):
    api, account = funded
    created = request_payout(client, account, 700).get_json()
    worker = make_worker(outbox_attempts_max=3)
    worker.provider = AlwaysUnknown()
    drain(worker)
    stuck = payout(client, created["id"])
    assert stuck["status"] == "processing" and stuck["attempts"] == 3
    task = db.execute("SELECT status, last_error FROM outbox WHERE topic = 'payout.requested'").fetchone()
    assert task["status"] == "dead" and "timed out" in task["last_error"]
    assert api.balance(account) == 9_300 and clearing_balance(db) == 700  # held, not refunded
    assert_ledger_consistent(database_url)


def test_a_task_whose_lease_ran_out_is_not_run_by_its_old_owner(client, db, funded, make_worker):
    """A batch outlived its lease: another worker took the task; the first
    must skip it rather than call the provider a second time."""
    _, account = funded
    created = request_payout(client, account, 100).get_json()
    slow, fast = make_worker(), make_worker()
    tasks = slow._claim()
    payout_task = next(task for task in tasks if task.topic == "payout.requested")
    # The batch took longer than the lease: time passes for the slow worker...
    slow._claimed_at -= slow.config.worker_lease_seconds
    db.execute("UPDATE outbox SET lease_expires_at = now() - interval '1 second'")
    drain(fast)  # ...and another worker took the task meanwhile.
    assert not slow._renew(payout_task)
    assert slow.run_once() == 0
    assert payout(client, created["id"])["status"] == "succeeded"
    assert provider_books(db, created["id"]) == (1, 1)


def test_payout_requests_are_idempotent_and_validated(client, funded):
    api, account = funded
    key = new_key()
    first = request_payout(client, account, 100, key=key)
    again = request_payout(client, account, 100, key=key)
    assert again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert again.get_data() == first.get_data()
    assert_error(request_payout(client, account, 101, key=key), 422, "idempotency_key_reused")
    assert_error(request_payout(client, account, 1_000_000), 422, "insufficient_funds")
    assert_error(request_payout(client, account, 1, currency="EUR"), 422, "currency_mismatch")
    assert_error(request_payout(client, "00000000-0000-0000-0000-000000000001", 1), 404,
                 "account_not_found")
    for bad in ({"amount": 0}, {"amount": 1.5}, {"destination": {}}, {"destination": "x"},
                {"extra": 1}, {"destination": {f"k{i}": "v" * 500 for i in range(10)}}):
        body = {"account_id": account, "amount": 5, "destination": {"iban": "x"}, **bad}
        response = client.post("/v1/payouts", json=body, headers={**JSON, "X-Idempotency-Key": new_key()})
        assert_error(response, 422, "validation_error")
    response = client.post("/v1/payouts", json={"account_id": account, "amount": 1,
                                                "destination": {"a": "b"}}, headers=JSON)
    assert_error(response, 400, "idempotency_key_missing")
    assert_error(client.get("/v1/payouts/nope"), 404, "payout_not_found")
    assert api.balance(account) == 9_900


# -- webhooks -----------------------------------------------------------------------


class Receiver:
    """A local HTTP endpoint that records deliveries and answers `status`."""

    def __init__(self, status: int = 200) -> None:
        self.status, self.deliveries = status, []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                headers = {name.lower(): value for name, value in self.headers.items()}
                receiver.deliveries.append((headers, body))
                try:
                    self.send_response(receiver.status)
                    self.end_headers()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the worker gave up waiting: a failed delivery, retried

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    server = Receiver()
    yield server
    server.close()


def register(client, url, event_types):
    response = client.post("/v1/webhook-endpoints", json={"url": url, "event_types": event_types},
                           headers=JSON)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def test_webhooks_are_delivered_signed_once_per_subscribed_event(client, db, funded, make_worker,
                                                                 receiver):
    api, account = funded
    endpoint = register(client, receiver.url, ["transfer.posted", "payout.succeeded"])
    assert endpoint["secret"].startswith("whsec_")
    listed = client.get("/v1/webhook-endpoints").get_json()["data"]
    assert [e["id"] for e in listed] == [endpoint["id"]] and "secret" not in listed[0]

    other = api.create_account()
    transfer = api.ok_transfer(account, other, 10)
    request_payout(client, account, 20)
    drain(make_worker())

    types = sorted(json.loads(body)["type"] for _, body in receiver.deliveries)
    assert types == ["payout.succeeded", "transfer.posted"]
    for headers, body in receiver.deliveries:
        webhooks.verify(endpoint["secret"], headers, body)
    posted = next(json.loads(b) for _, b in receiver.deliveries if b"transfer.posted" in b)
    assert posted["data"] == {"transfer_id": transfer["id"]}


def test_failed_webhook_deliveries_are_retried_with_the_same_id(client, funded, make_worker):
    api, account = funded
    failing = Receiver(status=500)
    try:
        endpoint = register(client, failing.url, ["transfer.posted"])
        api.ok_transfer(account, api.create_account(), 5)
        drain(make_worker(outbox_attempts_max=3))
    finally:
        failing.close()
    assert len(failing.deliveries) == 3
    assert len({headers["webhook-id"] for headers, _ in failing.deliveries}) == 1
    for headers, body in failing.deliveries:
        webhooks.verify(endpoint["secret"], headers, body)
    stats = client.get("/v1/outbox/stats").get_json()
    assert stats["dead"] == 1 and stats["by_topic"]["webhook.deliver"] == {"dead": 1}


def test_payouts_never_draw_on_an_overdraft(client):
    api = Api(client)
    credit = api.create_account(overdraft_limit=5_000)  # the admin key grants it
    assert_error(request_payout(client, credit, 1), 422, "insufficient_funds")


def test_payouts_from_system_accounts_are_refused(client, db):
    world = create_system_account(db)
    assert_error(request_payout(client, world, 1), 422, "account_not_eligible")


def test_webhook_url_scheme_is_normalised(client):
    endpoint = register(client, "HTTPS://Example.com/Hooks", ["payout.failed"])
    assert endpoint["url"] == "https://Example.com/Hooks"


@pytest.mark.parametrize("bad", [{"url": "ftp://x.example"}, {"url": "not a url"},
                                 {"event_types": []}, {"event_types": ["nope"]}, {"secret": "x"}])
def test_webhook_endpoint_validation(client, bad):
    body = {"url": "https://example.com/hooks", "event_types": ["transfer.posted"], **bad}
    assert_error(client.post("/v1/webhook-endpoints", json=body, headers=JSON), 422, "validation_error")


def test_outbox_stats(client, funded):
    api, account = funded
    api.ok_transfer(account, api.create_account(), 1)
    stats = client.get("/v1/outbox/stats").get_json()
    assert stats["by_status"]["pending"] == 2 and stats["dead"] == 0
    assert stats["by_topic"]["transfer.posted"] == {"pending": 2}
    assert stats["oldest_pending_age_seconds"] >= 0


def test_a_batch_of_events_fans_out_in_one_go_each_to_its_subscribers_once(client, db, funded,
                                                                          make_worker, receiver):
    api, account = funded
    posted_only = register(client, receiver.url + "/posted", ["transfer.posted"])
    register(client, receiver.url + "/payouts", ["payout.succeeded"])
    other = api.create_account()
    transfers = [api.ok_transfer(account, other, 1)["id"] for _ in range(10)]
    worker = make_worker()
    calls = []
    fan_out_many = worker._fan_out_events
    worker._fan_out_events = lambda tasks: calls.append(len(tasks)) or fan_out_many(tasks)
    drain(worker)

    assert calls[0] >= 10  # one claimed batch held every event
    delivered = sorted(json.loads(body)["data"]["transfer_id"] for _, body in receiver.deliveries)
    assert delivered == sorted(transfers)  # the /posted endpoint only, once each
    assert all(json.loads(body)["type"] == "transfer.posted" for _, body in receiver.deliveries)
    assert posted_only["id"]
    left = db.execute("SELECT count(*) AS n FROM outbox WHERE status <> 'done'").fetchone()["n"]
    assert left == 0


def test_a_batch_of_payouts_starts_and_ends_together_each_with_its_own_outcome(client, db, funded,
                                                                              make_worker, database_url):
    """The worker marks a claimed batch's payouts processing in one transaction
    and ends the paid ones in one more; refusals and retries stay per payout."""
    api, account = funded
    created = [request_payout(client, account, 100 * (n + 1)).get_json()["id"] for n in range(8)]
    worker = make_worker(simulated_permanent_failure_rate=0.4, simulated_seed=7)
    started, ended = [], []
    start, end = worker._start_payouts, worker._end_paid_payouts
    worker._start_payouts = lambda tasks: started.append(len(tasks)) or start(tasks)
    worker._end_paid_payouts = lambda: ended.append(len(worker._paid)) or end()
    drain(worker)

    assert started[0] == 8 and ended[0] >= 2  # one transaction each for the batch
    outcomes = {payout_id: payout(client, payout_id) for payout_id in created}
    succeeded = [p for p in outcomes.values() if p["status"] == "succeeded"]
    failed = [p for p in outcomes.values() if p["status"] == "failed"]
    assert succeeded and failed and len(succeeded) + len(failed) == 8
    for payout_id, body in outcomes.items():
        assert provider_books(db, payout_id) == (1, 1 if body["status"] == "succeeded" else 0)
    assert clearing_balance(db) == sum(p["amount"] for p in succeeded)
    assert api.balance(account) == 10_000 - sum(p["amount"] for p in succeeded)
    left = db.execute("SELECT count(*) AS n FROM outbox WHERE status <> 'done'").fetchone()["n"]
    assert left == 0
    assert_ledger_consistent(database_url)
