"""What the operator console shows, read in a bounded number of queries per page.

Sums are integer nanodollars; the templates turn them into USD strings with nanos_to_usd.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.core.paginator import Page, Paginator
from django.db.models import Count, Exists, OuterRef, Q, QuerySet, Sum

from budgets.models import (
    STATE_SEVERITY,
    Agent,
    ApiKey,
    BudgetEvent,
    BudgetPeriod,
    BudgetPolicy,
    Hold,
    HoldStatus,
    PeriodState,
    ScopeType,
    Tenant,
)
from budgets.money import nanos_to_usd
from spend.models import HourlyRollup, SpendEntry, Spike
from spend.queries import resolve_scope

from .console_spend import between

HOUR = timedelta(hours=1)
PAGE_SIZE = 50
TENANT_STATES = [*PeriodState.values, "suspended"]


def current(now: datetime, prefix: str = "") -> Q:
    """Periods that govern calls at `now` (prefix: the lookup path to the period)."""
    return Q(
        **{
            f"{prefix}closed_at__isnull": True,
            f"{prefix}window_start__lte": now,
            f"{prefix}window_end__gt": now,
        }
    )


def start_of_day(now: datetime) -> datetime:
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def start_of_hour(now: datetime) -> datetime:
    return now.replace(minute=0, second=0, microsecond=0)


def percent(part: int, whole: int) -> int:
    return 0 if whole <= 0 else part * 100 // whole


# --- Overview -----------------------------------------------------------------------


def tenants_by_state(now: datetime) -> dict[str, int]:
    """Tenants counted by their worst current period; suspended tenants apart."""
    counts = dict.fromkeys(TENANT_STATES, 0)
    counts["suspended"] = Tenant.objects.filter(status=Tenant.Status.SUSPENDED).count()
    running = Tenant.objects.exclude(status=Tenant.Status.SUSPENDED).count()
    worst: dict[int, str] = {}
    pairs = (
        BudgetPeriod.objects.filter(current(now))
        .exclude(policy__tenant__status=Tenant.Status.SUSPENDED)
        .exclude(state=PeriodState.ACTIVE)
        .values_list("policy__tenant_id", "state")
        .distinct()
    )
    for tenant_id, state in pairs:
        if STATE_SEVERITY[state] > STATE_SEVERITY[worst.get(tenant_id, PeriodState.ACTIVE)]:
            worst[tenant_id] = state
    for state in worst.values():
        counts[state] += 1
    counts[PeriodState.ACTIVE] = running - len(worst)
    return counts


def spend_today_nanos(now: datetime) -> int:
    total = between(HourlyRollup.objects.all(), start_of_day(now)).aggregate(s=Sum("cost_nanos"))
    return total["s"] or 0


def spend_this_period_nanos(now: datetime) -> int:
    """Spent in the current periods of tenant budgets (agent and user budgets are parts
    of the same spend, so they are not added again)."""
    total = BudgetPeriod.objects.filter(
        current(now), policy__scope_type=ScopeType.TENANT
    ).aggregate(s=Sum("spent_nanos"))
    return total["s"] or 0


@dataclass(frozen=True)
class HoldsInFlight:
    count: int
    amount_nanos: int


def holds_in_flight() -> HoldsInFlight:
    row = Hold.objects.filter(status=HoldStatus.HELD).aggregate(
        n=Count("id"), s=Sum("amount_nanos")
    )
    return HoldsInFlight(row["n"], row["s"] or 0)


@dataclass(frozen=True)
class Spender:
    name: str
    scope_key: str
    spent_nanos: int


def top_spenders(now: datetime, limit: int = 10) -> list[Spender]:
    rows = (
        between(HourlyRollup.objects.all(), start_of_day(now))
        .values("tenant_id")
        .annotate(spent=Sum("cost_nanos"))
        .order_by("-spent", "tenant_id")[:limit]
    )
    spent = {r["tenant_id"]: r["spent"] for r in rows}
    tenants = Tenant.objects.in_bulk(spent)
    return sorted(
        (
            Spender(tenants[pk].name, tenants[pk].stripe_customer_id, nanos)
            for pk, nanos in spent.items()
        ),
        key=lambda s: (-s.spent_nanos, s.name),
    )


def recent_events(limit: int = 20) -> QuerySet[BudgetEvent]:
    return BudgetEvent.objects.select_related("period__policy").order_by("-created_at", "-id")[
        :limit
    ]


def recent_spikes(limit: int = 10) -> QuerySet[Spike]:
    return Spike.objects.select_related("tenant", "agent").order_by("-detected_at", "-id")[:limit]


# --- Budgets ------------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetRow:
    policy: BudgetPolicy
    period: BudgetPeriod | None

    @property
    def limit_nanos(self) -> int:
        return self.period.limit_nanos if self.period else self.policy.limit_nanos

    @property
    def spent_nanos(self) -> int:
        return self.period.spent_nanos if self.period else 0

    @property
    def held_nanos(self) -> int:
        return self.period.held_nanos if self.period else 0

    @property
    def remaining_nanos(self) -> int:
        if self.period:
            return self.period.remaining_nanos
        return self.policy.limit_nanos

    @property
    def state(self) -> str:
        return self.period.state if self.period else PeriodState.ACTIVE

    @property
    def utilization(self) -> int:
        """Percent of the limit spent (over 100 when a hard cap above 1 allows it)."""
        return percent(self.spent_nanos, self.limit_nanos)

    @property
    def bar_width(self) -> int:
        return min(100, self.utilization)


def policies(now: datetime, q: str = "", scope_type: str = "", state: str = "") -> QuerySet:
    found = BudgetPolicy.objects.select_related("tenant").order_by("scope_type", "scope_key")
    if q:
        found = found.filter(scope_key__icontains=q)
    if scope_type:
        found = found.filter(scope_type=scope_type)
    if state:
        periods = BudgetPeriod.objects.filter(current(now), policy=OuterRef("pk"))
        if state == PeriodState.ACTIVE:
            # No period yet this window means nothing spent: active.
            found = found.exclude(Exists(periods.exclude(state=PeriodState.ACTIVE)))
        else:
            found = found.filter(Exists(periods.filter(state=state)))
    return found


def budget_page(
    now: datetime, page: str | int | None, q: str = "", scope_type: str = "", state: str = ""
) -> tuple[Page, list[BudgetRow]]:
    """One page of policies (LIMIT/OFFSET in SQL) and their current periods (one query)."""
    found = Paginator(policies(now, q, scope_type, state), PAGE_SIZE).get_page(page)
    page_policies = list(found.object_list)
    periods = {
        p.policy_id: p
        for p in BudgetPeriod.objects.filter(
            current(now), policy_id__in=[p.pk for p in page_policies]
        ).order_by("window_start")
    }
    return found, [BudgetRow(p, periods.get(p.pk)) for p in page_policies]


# --- Budget detail ------------------------------------------------------------------


def policy_at(scope_type: str, scope_key: str) -> BudgetPolicy | None:
    return (
        BudgetPolicy.objects.select_related("tenant", "agent")
        .filter(scope_type=scope_type, scope_key=scope_key)
        .first()
    )


def current_period(policy: BudgetPolicy, now: datetime) -> BudgetPeriod | None:
    """Read only: a budget without a period this window has not been used yet."""
    return (
        BudgetPeriod.objects.filter(current(now), policy=policy).order_by("-window_start").first()
    )


def past_periods(policy: BudgetPolicy, now: datetime, limit: int = 20) -> QuerySet[BudgetPeriod]:
    return (
        BudgetPeriod.objects.filter(policy=policy)
        .exclude(current(now))
        .order_by("-window_start")[:limit]
    )


def ledger(policy: BudgetPolicy, limit: int = 50) -> QuerySet[SpendEntry]:
    scope = resolve_scope(policy.scope_type, policy.scope_key)
    return scope.entries().select_related("agent").order_by("-created_at", "-id")[:limit]


def policy_events(policy: BudgetPolicy, limit: int = 20) -> QuerySet[BudgetEvent]:
    return BudgetEvent.objects.filter(period__policy=policy).order_by("-created_at", "-id")[:limit]


class InUsd:
    """A read-only view of a row for templates: `x_usd` is the row's `x_nanos` as a USD
    string, anything else is the row's own attribute. Money never becomes a float."""

    def __init__(self, row: object) -> None:
        self._row = row

    def __getattr__(self, name: str):
        if name.endswith("_usd"):
            return nanos_to_usd(getattr(self._row, name[: -len("_usd")] + "_nanos"))
        return getattr(self._row, name)


