"""Money: integer nanodollars everywhere it is stored or summed; Decimal only at the
edges, where USD strings come in and go out. Never float."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

NANOS_PER_USD = 1_000_000_000
# Prices are published per million tokens; one USD per 1M tokens is 1000 nanos a token.
NANOS_PER_TOKEN_PER_USD_PER_MILLION = NANOS_PER_USD // 1_000_000
# A bound that leaves BigIntegerField (9.2e18) room for a hard cap of up to 10x the
# limit and for sums of many amounts: 100 million USD.
MAX_NANOS = 10**17


class InvalidAmount(ValueError):
    """A USD amount or price that cannot be represented exactly in nanodollars."""


def _to_decimal(value: str | int | Decimal) -> Decimal:
    if isinstance(value, bool):
        raise InvalidAmount(f"{value!r} is not an amount of USD")
    if isinstance(value, float):
        # A float has already lost exactness (0.1 is not 0.1); make the caller pass a string.
        raise InvalidAmount(f'{value!r} is a float; pass USD as a decimal string such as "12.5"')
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, Decimal):
        amount = value
    elif isinstance(value, str):
        text = value.strip()
        if not text:
            raise InvalidAmount("an amount is required")
        try:
            amount = Decimal(text)
        except InvalidOperation:
            raise InvalidAmount(f"{value!r} is not a decimal number of USD") from None
    else:
        raise InvalidAmount(f"{value!r} is not a decimal number of USD")
    if not amount.is_finite():
        raise InvalidAmount(f"{value!r} is not a finite amount")
    return amount


def usd_to_nanos(value: str | int | Decimal) -> int:
    """ "12.5" -> 12_500_000_000. Refuses anything finer than one nanodollar."""
    amount = _to_decimal(value)
    nanos = amount.scaleb(9)
    if nanos != nanos.to_integral_value():
        raise InvalidAmount(f"{value!r} has more precision than one nanodollar (0.000000001 USD)")
    result = int(nanos)
    if abs(result) > MAX_NANOS:
        raise InvalidAmount(
            f"{value!r} is larger than the maximum of {nanos_to_usd(MAX_NANOS)} USD"
        )
    return result


def nanos_to_usd(nanos: int) -> str:
    """12_500_000_000 -> "12.5": exact, no exponent, no trailing zeros."""
    if isinstance(nanos, bool) or not isinstance(nanos, int):
        raise TypeError(f"nanodollars are integers, got {nanos!r}")
    text = format(Decimal(nanos).scaleb(-9), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def price_per_million_to_nanos(value: str | int | Decimal) -> int:
    """A published price (USD per 1M tokens) as exact nanodollars per token:
    "2" -> 2000, "0.15" -> 150. "0.0000001" is refused (0.0001 nanos a token)."""
    amount = _to_decimal(value)
    if amount < 0:
        raise InvalidAmount(f"{value!r}: a price cannot be negative")
    per_token = amount * NANOS_PER_TOKEN_PER_USD_PER_MILLION
    if per_token != per_token.to_integral_value():
        raise InvalidAmount(
            f"{value!r} USD per million tokens is not a whole number of nanodollars per "
            "token (prices must be multiples of 0.001 USD per million)"
        )
    return int(per_token)


@dataclass(frozen=True, slots=True)
class Prices:
    """Unit prices of one model, in nanodollars per token."""

    input_nanos: int
    output_nanos: int

    def __post_init__(self) -> None:
        for name in ("input_nanos", "output_nanos"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidAmount(f"{name} must be a non-negative integer, got {value!r}")

    def cost_nanos(self, input_tokens: int, output_tokens: int) -> int:
        """The exact cost of a call; the one place a cost is computed."""
        if input_tokens < 0 or output_tokens < 0:
            raise ValueError("token counts cannot be negative")
        return input_tokens * self.input_nanos + output_tokens * self.output_nanos
