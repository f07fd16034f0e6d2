"""Spend over a range of hours, for the console: the range an operator asked for, the
breakdowns per tenant, agent and model, the spend rate, spikes, and spend over time as
chart series (split by model).

Everything over a range reads the hourly rollups with GROUP BY in SQL, never the ledger,
so a page costs the same with a million ledger rows. Sums are integer nanodollars; the
chart series carry USD decimal strings (the browser turns them into numbers to draw).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

from django.core.cache import cache
from django.db.models import Count, Max, Min, Q, QuerySet, Sum

from budgets.errors import InvalidRequest
from budgets.models import Agent, BudgetPeriod, BudgetPolicy, ScopeType, Tenant
from budgets.money import nanos_to_usd
from spend.models import HourlyRollup, Spike
from spend.rollups import DEFAULT_LOOKBACK

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
MAX_RANGE_DAYS = 366
# Up to a week is charted per hour (168 bars at most); longer ranges per day.
HOURLY_UP_TO = timedelta(days=7)
TOP = 20
CHART_MODELS = 6  # the biggest models get a series each; the rest are "other models"
PRESETS = {"24h": "the last 24 hours", "7d": "the last 7 days", "30d": "the last 30 days"}
DEFAULT_PRESET = "24h"
PARAMS = ("range", "from", "to", "tenant")  # the spend page's query string
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def usd_rounded(nanos: int, places: int = 4) -> str:
    """A derived amount (an average) for display: USD rounded half up to `places`
    decimals, without trailing zeros. Sums are shown exactly with nanos_to_usd."""
    amount = (Decimal(nanos).scaleb(-9)).quantize(Decimal(1).scaleb(-places), ROUND_HALF_UP)
    return nanos_to_usd(int(amount.scaleb(9)))


def floor_hour(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def floor_day(moment: datetime) -> datetime:
    return floor_hour(moment).replace(hour=0)


def ceil(moment: datetime, step: timedelta) -> datetime:
    start = floor_day(moment) if step == DAY else floor_hour(moment)
    return start if start == moment else start + step


# --- The range ----------------------------------------------------------------------


@dataclass(frozen=True)
class SpendRange:
    """Whole UTC hours from `start` (included) to `end` (excluded)."""

    start: datetime
    end: datetime
    preset: str  # one of PRESETS, or "custom"

    @property
    def bucket(self) -> str:
        return "hour" if self.end - self.start <= HOURLY_UP_TO else "day"

    @property
    def first_day(self) -> date:
        return self.start.date()

    @property
    def last_day(self) -> date:
        return (self.end - HOUR).date()

    @property
    def label(self) -> str:
        if self.preset in PRESETS:
            return PRESETS[self.preset]
        if self.first_day == self.last_day:
            return f"{self.first_day:%Y-%m-%d}"
        return f"{self.first_day:%Y-%m-%d} to {self.last_day:%Y-%m-%d}"


def preset_range(preset: str, now: datetime) -> SpendRange:
    """The last 24 hours and 7 days end with the current hour; the last 30 days are whole
    days, today included (they are charted per day)."""
    if preset == "30d":
        end = floor_day(now) + DAY
        return SpendRange(end - 30 * DAY, end, preset)
    end = floor_hour(now) + HOUR
    return SpendRange(end - (HOUR * 24 if preset == "24h" else 7 * DAY), end, preset)


def _parse_day(name: str, text: str) -> date:
    try:
        if not _DATE.fullmatch(text):
            raise ValueError
        return date.fromisoformat(text)
    except ValueError:
        raise InvalidRequest(
            f"{name}: {text[:40]!r} is not a date; use YYYY-MM-DD, e.g. 2026-11-01.",
            {"fields": {name: ["use YYYY-MM-DD"]}},
        ) from None


def custom_range(first: str, last: str) -> SpendRange:
    """Whole UTC days from `first` to `last`, both included."""
    if not first or not last:
        missing = "from" if not first else "to"
        raise InvalidRequest(
            "A custom range needs both a from and a to date (YYYY-MM-DD).",
            {"fields": {missing: ["required for a custom range"]}},
        )
    first_day, last_day = _parse_day("from", first), _parse_day("to", last)
    if first_day > last_day:
        raise InvalidRequest(
            f"The from date ({first_day}) is after the to date ({last_day}).",
            {"fields": {"from": ["after the to date"]}},
        )
    days = (last_day - first_day).days + 1
    if days > MAX_RANGE_DAYS:
        raise InvalidRequest(
            f"The range is {days} days long; the longest is {MAX_RANGE_DAYS} days.",
            {"fields": {"to": [f"at most {MAX_RANGE_DAYS} days after from"]}},
        )
    start = datetime(first_day.year, first_day.month, first_day.day, tzinfo=UTC)
    try:
        return SpendRange(start, start + days * DAY, "custom")
    except OverflowError:  # the day after 9999-12-31
        raise InvalidRequest(
            "The to date is too far in the future.", {"fields": {"to": ["too far"]}}
        ) from None


def parse_range(preset: str, first: str, last: str, now: datetime) -> SpendRange:
    """A preset ("24h", "7d", "30d"), or from/to dates (preset "custom" or none)."""
    if preset in PRESETS:
        return preset_range(preset, now)
    if preset == "custom" or (not preset and (first or last)):
        return custom_range(first, last)
    if not preset:
        return preset_range(DEFAULT_PRESET, now)
    raise InvalidRequest(
        f"Unknown range {preset[:40]!r}: choose {', '.join(PRESETS)} or custom dates.",
        {"fields": {"range": [f"one of {', '.join(PRESETS)}, custom"]}},
    )


def tenant_named(customer_id: str) -> Tenant | None:
    """The tenant to filter by ("" for every tenant). Unknown: InvalidRequest."""
    if not customer_id:
        return None
    tenant = Tenant.objects.filter(stripe_customer_id=customer_id).first()
    if tenant is None:
        raise InvalidRequest(
            f"No tenant has the customer id {customer_id[:80]!r}.",
            {"fields": {"tenant": ["unknown tenant"]}},
        )
    return tenant


# --- Reading the rollups -------------------------------------------------------------

# rollup_hours recomputes only the last few hours; earlier hours are final, so their
# sums are cached (until the rollups are next written) and only recent hours are read
# on every refresh of the page.
SETTLED_AFTER = DEFAULT_LOOKBACK + HOUR
CACHE_SECONDS = 3600


def between(rollups: QuerySet[HourlyRollup], start: datetime, end: datetime | None = None):
    """Rollups of the hours from `start` to `end` (excluded). The rollups' only indexes
    on the hour are the two partial unique ones (rows with an agent, rows without);
    asking for either condition lets PostgreSQL scan both as one index on the hour."""
    rows = rollups.filter(Q(agent__isnull=False) | Q(agent__isnull=True), hour__gte=start)
    return rows if end is None else rows.filter(hour__lt=end)


def _rollups(tenant: Tenant | None) -> QuerySet[HourlyRollup]:
    rows = HourlyRollup.objects.all()
    return rows.filter(tenant=tenant) if tenant is not None else rows


@dataclass(frozen=True)
class Sums:
    """A stretch of hours summed two ways."""

    # (tenant_id, agent_id or None, model, cost_nanos, calls, prompt_tokens, completion_tokens)
    groups: list[tuple]
    # (hour, model, cost_nanos)
    hourly: list[tuple]

    def __add__(self, other: Sums) -> Sums:
        return Sums(self.groups + other.groups, self.hourly + other.hourly)


_SUMS = {
    "cost": Sum("cost_nanos"),
    "n": Sum("calls"),
    "prompt": Sum("prompt_tokens"),
    "completion": Sum("completion_tokens"),
}


def read_sums(tenant: Tenant | None, start: datetime, end: datetime) -> Sums:
    """Three GROUP BYs: agents' rollups by (agent, model) with the agent's tenant (MIN of
    one value: grouping by the agent alone lets PostgreSQL estimate the groups well and
    hash them in parallel), rollups without an agent by (tenant, model), and everything
    by (hour, model) for the chart."""
    rows = between(_rollups(tenant), start, end)
    groups = [
        (tenant_id, agent_id, model, *sums)
        for agent_id, model, tenant_id, *sums in rows.filter(agent__isnull=False)
        .values_list("agent_id", "model")
        .annotate(tenant=Min("tenant_id"), **_SUMS)
        .order_by()
    ]
    groups += [
        (tenant_id, None, model, *sums)
        for tenant_id, model, *sums in rows.filter(agent__isnull=True)
        .values_list("tenant_id", "model")
        .annotate(**_SUMS)
        .order_by()
    ]
    hourly = list(rows.values_list("hour", "model").annotate(s=Sum("cost_nanos")).order_by())
    return Sums(groups, hourly)


def range_sums(tenant: Tenant | None, start: datetime, end: datetime, now: datetime) -> Sums:
    """The sums of [start, end): the settled hours from the cache, the recent ones read."""
    settled = min(max(floor_hour(now) - SETTLED_AFTER, start), end)
    sums = Sums([], [])
    if settled > start:
        version = HourlyRollup.objects.aggregate(v=Max("id"))["v"]
        span = f"{int(start.timestamp())}-{int(settled.timestamp())}"
        key = f"console:spend:{tenant.pk if tenant else '*'}:{span}:{version}"
        cached = cache.get(key)
        if cached is None:
            sums = read_sums(tenant, start, settled)
            # Plain lists and tuples: nothing in the cache depends on this module's classes.
            cache.set(key, (sums.groups, sums.hourly), CACHE_SECONDS)
        else:
            sums = Sums(*cached)
    if end > settled:
        sums += read_sums(tenant, settled, end)
    return sums


# --- Spend over time ------------------------------------------------------------------


def series(hourly: Iterable[tuple], start: datetime, end: datetime, bucket: str) -> dict:
    """Spend per hour (or per day) from `start` to `end`, one series per model (the
    biggest CHART_MODELS; the rest summed as "other models"), for Chart.js via
    json_script. Amounts are USD decimal strings."""
    step = HOUR if bucket == "hour" else DAY
    cost: dict[str, dict[datetime, int]] = {}
    for hour, model, nanos in hourly:
        if not start <= hour < end:
            continue
        slot = floor_day(hour) if bucket == "day" else hour
        by_slot = cost.setdefault(model, {})
        by_slot[slot] = by_slot.get(slot, 0) + nanos
    slots = []
    moment = start
    while moment < end:
        slots.append(moment)
        moment += step
    total = sum(sum(by_slot.values()) for by_slot in cost.values())
    by_total = sorted(cost, key=lambda m: (-sum(cost[m].values()), m))
    shown, rest = by_total[:CHART_MODELS], by_total[CHART_MODELS:]
    if rest:
        other: dict[datetime, int] = {}
        for model in rest:
            for slot, nanos in cost[model].items():
                other[slot] = other.get(slot, 0) + nanos
        cost["other models"] = other
        shown.append("other models")
    label = "%m-%d %H:00" if bucket == "hour" else "%Y-%m-%d"
    return {
        "bucket": bucket,
        "labels": [f"{slot:{label}}" for slot in slots],
        "datasets": [
            {"label": model, "values": [nanos_to_usd(cost[model].get(s, 0)) for s in slots]}
            for model in shown
        ],
        "total_usd": nanos_to_usd(total),
    }


def _hourly(rollups: QuerySet[HourlyRollup], start: datetime, end: datetime) -> list[tuple]:
    return list(
        between(rollups, start, end)
        .values_list("hour", "model")
        .annotate(s=Sum("cost_nanos"))
        .order_by()
    )


def recent_series(now: datetime, hours: int = 24) -> dict:
    """Every tenant's spend per hour over the last `hours` hours, the current one included."""
    end = floor_hour(now) + HOUR
    start = end - hours * HOUR
    return series(_hourly(HourlyRollup.objects.all(), start, end), start, end, "hour")


