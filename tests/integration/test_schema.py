"""Migrations build the schema from nothing, re-running them is a no-op, and
the OpenAPI document is generated from the schemas."""

from __future__ import annotations

import psycopg

from payflow import migrations


def _schema_signature(url: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        columns = conn.execute(
            "SELECT table_name, column_name, data_type, is_nullable FROM information_schema.columns"
            " WHERE table_schema = 'public' ORDER BY 1, 2").fetchall()
        constraints = conn.execute(
            "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2").fetchall()
        functions = conn.execute(
            "SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace ORDER BY 1").fetchall()
    return columns + constraints + functions


def test_migrations_build_the_same_schema_as_the_template(empty_database_url, database_url):
    applied = migrations.migrate(empty_database_url)
    assert [m.version for m in applied] == [m.version for m in migrations.available()]
    assert migrations.migrate(empty_database_url) == []
    assert all(done for _, done in migrations.status(empty_database_url))
    assert _schema_signature(empty_database_url) == _schema_signature(database_url)


def test_openapi_document_lists_every_route_with_its_schemas(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    spec = response.get_json()
    assert spec["openapi"].startswith("3.")
    paths = spec["paths"]
    assert {"/v1/accounts", "/v1/accounts/{account_id}", "/v1/accounts/{account_id}/entries",
            "/v1/transfers", "/v1/transfers/{transfer_id}", "/health", "/ready"} <= set(paths)
    create = paths["/v1/transfers"]["post"]
    body_schema = create["requestBody"]["content"]["application/json"]["schema"]
    assert body_schema == {"$ref": "#/components/schemas/TransferCreate"}
    request_fields = spec["components"]["schemas"]["TransferCreate"]["properties"]
    assert {"from_account_id", "to_account_id", "amount", "currency", "metadata"} <= set(request_fields)
    assert any(p["name"] == "X-Idempotency-Key" and p["required"] for p in create["parameters"])
    assert {"201", "404", "409", "422"} <= set(create["responses"])
