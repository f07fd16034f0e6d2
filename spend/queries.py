"""Reading the ledger for one scope: totals, the spend rate and a projection to the end
of the period, history, and hourly spikes. Plain functions over integer nanodollars."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_FLOOR, Decimal

from django.db.models import QuerySet, Sum
from django.db.models.functions import TruncHour

from budgets import engine
from budgets.errors import GovernanceError, InvalidRequest
from budgets.models import Agent, BudgetPeriod, ScopeType, Tenant

from .models import SpendEntry

HOUR = timedelta(hours=1)
# Spikes: an hour is compared with the hours just before it.
BASELINE_HOURS = 24
SPIKE_SIGMAS = 3


class ScopeNotFound(GovernanceError):
    """No such tenant, agent or budget, or one the caller may not see."""

    code = "not_found"


def check_scope_type(scope_type: str) -> str:
    if scope_type not in ScopeType.values:
        raise InvalidRequest(
            f"unknown scope type {scope_type!r}; use one of {', '.join(ScopeType.values)}",
            {"fields": {"scope_type": [f"use one of {', '.join(ScopeType.values)}"]}},
        )
    return scope_type


# --- Scopes -------------------------------------------------------------------------


@dataclass(frozen=True)
class SpendScope:
    """Whose spend: a tenant, one of its agents, or one of its end users."""

    scope_type: str
    scope_key: str
    tenant: Tenant
    agent: Agent | None = None
    user_key: str = ""

    def entries(self) -> QuerySet[SpendEntry]:
        if self.scope_type == ScopeType.AGENT:
            return SpendEntry.objects.filter(agent=self.agent)
        if self.scope_type == ScopeType.USER:
            return SpendEntry.objects.filter(tenant=self.tenant, user_key=self.user_key)
        return SpendEntry.objects.filter(tenant=self.tenant)


def resolve_scope(scope_type: str, scope_key: str, within: Tenant | None = None) -> SpendScope:
    """The scope a key names ("cus_acme", "cus_acme:invoice-bot", "cus_acme:user-42").
    With `within`, another tenant's scope is not found, exactly like a missing one."""
    check_scope_type(scope_type)
    customer_id, _, rest = scope_key.partition(":")
    missing = ScopeNotFound(f"no {scope_type} {scope_key!r}")
    if (scope_type == ScopeType.TENANT) == bool(rest):
        raise missing
    tenant = Tenant.objects.filter(stripe_customer_id=customer_id).first()
    if tenant is None or (within is not None and tenant.pk != within.pk):
        raise missing
    if scope_type == ScopeType.AGENT:
        agent = tenant.agents.filter(name=rest).first()
        if agent is None:
            raise missing
        agent.tenant = tenant
        return SpendScope(scope_type, scope_key, tenant, agent=agent)
    if scope_type == ScopeType.USER:
        return SpendScope(scope_type, scope_key, tenant, user_key=engine.validate_user_key(rest))
    return SpendScope(scope_type, scope_key, tenant)


def current_period(scope: SpendScope, now: datetime) -> BudgetPeriod | None:
    """The period of the scope's own budget that governs calls now (the default budget
    from settings or the plan if the scope has none), or None when no budget applies."""
    state = engine.state_of(scope.tenant, scope.agent, scope.user_key, now)
    return next(
        (
            p
            for p in state.periods
            if p.policy.scope_type == scope.scope_type and p.policy.scope_key == scope.scope_key
        ),
        None,
    )


# --- Totals, rate and projection ------------------------------------------------------


@dataclass(frozen=True)
class SpendRate:
    hours: int
    since: datetime
    spent_nanos: int

    @property
    def nanos_per_hour(self) -> int:
        """Rounded down to a nanodollar."""
        return self.spent_nanos // self.hours


@dataclass(frozen=True)
class Projection:
    period_end: datetime
    spend_nanos: int  # committed spend at period end if the rate holds
    exceeds_hard_cap: bool
    stop_at: datetime | None  # when spend reaches the hard cap at this rate, if in the period


@dataclass(frozen=True)
class SpendSummary:
    scope: SpendScope
    as_of: datetime
    period: BudgetPeriod | None
    rate: SpendRate
    projection: Projection | None


def spend_rate(scope: SpendScope, now: datetime, hours: int) -> SpendRate:
    since = now - hours * HOUR
    total = (
        scope.entries()
        .filter(created_at__gt=since, created_at__lte=now)
        .aggregate(total=Sum("cost_nanos"))["total"]
    )
    return SpendRate(hours, since, total or 0)