def period_series(policy: BudgetPolicy, period: BudgetPeriod) -> dict | None:
    """The spend of a budget's scope over its period's whole window (later buckets
    empty): per hour up to a week, per day beyond. None for an end user's budget: the
    rollups are kept per tenant, agent and model, not per end user."""
    if policy.scope_type == ScopeType.TENANT:
        rollups = HourlyRollup.objects.filter(tenant_id=policy.tenant_id)
    elif policy.scope_type == ScopeType.AGENT:
        rollups = HourlyRollup.objects.filter(agent_id=policy.agent_id)
    else:
        return None
    start, end = period.window_start, period.ends_at
    bucket = "hour" if end - start <= HOURLY_UP_TO else "day"
    step = HOUR if bucket == "hour" else DAY
    first = floor_hour(start) if bucket == "hour" else floor_day(start)
    last = ceil(end, step)
    chart = series(_hourly(rollups, first, last), first, last, bucket)
    if first != start:
        chart["note"] = (
            f"Spend is rolled up per hour: the first {bucket} also counts what was spent "
            f"in it before the period began ({start:%Y-%m-%d %H:%M} UTC)."
        )
    return chart


# --- Breakdowns -----------------------------------------------------------------------


@dataclass
class Share:
    """One tenant's, agent's or model's part of the range's spend."""

    ident: object  # tenant id, (tenant id, agent id), or model name
    key: str = ""  # customer id, agent scope key ("cus_x:bot"), or model name
    name: str = ""
    tenant: Tenant | None = None
    spent_nanos: int = 0
    calls: int = 0
    tokens: int = 0
    percent: int = 0  # of the range's spend, rounded down

    @property
    def spent_usd(self) -> str:
        return nanos_to_usd(self.spent_nanos)


