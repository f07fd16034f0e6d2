"""The operator API, included under /api/ (next to api/authorizations and
api/webhooks/stripe, which are not DRF views and not in this schema)."""

from django.urls import path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from budgets import api as budgets
from governance import api
from spend import api as spend

urlpatterns = [
    path("health", api.HealthView.as_view(), name="api-health"),
    path("budgets", budgets.BudgetListView.as_view(), name="api-budgets"),
    path(
        "budgets/<str:scope_type>/<str:scope_key>",
        budgets.BudgetDetailView.as_view(),
        name="api-budget",
    ),
    path(
        "budgets/<str:scope_type>/<str:scope_key>/reset",
        budgets.BudgetResetView.as_view(),
        name="api-budget-reset",
    ),
    path(
        "spend/<str:scope_type>/<str:scope_key>",
        spend.SpendSummaryView.as_view(),
        name="api-spend",
    ),
    path(
        "spend/<str:scope_type>/<str:scope_key>/history",
        spend.SpendHistoryView.as_view(),
        name="api-spend-history",
    ),
    path(
        "spend/<str:scope_type>/<str:scope_key>/spikes",
        spend.SpendSpikesView.as_view(),
        name="api-spend-spikes",
    ),
    path("tenants", budgets.TenantListView.as_view(), name="api-tenants"),
    path("tenants/<str:customer_id>", budgets.TenantDetailView.as_view(), name="api-tenant"),
    path("agents", budgets.AgentListView.as_view(), name="api-agents"),
    path("agents/<str:agent_id>", budgets.AgentDetailView.as_view(), name="api-agent"),
    path("agents/<str:agent_id>/keys", budgets.AgentKeysView.as_view(), name="api-agent-keys"),
    path(
        "agents/<str:agent_id>/keys/<str:key_id>",
        budgets.AgentKeyView.as_view(),
        name="api-agent-key",
    ),
    path("schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
]
