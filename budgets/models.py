"""Tenants, agents, keys, plans, policies, periods, holds and budget events.

Money is integer nanodollars in fields ending in _nanos. A period is one row per
(policy, window start): a new window is a new row, never a counter set back to zero.
"""

from __future__ import annotations

from decimal import Decimal

from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator
from django.db import models
from django.db.models import F, Q

MAX_CAP = Decimal("10")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
name_validator = RegexValidator(
    NAME_PATTERN,
    "Use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit.",
)
customer_validator = RegexValidator(
    r"^cus_[A-Za-z0-9]{1,64}$",
    "A Stripe customer id looks like cus_ followed by letters and digits.",
)


class ScopeType(models.TextChoices):
    TENANT = "tenant"
    AGENT = "agent"
    USER = "user"


class Window(models.TextChoices):
    HOUR = "hour"
    DAY = "day"
    WEEK = "week"
    MONTH = "month"
    BILLING_CYCLE = "billing_cycle"


class PeriodState(models.TextChoices):
    ACTIVE = "active"
    WARNED = "warned"
    DEGRADED = "degraded"
    STOPPED = "stopped"


# Worst first: the state of a call governed by several periods is the worst of them.
STATE_SEVERITY = {
    PeriodState.ACTIVE: 0,
    PeriodState.WARNED: 1,
    PeriodState.DEGRADED: 2,
    PeriodState.STOPPED: 3,
}


class EventKind(models.TextChoices):
    WARNED = "warned"
    DEGRADED = "degraded"
    STOPPED = "stopped"
    RESET = "reset"
    RECOVERED = "recovered"


class HoldStatus(models.TextChoices):
    HELD = "held"
    CAPTURED = "captured"
    VOIDED = "voided"
    EXPIRED = "expired"


class Strategy(models.TextChoices):
    """How the gateway picks a model (routing/catalog.py implements them)."""

    INHERIT = "", "inherit"
    AS_REQUESTED = "as-requested"
    COST_OPTIMIZED = "cost-optimized"
    QUALITY = "quality"


class PolicySource(models.TextChoices):
    OPERATOR = "operator", "set by an operator"
    PLAN = "plan", "from the tenant's plan"
    DEFAULT = "default", "from settings"


def validate_thresholds(warn_at: Decimal, soft_cap: Decimal, hard_cap: Decimal) -> None:
    """warn_at <= soft_cap <= hard_cap, all fractions of the limit in (0, 10]."""
    errors: dict[str, str] = {}
    for name, value in (("warn_at", warn_at), ("soft_cap", soft_cap), ("hard_cap", hard_cap)):
        if value is None:
            errors[name] = f"{name} is required."
        elif not (Decimal(0) < value <= MAX_CAP):
            errors[name] = f"{name} must be a fraction of the limit above 0 and at most {MAX_CAP}."
    if not errors:
        if warn_at > soft_cap:
            errors["warn_at"] = "warn_at must not exceed soft_cap."
        if soft_cap > hard_cap:
            errors["soft_cap"] = "soft_cap must not exceed hard_cap."
    if errors:
        raise ValidationError(errors)


class ThresholdsMixin(models.Model):
    """Limit, window and thresholds shared by a policy and the plan it may come from."""

    limit_nanos = models.BigIntegerField(help_text="Budget per window, in nanodollars.")
    window = models.CharField(max_length=16, choices=Window.choices, default=Window.DAY)
    warn_at = models.DecimalField(max_digits=6, decimal_places=4, default=Decimal("0.5"))
    soft_cap = models.DecimalField(max_digits=6, decimal_places=4, default=Decimal("0.8"))
    hard_cap = models.DecimalField(max_digits=6, decimal_places=4, default=Decimal("1.0"))

    class Meta:
        abstract = True

    def clean(self) -> None:
        super().clean()
        errors: dict[str, str] = {}
        if self.limit_nanos is not None and self.limit_nanos <= 0:
            errors["limit_nanos"] = "The limit must be a positive amount."
        if self.window not in Window.values:
            errors["window"] = (
                f"Unknown window {self.window!r}; use one of {', '.join(Window.values)}."
            )
        try:
            validate_thresholds(self.warn_at, self.soft_cap, self.hard_cap)
        except ValidationError as exc:
            errors.update({k: v[0] for k, v in exc.message_dict.items()})
        if errors:
            raise ValidationError(errors)


