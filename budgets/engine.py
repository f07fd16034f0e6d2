"""The budget engine: which periods govern a call, and holds on them.

Like a card payment: authorize sets an upper bound of the call's cost aside on every
matching period with a conditional UPDATE (all of them or none), capture moves the actual
cost into spent and releases the hold, void and expiry release it. Nothing reads a
balance and then writes it: the database decides, row by row, in period-id order so two
transactions never wait on each other in a circle.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_FLOOR, Decimal

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import Exists, F, OuterRef, Subquery
from django.utils import timezone

from spend.models import SpendEntry

from . import sql
from .errors import (
    AgentPaused,
    BudgetExceeded,
    HoldConflict,
    HoldNotFound,
    InvalidRequest,
    SubscriptionInactive,
)
from .models import (
    STATE_SEVERITY,
    Agent,
    BudgetEvent,
    BudgetPeriod,
    BudgetPolicy,
    EventKind,
    Hold,
    HoldLine,
    HoldStatus,
    PeriodState,
    PolicySource,
    ScopeType,
    Tenant,
    Window,
)
from .money import Prices
from .windows import window_bounds

log = logging.getLogger(__name__)

MAX_USER_KEY = 128
MAX_REQUEST_ID = 128
# A refused conditional update re-reads the periods and tries again this many times,
# so a call that lost a race to a concurrent one is clamped rather than refused.
AUTHORIZE_ATTEMPTS = 3

_EVENT_FOR_STATE = {
    PeriodState.WARNED: EventKind.WARNED,
    PeriodState.DEGRADED: EventKind.DEGRADED,
    PeriodState.STOPPED: EventKind.STOPPED,
}


# --- Scope keys ---------------------------------------------------------------------


def validate_user_key(user_key: str) -> str:
    if len(user_key) > MAX_USER_KEY:
        raise InvalidRequest(f"end-user key is longer than {MAX_USER_KEY} characters")
    if user_key and not user_key.isprintable():
        raise InvalidRequest("end-user key contains control characters")
    return user_key


def tenant_scope_key(tenant: Tenant) -> str:
    return tenant.stripe_customer_id


def agent_scope_key(agent: Agent) -> str:
    return f"{agent.tenant.stripe_customer_id}:{agent.name}"


def user_scope_key(tenant: Tenant, user_key: str) -> str:
    return f"{tenant.stripe_customer_id}:{user_key}"


# --- Thresholds and state -------------------------------------------------------------


def threshold_nanos(limit_nanos: int, fraction: Decimal) -> int:
    """A threshold in nanodollars; a state is reached when spent >= it."""
    return int((Decimal(limit_nanos) * fraction).to_integral_value(rounding=ROUND_FLOOR))


def thresholds_of(policy: BudgetPolicy) -> dict[str, int]:
    return {
        "limit_nanos": policy.limit_nanos,
        "warn_nanos": threshold_nanos(policy.limit_nanos, policy.warn_at),
        "soft_nanos": threshold_nanos(policy.limit_nanos, policy.soft_cap),
        "hard_nanos": threshold_nanos(policy.limit_nanos, policy.hard_cap),
    }


def state_for(spent_nanos: int, warn_nanos: int, soft_nanos: int, hard_nanos: int) -> str:
    if spent_nanos >= hard_nanos:
        return PeriodState.STOPPED
    if spent_nanos >= soft_nanos:
        return PeriodState.DEGRADED
    if spent_nanos >= warn_nanos:
        return PeriodState.WARNED
    return PeriodState.ACTIVE


def _events_for_transition(
    period_id: int, old: str, new: str, spent_nanos: int, limit_nanos: int, detail: str = ""
) -> list[BudgetEvent]:
    old_rank, new_rank = STATE_SEVERITY[old], STATE_SEVERITY[new]
    if new_rank < old_rank:
        kinds = [EventKind.RECOVERED]
    else:
        # A jump from active to stopped crosses every threshold on the way; record each.
        kinds = [
            _EVENT_FOR_STATE[state]
            for state, rank in STATE_SEVERITY.items()
            if old_rank < rank <= new_rank
        ]
    return [
        BudgetEvent(
            period_id=period_id,
            kind=kind,
            spent_nanos=spent_nanos,
            limit_nanos=limit_nanos,
            detail=detail,
        )
        for kind in kinds
    ]


def _refresh_states(period_ids: Iterable[int], detail: str = "") -> list[BudgetPeriod]:
    """Re-evaluate the state of these periods from their committed spend, store changes
    and record each crossing once. Call inside the transaction that changed them."""
    periods = list(BudgetPeriod.objects.filter(id__in=list(period_ids)).order_by("id"))
    events: list[BudgetEvent] = []
    for period in periods:
        new = state_for(period.spent_nanos, period.warn_nanos, period.soft_nanos, period.hard_nanos)
        if new != period.state:
            events += _events_for_transition(
                period.pk, period.state, new, period.spent_nanos, period.limit_nanos, detail
            )
            BudgetPeriod.objects.filter(pk=period.pk).update(state=new)
            period.state = new
    if events:
        BudgetEvent.objects.bulk_create(events, ignore_conflicts=True)
    return periods


# --- Policies and periods -----------------------------------------------------------


def _default_policy_values(scope_type: str, tenant: Tenant) -> dict | None:
    if scope_type == ScopeType.TENANT and tenant.plan_id is not None:
        plan = tenant.plan
        return {
            "limit_nanos": plan.limit_nanos,
            "window": plan.window,
            "warn_at": plan.warn_at,
            "soft_cap": plan.soft_cap,
            "hard_cap": plan.hard_cap,
            "strategy": plan.strategy,
            "disabled_tools": plan.disabled_tools,
            "velocity_limit_nanos": plan.velocity_limit_nanos,
            "auto_pause": plan.auto_pause,
            "source": PolicySource.PLAN,
        }
    limit = _default_limit(scope_type)
    if limit is None:
        return None
    return {"limit_nanos": limit, "window": Window.DAY, "source": PolicySource.DEFAULT}


def _default_limit(scope_type: str) -> int | None:
    return {
        ScopeType.TENANT: settings.DEFAULT_DAILY_BUDGET_NANOS,
        ScopeType.AGENT: settings.DEFAULT_AGENT_DAILY_BUDGET_NANOS,
        ScopeType.USER: settings.DEFAULT_USER_DAILY_BUDGET_NANOS,
    }[scope_type]


def _has_default(scope_type: str, tenant: Tenant) -> bool:
    """Whether a scope without a policy gets a default one (_default_policy_values is
    not None), without reading the tenant's plan."""
    if scope_type == ScopeType.TENANT and tenant.plan_id is not None:
        return True
    return _default_limit(scope_type) is not None


