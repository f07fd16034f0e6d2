"""Operator API: spend of one scope (total, rate and projection), its ledger history,
and its detected spikes. Agent keys may read their own tenant's scopes."""

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
    SpikeSerializer,
)

SPIKES = (
    "Spikes found by the periodic detection, newest first. Each run compares the last 60 "
    "minutes of spend of every agent and tenant that spent anything with that scope's "
    "hourly spend over the 24 hours before: an anomaly is spend above the mean plus "
    "SPIKE_SIGMAS standard deviations, above SPIKE_MIN_RATIO times the mean and above "
    "SPIKE_MIN_USD_PER_HOUR; a velocity spike is an agent's spend over the velocity limit "
    "of its policy (which may pause it). Each is stored once per scope, kind and hour. A "
    "tenant's spikes include its agents'; end users have none of their own (an empty list)."
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
            "ends up at the period's end if that rate holds. When no budget applies to the "
            "scope (none of its own and no default from settings), period and projection "
            "are null. An agent key reads its own tenant's scopes; another tenant's are "
            "not found (404)."
        ),
        parameters=[SCOPE_TYPE, SCOPE_KEY, SpendQuerySerializer],
        responses={200: SpendSummarySerializer, **error_responses(400, 404)},
    )
    def get(self, request, scope_type: str, scope_key: str):
        scope = self.scope(request, scope_type, scope_key)
        query = self.query(SpendQuerySerializer)
        summary = queries.spend_summary(scope, timezone.now(), rate_hours=query["rate_hours"])
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
        query = self.query(HistoryQuerySerializer)
        page = self.paginate_queryset(queries.history(scope, **query))
        return self.get_paginated_response(SpendEntrySerializer(page, many=True).data)


class SpendSpikesView(ScopeView):
    @extend_schema(
        operation_id="spend_spikes",
        tags=["spend"],
        summary="Spend anomalies of a scope",
        description=SPIKES,
        parameters=[SCOPE_TYPE, SCOPE_KEY, SpikeQuerySerializer],
        responses={200: SpikeSerializer(many=True), **error_responses(400, 404)},
    )
    def get(self, request, scope_type: str, scope_key: str):
        scope = self.scope(request, scope_type, scope_key)
        query = self.query(SpikeQuerySerializer)
        since = queries.hours_back(timezone.now(), query["hours"])
        page = self.paginate_queryset(queries.spikes(scope, since))
        return self.get_paginated_response(SpikeSerializer(page, many=True).data)
