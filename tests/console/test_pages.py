from __future__ import annotations

import json
import re

import pytest
from django.utils import timezone

from budgets import services
from budgets.models import ScopeType, Tenant
from budgets.money import usd_to_nanos
from spend.models import Spike


def text(response) -> str:
    return re.sub(r"\s+", " ", response.content.decode())


def budgets_table(response) -> str:
    page = text(response)
    return page[page.index('id="budgets"') : page.index("</table>", page.index('id="budgets"'))]


def test_it_counts_tenants_by_state(staff_client, spent, acme, globex):
    services.create_tenant("Initech", "cus_initech")
    Tenant.objects.filter(pk=globex.pk).update(status=Tenant.Status.SUSPENDED)
    page = text(staff_client.get("/console/"))
    assert 'data-state="warned">1<' in page  # acme
    assert 'data-state="suspended">1<' in page  # globex
    assert 'data-state="active">1<' in page  # initech, no budget yet
    assert 'data-state="stopped">0<' in page


def test_it_shows_spend_today_period_and_holds(staff_client, spent):
    page = text(staff_client.get("/console/"))
    assert 'id="spend-today">USD 7<' in page
    assert 'id="spend-period">USD 7<' in page
    assert 'id="holds">1 · USD 1<' in page


def test_it_lists_top_spenders_biggest_first(staff_client, spent):
    page = text(staff_client.get("/console/"))
    table = page[page.index('id="top-spenders"') :]
    assert table.index("Acme") < table.index("Globex")
    assert '<td class="num">6</td>' in table
    assert '<td class="num">1</td>' in table


def chart_data(response, element_id: str) -> dict:
    page = response.content.decode()
    found = re.search(rf'<script id="{element_id}" type="application/json">(.*?)</script>', page)
    return json.loads(found.group(1))


def test_it_charts_the_last_24_hours_in_usd_by_model(staff_client, spent):
    response = staff_client.get("/console/")
    chart = chart_data(response, "overview-chart-data")
    assert chart["bucket"] == "hour"
    assert len(chart["labels"]) == 24
    assert chart["labels"][-1] == f"{timezone.now():%m-%d %H}:00"
    assert [d["label"] for d in chart["datasets"]] == ["m"]
    assert chart["datasets"][0]["values"] == ["0"] * 23 + ["7"]
    assert chart["total_usd"] == "7"
    page = text(response)
    assert 'id="spend-24h">USD 7<' in page
    assert '<canvas id="overview-chart" data-chart="overview-chart-data"' in page


def test_it_shows_recent_events_and_spikes(staff_client, spent, acme):
    Spike.objects.create(
        scope_type="tenant",
        tenant=acme,
        kind=Spike.Kind.ANOMALY,
        hour=timezone.now().replace(minute=0, second=0, microsecond=0),
        spend_nanos=usd_to_nanos("6"),
        baseline_nanos=usd_to_nanos("0.5"),
        threshold_nanos=usd_to_nanos("2"),
    )
    page = text(staff_client.get("/console/"))
    assert "<td>warned</td>" in page  # acme crossed its warn threshold
    assert "far above its recent baseline" in page
    assert '<td class="num">0.5</td>' in page


@pytest.mark.parametrize(
    ("simulated", "stripe_key", "shown"),
    [
        (True, "sk_test_x", ["upstream is simulated"]),
        (False, "", ["Stripe is not configured"]),
        (False, "sk_test_x", []),
    ],
)
def test_it_shows_a_banner_when_the_upstream_is_simulated_or_stripe_is_missing(
    staff_client, settings, simulated, stripe_key, shown
):
    settings.UPSTREAM_SIMULATED = simulated
    settings.STRIPE_SECRET_KEY = stripe_key
    page = text(staff_client.get("/console/"))
    assert page.count('class="banner"') == len(shown)
    for banner in shown:
        assert banner in page


def test_it_lists_budgets_with_their_current_period(staff_client, spent):
    page = text(staff_client.get("/console/budgets/"))
    acme_row = re.search(r"<tr>(?:(?!</tr>).)*cus_acme(?:(?!</tr>).)*</tr>", page).group(0)
    cells = re.findall(r'<td class="num">([^<]*)</td>', acme_row)
    assert cells == ["10", "6", "1", "3"]  # limit, spent, held, remaining
    assert "badge-warned" in acme_row
    assert "width: 60%" in acme_row
    assert "cus_globex" in page


def test_it_searches_by_scope_key(staff_client, spent):
    page = budgets_table(staff_client.get("/console/budgets/", {"q": "globex"}))
    assert "cus_globex" in page
    assert "cus_acme" not in page


def test_it_filters_by_state(staff_client, spent):
    warned = budgets_table(staff_client.get("/console/budgets/", {"state": "warned"}))
    assert "cus_acme" in warned and "cus_globex" not in warned
    active = budgets_table(staff_client.get("/console/budgets/", {"state": "active"}))
    assert "cus_globex" in active and "cus_acme" not in active


def test_it_filters_by_scope_type(staff_client, spent, invoice_bot):
    services.set_policy(
        invoice_bot.tenant, ScopeType.AGENT, agent=invoice_bot, limit_nanos=usd_to_nanos("2")
    )
    page = text(staff_client.get("/console/budgets/", {"scope_type": "agent"}))
    assert "cus_acme:invoice-bot" in page
    assert "cus_globex" not in page
    assert "1 budget<" in page


def test_it_paginates_in_sql_and_reads_periods_once(
    staff_client, acme, django_assert_max_num_queries
):
    for n in range(60):
        services.set_policy(acme, ScopeType.USER, user_key=f"u{n:02}", limit_nanos=1000)
    with django_assert_max_num_queries(8):
        response = staff_client.get("/console/budgets/")
    assert "60 budgets" in text(response) and "page 1 of 2" in text(response)
    first = budgets_table(response)
    assert first.count("badge-active") == 50
    second = budgets_table(staff_client.get("/console/budgets/", {"page": "2"}))
    assert second.count("badge-active") == 10
    assert "cus_acme:u59" in second and "cus_acme:u59" not in first


def test_it_shows_a_budget_with_only_its_own_data(staff_client, spent):
    page = text(staff_client.get("/console/budgets/tenant/cus_acme/"))
    assert 'id="spent">6<' in page
    assert 'id="held">1<' in page
    assert 'id="remaining">3<' in page
    assert 'id="limit">10<' in page
    ledger = page[page.index('id="ledger"') :]
    assert ledger.count('<td class="num">4</td>') == 1
    assert ledger.count('<td class="num">2</td>') == 1
    assert '<td class="num">1</td>' not in ledger[: ledger.index("</table>")]  # globex's

    globex = text(staff_client.get("/console/budgets/tenant/cus_globex/"))
    assert 'id="spent">1<' in globex
    assert "<td>warned</td>" not in globex


@pytest.mark.parametrize(
    "url",
    [
        "/console/budgets/tenant/cus_nobody/",
        "/console/budgets/galaxy/cus_acme/",
        "/console/budgets/agent/cus_acme/",
    ],
)
def test_it_returns_404_for_an_unknown_scope(staff_client, acme_budget, url):
    assert staff_client.get(url).status_code == 404
