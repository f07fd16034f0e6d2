"""Build a realistic Stripe event, sign it with the webhook secret and POST it to the
running service, as `stripe trigger` would (without a Stripe account)."""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime
from typing import Any

import requests
import stripe
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from budgets.windows import add_months

API_VERSION = "2026-10-28.endive"
SUBSCRIPTION_TYPES = (
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "customer.subscription.paused",
    "customer.subscription.resumed",
)
INVOICE_TYPES = ("invoice.paid", "invoice.payment_failed")
TYPES = SUBSCRIPTION_TYPES + INVOICE_TYPES
DEFAULT_URL = "http://127.0.0.1:8000/api/webhooks/stripe"


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def _ts(moment: datetime) -> int:
    return int(moment.timestamp())


def price_object(price_id: str, lookup_key: str | None) -> dict[str, Any]:
    return {
        "id": price_id,
        "object": "price",
        "active": True,
        "billing_scheme": "per_unit",
        "currency": "usd",
        "livemode": False,
        "lookup_key": lookup_key,
        "metadata": {},
        "nickname": None,
        "product": "prod_sg_local",
        "recurring": {
            "interval": "month",
            "interval_count": 1,
            "meter": None,
            "trial_period_days": None,
            "usage_type": "licensed",
        },
        "tax_behavior": "unspecified",
        "type": "recurring",
        "unit_amount": 2000,
        "unit_amount_decimal": "2000",
    }


def subscription_object(
    *,
    subscription_id: str,
    customer: str,
    price_id: str,
    lookup_key: str | None,
    status: str,
    period: tuple[datetime, datetime],
    now: datetime,
) -> dict[str, Any]:
    start, end = period
    canceled = status == "canceled"
    return {
        "id": subscription_id,
        "object": "subscription",
        "billing_cycle_anchor": _ts(start),
        "billing_mode": {"type": "classic"},
        "cancel_at": None,
        "cancel_at_period_end": False,
        "canceled_at": _ts(now) if canceled else None,
        "collection_method": "charge_automatically",
        "created": _ts(start),
        "currency": "usd",
        "customer": customer,
        "ended_at": _ts(now) if canceled else None,
        "items": {
            "object": "list",
            "data": [
                {
                    "id": f"si_{subscription_id.removeprefix('sub_')[:14]}",
                    "object": "subscription_item",
                    "created": _ts(start),
                    "current_period_start": _ts(start),
                    "current_period_end": _ts(end),
                    "discounts": [],
                    "metadata": {},
                    "price": price_object(price_id, lookup_key),
                    "quantity": 1,
                    "subscription": subscription_id,
                    "tax_rates": [],
                }
            ],
            "has_more": False,
            "url": f"/v1/subscription_items?subscription={subscription_id}",
        },
        "latest_invoice": None,
        "livemode": False,
        "metadata": {},
        "start_date": _ts(start),
        "status": status,
        "trial_end": None,
        "trial_start": None,
    }


def invoice_object(
    *,
    customer: str,
    subscription_id: str,
    price_id: str,
    paid: bool,
    period: tuple[datetime, datetime],
    now: datetime,
) -> dict[str, Any]:
    start, end = period
    invoice_id = _id("in")
    return {
        "id": invoice_id,
        "object": "invoice",
        "amount_due": 2000,
        "amount_paid": 2000 if paid else 0,
        "amount_remaining": 0 if paid else 2000,
        "attempt_count": 1,
        "attempted": True,
        "billing_reason": "subscription_cycle",
        "collection_method": "charge_automatically",
        "created": _ts(start),
        "currency": "usd",
        "customer": customer,
        "lines": {
            "object": "list",
            "data": [
                {
                    "id": _id("il"),
                    "object": "line_item",
                    "amount": 2000,
                    "currency": "usd",
                    "invoice": invoice_id,
                    "livemode": False,
                    "metadata": {},
                    "parent": {
                        "type": "subscription_item_details",
                        "invoice_item_details": None,
                        "subscription_item_details": {
                            "invoice_item": None,
                            "proration": False,
                            "proration_details": {"credited_items": None},
                            "subscription": subscription_id,
                            "subscription_item": f"si_{subscription_id.removeprefix('sub_')[:14]}",
                        },
                    },
                    "period": {"start": _ts(start), "end": _ts(end)},
                    "pricing": {
                        "type": "price_details",
                        "price_details": {"price": price_id, "product": "prod_sg_local"},
                        "unit_amount_decimal": "2000",
                    },
                    "quantity": 1,
                }
            ],
            "has_more": False,
            "url": f"/v1/invoices/{invoice_id}/lines",
        },
        "livemode": False,
        "next_payment_attempt": None if paid else _ts(now) + 3 * 86400,
        "parent": {
            "type": "subscription_details",
            "quote_details": None,
            "subscription_details": {"metadata": {}, "subscription": subscription_id},
        },
        "period_end": _ts(start),
        "period_start": _ts(add_months(start, -1)),
        "status": "paid" if paid else "open",
        "status_transitions": {
            "finalized_at": _ts(start),
            "marked_uncollectible_at": None,
            "paid_at": _ts(now) if paid else None,
            "voided_at": None,
        },
        "subtotal": 2000,
        "total": 2000,
    }


