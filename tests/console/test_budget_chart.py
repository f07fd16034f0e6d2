"""The spend chart on a budget's page: its scope's spend over the current period, from
the hourly rollups (issue 7)."""

from __future__ import annotations

import json
import re

from django.utils import timezone

from budgets import engine, services
from budgets.models import ScopeType, Window
from budgets.money import usd_to_nanos
from spend.rollups import rollup_hours

from .conftest import charge


def chart_data(response) -> dict | None:
    page = response.content.decode()
    found = re.search(
        r'<script id="budget-chart-data" type="application/json">(.*?)</script>', page
    )
    return json.loads(found.group(1)) if found else None


def spent_now(chart: dict) -> str:
    """What the chart shows for the current hour, all models together."""
    index = chart["labels"].index(f"{timezone.now():%m-%d %H}:00")
    return [d["values"][index] for d in chart["datasets"]]


def test_a_tenant_budget_charts_its_tenants_spend_per_hour_of_the_day(staff_client, spent):
    response = staff_client.get("/console/budgets/tenant/cus_acme/")
    chart = chart_data(response)
    assert chart["bucket"] == "hour"
    assert len(chart["labels"]) == 24  # the whole day window, later hours empty
    assert chart["labels"][0] == f"{timezone.now():%m-%d} 00:00"
    assert spent_now(chart) == ["6"]  # not Globex's USD 1
    assert chart["total_usd"] == "6"
    assert '<canvas id="budget-chart" data-chart="budget-chart-data"' in response.content.decode()
    assert spent_now(chart_data(staff_client.get("/console/budgets/tenant/cus_globex/"))) == ["1"]


def test_an_agent_budget_charts_only_that_agents_spend(
    staff_client, acme, acme_budget, invoice_bot, churn_bot
):
    services.set_policy(acme, ScopeType.AGENT, agent=invoice_bot, limit_nanos=usd_to_nanos("5"))
    charge(acme, "2", agent=invoice_bot)
    charge(acme, "3", agent=churn_bot)
    rollup_hours()
    chart = chart_data(staff_client.get("/console/budgets/agent/cus_acme:invoice-bot/"))
    assert spent_now(chart) == ["2"]
    assert chart["total_usd"] == "2"


def test_a_monthly_budget_is_charted_per_day(staff_client, acme, db):
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("50"), window=Window.MONTH)
    charge(acme, "4")
    rollup_hours()
    chart = chart_data(staff_client.get("/console/budgets/tenant/cus_acme/"))
    assert chart["bucket"] == "day"
    today = timezone.now()
    assert chart["labels"][0] == f"{today:%Y-%m}-01"
    assert chart["datasets"][0]["values"][chart["labels"].index(f"{today:%Y-%m-%d}")] == "4"


def test_a_user_budget_says_why_it_has_no_chart(staff_client, acme, acme_budget):
    services.set_policy(acme, ScopeType.USER, user_key="user-42", limit_nanos=usd_to_nanos("1"))
    response = staff_client.get("/console/budgets/user/cus_acme:user-42/")
    assert response.status_code == 200
    page = re.sub(r"\s+", " ", response.content.decode())
    assert "not charted for an end user's budget" in page
    assert "rollups are kept per tenant, agent and model, not per end user" in page
    assert chart_data(response) is None
    assert "<canvas" not in page


def test_a_budget_reset_mid_hour_says_the_first_hour_counts_earlier_spend(
    staff_client, spent, acme_budget
):
    engine.reset(acme_budget, reason="test", by="alice")
    response = staff_client.get("/console/budgets/tenant/cus_acme/")
    page = re.sub(r"\s+", " ", response.content.decode())
    assert "the first hour also counts what was spent in it before the period began" in page
