"""Real-shaped Stripe payloads for tests.

stripe_resources.json is a copy of Stripe's own example objects (stripe/openapi,
fixtures3.json, via /work/shared/stripe-fixtures). Each builder starts from one of them
and sets only the fields the tests depend on; every placeholder a handler reads
(timestamps, ids, the invoice's parent) is set here.
"""

from __future__ import annotations

import copy
import json
import secrets
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import stripe

CURRENT_API_VERSION = "2026-10-28.endive"
# The last version with current_period_start/end on the subscription itself.
OLD_API_VERSION = "2024-06-20"
SECRET = "whsec_test_3f9a1c"
URL = "/api/webhooks/stripe"

RESOURCES = json.loads((Path(__file__).parent / "stripe_resources.json").read_text())


def resource(name: str) -> dict[str, Any]:
    return copy.deepcopy(RESOURCES[name])


def ts(moment: datetime) -> int:
    return int(moment.timestamp())


def subscription(
    *,
    customer: str = "cus_acme",
    id: str = "sub_acme1",
    price: str = "price_basic",
    lookup_key: str | None = None,
    status: str = "active",
    period: tuple[datetime, datetime],
    api_version: str = CURRENT_API_VERSION,
) -> dict[str, Any]:
    sub = resource("subscription")
    sub.update(
        id=id,
        customer=customer,
        status=status,
        cancel_at=None,
        cancel_at_period_end=False,
        canceled_at=ts(period[0]) if status == "canceled" else None,
        ended_at=ts(period[0]) if status == "canceled" else None,
        created=ts(period[0]),
        start_date=ts(period[0]),
        billing_cycle_anchor=ts(period[0]),
        trial_start=None,
        trial_end=None,
    )
    item = sub["items"]["data"][0]
    item["subscription"] = id
    item["price"]["id"] = price
    item["price"]["lookup_key"] = lookup_key
    item["plan"]["id"] = price
    sub["items"]["url"] = f"/v1/subscription_items?subscription={id}"
    if api_version == CURRENT_API_VERSION:
        item["current_period_start"], item["current_period_end"] = map(ts, period)
    else:
        del item["current_period_start"], item["current_period_end"]
        sub["current_period_start"], sub["current_period_end"] = map(ts, period)
    return sub


def invoice(
    *,
    customer: str = "cus_acme",
    subscription_id: str = "sub_acme1",
    id: str | None = None,
    billing_reason: str = "subscription_cycle",
    period: tuple[datetime, datetime],
    paid: bool = True,
) -> dict[str, Any]:
    inv = resource("invoice")
    invoice_id = id or f"in_{secrets.token_hex(8)}"
    inv.update(
        id=invoice_id,
        customer=customer,
        billing_reason=billing_reason,
        status="paid" if paid else "open",
        amount_paid=inv["amount_due"] if paid else 0,
        attempted=True,
        attempt_count=1,
        created=ts(period[0]),
        parent={
            "type": "subscription_details",
            "quote_details": None,
            "subscription_details": {"metadata": {}, "subscription": subscription_id},
        },
    )
    line = inv["lines"]["data"][0]
    line["invoice"] = invoice_id
    line["parent"] = {
        "type": "subscription_item_details",
        "invoice_item_details": None,
        "subscription_item_details": {
            "invoice_item": None,
            "proration": False,
            "proration_details": {"credited_items": None},
            "subscription": subscription_id,
            "subscription_item": "si_QXhVnC2h0Jczwc",
        },
    }
    line["period"] = {"start": ts(period[0]), "end": ts(period[1])}
    return inv


def event(
    event_type: str,
    obj: dict[str, Any],
    *,
    created: datetime | int | None = None,
    id: str | None = None,
    api_version: str = CURRENT_API_VERSION,
) -> dict[str, Any]:
    envelope = resource("event")
    if isinstance(created, datetime):
        created = ts(created)
    envelope.update(
        id=id or f"evt_{secrets.token_hex(12)}",
        type=event_type,
        created=created if created is not None else int(time.time()),
        api_version=api_version,
        data={"object": obj},
        pending_webhooks=1,
    )
    return envelope


def sign(payload: bytes, *, secret: str = SECRET, timestamp: int | None = None) -> str:
    return stripe.WebhookSignature.generate_signature_header(
        payload.decode(), secret, timestamp=timestamp
    )


def post(client, body: dict[str, Any] | bytes, **signing):
    """POST a signed delivery of `body` as Stripe does."""
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(
        URL,
        data=payload,
        content_type="application/json",
        HTTP_STRIPE_SIGNATURE=sign(payload, **signing),
    )
