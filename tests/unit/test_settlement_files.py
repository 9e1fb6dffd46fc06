"""Settlement files, without a database: CSV and JSON parsing, the batch
schema's limits, value dates, and the exceptions cursor."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from payflow import errors, reconciliation, schemas, settlements

HEADER = "reference,payout_reference,amount,currency,settled_at\n"


def test_csv_columns_in_any_order_quoted_cells_and_a_byte_order_mark(tmp_path):
    path = tmp_path / "bank.csv"
    path.write_text("\ufeffcurrency,amount,settled_at,payout_reference,reference\n"
                    'USD,1250,2026-01-02,"sim_a,b",L1\n', encoding="utf-8")
    batch = settlements.load_batch(settlements.read_file(path, None, "bank-x"))
    assert batch == {"source": "bank-x", "records": [{
        "reference": "L1", "payout_reference": "sim_a,b", "amount": 1250, "currency": "USD",
        "settled_at": datetime(2026, 1, 2, tzinfo=UTC), "settled_on": date(2026, 1, 2)}]}


@pytest.mark.parametrize("cell", ["12.50", "1e3", "0x10", "", "１２", "1 000"])
def test_a_csv_amount_is_an_integer_only_when_written_as_one(cell):
    batch = settlements.parse_csv(f"{HEADER}L1,r,{cell},USD,2026-01-02\n")
    assert batch["records"][0]["amount"] == cell
    with pytest.raises(errors.ValidationFailed) as refused:
        settlements.load_batch(batch)
    assert "amount" in refused.value.details["records"][0]


def test_csv_cells_and_header_names_are_trimmed():
    """Padding is the layout of a CSV file, not part of its values."""
    text = (" reference , payout_reference,amount ,currency,settled_at\n"
            '  L1 ,\tSIM_A  , 1250 ," USD ", 2026-01-02\n')
    assert settlements.load_batch(settlements.parse_csv(text))["records"] == [{
        "reference": "L1", "payout_reference": "SIM_A", "amount": 1250, "currency": "USD",
        "settled_at": datetime(2026, 1, 2, tzinfo=UTC), "settled_on": date(2026, 1, 2)}]


@pytest.mark.parametrize("field", ["reference", "payout_reference", "source"])
@pytest.mark.parametrize("value", [" L1", "L1 ", "L1\n", "\u00a0L1"])
def test_json_references_with_surrounding_whitespace_are_refused(field, value):
    """JSON strings are sent as meant: payflow does not guess which part counts."""
    record = {"reference": "L1", "payout_reference": "r", "amount": 1, "currency": "USD",
              "settled_at": "2026-01-02"}
    batch = {"source": value, "records": [record]} if field == "source" else {
        "records": [{**record, field: value}]}
    with pytest.raises(errors.ValidationFailed) as refused:
        settlements.load_batch(batch)
    assert "whitespace" in str(refused.value.details)


def test_csv_record_limit():
    line = "L{},r,100,USD,2026-01-02\n"
    at_limit = HEADER + "".join(line.format(n) for n in range(schemas.SETTLEMENT_RECORDS_PER_BATCH_MAX))
    assert len(settlements.parse_csv(at_limit)["records"]) == schemas.SETTLEMENT_RECORDS_PER_BATCH_MAX
    with pytest.raises(errors.ValidationFailed, match="split the file"):
        settlements.parse_csv(at_limit + line.format("last"))


def test_the_schema_caps_a_batch_too():
    record = {"payout_reference": "r", "amount": 1, "currency": "USD", "settled_at": "2026-01-02"}
    records = [{**record, "reference": f"L{n}"} for n in range(schemas.SETTLEMENT_RECORDS_PER_BATCH_MAX + 1)]
    with pytest.raises(errors.ValidationFailed) as refused:
        settlements.load_batch({"records": records})
    assert "records" in refused.value.details


def test_json_files_hold_the_api_body_or_a_list():
    record = '{"reference": "L1", "payout_reference": "r", "amount": 7, "currency": "EUR", ' \
             '"settled_at": "2026-01-02T10:00:00+01:00"}'
    as_list = settlements.load_batch(settlements.parse_json(f"[{record}]"))
    as_body = settlements.load_batch(settlements.parse_json(f'{{"source": "psp", "records": [{record}]}}'))
    assert as_list["source"] == "bank" and as_body["source"] == "psp"
    assert as_list["records"] == as_body["records"]
    assert as_body["records"][0]["settled_at"] == datetime(2026, 1, 2, 9, tzinfo=UTC)
    for text in ("[1, 2", "Infinity", '{"a": NaN}'):
        with pytest.raises(errors.InvalidJson):
            settlements.parse_json(text)
    with pytest.raises(errors.ValidationFailed):
        settlements.parse_json('"records"')


@pytest.mark.parametrize("value, settled_at, settled_on", [
    ("2026-03-04", datetime(2026, 3, 4, tzinfo=UTC), date(2026, 3, 4)),
    ("2026-03-04T05:06:07Z", datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC), None),
    ("2026-03-04T05:06:07-02:00", datetime(2026, 3, 4, 5, 6, 7, tzinfo=timezone(timedelta(hours=-2))), None),
])
def test_settled_at_is_a_moment_with_its_offset_or_a_value_date(value, settled_at, settled_on):
    """A value date is kept as the day (settled_on) and its first instant, UTC."""
    loaded = schemas.load(schemas.SettlementRecordSchema(), {
        "reference": "L1", "payout_reference": "r", "amount": 1, "currency": "USD", "settled_at": value})
    assert (loaded["settled_at"], loaded["settled_on"]) == (settled_at, settled_on)


def test_exception_cursors_round_trip_and_refuse_forgeries():
    exception_id = uuid.uuid4()
    cursor = reconciliation.encode_cursor("late_settlement", exception_id)
    assert reconciliation.decode_cursor(cursor) == ("late_settlement", exception_id)
    forged = reconciliation.encode_cursor("matched", exception_id)
    for bad in (forged, "x", "ZXhjZXB0aW9uczo"):
        with pytest.raises(errors.ValidationFailed):
            reconciliation.decode_cursor(bad)
