"""Receiving Stripe's webhooks: verify the signature, store each event once by its id,
then run its handler in a transaction and record what happened on the event.

A duplicate of a handled event changes nothing. A handler that fails leaves no trace
but the error on the event, and the failure is answered with a 5xx so Stripe retries;
an operator can re-run it from the admin.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

import stripe
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from budgets import lifecycle
from budgets.models import Tenant
from governance import logs, metrics

from .handlers import HANDLERS, MAX_TIMESTAMP, UnusableEvent, sync_access, timestamp
from .models import DONE_STATUSES, EventStatus, StripeEvent, StripeSubscription

log = logging.getLogger(__name__)


class WebhookError(Exception):
    """A webhook delivery we cannot accept; governance/http.py maps its code to a status."""

    code = "webhook_error"

    def __init__(self, message: str, event: StripeEvent | None = None) -> None:
        super().__init__(message)
        self.message, self.event = message, event


class NotConfigured(WebhookError):
    code = "webhooks_not_configured"


class InvalidSignature(WebhookError):
    code = "invalid_signature"


class InvalidPayload(WebhookError):
    code = "invalid_payload"


class EventRejected(WebhookError):
    """The event is stored, but its object lacks what its handler needs."""

    code = "event_rejected"


class HandlerFailed(WebhookError):
    code = "handler_failed"


@dataclass(frozen=True)
class Receipt:
    event: StripeEvent
    duplicate: bool


def verify(raw_body: bytes, signature: str | None) -> None:
    secret = settings.STRIPE_WEBHOOK_SECRET
    if not secret:
        raise NotConfigured("Stripe webhooks are not configured: set STRIPE_WEBHOOK_SECRET")
    if not signature:
        raise InvalidSignature("the Stripe-Signature header is missing")
    try:
        # The same check stripe.Webhook.construct_event makes before parsing; the body
        # is parsed below so that a malformed one gets its own clear answer.
        stripe.WebhookSignature.verify_header(
            raw_body, signature, secret, settings.STRIPE_WEBHOOK_TOLERANCE_SECONDS
        )
    except stripe.SignatureVerificationError as exc:
        raise InvalidSignature(f"the Stripe signature does not verify: {exc}") from None
    except UnicodeDecodeError:
        raise InvalidPayload("the body is not UTF-8 text") from None


def parse_event(raw_body: bytes) -> dict:
    """The event envelope, checked for what every event must have."""
    try:
        body = json.loads(raw_body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidPayload(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict) or body.get("object") != "event":
        raise InvalidPayload('the body is not a Stripe event (no "object": "event")')
    event_id, event_type = body.get("id"), body.get("type")
    if not isinstance(event_id, str) or not event_id.startswith("evt_") or len(event_id) > 255:
        raise InvalidPayload(f"the event id {event_id!r} is not a Stripe event id (evt_...)")
    if not isinstance(event_type, str) or not 0 < len(event_type) <= 100:
        raise InvalidPayload("the event has no type")
    created = body.get("created")
    if isinstance(created, bool) or not isinstance(created, int) or not 0 < created < MAX_TIMESTAMP:
        raise InvalidPayload(f"the event's created time {created!r} is not a Unix timestamp")
    data = body.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("object"), dict):
        raise InvalidPayload("the event has no data.object")
    api_version = body.get("api_version")
    if api_version is not None and (not isinstance(api_version, str) or len(api_version) > 40):
        raise InvalidPayload(f"the event's api_version {api_version!r} is not a version")
    return body


def _customer_of(obj: dict) -> str:
    customer = obj.get("customer")
    if isinstance(customer, dict):
        customer = customer.get("id")
    if obj.get("object") == "customer":
        customer = obj.get("id")
    return customer[:255] if isinstance(customer, str) else ""


def store(body: dict) -> tuple[StripeEvent, bool]:
    """The stored event of this id, and whether this delivery created it."""
    return StripeEvent.objects.get_or_create(
        stripe_id=body["id"],
        defaults={
            "type": body["type"],
            "api_version": body.get("api_version") or "",
            "livemode": body.get("livemode") is True,
            "created": timestamp(body["created"]),
            "customer_id": _customer_of(body["data"]["object"]),
            "payload": body,
        },
    )


def process(event: StripeEvent, now: datetime | None = None) -> tuple[StripeEvent, bool]:
    """Run the event's handler unless it already ran; the event as stored afterwards and
    whether this call ran it. Two deliveries at once: the second waits, then sees it done."""
    now = now or timezone.now()
    with transaction.atomic():
        event = StripeEvent.objects.select_for_update().get(pk=event.pk)
        if event.status in DONE_STATUSES:
            return event, False
        event.attempts += 1
        event.handled_at = now
        handler = HANDLERS.get(event.type)
        if handler is None:
            event.status, event.note, event.error = EventStatus.IGNORED, "not handled", ""
        else:
            try:
                with transaction.atomic():
                    outcome = handler(event, now)
            except UnusableEvent as exc:
                event.status, event.error = EventStatus.REJECTED, str(exc)
            except Exception as exc:
                log.exception("Stripe event %s (%s) failed", event.stripe_id, event.type)
                event.status, event.error = EventStatus.FAILED, f"{type(exc).__name__}: {exc}"
            else:
                event.status, event.error = EventStatus.PROCESSED, ""
                event.note, event.warning = outcome.note[:1000], outcome.warning[:500]
        event.save()
    return event, True


def receive(raw_body: bytes, signature: str | None, now: datetime | None = None) -> Receipt:
    """Verify, store once and handle one delivery. Raises a WebhookError for anything
    that is not answered 200; the event, if stored, carries the error."""
    try:
        receipt = _receive(raw_body, signature, now)
    except WebhookError as exc:
        _observe(exc.event, exc.code)
        raise
    _observe(receipt.event, "duplicate" if receipt.duplicate else receipt.event.status)
    return receipt


def _observe(event: StripeEvent | None, result: str) -> None:
    """Count and log how a delivery was handled: never its body or its signature."""
    event_type = event.type if event is not None else None
    metrics.count_webhook(event_type or "", result)
    logs.log_webhook(event.stripe_id if event is not None else None, event_type, result)


def _receive(raw_body: bytes, signature: str | None, now: datetime | None) -> Receipt:
    verify(raw_body, signature)
    event, created = store(parse_event(raw_body))
    if not created and event.status in DONE_STATUSES:
        return Receipt(event, duplicate=True)
    event, ran = process(event, now)
    if event.status == EventStatus.FAILED:
        raise HandlerFailed(f"handling {event.stripe_id} failed; it is recorded for retry", event)
    if event.status == EventStatus.REJECTED:
        raise EventRejected(f"{event.stripe_id} cannot be handled: {event.error}", event)
    return Receipt(event, duplicate=not ran)


def rerun(event: StripeEvent, now: datetime | None = None) -> StripeEvent:
    """Run a failed, rejected or unhandled event again (an operator's action)."""
    event, _ = process(event, now)
    return event


def suspend_overdue(now: datetime | None = None) -> int:
    """Suspend tenants whose failed payment has outlived the grace; how many were.
    The next payment-failed retry from Stripe would do it too: this only makes it timely."""
    now = now or timezone.now()
    due = now - timedelta(hours=settings.PAYMENT_FAILED_GRACE_HOURS)
    customers = (
        StripeSubscription.objects.filter(payment_failed_at__lte=due)
        .values_list("customer_id", flat=True)
        .distinct()
    )
    suspended = 0
    for customer_id in customers:
        with transaction.atomic():
            tenant = lifecycle.locked_tenant(customer_id)
            if tenant is None or tenant.status != Tenant.Status.ACTIVE:
                continue
            sync_access(tenant, now)
            suspended += tenant.status == Tenant.Status.SUSPENDED
    return suspended
