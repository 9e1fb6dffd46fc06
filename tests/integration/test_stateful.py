"""A hypothesis state machine drives the API with random accounts and
transfers (overdraft attempts, unknown ids, bad amounts, currency mismatches,
repeated and reused idempotency keys) against a pure-Python model. After every
step the database matches the model, every balance equals the sum of its
entries, every entry chain is continuous and all entries sum to zero."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from payflow.currencies import ISO_4217_CODES
from tests.helpers import JSON, Api, assert_ledger_consistent, create_system_account, new_key

BIGINT_MAX = 2**63 - 1
UNKNOWN_ACCOUNT = "00000000-0000-4000-8000-000000000000"
amounts = st.one_of(st.integers(min_value=1, max_value=3_000), st.integers(min_value=-10, max_value=0),
                    st.just(BIGINT_MAX), st.just(BIGINT_MAX + 1))


def expected_outcome(model, source, destination, amount, currency):
    """(status, code) the API must answer, from the model alone."""
    if not 1 <= amount <= BIGINT_MAX or source == destination or \
            (currency is not None and currency not in ISO_4217_CODES):
        return 422, "validation_error"
    if source not in model.balances or destination not in model.balances:
        return 404, "account_not_found"
    source_currency = model.currencies[source]
    if source_currency != model.currencies[destination] or currency not in (None, source_currency):
        return 422, "currency_mismatch"
    limit = model.limits[source]
    if limit is not None and model.balances[source] - amount < -limit:
        return 422, "insufficient_funds"
    if model.balances[destination] + amount > BIGINT_MAX or \
            model.balances[source] - amount < -BIGINT_MAX - 1:
        return 422, "balance_limit_exceeded"
    return 201, None


class LedgerMachine(RuleBasedStateMachine):
    """Examples share one database (cheap examples, fast shrinking): each opens
    accounts of its own, and the global invariants hold across all of them."""

    app = database_url = None  # set by the test below
    accounts = Bundle("accounts")
    keys = Bundle("keys")

    def __init__(self) -> None:
        super().__init__()
        self.client = self.app.test_client()
        self.api = Api(self.client)
        self.balances: dict[str, int] = {}
        self.currencies: dict[str, str] = {}
        self.limits: dict[str, int | None] = {}
        self.requests: dict[str, dict] = {}  # idempotency key -> the body last sent with it
        self.stored: dict[str, tuple[int, bytes]] = {}  # key -> the response stored for it

    @initialize(target=accounts)
    def open_world(self):
        import psycopg

        with psycopg.connect(self.database_url, autocommit=True) as db:
            world = create_system_account(db, "USD")
        self._remember(world, "USD", None)
        return world

    @rule(target=accounts, currency=st.sampled_from(["USD", "USD", "EUR"]),
          overdraft_limit=st.sampled_from([0, 0, 100, 5_000]))
    def open_account(self, currency, overdraft_limit):
        account = self.api.create_account(currency=currency, overdraft_limit=overdraft_limit)
        self._remember(account, currency, overdraft_limit)
        return account

    def _remember(self, account, currency, limit) -> None:
        self.balances[account], self.currencies[account], self.limits[account] = 0, currency, limit

    @rule(target=keys, source=accounts, destination=accounts, amount=amounts,
          currency=st.sampled_from([None, None, "USD", "EUR", "GBP", "XYZ"]),
          unknown=st.sampled_from([None, None, None, None, "source", "destination"]))
    def transfer(self, source, destination, amount, currency, unknown):
        source = UNKNOWN_ACCOUNT if unknown == "source" else source
        destination = UNKNOWN_ACCOUNT if unknown == "destination" else destination
        body = {"from_account_id": source, "to_account_id": destination, "amount": amount}
        if currency:
            body["currency"] = currency
        key = new_key()
        self._send(key, body)
        return key

    @rule(key=keys, change_amount=st.booleans())
    def retry(self, key, change_amount):
        body = dict(self.requests[key])
        if change_amount:  # to another valid amount
            body["amount"] = body["amount"] - 1 if 1 < body["amount"] <= BIGINT_MAX else 2
        stored = self.stored.get(key)
        if stored is None:
            # Rejected before execution the first time: the key was not burned.
            self._send(key, body)
            return
        response = self.client.post("/v1/transfers", json=body,
                                    headers={**JSON, "X-Idempotency-Key": key})
        if body != self.requests[key]:
            assert response.status_code == 422
            assert response.get_json()["error"]["code"] == "idempotency_key_reused"
        else:
            assert (response.status_code, response.get_data()) == stored
            assert response.headers["Idempotent-Replayed"] == "true"

    def _send(self, key, body) -> None:
        response = self.client.post("/v1/transfers", json=body,
                                    headers={**JSON, "X-Idempotency-Key": key})
        status, code = expected_outcome(self, body["from_account_id"], body["to_account_id"],
                                        body["amount"], body.get("currency"))
        assert response.status_code == status, (response.get_json(), status, code)
        self.requests[key] = body
        if code == "validation_error":
            assert response.get_json()["error"]["code"] == code
            return
        self.stored[key] = (response.status_code, response.get_data())
        if code:
            assert response.get_json()["error"]["code"] == code
        else:
            self.balances[body["from_account_id"]] -= body["amount"]
            self.balances[body["to_account_id"]] += body["amount"]

    @invariant()
    def balances_match_the_model(self):
        for account, balance in self.balances.items():
            assert self.api.balance(account) == balance, account

    @invariant()
    def ledger_is_consistent(self):
        assert_ledger_consistent(self.database_url)


def test_ledger_matches_its_model(app, database_url):
    LedgerMachine.app, LedgerMachine.database_url = app, database_url
    run_state_machine_as_test(LedgerMachine, settings=settings(
        max_examples=30, stateful_step_count=30, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
