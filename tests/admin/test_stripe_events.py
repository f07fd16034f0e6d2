"""Stripe events in the admin: read-only, and a failed one can be run again."""

from __future__ import annotations

from django.urls import reverse

from budgets.models import Tenant
from tests.webhooks.stripe_objects import event, subscription
from webhooks import services
from webhooks.models import EventStatus, StripeEvent

EVENTS = reverse("admin:webhooks_stripeevent_changelist")


def failed_subscription_event(period) -> StripeEvent:
    """A subscription event whose handler failed (the database was locked, say)."""
    stored, _ = services.store(event("customer.subscription.created", subscription(period=period)))
    StripeEvent.objects.filter(pk=stored.pk).update(
        status=EventStatus.FAILED, attempts=1, error="OperationalError: database is locked"
    )
    return stored


def test_the_rerun_action_processes_a_failed_event(admin_client, plans, period):
    stored = failed_subscription_event(period)
    assert not Tenant.objects.exists()

    response = admin_client.post(
        EVENTS, {"action": "rerun", "_selected_action": [stored.pk]}, follow=True
    )

    assert "Re-ran 1 event(s): 1 processed" in response.content.decode()
    stored.refresh_from_db()
    assert (stored.status, stored.error, stored.attempts) == (EventStatus.PROCESSED, "", 2)
    assert Tenant.objects.get(stripe_customer_id="cus_acme").plan == plans["basic"]


def test_failed_events_can_be_listed_by_status_and_type(admin_client, plans, period):
    stored = failed_subscription_event(period)
    for query in ({"status__exact": "failed"}, {"type": "customer.subscription.created"}):
        response = admin_client.get(EVENTS, query)
        assert list(response.context["cl"].result_list) == [stored]
    response = admin_client.get(EVENTS, {"type": "other"})
    assert list(response.context["cl"].result_list) == []


def test_events_are_read_only(admin_client, plans, period):
    stored = failed_subscription_event(period)
    change = reverse("admin:webhooks_stripeevent_change", args=[stored.pk])
    assert admin_client.post(change, {"status": "processed"}).status_code == 403
    assert admin_client.get(reverse("admin:webhooks_stripeevent_add")).status_code == 403
    stored.refresh_from_db()
    assert stored.status == EventStatus.FAILED
