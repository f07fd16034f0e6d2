"""Shared fixtures: two tenants (acme and globex) so every behaviour can be checked
against the other tenant's data, a fixed clock, and service gates.

Tests default to SQLite. With DATABASE_URL / REDIS_URL set they use PostgreSQL / Redis;
under REQUIRE_SERVICES=1 a test that needs a service fails instead of skipping.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime

import pytest
from django.db import connection

from budgets import services
from budgets.models import Tenant
from budgets.money import Prices

REQUIRE_SERVICES = os.environ.get("REQUIRE_SERVICES") == "1"


def _missing_service(what: str) -> None:
    if REQUIRE_SERVICES:
        pytest.fail(f"{what} is required (REQUIRE_SERVICES=1) but not configured")
    pytest.skip(f"{what} not configured")


@pytest.fixture(scope="session", autouse=True)
def gateway_db_threads(django_db_setup):
    """The gateway's database threads keep their connections between calls; close them
    before the test database is dropped."""
    yield
    from routing.views import close_db_connections

    close_db_connections()


@pytest.fixture
def require_postgres():
    if connection.vendor != "postgresql":
        _missing_service("PostgreSQL (DATABASE_URL=postgres://...)")


@pytest.fixture
def require_redis():
    if not os.environ.get("REDIS_URL"):
        _missing_service("Redis (REDIS_URL=redis://...)")


@pytest.fixture
def now() -> datetime:
    return datetime(2026, 11, 18, 15, 30, tzinfo=UTC)


@pytest.fixture
def prices() -> Prices:
    # mistral-small: USD 0.15 in / 0.60 out per million tokens.
    return Prices(input_nanos=150, output_nanos=600)


@pytest.fixture
def acme(db) -> Tenant:
    return services.create_tenant("Acme", "cus_acme")


@pytest.fixture
def globex(db) -> Tenant:
    return services.create_tenant("Globex", "cus_globex")


@pytest.fixture
def invoice_bot(acme):
    return services.create_agent(acme, "invoice-bot")


@pytest.fixture
def churn_bot(acme):
    return services.create_agent(acme, "churn-bot")
