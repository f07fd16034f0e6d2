"""Hourly rollups and runaway detection on synthetic traffic."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db.models import Sum

from budgets import services
from budgets.models import Agent, ScopeType
from budgets.money import usd_to_nanos
from spend import rollups, spikes
from spend.models import HourlyRollup, SpendEntry, Spike
from tests.threads import in_threads

_counter = iter(range(10**9))


def ledger(tenant, agent, at, cost_nanos, model="mistral-small"):
    """A ledger row at a given time (created_at is set on insert, so move it after)."""
    entry = SpendEntry.objects.create(
        tenant=tenant, agent=agent, request_id=f"r{next(_counter)}", model_requested=model,
        model_used=model, prompt_tokens=10, completion_tokens=10, input_price_nanos=1,
        output_price_nanos=1, cost_nanos=cost_nanos,
    )  # fmt: skip
    SpendEntry.objects.filter(pk=entry.pk).update(created_at=at)


def steady_day(tenant, agent, now, per_hour_nanos):
    for hours_ago in range(1, 26):
        ledger(tenant, agent, now - timedelta(hours=hours_ago, minutes=5), per_hour_nanos)


def test_rollups_sum_the_ledger_per_hour_agent_and_model(acme, invoice_bot, churn_bot, now):
    ledger(acme, invoice_bot, now - timedelta(minutes=10), 100)
    ledger(acme, invoice_bot, now - timedelta(minutes=5), 50)
    ledger(acme, invoice_bot, now - timedelta(minutes=5), 7, model="ministral-3b")
    ledger(acme, churn_bot, now - timedelta(hours=1, minutes=1), 30)
    assert rollups.rollup_hours(now) == 3
    bucket = HourlyRollup.objects.get(agent=invoice_bot, model="mistral-small")
    assert (bucket.hour, bucket.calls, bucket.cost_nanos) == (now.replace(minute=0), 2, 150)
    assert HourlyRollup.objects.aggregate(t=Sum("cost_nanos"))["t"] == 187
    # Running it again changes nothing.
    assert rollups.rollup_hours(now) == 3
    assert HourlyRollup.objects.count() == 3


def test_a_runaway_agent_is_detected_and_a_steady_one_is_not(acme, invoice_bot, churn_bot, now):
    for agent in (invoice_bot, churn_bot):
        steady_day(acme, agent, now, usd_to_nanos("0.5"))
    # churn-bot keeps its pace; invoice-bot burns USD 12.5 in the last 25 minutes.
    ledger(acme, churn_bot, now - timedelta(minutes=30), usd_to_nanos("0.5"))
    for minutes in range(1, 26):
        ledger(acme, invoice_bot, now - timedelta(minutes=minutes), usd_to_nanos("0.5"))
    rollups.rollup_hours(now, lookback=timedelta(hours=30))
    found = spikes.detect(now)
    agents = {(s.scope_type, s.agent_id) for s in found}
    assert ("agent", invoice_bot.pk) in agents
    assert ("agent", churn_bot.pk) not in agents
    spike = Spike.objects.get(agent=invoice_bot, kind="anomaly")
    assert spike.spend_nanos == usd_to_nanos("12.5")
    assert spike.baseline_nanos == usd_to_nanos("0.5")
    # Detected once per hour, however often the task runs.
    spikes.detect(now + timedelta(minutes=1))
    assert Spike.objects.filter(agent=invoice_bot, kind="anomaly").count() == 1


def test_small_amounts_are_never_spikes(acme, invoice_bot, now):
    ledger(acme, invoice_bot, now - timedelta(minutes=5), usd_to_nanos("0.2"))
    rollups.rollup_hours(now)
    assert spikes.detect(now) == []


def test_a_velocity_limit_with_auto_pause_pauses_the_agent(acme, invoice_bot, churn_bot, now):
    services.set_policy(
        acme, ScopeType.AGENT, agent=invoice_bot, limit_nanos=usd_to_nanos("100"),
        velocity_limit_nanos=usd_to_nanos("2"), auto_pause=True, now=now,
    )  # fmt: skip
    ledger(acme, invoice_bot, now - timedelta(minutes=3), usd_to_nanos("2.5"))
    ledger(acme, churn_bot, now - timedelta(minutes=3), usd_to_nanos("2.5"))
    found = spikes.detect(now)
    velocity = [s for s in found if s.kind == "velocity"]
    assert [s.agent_id for s in velocity] == [invoice_bot.pk]
    assert velocity[0].threshold_nanos == usd_to_nanos("2")
    assert Spike.objects.get(kind="velocity").agent_paused
    paused = Agent.objects.get(pk=invoice_bot.pk)
    assert paused.paused and "runaway" in paused.paused_reason
    assert not Agent.objects.get(pk=churn_bot.pk).paused


def test_a_tenant_velocity_limit_applies_to_each_agent(acme, invoice_bot, churn_bot, now):
    services.set_policy(
        acme,
        ScopeType.TENANT,
        limit_nanos=usd_to_nanos("100"),
        velocity_limit_nanos=usd_to_nanos("2"),
        now=now,
    )
    ledger(acme, invoice_bot, now - timedelta(minutes=3), usd_to_nanos("1.5"))
    ledger(acme, churn_bot, now - timedelta(minutes=3), usd_to_nanos("2.5"))
    found = spikes.detect(now)
    assert [s.agent_id for s in found if s.kind == "velocity"] == [churn_bot.pk]
    assert not Agent.objects.get(pk=churn_bot.pk).paused  # no auto_pause on that policy


@pytest.mark.django_db(transaction=True)
def test_two_rollups_at_once_write_each_bucket_once(require_postgres, now):
    tenant = services.create_tenant("Acme", "cus_acme")
    agent = services.create_agent(tenant, "bot")
    for minutes in range(0, 120, 7):
        ledger(tenant, agent, now - timedelta(minutes=minutes), 10)
    in_threads(2, lambda i: rollups.rollup_hours(now))
    assert (
        HourlyRollup.objects.aggregate(t=Sum("cost_nanos"))["t"]
        == SpendEntry.objects.aggregate(t=Sum("cost_nanos"))["t"]
    )


@pytest.mark.django_db(transaction=True)
def test_two_detections_at_once_record_a_spike_once(require_postgres, now):
    tenant = services.create_tenant("Acme", "cus_acme")
    agent = services.create_agent(tenant, "bot")
    services.set_policy(
        tenant,
        ScopeType.AGENT,
        agent=agent,
        limit_nanos=10**12,
        velocity_limit_nanos=10,
        auto_pause=True,
        now=now,
    )
    ledger(tenant, agent, now - timedelta(minutes=2), 1000)
    in_threads(4, lambda i: spikes.detect(now))
    assert Spike.objects.filter(kind="velocity").count() == 1
    assert Agent.objects.get(pk=agent.pk).paused