def _wanted_scopes(tenant: Tenant, agent: Agent | None, user_key: str) -> dict[str, tuple]:
    """The scopes that govern a call: {scope type: (scope key, the policy's ties)}."""
    wanted = {ScopeType.TENANT: (tenant_scope_key(tenant), {})}
    if agent is not None:
        wanted[ScopeType.AGENT] = (agent_scope_key(agent), {"agent": agent})
    if user_key:
        wanted[ScopeType.USER] = (user_scope_key(tenant, user_key), {"user_key": user_key})
    return wanted


def _default_policies(tenant: Tenant, wanted: dict[str, tuple], found: set[str]) -> list:
    """The default policies of the wanted scopes that have none, created on first use.
    A disabled policy counts as the scope's choice: no default replaces it."""
    created = []
    for scope_type, (scope_key, ties) in wanted.items():
        if scope_type in found:
            continue
        values = _default_policy_values(scope_type, tenant)
        if values is None:
            continue
        policy, _ = BudgetPolicy.objects.get_or_create(
            scope_type=scope_type,
            scope_key=scope_key,
            defaults={"tenant": tenant, **ties, **values},
        )
        created.append(policy)
    return created


def open_period(policy: BudgetPolicy, now: datetime, tenant: Tenant | None = None) -> BudgetPeriod:
    """The policy's period containing `now`, created on first use. Concurrent first uses
    create one row: the loser of the insert reads the winner's."""
    current = (
        BudgetPeriod.objects.filter(
            policy=policy, closed_at__isnull=True, window_start__lte=now, window_end__gt=now
        )
        .order_by("-window_start")
        .first()
    )
    if current is not None:
        return current
    tenant = tenant or policy.tenant
    start, end = window_bounds(
        policy.window,
        now,
        billing_period_start=tenant.billing_period_start,
        billing_period_end=tenant.billing_period_end,
    )
    previous = (
        BudgetPeriod.objects.filter(policy=policy, window_start__lt=end)
        .order_by("-window_start")
        .first()
    )
    if previous is not None and previous.ends_at > start:
        # The window changed shape, or a reset ended the last period inside this window:
        # never overlap the period before.
        start = previous.ends_at
    try:
        with transaction.atomic():
            period = BudgetPeriod.objects.create(
                policy=policy, window_start=start, window_end=end, **thresholds_of(policy)
            )
            if previous is not None:
                BudgetEvent.objects.create(
                    period=period,
                    kind=EventKind.RESET,
                    spent_nanos=previous.spent_nanos,
                    limit_nanos=previous.limit_nanos,
                    detail="new window",
                )
    except IntegrityError:
        period = BudgetPeriod.objects.filter(
            policy=policy, closed_at__isnull=True, window_start__lte=now, window_end__gt=now
        ).first()
        if period is None:
            raise
    return period


# --- The scope of a call ------------------------------------------------------------