def project(period: BudgetPeriod, rate: SpendRate, now: datetime) -> Projection:
    """Spent so far plus the rate carried on to the end of the period (integer
    arithmetic, rounded down), and when the hard cap would be reached."""
    rate_seconds = rate.hours * 3600
    left = max(0, (period.window_end - now) // timedelta(seconds=1))
    spent = period.spent_nanos
    projected = spent + rate.spent_nanos * left // rate_seconds
    stop_at = None
    if rate.spent_nanos > 0 and spent < period.hard_nanos:
        seconds = -(-(period.hard_nanos - spent) * rate_seconds // rate.spent_nanos)
        if seconds <= left:
            stop_at = now + timedelta(seconds=seconds)
    return Projection(period.window_end, projected, projected >= period.hard_nanos, stop_at)


def spend_summary(scope: SpendScope, now: datetime, rate_hours: int = 1) -> SpendSummary:
    period = current_period(scope, now)
    rate = spend_rate(scope, now, rate_hours)
    return SpendSummary(
        scope, now, period, rate, project(period, rate, now) if period is not None else None
    )


# --- History ------------------------------------------------------------------------


def history(
    scope: SpendScope,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    model: str = "",
    agent: str = "",
) -> QuerySet[SpendEntry]:
    """Ledger rows of the scope, newest first: created in [since, until), charged for
    `model`, made by the agent named `agent`."""
    entries = scope.entries().select_related("tenant", "agent")
    if since is not None:
        entries = entries.filter(created_at__gte=since)
    if until is not None:
        entries = entries.filter(created_at__lt=until)
    if model:
        entries = entries.filter(model_used=model)
    if agent:
        entries = entries.filter(agent__name=agent)
    return entries.order_by("-created_at", "-id")


# --- Spikes -------------------------------------------------------------------------


@dataclass(frozen=True)
class Spike:
    hour_start: datetime
    spent_nanos: int
    baseline_mean_nanos: int
    baseline_stdev_nanos: int
    threshold_nanos: int

    @property
    def hour_end(self) -> datetime:
        return self.hour_start + HOUR


def _floor(value: Decimal) -> int:
    return int(value.to_integral_value(rounding=ROUND_FLOOR))


def find_spikes(
    buckets: Sequence[tuple[datetime, int]],
    *,
    baseline_hours: int = BASELINE_HOURS,
    floor_nanos: int = 0,
    sigmas: int = SPIKE_SIGMAS,
) -> list[Spike]:
    """Hours (after the first `baseline_hours`) whose spend exceeds
    max(mean + sigmas * population stdev of the `baseline_hours` before it, floor).
    Computed in Decimal: no float touches the amounts."""
    spikes = []
    for index in range(baseline_hours, len(buckets)):
        hour, spent = buckets[index]
        trailing = [Decimal(n) for _, n in buckets[index - baseline_hours : index]]
        mean = statistics.mean(trailing)
        stdev = statistics.pstdev(trailing, mean)
        threshold = max(mean + sigmas * stdev, Decimal(floor_nanos))
        if spent > threshold:
            spikes.append(Spike(hour, spent, _floor(mean), _floor(stdev), _floor(threshold)))
    return spikes


def hourly_spend(scope: SpendScope, start: datetime, end: datetime) -> list[tuple[datetime, int]]:
    """Spend of each UTC hour in [start, end), zero for hours without any."""
    rows = (
        scope.entries()
        .filter(created_at__gte=start, created_at__lt=end)
        .annotate(hour=TruncHour("created_at", tzinfo=UTC))
        .values("hour")
        .annotate(total=Sum("cost_nanos"))
        .order_by("hour")
    )
    totals = {row["hour"]: row["total"] for row in rows}
    buckets = []
    hour = start
    while hour < end:
        buckets.append((hour, totals.get(hour, 0)))
        hour += HOUR
    return buckets


def detect_spikes(
    scope: SpendScope, now: datetime, *, hours: int = 24, floor_nanos: int = 0
) -> list[Spike]:
    """Spikes among the last `hours` UTC hours, the current (partial) one included,
    each measured against the BASELINE_HOURS before it."""
    end = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0) + HOUR
    start = end - (hours + BASELINE_HOURS) * HOUR
    buckets = hourly_spend(scope, start, end)
    return find_spikes(buckets, baseline_hours=BASELINE_HOURS, floor_nanos=floor_nanos)
