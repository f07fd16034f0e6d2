"""Tenants, agents, their keys and budget policies: the operations operators perform.
The budget engine itself (authorize, capture, void, reset) is in engine.py."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from . import engine
from .errors import InvalidApiKey, InvalidRequest
from .models import (
    Agent,
    ApiKey,
    BudgetPolicy,
    Plan,
    PolicySource,
    ScopeType,
    Strategy,
    Tenant,
    Window,
)
from .money import InvalidAmount, usd_to_nanos

KEY_PREFIX = "sgk"
# last_used_at is a hint for operators, not an audit log: write it at most this often.
LAST_USED_RESOLUTION = timedelta(minutes=1)


def _full_clean(instance, exclude: list[str] | None = None) -> None:
    try:
        instance.full_clean(exclude=exclude)
    except ValidationError as exc:
        raise InvalidRequest(
            "; ".join(f"{k}: {' '.join(v)}" for k, v in exc.message_dict.items()),
            {"fields": exc.message_dict},
        ) from None


# --- Tenants and agents -------------------------------------------------------------


def create_tenant(name: str, stripe_customer_id: str, plan: Plan | None = None) -> Tenant:
    tenant = Tenant(name=name.strip(), stripe_customer_id=stripe_customer_id.strip(), plan=plan)
    _full_clean(tenant)
    _save_new(
        tenant, f"a tenant with Stripe customer id {tenant.stripe_customer_id} already exists"
    )
    return tenant


def create_agent(tenant: Tenant, name: str) -> Agent:
    agent = Agent(tenant=tenant, name=name.strip())
    _full_clean(agent)
    _save_new(agent, f"an agent named {agent.name} already exists in this tenant")
    return agent


def _save_new(instance, conflict: str) -> None:
    """Insert a row that validation found unique; a concurrent insert of the same key
    between the check and the insert is the same clear error, not a crash."""
    try:
        with transaction.atomic():
            instance.save()
    except IntegrityError:
        raise InvalidRequest(conflict) from None


def set_tenant_suspended(tenant: Tenant, suspended: bool, reason: str = "") -> Tenant:
    """An operator's suspension: billing (budgets.lifecycle.resume) never lifts it."""
    tenant.status = Tenant.Status.SUSPENDED if suspended else Tenant.Status.ACTIVE
    tenant.status_reason = reason.strip()[:200] if suspended else ""
    tenant.save(update_fields=["status", "status_reason", "updated_at"])
    return tenant


def set_agent_paused(agent: Agent, paused: bool, reason: str = "") -> Agent:
    agent.paused = paused
    agent.paused_reason = reason[:200] if paused else ""
    agent.paused_at = timezone.now() if paused else None
    agent.save(update_fields=["paused", "paused_reason", "paused_at"])
    return agent


# --- API keys -----------------------------------------------------------------------


def _hash_key(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode()).hexdigest()


def issue_key(agent: Agent, label: str = "") -> tuple[ApiKey, str]:
    """A new key for the agent. Returns the row and the plain key, which is never
    stored and cannot be shown again."""
    key_id = secrets.token_hex(6)
    raw_key = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
    key = ApiKey.objects.create(
        agent=agent, key_id=key_id, key_hash=_hash_key(raw_key), label=label[:100]
    )
    return key, raw_key


def authenticate_key(raw_key: str) -> ApiKey:
    """The live key this secret belongs to, with its agent and tenant, or InvalidApiKey.
    The key id finds the row; the hash is compared in constant time."""
    parts = raw_key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[1] or not parts[2]:
        raise InvalidApiKey("the API key is malformed")
    key = ApiKey.objects.select_related("agent__tenant").filter(key_id=parts[1]).first()
    if key is None or not hmac.compare_digest(key.key_hash, _hash_key(raw_key)):
        raise InvalidApiKey("the API key is not valid")
    if key.revoked_at is not None:
        raise InvalidApiKey("the API key has been revoked")
    now = timezone.now()
    if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
        key.last_used_at = now
    return key


def revoke_key(key: ApiKey) -> ApiKey:
    if key.revoked_at is None:
        key.revoked_at = timezone.now()
        key.save(update_fields=["revoked_at"])
    return key


# --- Policies -----------------------------------------------------------------------


def parse_fraction(name: str, value) -> Decimal:
    if isinstance(value, float):
        value = repr(value)
    try:
        fraction = Decimal(str(value).strip())
    except InvalidOperation:
        raise InvalidRequest(
            f"{name}: {value!r} is not a number", {"fields": {name: ["not a number"]}}
        ) from None
    if not fraction.is_finite() or fraction.as_tuple().exponent < -4:  # type: ignore[operator]
        raise InvalidRequest(
            f"{name}: {value!r} must be a finite fraction with at most 4 decimals",
            {"fields": {name: ["at most 4 decimals"]}},
        )
    return fraction