def _threshold_constraints(prefix: str) -> list[models.CheckConstraint]:
    return [
        models.CheckConstraint(condition=Q(limit_nanos__gt=0), name=f"{prefix}_limit_positive"),
        models.CheckConstraint(
            condition=Q(warn_at__gt=0, warn_at__lte=F("soft_cap"), soft_cap__lte=F("hard_cap"))
            & Q(hard_cap__lte=MAX_CAP),
            name=f"{prefix}_thresholds_ordered",
        ),
        models.CheckConstraint(
            condition=Q(window__in=Window.values), name=f"{prefix}_window_known"
        ),
    ]


class Plan(ThresholdsMixin):
    """A budget template a tenant's Stripe price maps to."""

    name = models.CharField(max_length=100, unique=True)
    stripe_price = models.CharField(
        max_length=200, blank=True, help_text="Stripe price id (price_...) or lookup key."
    )
    is_default = models.BooleanField(
        default=False, help_text="Used for subscriptions whose price has no plan."
    )
    strategy = models.CharField(
        max_length=16, choices=Strategy.choices, blank=True, help_text="Routing strategy."
    )
    velocity_limit_nanos = models.BigIntegerField(
        null=True, blank=True, help_text="Spend per rolling hour, per agent, that is a runaway."
    )
    auto_pause = models.BooleanField(
        default=False, help_text="Pause an agent whose spend velocity crosses the limit."
    )
    disabled_tools = models.JSONField(
        default=list, blank=True, help_text="Tool names removed from requests when degraded."
    )

    class Meta:
        constraints = [
            *_threshold_constraints("plan"),
            models.UniqueConstraint(
                fields=["stripe_price"], condition=~Q(stripe_price=""), name="plan_price_unique"
            ),
            models.UniqueConstraint(
                fields=["is_default"], condition=Q(is_default=True), name="plan_one_default"
            ),
        ]

    def __str__(self) -> str:
        return self.name


class Tenant(models.Model):
    class Status(models.TextChoices):
        ACTIVE = "active"
        SUSPENDED = "suspended"

    name = models.CharField(max_length=200)
    stripe_customer_id = models.CharField(
        max_length=80, unique=True, validators=[customer_validator]
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    status_reason = models.CharField(max_length=200, blank=True)
    plan = models.ForeignKey(Plan, null=True, blank=True, on_delete=models.PROTECT)
    billing_period_start = models.DateTimeField(null=True, blank=True)
    billing_period_end = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=Q(billing_period_start__isnull=True)
                | Q(billing_period_end__gt=F("billing_period_start")),
                name="tenant_billing_period_ordered",
            )
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.stripe_customer_id})"


class Agent(models.Model):
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="agents")
    name = models.CharField(max_length=64, validators=[name_validator])
    paused = models.BooleanField(default=False)
    paused_reason = models.CharField(max_length=200, blank=True)
    paused_at = models.DateTimeField(null=True, blank=True)
    strategy = models.CharField(
        max_length=16,
        choices=Strategy.choices,
        blank=True,
        help_text="Empty: the policies' choice.",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "name"], name="agent_name_unique_in_tenant")
        ]

    def __str__(self) -> str:
        return f"{self.name} @ {self.tenant.stripe_customer_id}"


class ApiKey(models.Model):
    """An agent's key. Only its SHA-256 is stored; the key itself is shown once."""

    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="keys")
    key_id = models.CharField(max_length=16, unique=True, editable=False)
    key_hash = models.CharField(max_length=64, editable=False)
    label = models.CharField(max_length=100, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.agent.name})"

    @property
    def prefix(self) -> str:
        return f"sgk_{self.key_id}"