@dataclass
class BudgetScope:
    """The periods that govern one call, as read at `now`."""

    tenant: Tenant
    agent: Agent | None
    user_key: str
    now: datetime
    periods: list[BudgetPeriod] = field(default_factory=list)

    @property
    def state(self) -> str:
        if not self.periods:
            return PeriodState.ACTIVE
        return max((p.state for p in self.periods), key=lambda s: STATE_SEVERITY[s])

    @property
    def stopped_period(self) -> BudgetPeriod | None:
        return next((p for p in self.periods if p.state == PeriodState.STOPPED), None)

    @property
    def binding_period(self) -> BudgetPeriod | None:
        """The period with the least left: the one that decides how much a call may cost."""
        return min(self.periods, key=lambda p: p.remaining_nanos, default=None)

    @property
    def remaining_nanos(self) -> int | None:
        """What the tightest budget has left after spend and holds; None if unlimited."""
        period = self.binding_period
        return None if period is None else period.remaining_nanos

    @property
    def disabled_tools(self) -> list[str]:
        """Tools removed from calls: those of every policy whose period is degraded or worse."""
        tools: list[str] = []
        for period in self.periods:
            if STATE_SEVERITY[period.state] >= STATE_SEVERITY[PeriodState.DEGRADED]:
                tools += [t for t in period.policy.disabled_tools if t not in tools]
        return tools

    def affordable_output_tokens(self, prices: Prices, input_tokens: int) -> int | None:
        """How many output tokens of a model at `prices` these budgets can pay for after
        the input; None when no budget limits it. Negative input headroom gives 0."""
        remaining = self.remaining_nanos
        if remaining is None:
            return None
        left = remaining - prices.cost_nanos(input_tokens, 0)
        if left < 0:
            return 0
        if prices.output_nanos == 0:
            return None
        return left // prices.output_nanos


def check_access(tenant: Tenant, agent: Agent | None) -> None:
    if tenant.status != Tenant.Status.ACTIVE:
        raise SubscriptionInactive(
            f"tenant {tenant.stripe_customer_id} is {tenant.status}"
            + (f": {tenant.status_reason}" if tenant.status_reason else ""),
            {"tenant": tenant.stripe_customer_id},
        )
    if agent is not None and agent.paused:
        raise AgentPaused(
            f"agent {agent.name} is paused"
            + (f": {agent.paused_reason}" if agent.paused_reason else ""),
            {"agent": agent.name},
        )


def state_of(
    tenant: Tenant, agent: Agent | None = None, user_key: str = "", now: datetime | None = None
) -> BudgetScope:
    """The budgets that govern a call by this tenant, agent and end user, right now:
    one statement when every policy and its current period exist."""
    now = now or timezone.now()
    validate_user_key(user_key)
    rows = sql.policies_with_open_periods(
        tenant.pk, agent.pk if agent is not None else None, user_key, now
    )
    return scope_of(tenant, agent, user_key, now, rows)


def scope_of(
    tenant: Tenant,
    agent: Agent | None,
    user_key: str,
    now: datetime,
    rows: list[tuple[BudgetPolicy, BudgetPeriod | None]],
) -> BudgetScope:
    """The scope from the matching policies and their open periods as read: the
    missing default policies and periods are created."""
    policies: dict[int, BudgetPolicy] = {}
    current: dict[int, BudgetPeriod] = {}
    for policy, period in rows:  # ordered by window start: the latest open one wins
        policies[policy.pk] = policy
        if period is not None:
            current[policy.pk] = period
    wanted = _wanted_scopes(tenant, agent, user_key)
    found = {p.scope_type for p in policies.values()}
    for policy in _default_policies(tenant, wanted, found):
        policies[policy.pk] = policy
    periods = []
    for policy in policies.values():
        if not policy.enabled:
            continue
        period = current.get(policy.pk) or open_period(policy, now, tenant)
        period.policy = policy
        periods.append(period)
    periods.sort(key=lambda p: p.pk)
    return BudgetScope(tenant, agent, user_key, now, periods)


def budget_exceeded(period: BudgetPeriod, message: str) -> BudgetExceeded:
    return BudgetExceeded(
        message,
        scope_type=period.policy.scope_type,
        scope_key=period.policy.scope_key,
        spent_nanos=period.spent_nanos,
        held_nanos=period.held_nanos,
        limit_nanos=period.limit_nanos,
        resets_at=period.window_end,
        state=period.state,
    )


# --- Holds --------------------------------------------------------------------------


class _Refused(Exception):
    def __init__(self, period_id: int) -> None:
        self.period_id = period_id


def _grant_output_tokens(
    scope: BudgetScope, prices: Prices, input_tokens: int, max_output_tokens: int, min_output: int
) -> int:
    affordable = scope.affordable_output_tokens(prices, input_tokens)
    if affordable is None or affordable >= max_output_tokens:
        return max_output_tokens
    if affordable < min(min_output, max_output_tokens):
        period = scope.binding_period
        raise budget_exceeded(
            period,
            f"the {period.policy.scope_type} budget {period.policy.scope_key} cannot pay for "
            f"{min(min_output, max_output_tokens)} output tokens of this model",
        )
    return affordable


