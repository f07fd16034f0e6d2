from __future__ import annotations

import re
from decimal import Decimal

import pytest

from budgets.models import BudgetEvent, BudgetPeriod, EventKind

from .conftest import charge

ACME = "/console/budgets/tenant/cus_acme/"
VALID = {
    "action": "policy",
    "limit": "25.5",
    "window": "week",
    "warn_at": "0.6",
    "soft_cap": "0.9",
    "hard_cap": "1.2",
    "disabled_tools": "web_search, code_interpreter",
}


def text(response) -> str:
    return re.sub(r"\s+", " ", response.content.decode())


def test_it_saves_a_valid_policy(staff_client, acme_budget, globex_budget):
    response = staff_client.post(ACME, VALID, follow=True)
    assert "Policy saved." in text(response)
    acme_budget.refresh_from_db()
    assert acme_budget.limit_nanos == 25_500_000_000
    assert acme_budget.window == "week"
    assert (acme_budget.warn_at, acme_budget.soft_cap, acme_budget.hard_cap) == (
        Decimal("0.6"),
        Decimal("0.9"),
        Decimal("1.2"),
    )
    assert acme_budget.disabled_tools == ["web_search", "code_interpreter"]
    globex_budget.refresh_from_db()
    assert globex_budget.limit_nanos == 5_000_000_000


def test_it_applies_a_new_limit_to_the_current_period(staff_client, acme_budget):
    charge(acme_budget.tenant, "6")
    staff_client.post(ACME, {**VALID, "limit": "100", "window": "day"})
    page = text(staff_client.get(ACME))
    assert 'id="limit">100<' in page
    assert 'id="spent">6<' in page


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"limit": "-5"}, "limit", "must be a positive amount of USD"),
        ({"limit": "0.0000000001"}, "limit", "more precision than one nanodollar"),
        ({"limit": "ten"}, "limit", "is not a decimal number of USD"),
        ({"soft_cap": "1.5", "hard_cap": "1.2"}, "soft_cap", "soft_cap must not exceed hard_cap"),
        ({"warn_at": "0.12345"}, "warn_at", "at most 4 decimals"),
        ({"hard_cap": "11"}, "hard_cap", "at most 10"),
        ({"window": "fortnight"}, "window", "Select a valid choice"),
    ],
)
def test_it_shows_errors_and_saves_nothing(staff_client, acme_budget, changes, field, message):
    before = (
        acme_budget.limit_nanos,
        acme_budget.window,
        acme_budget.soft_cap,
        acme_budget.updated_at,
    )
    response = staff_client.post(ACME, {**VALID, **changes})
    assert response.status_code == 400
    form = response.context["policy_form"]
    assert message in " ".join(form.errors[field])
    assert message in text(response)
    acme_budget.refresh_from_db()
    assert (
        acme_budget.limit_nanos,
        acme_budget.window,
        acme_budget.soft_cap,
        acme_budget.updated_at,
    ) == before


def test_it_keeps_what_was_typed_after_an_error(staff_client, acme_budget):
    response = staff_client.post(ACME, {**VALID, "limit": "-5"})
    assert 'value="-5"' in text(response)


def test_it_resets_with_a_reason_and_confirmation(staff_client, acme_budget):
    charge(acme_budget.tenant, "6")
    response = staff_client.post(
        ACME, {"action": "reset", "reason": "customer upgraded", "confirm": "on"}, follow=True
    )
    assert "Budget reset" in text(response)
    old, fresh = BudgetPeriod.objects.filter(policy=acme_budget).order_by("window_start")
    assert old.closed_at is not None
    assert old.close_reason == "customer upgraded"
    assert old.closed_by == "alice"
    assert old.spent_nanos == 6_000_000_000
    assert fresh.closed_at is None and fresh.spent_nanos == 0
    assert BudgetEvent.objects.filter(period=fresh, kind=EventKind.RESET).exists()
    page = text(response)
    assert 'id="spent">0<' in page
    assert "by alice: customer upgraded" in page


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"reason": "", "confirm": "on"}, "reason"),
        ({"reason": "   ", "confirm": "on"}, "reason"),
        ({"reason": "customer upgraded"}, "confirm"),
    ],
)
def test_it_requires_a_reason_and_the_confirmation_to_reset(staff_client, acme_budget, data, field):
    charge(acme_budget.tenant, "6")
    response = staff_client.post(ACME, {"action": "reset", **data})
    assert response.status_code == 400
    assert response.context["reset_form"].errors[field]
    assert BudgetPeriod.objects.filter(policy=acme_budget).count() == 1
    assert not BudgetPeriod.objects.filter(closed_at__isnull=False).exists()


def test_it_resets_only_the_budget_it_is_on(staff_client, acme_budget, globex_budget):
    charge(acme_budget.tenant, "1")
    charge(globex_budget.tenant, "1")
    staff_client.post(ACME, {"action": "reset", "reason": "test", "confirm": "on"})
    assert BudgetPeriod.objects.filter(policy=globex_budget, closed_at__isnull=False).count() == 0
    assert BudgetPeriod.objects.filter(policy=acme_budget).count() == 2


def test_it_refuses_an_unknown_action(staff_client, acme_budget):
    assert staff_client.post(ACME, {"action": "delete"}).status_code == 400


def test_it_shows_the_saved_fractions_as_plain_decimals(staff_client, acme_budget):
    staff_client.post(ACME, {**VALID, "soft_cap": "10", "hard_cap": "10"})
    page = text(staff_client.get(ACME))
    assert 'name="hard_cap" value="10"' in page
    assert 'name="warn_at" value="0.6"' in page
