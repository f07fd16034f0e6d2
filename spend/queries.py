"""Reading spend for one scope: totals, the spend rate and a projection to the end of
the period, ledger history, and detected spikes. Plain functions over integer nanodollars."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.db.models import QuerySet, Sum

from budgets import engine
from budgets.errors import InvalidRequest, ScopeNotFound
from budgets.models import Agent, BudgetPeriod, ScopeType, Tenant

from .models import SpendEntry, Spike

HOUR = timedelta(hours=1)


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


def spikes(scope: SpendScope, since: datetime) -> QuerySet[Spike]:
    """Spikes stored by the periodic detection (spend.spikes.detect) in hours from
    `since`, newest first. A tenant's include its agents'; detection watches tenants and
    agents, so an end user has none of its own."""
    rows = Spike.objects.select_related("tenant", "agent").filter(hour__gte=since)
    if scope.scope_type == ScopeType.AGENT:
        rows = rows.filter(agent=scope.agent)
    elif scope.scope_type == ScopeType.TENANT:
        rows = rows.filter(tenant=scope.tenant)
    else:
        rows = rows.none()
    return rows.order_by("-hour", "-id")


def hours_back(now: datetime, hours: int) -> datetime:
    """The start of the UTC hour `hours - 1` hours before the current one: the last
    `hours` hours, the current one included."""
    return now.astimezone(UTC).replace(minute=0, second=0, microsecond=0) - (hours - 1) * HOUR
