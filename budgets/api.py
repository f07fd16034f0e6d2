"""Operator API: budgets, tenants, agents and their keys. Each view parses with a
serializer, calls one service, and renders; access and errors are governance.api's."""

from __future__ import annotations

import re
from datetime import datetime

from django.db.models import OuterRef, Q, QuerySet, Subquery, Value
from django.db.models.functions import Coalesce
from django.utils import timezone
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, extend_schema
from rest_framework.response import Response

from governance.api import OperatorView, calling_tenant, error_responses
from spend.queries import check_scope_type

from . import engine, services
from .errors import ScopeNotFound
from .models import (
    Agent,
    BudgetEvent,
    BudgetPeriod,
    BudgetPolicy,
    PeriodState,
    ScopeType,
    Tenant,
)
from .serializers import (
    AgentCreateSerializer,
    AgentQuerySerializer,
    AgentSerializer,
    AgentUpdateSerializer,
    ApiKeySerializer,
    BudgetDetailSerializer,
    BudgetQuerySerializer,
    BudgetSerializer,
    BudgetWriteSerializer,
    IssuedKeySerializer,
    KeyCreateSerializer,
    ResetSerializer,
    TenantCreateSerializer,
    TenantQuerySerializer,
    TenantSerializer,
    TenantUpdateSerializer,
)

RECENT_PERIODS = 10
RECENT_EVENTS = 20
AGENT_ID_FORMAT = re.compile(r"^[0-9]{1,18}$")

SCOPE_TYPE = OpenApiParameter(
    "scope_type",
    str,
    OpenApiParameter.PATH,
    enum=ScopeType.values,
    description="tenant, agent or user. Another value: 400.",
)
SCOPE_KEY = OpenApiParameter(
    "scope_key",
    str,
    OpenApiParameter.PATH,
    pattern=r"^[^/]+$",
    description=(
        "The tenant's Stripe customer id (cus_acme), customer id and agent name "
        "(cus_acme:invoice-bot), or customer id and end-user key (cus_acme:user-42)."
    ),
    examples=[
        OpenApiExample("tenant", value="cus_acme"),
        OpenApiExample("agent", value="cus_acme:invoice-bot"),
    ],
)
AGENT_ID = OpenApiParameter("agent_id", int, OpenApiParameter.PATH, description="The agent's id.")
CUSTOMER_ID = OpenApiParameter(
    "customer_id",
    str,
    OpenApiParameter.PATH,
    pattern=r"^cus_[A-Za-z0-9]{1,64}$",
    description="The tenant's Stripe customer id.",
)
KEY_ID = OpenApiParameter(
    "key_id",
    str,
    OpenApiParameter.PATH,
    pattern=r"^[0-9a-f]{12}$",
    description="The key id: the 12 hex digits after sgk_.",
)
BUDGET_EXAMPLE = {
    "scope_type": "agent",
    "tenant": "cus_acme",
    "agent": "invoice-bot",
    "limit_usd": "25",
    "window": "day",
    "warn_at": "0.5",
    "soft_cap": "0.8",
    "hard_cap": "1",
    "disabled_tools": ["web_search"],
}


# --- Budgets ------------------------------------------------------------------------


def find_policy(request, scope_type: str, scope_key: str) -> BudgetPolicy:
    check_scope_type(scope_type)
    policies = BudgetPolicy.objects.select_related("tenant", "agent__tenant").filter(
        scope_type=scope_type, scope_key=scope_key
    )
    tenant = calling_tenant(request)
    if tenant is not None:
        policies = policies.filter(tenant=tenant)
    policy = policies.first()
    if policy is None:
        raise ScopeNotFound(f"no {scope_type} budget {scope_key!r}")
    return policy


def with_current_periods(policies: list[BudgetPolicy], now: datetime) -> list[BudgetPolicy]:
    """Attach each policy's period at `now`, opening it when this window has none yet
    (as the first call in the window would)."""
    current = {
        period.policy_id: period
        for period in BudgetPeriod.objects.filter(
            policy__in=policies, closed_at__isnull=True, window_start__lte=now, window_end__gt=now
        ).order_by("window_start")
    }
    for policy in policies:
        policy.current_period = current.get(policy.pk) or engine.open_period(policy, now)
    return policies


def with_history(policy: BudgetPolicy, now: datetime) -> BudgetPolicy:
    with_current_periods([policy], now)
    policy.recent_periods = list(policy.periods.order_by("-window_start")[:RECENT_PERIODS])
    policy.recent_events = list(
        BudgetEvent.objects.filter(period__policy=policy)
        .select_related("period")
        .order_by("-created_at", "-id")[:RECENT_EVENTS]
    )
    return policy