def authorize(
    scope: BudgetScope,
    *,
    request_id: str,
    model: str,
    prices: Prices,
    input_tokens: int,
    max_output_tokens: int,
    min_output_tokens: int | None = None,
    ttl: timedelta | None = None,
) -> Hold:
    """Set aside the upper-bound cost of a call on every period of `scope`, or refuse.

    `input_tokens` is an upper bound of the prompt; `max_output_tokens` is what the
    client asked for (or the model's maximum). If the budgets cannot pay for that many,
    the hold is for as many as they can (the hold's max_output_tokens), down to
    `min_output_tokens`; below that the call is refused with BudgetExceeded.
    Idempotent by request_id: the same id returns the hold it already has.
    """
    _check_hold_request(request_id, input_tokens, max_output_tokens)
    check_access(scope.tenant, scope.agent)
    min_output = settings.MIN_OUTPUT_TOKENS if min_output_tokens is None else min_output_tokens
    ttl = ttl or timedelta(seconds=settings.HOLD_TTL_SECONDS)

    refused_period_id = None
    for attempt in range(AUTHORIZE_ATTEMPTS):
        stopped = scope.stopped_period
        if stopped is not None:
            raise budget_exceeded(
                stopped,
                f"the {stopped.policy.scope_type} budget {stopped.policy.scope_key} is used up",
            )
        granted = _grant_output_tokens(scope, prices, input_tokens, max_output_tokens, min_output)
        try:
            return _place_hold(scope, request_id, model, prices, input_tokens, granted, ttl)
        except _Refused as refused:
            # Someone else took budget (or reset the period) since we read it: read again.
            refused_period_id = refused.period_id
            log.debug("hold refused on period %s, attempt %s", refused_period_id, attempt + 1)
            scope = state_of(scope.tenant, scope.agent, scope.user_key, scope.now)
        except IntegrityError:
            existing = Hold.objects.filter(request_id=request_id).first()
            if existing is None:
                raise
            if existing.tenant_id != scope.tenant.pk:
                raise InvalidRequest("this request id is already used") from None
            return existing
    period = next((p for p in scope.periods if p.pk == refused_period_id), scope.binding_period)
    if period is None:  # pragma: no cover - a refusal always names a period
        raise BudgetExceeded("budget exceeded")
    raise budget_exceeded(
        period,
        f"the {period.policy.scope_type} budget {period.policy.scope_key} has too little left",
    )


def _check_hold_request(request_id: str, input_tokens: int, max_output_tokens: int) -> None:
    if not request_id or len(request_id) > MAX_REQUEST_ID or not request_id.isprintable():
        raise InvalidRequest(f"request id must be 1-{MAX_REQUEST_ID} printable characters")
    if input_tokens < 0:
        raise InvalidRequest("input tokens cannot be negative")
    if max_output_tokens < 1:
        raise InvalidRequest("max_tokens must be at least 1")


def authorizes_in_one_statement() -> bool:
    """Whether place_plain_hold can place a hold here (PostgreSQL)."""
    return connection.vendor == "postgresql"


@dataclass
class PlainHold:
    """The hold of a common call, not placed yet: what place_plain_hold sends to the
    database in one statement (sql.read_and_hold_sql), here or from the gateway's event
    loop (budgets.pgloop)."""

    tenant: Tenant
    agent: Agent | None
    user_key: str
    now: datetime
    hold: Hold
    required: list[str]
    policy_strategy_matters: bool

    def params(self, db) -> dict:
        """The statement's parameters; `db` is the Django connection it runs on."""
        return sql.read_and_hold_params(
            self.hold,
            self.agent.pk if self.agent is not None else None,
            self.now,
            required=self.required,
            no_policy_strategy=self.policy_strategy_matters,
            db=db,
        )

    def outcome(self, hold_id, rows, locked, alias: str) -> tuple[BudgetScope | None, Hold | None]:
        """(the scope after the hold, the hold) if the statement placed it. Otherwise
        (None, None): the rows (as read, updated in place with what the statement locked)
        are for scope_of(), which may create default policies and periods (the ORM)."""
        for _, period in rows:  # what the statement locked is newer than what it read
            if period is not None and period.pk in locked:
                period.spent_nanos, period.held_nanos, period.state = locked[period.pk]
        if hold_id is None:
            return None, None
        # Held: every policy had its period and default, so this creates nothing.
        scope = scope_of(self.tenant, self.agent, self.user_key, self.now, rows)
        hold = self.hold
        hold.pk, hold._state.adding, hold._state.db = hold_id, False, alias
        return scope, hold


def plain_hold(
    tenant: Tenant,
    agent: Agent | None,
    user_key: str,
    *,
    request_id: str,
    model: str,
    prices: Prices,
    input_tokens: int,
    max_output_tokens: int,
    policy_strategy_matters: bool,
    now: datetime | None = None,
) -> PlainHold:
    """The common call's hold (place_plain_hold), checked but not placed."""
    _check_hold_request(request_id, input_tokens, max_output_tokens)
    validate_user_key(user_key)
    check_access(tenant, agent)
    now = now or timezone.now()
    wanted = _wanted_scopes(tenant, agent, user_key)
    hold = _new_hold(
        tenant, agent, user_key, now, request_id, model, prices, input_tokens, max_output_tokens
    )
    return PlainHold(
        tenant,
        agent,
        user_key,
        now,
        hold,
        required=[scope_type for scope_type in wanted if _has_default(scope_type, tenant)],
        policy_strategy_matters=policy_strategy_matters,
    )


def place_plain_hold(plain: PlainHold) -> tuple[BudgetScope | None, Hold | None]:
    """The common call, read and held in one statement (PostgreSQL), from this thread:
    every budget is below its soft cap and can pay for all of its max_output_tokens, no
    budget is new (a policy or period to create), and, if `policy_strategy_matters`, no
    policy picks a routing strategy. Then the hold is what authorize(state_of(...), ...)
    would place, and this returns (the scope after the hold, the hold).

    Otherwise nothing is held and it returns (state_of's scope, None), read in the
    same statement, for the general decision. (None, None) where the statement does
    not apply: other databases, or a request id already used."""
    if not authorizes_in_one_statement():
        return None, None
    try:
        hold_id, rows, locked = sql.read_and_hold_postgres(plain)
    except IntegrityError:  # the request id is taken: authorize() tells whose it is
        return None, None
    scope, hold = plain.outcome(hold_id, rows, locked, connection.alias)
    if hold is None:
        return scope_of(plain.tenant, plain.agent, plain.user_key, plain.now, rows), None
    return scope, hold


