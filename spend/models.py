"""The spend ledger: one append-only row per captured call. Rows keep the unit prices
they were charged at, so a later price change never rewrites history."""

from __future__ import annotations

from django.db import models
from django.db.models import Q


class SpendEntry(models.Model):
    tenant = models.ForeignKey("budgets.Tenant", on_delete=models.PROTECT, related_name="spend")
    agent = models.ForeignKey(
        "budgets.Agent", null=True, blank=True, on_delete=models.PROTECT, related_name="spend"
    )
    user_key = models.CharField(max_length=128, blank=True)
    request_id = models.CharField(max_length=128, unique=True)
    hold = models.OneToOneField(
        "budgets.Hold", null=True, blank=True, on_delete=models.SET_NULL, related_name="entry"
    )
    model_requested = models.CharField(max_length=100)
    model_used = models.CharField(max_length=100)
    prompt_tokens = models.BigIntegerField()
    completion_tokens = models.BigIntegerField()
    input_price_nanos = models.BigIntegerField(help_text="Nanodollars per input token charged.")
    output_price_nanos = models.BigIntegerField(help_text="Nanodollars per output token charged.")
    cost_nanos = models.BigIntegerField()
    held_nanos = models.BigIntegerField(default=0, help_text="What the hold had set aside.")
    over_hold = models.BooleanField(
        default=False, help_text="The call cost more than its hold (recorded as it happened)."
    )
    usage_estimated = models.BooleanField(
        default=False, help_text="Upstream reported no usage; tokens were counted conservatively."
    )
    latency_ms = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    reported_at = models.DateTimeField(
        null=True, blank=True, help_text="When this row was reported to Stripe."
    )

    class Meta:
        verbose_name_plural = "spend entries"
        indexes = [
            models.Index(fields=["tenant", "created_at"]),
            models.Index(fields=["agent", "created_at"]),
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(cost_nanos__gte=0, prompt_tokens__gte=0, completion_tokens__gte=0),
                name="spend_amounts_nonneg",
            )
        ]

    def __str__(self) -> str:
        return f"{self.request_id}: {self.cost_nanos} nanos"