@dataclass(frozen=True)
class Breakdown:
    rows: list[Share]  # the TOP biggest
    more: int  # how many others
    more_nanos: int  # what the others spent

    @property
    def more_usd(self) -> str:
        return nanos_to_usd(self.more_nanos)


def _top(shares: Iterable[Share], total: int) -> Breakdown:
    ordered = sorted(shares, key=lambda s: (-s.spent_nanos, str(s.ident)))
    shown, rest = ordered[:TOP], ordered[TOP:]
    for share in shown:
        share.percent = 0 if total <= 0 else share.spent_nanos * 100 // total
    return Breakdown(shown, len(rest), sum(s.spent_nanos for s in rest))


def _name_tenants(shares: list[Share]) -> None:
    found = Tenant.objects.in_bulk([s.ident for s in shares])
    for share in shares:
        share.tenant = found.get(share.ident)
        share.key = share.tenant.stripe_customer_id if share.tenant else str(share.ident)
        share.name = share.tenant.name if share.tenant else "(deleted tenant)"


def _name_agents(shares: list[Share]) -> None:
    agents = Agent.objects.in_bulk(
        [agent_id for _, agent_id in (s.ident for s in shares) if agent_id is not None]
    )
    tenants = Tenant.objects.in_bulk([tenant_id for tenant_id, _ in (s.ident for s in shares)])
    for share in shares:
        tenant_id, agent_id = share.ident
        agent = agents.get(agent_id) if agent_id is not None else None
        share.tenant = tenants.get(tenant_id)
        share.name = agent.name if agent else "(no agent)"
        share.key = f"{share.tenant.stripe_customer_id}:{agent.name}" if agent else ""


