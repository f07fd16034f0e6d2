"""Stripe's events as received, and what we know of each subscription from them.

Every verified event is stored once by its id, with its payload and what handling it
did. Subscriptions are mirrored so a late or replayed event can be compared with the
newest state already applied, and so access (suspend or resume) is decided from every
subscription of a customer, not from the last event alone.
"""

from __future__ import annotations

from django.db import models


class EventStatus(models.TextChoices):
    RECEIVED = "received", "received, not handled yet"
    PROCESSED = "processed"
    IGNORED = "ignored", "ignored (no handler for this type)"
    REJECTED = "rejected", "rejected (the object lacks what its handler needs)"
    FAILED = "failed", "failed (Stripe will retry)"


DONE_STATUSES = (EventStatus.PROCESSED, EventStatus.IGNORED)


class StripeEvent(models.Model):
    stripe_id = models.CharField("event id", max_length=255, unique=True)
    type = models.CharField(max_length=100, db_index=True)
    api_version = models.CharField(max_length=40, blank=True)
    livemode = models.BooleanField(default=False)
    created = models.DateTimeField(help_text="When Stripe created the event.")
    customer_id = models.CharField(max_length=255, blank=True, db_index=True)
    payload = models.JSONField()
    status = models.CharField(
        max_length=16, choices=EventStatus.choices, default=EventStatus.RECEIVED, db_index=True
    )
    attempts = models.PositiveIntegerField(default=0)
    note = models.CharField(max_length=1000, blank=True, help_text="What handling it did.")
    warning = models.CharField(
        max_length=500, blank=True, help_text="Something an operator should look at."
    )
    error = models.TextField(blank=True)
    received_at = models.DateTimeField(auto_now_add=True, db_index=True)
    handled_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-received_at"]

    def __str__(self) -> str:
        return f"{self.type} {self.stripe_id} ({self.status})"

    @property
    def object(self) -> dict:
        return self.payload["data"]["object"]


class StripeSubscription(models.Model):
    """The newest state of one Stripe subscription that events have shown us."""

    stripe_id = models.CharField("subscription id", max_length=255, unique=True)
    customer_id = models.CharField(max_length=255, db_index=True)
    status = models.CharField(
        max_length=32, blank=True, help_text="Stripe's status; empty until a subscription event."
    )
    price_id = models.CharField(max_length=255, blank=True)
    price_lookup_key = models.CharField(max_length=255, blank=True)
    plan = models.ForeignKey(
        "budgets.Plan", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    current_period_start = models.DateTimeField(null=True, blank=True)
    current_period_end = models.DateTimeField(null=True, blank=True)
    cancel_at_period_end = models.BooleanField(default=False)
    state_at = models.DateTimeField(
        null=True, blank=True, help_text="Creation time of the newest event applied."
    )
    state_event = models.CharField(max_length=255, blank=True)
    payment_failed_at = models.DateTimeField(
        null=True, blank=True, help_text="First failed payment not yet followed by a payment."
    )
    payment_failed_invoice = models.CharField(max_length=255, blank=True)
    last_paid_at = models.DateTimeField(null=True, blank=True)
    last_paid_invoice = models.CharField(max_length=255, blank=True)
    warning = models.CharField(max_length=500, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.stripe_id} ({self.status or 'unknown'})"
