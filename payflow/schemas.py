"""marshmallow schemas: they validate requests and, through flask-smorest,
generate /openapi.json. Response bodies are rendered by SQL functions
(payflow_*_json); the response schemas document them and the tests check
that every body matches its schema."""

from __future__ import annotations

import itertools
import json
import re
from datetime import UTC, date, datetime, time, timedelta

from marshmallow import Schema, ValidationError, fields, post_load, validate, validates_schema

from payflow import errors
from payflow.currencies import ISO_4217_CODES

BIGINT_MAX = 2**63 - 1
NAME_CHARS_MAX = 200
DESCRIPTION_CHARS_MAX = 1000
METADATA_KEYS_MAX = 50
METADATA_KEY_CHARS_MAX = 40
METADATA_VALUE_CHARS_MAX = 500
METADATA_BYTES_MAX = 8192
PAGE_SIZE_DEFAULT = 25
PAGE_SIZE_MAX = 100


def load(schema: Schema, data: object) -> dict:
    """Validates data against a schema; a violation is a 422 validation_error."""
    try:
        return schema.load(data)
    except ValidationError as error:
        messages = error.messages if isinstance(error.messages, dict) else {"_schema": error.messages}
        raise errors.ValidationFailed(details=messages) from None


class StrictInteger(fields.Integer):
    """A JSON integer: not a float (even 1.0), not a string, not a boolean."""

    default_error_messages = {"invalid": "Must be an integer (minor units), not a float or string."}

    def __init__(self, **kwargs) -> None:
        super().__init__(strict=True, **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


class Text(fields.String):
    """A string PostgreSQL can store: no NUL character, valid Unicode."""

    def _deserialize(self, value, attr, data, **kwargs):
        text = super()._deserialize(value, attr, data, **kwargs)
        if "\x00" in text:
            raise ValidationError("Must not contain the NUL character.")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValidationError("Must be valid Unicode (no lone surrogates).") from None
        return text


def currency_field(**kwargs) -> fields.String:
    return fields.String(
        validate=validate.OneOf(ISO_4217_CODES, error="Must be an ISO 4217 code such as USD."),
        metadata={"description": "ISO 4217 code, upper case", "example": "USD"},
        **kwargs,
    )


def amount_field(**kwargs) -> StrictInteger:
    return StrictInteger(
        validate=validate.Range(min=1, max=BIGINT_MAX),
        metadata={"description": "Integer count of minor units (cents), > 0"},
        **kwargs,
    )


class AccountCreateSchema(Schema):
    name = Text(required=True, validate=validate.Length(min=1, max=NAME_CHARS_MAX))
    currency = currency_field(required=True)
    overdraft_limit = StrictInteger(
        load_default=0,
        validate=validate.Range(min=0, max=BIGINT_MAX),
        metadata={"description": "How far below zero the balance may go, in minor units"},
    )


class AccountSchema(Schema):
    id = fields.UUID(required=True)
    object = fields.String(required=True, validate=validate.Equal("account"))
    name = fields.String(required=True)
    currency = fields.String(required=True)
    balance = fields.Integer(required=True)
    overdraft_limit = fields.Integer(required=True, allow_none=True,
                                     metadata={"description": "null: unlimited (system accounts)"})
    is_system = fields.Boolean(required=True)
    version = fields.Integer(required=True)
    created_at = fields.DateTime(required=True)


class MetadataField(fields.Dict):
    def __init__(self, **kwargs) -> None:
        super().__init__(
            keys=Text(validate=validate.Length(min=1, max=METADATA_KEY_CHARS_MAX)),
            values=Text(validate=validate.Length(max=METADATA_VALUE_CHARS_MAX)),
            validate=validate.Length(max=METADATA_KEYS_MAX),
            metadata={"description": "Up to 50 string keys and string values, 8 KiB in all"},
            **kwargs,
        )

    def _deserialize(self, value, attr, data, **kwargs):
        result = super()._deserialize(value, attr, data, **kwargs)
        if len(json.dumps(result).encode()) > METADATA_BYTES_MAX:
            raise ValidationError(f"Must be at most {METADATA_BYTES_MAX} bytes as JSON.")
        return result


class TransferCreateSchema(Schema):
    from_account_id = fields.UUID(required=True)
    to_account_id = fields.UUID(required=True)
    amount = amount_field(required=True)
    currency = currency_field(load_default=None)
    description = Text(load_default=None, allow_none=True,
                       validate=validate.Length(max=DESCRIPTION_CHARS_MAX))
    metadata = MetadataField(load_default=dict)

    @validates_schema
    def _distinct_accounts(self, data, **kwargs) -> None:
        if data.get("from_account_id") and data.get("from_account_id") == data.get("to_account_id"):
            raise ValidationError("Must differ from from_account_id.", "to_account_id")


class TransferSchema(Schema):
    id = fields.UUID(required=True)
    object = fields.String(required=True, validate=validate.Equal("transfer"))
    kind = fields.String(required=True)
    from_account_id = fields.UUID(required=True)
    to_account_id = fields.UUID(required=True)
    amount = fields.Integer(required=True)
    currency = fields.String(required=True)
    status = fields.String(required=True)
    description = fields.String(required=True, allow_none=True)
    metadata = fields.Dict(required=True, keys=fields.String(), values=fields.String())
    reverses_transfer_id = fields.UUID(required=True, allow_none=True)
    created_at = fields.DateTime(required=True)
    amount_refunded = fields.Integer(metadata={"description": "GET only: the sum of its refunds"})
    refunds = fields.List(fields.Dict(), metadata={"description": "GET only: id, amount, created_at"})


class RefundCreateSchema(Schema):
    amount = amount_field(load_default=None)  # none: all that is not refunded yet
    description = Text(load_default=None, allow_none=True,
                       validate=validate.Length(max=DESCRIPTION_CHARS_MAX))
    metadata = MetadataField(load_default=dict)


class BalanceQuerySchema(Schema):
    as_of = fields.AwareDateTime(required=True, format="iso",
                                 metadata={"description": "RFC 3339, with a UTC offset"})


class AccountAuditSchema(Schema):
    account_id = fields.UUID(required=True)
    currency = fields.String(required=True)
    balance = fields.Integer(required=True)
    entries_sum = fields.Integer(required=True)
    difference = fields.Integer(required=True, metadata={"description": "balance - entries_sum"})
    entries = fields.Integer(required=True)
    version = fields.Integer(required=True)
    versions_continuous = fields.Boolean(required=True)
    chain_breaks = fields.List(fields.Dict(), required=True)
    consistent = fields.Boolean(required=True)


class BalanceSchema(Schema):
    account_id = fields.UUID(required=True)
    currency = fields.String(required=True)
    balance = fields.Integer(required=True)
    as_of = fields.String(required=True)


DESTINATION_BYTES_MAX = 4096


class PayoutCreateSchema(Schema):
    account_id = fields.UUID(required=True)
    amount = amount_field(required=True)
    currency = currency_field(load_default=None)
    destination = fields.Dict(
        required=True, keys=Text(validate=validate.Length(min=1, max=METADATA_KEY_CHARS_MAX)),
        values=Text(validate=validate.Length(max=METADATA_VALUE_CHARS_MAX)),
        validate=validate.Length(min=1, max=20),
        metadata={"description": "Where the money goes, e.g. {\"iban\": \"...\"}; string values, "
                                 "4 KiB in all"})

    @validates_schema
    def _destination_size(self, data, **kwargs) -> None:
        if "destination" in data and len(json.dumps(data["destination"]).encode()) > DESTINATION_BYTES_MAX:
            raise ValidationError(f"Must be at most {DESTINATION_BYTES_MAX} bytes as JSON.", "destination")


class PayoutSchema(Schema):
    id = fields.UUID(required=True)
    object = fields.String(required=True, validate=validate.Equal("payout"))
    account_id = fields.UUID(required=True)
    amount = fields.Integer(required=True)
    currency = fields.String(required=True)
    destination = fields.Dict(required=True)
    status = fields.String(required=True, validate=validate.OneOf(
        ["pending", "processing", "succeeded", "failed"]))
    failure_reason = fields.String(required=True, allow_none=True)
    attempts = fields.Integer(required=True)
    provider_reference = fields.String(required=True, allow_none=True)
    transfer_id = fields.UUID(required=True)
    reversal_transfer_id = fields.UUID(required=True, allow_none=True)
    created_at = fields.DateTime(required=True)
    updated_at = fields.DateTime(required=True)


WEBHOOK_EVENT_TYPES = ("transfer.posted", "payout.succeeded", "payout.failed")


class WebhookEndpointCreateSchema(Schema):
    url = fields.Url(required=True, schemes={"http", "https"}, require_tld=False,
                     validate=validate.Length(max=2000))

    @post_load
    def _lower_case_scheme(self, data, **kwargs) -> dict:
        scheme, rest = data["url"].split("://", 1)
        return {**data, "url": f"{scheme.lower()}://{rest}"}

    event_types = fields.List(fields.String(validate=validate.OneOf(WEBHOOK_EVENT_TYPES)),
                              required=True, validate=validate.Length(min=1, max=len(WEBHOOK_EVENT_TYPES)))


class WebhookEndpointSchema(Schema):
    id = fields.UUID(required=True)
    object = fields.String(required=True, validate=validate.Equal("webhook_endpoint"))
    url = fields.String(required=True)
    event_types = fields.List(fields.String(), required=True)
    enabled = fields.Boolean(required=True)
    created_at = fields.DateTime(required=True)
    secret = fields.String(metadata={"description": "whsec_...; returned once, at creation"})


class WebhookEndpointListSchema(Schema):
    data = fields.List(fields.Nested(WebhookEndpointSchema), required=True)


class OutboxStatsSchema(Schema):
    by_status = fields.Dict(keys=fields.String(), values=fields.Integer(), required=True)
    by_topic = fields.Dict(keys=fields.String(), values=fields.Dict(), required=True)
    oldest_pending_age_seconds = fields.Float(required=True, allow_none=True)
    dead = fields.Integer(required=True)


class EntrySchema(Schema):
    id = fields.String(required=True, metadata={"description": "Increasing within an account"})
    object = fields.String(required=True, validate=validate.Equal("entry"))
    transfer_id = fields.UUID(required=True)
    account_id = fields.UUID(required=True)
    amount = fields.Integer(required=True, metadata={"description": "Signed: credit > 0"})
    balance_after = fields.Integer(required=True)
    account_version = fields.Integer(required=True)
    created_at = fields.DateTime(required=True)


class EntriesPageSchema(Schema):
    data = fields.List(fields.Nested(EntrySchema), required=True)
    next_cursor = fields.String(required=True, allow_none=True)


class PageQuerySchema(Schema):
    limit = fields.Integer(load_default=PAGE_SIZE_DEFAULT,
                           validate=validate.Range(min=1, max=PAGE_SIZE_MAX))
    cursor = Text(load_default=None, validate=validate.Length(min=1, max=200))
    since = fields.AwareDateTime(load_default=None, format="iso",
                                 metadata={"description": "Entries at or after (RFC 3339)"})
    until = fields.AwareDateTime(load_default=None, format="iso",
                                 metadata={"description": "Entries before (RFC 3339)"})


class TransferSearchSchema(Schema):
    account_id = fields.UUID(load_default=None, metadata={"description": "Either side; required "
                                                          "for keys without admin scope"})
    status = fields.String(load_default=None, validate=validate.OneOf(["posted"]))
    kind = fields.String(load_default=None,
                         validate=validate.OneOf(["transfer", "payout", "refund", "reversal"]))
    created_after = fields.AwareDateTime(load_default=None, format="iso")
    created_before = fields.AwareDateTime(load_default=None, format="iso")
    limit = fields.Integer(load_default=PAGE_SIZE_DEFAULT, validate=validate.Range(min=1, max=PAGE_SIZE_MAX))
    cursor = Text(load_default=None, validate=validate.Length(min=1, max=200))


class TransfersPageSchema(Schema):
    data = fields.List(fields.Nested(TransferSchema), required=True)
    next_cursor = fields.String(required=True, allow_none=True)


SETTLEMENT_RECORDS_PER_BATCH_MAX = 20_000
SETTLEMENT_SOURCE_CHARS_MAX = 100
SETTLEMENT_REFERENCE_CHARS_MAX = 200
# A file with thousands of bad lines names the first few: enough to fix it.
SETTLEMENT_RECORD_ERRORS_SHOWN_MAX = 20
RECONCILIATION_WINDOW_DAYS_MAX = 90
RESOLUTION_NOTE_CHARS_MAX = 1000
EXCEPTIONS_PAGE_SIZE_DEFAULT = 100
EXCEPTIONS_PAGE_SIZE_MAX = 1000
EXCEPTION_CODES = ("amount_mismatch", "currency_mismatch", "late_settlement", "early_settlement",
                   "missing_settlement", "unexpected_settlement", "duplicate_settlement",
                   "ambiguous_reference")
_VALUE_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
# Moments of settlements and runs: a year before 1970 is a typo, and past
# 9999 Python cannot follow; Python reads offsets with seconds that PostgreSQL
# refuses. Refused here, they are a 422 naming the field, not PostgreSQL's words.
MOMENT_YEAR_MIN, MOMENT_YEAR_MAX = 1970, 9999
# Real offsets run from -12:00 to +14:00; PostgreSQL refuses past 15:59.
MOMENT_OFFSET_MAX = timedelta(hours=14)
_MOMENT_RANGE = f"Must be from {MOMENT_YEAR_MIN} to {MOMENT_YEAR_MAX} (UTC)."


class Moment(fields.AwareDateTime):
    """An RFC 3339 moment with its offset, in whole minutes and at most
    14 hours, from 1970 to 9999 in UTC."""

    def __init__(self, **kwargs) -> None:
        super().__init__(format="iso", **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        moment = super()._deserialize(value, attr, data, **kwargs)
        offset = moment.utcoffset()
        if offset % timedelta(minutes=1) or abs(offset) > MOMENT_OFFSET_MAX:
            raise ValidationError("The offset must be whole minutes, from -14:00 to +14:00.")
        try:
            year = moment.astimezone(UTC).year
        except OverflowError:  # past year 9999, or before year 1, in UTC
            raise ValidationError(_MOMENT_RANGE) from None
        if not MOMENT_YEAR_MIN <= year <= MOMENT_YEAR_MAX:
            raise ValidationError(_MOMENT_RANGE)
        return moment


class SettledAt(Moment):
    """A Moment (a datetime), or a bank's value date YYYY-MM-DD (a date: the
    whole day, UTC)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(metadata={
            "description": "RFC 3339 with an offset, or a value date YYYY-MM-DD (the whole day, UTC)"},
            **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        if not (isinstance(value, str) and _VALUE_DATE.fullmatch(value)):
            return super()._deserialize(value, attr, data, **kwargs)
        try:
            day = date.fromisoformat(value)
        except ValueError:
            raise self.make_error("invalid", input=value, obj_type=self.OBJ_TYPE) from None
        if not MOMENT_YEAR_MIN <= day.year <= MOMENT_YEAR_MAX:
            raise ValidationError(_MOMENT_RANGE)
        return day


def _not_padded(text: str) -> None:
    if text != text.strip():
        raise ValidationError("Must not start or end with whitespace.")


class SettlementRecordSchema(Schema):
    reference = Text(required=True, validate=[
        validate.Length(min=1, max=SETTLEMENT_REFERENCE_CHARS_MAX), _not_padded],
        metadata={"description": "The file's own reference for this line, unique per source"})
    payout_reference = Text(required=True, validate=[
        validate.Length(min=1, max=SETTLEMENT_REFERENCE_CHARS_MAX), _not_padded],
        metadata={"description": "The payout's provider_reference, or its id (matched ignoring "
                                 "case and surrounding whitespace)"})
    amount = amount_field(required=True)
    currency = currency_field(required=True)
    settled_at = SettledAt(required=True)

    @post_load
    def _value_date(self, data: dict, **kwargs) -> dict:
        """settled_on: the value date, if one was given (settled_at is then
        the day's first instant, UTC); else None."""
        settled = data["settled_at"]
        if isinstance(settled, datetime):
            return {**data, "settled_on": None}
        return {**data, "settled_at": datetime.combine(settled, time(), UTC), "settled_on": settled}


class SettlementBatchSchema(Schema):
    source = Text(load_default="bank",
                  validate=[validate.Length(min=1, max=SETTLEMENT_SOURCE_CHARS_MAX), _not_padded],
                  metadata={"description": "Who sent the file; references are unique per source"})
    records = fields.List(fields.Nested(SettlementRecordSchema), required=True,
                          validate=validate.Length(min=1, max=SETTLEMENT_RECORDS_PER_BATCH_MAX))

    @validates_schema
    def _unique_references(self, data, **kwargs) -> None:
        first_seen: dict[str, int] = {}
        repeated = {}
        for index, record in enumerate(data["records"]):
            earlier = first_seen.setdefault(record["reference"], index)
            if earlier != index:
                repeated[index] = {"reference": [f"Repeats the reference of record {earlier}."]}
        if repeated:
            raise ValidationError({"records": repeated})

    def handle_error(self, error: ValidationError, data, *, many: bool, **kwargs) -> None:
        records = error.messages.get("records") if isinstance(error.messages, dict) else None
        if isinstance(records, dict) and len(records) > SETTLEMENT_RECORD_ERRORS_SHOWN_MAX:
            shown = dict(itertools.islice(records.items(), SETTLEMENT_RECORD_ERRORS_SHOWN_MAX))
            raise ValidationError({**error.messages, "records": shown,
                                   "records_with_errors": len(records)})


class SettlementImportSchema(Schema):
    object = fields.String(required=True, validate=validate.Equal("settlement_import"))
    source = fields.String(required=True)
    records = fields.Integer(required=True, metadata={"description": "Records in the batch"})
    inserted = fields.Integer(required=True)
    already_present = fields.Integer(required=True,
                                     metadata={"description": "Imported before, with the same content"})


class ReconciliationCreateSchema(Schema):
    window_days = StrictInteger(load_default=None, validate=validate.Range(
        min=1, max=RECONCILIATION_WINDOW_DAYS_MAX), metadata={
        "description": "Default: PAYFLOW_RECONCILIATION_WINDOW_DAYS (3)"})
    as_of = Moment(load_default=None, metadata={
        "description": "RFC 3339, not in the future; default: now (the database's clock)"})
    since = Moment(load_default=None, metadata={
        "description": "RFC 3339, not after as_of: leaves out the payouts that succeeded before it "
                       "(and their lines) and other lines dated before it; default: none"})


class ReconciliationQuerySchema(Schema):
    code = fields.String(load_default=None, validate=validate.OneOf(EXCEPTION_CODES))
    status = fields.String(load_default=None, validate=validate.OneOf(["open", "resolved"]))
    limit = fields.Integer(load_default=EXCEPTIONS_PAGE_SIZE_DEFAULT,
                           validate=validate.Range(min=1, max=EXCEPTIONS_PAGE_SIZE_MAX))
    cursor = Text(load_default=None, validate=validate.Length(min=1, max=400))


def _not_blank(text: str) -> None:
    if not text.strip():
        raise ValidationError("Must not be blank.")


class ExceptionResolveSchema(Schema):
    note = Text(required=True, validate=[validate.Length(min=1, max=RESOLUTION_NOTE_CHARS_MAX), _not_blank],
                metadata={"description": "Why the exception is settled (audited with who and when)"})


class ReconciliationExceptionSchema(Schema):
    id = fields.UUID(required=True)
    object = fields.String(required=True, validate=validate.Equal("reconciliation_exception"))
    run_id = fields.UUID(required=True)
    code = fields.String(required=True, validate=validate.OneOf(EXCEPTION_CODES))
    payout_id = fields.UUID(required=True, allow_none=True)
    settlement_id = fields.UUID(required=True, allow_none=True)
    source = fields.String(required=True, allow_none=True)
    settlement_reference = fields.String(required=True, allow_none=True)
    payout_reference = fields.String(required=True, allow_none=True)
    currency = fields.String(required=True)
    expected_amount = fields.Integer(required=True, allow_none=True)
    settled_amount = fields.Integer(required=True, allow_none=True)
    difference = fields.Integer(required=True, allow_none=True,
                                metadata={"description": "settled_amount - expected_amount (a fee < 0)"})
    succeeded_at = fields.DateTime(required=True, allow_none=True)
    settled_at = fields.DateTime(required=True, allow_none=True)
    settled_on = fields.Date(required=True, allow_none=True,
                             metadata={"description": "The line's value date, when it gave no time"})
    details = fields.Dict(required=True)
    resolved_at = fields.DateTime(required=True, allow_none=True)
    resolved_by = fields.UUID(required=True, allow_none=True, metadata={"description": "API key id"})
    resolution_note = fields.String(required=True, allow_none=True)
    resolution_carried_from = fields.UUID(required=True, allow_none=True, metadata={
        "description": "The exception of an earlier run whose resolution this one repeats"})


class ReconciliationExceptionsPageSchema(Schema):
    data = fields.List(fields.Nested(ReconciliationExceptionSchema), required=True)
    next_cursor = fields.String(required=True, allow_none=True)


class ReconciliationTotalSchema(Schema):
    currency = fields.String(required=True)
    expected_amount = fields.Integer(required=True, metadata={"description": "Succeeded payouts"})
    settled_amount = fields.Integer(required=True, metadata={"description": "Settlement records"})
    difference = fields.Integer(required=True)


class ReconciliationSchema(Schema):
    id = fields.UUID(required=True)
    object = fields.String(required=True, validate=validate.Equal("reconciliation"))
    as_of = fields.DateTime(required=True)
    since = fields.DateTime(required=True, allow_none=True)
    window_days = fields.Integer(required=True)
    status = fields.String(required=True, validate=validate.OneOf(["reconciled", "exceptions_open"]))
    counts = fields.Dict(keys=fields.String(), values=fields.Integer(), required=True)
    totals = fields.List(fields.Nested(ReconciliationTotalSchema), required=True)
    exceptions_total = fields.Integer(required=True)
    exceptions_open = fields.Integer(required=True)
    exceptions_resolved_earlier = fields.Integer(required=True, metadata={
        "description": "Exceptions found again that an operator resolved in an earlier run"})
    created_by = fields.UUID(required=True, allow_none=True)
    created_at = fields.DateTime(required=True)
    exceptions = fields.Nested(ReconciliationExceptionsPageSchema, required=True)


class ApiErrorBodySchema(Schema):
    code = fields.String(required=True)
    message = fields.String(required=True)
    details = fields.Dict(required=True)


class ApiErrorSchema(Schema):
    error = fields.Nested(ApiErrorBodySchema, required=True)


class HealthSchema(Schema):
    status = fields.String(required=True, validate=validate.OneOf(["healthy", "unhealthy"]))
    ledger_integrity_sum = fields.Integer(required=True, allow_none=True)
    audited_at = fields.DateTime(required=True, allow_none=True)
    audited_through_entry_id = fields.Integer(required=True, allow_none=True)
    unaudited_entries = fields.Integer(required=True, allow_none=True,
                                       metadata={"description": "Entries past the checkpoint"})
    problems = fields.List(fields.Dict(), required=True)
    reason = fields.String(load_default=None, allow_none=True)


class ReadySchema(Schema):
    status = fields.String(required=True, validate=validate.OneOf(["ready", "degraded", "unavailable"]))
    database = fields.String(required=True)
    redis = fields.String(required=True)
