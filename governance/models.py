"""Alert channels and the log of alerts delivered through them.

A channel is a webhook URL or an email address, for one tenant or (tenant empty) for
all. Each budget event and spike becomes one delivery row per channel that wants it;
the row is the outbox: governance/alerts.py sends it, retries it with backoff and
records the outcome on it.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from django.core.exceptions import ValidationError
from django.core.validators import URLValidator, validate_email
from django.db import models
from django.db.models import Q


class AlertKind(models.TextChoices):
    WARNED = "warned", "budget warned"
    DEGRADED = "degraded", "budget degraded"
    STOPPED = "stopped", "budget stopped"
    RESET = "reset", "budget reset"
    RECOVERED = "recovered", "budget recovered"
    SPIKE = "spike", "spend spike"


def default_kinds() -> list[str]:
    # A reset happens every window for every tenant: on by default it would drown the rest.
    return [kind for kind in AlertKind.values if kind != AlertKind.RESET]


class AlertChannel(models.Model):
    class Type(models.TextChoices):
        WEBHOOK = "webhook"
        EMAIL = "email"

    class Format(models.TextChoices):
        AUTO = "auto", "auto (Slack for hooks.slack.com, JSON otherwise)"
        SLACK = "slack", 'Slack ({"text": ...})'
        JSON = "json", "JSON"

    name = models.CharField(max_length=100)
    tenant = models.ForeignKey(
        "budgets.Tenant",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="alert_channels",
        help_text="Empty: alerts of every tenant.",
    )
    type = models.CharField(max_length=16, choices=Type.choices)
    target = models.CharField(
        max_length=500, help_text="The webhook's http(s) URL, or the email address."
    )
    format = models.CharField(
        max_length=8,
        choices=Format.choices,
        default=Format.AUTO,
        help_text="Body of webhook alerts (ignored for email).",
    )
    kinds = models.JSONField(default=default_kinds, help_text="Alert kinds this channel gets.")
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=Q(type__in=["webhook", "email"]), name="alert_channel_type_known"
            )
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def destination(self) -> str:
        """Where alerts go, without a webhook's path: Slack and others put secrets there."""
        if self.type == self.Type.WEBHOOK:
            return urlsplit(self.target).netloc
        return self.target

    def clean(self) -> None:
        super().clean()
        errors: dict[str, str] = {}
        self.target = (self.target or "").strip()
        if self.type == self.Type.WEBHOOK:
            try:
                URLValidator(schemes=["http", "https"])(self.target)
            except ValidationError:
                errors["target"] = "A webhook channel needs an http:// or https:// URL."
        elif self.type == self.Type.EMAIL:
            try:
                validate_email(self.target)
            except ValidationError:
                errors["target"] = "An email channel needs a valid email address."
        else:
            errors["type"] = "Choose webhook or email."
        kinds = self.kinds
        if (
            not isinstance(kinds, list)
            or not kinds
            or any(kind not in AlertKind.values for kind in kinds)
        ):
            errors["kinds"] = f"Choose one or more of: {', '.join(AlertKind.values)}."
        if errors:
            raise ValidationError(errors)


class AlertDelivery(models.Model):
    """One alert (a budget event or a spike) for one channel, and how sending it went."""

    class Source(models.TextChoices):
        BUDGET_EVENT = "budget_event", "budget event"
        SPIKE = "spike"

    class Status(models.TextChoices):
        PENDING = "pending"
        SENT = "sent"
        FAILED = "failed", "failed (gave up)"

    channel = models.ForeignKey(AlertChannel, on_delete=models.CASCADE, related_name="deliveries")
    source_type = models.CharField(max_length=16, choices=Source.choices)
    source_id = models.BigIntegerField()
    tenant = models.ForeignKey(
        "budgets.Tenant", on_delete=models.CASCADE, related_name="alert_deliveries"
    )
    kind = models.CharField(max_length=16, choices=AlertKind.choices)
    # The alert as it was when its source was seen: what was (or will be) sent.
    payload = models.JSONField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField()
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name_plural = "alert deliveries"
        constraints = [
            models.UniqueConstraint(
                fields=["channel", "source_type", "source_id"], name="alert_once_per_channel"
            )
        ]
        indexes = [models.Index(fields=["status", "next_attempt_at"])]

    def __str__(self) -> str:
        return f"{self.kind} alert {self.source_type}:{self.source_id} via {self.channel}"