def parse_limit(value) -> int:
    try:
        nanos = usd_to_nanos(value)
    except InvalidAmount as exc:
        raise InvalidRequest(f"limit: {exc}", {"fields": {"limit": [str(exc)]}}) from None
    if nanos <= 0:
        raise InvalidRequest(
            "limit: must be a positive amount of USD", {"fields": {"limit": ["must be positive"]}}
        )
    return nanos


def policy_scope(
    scope_type: str, tenant: Tenant, agent: Agent | None = None, user_key: str = ""
) -> dict:
    """The scope columns of a policy for this scope type, validated."""
    if scope_type == ScopeType.TENANT:
        return {"scope_key": engine.tenant_scope_key(tenant), "agent": None, "user_key": ""}
    if scope_type == ScopeType.AGENT:
        if agent is None or agent.tenant_id != tenant.pk:
            raise InvalidRequest("an agent policy needs an agent of this tenant")
        return {"scope_key": engine.agent_scope_key(agent), "agent": agent, "user_key": ""}
    if scope_type == ScopeType.USER:
        user_key = engine.validate_user_key(user_key.strip())
        if not user_key:
            raise InvalidRequest("a user policy needs an end-user key")
        return {
            "scope_key": engine.user_scope_key(tenant, user_key),
            "agent": None,
            "user_key": user_key,
        }
    raise InvalidRequest(
        f"unknown scope type {scope_type!r}; use one of {', '.join(ScopeType.values)}",
        {"fields": {"scope_type": ["unknown scope type"]}},
    )


def set_policy(
    tenant: Tenant,
    scope_type: str,
    *,
    limit_nanos: int,
    window: str = Window.DAY,
    warn_at: Decimal = Decimal("0.5"),
    soft_cap: Decimal = Decimal("0.8"),
    hard_cap: Decimal = Decimal("1.0"),
    agent: Agent | None = None,
    user_key: str = "",
    disabled_tools: list[str] | None = None,
    enabled: bool = True,
    strategy: str = Strategy.INHERIT,
    velocity_limit_nanos: int | None = None,
    auto_pause: bool = False,
    source: str = PolicySource.OPERATOR,
    now: datetime | None = None,
) -> BudgetPolicy:
    """Create or update the policy of one scope, and apply it to its open period."""
    if window not in Window.values:
        raise InvalidRequest(
            f"unknown window {window!r}; use one of {', '.join(Window.values)}",
            {"fields": {"window": ["unknown window"]}},
        )
    if strategy not in Strategy.values:
        raise InvalidRequest(
            f"unknown strategy {strategy!r}; use one of "
            + ", ".join(value for value in Strategy.values if value),
            {"fields": {"strategy": ["unknown strategy"]}},
        )
    tools = list(disabled_tools or [])
    if not all(isinstance(t, str) and 0 < len(t) <= 64 for t in tools):
        raise InvalidRequest("disabled_tools must be a list of tool names (1-64 characters)")
    if velocity_limit_nanos is not None and velocity_limit_nanos <= 0:
        raise InvalidRequest(
            "velocity limit: must be a positive amount of USD per hour",
            {"fields": {"velocity_limit": ["must be positive"]}},
        )
    scope = policy_scope(scope_type, tenant, agent, user_key)
    values = {
        "tenant": tenant,
        "agent": scope["agent"],
        "user_key": scope["user_key"],
        "limit_nanos": limit_nanos,
        "window": window,
        "warn_at": warn_at,
        "soft_cap": soft_cap,
        "hard_cap": hard_cap,
        "disabled_tools": tools,
        "enabled": enabled,
        "strategy": strategy,
        "velocity_limit_nanos": velocity_limit_nanos,
        "auto_pause": auto_pause,
        "source": source,
    }
    with transaction.atomic():
        policy = (
            BudgetPolicy.objects.select_for_update()
            .filter(scope_type=scope_type, scope_key=scope["scope_key"])
            .first()
        )
        old_window = policy.window if policy else None
        if policy is None:
            policy = BudgetPolicy(scope_type=scope_type, scope_key=scope["scope_key"])
        for name, value in values.items():
            setattr(policy, name, value)
        _full_clean(policy, exclude=["scope_key"])
        try:
            with transaction.atomic():
                policy.save()
        except IntegrityError as exc:
            raise InvalidRequest(f"the policy could not be saved: {exc}") from None
        if old_window is not None:
            engine.apply_policy_change(policy, window_changed=old_window != window, now=now)
    return policy