class BudgetPolicy(ThresholdsMixin):
    """A limit on one scope: a tenant, one of its agents, or one of its end users."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="policies")
    agent = models.ForeignKey(
        Agent, null=True, blank=True, on_delete=models.CASCADE, related_name="policies"
    )
    user_key = models.CharField(max_length=128, blank=True)
    scope_type = models.CharField(max_length=8, choices=ScopeType.choices)
    scope_key = models.CharField(max_length=200, editable=False)
    disabled_tools = models.JSONField(
        default=list, blank=True, help_text="Tool names removed from requests when degraded."
    )
    enabled = models.BooleanField(default=True)
    strategy = models.CharField(
        max_length=16, choices=Strategy.choices, blank=True, help_text="Empty: as requested."
    )
    velocity_limit_nanos = models.BigIntegerField(
        null=True,
        blank=True,
        help_text="Spend per rolling hour, per agent, that is a runaway (on a tenant policy: "
        "each of its agents).",
    )
    auto_pause = models.BooleanField(
        default=False, help_text="Pause an agent whose spend velocity crosses the limit."
    )
    source = models.CharField(
        max_length=16, choices=PolicySource.choices, default=PolicySource.OPERATOR
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "budget policies"
        constraints = [
            *_threshold_constraints("policy"),
            models.UniqueConstraint(fields=["scope_type", "scope_key"], name="policy_scope_unique"),
            models.CheckConstraint(
                condition=(Q(scope_type=ScopeType.TENANT, agent__isnull=True, user_key=""))
                | Q(scope_type=ScopeType.AGENT, agent__isnull=False, user_key="")
                | (Q(scope_type=ScopeType.USER, agent__isnull=True) & ~Q(user_key="")),
                name="policy_scope_consistent",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.scope_type}:{self.scope_key}"


class BudgetPeriod(models.Model):
    """Spend of one policy in one window. Thresholds are copied from the policy when the
    period opens (and when the policy changes), so the hold check is one row's business."""

    policy = models.ForeignKey(BudgetPolicy, on_delete=models.CASCADE, related_name="periods")
    window_start = models.DateTimeField()
    window_end = models.DateTimeField()
    limit_nanos = models.BigIntegerField()
    warn_nanos = models.BigIntegerField()
    soft_nanos = models.BigIntegerField()
    hard_nanos = models.BigIntegerField()
    spent_nanos = models.BigIntegerField(default=0)
    held_nanos = models.BigIntegerField(default=0)
    state = models.CharField(max_length=16, choices=PeriodState.choices, default=PeriodState.ACTIVE)
    closed_at = models.DateTimeField(null=True, blank=True, help_text="Set when reset early.")
    close_reason = models.CharField(max_length=500, blank=True)
    closed_by = models.CharField(max_length=150, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["policy", "window_start"], name="period_window_unique"),
            models.CheckConstraint(
                condition=Q(spent_nanos__gte=0, held_nanos__gte=0), name="period_amounts_nonneg"
            ),
            models.CheckConstraint(
                condition=Q(window_end__gt=F("window_start")), name="period_window_ordered"
            ),
        ]
        indexes = [models.Index(fields=["policy", "window_end"])]

    def __str__(self) -> str:
        return f"{self.policy} from {self.window_start:%Y-%m-%d %H:%M}"

    @property
    def closed_early(self) -> bool:
        return self.closed_at is not None

    @property
    def remaining_nanos(self) -> int:
        return max(0, self.hard_nanos - self.spent_nanos - self.held_nanos)

    @property
    def ends_at(self):
        return self.closed_at or self.window_end


class Hold(models.Model):
    """An authorization: budget set aside for one call until it is captured or voided."""

    request_id = models.CharField(max_length=128, unique=True)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="holds")
    agent = models.ForeignKey(Agent, null=True, blank=True, on_delete=models.SET_NULL)
    user_key = models.CharField(max_length=128, blank=True)
    model = models.CharField(max_length=100)
    input_price_nanos = models.BigIntegerField()
    output_price_nanos = models.BigIntegerField()
    input_tokens = models.BigIntegerField()
    max_output_tokens = models.BigIntegerField()
    amount_nanos = models.BigIntegerField()
    status = models.CharField(max_length=16, choices=HoldStatus.choices, default=HoldStatus.HELD)
    expires_at = models.DateTimeField()
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # Marks the holds one expiry batch claimed, so their lines can be summed in SQL.
    release_token = models.UUIDField(null=True, blank=True, db_index=True, editable=False)
    periods = models.ManyToManyField(BudgetPeriod, through="HoldLine", related_name="holds")

    class Meta:
        indexes = [models.Index(fields=["status", "expires_at"])]
        constraints = [
            models.CheckConstraint(condition=Q(amount_nanos__gte=0), name="hold_amount_nonneg")
        ]

    def __str__(self) -> str:
        return f"hold {self.request_id} ({self.status})"


class HoldLine(models.Model):
    """The amount one hold sets aside on one period."""

    hold = models.ForeignKey(Hold, on_delete=models.CASCADE, related_name="lines")
    period = models.ForeignKey(BudgetPeriod, on_delete=models.CASCADE, related_name="hold_lines")
    amount_nanos = models.BigIntegerField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["hold", "period"], name="holdline_unique")]

    def __str__(self) -> str:
        return f"{self.amount_nanos} nanos on period {self.period_id}"


class BudgetEvent(models.Model):
    """A threshold crossing or reset, recorded at most once per kind per period."""

    period = models.ForeignKey(BudgetPeriod, on_delete=models.CASCADE, related_name="events")
    kind = models.CharField(max_length=16, choices=EventKind.choices)
    spent_nanos = models.BigIntegerField()
    limit_nanos = models.BigIntegerField()
    detail = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["period", "kind"], name="event_once_per_period")
        ]

    def __str__(self) -> str:
        return f"{self.kind} on {self.period}"
