"""Group commit for transfers, within one API process.

A transfer's transaction holds its accounts' row locks until its commit (a
disk flush): a hot account (a treasury every transfer debits) then caps the
whole ledger at one commit at a time. Here concurrent transfers coalesce: the
first request thread to find no batch running becomes the leader and posts
everything queued so far in one transaction (payflow_post_transfers_v1);
the others wait for its outcome. Under light load a batch is one transfer and
nothing waits; under load the batch grows by itself, and no timer adds latency.

Each transfer keeps its own outcome (idempotency key, refusal, response
bytes): the SQL function posts them one by one. If the batch's transaction
fails as a whole (an error no single transfer should share), every transfer of
it is posted again on its own, so its outcome is its own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from psycopg.types.json import Jsonb

from payflow import errors, metrics

log = logging.getLogger(__name__)


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
                 batch_size_max: int) -> None:
        self._post_one = post_one
        self._post_many = post_many
        self._batch_size_max = batch_size_max
        self._queue: list[_Pending] = []
        self._running = False
        self._changed = threading.Condition()

    def post(self, params: dict) -> dict:
        mine = _Pending(params)
        with self._changed:
            self._queue.append(mine)
            while True:
                if mine.done:
                    break
                if self._running:
                    self._changed.wait()
                    continue
                # Lead: take what is queued (ours among it, or ahead of it).
                batch = self._queue[: self._batch_size_max]
                del self._queue[: self._batch_size_max]
                self._running = True
                self._changed.release()
                try:
                    self._run(batch)
                finally:
                    self._changed.acquire()
                    self._running = False
                    self._changed.notify_all()
        if mine.error is not None:
            raise mine.error
        return mine.row

    def _run(self, batch: list[_Pending]) -> None:
        metrics.TRANSFER_BATCH_SIZE.observe(len(batch))
        if len(batch) > 1:
            try:
                rows = self._post_many([pending.params for pending in batch])
            except errors.PayflowError as error:
                # Shared by the whole batch (a timeout, a constraint): give each
                # transfer its own attempt and its own outcome.
                log.warning("a batch of %d transfers failed as a whole (%s); posting them one by one",
                            len(batch), error)
            except BaseException as error:  # a bug: every waiting request must hear of it
                for pending in batch:
                    pending.error, pending.done = error, True
                return
            else:
                for pending, row in zip(batch, rows, strict=True):
                    pending.row, pending.done = row, True
                return
        for pending in batch:
            try:
                pending.row = self._post_one(pending.params)
            except BaseException as error:  # handed to the request that owns it
                pending.error = error
            pending.done = True


def batch_items(params_list: list[dict]) -> Jsonb:
    """The JSON array payflow_post_transfers_v1 takes."""
    return Jsonb([{**params, "metadata": params["metadata"].obj,
                   "from_account_id": str(params["from_account_id"]),
                   "to_account_id": str(params["to_account_id"]),
                   "owner": None if params["owner"] is None else str(params["owner"])}
                  for params in params_list])
