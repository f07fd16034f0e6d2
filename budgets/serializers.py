"""How budgets, tenants, agents and keys look on the operator API, and how requests to
change them are read. Money goes out as USD decimal strings and comes in as a decimal
string or a JSON number (parsed as Decimal), exact to the nanodollar."""

from __future__ import annotations

from decimal import ROUND_FLOOR, Decimal
from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from . import engine, services
from .errors import InvalidRequest
from .models import (
    Agent,
    BudgetPolicy,
    EventKind,
    PeriodState,
    Plan,
    PolicySource,
    ScopeType,
    Strategy,
    Tenant,
    Window,
)
from .money import InvalidAmount, nanos_to_usd, usd_to_nanos

USD_PATTERN = r"^-?\d+(\.\d{1,9})?$"
USD_SCHEMA = {"type": "string", "pattern": USD_PATTERN, "example": "12.5"}
FRACTION_SCHEMA = {"type": "string", "pattern": r"^\d+(\.\d{1,4})?$", "example": "0.8"}


# --- Fields -------------------------------------------------------------------------


@extend_schema_field(USD_SCHEMA)
class UsdField(serializers.Field):
    """Integer nanodollars, shown as an exact USD decimal string ("12.5")."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs["read_only"] = True
        super().__init__(**kwargs)

    def to_representation(self, value: int) -> str:
        return nanos_to_usd(value)


@extend_schema_field(
    {
        "oneOf": [
            {"type": "string", "pattern": r"^\d{1,10}(\.\d{1,9})?$"},
            {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 1_000_000_000},
        ],
        "example": "12.5",
    }
)
class UsdAmountField(serializers.Field):
    """A positive amount of USD in: a decimal string or a JSON number, read as
    Decimal by the API's parser. Out: integer nanodollars."""

    def to_internal_value(self, data: Any) -> int:
        try:
            nanos = usd_to_nanos(data)
        except InvalidAmount as exc:
            raise serializers.ValidationError(str(exc)) from None
        if nanos <= 0:
            raise serializers.ValidationError("must be a positive amount of USD")
        return nanos

    def to_representation(self, value: int) -> str:
        return nanos_to_usd(value)


@extend_schema_field(FRACTION_SCHEMA)
class FractionField(serializers.Field):
    """A threshold as a fraction of the limit, shown as a decimal string ("0.8")."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs["read_only"] = True
        super().__init__(**kwargs)

    def to_representation(self, value: Decimal) -> str:
        return format(value.normalize(), "f")


@extend_schema_field(
    {
        "oneOf": [
            {"type": "string", "pattern": r"^\d+(\.\d{1,4})?$"},
            {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 10},
        ],
        "example": "0.8",
    }
)
class FractionInputField(serializers.Field):
    def to_internal_value(self, data: Any) -> Decimal:
        if isinstance(data, bool) or not isinstance(data, str | int | Decimal):
            raise serializers.ValidationError("must be a decimal string or a number")
        try:
            return services.parse_fraction(self.field_name, data)
        except InvalidRequest as exc:
            raise serializers.ValidationError(exc.message) from None

    def to_representation(self, value: Decimal) -> str:
        return format(value.normalize(), "f")


@extend_schema_field({"type": "string", "pattern": r"^\d+(\.\d{1,4})?$", "example": "0.42"})
class UtilizationField(serializers.Field):
    """Spent over limit, four decimals, rounded down ("1" is the whole limit)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.update(read_only=True, source="*")
        super().__init__(**kwargs)

    def to_representation(self, period) -> str:
        ratio = Decimal(period.spent_nanos) / Decimal(period.limit_nanos)
        return format(ratio.quantize(Decimal("0.0001"), rounding=ROUND_FLOOR).normalize(), "f")


