"""One function per Stripe event type we act on.

An event is a trigger: a handler reads the object in its payload, compares it with what
is stored (the subscription mirror, the tenant's billing period) and moves things only
forward. Stripe delivers late, twice and out of order, so nothing here trusts arrival
order: plan and status follow the newest event seen for a subscription, the billing
period only ever moves to a later one, and access is decided from every subscription of
the customer. Handlers run inside the transaction webhooks.services opens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings

from budgets import lifecycle
from budgets.errors import InvalidRequest
from budgets.models import Tenant

from .models import StripeEvent, StripeSubscription

log = logging.getLogger(__name__)

# Statuses in which the customer may use the service; past_due is the dunning period,
# governed by the payment-failed grace instead.
SERVICEABLE = frozenset({"active", "trialing", "past_due"})
PAID_UP = frozenset({"active", "trialing"})
# A subscription in these never comes back: a later "update" cannot revive it.
TERMINAL = frozenset({"canceled", "incomplete_expired"})
# Invoices whose subscription lines are the new billing period (others, such as
# proration invoices, cover part of a period).
NEW_PERIOD_REASONS = frozenset({"subscription_cycle", "subscription_create"})
# Later than any Stripe timestamp we accept (year 5138), earlier than none.
MAX_TIMESTAMP = 10**11


class UnusableEvent(Exception):
    """A verified event whose object lacks what its handler needs: retrying cannot help."""


@dataclass(frozen=True)
class Outcome:
    note: str
    warning: str = ""


# --- Reading Stripe objects ---------------------------------------------------------


def timestamp(value: Any, name: str = "timestamp") -> datetime | None:
    """A Stripe timestamp (seconds since the epoch) as an aware datetime; None if absent."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < MAX_TIMESTAMP:
        raise UnusableEvent(f"{name} is not a Unix timestamp: {value!r}")
    return datetime.fromtimestamp(value, UTC)


def _object_id(value: Any, name: str, prefix: str, *, required: bool = True) -> str:
    """An id given as a string or as an expanded object with an id."""
    if isinstance(value, dict):
        value = value.get("id")
    if value is None or value == "":
        if required:
            raise UnusableEvent(f"the object has no {name}")
        return ""
    if not isinstance(value, str) or not value.startswith(prefix) or len(value) > 255:
        raise UnusableEvent(f"{name} {value!r} is not a Stripe id ({prefix}...)")
    return value