def _budget_rows(filters: dict, tenant: Tenant | None, now: datetime) -> QuerySet[BudgetPolicy]:
    rows = BudgetPolicy.objects.select_related("tenant", "agent__tenant")
    if tenant is not None:
        rows = rows.filter(tenant=tenant)
    if filters.get("scope_type"):
        rows = rows.filter(scope_type=filters["scope_type"])
    if filters.get("tenant"):
        rows = rows.filter(tenant__stripe_customer_id=filters["tenant"])
    if filters.get("enabled") is not None:
        rows = rows.filter(enabled=filters["enabled"])
    if filters.get("search"):
        term = filters["search"]
        rows = rows.filter(
            Q(scope_key__icontains=term)
            | Q(tenant__name__icontains=term)
            | Q(agent__name__icontains=term)
            | Q(user_key__icontains=term)
        )
    if filters.get("state"):
        # A policy without a period in this window has spent nothing in it: active.
        state = (
            BudgetPeriod.objects.filter(
                policy=OuterRef("pk"),
                closed_at__isnull=True,
                window_start__lte=now,
                window_end__gt=now,
            )
            .order_by("-window_start")
            .values("state")[:1]
        )
        rows = rows.annotate(
            current_state=Coalesce(Subquery(state), Value(PeriodState.ACTIVE))
        ).filter(current_state=filters["state"])
    return rows.order_by("scope_key", "scope_type")


class BudgetListView(OperatorView):
    agent_readable = True

    @extend_schema(
        operation_id="budgets_list",
        tags=["budgets"],
        summary="All budgets with their current period",
        description=(
            "Every budget policy with its current period: limit, spent, held, remaining, "
            "state, window start and end. An agent key sees its own tenant's budgets only. "
            "A tenant that has never made a call has no tenant budget yet: the default "
            "(from settings or its plan) is created on first use."
        ),
        parameters=[BudgetQuerySerializer],
        responses={200: BudgetSerializer(many=True), **error_responses(400, 404)},
    )
    def get(self, request):
        filters = self.query(BudgetQuerySerializer)
        now = timezone.now()
        rows = _budget_rows(filters, calling_tenant(request), now)
        page = self.paginate_queryset(rows)
        with_current_periods(page, now)
        return self.get_paginated_response(BudgetSerializer(page, many=True).data)

    @extend_schema(
        operation_id="budgets_set",
        tags=["budgets"],
        summary="Create or update a budget",
        description=(
            "Names the scope with scope_type, tenant and (for agent and user budgets) agent "
            "or user; the scope key is derived from them. limit_usd is USD as a decimal "
            "string or a JSON number, exact to the nanodollar: more precision is a 400. "
            "Thresholds are fractions of the limit with warn_at <= soft_cap <= hard_cap. "
            "On an update, fields left out keep their values; the new values apply to the "
            "current period at once, and a new window starts a new period now. "
            "201 when created, 200 when updated. Staff only."
        ),
        request=BudgetWriteSerializer,
        responses={
            200: BudgetSerializer,
            201: BudgetSerializer,
            **error_responses(400, 415),
        },
        examples=[OpenApiExample("agent budget", value=BUDGET_EXAMPLE, request_only=True)],
    )
    def post(self, request):
        data = self.body(BudgetWriteSerializer)
        policy = services.set_policy(
            data["tenant"],
            data["scope_type"],
            agent=data["agent"],
            user_key=data["user_key"],
            **data["values"],
        )
        with_current_periods([policy], timezone.now())
        return Response(BudgetSerializer(policy).data, status=201 if data["created"] else 200)


class BudgetDetailView(OperatorView):
    agent_readable = True

    @extend_schema(
        operation_id="budgets_retrieve",
        tags=["budgets"],
        summary="One budget, its current and recent periods, and its events",
        parameters=[SCOPE_TYPE, SCOPE_KEY],
        responses={200: BudgetDetailSerializer, **error_responses(400, 404)},
    )
    def get(self, request, scope_type: str, scope_key: str):
        policy = find_policy(request, scope_type, scope_key)
        return Response(BudgetDetailSerializer(with_history(policy, timezone.now())).data)

    @extend_schema(
        operation_id="budgets_delete",
        tags=["budgets"],
        summary="Remove a budget",
        description=(
            "Deletes the policy and its periods and events; the spend ledger keeps every "
            "charge. A deleted tenant budget comes back from settings (or the tenant's "
            "plan) on the tenant's next call, as do agent and user budgets when a default "
            "for them is configured; to switch a budget off instead, set enabled to false. "
            "Staff only."
        ),
        parameters=[SCOPE_TYPE, SCOPE_KEY],
        responses={204: None, **error_responses(400, 404)},
    )
    def delete(self, request, scope_type: str, scope_key: str):
        find_policy(request, scope_type, scope_key).delete()
        return Response(status=204)


