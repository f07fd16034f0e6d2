"""Live refresh: each console page polls a fragment of itself with htmx and swaps in the
fresh numbers; forms stay outside what is swapped (issue 7)."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.utils import timezone

from budgets.money import usd_to_nanos
from spend.models import HourlyRollup
from spend.rollups import rollup_hours

from .conftest import charge

# page -> its fragment
PAGES = {
    "/console/": "/console/fragments/overview/",
    "/console/budgets/": "/console/fragments/budgets/",
    "/console/budgets/tenant/cus_acme/": "/console/fragments/budgets/tenant/cus_acme/",
    "/console/agents/": "/console/fragments/agents/",
    "/console/spend/": "/console/fragments/spend/",
}


def text(response) -> str:
    return re.sub(r"\s+", " ", response.content.decode())


@pytest.mark.parametrize("fragment", PAGES.values())
def test_a_fragment_refuses_anonymous_visitors_and_makes_htmx_reload_the_page(
    client, acme_budget, fragment
):
    response = client.get(fragment, headers={"HX-Request": "true"})
    # Not a redirect: the browser would follow it and swap the login form into the page.
    assert response.status_code == 403
    assert response["HX-Refresh"] == "true"


@pytest.mark.parametrize("fragment", PAGES.values())
def test_a_fragment_refuses_signed_in_non_staff(user_client, acme_budget, fragment):
    response = user_client.get(fragment)
    assert response.status_code == 403
    assert "HX-Refresh" not in response


@pytest.mark.parametrize(("page", "fragment"), PAGES.items())
def test_each_page_polls_its_fragment_every_10_seconds(staff_client, acme_budget, page, fragment):
    html = text(staff_client.get(page))
    assert f'hx-get="{fragment}" hx-trigger="every 10s"' in html
    response = staff_client.get(fragment)
    assert response.status_code == 200
    assert "<html" not in response.content.decode()  # a fragment, not a page


def test_the_refresh_interval_comes_from_settings(staff_client, acme_budget, settings):
    settings.CONSOLE_REFRESH_SECONDS = 30
    assert 'hx-trigger="every 30s"' in text(staff_client.get("/console/"))
    settings.CONSOLE_REFRESH_SECONDS = 0
    for page in PAGES:
        assert "hx-get" not in text(staff_client.get(page))


@pytest.mark.parametrize(
    ("page", "query"),
    [
        ("budgets", "q=glob&state=active"),
        ("agents", "q=bot&page=1"),
        ("spend", "range=7d&tenant=cus_acme"),
    ],
)
def test_a_fragment_keeps_the_pages_search_and_filters(staff_client, spent, page, query):
    html = text(staff_client.get(f"/console/{page}/?{query}"))
    assert f'hx-get="/console/fragments/{page}/?{query.replace("&", "&amp;")}"' in html


def test_the_budgets_fragment_applies_the_search(staff_client, spent):
    html = text(staff_client.get("/console/fragments/budgets/", {"q": "globex"}))
    assert "cus_globex" in html and "cus_acme" not in html


def test_forms_are_outside_what_is_swapped(staff_client, spent, invoice_bot):
    for fragment in PAGES.values():
        assert "<form" not in staff_client.get(fragment).content.decode(), fragment
    # The page includes the same fragment templates around its forms.
    detail = text(staff_client.get("/console/budgets/tenant/cus_acme/"))
    assert detail.index('id="budget-live"') < detail.index('id="policy-form"')
    assert detail.index('id="reset-form"') < detail.index('id="budget-tail"')


def test_the_overview_fragment_carries_fresh_numbers_and_chart_data(staff_client, spent, acme):
    before = text(staff_client.get("/console/fragments/overview/"))
    assert 'id="spend-today">USD 7<' in before
    charge(acme, "2")
    rollup_hours()
    after = text(staff_client.get("/console/fragments/overview/"))
    assert 'id="spend-today">USD 9<' in after
    assert 'id="holds">1 · USD 1<' in after
    assert '<script id="overview-chart-data" type="application/json">' in after
    # The head replaces the polling element; the tables come out of band.
    assert '<div id="overview-live" hx-get=' in after
    assert '<div id="overview-tail" hx-swap-oob="true">' in after
    assert "Acme" in after[after.index('id="top-spenders"') :]


def test_the_page_itself_has_no_out_of_band_markers(staff_client, spent):
    for page in PAGES:
        if "agents" not in page:
            assert "hx-swap-oob" not in staff_client.get(page).content.decode(), page


def test_the_budget_fragment_shows_the_current_period_and_its_history(staff_client, spent, acme):
    charge(acme, "1")
    html = text(staff_client.get("/console/fragments/budgets/tenant/cus_acme/"))
    assert 'id="spent">7<' in html
    assert '<div id="budget-tail" hx-swap-oob="true">' in html
    assert 'id="ledger"' in html
    assert staff_client.get("/console/fragments/budgets/tenant/cus_nobody/").status_code == 404


def test_the_agents_fragment_swaps_numbers_into_the_rows_cells(staff_client, spent, invoice_bot):
    acme = invoice_bot.tenant
    charge(acme, "2", agent=invoice_bot)
    rollup_hours()
    html = text(staff_client.get("/console/fragments/agents/"))
    cell = f"#agent-{invoice_bot.pk} [data-col=spend-today]"
    assert f'<div hx-swap-oob="innerHTML:{cell}">2</div>' in html
    assert (
        f'<div hx-swap-oob="innerHTML:#agent-{invoice_bot.pk} [data-col=velocity]">2</div>' in html
    )
    assert 'badge-active">running<' in html
    page = text(staff_client.get("/console/agents/"))
    assert 'hx-swap="none"' in page  # the rows (and their forms) are never replaced
    assert f'<tr id="agent-{invoice_bot.pk}">' in page and 'data-col="status"' in page


def test_the_spend_fragment_sees_new_spend_in_settled_hours(staff_client, acme):
    """Sums of hours the rollup no longer rewrites are cached; a new rollup row (a
    backfill) is still seen at once."""
    hour = timezone.now().replace(minute=0, second=0, microsecond=0) - timedelta(hours=10)
    HourlyRollup.objects.create(
        hour=hour, tenant=acme, model="m", calls=1, prompt_tokens=1, completion_tokens=1,
        cost_nanos=usd_to_nanos("2"),
    )  # fmt: skip
    assert 'id="spend-total">USD 2<' in text(staff_client.get("/console/fragments/spend/"))
    HourlyRollup.objects.create(
        hour=hour - timedelta(hours=1), tenant=acme, model="m", calls=1, prompt_tokens=1,
        completion_tokens=1, cost_nanos=usd_to_nanos("3"),
    )  # fmt: skip
    html = text(staff_client.get("/console/fragments/spend/"))
    assert 'id="spend-total">USD 5<' in html
    assert '<div id="spend-tail" hx-swap-oob="true">' in html