def _new_hold(
    tenant: Tenant,
    agent: Agent | None,
    user_key: str,
    now: datetime,
    request_id: str,
    model: str,
    prices: Prices,
    input_tokens: int,
    granted: int,
    ttl: timedelta | None = None,
) -> Hold:
    """A hold of `granted` output tokens (not saved)."""
    ttl = ttl or timedelta(seconds=settings.HOLD_TTL_SECONDS)
    return Hold(
        request_id=request_id,
        tenant=tenant,
        agent=agent,
        user_key=user_key,
        model=model,
        input_price_nanos=prices.input_nanos,
        output_price_nanos=prices.output_nanos,
        input_tokens=input_tokens,
        max_output_tokens=granted,
        amount_nanos=prices.cost_nanos(input_tokens, granted),
        expires_at=now + ttl,
    )


def _place_hold(
    scope: BudgetScope,
    request_id: str,
    model: str,
    prices: Prices,
    input_tokens: int,
    granted: int,
    ttl: timedelta,
) -> Hold:
    ids = [period.pk for period in scope.periods]  # sorted by id: a fixed lock order
    hold = _new_hold(
        scope.tenant,
        scope.agent,
        scope.user_key,
        scope.now,
        request_id,
        model,
        prices,
        input_tokens,
        granted,
        ttl,
    )
    if connection.vendor == "postgresql" and ids:
        hold_id, taken, refused = sql.place_hold_postgres(hold, ids)
        if hold_id is None:
            raise _Refused(refused or next(pk for pk in ids if pk not in taken))
        hold.pk, hold._state.adding, hold._state.db = hold_id, False, connection.alias
    else:
        with transaction.atomic():
            taken = sql.take(ids, hold.amount_nanos) if ids else {}
            if len(taken) != len(ids):
                raise _Refused(next(pk for pk in ids if pk not in taken))
            sql.insert(hold)
            if ids:
                sql.insert_lines(hold.pk, ids, hold.amount_nanos)
    for period in scope.periods:
        period.spent_nanos, period.held_nanos = taken[period.pk]
    return hold


def _release(lines: Iterable[HoldLine], spent_nanos: int = 0, release_hold: bool = True) -> None:
    """Move `spent_nanos` into each line's period and give back what the line held."""
    for line in sorted(lines, key=lambda line: line.period_id):
        changes = {}
        if spent_nanos:
            changes["spent_nanos"] = F("spent_nanos") + spent_nanos
        if release_hold and line.amount_nanos:
            changes["held_nanos"] = F("held_nanos") - line.amount_nanos
        if changes:
            BudgetPeriod.objects.filter(pk=line.period_id).update(**changes)


def _locked_hold(hold: Hold | str) -> Hold:
    request_id = hold if isinstance(hold, str) else hold.request_id
    try:
        return Hold.objects.select_for_update().get(request_id=request_id)
    except Hold.DoesNotExist:
        raise HoldNotFound(f"no authorization with request id {request_id!r}") from None


def capture(
    hold: Hold | str,
    *,
    prompt_tokens: int,
    completion_tokens: int,
    model: str | None = None,
    prices: Prices | None = None,
    usage_estimated: bool = False,
    latency_ms: int | None = None,
) -> SpendEntry:
    """Charge a call: write its ledger row, move its cost into spent, release its hold,
    and record any threshold it crossed. Capturing the same request twice charges once.

    A call that cost more than its hold is still charged in full (the upstream already
    billed it) and flagged `over_hold`; so is a call captured after its hold expired.
    """
    if prompt_tokens < 0 or completion_tokens < 0:
        raise InvalidRequest("token counts cannot be negative")
    if (
        isinstance(hold, Hold)
        and hold.status == HoldStatus.HELD
        and model is None
        and prices is None
        and connection.vendor == "postgresql"
    ):
        entry = _capture_in_one_statement(
            hold, prompt_tokens, completion_tokens, usage_estimated, latency_ms
        )
        if entry is not None:
            return entry
        # No longer held (voided, expired or captured meanwhile): the general path
        # below reads what happened and answers accordingly.
    request_id = hold if isinstance(hold, str) else hold.request_id
    with transaction.atomic():
        now = timezone.now()
        claimed = sql.claim_hold(request_id, now)
        if claimed is None:
            locked = _locked_hold(request_id)
            if locked.status == HoldStatus.CAPTURED:
                entry = SpendEntry.objects.get(request_id=request_id)
                try:
                    _record_crossings_shown(locked)
                except Exception as exc:
                    exc.charged_entry = entry  # charged before: never call it uncharged
                    raise
                return entry
            if locked.status == HoldStatus.VOIDED:
                raise HoldConflict(f"authorization {request_id} was voided; nothing to capture")
            claimed = sql.claim_hold(request_id, now)  # placed since we looked; locked now
        hold = claimed
        model_used = model or hold.model
        if prices is None:
            if model_used != hold.model:
                raise InvalidRequest(f"prices are needed to charge {model_used}")
            prices = Prices(hold.input_price_nanos, hold.output_price_nanos)
        was_held = hold.status == HoldStatus.HELD
        entry = sql.insert(
            _ledger_entry(
                hold,
                model_used,
                prices,
                prompt_tokens,
                completion_tokens,
                was_held,
                usage_estimated,
                latency_ms,
            )
        )
        record_transitions(sql.charge(hold.pk, entry.cost_nanos, was_held))
    return entry


