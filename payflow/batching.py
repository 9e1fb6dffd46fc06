"""Group commit for transfers, within one API process.

A transfer's transaction holds its accounts' row locks until its commit (a
disk flush): a hot account (a treasury every transfer debits) then caps the
whole ledger at one commit at a time. Here concurrent transfers coalesce: a
request thread that finds a batch slot free becomes a leader and posts
everything queued so far in one transaction (payflow_post_transfers_v1); the
others wait for its outcome. Under light load a batch is one transfer and
nothing waits; under load batches grow by themselves, and no timer adds
latency. A few batches run at once (`in_flight_max`), so one batch waiting on
a lock does not hold up every transfer of the process.

Each transfer keeps its own outcome (idempotency key, refusal, response
bytes): the SQL function posts them one by one. When a batch fails as a whole:
- for an error one transfer can cause (a constraint, bad data, an account
  locked elsewhere past lock_timeout), each transfer of it is posted again on
  its own, so its outcome is its own;
- for an error the batch shares (no connection, a timeout, a lost connection
  with the commit's fate unknown), every transfer of it gets that error (503):
  reposting would only wait again, and the client's retry with its
  idempotency key replays a transfer that did commit.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from psycopg.types.json import Jsonb

from payflow import errors, metrics

log = logging.getLogger(__name__)

# A batch failing with one of these may have one culprit: post each on its own.
# A lock not granted in time is one: the batch locks all its accounts up
# front, and one account locked elsewhere must not fail the transfers of others.
ONE_TRANSFER_ERRORS = (errors.ConstraintViolated, errors.ValidationFailed, errors.IdempotencyKeyInUse,
                       errors.LockUnavailable)


@dataclass(eq=False)
class _Pending:
    params: dict
    row: dict | None = None
    error: BaseException | None = None
    done: bool = False


class TransferBatcher:
    """post_one(params) posts one transfer (a row: outcome, status, body);
    post_many(list of params) posts a batch in one transaction (rows in order)."""

    def __init__(self, post_one: Callable[[dict], dict], post_many: Callable[[list[dict]], list[dict]],
                 batch_size_max: int, in_flight_max: int) -> None:
        if batch_size_max < 2 or in_flight_max < 1:
            raise ValueError("a batch holds at least 2 transfers and at least 1 batch runs")
        self._post_one = post_one
        self._post_many = post_many
        self._batch_size_max = batch_size_max
        self._in_flight_max = in_flight_max
        self._queue: list[_Pending] = []
        self._in_flight = 0
        self._changed = threading.Condition()

    def post(self, params: dict) -> dict:
        mine = _Pending(params)
        with self._changed:
            self._queue.append(mine)
            while not mine.done:
                if self._in_flight >= self._in_flight_max or mine not in self._queue:
                    # Every slot busy; or our transfer is in a batch another
                    # thread runs (we answer when it ends, leading nothing else).
                    self._changed.wait()
                    continue
                batch = self._queue[: self._batch_size_max]
                del self._queue[: self._batch_size_max]
                self._in_flight += 1
                self._changed.release()
                try:
                    self._run(batch)
                finally:
                    self._changed.acquire()
                    self._in_flight -= 1
                    self._changed.notify_all()
        if mine.error is not None:
            raise mine.error
        return mine.row

    def _run(self, batch: list[_Pending]) -> None:
        try:
            metrics.TRANSFER_BATCH_SIZE.observe(len(batch))
            if len(batch) == 1:
                self._run_alone(batch[0])
                return
            try:
                rows = self._post_many([pending.params for pending in batch])
            except ONE_TRANSFER_ERRORS as error:
                log.warning("a batch of %d transfers failed (%s); posting them one by one",
                            len(batch), error)
                for pending in batch:
                    self._run_alone(pending)
                return
            for pending, row in zip(batch, rows, strict=True):
                pending.row, pending.done = row, True
        except BaseException as error:  # shared by the batch (or a bug): every request hears of it
            for pending in batch:
                if not pending.done:
                    pending.error, pending.done = error, True
            if not isinstance(error, Exception):
                raise

    def _run_alone(self, pending: _Pending) -> None:
        try:
            pending.row = self._post_one(pending.params)
        except Exception as error:  # handed to the request that owns it
            pending.error = error
        pending.done = True


def batch_items(params_list: list[dict]) -> Jsonb:
    """The JSON array payflow_post_transfers_v1 takes."""
    return Jsonb([{**params, "metadata": params["metadata"].obj,
                   "from_account_id": str(params["from_account_id"]),
                   "to_account_id": str(params["to_account_id"]),
                   "owner": None if params["owner"] is None else str(params["owner"])}
                  for params in params_list])