@dataclass(frozen=True)
class Totals:
    spent_nanos: int = 0
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


def breakdowns(groups: Iterable[tuple]) -> tuple[Totals, Breakdown, Breakdown, Breakdown]:
    """Totals, and the biggest tenants, agents and models."""
    tenants: dict[object, Share] = {}
    agents: dict[object, Share] = {}
    models: dict[object, Share] = {}
    spent = calls = prompt = completion = 0
    for tenant_id, agent_id, model, cost, n, p, c in groups:
        for shares, ident in (
            (tenants, tenant_id),
            (agents, (tenant_id, agent_id)),
            (models, model),
        ):
            share = shares.get(ident)
            if share is None:
                share = shares[ident] = Share(ident)
            share.spent_nanos += cost
            share.calls += n
            share.tokens += p + c
        spent, calls, prompt, completion = spent + cost, calls + n, prompt + p, completion + c
    for model, share in models.items():
        share.key = share.name = model
    top_tenants, top_agents = _top(tenants.values(), spent), _top(agents.values(), spent)
    _name_tenants(top_tenants.rows)
    _name_agents(top_agents.rows)
    return (
        Totals(spent, calls, prompt, completion),
        top_tenants,
        top_agents,
        _top(models.values(), spent),
    )


# --- Rate, spikes, and the whole analysis ---------------------------------------------