def in_usd(rows) -> list[InUsd]:
    return [InUsd(row) for row in rows]


# --- Agents -------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentRow:
    agent: Agent
    keys: list[ApiKey]
    spent_today_nanos: int
    velocity_nanos: int  # spent in the last 60 minutes: nanodollars per hour


def agents(q: str = "") -> QuerySet[Agent]:
    found = Agent.objects.select_related("tenant").order_by(
        "tenant__stripe_customer_id", "name", "pk"
    )
    if q:
        found = found.filter(Q(tenant__stripe_customer_id__icontains=q) | Q(name__icontains=q))
    return found


def agent_page(now: datetime, page: str | int | None, q: str = "") -> tuple[Page, list[AgentRow]]:
    """One page of agents (LIMIT/OFFSET in SQL), then their keys, spend today (hourly
    rollups) and velocity (the ledger's last 60 minutes): one query each for the page."""
    found = Paginator(agents(q), PAGE_SIZE).get_page(page)
    page_agents = list(found.object_list)
    ids = [a.pk for a in page_agents]
    keys: dict[int, list[ApiKey]] = {}
    for key in ApiKey.objects.filter(agent_id__in=ids).order_by("-created_at", "-pk"):
        keys.setdefault(key.agent_id, []).append(key)
    today = dict(
        HourlyRollup.objects.filter(agent_id__in=ids, hour__gte=start_of_day(now))
        .values("agent_id")
        .annotate(s=Sum("cost_nanos"))
        .order_by()
        .values_list("agent_id", "s")
    )
    velocity = dict(
        SpendEntry.objects.filter(agent_id__in=ids, created_at__gt=now - HOUR, created_at__lte=now)
        .values("agent_id")
        .annotate(s=Sum("cost_nanos"))
        .order_by()
        .values_list("agent_id", "s")
    )
    rows = [
        AgentRow(a, keys.get(a.pk, []), today.get(a.pk) or 0, velocity.get(a.pk) or 0)
        for a in page_agents
    ]
    return found, rows


def agent_by_id(agent_id) -> Agent | None:
    return Agent.objects.select_related("tenant").filter(pk=agent_id).first()


def key_by_id(key_id) -> ApiKey | None:
    return ApiKey.objects.select_related("agent__tenant").filter(pk=key_id).first()