def _ledger_entry(
    hold: Hold,
    model_used: str,
    prices: Prices,
    prompt_tokens: int,
    completion_tokens: int,
    was_held: bool,
    usage_estimated: bool,
    latency_ms: int | None,
) -> SpendEntry:
    """The ledger row of a capture (not saved). Over its hold, or captured after the
    hold stopped holding, it is flagged over_hold."""
    cost = prices.cost_nanos(prompt_tokens, completion_tokens)
    return SpendEntry(
        tenant_id=hold.tenant_id,
        agent_id=hold.agent_id,
        user_key=hold.user_key,
        request_id=hold.request_id,
        hold_id=hold.pk,
        model_requested=hold.model,
        model_used=model_used,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        input_price_nanos=prices.input_nanos,
        output_price_nanos=prices.output_nanos,
        cost_nanos=cost,
        held_nanos=hold.amount_nanos,
        over_hold=cost > hold.amount_nanos or not was_held,
        usage_estimated=usage_estimated,
        latency_ms=latency_ms,
    )


def record_transitions(changes) -> None:
    """A budget event for every threshold crossed: changes are (period id, old state,
    new state, spent, limit) rows from the statement that charged the periods."""
    events = []
    for period_id, old, new, spent, limit in changes:
        if old != new:
            events += _events_for_transition(period_id, old, new, spent, limit)
    if events:
        BudgetEvent.objects.bulk_create(events, ignore_conflicts=True)


def _record_crossings_shown(hold: Hold) -> None:
    """The threshold events that the periods of a captured hold show were crossed.
    A one-statement capture commits before its events are written; when writing them
    fails, the caller retries the capture and it comes here: each event is recorded from
    its period as it is now (spend and limit included), unless it already was. A period
    that has gone back below the threshold it crossed (a policy change in between) has
    only its recovery recorded: the crossing is not known here."""
    periods = BudgetPeriod.objects.filter(hold_lines__hold=hold)
    record_transitions(
        (period.pk, PeriodState.ACTIVE, period.state, period.spent_nanos, period.limit_nanos)
        for period in periods
    )


def _capture_in_one_statement(
    hold: Hold,
    prompt_tokens: int,
    completion_tokens: int,
    usage_estimated: bool,
    latency_ms: int | None,
) -> SpendEntry | None:
    """capture() of a hold this process placed and still believes held, on PostgreSQL:
    one statement, so one round trip and one commit. None if it is no longer held."""
    entry = held_ledger_entry(hold, prompt_tokens, completion_tokens, usage_estimated, latency_ms)
    result = sql.capture_postgres(hold, entry, timezone.now())
    if result is None:
        return None
    entry_id, changes = result
    captured(hold, entry, entry_id, connection.alias)
    try:
        record_transitions(changes)
    except Exception as exc:
        exc.charged_entry = entry  # committed: a caller must not call it uncharged
        raise
    return entry


def held_ledger_entry(
    hold: Hold,
    prompt_tokens: int,
    completion_tokens: int,
    usage_estimated: bool,
    latency_ms: int | None,
) -> SpendEntry:
    """The ledger row of a held hold's capture at its own model and prices (not saved)."""
    if prompt_tokens < 0 or completion_tokens < 0:
        raise InvalidRequest("token counts cannot be negative")
    prices = Prices(hold.input_price_nanos, hold.output_price_nanos)
    return _ledger_entry(
        hold,
        hold.model,
        prices,
        prompt_tokens,
        completion_tokens,
        True,
        usage_estimated,
        latency_ms,
    )


def captured(hold: Hold, entry: SpendEntry, entry_id: int, alias: str) -> None:
    """Mark a one-statement capture done on its objects (the statement returned `entry_id`).
    Its threshold events are record_transitions()' to write."""
    entry.pk, entry._state.adding, entry._state.db = entry_id, False, alias
    hold.status = HoldStatus.CAPTURED


def has_transitions(changes) -> bool:
    """Whether a capture's statement crossed any threshold (events to record)."""
    return any(old != new for _, old, new, _, _ in changes)


def void(hold: Hold | str) -> Hold:
    """Release a hold without charging (the upstream call failed). Idempotent."""
    with transaction.atomic():
        hold = _locked_hold(hold)
        if hold.status in (HoldStatus.VOIDED, HoldStatus.EXPIRED):
            return hold
        if hold.status == HoldStatus.CAPTURED:
            raise HoldConflict(f"authorization {hold.request_id} was already captured")
        _release(hold.lines.all())
        hold.status, hold.finished_at = HoldStatus.VOIDED, timezone.now()
        hold.save(update_fields=["status", "finished_at"])
    return hold


