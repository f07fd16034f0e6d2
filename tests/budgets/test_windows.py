from datetime import UTC, datetime

import pytest

from budgets.windows import add_months, billing_cycle_bounds, window_bounds


def at(*args):
    return datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize(
    ("window", "start", "end"),
    [
        ("hour", at(2026, 11, 18, 15), at(2026, 11, 18, 16)),
        ("day", at(2026, 11, 18), at(2026, 11, 19)),
        ("week", at(2026, 11, 16), at(2026, 11, 23)),  # ISO weeks start on Monday
        ("month", at(2026, 11, 1), at(2026, 12, 1)),
        ("billing_cycle", at(2026, 11, 1), at(2026, 12, 1)),  # unknown cycle: calendar month
    ],
)
def test_windows_contain_now(window, start, end):
    assert window_bounds(window, at(2026, 11, 18, 15, 30)) == (start, end)


def test_december_rolls_into_the_next_year():
    assert window_bounds("month", at(2026, 12, 31, 23, 59)) == (at(2026, 12, 1), at(2027, 1, 1))


def test_it_uses_the_stripe_billing_period_when_current():
    bounds = billing_cycle_bounds(at(2026, 11, 20), at(2026, 11, 7, 9), at(2026, 12, 7, 9))
    assert bounds == (at(2026, 11, 7, 9), at(2026, 12, 7, 9))


def test_it_rolls_a_stale_billing_period_forward_from_its_anchor():
    # The renewal webhook never came: the budget still resets on the cycle's day.
    start, end = at(2026, 1, 31, 12), at(2026, 2, 28, 12)
    assert billing_cycle_bounds(at(2026, 3, 15), start, end) == (
        at(2026, 2, 28, 12),
        at(2026, 3, 31, 12),
    )
    assert billing_cycle_bounds(at(2026, 4, 2), start, end) == (
        at(2026, 3, 31, 12),
        at(2026, 4, 30, 12),
    )


def test_it_rolls_a_non_monthly_cycle_by_its_length():
    start, end = at(2026, 11, 1), at(2026, 11, 8)
    assert billing_cycle_bounds(at(2026, 11, 20), start, end) == (
        at(2026, 11, 15),
        at(2026, 11, 22),
    )


def test_a_period_in_the_future_falls_back_to_the_calendar_month():
    assert billing_cycle_bounds(at(2026, 11, 5), at(2026, 12, 1), at(2027, 1, 1)) == (
        at(2026, 11, 1),
        at(2026, 12, 1),
    )


def test_add_months_clamps_the_day():
    assert add_months(at(2026, 1, 31), 1) == at(2026, 2, 28)
    assert add_months(at(2028, 1, 31), 1) == at(2028, 2, 29)
    assert add_months(at(2026, 11, 30), 3) == at(2027, 2, 28)


def test_it_refuses_an_unknown_window():
    with pytest.raises(ValueError, match="unknown window"):
        window_bounds("fortnight", at(2026, 1, 1))
