"""Every verified event is stored once; duplicates change nothing; failures are kept
for Stripe's retry and the operator's re-run."""

from __future__ import annotations

import json

import pytest
from django.db import OperationalError
from django.urls import reverse

from budgets import lifecycle
from budgets.models import Tenant
from webhooks.models import EventStatus, StripeEvent

from .stripe_objects import event, post, resource, subscription

pytestmark = pytest.mark.django_db


def test_it_stores_and_acknowledges_an_event_type_it_does_not_handle(client):
    body = event("customer.created", resource("customer"), id="evt_unhandled1")
    response = post(client, body)
    assert response.status_code == 200
    assert response.json() == {
        "received": True,
        "id": "evt_unhandled1",
        "status": "ignored",
        "duplicate": False,
    }
    stored = StripeEvent.objects.get()
    assert (stored.stripe_id, stored.type, stored.status) == (
        "evt_unhandled1",
        "customer.created",
        EventStatus.IGNORED,
    )
    assert stored.payload == body
    assert stored.customer_id == "cus_QXg1o8vcGmoR32"
    assert stored.created.timestamp() == body["created"]
    assert stored.api_version == "2026-10-28.endive"


def test_it_answers_a_duplicate_delivery_with_200_and_changes_nothing(client, plans, period):
    body = event("customer.subscription.created", subscription(period=period))
    assert post(client, body).status_code == 200
    tenant = Tenant.objects.get(stripe_customer_id="cus_acme")
    before = (tenant.updated_at, tenant.plan_id, StripeEvent.objects.get().handled_at)
    # An operator changes the tenant meanwhile; a replay must not undo it.
    Tenant.objects.filter(pk=tenant.pk).update(name="Acme Inc")

    response = post(client, body)

    assert response.status_code == 200
    assert response.json()["duplicate"] is True
    stored = StripeEvent.objects.get()
    assert stored.attempts == 1
    tenant.refresh_from_db()
    assert tenant.name == "Acme Inc"
    assert (tenant.updated_at, tenant.plan_id, stored.handled_at) == before


def test_it_records_a_handler_failure_answers_500_then_reruns_from_the_admin(
    client, admin_client, plans, period, monkeypatch
):
    def locked(*args, **kwargs):
        raise OperationalError("database is locked")

    monkeypatch.setattr(lifecycle, "apply_plan", locked)
    body = event("customer.subscription.created", subscription(period=period))

    response = post(client, body)

    assert response.status_code == 500
    assert response.json()["error"]["code"] == "handler_failed"
    assert response.json()["error"]["event"] == body["id"]
    stored = StripeEvent.objects.get()
    assert stored.status == EventStatus.FAILED
    assert stored.error == "OperationalError: database is locked"
    # The handler's transaction was rolled back: no half-created tenant.
    assert not Tenant.objects.exists()

    monkeypatch.undo()
    response = admin_client.post(
        reverse("admin:webhooks_stripeevent_changelist"),
        {"action": "rerun", "_selected_action": [stored.pk]},
        follow=True,
    )

    assert "Re-ran 1 event(s): 1 processed" in response.content.decode()
    stored.refresh_from_db()
    assert (stored.status, stored.error, stored.attempts) == (EventStatus.PROCESSED, "", 2)
    assert Tenant.objects.get(stripe_customer_id="cus_acme").plan == plans["basic"]


def test_it_handles_a_failed_event_again_when_stripe_retries_it(client, plans, period, monkeypatch):
    monkeypatch.setattr(lifecycle, "apply_plan", lambda *a, **k: 1 / 0)
    body = event("customer.subscription.created", subscription(period=period))
    assert post(client, body).status_code == 500
    monkeypatch.undo()

    response = post(client, body)

    assert response.status_code == 200
    assert response.json()["status"] == "processed"
    assert StripeEvent.objects.get().attempts == 2


def test_it_rejects_an_event_whose_object_lacks_what_its_handler_needs(client, period):
    sub = subscription(period=period)
    sub["customer"] = None
    response = post(client, event("customer.subscription.updated", sub))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "event_rejected"
    stored = StripeEvent.objects.get()
    assert stored.status == EventStatus.REJECTED
    assert stored.error == "the object has no customer"
    assert not Tenant.objects.exists()


def test_the_admin_leaves_handled_events_alone(admin_client, client, plans, period):
    post(client, event("customer.subscription.created", subscription(period=period)))
    stored = StripeEvent.objects.get()
    response = admin_client.post(
        reverse("admin:webhooks_stripeevent_changelist"),
        {"action": "rerun", "_selected_action": [stored.pk]},
        follow=True,
    )
    assert "1 already handled, left alone" in response.content.decode()
    stored.refresh_from_db()
    assert stored.attempts == 1


def test_the_admin_shows_an_event_and_its_payload(admin_client, client):
    post(client, event("customer.created", resource("customer")))
    stored = StripeEvent.objects.get()
    page = admin_client.get(reverse("admin:webhooks_stripeevent_change", args=[stored.pk]))
    assert page.status_code == 200
    assert json.dumps("cus_QXg1o8vcGmoR32") in page.content.decode().replace("&quot;", '"')
