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
    meter_report = models.ForeignKey(
        "MeterReport",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="entries",
        help_text="The Stripe meter event this row's spend was claimed for.",
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


class MeterUnit(models.TextChoices):
    MICRO_USD = "micro_usd", "micro-USD (0.000001 USD)"
    MILLI_USD = "milli_usd", "milli-USD (0.001 USD)"
    CENTS = "cents", "US cents"
    TOKENS = "tokens", "tokens (prompt + completion)"


class MeterAccount(models.Model):
    """Running totals of one tenant's usage claimed for one Stripe meter and unit. Whole
    units are reported; what is left under one unit carries to the next report, so the
    units reported always equal floor(claimed amount / unit)."""

    tenant = models.ForeignKey(
        "budgets.Tenant", on_delete=models.PROTECT, related_name="meter_accounts"
    )
    event_name = models.CharField(max_length=100)
    unit = models.CharField(max_length=16, choices=MeterUnit.choices)
    claimed_amount = models.BigIntegerField(
        default=0, help_text="Nanodollars (tokens for the tokens unit) of every row claimed."
    )
    claimed_units = models.BigIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "event_name", "unit"], name="meter_account_unique"
            ),
            models.CheckConstraint(
                condition=Q(claimed_amount__gte=0, claimed_units__gte=0),
                name="meter_account_nonneg",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.event_name} ({self.unit})"


class MeterReport(models.Model):
    """One Stripe meter event: a batch of one tenant's ledger rows, in whole units. Its
    identifier is fixed when the batch is claimed, so sending it again is a no-op at
    Stripe; its rows are marked reported only once Stripe has accepted it."""

    class Status(models.TextChoices):
        PENDING = "pending"
        REPORTED = "reported"

    tenant = models.ForeignKey(
        "budgets.Tenant", on_delete=models.PROTECT, related_name="meter_reports"
    )
    stripe_customer_id = models.CharField(max_length=80)
    event_name = models.CharField(max_length=100)
    unit = models.CharField(max_length=16, choices=MeterUnit.choices)
    identifier = models.CharField(max_length=100, unique=True)
    amount = models.BigIntegerField(
        help_text="Nanodollars (tokens for the tokens unit) of the rows in this batch."
    )
    value = models.BigIntegerField(help_text="Whole units sent to Stripe.")
    timestamp = models.DateTimeField(help_text="The meter event's time.")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField()
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    reported_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["status", "next_attempt_at"])]
        constraints = [
            models.CheckConstraint(
                condition=Q(amount__gte=0, value__gte=0), name="meter_report_nonneg"
            )
        ]

    def __str__(self) -> str:
        return f"{self.identifier}: {self.value} {self.unit} ({self.status})"


class HourlyRollup(models.Model):
    """Ledger spend summed per hour, tenant, agent and model: what the console and the
    spend API read for any range, so they never scan the raw ledger. Recomputed from the
    ledger for recent hours, so running the rollup twice changes nothing."""

    hour = models.DateTimeField()
    tenant = models.ForeignKey("budgets.Tenant", on_delete=models.CASCADE, related_name="rollups")
    agent = models.ForeignKey(
        "budgets.Agent", null=True, blank=True, on_delete=models.CASCADE, related_name="rollups"
    )
    model = models.CharField(max_length=100)
    calls = models.BigIntegerField()
    prompt_tokens = models.BigIntegerField()
    completion_tokens = models.BigIntegerField()
    cost_nanos = models.BigIntegerField()

    class Meta:
        # Two partial constraints: NULLs are distinct in a plain one (and SQLite has no
        # NULLS NOT DISTINCT).
        constraints = [
            models.UniqueConstraint(
                fields=["hour", "tenant", "agent", "model"],
                condition=Q(agent__isnull=False),
                name="rollup_agent_bucket_unique",
            ),
            models.UniqueConstraint(
                fields=["hour", "tenant", "model"],
                condition=Q(agent__isnull=True),
                name="rollup_tenant_bucket_unique",
            ),
        ]
        indexes = [models.Index(fields=["tenant", "hour"]), models.Index(fields=["agent", "hour"])]

    def __str__(self) -> str:
        return f"{self.hour:%Y-%m-%d %H:00} {self.tenant_id}/{self.agent_id}/{self.model}"


class Spike(models.Model):
    """Spend far above a scope's own recent baseline, or over its velocity limit."""

    class Kind(models.TextChoices):
        ANOMALY = "anomaly", "far above its recent baseline"
        VELOCITY = "velocity", "over its USD-per-hour limit"

    scope_type = models.CharField(max_length=8)  # tenant or agent
    tenant = models.ForeignKey("budgets.Tenant", on_delete=models.CASCADE, related_name="spikes")
    agent = models.ForeignKey(
        "budgets.Agent", null=True, blank=True, on_delete=models.CASCADE, related_name="spikes"
    )
    kind = models.CharField(max_length=16, choices=Kind.choices)
    hour = models.DateTimeField(help_text="The hour (UTC) the spike was seen in.")
    spend_nanos = models.BigIntegerField(help_text="Spend in the measured hour.")
    baseline_nanos = models.BigIntegerField(help_text="Mean hourly spend before it.")
    threshold_nanos = models.BigIntegerField(help_text="What counted as a spike.")
    agent_paused = models.BooleanField(default=False, help_text="The agent was paused for it.")
    detected_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "agent", "kind", "hour"],
                condition=Q(agent__isnull=False),
                name="agent_spike_once_per_hour",
            ),
            models.UniqueConstraint(
                fields=["tenant", "kind", "hour"],
                condition=Q(agent__isnull=True),
                name="tenant_spike_once_per_hour",
            ),
        ]

    def __str__(self) -> str:
        who = self.agent.name if self.agent_id else self.tenant.stripe_customer_id
        return f"{self.kind} spike of {who} at {self.hour:%Y-%m-%d %H:00}"
