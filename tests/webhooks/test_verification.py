"""Only deliveries signed with our secret, recently, are stored."""

from __future__ import annotations

import json
import time

import pytest

from webhooks.models import StripeEvent

from .stripe_objects import URL, event, post, resource, sign

pytestmark = pytest.mark.django_db


def customer_event() -> bytes:
    return json.dumps(event("customer.created", resource("customer"))).encode()


def test_it_accepts_a_signed_event(client):
    response = post(client, customer_event())
    assert response.status_code == 200
    assert response.json()["received"] is True
    assert StripeEvent.objects.count() == 1


def test_it_refuses_a_bad_signature(client):
    response = post(client, customer_event(), secret="whsec_someone_else")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_signature"
    assert StripeEvent.objects.count() == 0


def test_it_refuses_a_body_changed_after_signing(client):
    payload = customer_event()
    header = sign(payload)
    tampered = payload.replace(b"cus_QXg1o8vcGmoR32", b"cus_Evil")
    response = client.post(
        URL, data=tampered, content_type="application/json", HTTP_STRIPE_SIGNATURE=header
    )
    assert response.status_code == 400
    assert StripeEvent.objects.count() == 0


def test_it_refuses_a_stale_timestamp(client):
    response = post(client, customer_event(), timestamp=int(time.time()) - 301)
    assert response.status_code == 400
    assert "tolerance" in response.json()["error"]["message"]
    assert StripeEvent.objects.count() == 0


def test_it_refuses_a_missing_signature_header(client):
    response = client.post(URL, data=customer_event(), content_type="application/json")
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "the Stripe-Signature header is missing"
    assert StripeEvent.objects.count() == 0


def test_it_refuses_a_garbled_signature_header(client):
    response = client.post(
        URL, data=customer_event(), content_type="application/json", HTTP_STRIPE_SIGNATURE="nope"
    )
    assert response.status_code == 400
    assert StripeEvent.objects.count() == 0


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"\xff\xfe", b"[1, 2]", b'{"object": "customer", "id": "cus_1"}'],
    ids=["malformed", "not-utf8", "a-list", "not-an-event"],
)
def test_it_refuses_a_signed_body_that_is_not_an_event(client, body):
    header = sign(body) if body != b"\xff\xfe" else "t=1,v1=00"
    response = client.post(
        URL, data=body, content_type="application/json", HTTP_STRIPE_SIGNATURE=header
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] in ("invalid_payload", "invalid_signature")
    assert StripeEvent.objects.count() == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [("id", "cus_123"), ("id", None), ("type", ""), ("created", "yesterday"), ("data", {})],
)
def test_it_refuses_an_event_missing_what_every_event_has(client, field, value):
    body = event("customer.created", resource("customer"))
    body[field] = value
    response = post(client, body)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_payload"
    assert StripeEvent.objects.count() == 0


def test_it_answers_503_when_webhooks_are_not_configured(client, settings):
    settings.STRIPE_WEBHOOK_SECRET = ""
    response = post(client, customer_event())
    assert response.status_code == 503
    assert response.json()["error"]["message"].startswith("Stripe webhooks are not configured")
    assert StripeEvent.objects.count() == 0


def test_it_only_allows_post(client):
    response = client.get(URL)
    assert response.status_code == 405
    assert response["Allow"] == "POST"