class BudgetResetView(OperatorView):
    @extend_schema(
        operation_id="budgets_reset",
        tags=["budgets"],
        summary="Close the current period early and open a new one",
        description=(
            "The current period is closed with the reason and who reset it, and keeps its "
            "spend; a new period starts now and ends where the old one would have. Calls "
            "authorized before the reset are still charged to the old period. Staff only."
        ),
        parameters=[SCOPE_TYPE, SCOPE_KEY],
        request=ResetSerializer,
        responses={200: BudgetSerializer, **error_responses(400, 404, 415)},
        examples=[
            OpenApiExample("reset", value={"reason": "customer bought a top-up"}, request_only=True)
        ],
    )
    def post(self, request, scope_type: str, scope_key: str):
        policy = find_policy(request, scope_type, scope_key)
        change = self.body(ResetSerializer)
        policy.current_period = engine.reset(
            policy, reason=change["reason"], by=request.user.get_username()
        )
        return Response(BudgetSerializer(policy).data)


# --- Tenants ------------------------------------------------------------------------


def find_tenant(customer_id: str) -> Tenant:
    tenant = Tenant.objects.select_related("plan").filter(stripe_customer_id=customer_id).first()
    if tenant is None:
        raise ScopeNotFound(f"no tenant {customer_id!r}")
    return tenant


class TenantListView(OperatorView):
    @extend_schema(
        operation_id="tenants_list",
        tags=["tenants"],
        summary="Tenants",
        parameters=[TenantQuerySerializer],
        responses={200: TenantSerializer(many=True), **error_responses(400, 404)},
    )
    def get(self, request):
        filters = self.query(TenantQuerySerializer)
        rows = Tenant.objects.select_related("plan").order_by("stripe_customer_id")
        if filters.get("status"):
            rows = rows.filter(status=filters["status"])
        if filters.get("search"):
            term = filters["search"]
            rows = rows.filter(Q(name__icontains=term) | Q(stripe_customer_id__icontains=term))
        page = self.paginate_queryset(rows)
        return self.get_paginated_response(TenantSerializer(page, many=True).data)

    @extend_schema(
        operation_id="tenants_create",
        tags=["tenants"],
        summary="Create a tenant",
        description="Usually Stripe's subscription webhooks create tenants; this is for the rest.",
        request=TenantCreateSerializer,
        responses={201: TenantSerializer, **error_responses(400, 415)},
        examples=[
            OpenApiExample(
                "tenant",
                value={"name": "Initech", "stripe_customer_id": "cus_initech"},
                request_only=True,
            )
        ],
    )
    def post(self, request):
        change = self.body(TenantCreateSerializer)
        tenant = services.create_tenant(**change)
        return Response(TenantSerializer(tenant).data, status=201)


class TenantDetailView(OperatorView):
    @extend_schema(
        operation_id="tenants_retrieve",
        tags=["tenants"],
        summary="One tenant",
        parameters=[CUSTOMER_ID],
        responses={200: TenantSerializer, **error_responses(404)},
    )
    def get(self, request, customer_id: str):
        return Response(TenantSerializer(find_tenant(customer_id)).data)

    @extend_schema(
        operation_id="tenants_suspend",
        tags=["tenants"],
        summary="Suspend or resume a tenant",
        description=(
            "A suspended tenant's calls are refused (subscription_inactive). An operator's "
            "suspension stays until an operator lifts it, whatever billing says; lifting "
            "it also lifts a billing suspension."
        ),
        parameters=[CUSTOMER_ID],
        request=TenantUpdateSerializer,
        responses={200: TenantSerializer, **error_responses(400, 404, 415)},
        examples=[
            OpenApiExample(
                "suspend", value={"suspended": True, "reason": "abuse"}, request_only=True
            )
        ],
    )
    def patch(self, request, customer_id: str):
        tenant = find_tenant(customer_id)
        change = self.body(TenantUpdateSerializer)
        if "suspended" in change:
            tenant = services.set_tenant_suspended(
                tenant, change["suspended"], change.get("reason", "")
            )
        return Response(TenantSerializer(tenant).data)


# --- Agents and keys ----------------------------------------------------------------


def _agents() -> QuerySet[Agent]:
    return Agent.objects.select_related("tenant").prefetch_related("keys")


