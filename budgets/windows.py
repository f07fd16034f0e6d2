"""Where a budget window starts and ends. All windows are in UTC."""

from __future__ import annotations

import calendar
from datetime import UTC, datetime, timedelta

from .models import Window


def add_months(moment: datetime, months: int) -> datetime:
    """Same day and time `months` later, the day clamped to the month's length
    (Jan 31 + 1 month = Feb 28/29), as Stripe does for billing anchors."""
    index = moment.month - 1 + months
    year, month = moment.year + index // 12, index % 12 + 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)


def _calendar_month(now: datetime) -> tuple[datetime, datetime]:
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return start, add_months(start, 1)


def _whole_months_between(start: datetime, end: datetime) -> int | None:
    months = (end.year - start.year) * 12 + end.month - start.month
    if months > 0 and add_months(start, months) == end:
        return months
    return None


def billing_cycle_bounds(
    now: datetime, period_start: datetime | None, period_end: datetime | None
) -> tuple[datetime, datetime]:
    """The billing period containing `now`.

    Known and current: Stripe's own period. Known but over (the renewal webhook is late or
    lost): the same cycle rolled forward from its anchor, so the budget still resets on
    time. Unknown: the calendar month.
    """
    if period_start is None or period_end is None or period_end <= period_start:
        return _calendar_month(now)
    if now < period_start:
        return _calendar_month(now)
    if now < period_end:
        return period_start, period_end
    months = _whole_months_between(period_start, period_end)
    if months is not None:
        # Count from the anchor so Jan 31 -> Feb 28 -> Mar 31 does not drift.
        cycles = 1
        while add_months(period_start, months * (cycles + 1)) <= now:
            cycles += 1
        return add_months(period_start, months * cycles), add_months(
            period_start, months * (cycles + 1)
        )
    length = period_end - period_start
    cycles = (now - period_start) // length
    start = period_start + cycles * length
    return start, start + length


def window_bounds(
    window: str,
    now: datetime,
    *,
    billing_period_start: datetime | None = None,
    billing_period_end: datetime | None = None,
) -> tuple[datetime, datetime]:
    now = now.astimezone(UTC)
    if window == Window.HOUR:
        start = now.replace(minute=0, second=0, microsecond=0)
        return start, start + timedelta(hours=1)
    if window == Window.DAY:
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return start, start + timedelta(days=1)
    if window == Window.WEEK:
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        start = day - timedelta(days=day.weekday())
        return start, start + timedelta(weeks=1)
    if window == Window.MONTH:
        return _calendar_month(now)
    if window == Window.BILLING_CYCLE:
        return billing_cycle_bounds(
            now,
            billing_period_start and billing_period_start.astimezone(UTC),
            billing_period_end and billing_period_end.astimezone(UTC),
        )
    raise ValueError(f"unknown window {window!r}")
