from django.urls import path

from . import console

app_name = "console"

urlpatterns = [
    path("", console.overview, name="overview"),
    path("budgets/", console.budgets, name="budgets"),
    path("agents/", console.agents, name="agents"),
    path("spend/", console.spend_analysis, name="spend"),
    path(
        "budgets/<str:scope_type>/<path:scope_key>/",
        console.budget_detail,
        name="budget-detail",
    ),
    # The live parts of each page, fetched again by htmx every CONSOLE_REFRESH_SECONDS.
    path("fragments/overview/", console.overview_fragment, name="overview-fragment"),
    path("fragments/budgets/", console.budgets_fragment, name="budgets-fragment"),
    path("fragments/agents/", console.agents_fragment, name="agents-fragment"),
    path("fragments/spend/", console.spend_fragment, name="spend-fragment"),
    path(
        "fragments/budgets/<str:scope_type>/<path:scope_key>/",
        console.budget_detail_fragment,
        name="budget-detail-fragment",
    ),
]
