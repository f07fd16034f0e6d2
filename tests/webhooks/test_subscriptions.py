"""customer.subscription.*: the tenant, its plan, its budget and its billing period
follow the newest state of its subscription, whatever order events arrive in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from budgets import engine, services
from budgets.models import (
    BudgetEvent,
    BudgetPeriod,
    BudgetPolicy,
    EventKind,
    PeriodState,
    PolicySource,
    ScopeType,
    Tenant,
    Window,
)
from budgets.money import Prices, usd_to_nanos
from webhooks.models import EventStatus, StripeEvent, StripeSubscription

from .stripe_objects import OLD_API_VERSION, event, post, subscription

pytestmark = pytest.mark.django_db


def tenant_policy(customer: str = "cus_acme") -> BudgetPolicy:
    return BudgetPolicy.objects.get(scope_type=ScopeType.TENANT, scope_key=customer)


def spend(tenant: Tenant, usd: str, request_id: str) -> None:
    nanos = usd_to_nanos(usd)
    scope = engine.state_of(tenant)
    hold = engine.authorize(
        scope,
        request_id=request_id,
        model="m",
        prices=Prices(1, 0),
        input_tokens=nanos,
        max_output_tokens=1,
        min_output_tokens=1,
    )
    engine.capture(hold, prompt_tokens=nanos, completion_tokens=0)


def test_it_creates_the_tenant_with_its_plan_budget_and_billing_period(client, plans, period):
    response = post(client, event("customer.subscription.created", subscription(period=period)))

    assert response.status_code == 200
    assert response.json()["status"] == "processed"
    tenant = Tenant.objects.get(stripe_customer_id="cus_acme")
    assert (tenant.name, tenant.status, tenant.plan) == ("cus_acme", "active", plans["basic"])
    assert (tenant.billing_period_start, tenant.billing_period_end) == period
    policy = tenant_policy()
    assert (policy.limit_nanos, policy.window, policy.source) == (
        usd_to_nanos("10"),
        Window.BILLING_CYCLE,
        PolicySource.PLAN,
    )
    open_period = engine.state_of(tenant).periods[0]
    assert (open_period.window_start, open_period.window_end) == period
    assert StripeSubscription.objects.get().status == "active"


def test_it_maps_a_price_by_its_lookup_key(client, plans, period):
    sub = subscription(
        price="price_1PgafmB7WZ01zgkW6dKueIc5", lookup_key="pro_monthly", period=period
    )
    post(client, event("customer.subscription.created", sub))
    assert Tenant.objects.get().plan == plans["pro"]
    assert tenant_policy().limit_nanos == usd_to_nanos("100")
    assert StripeEvent.objects.get().warning == ""


def test_it_gives_an_unmapped_price_the_default_plan_and_warns(client, plans, period):
    sub = subscription(price="price_unknown", lookup_key="enterprise", period=period)
    post(client, event("customer.subscription.created", sub))

    assert Tenant.objects.get().plan == plans["default"]
    assert tenant_policy().limit_nanos == usd_to_nanos("1")
    warning = (
        "price price_unknown (lookup key enterprise) has no plan: the default plan Starter applies"
    )
    assert StripeEvent.objects.get().warning == warning
    assert StripeSubscription.objects.get().warning == warning


def test_it_warns_and_keeps_the_budget_when_there_is_no_default_plan(client, period):
    post(client, event("customer.subscription.created", subscription(period=period)))
    tenant = Tenant.objects.get()
    assert tenant.plan is None
    assert not BudgetPolicy.objects.exists()
    assert "no default plan" in StripeEvent.objects.get().warning


def test_it_reads_the_billing_period_of_an_older_api_version(client, plans, period):
    sub = subscription(period=period, api_version=OLD_API_VERSION)
    assert "current_period_start" not in sub["items"]["data"][0]
    post(client, event("customer.subscription.created", sub, api_version=OLD_API_VERSION))

    tenant = Tenant.objects.get()
    assert (tenant.billing_period_start, tenant.billing_period_end) == period
    assert StripeEvent.objects.get().api_version == OLD_API_VERSION


def test_it_does_not_move_a_tenant_back_when_an_older_update_arrives_late(
    client, plans, period, previous_period
):
    now = datetime.now(UTC)
    older = event(
        "customer.subscription.updated",
        subscription(price="price_basic", period=previous_period),
        created=now - timedelta(minutes=10),
    )
    newer = event(
        "customer.subscription.updated",
        subscription(lookup_key="pro_monthly", price="price_x", period=period),
        created=now - timedelta(minutes=5),
    )
    assert post(client, newer).status_code == 200

    response = post(client, older)

    assert response.status_code == 200
    tenant = Tenant.objects.get()
    assert tenant.plan == plans["pro"]
    assert (tenant.billing_period_start, tenant.billing_period_end) == period
    assert tenant_policy().limit_nanos == usd_to_nanos("100")
    assert f"older than {newer['id']}" in StripeEvent.objects.get(stripe_id=older["id"]).note


def test_a_plan_change_mid_period_applies_to_the_open_period(client, plans, period):
    now = datetime.now(UTC)
    post(
        client,
        event(
            "customer.subscription.created",
            subscription(period=period),
            created=now - timedelta(days=5),
        ),
    )
    tenant = Tenant.objects.get()
    spend(tenant, "6", "call-1")
    before = engine.state_of(tenant).periods[0]
    assert (before.limit_nanos, before.state) == (usd_to_nanos("10"), PeriodState.WARNED)

    post(
        client,
        event(
            "customer.subscription.updated",
            subscription(price="price_new", lookup_key="pro_monthly", period=period),
        ),
    )

    after = BudgetPeriod.objects.get(pk=before.pk)
    assert after.closed_at is None
    assert (after.limit_nanos, after.spent_nanos) == (usd_to_nanos("100"), usd_to_nanos("6"))
    assert after.hard_nanos == usd_to_nanos("100")
    assert after.state == PeriodState.ACTIVE
    assert BudgetEvent.objects.filter(period=after, kind=EventKind.RECOVERED).exists()
    assert Tenant.objects.get().plan == plans["pro"]


def test_a_subscription_update_that_moves_the_period_rolls_the_budget_over(
    client, plans, period, previous_period
):
    now = datetime.now(UTC)
    post(
        client,
        event(
            "customer.subscription.created",
            subscription(period=previous_period),
            created=previous_period[0],
        ),
    )
    assert Tenant.objects.get().plan == plans["basic"]
    # The last period ended; until the renewal arrives the engine rolls forward on its own.
    old = BudgetPeriod.objects.create(
        policy=tenant_policy(),
        window_start=previous_period[0],
        window_end=previous_period[1] + timedelta(hours=1),
        limit_nanos=usd_to_nanos("10"),
        warn_nanos=usd_to_nanos("5"),
        soft_nanos=usd_to_nanos("8"),
        hard_nanos=usd_to_nanos("10"),
        spent_nanos=usd_to_nanos("7"),
    )
    renewal = event("customer.subscription.updated", subscription(period=period), created=now)

    post(client, renewal)
    post(client, event("customer.subscription.updated", subscription(period=period)))

    old.refresh_from_db()
    assert (old.closed_at, old.close_reason) == (period[0], "billing period renewed")
    current = BudgetPeriod.objects.get(policy=tenant_policy(), closed_at__isnull=True)
    assert (current.window_start, current.window_end, current.spent_nanos) == (*period, 0)
    assert BudgetEvent.objects.filter(period=current, kind=EventKind.RESET).count() == 1
    assert BudgetPeriod.objects.filter(policy=tenant_policy()).count() == 2


def test_it_keeps_a_tenant_budget_an_operator_set(client, plans, period):
    tenant = services.create_tenant("Acme", "cus_acme")
    services.set_policy(tenant, ScopeType.TENANT, limit_nanos=usd_to_nanos("42"))

    post(client, event("customer.subscription.created", subscription(period=period)))

    assert tenant_policy().limit_nanos == usd_to_nanos("42")
    assert Tenant.objects.get().plan == plans["basic"]
    assert "set by an operator, kept" in StripeEvent.objects.get().note


def test_it_leaves_other_tenants_alone(client, plans, period, globex):
    post(client, event("customer.subscription.created", subscription(period=period)))
    globex.refresh_from_db()
    assert (globex.plan, globex.billing_period_start, globex.status) == (None, None, "active")
    assert not BudgetPolicy.objects.filter(tenant=globex).exists()


def test_cancellation_suspends_and_a_new_subscription_resumes(client, plans, period):
    now = datetime.now(UTC)
    post(
        client,
        event(
            "customer.subscription.created",
            subscription(period=period),
            created=now - timedelta(days=5),
        ),
    )
    post(
        client,
        event(
            "customer.subscription.deleted",
            subscription(status="canceled", period=period),
            created=now - timedelta(days=1),
        ),
    )
    tenant = Tenant.objects.get()
    assert tenant.status == Tenant.Status.SUSPENDED
    assert tenant.status_reason == "billing: subscription sub_acme1 is canceled"
    with pytest.raises(Exception, match="subscription_inactive"):
        engine.authorize(
            engine.state_of(tenant),
            request_id="refused",
            model="m",
            prices=Prices(1, 1),
            input_tokens=1,
            max_output_tokens=1,
        )

    # A late update of the ended subscription does not revive it...
    post(
        client,
        event(
            "customer.subscription.updated",
            subscription(period=period),
            created=now - timedelta(days=2),
        ),
    )
    assert Tenant.objects.get().status == Tenant.Status.SUSPENDED

    # ...a new subscription does.
    post(
        client,
        event("customer.subscription.created", subscription(id="sub_acme2", period=period)),
    )
    tenant.refresh_from_db()
    assert (tenant.status, tenant.status_reason) == (Tenant.Status.ACTIVE, "")


def test_a_paused_subscription_suspends_until_resumed(client, plans, period):
    now = datetime.now(UTC)
    post(
        client,
        event(
            "customer.subscription.paused",
            subscription(status="paused", period=period),
            created=now - timedelta(minutes=2),
        ),
    )
    assert Tenant.objects.get().status == Tenant.Status.SUSPENDED
    post(client, event("customer.subscription.resumed", subscription(period=period)))
    assert Tenant.objects.get().status == Tenant.Status.ACTIVE


def test_it_never_lifts_an_operators_suspension(client, plans, period):
    tenant = services.create_tenant("Acme", "cus_acme")
    Tenant.objects.filter(pk=tenant.pk).update(status="suspended", status_reason="abuse")
    post(client, event("customer.subscription.created", subscription(period=period)))
    tenant.refresh_from_db()
    assert (tenant.status, tenant.status_reason) == ("suspended", "abuse")


def test_it_records_an_unusable_period_as_a_rejection(client, plans, period):
    sub = subscription(period=period)
    sub["items"]["data"][0]["current_period_end"] = "soon"
    response = post(client, event("customer.subscription.updated", sub))
    assert response.status_code == 400
    assert StripeEvent.objects.get().status == EventStatus.REJECTED


def test_it_takes_the_plan_from_the_flat_fee_item_beside_a_metered_one(client, plans, period):
    sub = subscription(price="price_basic", period=period)
    metered = {**sub["items"]["data"][0], "id": "si_metered"}
    metered["price"] = {
        **metered["price"],
        "id": "price_ai_usage",
        "recurring": {**metered["price"]["recurring"], "usage_type": "metered"},
    }
    sub["items"]["data"].insert(0, metered)

    post(client, event("customer.subscription.created", sub))

    assert Tenant.objects.get().plan == plans["basic"]
    mirror = StripeSubscription.objects.get()
    assert (mirror.price_id, mirror.warning) == ("price_basic", "")
