from datetime import timedelta

import pytest
from django.test import override_settings

from budgets import engine, services
from budgets.errors import AgentPaused, BudgetExceeded, InvalidRequest, SubscriptionInactive
from budgets.models import (
    BudgetPeriod,
    BudgetPolicy,
    Hold,
    HoldStatus,
    Plan,
    PolicySource,
    ScopeType,
    Tenant,
)
from budgets.money import Prices, usd_to_nanos

PRICES = Prices(100, 1000)


def authorize(
    tenant,
    agent=None,
    *,
    now,
    request_id="req-1",
    prices=PRICES,
    input_tokens=10,
    max_output_tokens=100,
    user_key="",
    **kwargs,
):
    scope = engine.state_of(tenant, agent, user_key, now=now)
    return engine.authorize(
        scope,
        request_id=request_id,
        model="mistral-small-latest",
        prices=prices,
        input_tokens=input_tokens,
        max_output_tokens=max_output_tokens,
        **kwargs,
    )


def periods(tenant):
    return {
        p.policy.scope_type: p
        for p in BudgetPeriod.objects.filter(policy__tenant=tenant).select_related("policy")
    }


def test_it_holds_the_upper_bound_on_every_matching_period(acme, invoice_bot, now):
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=1_000_000)
    services.set_policy(acme, ScopeType.AGENT, agent=invoice_bot, limit_nanos=500_000)
    hold = authorize(acme, invoice_bot, now=now, input_tokens=10, max_output_tokens=100)
    assert hold.amount_nanos == 10 * 100 + 100 * 1000
    assert hold.max_output_tokens == 100
    assert hold.status == HoldStatus.HELD
    assert hold.expires_at == now + timedelta(seconds=600)
    held = periods(acme)
    assert held["tenant"].held_nanos == held["agent"].held_nanos == hold.amount_nanos
    assert hold.lines.count() == 2


def test_it_holds_nothing_when_one_budget_refuses(acme, invoice_bot, now):
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=1_000_000)
    services.set_policy(acme, ScopeType.AGENT, agent=invoice_bot, limit_nanos=50_000)
    with pytest.raises(BudgetExceeded) as refused:
        authorize(
            acme,
            invoice_bot,
            now=now,
            input_tokens=60,
            max_output_tokens=100,
            min_output_tokens=100,
        )
    assert refused.value.scope_type == "agent"
    assert refused.value.scope_key == "cus_acme:invoice-bot"
    assert all(p.held_nanos == 0 for p in periods(acme).values())
    assert not Hold.objects.exists()


def test_it_clamps_max_tokens_to_what_the_budget_can_pay(acme, now):
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=51_000)
    hold = authorize(acme, now=now, input_tokens=10, max_output_tokens=4096)
    # 51_000 - 10 * 100 = 50_000 left for output at 1000 a token.
    assert hold.max_output_tokens == 50
    assert hold.amount_nanos == 51_000


def test_it_refuses_when_fewer_than_the_minimum_output_tokens_fit(acme, now):
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=10_000)
    with pytest.raises(BudgetExceeded, match="cannot pay for 16 output tokens") as refused:
        authorize(acme, now=now, input_tokens=0, max_output_tokens=4096)
    assert refused.value.limit_nanos == 10_000
    assert refused.value.resets_at == now.replace(hour=0, minute=30 - 30) + timedelta(days=1)


def test_a_small_request_below_the_minimum_is_allowed_if_it_fits(acme, now):
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=10_000)
    hold = authorize(acme, now=now, input_tokens=0, max_output_tokens=5)
    assert hold.max_output_tokens == 5


def test_a_stopped_budget_refuses_with_spend_limit_and_reset_time(acme, now):
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=110_000)
    hold = authorize(acme, now=now, request_id="a", input_tokens=10, max_output_tokens=109)
    engine.capture(hold, prompt_tokens=10, completion_tokens=109)
    with pytest.raises(BudgetExceeded, match="used up") as refused:
        authorize(acme, now=now, request_id="b")
    error = refused.value
    assert (error.scope_type, error.scope_key) == ("tenant", "cus_acme")
    assert error.spent_nanos == 110_000
    assert error.limit_nanos == 110_000
    assert error.resets_at.isoformat() == "2026-11-19T00:00:00+00:00"
    assert error.code == "budget_exceeded"


def test_the_same_request_id_returns_the_same_hold(acme, now):
    first = authorize(acme, now=now, request_id="same")
    again = authorize(acme, now=now, request_id="same")
    assert again.pk == first.pk
    assert periods(acme)["tenant"].held_nanos == first.amount_nanos


def test_another_tenant_cannot_reuse_a_request_id(acme, globex, now):
    authorize(acme, now=now, request_id="shared")
    with pytest.raises(InvalidRequest, match="already used"):
        authorize(globex, now=now, request_id="shared")
    assert periods(globex)["tenant"].held_nanos == 0


def test_a_suspended_tenant_is_refused(acme, now):
    Tenant.objects.filter(pk=acme.pk).update(status=Tenant.Status.SUSPENDED, status_reason="unpaid")
    acme.refresh_from_db()
    with pytest.raises(SubscriptionInactive, match="unpaid"):
        authorize(acme, now=now)


