"""Concurrency guarantees, proved on PostgreSQL with real threads and connections."""

from collections import Counter
from datetime import timedelta

import pytest
from django.db.models import Sum
from django.utils import timezone

from budgets import engine, services
from budgets.errors import BudgetExceeded
from budgets.models import Agent, BudgetPeriod, Hold, HoldStatus, ScopeType, Tenant
from budgets.money import Prices
from spend.models import SpendEntry
from tests.threads import in_threads

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("require_postgres")]

PRICES = Prices(10, 100)
THREADS = 40
CALLS_PER_THREAD = 10


def test_many_concurrent_callers_never_overspend(now):
    tenant = services.create_tenant("Acme", "cus_acme")
    agents = [services.create_agent(tenant, f"bot-{i}") for i in range(2)]
    # Each call holds 100 * 10 + 100 * 100 = 11_000 and spends 6_000: the tenant budget
    # pays for about 160 of the 400 attempts, each agent's for about 100.
    tenant_policy = services.set_policy(tenant, ScopeType.TENANT, limit_nanos=1_000_000, now=now)
    for agent in agents:
        services.set_policy(tenant, ScopeType.AGENT, agent=agent, limit_nanos=600_000, now=now)

    def work(i):
        tenant_row = Tenant.objects.get(pk=tenant.pk)
        agent = Agent.objects.get(pk=agents[i % 2].pk)
        outcomes = Counter()
        for n in range(CALLS_PER_THREAD):
            try:
                scope = engine.state_of(tenant_row, agent, now=now)
                hold = engine.authorize(
                    scope,
                    request_id=f"t{i}-{n}",
                    model="m",
                    prices=PRICES,
                    input_tokens=100,
                    max_output_tokens=100,
                    min_output_tokens=10,
                )
            except BudgetExceeded as refused:
                assert refused.scope_type in ("tenant", "agent")
                assert refused.limit_nanos in (1_000_000, 600_000)
                outcomes["refused"] += 1
                continue
            engine.capture(
                hold, prompt_tokens=100, completion_tokens=min(50, hold.max_output_tokens)
            )
            outcomes["captured"] += 1
        return outcomes

    totals = sum(in_threads(THREADS, work), Counter())
    assert totals["captured"] + totals["refused"] == THREADS * CALLS_PER_THREAD
    assert totals["refused"] > 0 and totals["captured"] > 0

    ledger = SpendEntry.objects.aggregate(total=Sum("cost_nanos"))["total"]
    assert SpendEntry.objects.count() == totals["captured"]
    tenant_period = BudgetPeriod.objects.get(policy=tenant_policy)
    assert tenant_period.spent_nanos == ledger
    assert tenant_period.spent_nanos <= tenant_period.hard_nanos
    assert tenant_period.held_nanos == 0
    for agent in agents:
        period = BudgetPeriod.objects.get(policy__agent=agent)
        assert (
            period.spent_nanos
            == SpendEntry.objects.filter(agent=agent).aggregate(t=Sum("cost_nanos"))["t"]
        )
        assert period.spent_nanos <= period.hard_nanos
        assert period.held_nanos == 0
    assert not Hold.objects.filter(status=HoldStatus.HELD).exists()


def test_concurrent_first_use_opens_one_period():
    tenant = services.create_tenant("Acme", "cus_acme")

    def work(i):
        return engine.state_of(Tenant.objects.get(pk=tenant.pk)).periods[0].pk

    assert len(set(in_threads(THREADS, work))) == 1
    assert BudgetPeriod.objects.count() == 1


def test_two_expiry_runs_at_once_release_each_hold_once():
    tenant = services.create_tenant("Acme", "cus_acme")
    services.set_policy(tenant, ScopeType.TENANT, limit_nanos=10**12, window="month")
    scope = engine.state_of(tenant)
    for n in range(300):
        engine.authorize(
            scope, request_id=f"r{n}", model="m", prices=PRICES, input_tokens=1, max_output_tokens=1
        )
    later = timezone.now() + timedelta(hours=1)

    released = in_threads(2, lambda i: engine.expire_holds(later, batch_size=20))
    assert sum(released) == 300
    period = BudgetPeriod.objects.get()
    assert period.held_nanos == 0
    assert Hold.objects.filter(status=HoldStatus.EXPIRED).count() == 300


def test_capture_and_expiry_racing_on_one_hold_charge_once():
    tenant = services.create_tenant("Acme", "cus_acme")
    services.set_policy(tenant, ScopeType.TENANT, limit_nanos=10**12, window="month")
    scope = engine.state_of(tenant)
    holds = [
        engine.authorize(
            scope,
            request_id=f"r{n}",
            model="m",
            prices=PRICES,
            input_tokens=10,
            max_output_tokens=10,
        )
        for n in range(50)
    ]
    later = timezone.now() + timedelta(hours=1)

    def work(i):
        if i == 0:
            return engine.expire_holds(later, batch_size=5)
        for hold in holds[i - 1 :: 3]:
            engine.capture(hold.request_id, prompt_tokens=10, completion_tokens=10)
        return 0

    in_threads(4, work)
    period = BudgetPeriod.objects.get()
    assert period.held_nanos == 0
    assert (
        period.spent_nanos == SpendEntry.objects.aggregate(t=Sum("cost_nanos"))["t"] == 50 * 1_100
    )


def test_creating_the_same_agent_at_once_makes_one_and_a_clear_error():
    from budgets.errors import InvalidRequest

    tenant = services.create_tenant("Acme", "cus_acme")

    def work(i):
        try:
            services.create_agent(Tenant.objects.get(pk=tenant.pk), "bot")
            return "created"
        except InvalidRequest as refused:
            assert "already exists" in refused.message
            return "refused"

    outcomes = in_threads(8, work)
    assert outcomes.count("created") == 1
    assert Agent.objects.filter(tenant=tenant, name="bot").count() == 1


def test_two_materialize_runs_at_once_open_each_period_once(now):
    for i in range(30):
        tenant = services.create_tenant(f"T{i}", f"cus_t{i}")
        services.set_policy(
            tenant, ScopeType.TENANT, limit_nanos=10**9, window=["day", "hour"][i % 2], now=now
        )
    in_threads(2, lambda i: engine.materialize_periods(now))
    assert BudgetPeriod.objects.count() == 30
    assert BudgetPeriod.objects.values("policy").distinct().count() == 30
