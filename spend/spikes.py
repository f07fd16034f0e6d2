"""Runaway detection: spend far above a scope's own baseline, and velocity limits.

Method. Every run looks at the last 60 minutes of spend (from the ledger, so a runaway
shows within minutes, not at the end of the hour) for each agent and each tenant that
spent anything in it, and compares it with that scope's hourly spend over the 24 full
hours before (from the hourly rollups, hours without spend counting as zero):

- anomaly: recent spend > mean + SPIKE_SIGMAS x standard deviation of those hours, and
  > SPIKE_MIN_RATIO x the mean, and > SPIKE_MIN_USD_PER_HOUR (so a quiet agent's first
  few cents are not a spike);
- velocity: an agent's recent spend > the velocity limit of its agent policy, or of its
  tenant policy (per agent). With `auto_pause` on that policy the agent is paused: the
  gateway refuses it with 403 agent_paused until an operator resumes it.

Each spike is stored once per scope, kind and hour.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Sum
from django.utils import timezone

from budgets import services
from budgets.models import Agent, BudgetPolicy, ScopeType
from budgets.money import nanos_to_usd

from .models import HourlyRollup, SpendEntry, Spike

WINDOW = timedelta(hours=1)
BASELINE_HOURS = 24


@dataclass(frozen=True)
class Baseline:
    mean: float
    deviation: float

    def threshold(self) -> int:
        sigmas, ratio = settings.SPIKE_SIGMAS, settings.SPIKE_MIN_RATIO
        return int(
            max(
                self.mean + sigmas * self.deviation,
                ratio * self.mean,
                settings.SPIKE_MIN_NANOS_PER_HOUR,
            )
        )


def _baselines(hour: datetime, field: str, keys: set[int]) -> dict[int, Baseline]:
    """Mean and deviation of hourly spend per key over the BASELINE_HOURS before `hour`.
    Statistics on nanodollar counts: floats only for the comparison, never stored money."""
    series: dict[int, dict[datetime, int]] = {key: {} for key in keys}
    rows = (
        HourlyRollup.objects.filter(
            **{f"{field}__in": keys},
            hour__gte=hour - timedelta(hours=BASELINE_HOURS),
            hour__lt=hour,
        )
        .values(field, "hour")
        .annotate(cost=Sum("cost_nanos"))
        .order_by()
    )
    for row in rows:
        series[row[field]][row["hour"]] = row["cost"]
    baselines = {}
    for key, by_hour in series.items():
        values = [by_hour.get(hour - timedelta(hours=n), 0) for n in range(1, BASELINE_HOURS + 1)]
        baselines[key] = Baseline(statistics.fmean(values), statistics.pstdev(values))
    return baselines


def _recent_spend(now: datetime, field: str) -> dict[int, int]:
    rows = (
        SpendEntry.objects.filter(
            created_at__gt=now - WINDOW, created_at__lte=now, **{f"{field}__isnull": False}
        )
        .values(field)
        .annotate(cost=Sum("cost_nanos"))
        .order_by()
    )
    return {row[field]: row["cost"] for row in rows}


def _velocity_limits(agent_ids: set[int]) -> dict[int, BudgetPolicy]:
    """The policy whose velocity limit governs each agent: its own, else its tenant's."""
    agents = Agent.objects.filter(pk__in=agent_ids).select_related("tenant")
    policies = BudgetPolicy.objects.filter(
        enabled=True, velocity_limit_nanos__isnull=False, tenant__agents__in=agent_ids
    ).distinct()
    own = {p.agent_id: p for p in policies if p.scope_type == ScopeType.AGENT}
    tenant = {p.tenant_id: p for p in policies if p.scope_type == ScopeType.TENANT}
    limits = {}
    for agent in agents:
        policy = own.get(agent.pk) or tenant.get(agent.tenant_id)
        if policy is not None:
            limits[agent.pk] = policy
    return limits


def detect(now: datetime | None = None) -> list[Spike]:
    """Find and store this hour's spikes; pause agents whose policy says so."""
    now = now or timezone.now()
    hour = now.replace(minute=0, second=0, microsecond=0)
    found: list[Spike] = []

    agent_spend = _recent_spend(now, "agent_id")
    tenant_of = dict(Agent.objects.filter(pk__in=agent_spend).values_list("pk", "tenant_id"))
    for scope, field, spend in (
        (ScopeType.AGENT, "agent_id", agent_spend),
        (ScopeType.TENANT, "tenant_id", _recent_spend(now, "tenant_id")),
    ):
        baselines = _baselines(hour, field.removesuffix("_id"), set(spend))
        for key, recent in spend.items():
            threshold = baselines[key].threshold()
            if recent > threshold:
                tenant_id = tenant_of[key] if scope == ScopeType.AGENT else key
                found.append(
                    _record(
                        scope,
                        tenant_id,
                        key if scope == ScopeType.AGENT else None,
                        Spike.Kind.ANOMALY,
                        hour,
                        recent,
                        int(baselines[key].mean),
                        threshold,
                    )
                )

    for agent_id, policy in _velocity_limits(set(agent_spend)).items():
        recent = agent_spend[agent_id]
        if recent > policy.velocity_limit_nanos:
            spike = _record(
                ScopeType.AGENT,
                tenant_of[agent_id],
                agent_id,
                Spike.Kind.VELOCITY,
                hour,
                recent,
                0,
                policy.velocity_limit_nanos,
            )
            if policy.auto_pause:
                _pause(spike, recent, policy.velocity_limit_nanos)
            found.append(spike)
    return [spike for spike in found if spike is not None]


def _record(scope, tenant_id, agent_id, kind, hour, spend, baseline, threshold) -> Spike:
    spike, created = Spike.objects.get_or_create(
        tenant_id=tenant_id,
        agent_id=agent_id,
        kind=kind,
        hour=hour,
        defaults={
            "scope_type": scope,
            "spend_nanos": spend,
            "baseline_nanos": baseline,
            "threshold_nanos": threshold,
        },
    )
    if not created and spend > spike.spend_nanos:
        Spike.objects.filter(pk=spike.pk).update(spend_nanos=spend)
    return spike


def _pause(spike: Spike, spend: int, limit: int) -> None:
    agent = Agent.objects.get(pk=spike.agent_id)
    if not agent.paused:
        services.set_agent_paused(
            agent,
            True,
            reason=f"runaway: USD {nanos_to_usd(spend)} in the last hour "
            f"(limit {nanos_to_usd(limit)})",
        )
        Spike.objects.filter(pk=spike.pk).update(agent_paused=True)
