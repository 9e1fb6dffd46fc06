"""schemathesis fuzzes every operation of the served /openapi.json, with an
admin API key, at a small example budget: no 5xx, ever, and every response
with a documented status matches its documented schema.

(Driven through hypothesis directly: schemathesis' pytest plugin does not run
under this pytest version.)"""

from __future__ import annotations

import itertools

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

EXAMPLES_PER_OPERATION = 15


def test_no_server_error_and_responses_match_their_schema(app):
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    headers = {"Authorization": f"Bearer {app.config['TEST_API_KEY']}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12

    # Valid requests, and requests that break the schema on purpose.
    for operation, mode in itertools.product(operations, GenerationMode):
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case):
            case.call_and_validate(headers=headers,
                                   checks=[not_a_server_error, response_schema_conformance])

        try:
            fuzz()
        except Unsatisfiable:
            # An operation with no input (GET /health) has no invalid request.
            assert mode == GenerationMode.NEGATIVE, operation.label