def expire_holds(now: datetime | None = None, batch_size: int = 50_000) -> int:
    """Release every hold past its expiry, so a crashed worker never strands budget.

    Set-based: each batch is a handful of statements whatever its size. Safe to run twice
    at once: a batch claims holds the other run has not locked (SKIP LOCKED), and locks
    the periods it releases in id order, the order authorize locks them in.
    """
    now = now or timezone.now()
    expired = 0
    while True:
        with transaction.atomic():
            released = _expire_batch(now, batch_size)
        expired += released
        if released < batch_size:
            return expired


def _expire_batch(now: datetime, batch_size: int) -> int:
    hold, line, period = Hold._meta.db_table, HoldLine._meta.db_table, BudgetPeriod._meta.db_table
    postgres = connection.vendor == "postgresql"
    token = uuid.uuid4()
    token_param = token if postgres else token.hex
    # As Django stores them (SQLite compares datetimes as text).
    moment = connection.ops.adapt_datetimefield_value(now)
    # Only table names from the models are formatted in; every value is a parameter.
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {hold} SET status = %s, finished_at = %s, release_token = %s "  # noqa: S608
            f"WHERE id IN (SELECT id FROM {hold} WHERE status = %s AND expires_at <= %s "
            f"ORDER BY id LIMIT %s{' FOR UPDATE SKIP LOCKED' if postgres else ''})",
            [HoldStatus.EXPIRED, moment, token_param, HoldStatus.HELD, moment, batch_size],
        )
        claimed = cursor.rowcount
        if not claimed:
            return 0
        released = (
            f"SELECT l.period_id AS period_id, SUM(l.amount_nanos) AS total FROM {line} l "  # noqa: S608
            f"JOIN {hold} h ON h.id = l.hold_id WHERE h.release_token = %s GROUP BY l.period_id"
        )
        if postgres:
            cursor.execute(
                f"SELECT id FROM {period} WHERE id IN (SELECT period_id FROM ({released}) r) "  # noqa: S608
                "ORDER BY id FOR UPDATE",
                [token_param],
            )
        cursor.execute(
            f"UPDATE {period} SET held_nanos = held_nanos - r.total FROM ({released}) r "  # noqa: S608
            f"WHERE {period}.id = r.period_id",
            [token_param],
        )
    return claimed


def materialize_periods(now: datetime | None = None, batch_size: int = 5000) -> int:
    """Open the current period of every enabled policy that has none, with the reset
    event of each new window. Periods are also opened on first use, so nothing depends
    on this running on time; it makes windows (and their reset alerts) start on time.
    A handful of statements per batch; safe to run twice (the period key is unique)."""
    now = now or timezone.now()
    created = 0
    in_sql: tuple[str, ...] = ()
    if connection.vendor == "postgresql":
        # Hour, day, week and month windows share their bounds across policies: one
        # INSERT ... SELECT each, thresholds computed exactly in numeric. (SQLite has no
        # exact decimal arithmetic; there, and for billing cycles, bounds are computed
        # in Python and inserted in bulk.)
        in_sql = (Window.HOUR, Window.DAY, Window.WEEK, Window.MONTH)
        for window in in_sql:
            created += _insert_fixed_window_periods(window, now)
    created += _materialize_in_python(now, batch_size, skip=in_sql)
    _record_window_resets(now)
    return created


def _insert_fixed_window_periods(window: str, now: datetime) -> int:
    start, end = window_bounds(window, now)
    period, policy = BudgetPeriod._meta.db_table, BudgetPolicy._meta.db_table

    def threshold(fraction: str) -> str:
        return f"FLOOR(CAST(p.limit_nanos AS NUMERIC) * p.{fraction})::BIGINT"

    # Only table names from the models are formatted in; every value is a parameter.
    sql = f"""
        INSERT INTO {period} (policy_id, window_start, window_end, limit_nanos, warn_nanos,
            soft_nanos, hard_nanos, spent_nanos, held_nanos, state, close_reason, closed_by,
            created_at)
        SELECT p.id, GREATEST(%(start)s, COALESCE(prev.ends_at, %(start)s)), %(end)s,
            p.limit_nanos, {threshold("warn_at")}, {threshold("soft_cap")},
            {threshold("hard_cap")}, 0, 0, %(active)s, '', '', %(now)s
        FROM {policy} p
        LEFT JOIN LATERAL (
            SELECT MAX(COALESCE(x.closed_at, x.window_end)) AS ends_at FROM {period} x
            WHERE x.policy_id = p.id AND x.window_start < %(end)s
        ) prev ON TRUE
        WHERE p.enabled AND p.window = %(window)s
          AND NOT EXISTS (
            SELECT 1 FROM {period} c WHERE c.policy_id = p.id AND c.closed_at IS NULL
              AND c.window_start <= %(now)s AND c.window_end > %(now)s)
          AND GREATEST(%(start)s, COALESCE(prev.ends_at, %(start)s)) < %(end)s
        ON CONFLICT DO NOTHING
    """  # noqa: S608
    params = {
        "start": start,
        "end": end,
        "now": now,
        "window": window,
        "active": PeriodState.ACTIVE,
    }
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount


