"""Property-based requests generated from the live schema (schemathesis), sent in-process
as a staff user: no answer is a 5xx, every answer is one the schema documents, and
requests that break the schema are refused.

Deterministic by default (CI). FUZZ_EXAMPLES=500 runs a longer, randomized search."""

from __future__ import annotations

import os
import time

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from budgets import services
from budgets.models import Agent, Tenant
from governance.wsgi import application

from .conftest import charge

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
EXPLORING = "FUZZ_EXAMPLES" in os.environ
EXAMPLES_PER_OPERATION = int(os.environ.get("FUZZ_EXAMPLES", "20"))
TIME_BUDGET_SECONDS = 3600 if EXPLORING else 45


@pytest.fixture
def wsgi_in_test_transaction():
    """Call the WSGI application as Django's test client does: the request signals must
    not close the connection that holds the test's transaction (PostgreSQL)."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield application
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@pytest.fixture
def tenants(acme, globex, invoice_bot, globex_bot):
    services.set_policy(acme, "agent", agent=invoice_bot, limit_nanos=10**10)
    services.set_policy(acme, "user", user_key="user-42", limit_nanos=10**9)
    charge(acme, 10**6, invoice_bot)
    charge(globex, 10**6, globex_bot)


def exercise(strategy, headers: dict, checks: list, max_examples: int) -> None:
    @given(case=strategy)
    @hypothesis_settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=not EXPLORING,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case):
        case.call_and_validate(headers=headers, checks=checks)

    run()


def test_it_answers_generated_requests_within_its_contract(
    wsgi_in_test_transaction, tenants, staff_token
):
    schema = schemathesis.openapi.from_wsgi("/api/schema/", wsgi_in_test_transaction)
    headers = {"Authorization": f"Token {staff_token}"}
    started = time.monotonic()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 19

    for operation in operations:
        # The schema's own examples first: they name acme's real scopes and agents.
        for strategy in operation.get_strategies_from_examples():
            exercise(strategy, headers, CHECKS, max_examples=5)
        positive = operation.as_strategy(generation_mode=GenerationMode.POSITIVE)
        exercise(positive, headers, CHECKS, EXAMPLES_PER_OPERATION)
        negative = operation.as_strategy(generation_mode=GenerationMode.NEGATIVE)
        try:
            exercise(negative, headers, [*CHECKS, negative_data_rejection], EXAMPLES_PER_OPERATION)
        except Unsatisfiable:
            # Nothing in the request can be made invalid (GET /api/health).
            assert operation.label == "GET /api/health", operation.label
        assert time.monotonic() - started < TIME_BUDGET_SECONDS, "the fuzz run is too slow"
    # The examples in the schema work as documented.
    assert Tenant.objects.filter(stripe_customer_id="cus_initech").exists()
    assert Agent.objects.filter(tenant__stripe_customer_id="cus_acme", name="support-bot").exists()
