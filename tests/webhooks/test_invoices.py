"""invoice.paid and invoice.payment_failed: renewals roll budgets over; a failed payment
suspends only after the grace; paying again resumes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from budgets.models import BudgetEvent, BudgetPeriod, BudgetPolicy, EventKind, Tenant
from webhooks import services
from webhooks.models import StripeEvent, StripeSubscription
from webhooks.tasks import suspend_overdue_tenants

from .stripe_objects import event, invoice, post, subscription

pytestmark = pytest.mark.django_db


@pytest.fixture
def subscribed(client, plans, previous_period):
    """Acme, subscribed to Basic since the previous period, with an agent policy on the
    billing cycle too."""
    post(
        client,
        event(
            "customer.subscription.created",
            subscription(period=previous_period),
            created=previous_period[0],
        ),
    )
    return Tenant.objects.get(stripe_customer_id="cus_acme")


def open_periods(tenant: Tenant) -> list[BudgetPeriod]:
    return list(
        BudgetPeriod.objects.filter(policy__tenant=tenant, closed_at__isnull=True).order_by("id")
    )


def test_a_renewal_invoice_moves_the_billing_period_and_rolls_budgets_over(
    client, subscribed, period, previous_period
):
    policy = BudgetPolicy.objects.get(tenant=subscribed)
    # Spend of the last period, in a period the engine opened while it was current.
    old = BudgetPeriod.objects.create(
        policy=policy,
        window_start=previous_period[0],
        window_end=previous_period[1] + timedelta(days=2),
        limit_nanos=10,
        warn_nanos=5,
        soft_nanos=8,
        hard_nanos=10,
        spent_nanos=9,
    )
    renewal = event("invoice.paid", invoice(period=period), created=period[0])

    response = post(client, renewal)

    assert response.status_code == 200
    subscribed.refresh_from_db()
    assert (subscribed.billing_period_start, subscribed.billing_period_end) == period
    old.refresh_from_db()
    assert old.closed_at == period[0]
    [current] = open_periods(subscribed)
    assert (current.window_start, current.window_end, current.spent_nanos) == (*period, 0)
    assert BudgetEvent.objects.get(period=current).kind == EventKind.RESET
    assert "billing period" in StripeEvent.objects.get(stripe_id=renewal["id"]).note


def test_a_renewal_is_rolled_over_once_whatever_announces_it(
    client, subscribed, period, previous_period
):
    BudgetPeriod.objects.create(
        policy=BudgetPolicy.objects.get(tenant=subscribed),
        window_start=previous_period[0],
        window_end=previous_period[1] + timedelta(days=2),
        limit_nanos=10,
        warn_nanos=5,
        soft_nanos=8,
        hard_nanos=10,
    )
    post(client, event("customer.subscription.updated", subscription(period=period)))
    periods = [
        (p.pk, p.window_start, p.window_end, p.closed_at) for p in BudgetPeriod.objects.all()
    ]

    post(client, event("invoice.paid", invoice(period=period)))
    post(client, event("invoice.paid", invoice(period=period)))

    assert [
        (p.pk, p.window_start, p.window_end, p.closed_at) for p in BudgetPeriod.objects.all()
    ] == periods
    assert len(periods) == 2
    assert BudgetEvent.objects.filter(kind=EventKind.RESET).count() == 1


def test_a_late_renewal_invoice_of_an_older_period_changes_nothing(
    client, subscribed, period, previous_period
):
    post(client, event("customer.subscription.updated", subscription(period=period)))
    post(client, event("invoice.paid", invoice(period=previous_period), created=previous_period[0]))
    subscribed.refresh_from_db()
    assert (subscribed.billing_period_start, subscribed.billing_period_end) == period


def test_a_proration_invoice_does_not_move_the_period(client, subscribed, period):
    mid = (period[0] + timedelta(days=10), period[1])
    post(client, event("invoice.paid", invoice(billing_reason="subscription_update", period=mid)))
    subscribed.refresh_from_db()
    assert subscribed.billing_period_end == period[0]


def test_a_failed_payment_suspends_only_after_the_grace_and_paying_resumes(
    client, subscribed, period
):
    failed_at = datetime.now(UTC) - timedelta(hours=1)
    bill = invoice(period=period, paid=False, id="in_renewal1")

    response = post(client, event("invoice.payment_failed", bill, created=failed_at))

    assert response.status_code == 200
    subscribed.refresh_from_db()
    assert subscribed.status == Tenant.Status.ACTIVE
    assert StripeSubscription.objects.get().payment_failed_invoice == "in_renewal1"

    # Within the grace, the periodic check changes nothing...
    assert suspend_overdue_tenants() == 0
    assert Tenant.objects.get().status == Tenant.Status.ACTIVE
    # ...once it has passed, the tenant is suspended.
    assert services.suspend_overdue(now=failed_at + timedelta(hours=72)) == 1
    subscribed.refresh_from_db()
    assert subscribed.status == Tenant.Status.SUSPENDED
    assert subscribed.status_reason.startswith("billing: payment failed")
    assert "in_renewal1" in subscribed.status_reason

    post(client, event("invoice.paid", {**bill, "status": "paid"}))

    subscribed.refresh_from_db()
    assert (subscribed.status, subscribed.status_reason) == (Tenant.Status.ACTIVE, "")
    assert StripeSubscription.objects.get().payment_failed_at is None


def test_a_payment_failure_reported_after_the_grace_suspends_at_once(client, subscribed, period):
    # Stripe's retries go on for days; the first failure is what the grace counts from.
    first = datetime.now(UTC) - timedelta(hours=80)
    bill = invoice(period=period, paid=False, id="in_renewal2")
    post(client, event("invoice.payment_failed", bill, created=first))
    assert Tenant.objects.get().status == Tenant.Status.SUSPENDED


def test_a_retry_failure_does_not_restart_the_grace(client, subscribed, period):
    first = datetime.now(UTC) - timedelta(hours=70)
    bill = invoice(period=period, paid=False, id="in_renewal3")
    post(client, event("invoice.payment_failed", bill, created=first))
    post(client, event("invoice.payment_failed", bill))
    assert StripeSubscription.objects.get().payment_failed_at == first.replace(microsecond=0)
    assert services.suspend_overdue(now=first + timedelta(hours=72)) == 1


def test_a_failure_delivered_after_the_payment_that_settled_it_is_ignored(
    client, subscribed, period
):
    now = datetime.now(UTC)
    bill = invoice(period=period, paid=False, id="in_renewal4")
    post(client, event("invoice.paid", {**bill, "status": "paid"}, created=now))
    post(client, event("invoice.payment_failed", bill, created=now - timedelta(hours=100)))
    assert Tenant.objects.get().status == Tenant.Status.ACTIVE
    assert StripeSubscription.objects.get().payment_failed_at is None


def test_an_unpaid_subscription_is_suspended(client, subscribed, period):
    post(
        client, event("customer.subscription.updated", subscription(status="unpaid", period=period))
    )
    tenant = Tenant.objects.get()
    assert tenant.status_reason == "billing: subscription sub_acme1 is unpaid"


def test_an_invoice_for_an_unknown_customer_is_recorded(client, plans, period):
    bill = invoice(customer="cus_nobody", subscription_id="sub_nobody", period=period)
    response = post(client, event("invoice.payment_failed", bill))
    assert response.status_code == 200
    assert not Tenant.objects.exists()
    assert "no tenant for cus_nobody" in StripeEvent.objects.get().note


def test_an_invoice_without_a_subscription_changes_nothing(client, subscribed, period):
    bill = invoice(period=period, paid=False)
    bill["parent"] = {"type": "quote_details", "quote_details": {"quote": "qt_1"}}
    post(
        client, event("invoice.payment_failed", bill, created=datetime.now(UTC) - timedelta(days=9))
    )
    assert Tenant.objects.get().status == Tenant.Status.ACTIVE
    note = StripeEvent.objects.get(type="invoice.payment_failed").note
    assert note == "not a subscription invoice: access unchanged"
