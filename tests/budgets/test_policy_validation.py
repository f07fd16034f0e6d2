from decimal import Decimal

import pytest
from django.db import IntegrityError, transaction

from budgets import services
from budgets.errors import InvalidRequest
from budgets.models import BudgetPolicy, ScopeType


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("0", "positive"),
        ("-5", "positive"),
        ("0.0000000001", "more precision than one nanodollar"),
        ("ten", "not a decimal number"),
        (1.5, "float"),
    ],
)
def test_it_refuses_bad_limits(value, problem):
    with pytest.raises(InvalidRequest, match=problem):
        services.parse_limit(value)


def test_it_parses_limits_exactly():
    assert services.parse_limit("12.000000001") == 12_000_000_001


@pytest.mark.parametrize(
    ("thresholds", "field", "problem"),
    [
        (
            {"soft_cap": Decimal("0.9"), "hard_cap": Decimal("0.8")},
            "soft_cap",
            "soft_cap must not exceed hard_cap",
        ),
        (
            {"warn_at": Decimal("0.9"), "soft_cap": Decimal("0.8")},
            "warn_at",
            "warn_at must not exceed soft_cap",
        ),
        ({"warn_at": Decimal("0")}, "warn_at", "above 0"),
        ({"hard_cap": Decimal("11")}, "hard_cap", "at most 10"),
    ],
)
def test_it_refuses_disordered_thresholds(acme, thresholds, field, problem):
    with pytest.raises(InvalidRequest, match=problem) as refused:
        services.set_policy(acme, ScopeType.TENANT, limit_nanos=1000, **thresholds)
    assert field in refused.value.details["fields"]
    assert not BudgetPolicy.objects.exists()


def test_it_refuses_a_non_positive_limit(acme):
    with pytest.raises(InvalidRequest, match="positive"):
        services.set_policy(acme, ScopeType.TENANT, limit_nanos=0)


def test_it_refuses_an_unknown_window(acme):
    with pytest.raises(InvalidRequest, match="unknown window 'fortnight'"):
        services.set_policy(acme, ScopeType.TENANT, limit_nanos=1000, window="fortnight")


def test_it_refuses_an_unknown_scope_type(acme):
    with pytest.raises(InvalidRequest, match="unknown scope type 'team'"):
        services.set_policy(acme, "team", limit_nanos=1000)


def test_an_agent_policy_needs_an_agent_of_the_same_tenant(acme, globex):
    with pytest.raises(InvalidRequest, match="agent of this tenant"):
        services.set_policy(acme, ScopeType.AGENT, limit_nanos=1000)
    other = services.create_agent(globex, "bot")
    with pytest.raises(InvalidRequest, match="agent of this tenant"):
        services.set_policy(acme, ScopeType.AGENT, agent=other, limit_nanos=1000)


def test_a_user_policy_needs_a_user_key(acme):
    with pytest.raises(InvalidRequest, match="end-user key"):
        services.set_policy(acme, ScopeType.USER, limit_nanos=1000, user_key=" ")


def test_disabled_tools_must_be_tool_names(acme):
    with pytest.raises(InvalidRequest, match="disabled_tools"):
        services.set_policy(
            acme, ScopeType.TENANT, limit_nanos=1000, disabled_tools=["web_search", 3]
        )


@pytest.mark.parametrize(
    ("value", "problem"),
    [("abc", "not a number"), ("0.12345", "at most 4 decimals"), ("NaN", "finite")],
)
def test_it_refuses_bad_fractions(value, problem):
    with pytest.raises(InvalidRequest, match=problem):
        services.parse_fraction("soft_cap", value)


def test_the_database_refuses_what_validation_would(acme):
    # The constraints hold even for code that skips the services.
    with pytest.raises(IntegrityError), transaction.atomic():
        BudgetPolicy.objects.create(
            tenant=acme, scope_type="tenant", scope_key="cus_acme", limit_nanos=-1
        )
    with pytest.raises(IntegrityError), transaction.atomic():
        BudgetPolicy.objects.create(
            tenant=acme,
            scope_type="tenant",
            scope_key="cus_acme",
            limit_nanos=5,
            soft_cap=Decimal("0.9"),
            hard_cap=Decimal("0.5"),
        )
    with pytest.raises(IntegrityError), transaction.atomic():
        BudgetPolicy.objects.create(
            tenant=acme,
            scope_type="tenant",
            scope_key="cus_acme",
            limit_nanos=5,
            window="fortnight",
        )
    with pytest.raises(IntegrityError), transaction.atomic():
        BudgetPolicy.objects.create(
            tenant=acme, scope_type="agent", scope_key="cus_acme:x", limit_nanos=5
        )


def test_updating_a_policy_keeps_one_row(acme):
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=1000)
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=2000, disabled_tools=["web_search"])
    policy = BudgetPolicy.objects.get()
    assert (policy.limit_nanos, policy.disabled_tools) == (2000, ["web_search"])


@pytest.mark.parametrize(
    ("name", "customer", "problem"),
    [
        ("Acme", "acme", "Stripe customer id"),
        ("", "cus_x", "name"),
        ("X", "cus_acme", "already exists"),
    ],
)
def test_it_refuses_bad_tenants(acme, name, customer, problem):
    with pytest.raises(InvalidRequest, match=problem):
        services.create_tenant(name, customer)


@pytest.mark.parametrize("name", ["", "has space", "a" * 65, "-leading", "colon:name"])
def test_it_refuses_bad_agent_names(acme, name):
    with pytest.raises(InvalidRequest):
        services.create_agent(acme, name)


def test_agent_names_are_unique_per_tenant(acme, globex):
    services.create_agent(acme, "bot")
    services.create_agent(globex, "bot")
    with pytest.raises(InvalidRequest, match="already exists"):
        services.create_agent(acme, "bot")
