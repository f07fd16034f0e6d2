"""manage.py stripe_send_event signs a realistic event and posts it to a running service."""

from __future__ import annotations

import pytest
from django.core.management import CommandError, call_command

from budgets.models import Tenant
from webhooks.models import EventStatus, StripeEvent

pytestmark = [pytest.mark.django_db(transaction=True)]


@pytest.fixture
def send(live_server, capsys):
    url = f"{live_server.url}/api/webhooks/stripe"

    def send(event_type: str, *options: str) -> str:
        call_command(
            "stripe_send_event", event_type, "--customer", "cus_live1", "--url", url, *options
        )
        return capsys.readouterr().out

    return send


def test_it_drives_a_tenant_through_its_subscription(send, plans):
    output = send("customer.subscription.created", "--price", "price_basic")

    assert "customer.subscription.created evt_" in output
    assert "-> HTTP 200" in output
    tenant = Tenant.objects.get(stripe_customer_id="cus_live1")
    assert tenant.plan == plans["basic"]
    assert tenant.billing_period_start is not None

    send("customer.subscription.updated", "--price", "price_x", "--lookup-key", "pro_monthly")
    assert Tenant.objects.get(pk=tenant.pk).plan == plans["pro"]

    send("invoice.payment_failed")
    send("invoice.paid")
    send("customer.subscription.deleted")
    tenant.refresh_from_db()
    assert tenant.status == Tenant.Status.SUSPENDED

    assert set(StripeEvent.objects.values_list("status", flat=True)) == {EventStatus.PROCESSED}
    assert StripeEvent.objects.count() == 5


def test_it_fails_when_the_service_refuses_the_signature(send):
    with pytest.raises(CommandError, match="answered 400"):
        send("customer.subscription.created", "--secret", "whsec_not_the_services")
    assert not StripeEvent.objects.exists()


def test_it_needs_the_webhook_secret(settings, db):
    settings.STRIPE_WEBHOOK_SECRET = ""
    with pytest.raises(CommandError, match="STRIPE_WEBHOOK_SECRET is not set"):
        call_command("stripe_send_event", "invoice.paid", "--customer", "cus_live1")


def test_it_says_when_the_service_is_not_running(settings, db):
    with pytest.raises(CommandError, match="could not POST"):
        call_command(
            "stripe_send_event",
            "invoice.paid",
            "--customer",
            "cus_live1",
            "--url",
            "http://127.0.0.1:9/api/webhooks/stripe",
            "--timeout",
            "2",
        )
