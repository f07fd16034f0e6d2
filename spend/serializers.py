"""How spend looks on the operator API: USD decimal strings, ISO 8601 UTC times."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from budgets.money import nanos_to_usd
from budgets.serializers import USD_SCHEMA, BlankAsNullField, PeriodSerializer, UsdField

from .models import Spike

MAX_RATE_HOURS = 24 * 31
MAX_SPIKE_HOURS = 24 * 31


@extend_schema_field({**USD_SCHEMA, "example": "0.15"})
class PricePerMillionField(UsdField):
    """Nanodollars per token, shown as USD per million tokens, as Mistral publishes it."""

    def to_representation(self, value: int) -> str:
        return nanos_to_usd(value * 1_000_000)


class ScopeFieldsSerializer(serializers.Serializer):
    scope_type = serializers.CharField(source="scope.scope_type", read_only=True)
    scope_key = serializers.CharField(source="scope.scope_key", read_only=True)


class RateSerializer(serializers.Serializer):
    hours = serializers.IntegerField(read_only=True, help_text="The window the rate is over.")
    since = serializers.DateTimeField(read_only=True)
    spent_usd = UsdField(source="spent_nanos", help_text="Ledger spend since `since`.")
    usd_per_hour = UsdField(source="nanos_per_hour", help_text="Rounded down to a nanodollar.")


class ProjectionSerializer(serializers.Serializer):
    period_end = serializers.DateTimeField(read_only=True)
    spend_usd = UsdField(
        source="spend_nanos", help_text="Spent so far plus the rate until the period ends."
    )
    exceeds_hard_cap = serializers.BooleanField(read_only=True)
    stop_at = serializers.DateTimeField(
        read_only=True,
        allow_null=True,
        help_text="When spend reaches the hard cap at this rate, if before the period ends.",
    )


class SpendSummarySerializer(ScopeFieldsSerializer):
    as_of = serializers.DateTimeField(read_only=True)
    period = PeriodSerializer(
        read_only=True,
        allow_null=True,
        help_text="The current period of the scope's budget; null when none applies.",
    )
    rate = RateSerializer(read_only=True)
    projection = ProjectionSerializer(
        read_only=True, allow_null=True, help_text="null when no budget applies."
    )


class SpendQuerySerializer(serializers.Serializer):
    rate_hours = serializers.IntegerField(
        required=False,
        default=1,
        min_value=1,
        max_value=MAX_RATE_HOURS,
        help_text="The spend rate is measured over this many hours before now.",
    )


class SpendEntrySerializer(serializers.Serializer):
    request_id = serializers.CharField(read_only=True)
    created_at = serializers.DateTimeField(read_only=True)
    tenant = serializers.CharField(source="tenant.stripe_customer_id", read_only=True)
    agent = serializers.CharField(source="agent.name", read_only=True, allow_null=True)
    user = BlankAsNullField(source="user_key")
    model_requested = serializers.CharField(read_only=True)
    model_used = serializers.CharField(read_only=True)
    prompt_tokens = serializers.IntegerField(read_only=True)
    completion_tokens = serializers.IntegerField(read_only=True)
    input_price_usd_per_million = PricePerMillionField(source="input_price_nanos")
    output_price_usd_per_million = PricePerMillionField(source="output_price_nanos")
    cost_usd = UsdField(source="cost_nanos")
    held_usd = UsdField(source="held_nanos", help_text="What the call's hold had set aside.")
    over_hold = serializers.BooleanField(read_only=True)
    usage_estimated = serializers.BooleanField(read_only=True)
    latency_ms = serializers.IntegerField(read_only=True, allow_null=True)
    reported_at = serializers.DateTimeField(
        read_only=True, allow_null=True, help_text="When it was reported to Stripe."
    )


class HistoryQuerySerializer(serializers.Serializer):
    since = serializers.DateTimeField(required=False, help_text="Inclusive, ISO 8601.")
    until = serializers.DateTimeField(required=False, help_text="Exclusive, ISO 8601.")
    model = serializers.CharField(required=False, max_length=100, help_text="The model charged.")
    agent = serializers.CharField(required=False, max_length=64, help_text="An agent's name.")

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if "since" in attrs and "until" in attrs and attrs["since"] >= attrs["until"]:
            raise serializers.ValidationError({"until": "must be after since"})
        return attrs


class SpikeQuerySerializer(serializers.Serializer):
    hours = serializers.IntegerField(
        required=False,
        default=24,
        min_value=1,
        max_value=MAX_SPIKE_HOURS,
        help_text="How many UTC hours to look back, the current one included.",
    )


class SpikeSerializer(serializers.Serializer):
    scope_type = serializers.CharField(read_only=True, help_text="tenant or agent.")
    tenant = serializers.CharField(source="tenant.stripe_customer_id", read_only=True)
    agent = serializers.CharField(source="agent.name", read_only=True, allow_null=True)
    kind = serializers.ChoiceField(choices=Spike.Kind.choices, read_only=True)
    hour_start = serializers.DateTimeField(source="hour", read_only=True)
    spend_usd = UsdField(source="spend_nanos", help_text="Spend in the 60 minutes measured.")
    baseline_usd = UsdField(
        source="baseline_nanos", help_text="Mean hourly spend before it (0 for velocity)."
    )
    threshold_usd = UsdField(source="threshold_nanos", help_text="What counted as a spike.")
    agent_paused = serializers.BooleanField(read_only=True, help_text="The agent was paused.")
    detected_at = serializers.DateTimeField(read_only=True)
