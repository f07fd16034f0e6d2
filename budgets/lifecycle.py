"""A tenant's life as its billing decides it: created for a customer, given its plan and
the plan's budget, its billing period recorded and its billing-cycle budgets rolled over,
suspended and resumed.

Nothing here reads a Stripe payload: webhooks/ does, and calls these with plain values.
Callers hold a transaction; `locked_tenant` and `upsert_tenant` lock the tenant's row so
two events about one customer are applied one after the other.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from django.core.exceptions import ValidationError
from django.db import transaction

from . import engine, services
from .errors import InvalidRequest
from .models import (
    BudgetPeriod,
    BudgetPolicy,
    Plan,
    PolicySource,
    ScopeType,
    Tenant,
    Window,
    customer_validator,
)

# Suspensions made here carry this prefix, so a resume never lifts an operator's own.
BILLING_REASON_PREFIX = "billing: "
ROLLOVER_REASON = "billing period renewed"
ROLLOVER_BY = "billing"


# --- Tenants and plans --------------------------------------------------------------


def validate_customer_id(customer_id: str) -> str:
    try:
        customer_validator(customer_id)
    except ValidationError:
        raise InvalidRequest(f"{customer_id!r} is not a Stripe customer id (cus_...)") from None
    return customer_id


def locked_tenant(customer_id: str) -> Tenant | None:
    return Tenant.objects.select_for_update().filter(stripe_customer_id=customer_id).first()


def upsert_tenant(customer_id: str, name: str = "") -> tuple[Tenant, bool]:
    """The tenant of this customer, locked, and whether it was created just now."""
    validate_customer_id(customer_id)
    tenant = locked_tenant(customer_id)
    if tenant is not None:
        return tenant, False
    _, created = Tenant.objects.get_or_create(
        stripe_customer_id=customer_id, defaults={"name": (name.strip() or customer_id)[:200]}
    )
    return locked_tenant(customer_id), created  # type: ignore[return-value]


@dataclass(frozen=True)
class PlanMatch:
    plan: Plan | None
    matched_key: str  # the price id or lookup key that named the plan; empty: the default

    @property
    def is_default(self) -> bool:
        return not self.matched_key


def plan_for_prices(keys: Iterable[tuple[str, str]]) -> PlanMatch:
    """The plan of the first (price id, lookup key) pair that names one, else the
    default plan (or none)."""
    pairs = [(price_id, lookup_key) for price_id, lookup_key in keys]
    wanted = {key for pair in pairs for key in pair if key}
    plans = {plan.stripe_price: plan for plan in Plan.objects.filter(stripe_price__in=wanted)}
    for pair in pairs:
        for key in pair:
            if key and key in plans:
                return PlanMatch(plans[key], key)
    return PlanMatch(Plan.objects.filter(is_default=True).first(), "")


def _policy_matches_plan(policy: BudgetPolicy, plan: Plan) -> bool:
    return (
        policy.source == PolicySource.PLAN
        and policy.limit_nanos == plan.limit_nanos
        and policy.window == plan.window
        and (policy.warn_at, policy.soft_cap, policy.hard_cap)
        == (plan.warn_at, plan.soft_cap, plan.hard_cap)
        and (policy.strategy, policy.disabled_tools) == (plan.strategy, plan.disabled_tools)
        and (policy.velocity_limit_nanos, policy.auto_pause)
        == (plan.velocity_limit_nanos, plan.auto_pause)
    )


def apply_plan(tenant: Tenant, plan: Plan, now: datetime) -> str:
    """Give the tenant this plan and the plan's tenant budget, effective at once on the
    open period. A tenant budget an operator set by hand is kept: that was a decision."""
    notes = []
    if tenant.plan_id != plan.pk:
        tenant.plan = plan
        tenant.save(update_fields=["plan", "updated_at"])
        notes.append(f"plan {plan.name}")
    policy = BudgetPolicy.objects.filter(
        scope_type=ScopeType.TENANT, scope_key=engine.tenant_scope_key(tenant)
    ).first()
    if policy is not None and policy.source == PolicySource.OPERATOR:
        notes.append("tenant budget set by an operator, kept")
    elif policy is None or not _policy_matches_plan(policy, plan):
        services.set_policy(
            tenant,
            ScopeType.TENANT,
            limit_nanos=plan.limit_nanos,
            window=plan.window,
            warn_at=plan.warn_at,
            soft_cap=plan.soft_cap,
            hard_cap=plan.hard_cap,
            disabled_tools=plan.disabled_tools,
            enabled=policy.enabled if policy else True,
            strategy=plan.strategy,
            velocity_limit_nanos=plan.velocity_limit_nanos,
            auto_pause=plan.auto_pause,
            source=PolicySource.PLAN,
            now=now,
        )
        notes.append(f"tenant budget from plan {plan.name}")
    return "; ".join(notes)


# --- Billing periods ----------------------------------------------------------------


def record_billing_period(tenant: Tenant, start: datetime, end: datetime) -> bool:
    """Store the tenant's current billing period if it is newer than the stored one.
    A period that is not newer (a late or replayed event) never moves the tenant back."""
    if end <= start:
        raise InvalidRequest(f"a billing period must end after it starts ({start} - {end})")
    stored = (tenant.billing_period_start, tenant.billing_period_end)
    if stored[0] is not None and stored[1] is not None and (start, end) <= stored:
        return False
    tenant.billing_period_start, tenant.billing_period_end = start, end
    tenant.save(update_fields=["billing_period_start", "billing_period_end", "updated_at"])
    return True


def roll_billing_cycle(tenant: Tenant, now: datetime) -> list[BudgetPeriod]:
    """Bring the tenant's billing-cycle periods in line with its stored billing period,
    and return the periods now open. Idempotent.

    An open period that began before the billing period is closed at its start (its
    spend stays in history, and a hold placed on it is still captured there); one that
    began inside it (a manual reset) keeps its start and takes the period's end. The
    next period then opens at the boundary, with its `reset` event.
    """
    start, end = tenant.billing_period_start, tenant.billing_period_end
    if start is None or end is None or not start <= now < end:
        # Over already (the engine rolls forward on the anchor) or not begun.
        return []
    opened = []
    policies = BudgetPolicy.objects.filter(tenant=tenant, window=Window.BILLING_CYCLE)
    for policy in policies.order_by("id"):
        with transaction.atomic():
            overlapping = BudgetPeriod.objects.select_for_update().filter(
                policy=policy, closed_at__isnull=True, window_start__lt=end, window_end__gt=start
            )
            for period in overlapping.order_by("id"):
                if period.window_start < start:
                    period.closed_at, period.close_reason, period.closed_by = (
                        start,
                        ROLLOVER_REASON,
                        ROLLOVER_BY,
                    )
                    period.save(update_fields=["closed_at", "close_reason", "closed_by"])
                elif period.window_end != end:
                    BudgetPeriod.objects.filter(pk=period.pk).update(window_end=end)
            if policy.enabled:
                opened.append(engine.open_period(policy, now, tenant))
    return opened


# --- Access -------------------------------------------------------------------------


def suspend(tenant: Tenant, reason: str) -> bool:
    """Suspend for a billing reason. An operator's suspension is left as it is."""
    status_reason = (BILLING_REASON_PREFIX + reason)[:200]
    if tenant.status == Tenant.Status.SUSPENDED:
        if not tenant.status_reason.startswith(BILLING_REASON_PREFIX):
            return False
        if tenant.status_reason == status_reason:
            return False
        tenant.status_reason = status_reason
        tenant.save(update_fields=["status_reason", "updated_at"])
        return False
    tenant.status, tenant.status_reason = Tenant.Status.SUSPENDED, status_reason
    tenant.save(update_fields=["status", "status_reason", "updated_at"])
    return True


def resume(tenant: Tenant) -> bool:
    """Lift a billing suspension; an operator's suspension stays until an operator lifts it."""
    if tenant.status != Tenant.Status.SUSPENDED:
        return False
    if not tenant.status_reason.startswith(BILLING_REASON_PREFIX):
        return False
    tenant.status, tenant.status_reason = Tenant.Status.ACTIVE, ""
    tenant.save(update_fields=["status", "status_reason", "updated_at"])
    return True
