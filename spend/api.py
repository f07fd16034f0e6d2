"""Operator API: spend of one scope (total, rate and projection), its ledger history,
and its spikes. Agent keys may read their own tenant's scopes."""

from __future__ import annotations

from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework.response import Response

from budgets.api import SCOPE_KEY, SCOPE_TYPE
from governance.api import OperatorView, calling_tenant, error_responses

from . import queries
from .serializers import (
    HistoryQuerySerializer,
    SpendEntrySerializer,
    SpendQuerySerializer,
    SpendSummarySerializer,
    SpikeQuerySerializer,
    SpikeReportSerializer,
)

SPIKE_METHOD = (
    f"Spend is bucketed by UTC hour from the ledger. Each of the last `hours` hours (the "
    f"current, partial one included) is compared with the {queries.BASELINE_HOURS} hours "
    f"before it: it is a spike when its spend exceeds max(mean + {queries.SPIKE_SIGMAS} "
    f"population standard deviations of those hours, floor_usd). Computed on request; "
    f"nothing is stored."
)


class ScopeView(OperatorView):
    agent_readable = True

    def scope(self, request, scope_type: str, scope_key: str) -> queries.SpendScope:
        return queries.resolve_scope(scope_type, scope_key, within=calling_tenant(request))


class SpendSummaryView(ScopeView):
    @extend_schema(
        operation_id="spend_retrieve",
        tags=["spend"],
        summary="Spend in the current period, the spend rate, and a projection",
        description=(
            "The current period of the scope's budget (spent, held, remaining, state), the "
            "ledger spend over the last rate_hours hours as USD per hour, and where spend "
            "ends up at the period's end if that rate holds. The scope needs no budget of "
            "its own: period and projection are then null. An agent key reads its own "
            "tenant's scopes; another tenant's are not found (404)."
        ),
        parameters=[SCOPE_TYPE, SCOPE_KEY, SpendQuerySerializer],
        responses={200: SpendSummarySerializer, **error_responses(400, 404)},
    )
    def get(self, request, scope_type: str, scope_key: str):
        scope = self.scope(request, scope_type, scope_key)
        query = SpendQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        summary = queries.spend_summary(
            scope, timezone.now(), rate_hours=query.validated_data["rate_hours"]
        )
        return Response(SpendSummarySerializer(summary).data)


class SpendHistoryView(ScopeView):
    @extend_schema(
        operation_id="spend_history",
        tags=["spend"],
        summary="Ledger entries of a scope",
        description="Newest first; filter by time range, model charged and agent name.",
        parameters=[SCOPE_TYPE, SCOPE_KEY, HistoryQuerySerializer],
        responses={200: SpendEntrySerializer(many=True), **error_responses(400, 404)},
    )
    def get(self, request, scope_type: str, scope_key: str):
        scope = self.scope(request, scope_type, scope_key)
        query = HistoryQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        page = self.paginate_queryset(queries.history(scope, **query.validated_data))
        return self.get_paginated_response(SpendEntrySerializer(page, many=True).data)


class SpendSpikesView(ScopeView):
    @extend_schema(
        operation_id="spend_spikes",
        tags=["spend"],
        summary="Spend anomalies of a scope",
        description=SPIKE_METHOD,
        parameters=[SCOPE_TYPE, SCOPE_KEY, SpikeQuerySerializer],
        responses={200: SpikeReportSerializer, **error_responses(400, 404)},
    )
    def get(self, request, scope_type: str, scope_key: str):
        scope = self.scope(request, scope_type, scope_key)
        query = SpikeQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        now, hours, floor = (
            timezone.now(),
            query.validated_data["hours"],
            query.validated_data["floor_usd"],
        )
        report = {
            "scope": scope,
            "as_of": now,
            "hours": hours,
            "floor_nanos": floor,
            "spikes": queries.detect_spikes(scope, now, hours=hours, floor_nanos=floor),
        }
        return Response(SpikeReportSerializer(report).data)
