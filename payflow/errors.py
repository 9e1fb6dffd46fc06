"""payflow's own exceptions. Each one's docstring is its default message.

An `ApiError` knows the HTTP status and error code it becomes; the handlers in
`payflow.api.errors` turn it into the one JSON error shape of DESIGN.md.
"""

from __future__ import annotations

from typing import Any


class PayflowError(Exception):
    """Something went wrong in payflow."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ApiError(PayflowError):
    """The request failed."""

    status = 400
    code = "bad_request"
    retry_after_seconds: int | None = None

    def __init__(self, message: str | None = None, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = str(self)
        self.details = details or {}


class Unauthorized(ApiError):
    """Send a valid API key: Authorization: Bearer pf_live_..."""

    status, code = 401, "unauthorized"


class Forbidden(ApiError):
    """This API key lacks the scope this request needs."""

    status, code = 403, "forbidden"


class RateLimited(ApiError):
    """Too many requests for this API key; retry later."""

    status, code = 429, "rate_limited"
    retry_after_seconds = 1


class InvalidJson(ApiError):
    """The request body is not valid JSON."""

    status, code = 400, "invalid_json"


class UnreadableBody(ApiError):
    """The request body could not be read (its chunked encoding is malformed)."""

    status, code = 400, "unreadable_body"


class ValidationFailed(ApiError):
    """The request does not match the schema; see details."""

    status, code = 422, "validation_error"


class IdempotencyKeyMissing(ApiError):
    """This request moves money: send an X-Idempotency-Key header."""

    status, code = 400, "idempotency_key_missing"


class IdempotencyKeyInvalid(ApiError):
    """An idempotency key is 1 to 255 printable ASCII characters."""

    status, code = 400, "idempotency_key_invalid"


class IdempotencyKeyReused(ApiError):
    """This idempotency key was used with a different request."""

    status, code = 422, "idempotency_key_reused"


class IdempotencyKeyInUse(ApiError):
    """A request with this idempotency key is still running; retry later."""

    status, code = 409, "idempotency_key_in_use"
    retry_after_seconds = 1


class AccountNotFound(ApiError):
    """No account with this id."""

    status, code = 404, "account_not_found"


class TransferNotFound(ApiError):
    """No transfer with this id."""

    status, code = 404, "transfer_not_found"


class PayoutNotFound(ApiError):
    """No payout with this id."""

    status, code = 404, "payout_not_found"


class SettlementConflict(ApiError):
    """Settlement records reuse references already imported with other content; nothing was imported."""

    status, code = 409, "settlement_conflict"


class ReconciliationNotFound(ApiError):
    """No reconciliation run with this id."""

    status, code = 404, "reconciliation_not_found"


class ReconciliationExceptionNotFound(ApiError):
    """No exception with this id in this reconciliation run."""

    status, code = 404, "reconciliation_exception_not_found"


class ExceptionAlreadyResolved(ApiError):
    """This exception is already resolved; see details for who resolved it and when."""

    status, code = 409, "exception_already_resolved"


class UnsupportedMediaType(ApiError):
    """Send the body as JSON, with Content-Type: application/json."""

    status, code = 415, "unsupported_media_type"


class Unavailable(ApiError):
    """The service is briefly unavailable; retry later."""

    status, code = 503, "unavailable"
    retry_after_seconds = 1


class LockUnavailable(Unavailable):
    """A row lock was not granted in time (lock_timeout): held by someone else."""


class ConstraintViolated(ApiError):
    """The request breaks a rule of the ledger."""

    status, code = 422, "constraint_violation"