class BlankAsNullField(serializers.CharField):
    """An optional name stored as "" and shown as null."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.update(read_only=True, allow_null=True)
        super().__init__(**kwargs)

    def to_representation(self, value: str) -> str | None:
        return value or None


@extend_schema_field({"type": "boolean"})
class FlagField(serializers.Field):
    """A query filter: true or false; left out, no filter."""

    def to_internal_value(self, data: Any) -> bool:
        if data not in ("true", "false"):
            raise serializers.ValidationError("must be true or false")
        return data == "true"


def _not_found(what: str) -> dict[str, str]:
    return {"does_not_exist": f"no {what} {{value}}", "invalid": "must be a string"}


class NameRefField(serializers.SlugRelatedField):
    """An object named by one of its fields. Refuses NUL, which PostgreSQL cannot
    compare with, as CharField does."""

    def to_internal_value(self, data: Any):
        if isinstance(data, str) and "\x00" in data:
            raise serializers.ValidationError("Null characters are not allowed.")
        return super().to_internal_value(data)


class TenantRefField(NameRefField):
    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("slug_field", "stripe_customer_id")
        kwargs.setdefault("queryset", Tenant.objects.all())
        kwargs.setdefault("help_text", "The tenant's Stripe customer id (cus_...).")
        kwargs.setdefault("error_messages", _not_found("tenant with Stripe customer id"))
        super().__init__(**kwargs)


# --- Periods and budgets (out) ------------------------------------------------------


class PeriodSerializer(serializers.Serializer):
    window_start = serializers.DateTimeField(read_only=True)
    window_end = serializers.DateTimeField(read_only=True)
    closed_at = serializers.DateTimeField(
        read_only=True, allow_null=True, help_text="Set when the period was closed early."
    )
    close_reason = serializers.CharField(read_only=True)
    closed_by = serializers.CharField(read_only=True)
    state = serializers.ChoiceField(choices=PeriodState.choices, read_only=True)
    limit_usd = UsdField(source="limit_nanos")
    warn_usd = UsdField(source="warn_nanos", help_text="Spend from which the state is warned.")
    soft_usd = UsdField(source="soft_nanos", help_text="Spend from which calls are degraded.")
    hard_usd = UsdField(source="hard_nanos", help_text="Spend from which calls are refused.")
    spent_usd = UsdField(source="spent_nanos")
    held_usd = UsdField(source="held_nanos", help_text="Set aside for calls in flight.")
    remaining_usd = UsdField(
        source="remaining_nanos", help_text="What calls may still hold: hard - spent - held."
    )
    utilization = UtilizationField()


class BudgetEventSerializer(serializers.Serializer):
    kind = serializers.ChoiceField(choices=EventKind.choices, read_only=True)
    detail = serializers.CharField(read_only=True)
    spent_usd = UsdField(source="spent_nanos")
    limit_usd = UsdField(source="limit_nanos")
    period_start = serializers.DateTimeField(source="period.window_start", read_only=True)
    created_at = serializers.DateTimeField(read_only=True)


class BudgetSerializer(serializers.Serializer):
    scope_type = serializers.ChoiceField(choices=ScopeType.choices, read_only=True)
    scope_key = serializers.CharField(read_only=True)
    tenant = serializers.CharField(source="tenant.stripe_customer_id", read_only=True)
    agent = serializers.CharField(source="agent.name", read_only=True, allow_null=True)
    user = BlankAsNullField(source="user_key")
    limit_usd = UsdField(source="limit_nanos")
    window = serializers.ChoiceField(choices=Window.choices, read_only=True)
    warn_at = FractionField()
    soft_cap = FractionField()
    hard_cap = FractionField()
    disabled_tools = serializers.ListField(child=serializers.CharField(), read_only=True)
    enabled = serializers.BooleanField(read_only=True)
    strategy = serializers.ChoiceField(choices=Strategy.choices, read_only=True)
    source = serializers.ChoiceField(choices=PolicySource.choices, read_only=True)
    created_at = serializers.DateTimeField(read_only=True)
    updated_at = serializers.DateTimeField(read_only=True)
    current_period = PeriodSerializer(read_only=True)


class BudgetDetailSerializer(BudgetSerializer):
    periods = PeriodSerializer(
        source="recent_periods", many=True, read_only=True, help_text="Newest first."
    )
    events = BudgetEventSerializer(
        source="recent_events", many=True, read_only=True, help_text="Newest first."
    )


# --- Budgets (in) -------------------------------------------------------------------


class BudgetQuerySerializer(serializers.Serializer):
    scope_type = serializers.ChoiceField(choices=ScopeType.choices, required=False)
    state = serializers.ChoiceField(
        choices=PeriodState.choices, required=False, help_text="State of the current period."
    )
    tenant = serializers.CharField(
        required=False, max_length=80, help_text="A tenant's Stripe customer id."
    )
    enabled = FlagField(required=False)
    search = serializers.CharField(
        required=False,
        max_length=200,
        help_text="Part of a scope key, tenant name, agent name or end-user key.",
    )


class BudgetWriteSerializer(serializers.Serializer):
    """Names the scope (scope_type, tenant, and agent or user) and the policy's values.
    On an update, values left out keep what the policy has; on a create, the defaults."""

    scope_type = serializers.ChoiceField(choices=ScopeType.choices)
    tenant = TenantRefField()
    agent = serializers.CharField(
        required=False, max_length=64, help_text="The agent's name; only for scope_type agent."
    )
    user = serializers.CharField(
        required=False,
        max_length=engine.MAX_USER_KEY,
        help_text="The end-user key; only for scope_type user.",
    )
    limit_usd = UsdAmountField(
        required=False,
        help_text="The limit per window in USD: a decimal string or a JSON number with at "
        "most 9 decimals (one nanodollar); more precision is refused, never rounded. "
        "Required when creating.",
    )
    window = serializers.ChoiceField(choices=Window.choices, required=False)
    warn_at = FractionInputField(
        required=False,
        help_text="Fraction of the limit from which the budget is warned; default 0.5. "
        "Thresholds are above 0, at most 10, with at most 4 decimals.",
    )
    soft_cap = FractionInputField(
        required=False,
        help_text="From here calls are downgraded and disabled tools removed; default 0.8. "
        "At least warn_at.",
    )
    hard_cap = FractionInputField(
        required=False, help_text="From here calls are refused; default 1. At least soft_cap."
    )
    disabled_tools = serializers.ListField(
        child=serializers.CharField(min_length=1, max_length=64),
        required=False,
        max_length=100,
        help_text="Tool names removed from requests while the budget is degraded.",
    )
    enabled = serializers.BooleanField(required=False)

    DEFAULTS = {
        "window": Window.DAY,
        "warn_at": Decimal("0.5"),
        "soft_cap": Decimal("0.8"),
        "hard_cap": Decimal("1.0"),
        "disabled_tools": [],
        "enabled": True,
    }

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        scope_type, tenant = attrs["scope_type"], attrs["tenant"]
        errors: dict[str, str] = {}
        for name, wanted in (("agent", ScopeType.AGENT), ("user", ScopeType.USER)):
            if scope_type == wanted and not attrs.get(name):
                errors[name] = f"required for a {wanted} budget"
            elif scope_type != wanted and name in attrs:
                errors[name] = f"only for a {wanted} budget"
        if errors:
            raise serializers.ValidationError(errors)
        agent = None
        if scope_type == ScopeType.AGENT:
            agent = tenant.agents.filter(name=attrs["agent"]).first()
            if agent is None:
                raise serializers.ValidationError(
                    {"agent": f"no agent {attrs['agent']!r} in tenant {tenant.stripe_customer_id}"}
                )
        try:
            scope = services.policy_scope(scope_type, tenant, agent, attrs.get("user", ""))
        except InvalidRequest as exc:
            raise serializers.ValidationError({"user": exc.message}) from None
        existing = BudgetPolicy.objects.filter(
            scope_type=scope_type, scope_key=scope["scope_key"]
        ).first()
        if existing is None and "limit_usd" not in attrs:
            raise serializers.ValidationError({"limit_usd": "required when creating a budget"})
        values = {
            name: attrs[name] if name in attrs else getattr(existing, name, default)
            for name, default in self.DEFAULTS.items()
        }
        values["limit_nanos"] = attrs.get("limit_usd") or existing.limit_nanos  # type: ignore[union-attr]
        return {
            "tenant": tenant,
            "scope_type": scope_type,
            "agent": agent,
            "user_key": scope["user_key"],
            "values": values,
            "created": existing is None,
        }


class ResetSerializer(serializers.Serializer):
    reason = serializers.CharField(max_length=500, help_text="Why; kept on the closed period.")


# --- Tenants ------------------------------------------------------------------------


class TenantSerializer(serializers.Serializer):
    stripe_customer_id = serializers.CharField(read_only=True)
    name = serializers.CharField(read_only=True)
    status = serializers.ChoiceField(choices=Tenant.Status.choices, read_only=True)
    status_reason = serializers.CharField(read_only=True)
    plan = serializers.CharField(source="plan.name", read_only=True, allow_null=True)
    billing_period_start = serializers.DateTimeField(read_only=True, allow_null=True)
    billing_period_end = serializers.DateTimeField(read_only=True, allow_null=True)
    created_at = serializers.DateTimeField(read_only=True)
    updated_at = serializers.DateTimeField(read_only=True)


class TenantQuerySerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=Tenant.Status.choices, required=False)
    search = serializers.CharField(
        required=False, max_length=200, help_text="Part of the name or Stripe customer id."
    )


class TenantCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=200)
    stripe_customer_id = serializers.CharField(max_length=80, help_text="cus_...")
    plan = NameRefField(
        slug_field="name",
        queryset=Plan.objects.all(),
        required=False,
        allow_null=True,
        help_text="A plan's name; none: the default budget from settings.",
        error_messages=_not_found("plan named"),
    )


class TenantUpdateSerializer(serializers.Serializer):
    suspended = serializers.BooleanField(
        required=False,
        help_text="true suspends the tenant (its calls are refused), false resumes it; "
        "left out: no change.",
    )
    reason = serializers.CharField(required=False, allow_blank=True, max_length=200)


# --- Agents and keys ----------------------------------------------------------------


class ApiKeySerializer(serializers.Serializer):
    key_id = serializers.CharField(read_only=True)
    prefix = serializers.CharField(read_only=True, help_text="How the key starts: sgk_<key id>.")
    label = serializers.CharField(read_only=True)
    created_at = serializers.DateTimeField(read_only=True)
    revoked_at = serializers.DateTimeField(read_only=True, allow_null=True)
    last_used_at = serializers.DateTimeField(
        read_only=True, allow_null=True, help_text="To the minute."
    )


class IssuedKeySerializer(ApiKeySerializer):
    key = serializers.CharField(
        read_only=True, help_text="The key itself. Shown this once: only its hash is stored."
    )


class AgentSerializer(serializers.Serializer):
    id = serializers.IntegerField(read_only=True)
    tenant = serializers.CharField(source="tenant.stripe_customer_id", read_only=True)
    name = serializers.CharField(read_only=True)
    scope_key = serializers.SerializerMethodField()
    paused = serializers.BooleanField(read_only=True)
    paused_reason = serializers.CharField(read_only=True)
    paused_at = serializers.DateTimeField(read_only=True, allow_null=True)
    strategy = serializers.ChoiceField(choices=Strategy.choices, read_only=True)
    created_at = serializers.DateTimeField(read_only=True)
    keys = ApiKeySerializer(many=True, read_only=True)

    def get_scope_key(self, agent: Agent) -> str:
        return engine.agent_scope_key(agent)


class AgentQuerySerializer(serializers.Serializer):
    tenant = serializers.CharField(
        required=False, max_length=80, help_text="A tenant's Stripe customer id."
    )
    paused = FlagField(required=False)
    search = serializers.CharField(required=False, max_length=200, help_text="Part of the name.")


class AgentCreateSerializer(serializers.Serializer):
    tenant = TenantRefField()
    name = serializers.CharField(max_length=64, help_text="Letters, digits, '.', '_' or '-'.")


class AgentUpdateSerializer(serializers.Serializer):
    paused = serializers.BooleanField(
        required=False,
        help_text="true pauses the agent (its calls are refused), false resumes it; "
        "left out: no change.",
    )
    reason = serializers.CharField(required=False, allow_blank=True, max_length=200)


class KeyCreateSerializer(serializers.Serializer):
    label = serializers.CharField(required=False, allow_blank=True, max_length=100)