def find_agent(agent_id: str) -> Agent:
    # The route takes any string, so a malformed id is a JSON 404 like a missing one.
    agent = _agents().filter(pk=int(agent_id)).first() if AGENT_ID_FORMAT.match(agent_id) else None
    if agent is None:
        raise ScopeNotFound(f"no agent {agent_id}")
    return agent


class AgentListView(OperatorView):
    @extend_schema(
        operation_id="agents_list",
        tags=["agents"],
        summary="Agents, with their keys",
        parameters=[AgentQuerySerializer],
        responses={200: AgentSerializer(many=True), **error_responses(400, 404)},
    )
    def get(self, request):
        filters = self.query(AgentQuerySerializer)
        rows = _agents().order_by("tenant__stripe_customer_id", "name")
        if filters.get("tenant"):
            rows = rows.filter(tenant__stripe_customer_id=filters["tenant"])
        if filters.get("paused") is not None:
            rows = rows.filter(paused=filters["paused"])
        if filters.get("search"):
            rows = rows.filter(name__icontains=filters["search"])
        page = self.paginate_queryset(rows)
        return self.get_paginated_response(AgentSerializer(page, many=True).data)

    @extend_schema(
        operation_id="agents_create",
        tags=["agents"],
        summary="Create an agent",
        request=AgentCreateSerializer,
        responses={201: AgentSerializer, **error_responses(400, 415)},
        examples=[
            OpenApiExample(
                "agent", value={"tenant": "cus_acme", "name": "support-bot"}, request_only=True
            )
        ],
    )
    def post(self, request):
        change = self.body(AgentCreateSerializer)
        agent = services.create_agent(**change)
        return Response(AgentSerializer(agent).data, status=201)


class AgentDetailView(OperatorView):
    @extend_schema(
        operation_id="agents_retrieve",
        tags=["agents"],
        summary="One agent, with its keys",
        parameters=[AGENT_ID],
        responses={200: AgentSerializer, **error_responses(404)},
    )
    def get(self, request, agent_id: str):
        return Response(AgentSerializer(find_agent(agent_id)).data)

    @extend_schema(
        operation_id="agents_pause",
        tags=["agents"],
        summary="Pause or resume an agent",
        description=(
            "A paused agent's calls are refused (agent_paused). Gateways cache keys for "
            "KEY_CACHE_SECONDS, so a pause takes effect everywhere within that long."
        ),
        parameters=[AGENT_ID],
        request=AgentUpdateSerializer,
        responses={200: AgentSerializer, **error_responses(400, 404, 415)},
        examples=[
            OpenApiExample(
                "pause", value={"paused": True, "reason": "runaway loop"}, request_only=True
            )
        ],
    )
    def patch(self, request, agent_id: str):
        agent = find_agent(agent_id)
        change = self.body(AgentUpdateSerializer)
        if "paused" in change:
            agent = services.set_agent_paused(agent, change["paused"], change.get("reason", ""))
        return Response(AgentSerializer(agent).data)


class AgentKeysView(OperatorView):
    @extend_schema(
        operation_id="agent_keys_issue",
        tags=["agents"],
        summary="Issue a key for an agent",
        description=(
            "The response carries the key itself, this once: only its hash is stored. "
            "The agent sends it as 'Authorization: Bearer sgk_...'."
        ),
        parameters=[AGENT_ID],
        request=KeyCreateSerializer,
        responses={201: IssuedKeySerializer, **error_responses(400, 404, 415)},
    )
    def post(self, request, agent_id: str):
        agent = find_agent(agent_id)
        change = self.body(KeyCreateSerializer)
        key, raw_key = services.issue_key(agent, change.get("label", ""))
        key.key = raw_key
        return Response(IssuedKeySerializer(key).data, status=201)


class AgentKeyView(OperatorView):
    @extend_schema(
        operation_id="agent_keys_revoke",
        tags=["agents"],
        summary="Revoke one of an agent's keys",
        description=(
            "Idempotent. Gateways cache keys for KEY_CACHE_SECONDS, so a revoked key "
            "stops working everywhere within that long."
        ),
        parameters=[AGENT_ID, KEY_ID],
        responses={200: ApiKeySerializer, **error_responses(404)},
    )
    def delete(self, request, agent_id: str, key_id: str):
        key = find_agent(agent_id).keys.filter(key_id=key_id).first()
        if key is None:
            raise ScopeNotFound(f"agent {agent_id} has no key {key_id!r}")
        return Response(ApiKeySerializer(services.revoke_key(key)).data)
