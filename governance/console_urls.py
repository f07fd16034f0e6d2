from django.urls import path

from . import console

app_name = "console"

urlpatterns = [
    path("", console.overview, name="overview"),
    path("budgets/", console.budgets, name="budgets"),
    path("agents/", console.agents, name="agents"),
    path(
        "budgets/<str:scope_type>/<path:scope_key>/",
        console.budget_detail,
        name="budget-detail",
    ),
]