def _string(value: Any, name: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UnusableEvent(f"{name} is not a string: {value!r}")
    return value


def _period(start: Any, end: Any, name: str) -> tuple[datetime, datetime] | None:
    begins, ends = timestamp(start, f"{name} start"), timestamp(end, f"{name} end")
    if begins is None or ends is None:
        return None
    if ends <= begins:
        raise UnusableEvent(f"{name} ends before it starts ({begins} - {ends})")
    return begins, ends


def _customer(value: Any) -> tuple[str, str]:
    customer_id = _object_id(value, "customer", "cus_")
    try:
        lifecycle.validate_customer_id(customer_id)
    except InvalidRequest as exc:
        raise UnusableEvent(exc.message) from None
    name = value.get("name") if isinstance(value, dict) else ""
    return customer_id, name if isinstance(name, str) else ""


@dataclass(frozen=True)
class Item:
    price_id: str
    lookup_key: str
    metered: bool
    period: tuple[datetime, datetime] | None


@dataclass(frozen=True)
class Subscription:
    id: str
    customer_id: str
    customer_name: str
    status: str
    cancel_at_period_end: bool
    items: list[Item] = field(default_factory=list)
    # Where API versions before 2025-03-31 kept the billing period.
    period: tuple[datetime, datetime] | None = None

    def price_keys(self) -> list[tuple[str, str]]:
        """(price id, lookup key) of each item, flat-fee items before metered ones."""
        return [(i.price_id, i.lookup_key) for i in sorted(self.items, key=lambda i: i.metered)]

    def governing_price(self, matched_key: str) -> tuple[str, str]:
        """The (price id, lookup key) that named the plan, else the first."""
        keys = self.price_keys()
        named = (pair for pair in keys if matched_key and matched_key in pair)
        return next(named, keys[0] if keys else ("", ""))

    def billing_period(self, matched_key: str) -> tuple[datetime, datetime] | None:
        """The period of the item whose price named the plan, else of the first item
        that has one, else the subscription's own (older API versions)."""
        named = [i for i in self.items if matched_key and matched_key in (i.price_id, i.lookup_key)]
        return next((i.period for i in [*named, *self.items] if i.period), self.period)


def read_subscription(obj: dict) -> Subscription:
    status = _string(obj.get("status"), "status")
    if not status:
        raise UnusableEvent("the subscription has no status")
    customer_id, customer_name = _customer(obj.get("customer"))
    items_list = obj.get("items") or {}
    raw_items = items_list.get("data") if isinstance(items_list, dict) else None
    if not isinstance(raw_items, list):
        raise UnusableEvent("the subscription has no items list")
    items = []
    for index, raw in enumerate(raw_items):
        if not isinstance(raw, dict):
            raise UnusableEvent(f"subscription item {index} is not an object")
        price = raw.get("price") if isinstance(raw.get("price"), dict) else {}
        old_plan = raw.get("plan") if isinstance(raw.get("plan"), dict) else {}
        price_id = _string(
            price.get("id") or old_plan.get("id") or raw.get("price"), f"item {index} price"
        )
        recurring = price.get("recurring") if isinstance(price.get("recurring"), dict) else {}
        items.append(
            Item(
                price_id=price_id,
                lookup_key=_string(price.get("lookup_key"), f"item {index} lookup_key"),
                metered=(recurring.get("usage_type") or old_plan.get("usage_type")) == "metered",
                period=_period(
                    raw.get("current_period_start"),
                    raw.get("current_period_end"),
                    f"item {index} period",
                ),
            )
        )
    return Subscription(
        id=_object_id(obj.get("id"), "id", "sub_"),
        customer_id=customer_id,
        customer_name=customer_name,
        status=status,
        cancel_at_period_end=obj.get("cancel_at_period_end") is True,
        items=items,
        period=_period(
            obj.get("current_period_start"), obj.get("current_period_end"), "subscription period"
        ),
    )


@dataclass(frozen=True)
class Invoice:
    id: str
    customer_id: str
    subscription_id: str
    billing_reason: str
    new_period: tuple[datetime, datetime] | None


def _line_period(line: Any) -> tuple[datetime, datetime] | None:
    """The period of a subscription line that is not a proration, else None."""
    if not isinstance(line, dict):
        return None
    parent = line.get("parent") if isinstance(line.get("parent"), dict) else {}
    details = parent.get("subscription_item_details")
    if parent.get("type") == "subscription_item_details" and isinstance(details, dict):
        proration = details.get("proration")
    elif line.get("type") == "subscription":  # API versions before 2025-03-31
        proration = line.get("proration")
    else:
        return None
    period = line.get("period") if isinstance(line.get("period"), dict) else {}
    if proration:
        return None
    return _period(period.get("start"), period.get("end"), "invoice line period")


def read_invoice(obj: dict) -> Invoice:
    customer_id, _ = _customer(obj.get("customer"))
    parent = obj.get("parent") if isinstance(obj.get("parent"), dict) else {}
    details = parent.get("subscription_details")
    subscription = details.get("subscription") if isinstance(details, dict) else None
    # Older API versions name it on the invoice itself.
    subscription = subscription or obj.get("subscription")
    lines = obj.get("lines") if isinstance(obj.get("lines"), dict) else {}
    periods = [p for p in map(_line_period, lines.get("data") or []) if p is not None]
    return Invoice(
        id=_object_id(obj.get("id"), "id", "in_"),
        customer_id=customer_id,
        subscription_id=_object_id(subscription, "subscription", "sub_", required=False),
        billing_reason=_string(obj.get("billing_reason"), "billing_reason"),
        # A renewal invoice bills the new period of flat fees in advance and metered
        # usage of the old one in arrears: the latest period is the new one.
        new_period=max(periods) if periods else None,
    )


# --- The subscription mirror and access ---------------------------------------------


def _locked_mirror(subscription_id: str, customer_id: str) -> StripeSubscription:
    mirror, _ = StripeSubscription.objects.select_for_update().get_or_create(
        stripe_id=subscription_id, defaults={"customer_id": customer_id}
    )
    return mirror


def _block_reason(subscriptions: list[StripeSubscription], now: datetime) -> str:
    serviceable = [s for s in subscriptions if s.status in SERVICEABLE]
    if not serviceable:
        latest = max(subscriptions, key=lambda s: s.state_at or datetime.min.replace(tzinfo=UTC))
        return f"subscription {latest.stripe_id} is {latest.status}"
    grace = timedelta(hours=settings.PAYMENT_FAILED_GRACE_HOURS)
    for subscription in serviceable:
        failed_at = subscription.payment_failed_at
        if failed_at is not None and failed_at + grace <= now:
            return (
                f"payment failed {failed_at:%Y-%m-%d %H:%M} UTC "
                f"(invoice {subscription.payment_failed_invoice}); "
                f"{settings.PAYMENT_FAILED_GRACE_HOURS} h grace over"
            )
    return ""


def sync_access(tenant: Tenant, now: datetime) -> str:
    """Suspend or resume the tenant as its subscriptions say, and say what changed.
    A customer we know no subscription of keeps the access an operator gave it."""
    subscriptions = list(
        StripeSubscription.objects.filter(customer_id=tenant.stripe_customer_id).exclude(status="")
    )
    if not subscriptions:
        return ""
    reason = _block_reason(subscriptions, now)
    if reason:
        return f"tenant suspended: {reason}" if lifecycle.suspend(tenant, reason) else ""
    return "tenant resumed" if lifecycle.resume(tenant) else ""


def _record_period(tenant: Tenant, period: tuple[datetime, datetime] | None, now: datetime) -> str:
    """Move the tenant to a newer billing period and roll its billing-cycle budgets."""
    moved = period is not None and lifecycle.record_billing_period(tenant, *period)
    # Rolled even when the period did not move: idempotent, and it heals a period an
    # earlier attempt left behind.
    lifecycle.roll_billing_cycle(tenant, now)
    if not moved:
        return ""
    start, end = period  # type: ignore[misc]
    return f"billing period {start:%Y-%m-%d %H:%M} - {end:%Y-%m-%d %H:%M} UTC"


def _unmapped_warning(price_id: str, lookup_key: str, match: lifecycle.PlanMatch) -> str:
    if match.plan is not None and not match.is_default:
        return ""
    price = f"price {price_id or '(none)'}" + (f" (lookup key {lookup_key})" if lookup_key else "")
    if match.plan is None:
        return f"{price} has no plan and no default plan is set"
    return f"{price} has no plan: the default plan {match.plan.name} applies"


def _join(*notes: str) -> str:
    return "; ".join(note for note in notes if note)[:1000]


def _apply_subscription(event: StripeEvent, now: datetime) -> Outcome:
    subscription = read_subscription(event.object)
    tenant, created = lifecycle.upsert_tenant(subscription.customer_id, subscription.customer_name)
    mirror = _locked_mirror(subscription.id, subscription.customer_id)
    match = lifecycle.plan_for_prices(subscription.price_keys())
    period = subscription.billing_period(match.matched_key)
    notes = ["tenant created" if created else ""]
    warning = ""
    newer = mirror.state_at is None or event.created >= mirror.state_at
    if not newer:
        notes.append(f"older than {mirror.state_event}: plan and status kept")
    elif mirror.status in TERMINAL:
        notes.append(f"subscription already {mirror.status}")
    else:
        price_id, lookup_key = subscription.governing_price(match.matched_key)
        warning = _unmapped_warning(price_id, lookup_key, match)
        mirror.status = subscription.status
        mirror.price_id, mirror.price_lookup_key = price_id, lookup_key
        mirror.plan = match.plan
        mirror.cancel_at_period_end = subscription.cancel_at_period_end
        mirror.state_at, mirror.state_event = event.created, event.stripe_id
        mirror.warning = warning
        if (
            subscription.status in PAID_UP
            and mirror.payment_failed_at is not None
            and event.created > mirror.payment_failed_at
        ):
            mirror.payment_failed_at, mirror.payment_failed_invoice = None, ""
        if match.plan is not None and subscription.status not in TERMINAL:
            notes.append(lifecycle.apply_plan(tenant, match.plan, now))
    if period is not None and (
        mirror.current_period_start is None or period[0] >= mirror.current_period_start
    ):
        mirror.current_period_start, mirror.current_period_end = period
    mirror.save()
    notes.append(_record_period(tenant, period, now))
    notes.append(sync_access(tenant, now))
    if warning:
        log.warning("Stripe event %s: %s", event.stripe_id, warning)
    return Outcome(_join(*notes) or "nothing changed", warning)


# --- Handlers -----------------------------------------------------------------------


def subscription_created(event: StripeEvent, now: datetime) -> Outcome:
    return _apply_subscription(event, now)


def subscription_updated(event: StripeEvent, now: datetime) -> Outcome:
    return _apply_subscription(event, now)


def subscription_paused(event: StripeEvent, now: datetime) -> Outcome:
    return _apply_subscription(event, now)


def subscription_resumed(event: StripeEvent, now: datetime) -> Outcome:
    return _apply_subscription(event, now)


def subscription_deleted(event: StripeEvent, now: datetime) -> Outcome:
    subscription = read_subscription(event.object)
    tenant = lifecycle.locked_tenant(subscription.customer_id)
    mirror = _locked_mirror(subscription.id, subscription.customer_id)
    # The end of a subscription is final, however late its event arrives.
    mirror.status = subscription.status if subscription.status in TERMINAL else "canceled"
    if mirror.state_at is None or event.created >= mirror.state_at:
        mirror.state_at, mirror.state_event = event.created, event.stripe_id
    mirror.save()
    if tenant is None:
        return Outcome(f"no tenant for {subscription.customer_id}; subscription recorded as ended")
    return Outcome(
        _join(f"subscription {subscription.id} {mirror.status}", sync_access(tenant, now))
    )


def invoice_paid(event: StripeEvent, now: datetime) -> Outcome:
    invoice = read_invoice(event.object)
    tenant = lifecycle.locked_tenant(invoice.customer_id)
    if not invoice.subscription_id:
        return Outcome("not a subscription invoice: nothing to do")
    mirror = _locked_mirror(invoice.subscription_id, invoice.customer_id)
    notes = []
    if mirror.last_paid_at is None or event.created >= mirror.last_paid_at:
        mirror.last_paid_at, mirror.last_paid_invoice = event.created, invoice.id
    if mirror.payment_failed_at is not None and (
        mirror.payment_failed_invoice == invoice.id or event.created >= mirror.payment_failed_at
    ):
        mirror.payment_failed_at, mirror.payment_failed_invoice = None, ""
        notes.append("payment failure cleared")
    mirror.save()
    if tenant is None:
        return Outcome(_join(f"no tenant for {invoice.customer_id} yet; payment recorded", *notes))
    if invoice.billing_reason in NEW_PERIOD_REASONS:
        notes.append(_record_period(tenant, invoice.new_period, now))
    notes.append(sync_access(tenant, now))
    return Outcome(_join(f"invoice {invoice.id} paid", *notes))


def invoice_payment_failed(event: StripeEvent, now: datetime) -> Outcome:
    invoice = read_invoice(event.object)
    tenant = lifecycle.locked_tenant(invoice.customer_id)
    if not invoice.subscription_id:
        return Outcome("not a subscription invoice: access unchanged")
    mirror = _locked_mirror(invoice.subscription_id, invoice.customer_id)
    failed_at = event.created
    if mirror.last_paid_invoice == invoice.id:
        note = f"invoice {invoice.id} was paid since: ignored"
    elif mirror.last_paid_at is not None and failed_at <= mirror.last_paid_at:
        note = "older than a later payment: ignored"
    else:
        if mirror.payment_failed_at is None or failed_at < mirror.payment_failed_at:
            mirror.payment_failed_at, mirror.payment_failed_invoice = failed_at, invoice.id
            mirror.save()
        grace_ends = mirror.payment_failed_at + timedelta(  # type: ignore[operator]
            hours=settings.PAYMENT_FAILED_GRACE_HOURS
        )
        note = f"payment failed; suspension from {grace_ends:%Y-%m-%d %H:%M} UTC unless paid"
    if tenant is None:
        return Outcome(_join(note, f"no tenant for {invoice.customer_id} yet"))
    return Outcome(_join(note, sync_access(tenant, now)))


Handler = Callable[[StripeEvent, datetime], Outcome]

HANDLERS: dict[str, Handler] = {
    "customer.subscription.created": subscription_created,
    "customer.subscription.updated": subscription_updated,
    "customer.subscription.paused": subscription_paused,
    "customer.subscription.resumed": subscription_resumed,
    "customer.subscription.deleted": subscription_deleted,
    "invoice.paid": invoice_paid,
    "invoice.payment_failed": invoice_payment_failed,
}
