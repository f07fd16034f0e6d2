"""State of a period by committed spend u = spent / limit: active (u < warn_at), warned,
degraded (u >= soft_cap), stopped (u >= hard_cap). Each crossing is recorded once."""

from datetime import timedelta
from decimal import Decimal

import pytest

from budgets import engine, services
from budgets.errors import InvalidRequest
from budgets.models import BudgetEvent, BudgetPeriod, ScopeType
from budgets.money import Prices

PRICES = Prices(0, 1)  # one nanodollar an output token: spend is easy to read


@pytest.fixture
def policy(acme, now):
    return services.set_policy(acme, ScopeType.TENANT, limit_nanos=1000, now=now)


def spend(tenant, now, nanos, request_id):
    scope = engine.state_of(tenant, now=now)
    hold = engine.authorize(
        scope,
        request_id=request_id,
        model="m",
        prices=PRICES,
        input_tokens=0,
        max_output_tokens=nanos,
        min_output_tokens=1,
    )
    engine.capture(hold, prompt_tokens=0, completion_tokens=nanos)


def current(tenant, now):
    return engine.state_of(tenant, now=now).periods[0]


def kinds(period):
    return list(
        BudgetEvent.objects.filter(period=period).order_by("id").values_list("kind", flat=True)
    )


@pytest.mark.parametrize(
    ("spent", "state"),
    [
        (0, "active"),
        (499, "active"),
        (500, "warned"),
        (799, "warned"),
        (800, "degraded"),
        (999, "degraded"),
        (1000, "stopped"),
    ],
)
def test_state_follows_committed_spend(acme, policy, now, spent, state):
    if spent:
        spend(acme, now, spent, "r")
    assert current(acme, now).state == state


def test_each_crossing_is_recorded_once(acme, policy, now):
    spend(acme, now, 500, "a")
    spend(acme, now, 10, "b")
    spend(acme, now, 300, "c")
    spend(acme, now, 190, "d")
    period = current(acme, now)
    assert kinds(period) == ["warned", "degraded", "stopped"]
    events = BudgetEvent.objects.filter(period=period)
    assert events.get(kind="warned").spent_nanos == 500
    assert events.get(kind="degraded").spent_nanos == 810
    assert events.get(kind="stopped").limit_nanos == 1000


def test_a_jump_records_every_threshold_crossed(acme, policy, now):
    spend(acme, now, 1000, "all-at-once")
    assert kinds(current(acme, now)) == ["warned", "degraded", "stopped"]


def test_raising_the_limit_recovers_a_stopped_budget(acme, policy, now):
    spend(acme, now, 1000, "a")
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=4000, now=now)
    period = current(acme, now)
    assert period.state == "active"
    assert (period.limit_nanos, period.hard_nanos) == (4000, 4000)
    assert kinds(period) == ["warned", "degraded", "stopped", "recovered"]
    spend(acme, now, 100, "b")  # the raised budget pays again


def test_lowering_the_limit_can_stop_a_budget_at_once(acme, policy, now):
    spend(acme, now, 300, "a")
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=300, now=now)
    assert current(acme, now).state == "stopped"


def test_custom_thresholds_apply(acme, now):
    services.set_policy(
        acme,
        ScopeType.TENANT,
        limit_nanos=1000,
        warn_at=Decimal("0.25"),
        soft_cap=Decimal("0.5"),
        hard_cap=Decimal("1.2"),
        now=now,
    )
    spend(acme, now, 250, "a")
    assert current(acme, now).state == "warned"
    spend(acme, now, 900, "b")  # hard cap 1.2: 1150 of 1000 is allowed
    assert current(acme, now).state == "degraded"
    spend(acme, now, 50, "c")
    assert current(acme, now).state == "stopped"


def test_reset_closes_the_period_and_opens_a_fresh_one(acme, policy, now):
    spend(acme, now, 1000, "a")
    later = now + timedelta(minutes=5)
    fresh = engine.reset(policy, reason="customer upgraded", by="alice", now=later)
    old = BudgetPeriod.objects.get(policy=policy, window_start=now.replace(hour=0, minute=0))
    assert old.closed_at == later
    assert (old.close_reason, old.closed_by, old.spent_nanos) == (
        "customer upgraded",
        "alice",
        1000,
    )
    assert old.closed_early
    assert (fresh.window_start, fresh.window_end) == (later, old.window_end)
    assert (fresh.spent_nanos, fresh.state) == (0, "active")
    assert kinds(fresh) == ["reset"]
    assert BudgetEvent.objects.get(period=fresh).spent_nanos == 1000
    assert current(acme, later).pk == fresh.pk
    spend(acme, later, 10, "b")


def test_a_hold_placed_before_a_reset_is_charged_to_the_old_period(acme, policy, now):
    scope = engine.state_of(acme, now=now)
    hold = engine.authorize(
        scope,
        request_id="inflight",
        model="m",
        prices=PRICES,
        input_tokens=0,
        max_output_tokens=100,
    )
    fresh = engine.reset(policy, reason="r", by="alice", now=now + timedelta(seconds=1))
    engine.capture(hold, prompt_tokens=0, completion_tokens=60)
    old = BudgetPeriod.objects.exclude(pk=fresh.pk).get(policy=policy)
    assert (old.spent_nanos, old.held_nanos) == (60, 0)
    fresh.refresh_from_db()
    assert (fresh.spent_nanos, fresh.held_nanos) == (0, 0)


def test_a_reset_needs_a_reason(acme, policy, now):
    with pytest.raises(InvalidRequest, match="reason"):
        engine.reset(policy, reason="  ", by="alice", now=now)


def test_a_new_window_is_a_new_row_with_a_reset_event(acme, policy, now):
    spend(acme, now, 900, "a")
    tomorrow = now + timedelta(days=1)
    period = current(acme, tomorrow)
    assert (period.spent_nanos, period.state) == (0, "active")
    assert period.window_start == tomorrow.replace(hour=0, minute=0)
    assert kinds(period) == ["reset"]
    assert BudgetPeriod.objects.filter(policy=policy).count() == 2


def test_changing_the_window_starts_a_new_period_now(acme, policy, now):
    spend(acme, now, 100, "a")
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=1000, window="month", now=now)
    period = current(acme, now + timedelta(seconds=1))
    assert period.window_start == now
    assert period.window_end == now.replace(month=12, day=1, hour=0, minute=0)
    assert period.spent_nanos == 0


def test_a_second_reset_at_the_same_instant_is_refused(acme, policy, now):
    engine.reset(policy, reason="r", by="alice", now=now)
    with pytest.raises(InvalidRequest, match="this very moment"):
        engine.reset(policy, reason="r", by="bob", now=now)
    assert BudgetPeriod.objects.filter(policy=policy).count() == 2
