"""How spend looks on the operator API: USD decimal strings, ISO 8601 UTC times."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from budgets.money import nanos_to_usd
from budgets.serializers import (
    USD_SCHEMA,
    BlankAsNullField,
    PeriodSerializer,
    UsdAmountField,
    UsdField,
)

MAX_RATE_HOURS = 24 * 31
MAX_SPIKE_HOURS = 24 * 7


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
        help_text="How many UTC hours to look at, the current one included.",
    )
    floor_usd = UsdAmountField(
        required=False,
        default=100_000_000,
        help_text="An hour below this spend is never a spike. Default 0.1.",
    )


class SpikeSerializer(serializers.Serializer):
    hour_start = serializers.DateTimeField(read_only=True)
    hour_end = serializers.DateTimeField(read_only=True)
    spent_usd = UsdField(source="spent_nanos")
    baseline_mean_usd = UsdField(source="baseline_mean_nanos")
    baseline_stdev_usd = UsdField(source="baseline_stdev_nanos")
    threshold_usd = UsdField(source="threshold_nanos")


class SpikeReportSerializer(ScopeFieldsSerializer):
    as_of = serializers.DateTimeField(read_only=True)
    hours = serializers.IntegerField(read_only=True)
    floor_usd = UsdField(source="floor_nanos")
    spikes = SpikeSerializer(many=True, read_only=True)
