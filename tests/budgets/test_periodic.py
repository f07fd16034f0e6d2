"""The periodic engine work, on real rows: expiring holds and opening periods."""

from datetime import UTC, datetime, timedelta

from budgets import engine, services
from budgets.models import BudgetEvent, BudgetPeriod, Hold, HoldStatus, ScopeType
from budgets.money import Prices

PRICES = Prices(1, 1)


def hold(tenant, now, request_id, ttl=timedelta(minutes=10)):
    scope = engine.state_of(tenant, now=now)
    return engine.authorize(
        scope,
        request_id=request_id,
        model="m",
        prices=PRICES,
        input_tokens=1,
        max_output_tokens=1,
        ttl=ttl,
    )


def test_a_hold_expires_exactly_at_its_expiry(acme, now):
    expiring = hold(acme, now, "a", ttl=timedelta(seconds=10, microseconds=250))
    assert engine.expire_holds(expiring.expires_at - timedelta(microseconds=1)) == 0
    assert engine.expire_holds(expiring.expires_at) == 1
    assert Hold.objects.get().status == HoldStatus.EXPIRED


def test_expiry_in_small_batches_releases_every_hold_once(acme, now):
    for n in range(23):
        hold(acme, now, f"r{n}")
    assert engine.expire_holds(now + timedelta(hours=1), batch_size=5) == 23
    period = BudgetPeriod.objects.get()
    assert period.held_nanos == 0
    assert Hold.objects.filter(status=HoldStatus.EXPIRED).count() == 23
    assert engine.expire_holds(now + timedelta(hours=1), batch_size=5) == 0


def test_expiry_releases_each_period_of_a_hold(acme, invoice_bot, now):
    services.set_policy(acme, ScopeType.AGENT, agent=invoice_bot, limit_nanos=10**9, now=now)
    scope = engine.state_of(acme, invoice_bot, now=now)
    engine.authorize(
        scope, request_id="x", model="m", prices=PRICES, input_tokens=5, max_output_tokens=5
    )
    engine.expire_holds(now + timedelta(hours=1))
    assert list(BudgetPeriod.objects.values_list("held_nanos", flat=True)) == [0, 0]


def test_materialize_opens_the_current_period_of_every_enabled_policy(
    acme, globex, invoice_bot, now
):
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=1000, now=now)
    services.set_policy(
        acme, ScopeType.AGENT, agent=invoice_bot, limit_nanos=500, window="hour", now=now
    )
    services.set_policy(globex, ScopeType.TENANT, limit_nanos=1000, enabled=False, now=now)
    assert engine.materialize_periods(now) == 2
    assert engine.materialize_periods(now) == 0
    hourly = BudgetPeriod.objects.get(policy__scope_type="agent")
    assert (hourly.window_start, hourly.window_end) == (
        now.replace(minute=0),
        now.replace(minute=0) + timedelta(hours=1),
    )
    assert hourly.limit_nanos == 500
    assert not BudgetEvent.objects.exists()  # first periods: nothing was reset


def test_a_new_window_gets_its_period_and_reset_event(acme, now):
    policy = services.set_policy(acme, ScopeType.TENANT, limit_nanos=1000, now=now)
    engine.materialize_periods(now)
    tomorrow = now + timedelta(days=1)
    assert engine.materialize_periods(tomorrow) == 1
    engine.materialize_periods(tomorrow)
    fresh = BudgetPeriod.objects.get(policy=policy, window_start=tomorrow.replace(hour=0, minute=0))
    assert list(fresh.events.values_list("kind", flat=True)) == ["reset"]
    # The gateway finds the same period on first use.
    assert engine.state_of(acme, now=tomorrow).periods[0].pk == fresh.pk


def test_materialize_follows_the_stripe_billing_period(acme, now):
    acme.billing_period_start = datetime(2026, 11, 7, 9, tzinfo=UTC)
    acme.billing_period_end = datetime(2026, 12, 7, 9, tzinfo=UTC)
    acme.save()
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=1000, window="billing_cycle", now=now)
    engine.materialize_periods(now)
    period = BudgetPeriod.objects.get()
    assert (period.window_start, period.window_end) == (
        acme.billing_period_start,
        acme.billing_period_end,
    )


def test_materialized_thresholds_are_exactly_the_engines(acme, globex, now):
    from decimal import Decimal

    policy = services.set_policy(
        acme, ScopeType.TENANT, limit_nanos=99_999_999_999_999_999, warn_at=Decimal("0.3333"),
        soft_cap=Decimal("0.6667"), hard_cap=Decimal("9.9999"), window="week", now=now,
    )  # fmt: skip
    engine.materialize_periods(now)
    period = BudgetPeriod.objects.get(policy=policy)
    expected = engine.thresholds_of(policy)
    assert {k: getattr(period, k) for k in expected} == expected


def test_materialize_starts_after_an_early_reset(acme, now):
    policy = services.set_policy(acme, ScopeType.TENANT, limit_nanos=1000, window="day", now=now)
    engine.materialize_periods(now)
    fresh = engine.reset(policy, reason="r", by="alice", now=now + timedelta(hours=1))
    assert engine.materialize_periods(now + timedelta(hours=2)) == 0
    assert engine.state_of(acme, now=now + timedelta(hours=2)).periods[0].pk == fresh.pk
