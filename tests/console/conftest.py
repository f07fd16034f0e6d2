"""Console fixtures: a staff member, a signed-in non-staff user, and budgets of two
tenants with real spend (authorized and captured by the engine, rolled up hourly)."""

from __future__ import annotations

import uuid

import pytest
from django.contrib.auth import get_user_model
from django.core.cache import cache

from budgets import engine, services
from budgets.models import BudgetPolicy, Hold, ScopeType, Tenant
from budgets.money import Prices, usd_to_nanos
from spend.models import SpendEntry
from spend.rollups import rollup_hours

# One milli-USD per prompt token: 1000 tokens are one USD.
MILLI = Prices(input_nanos=1_000_000, output_nanos=0)


@pytest.fixture(autouse=True)
def fresh_cache():
    """The spend page caches sums of settled hours; no test sees another's."""
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def staff_client(client, db):
    user = get_user_model().objects.create_user("alice", is_staff=True)
    client.force_login(user)
    return client


@pytest.fixture
def user_client(client, db):
    user = get_user_model().objects.create_user("bob")
    client.force_login(user)
    return client


def hold(tenant: Tenant, usd: str, agent=None) -> Hold:
    return engine.authorize(
        engine.state_of(tenant, agent),
        request_id=f"call-{uuid.uuid4().hex}",
        model="m",
        prices=MILLI,
        input_tokens=usd_to_nanos(usd) // MILLI.input_nanos,
        max_output_tokens=1,
        min_output_tokens=1,
    )


def charge(tenant: Tenant, usd: str, agent=None) -> SpendEntry:
    placed = hold(tenant, usd, agent)
    return engine.capture(placed, prompt_tokens=placed.input_tokens, completion_tokens=0)


@pytest.fixture
def acme_budget(acme) -> BudgetPolicy:
    return services.set_policy(acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("10"))


@pytest.fixture
def globex_budget(globex) -> BudgetPolicy:
    return services.set_policy(globex, ScopeType.TENANT, limit_nanos=usd_to_nanos("5"))


@pytest.fixture
def spent(acme, globex, acme_budget, globex_budget):
    """Acme spent USD 6 of 10 (warned) and holds USD 1; Globex spent USD 1 of 5."""
    charge(acme, "4")
    charge(acme, "2")
    charge(globex, "1")
    hold(acme, "1")
    rollup_hours()