def build_event(
    event_type: str,
    *,
    customer: str,
    price_id: str,
    lookup_key: str | None = None,
    subscription_id: str | None = None,
    status: str | None = None,
    period_start: datetime | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """A Stripe event of this type as a webhook endpoint on API_VERSION receives it."""
    if event_type not in TYPES:
        raise ValueError(f"unsupported event type {event_type!r}; use one of {', '.join(TYPES)}")
    now = (now or datetime.now(UTC)).replace(microsecond=0)
    start = (period_start or now).replace(microsecond=0)
    period = (start, add_months(start, 1))
    subscription_id = subscription_id or f"sub_{customer.removeprefix('cus_')}"
    if event_type in SUBSCRIPTION_TYPES:
        default_status = {
            "customer.subscription.deleted": "canceled",
            "customer.subscription.paused": "paused",
        }.get(event_type, "active")
        obj = subscription_object(
            subscription_id=subscription_id,
            customer=customer,
            price_id=price_id,
            lookup_key=lookup_key,
            status=status or default_status,
            period=period,
            now=now,
        )
    else:
        obj = invoice_object(
            customer=customer,
            subscription_id=subscription_id,
            price_id=price_id,
            paid=event_type == "invoice.paid",
            period=period,
            now=now,
        )
    return {
        "id": _id("evt"),
        "object": "event",
        "api_version": API_VERSION,
        "created": _ts(now),
        "data": {"object": obj},
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": event_type,
    }


def _moment(value: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise CommandError(f"{value!r} is not an ISO 8601 date or time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class Command(BaseCommand):
    help = "Sign a realistic Stripe event with STRIPE_WEBHOOK_SECRET and POST it to the service."

    def add_arguments(self, parser):
        parser.add_argument("type", choices=TYPES, help="Stripe event type")
        parser.add_argument("--customer", required=True, help="Stripe customer id, cus_...")
        parser.add_argument("--price", default="price_sg_local", help="Stripe price id")
        parser.add_argument("--lookup-key", help="The price's lookup key")
        parser.add_argument("--subscription", help="Subscription id (default: from the customer)")
        parser.add_argument("--status", help="Subscription status (default: fits the type)")
        parser.add_argument(
            "--period-start", type=_moment, help="Billing period start (default: now)"
        )
        parser.add_argument("--url", default=DEFAULT_URL, help=f"Endpoint (default {DEFAULT_URL})")
        parser.add_argument("--timeout", type=float, default=10.0, help="Seconds to wait")
        parser.add_argument(
            "--secret", help="Signing secret of another service (default: STRIPE_WEBHOOK_SECRET)"
        )

    def handle(self, *args, **options):
        secret = options["secret"] or settings.STRIPE_WEBHOOK_SECRET
        if not secret:
            raise CommandError("STRIPE_WEBHOOK_SECRET is not set: the service would refuse it")
        if not options["customer"].startswith("cus_"):
            raise CommandError(f"--customer {options['customer']!r}: use a cus_... id")
        event = build_event(
            options["type"],
            customer=options["customer"],
            price_id=options["price"],
            lookup_key=options["lookup_key"],
            subscription_id=options["subscription"],
            status=options["status"],
            period_start=options["period_start"],
        )
        payload = json.dumps(event, indent=2)
        signature = stripe.WebhookSignature.generate_signature_header(payload, secret)
        try:
            response = requests.post(
                options["url"],
                data=payload.encode(),
                headers={"Content-Type": "application/json", "Stripe-Signature": signature},
                timeout=options["timeout"],
            )
        except requests.RequestException as exc:
            raise CommandError(f"could not POST to {options['url']}: {exc}") from None
        self.stdout.write(f"{event['type']} {event['id']} -> HTTP {response.status_code}")
        self.stdout.write(response.text)
        if not response.ok:
            raise CommandError(f"the service answered {response.status_code}")
