from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from budgets.models import Plan, Window
from budgets.money import usd_to_nanos
from budgets.windows import add_months

from .stripe_objects import SECRET


@pytest.fixture(autouse=True)
def stripe_webhooks(settings):
    settings.STRIPE_WEBHOOK_SECRET = SECRET
    settings.STRIPE_WEBHOOK_TOLERANCE_SECONDS = 300
    settings.PAYMENT_FAILED_GRACE_HOURS = 72


@pytest.fixture
def plans(db) -> dict[str, Plan]:
    return {
        "basic": Plan.objects.create(
            name="Basic",
            stripe_price="price_basic",
            limit_nanos=usd_to_nanos("10"),
            window=Window.BILLING_CYCLE,
        ),
        # Named by its lookup key, as an admin would to survive a price change.
        "pro": Plan.objects.create(
            name="Pro",
            stripe_price="pro_monthly",
            limit_nanos=usd_to_nanos("100"),
            window=Window.BILLING_CYCLE,
        ),
        "default": Plan.objects.create(
            name="Starter",
            is_default=True,
            limit_nanos=usd_to_nanos("1"),
            window=Window.BILLING_CYCLE,
        ),
    }


@pytest.fixture
def period() -> tuple[datetime, datetime]:
    """The current billing period: began five days ago, ends a month after."""
    start = (datetime.now(UTC) - timedelta(days=5)).replace(microsecond=0)
    return start, add_months(start, 1)


@pytest.fixture
def previous_period(period) -> tuple[datetime, datetime]:
    return add_months(period[0], -1), period[0]