@dataclass(frozen=True)
class Rate:
    elapsed_seconds: int  # of the range, up to now
    total_nanos: int
    last_hour: datetime | None  # the last whole hour of the range
    last_hour_nanos: int

    @property
    def per_hour_nanos(self) -> int | None:
        if self.elapsed_seconds <= 0:
            return None
        return self.total_nanos * 3600 // self.elapsed_seconds

    @property
    def per_day_nanos(self) -> int | None:
        if self.elapsed_seconds <= 0:
            return None
        return self.total_nanos * 86400 // self.elapsed_seconds

    @property
    def per_hour_usd(self) -> str:
        return "" if self.per_hour_nanos is None else usd_rounded(self.per_hour_nanos)

    @property
    def per_day_usd(self) -> str:
        return "" if self.per_day_nanos is None else usd_rounded(self.per_day_nanos)

    @property
    def last_hour_usd(self) -> str:
        return nanos_to_usd(self.last_hour_nanos)

    @property
    def last_hour_ratio(self) -> str:
        """The last hour against the average hour, as "3.2x" (tenths, rounded down)."""
        average = self.per_hour_nanos
        if self.last_hour is None or not average:
            return ""
        tenths = self.last_hour_nanos * 10 // average
        return f"{tenths // 10}.{tenths % 10}x"


def spend_rate(spend_range: SpendRange, sums: Sums, total: int, now: datetime) -> Rate:
    """The range's average over the part of it that has passed, against its last whole
    hour (for a range that runs to now: the hour before the current one)."""
    elapsed = min(spend_range.end, now) - spend_range.start
    last_end = min(spend_range.end, floor_hour(now))
    last_hour = last_end - HOUR if last_end - HOUR >= spend_range.start else None
    last_nanos = sum(nanos for hour, _, nanos in sums.hourly if hour == last_hour)
    return Rate(max(0, int(elapsed.total_seconds())), total, last_hour, last_nanos)


def spikes_in(spend_range: SpendRange, tenant: Tenant | None, limit: int = TOP):
    """The latest `limit` spikes in the range, and how many there are in all."""
    found = Spike.objects.filter(hour__gte=spend_range.start, hour__lt=spend_range.end)
    if tenant is not None:
        found = found.filter(tenant=tenant)
    shown = list(found.select_related("tenant", "agent").order_by("-hour", "-id")[:limit])
    count = len(shown) if len(shown) < limit else found.aggregate(n=Count("id"))["n"]
    return shown, count


@dataclass(frozen=True)
class SpendAnalysis:
    spend_range: SpendRange
    tenant: Tenant | None
    totals: Totals
    tenants: Breakdown
    agents: Breakdown
    models: Breakdown
    rate: Rate
    spikes: list[Spike]
    spike_count: int
    chart: dict = field(repr=False)

    @property
    def total_usd(self) -> str:
        return nanos_to_usd(self.totals.spent_nanos)


def analyse(spend_range: SpendRange, tenant: Tenant | None, now: datetime) -> SpendAnalysis:
    sums = range_sums(tenant, spend_range.start, spend_range.end, now)
    totals, tenants, agents, models = breakdowns(sums.groups)
    spikes, spike_count = spikes_in(spend_range, tenant)
    return SpendAnalysis(
        spend_range=spend_range,
        tenant=tenant,
        totals=totals,
        tenants=tenants,
        agents=agents,
        models=models,
        rate=spend_rate(spend_range, sums, totals.spent_nanos, now),
        spikes=spikes,
        spike_count=spike_count,
        chart=series(sums.hourly, spend_range.start, spend_range.end, spend_range.bucket),
    )