def _materialize_in_python(now: datetime, batch_size: int, skip: tuple[str, ...]) -> int:
    latest = BudgetPeriod.objects.filter(policy=OuterRef("pk")).order_by("-window_start")
    missing = (
        BudgetPolicy.objects.filter(enabled=True)
        .exclude(window__in=skip)
        .exclude(
            Exists(
                BudgetPeriod.objects.filter(
                    policy=OuterRef("pk"),
                    closed_at__isnull=True,
                    window_start__lte=now,
                    window_end__gt=now,
                )
            )
        )
        .annotate(
            previous_end=Subquery(latest.values("window_end")[:1]),
            previous_closed=Subquery(latest.values("closed_at")[:1]),
        )
        .select_related("tenant")
        .order_by("pk")
    )
    created = 0
    batch: list[BudgetPeriod] = []
    for policy in missing.iterator(chunk_size=batch_size):
        start, end = window_bounds(
            policy.window,
            now,
            billing_period_start=policy.tenant.billing_period_start,
            billing_period_end=policy.tenant.billing_period_end,
        )
        previous_end = policy.previous_closed or policy.previous_end
        if previous_end is not None and previous_end > start:
            start = previous_end
        if start < end:
            batch.append(
                BudgetPeriod(
                    policy=policy, window_start=start, window_end=end, **thresholds_of(policy)
                )
            )
        if len(batch) >= batch_size:
            created += _insert_periods(batch)
            batch = []
    return created + _insert_periods(batch)


def _insert_periods(periods: list[BudgetPeriod]) -> int:
    if not periods:
        return 0
    with transaction.atomic():
        BudgetPeriod.objects.bulk_create(periods, ignore_conflicts=True)
    return len(periods)


def _record_window_resets(now: datetime) -> None:
    """A `reset` event on every current period that follows an earlier one and has none."""
    previous = BudgetPeriod.objects.filter(
        policy=OuterRef("policy"), window_start__lt=OuterRef("window_start")
    ).order_by("-window_start")
    fresh = (
        BudgetPeriod.objects.filter(
            closed_at__isnull=True, window_start__lte=now, window_end__gt=now
        )
        .exclude(events__kind=EventKind.RESET)
        .annotate(
            previous_spent=Subquery(previous.values("spent_nanos")[:1]),
            previous_limit=Subquery(previous.values("limit_nanos")[:1]),
        )
        .filter(previous_spent__isnull=False)
        .values_list("pk", "previous_spent", "previous_limit")
    )
    events = [
        BudgetEvent(
            period_id=pk,
            kind=EventKind.RESET,
            spent_nanos=spent,
            limit_nanos=limit,
            detail="new window",
        )
        for pk, spent, limit in fresh.iterator(chunk_size=5000)
    ]
    BudgetEvent.objects.bulk_create(events, batch_size=5000, ignore_conflicts=True)


# --- Resets and policy changes ------------------------------------------------------


def reset(
    policy: BudgetPolicy, *, reason: str, by: str, now: datetime | None = None
) -> BudgetPeriod:
    """Close the policy's current period early and open a fresh one to the same window
    end. History is kept: the old period keeps its spend, and any capture of a hold
    placed on it still lands there."""
    reason = reason.strip()
    if not reason:
        raise InvalidRequest("a reset needs a reason")
    if len(reason) > 500:
        raise InvalidRequest("the reason is longer than 500 characters")
    now = now or timezone.now()
    with transaction.atomic():
        current = open_period(policy, now)
        current = BudgetPeriod.objects.select_for_update().get(pk=current.pk)
        if current.window_start >= now:
            raise InvalidRequest("this budget was reset at this very moment; nothing to reset")
        current.closed_at, current.close_reason, current.closed_by = now, reason, by[:150]
        current.save(update_fields=["closed_at", "close_reason", "closed_by"])
        fresh = BudgetPeriod.objects.create(
            policy=policy, window_start=now, window_end=current.window_end, **thresholds_of(policy)
        )
        BudgetEvent.objects.create(
            period=fresh,
            kind=EventKind.RESET,
            spent_nanos=current.spent_nanos,
            limit_nanos=current.limit_nanos,
            detail=f"reset by {by}: {reason}"[:500],
        )
    return fresh


def apply_policy_change(
    policy: BudgetPolicy, *, window_changed: bool, now: datetime | None = None
) -> None:
    """Bring the policy's open period in line with an edited policy: new thresholds take
    effect at once (a raise can recover a stopped budget); a new window starts now."""
    now = now or timezone.now()
    with transaction.atomic():
        current = (
            BudgetPeriod.objects.select_for_update()
            .filter(
                policy=policy, closed_at__isnull=True, window_start__lte=now, window_end__gt=now
            )
            .first()
        )
        if current is None:
            return
        if window_changed:
            current.closed_at, current.close_reason, current.closed_by = (
                now,
                f"window changed to {policy.window}",
                "policy change",
            )
            current.save(update_fields=["closed_at", "close_reason", "closed_by"])
            return
        BudgetPeriod.objects.filter(pk=current.pk).update(**thresholds_of(policy))
        _refresh_states([current.pk], detail="policy changed")
