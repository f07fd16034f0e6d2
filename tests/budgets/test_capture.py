from datetime import timedelta

import pytest

from budgets import engine, services
from budgets.errors import HoldConflict, HoldNotFound, InvalidRequest
from budgets.models import BudgetPeriod, Hold, HoldStatus, ScopeType
from budgets.money import Prices
from spend.models import SpendEntry

PRICES = Prices(100, 1000)


@pytest.fixture
def budget(acme, now):
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=1_000_000, now=now)


def hold_for(tenant, now, request_id="req-1", agent=None, input_tokens=10, max_output_tokens=100):
    scope = engine.state_of(tenant, agent, now=now)
    return engine.authorize(
        scope,
        request_id=request_id,
        model="mistral-small-latest",
        prices=PRICES,
        input_tokens=input_tokens,
        max_output_tokens=max_output_tokens,
    )


def period(tenant):
    return BudgetPeriod.objects.get(policy__tenant=tenant, closed_at__isnull=True)


def test_capture_charges_the_actual_cost_and_releases_the_hold(acme, invoice_bot, budget, now):
    hold = hold_for(acme, now, agent=invoice_bot)
    entry = engine.capture(hold, prompt_tokens=8, completion_tokens=40, latency_ms=321)
    assert entry.cost_nanos == 8 * 100 + 40 * 1000
    assert (entry.input_price_nanos, entry.output_price_nanos) == (100, 1000)
    assert entry.agent == invoice_bot
    assert entry.model_requested == entry.model_used == "mistral-small-latest"
    assert entry.held_nanos == hold.amount_nanos
    assert not entry.over_hold
    assert entry.latency_ms == 321
    p = period(acme)
    assert (p.spent_nanos, p.held_nanos) == (entry.cost_nanos, 0)
    hold.refresh_from_db()
    assert hold.status == HoldStatus.CAPTURED


def test_capturing_twice_charges_once(acme, budget, now):
    hold = hold_for(acme, now)
    first = engine.capture(hold, prompt_tokens=8, completion_tokens=40)
    again = engine.capture("req-1", prompt_tokens=8, completion_tokens=40)
    assert again.pk == first.pk
    assert SpendEntry.objects.count() == 1
    assert period(acme).spent_nanos == first.cost_nanos


def test_a_call_that_cost_more_than_its_hold_is_charged_in_full_and_flagged(acme, budget, now):
    hold = hold_for(acme, now, max_output_tokens=10)
    entry = engine.capture(hold, prompt_tokens=10, completion_tokens=50)
    assert entry.cost_nanos == 10 * 100 + 50 * 1000 > hold.amount_nanos
    assert entry.over_hold
    assert period(acme).spent_nanos == entry.cost_nanos


def test_capture_on_another_model_needs_its_prices(acme, budget, now):
    hold = hold_for(acme, now)
    with pytest.raises(InvalidRequest, match="prices are needed"):
        engine.capture(hold, prompt_tokens=1, completion_tokens=1, model="ministral-3b-latest")
    entry = engine.capture(
        hold,
        prompt_tokens=10,
        completion_tokens=10,
        model="ministral-3b-latest",
        prices=Prices(100, 100),
    )
    assert entry.model_used == "ministral-3b-latest"
    assert entry.cost_nanos == 2_000


def test_void_releases_without_charging_and_is_idempotent(acme, budget, now):
    hold = hold_for(acme, now)
    engine.void(hold)
    engine.void(hold)
    p = period(acme)
    assert (p.spent_nanos, p.held_nanos) == (0, 0)
    assert not SpendEntry.objects.exists()
    with pytest.raises(HoldConflict, match="voided"):
        engine.capture(hold, prompt_tokens=1, completion_tokens=1)


def test_a_captured_hold_cannot_be_voided(acme, budget, now):
    hold = hold_for(acme, now)
    engine.capture(hold, prompt_tokens=1, completion_tokens=1)
    with pytest.raises(HoldConflict, match="already captured"):
        engine.void(hold)


def test_expired_holds_are_released(acme, budget, now):
    hold_for(acme, now, request_id="old")
    hold_for(acme, now + timedelta(seconds=500), request_id="young")
    assert engine.expire_holds(now + timedelta(seconds=600)) == 1
    assert engine.expire_holds(now + timedelta(seconds=600)) == 0
    assert Hold.objects.get(request_id="old").status == HoldStatus.EXPIRED
    assert Hold.objects.get(request_id="young").status == HoldStatus.HELD
    assert period(acme).held_nanos == Hold.objects.get(request_id="young").amount_nanos


def test_a_call_captured_after_its_hold_expired_is_charged_and_flagged(acme, budget, now):
    hold = hold_for(acme, now)
    engine.expire_holds(now + timedelta(hours=1))
    entry = engine.capture(hold, prompt_tokens=10, completion_tokens=10)
    assert entry.over_hold
    p = period(acme)
    assert (p.spent_nanos, p.held_nanos) == (entry.cost_nanos, 0)


def test_unknown_holds_are_reported(db):
    with pytest.raises(HoldNotFound):
        engine.capture("nope", prompt_tokens=1, completion_tokens=1)
    with pytest.raises(HoldNotFound):
        engine.void("nope")


def test_negative_usage_is_refused(acme, budget, now):
    hold = hold_for(acme, now)
    with pytest.raises(InvalidRequest, match="negative"):
        engine.capture(hold, prompt_tokens=-1, completion_tokens=1)
    assert Hold.objects.get(pk=hold.pk).status == HoldStatus.HELD


def test_usage_estimated_is_recorded(acme, budget, now):
    hold = hold_for(acme, now)
    entry = engine.capture(hold, prompt_tokens=10, completion_tokens=3, usage_estimated=True)
    assert entry.usage_estimated
