from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from budgets.money import (
    MAX_NANOS,
    InvalidAmount,
    Prices,
    nanos_to_usd,
    price_per_million_to_nanos,
    usd_to_nanos,
)


@pytest.mark.parametrize(
    ("usd", "nanos"),
    [
        ("12.5", 12_500_000_000),
        ("0.000000001", 1),
        ("0.000002", 2_000),
        ("1", 1_000_000_000),
        (" 3.25 ", 3_250_000_000),
        ("-1.5", -1_500_000_000),
        (7, 7_000_000_000),
        (Decimal("0.1"), 100_000_000),
        ("1e-9", 1),
        ("0", 0),
    ],
)
def test_it_converts_usd_to_nanos_exactly(usd, nanos):
    assert usd_to_nanos(usd) == nanos


@pytest.mark.parametrize(
    ("usd", "problem"),
    [
        ("0.0000000001", "more precision than one nanodollar"),
        ("1.0000000005", "more precision than one nanodollar"),
        (0.1, "is a float"),
        (True, "not an amount"),
        ("abc", "not a decimal number"),
        ("", "required"),
        ("NaN", "not a finite amount"),
        ("Infinity", "not a finite amount"),
        ("100000001", "larger than the maximum of 100000000 USD"),
        (None, "not a decimal number"),
    ],
)
def test_it_refuses_amounts_it_cannot_hold_exactly(usd, problem):
    with pytest.raises(InvalidAmount, match=problem):
        usd_to_nanos(usd)


@pytest.mark.parametrize(
    ("nanos", "usd"),
    [
        (12_500_000_000, "12.5"),
        (1, "0.000000001"),
        (0, "0"),
        (2_000, "0.000002"),
        (-5, "-0.000000005"),
        (10**18, "1000000000"),
    ],
)
def test_it_shows_nanos_as_plain_usd(nanos, usd):
    assert nanos_to_usd(nanos) == usd


def test_it_refuses_to_show_a_float():
    with pytest.raises(TypeError):
        nanos_to_usd(1.5)


@given(st.integers(min_value=-MAX_NANOS, max_value=MAX_NANOS))
def test_round_trip_is_exact(nanos):
    assert usd_to_nanos(nanos_to_usd(nanos)) == nanos


@pytest.mark.parametrize(
    ("per_million", "per_token"),
    [("2", 2000), ("0.15", 150), ("0.001", 1), ("0", 0), ("1.5", 1500), ("0.015", 15)],
)
def test_it_converts_published_prices_to_nanos_per_token(per_million, per_token):
    assert price_per_million_to_nanos(per_million) == per_token


@pytest.mark.parametrize(
    ("price", "problem"),
    [("0.0001", "not a whole number of nanodollars"), ("-1", "negative"), (0.15, "float")],
)
def test_it_refuses_inexact_or_negative_prices(price, problem):
    with pytest.raises(InvalidAmount, match=problem):
        price_per_million_to_nanos(price)


def test_cost_is_tokens_times_prices():
    assert Prices(150, 600).cost_nanos(1000, 500) == 1000 * 150 + 500 * 600


def test_prices_must_be_non_negative_integers():
    with pytest.raises(InvalidAmount):
        Prices(-1, 5)
    with pytest.raises(InvalidAmount):
        Prices(1.5, 5)