def test_a_paused_agent_is_refused(acme, invoice_bot, now):
    services.set_agent_paused(invoice_bot, True, reason="runaway")
    with pytest.raises(AgentPaused, match="runaway"):
        authorize(acme, invoice_bot, now=now)


def test_a_tenant_without_policy_gets_the_default_daily_budget(acme, now):
    scope = engine.state_of(acme, now=now)
    (period,) = scope.periods
    assert period.policy.source == PolicySource.DEFAULT
    assert period.limit_nanos == usd_to_nanos("10")
    assert (period.window_start, period.window_end) == (
        now.replace(hour=0, minute=0),
        now.replace(hour=0, minute=0) + timedelta(days=1),
    )


def test_a_tenant_with_a_plan_gets_the_plans_budget(db, now):
    plan = Plan.objects.create(name="pro", limit_nanos=usd_to_nanos("200"), window="month")
    tenant = services.create_tenant("Initech", "cus_initech", plan=plan)
    (period,) = engine.state_of(tenant, now=now).periods
    assert period.policy.source == PolicySource.PLAN
    assert period.limit_nanos == usd_to_nanos("200")
    assert period.window_start.day == 1


@override_settings(DEFAULT_AGENT_DAILY_BUDGET_NANOS=5_000, DEFAULT_USER_DAILY_BUDGET_NANOS=7_000)
def test_agents_and_users_get_defaults_when_configured(acme, invoice_bot, now):
    scope = engine.state_of(acme, invoice_bot, "user-42", now=now)
    limits = {p.policy.scope_type: p.limit_nanos for p in scope.periods}
    assert limits == {"tenant": usd_to_nanos("10"), "agent": 5_000, "user": 7_000}
    assert scope.remaining_nanos == 5_000


def test_a_user_budget_governs_only_that_user(acme, invoice_bot, now):
    services.set_policy(acme, ScopeType.USER, user_key="user-42", limit_nanos=20_000)
    with pytest.raises(BudgetExceeded) as refused:
        authorize(
            acme,
            invoice_bot,
            now=now,
            user_key="user-42",
            max_output_tokens=100,
            min_output_tokens=100,
        )
    assert refused.value.scope_type == "user"
    assert authorize(acme, invoice_bot, now=now, user_key="user-7", max_output_tokens=100)


def test_a_disabled_policy_does_not_govern_and_is_not_replaced_by_a_default(acme, now):
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=1_000, enabled=False)
    scope = engine.state_of(acme, now=now)
    assert scope.periods == []
    assert scope.remaining_nanos is None
    hold = authorize(acme, now=now, max_output_tokens=1000)
    assert hold.max_output_tokens == 1000
    assert BudgetPolicy.objects.filter(tenant=acme).count() == 1


def test_a_concurrently_lowered_budget_is_respected(acme, now):
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=1_000_000)
    scope = engine.state_of(acme, now=now)
    # Another process lowers the limit after this call read the period.
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=20_000, now=now)
    hold = engine.authorize(
        scope,
        request_id="r",
        model="m",
        prices=Prices(100, 1000),
        input_tokens=0,
        max_output_tokens=500,
    )
    assert hold.max_output_tokens == 20
    assert periods(acme)["tenant"].held_nanos == 20_000


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"request_id": ""}, "request id"),
        ({"request_id": "x" * 129}, "request id"),
        ({"request_id": "a\nb"}, "request id"),
        ({"input_tokens": -1}, "negative"),
        ({"max_output_tokens": 0}, "at least 1"),
        ({"user_key": "u" * 129}, "longer than 128"),
        ({"user_key": "bad\x00key"}, "control characters"),
    ],
)
def test_it_refuses_bad_requests(acme, now, kwargs, problem):
    with pytest.raises(InvalidRequest, match=problem):
        authorize(acme, now=now, **kwargs)


def test_a_retry_after_losing_a_race_stays_in_the_calls_window(acme, now):
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=1_000_000, now=now)
    scope = engine.state_of(acme, now=now)
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=20_000, now=now)
    engine.authorize(
        scope, request_id="r", model="m", prices=PRICES, input_tokens=0, max_output_tokens=500
    )
    assert BudgetPeriod.objects.filter(policy__tenant=acme).count() == 1


def test_a_plan_brings_its_strategy_and_disabled_tools(db, now):
    plan = Plan.objects.create(
        name="lite",
        limit_nanos=usd_to_nanos("20"),
        window="month",
        strategy="cost-optimized",
        disabled_tools=["web_search"],
    )
    tenant = services.create_tenant("Initech", "cus_initech", plan=plan)
    (period,) = engine.state_of(tenant, now=now).periods
    assert (period.policy.strategy, period.policy.disabled_tools) == (
        "cost-optimized",
        ["web_search"],
    )


def test_an_unknown_strategy_is_refused(acme):
    with pytest.raises(InvalidRequest, match="unknown strategy 'fastest'"):
        services.set_policy(acme, ScopeType.TENANT, limit_nanos=1000, strategy="fastest")
