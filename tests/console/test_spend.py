"""The console's spend page: a range (presets or dates), breakdowns per tenant, agent and
model from the hourly rollups, the spend rate, spikes, a chart, and clear errors for
ranges it cannot show (issue 7)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from budgets import services
from budgets.models import Tenant
from budgets.money import usd_to_nanos
from spend.models import HourlyRollup, Spike
from spend.rollups import rollup_hours

from .conftest import charge

URL = "/console/spend/"
FRAGMENT = "/console/fragments/spend/"
NOW = datetime(2026, 11, 18, 15, 30, tzinfo=UTC)
H = timedelta(hours=1)
THIS_HOUR = NOW.replace(minute=0)


def text(response) -> str:
    return re.sub(r"\s+", " ", response.content.decode())


def table(response, table_id: str) -> str:
    page = text(response)
    start = page.index(f'id="{table_id}"')
    return page[start : page.index("</table>", start)]


def rows(response, table_id: str) -> list[list[str]]:
    """The cells of each body row, tags stripped."""
    body = table(response, table_id).split("<tbody>", 1)[1]
    return [
        [" ".join(re.sub(r"<[^>]+>", " ", cell).split()) for cell in cells]
        for cells in (
            re.findall(r"<td[^>]*>(.*?)</td>", row)
            for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body)
        )
    ]


def chart_data(response) -> dict:
    page = response.content.decode()
    found = re.search(r'<script id="spend-chart-data" type="application/json">(.*?)</script>', page)
    return json.loads(found.group(1))


def rollup(tenant, hour, usd, model="mistral-small", agent=None, calls=1, tokens=(1000, 100)):
    return HourlyRollup.objects.create(
        hour=hour,
        tenant=tenant,
        agent=agent,
        model=model,
        calls=calls,
        prompt_tokens=tokens[0],
        completion_tokens=tokens[1],
        cost_nanos=usd_to_nanos(usd),
    )


@pytest.fixture(autouse=True)
def at_now(monkeypatch):
    monkeypatch.setattr(timezone, "now", lambda: NOW)
    return NOW


@pytest.fixture
def report_bot(globex):
    return services.create_agent(globex, "report-bot")


@pytest.fixture
def spend(acme, globex, invoice_bot, churn_bot, report_bot):
    """In the last 24 hours: Acme USD 6.5 (invoice-bot 3.5, churn-bot 3), Globex 0.5;
    mistral-small 4, mistral-large 3. Three days ago Acme USD 10; 40 days ago Globex 100."""
    rollup(acme, THIS_HOUR - H, "2.5", agent=invoice_bot, calls=4)
    rollup(acme, THIS_HOUR - 5 * H, "1", agent=invoice_bot, calls=2)
    rollup(acme, THIS_HOUR - H, "3", model="mistral-large", agent=churn_bot, tokens=(5000, 500))
    rollup(globex, THIS_HOUR - 2 * H, "0.5", agent=report_bot)
    rollup(acme, THIS_HOUR - 72 * H, "10", model="mistral-large", agent=invoice_bot)
    rollup(globex, THIS_HOUR - 40 * 24 * H, "100", agent=report_bot)


# --- Access -------------------------------------------------------------------------


@pytest.mark.parametrize("url", [URL, f"{URL}?range=30d", f"{URL}?from=x"])
def test_it_redirects_anonymous_visitors_to_the_admin_login(client, db, url):
    response = client.get(url)
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/?next=/console/spend/")


@pytest.mark.parametrize("url", [URL, FRAGMENT])
def test_it_refuses_signed_in_non_staff(user_client, url):
    assert user_client.get(url).status_code == 403


def test_it_is_in_the_console_navigation(staff_client):
    page = text(staff_client.get("/console/"))
    assert f'<a href="{URL}" >Spend</a>' in page
    assert f'<a href="{URL}" aria-current="page">Spend</a>' in text(staff_client.get(URL))


# --- What it shows --------------------------------------------------------------------


def test_it_shows_the_last_24_hours_by_default(staff_client, spend):
    response = staff_client.get(URL)
    assert response.status_code == 200
    page = text(response)
    assert "Spend · the last 24 hours" in page
    assert "From 2026-11-17 16:00 to 2026-11-18 16:00 UTC" in page
    assert 'id="spend-total">USD 7<' in page
    assert 'id="spend-calls">8<' in page
    assert 'id="spend-tokens">8,000 / 800<' in page


def test_it_breaks_spend_down_per_tenant_agent_and_model(staff_client, spend):
    response = staff_client.get(URL)
    assert rows(response, "by-tenant") == [
        ["Acme cus_acme", "6.5", "92%", "7"],
        ["Globex cus_globex", "0.5", "7%", "1"],
    ]
    assert rows(response, "by-agent") == [
        ["invoice-bot cus_acme", "3.5", "50%", "6"],
        ["churn-bot cus_acme", "3", "42%", "1"],
        ["report-bot cus_globex", "0.5", "7%", "1"],
    ]
    assert rows(response, "by-model") == [
        ["mistral-small", "4", "57%", "3,300"],
        ["mistral-large", "3", "42%", "5,500"],
    ]


def test_it_shows_the_spend_rate_and_the_last_hour_against_the_average(staff_client, spend):
    page = text(staff_client.get(URL))
    # USD 7 over the 23.5 hours of the range that have passed.
    assert 'id="rate-hour">USD 0.2979<' in page
    assert 'id="rate-day">USD 7.1489<' in page
    # The last whole hour, 14:00-15:00: USD 5.5, 18.4 times the average hour.
    assert "Last whole hour (from 14:00)" in page
    assert 'id="rate-last-hour">USD 5.5<br><span class="help">18.4x the average</span><' in page


def test_it_charts_spend_per_hour_split_by_model(staff_client, spend):
    chart = chart_data(staff_client.get(URL))
    assert chart["bucket"] == "hour"
    assert len(chart["labels"]) == 24
    assert chart["labels"][0] == "11-17 16:00" and chart["labels"][-1] == "11-18 15:00"
    small, large = chart["datasets"]
    assert small["label"] == "mistral-small" and large["label"] == "mistral-large"
    at = chart["labels"].index
    assert small["values"][at("11-18 14:00")] == "2.5"
    assert small["values"][at("11-18 13:00")] == "0.5"
    assert small["values"][at("11-18 10:00")] == "1"
    assert large["values"][at("11-18 14:00")] == "3"
    assert sum(v != "0" for v in small["values"] + large["values"]) == 4
    assert chart["total_usd"] == "7"


def test_it_charts_long_ranges_per_day(staff_client, spend):
    response = staff_client.get(URL, {"range": "30d"})
    chart = chart_data(response)
    assert chart["bucket"] == "day"
    assert len(chart["labels"]) == 30
    assert chart["labels"][0] == "2026-10-20" and chart["labels"][-1] == "2026-11-18"
    large = next(d for d in chart["datasets"] if d["label"] == "mistral-large")
    assert large["values"][chart["labels"].index("2026-11-15")] == "10"
    assert large["values"][-1] == "3"
    assert 'id="spend-total">USD 17<' in text(response)  # 40 days ago is outside


def test_the_7_day_preset_counts_three_days_ago(staff_client, spend):
    response = staff_client.get(URL, {"range": "7d"})
    page = text(response)
    assert 'id="spend-total">USD 17<' in page
    assert len(chart_data(response)["labels"]) == 168


def test_it_shows_custom_dates_as_whole_utc_days(staff_client, spend):
    response = staff_client.get(URL, {"range": "custom", "from": "2026-11-15", "to": "2026-11-15"})
    page = text(response)
    assert "Spend · 2026-11-15" in page
    assert "From 2026-11-15 00:00 to 2026-11-16 00:00 UTC" in page
    assert 'id="spend-total">USD 10<' in page
    assert rows(response, "by-agent") == [["invoice-bot cus_acme", "10", "100%", "1"]]
    # Without the preset, dates alone mean custom.
    alone = text(staff_client.get(URL, {"from": "2026-10-01", "to": "2026-10-31"}))
    assert "Spend · 2026-10-01 to 2026-10-31" in alone
    assert 'id="spend-total">USD 100<' in alone


def test_it_filters_by_tenant(staff_client, spend):
    response = staff_client.get(URL, {"tenant": "cus_globex"})
    page = text(response)
    assert "Spend · the last 24 hours · Globex (cus_globex)" in page
    assert 'id="spend-total">USD 0.5<' in page
    assert rows(response, "by-tenant") == [["Globex cus_globex", "0.5", "100%", "1"]]
    assert rows(response, "by-agent") == [["report-bot cus_globex", "0.5", "100%", "1"]]
    assert "invoice-bot" not in page and "churn-bot" not in page
    assert [d["label"] for d in chart_data(response)["datasets"]] == ["mistral-small"]


def test_a_tenant_row_links_to_the_same_range_for_that_tenant(staff_client, spend):
    by_tenant = table(staff_client.get(URL, {"range": "7d"}), "by-tenant")
    assert 'href="?range=7d&amp;tenant=cus_acme"' in by_tenant


def test_it_lists_the_top_20_and_says_how_many_more(staff_client, db):
    for n in range(25):
        tenant = services.create_tenant(f"T{n:02}", f"cus_t{n:02}")
        rollup(tenant, THIS_HOUR - H, str(n + 1))
    response = staff_client.get(URL)
    tenants = rows(response, "by-tenant")
    assert len(tenants) == 21
    assert tenants[0][:2] == ["T24 cus_t24", "25"]
    assert tenants[19][:2] == ["T05 cus_t05", "6"]
    assert tenants[20] == ["5 more tenants: USD 15"]  # 1 + 2 + 3 + 4 + 5


def test_it_shows_only_the_spikes_in_the_range(staff_client, spend, acme, invoice_bot):
    for hour, usd in ((THIS_HOUR - H, "6"), (THIS_HOUR - 10 * 24 * H, "9")):
        Spike.objects.create(
            scope_type="agent",
            tenant=acme,
            agent=invoice_bot,
            kind=Spike.Kind.ANOMALY,
            hour=hour,
            spend_nanos=usd_to_nanos(usd),
            baseline_nanos=usd_to_nanos("0.5"),
            threshold_nanos=usd_to_nanos("2"),
        )
    spikes = rows(staff_client.get(URL), "spikes")
    assert spikes == [
        ["2026-11-18 14:00", "invoice-bot @ cus_acme", "far above its recent baseline", "6", "0.5",
         "2", "no"],
    ]  # fmt: skip
    assert len(rows(staff_client.get(URL, {"range": "30d"}), "spikes")) == 2
    assert rows(staff_client.get(URL, {"tenant": "cus_globex"}), "spikes") == [
        ["No spikes in this range."]
    ]


def test_it_reads_what_the_engine_charged_and_the_rollup_summed(
    staff_client, acme, globex, acme_budget, globex_budget, monkeypatch
):
    monkeypatch.setattr(timezone, "now", lambda: datetime.now(UTC))
    # The staff session was opened at NOW, and expires two weeks after it by the real clock.
    staff_client.force_login(get_user_model().objects.get(username="alice"))
    charge(acme, "4")
    charge(globex, "1.25")
    rollup_hours()
    response = staff_client.get(URL)
    assert 'id="spend-total">USD 5.25<' in text(response)
    assert [r[:2] for r in rows(response, "by-tenant")] == [
        ["Acme cus_acme", "4"],
        ["Globex cus_globex", "1.25"],
    ]


def test_an_empty_range_says_so(staff_client, db):
    response = staff_client.get(URL)
    assert response.status_code == 200
    assert rows(response, "by-tenant") == [["No spend in this range."]]
    assert 'id="spend-total">USD 0<' in text(response)
    assert chart_data(response)["datasets"] == []


def test_it_reads_a_bounded_number_of_queries(staff_client, spend, django_assert_max_num_queries):
    for n in range(30):
        tenant = services.create_tenant(f"T{n:02}", f"cus_t{n:02}")
        rollup(tenant, THIS_HOUR - H, "1", agent=services.create_agent(tenant, "bot"))
    with django_assert_max_num_queries(14):
        assert staff_client.get(URL, {"range": "30d"}).status_code == 200


# --- Ranges it cannot show --------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"range": "1y"}, "Unknown range &#x27;1y&#x27;: choose 24h, 7d, 30d or custom dates."),
        ({"from": "2026-11-20", "to": "2026-11-10"},
         "The from date (2026-11-20) is after the to date (2026-11-10)."),
        ({"from": "yesterday", "to": "2026-11-10"},
         "from: &#x27;yesterday&#x27; is not a date; use YYYY-MM-DD"),
        ({"from": "2026-02-30", "to": "2026-03-01"},
         "from: &#x27;2026-02-30&#x27; is not a date"),
        ({"from": "2026-11-01", "to": "18/11/2026"}, "to: &#x27;18/11/2026&#x27; is not a date"),
        ({"from": "2025-01-01", "to": "2026-11-18"},
         "The range is 687 days long; the longest is 366 days."),
        ({"range": "custom", "from": "2026-11-01"}, "A custom range needs both a from and a to"),
        ({"range": "custom"}, "A custom range needs both a from and a to"),
        ({"from": "9999-12-31", "to": "9999-12-31"}, "The to date is too far in the future."),
        ({"tenant": "cus_nobody"}, "No tenant has the customer id &#x27;cus_nobody&#x27;."),
    ],
)  # fmt: skip
def test_it_refuses_a_range_it_cannot_show_with_a_clear_message(
    staff_client, spend, params, message
):
    response = staff_client.get(URL, params)
    assert response.status_code == 400
    page = text(response)
    assert 'id="spend-error"' in page
    assert message in page
    assert 'id="spend-live"' not in page  # nothing to refresh
    assert 'id="spend-form"' in page  # the form stays, to fix the range
    fragment = staff_client.get(FRAGMENT, params)
    assert fragment.status_code == 400
    assert message in text(fragment)


def test_a_range_of_exactly_366_days_is_shown(staff_client, spend):
    response = staff_client.get(URL, {"from": "2025-11-18", "to": "2026-11-18"})
    assert response.status_code == 200
    assert len(chart_data(response)["labels"]) == 366


def test_bad_values_are_escaped_in_the_message(staff_client, db):
    response = staff_client.get(URL, {"tenant": "<script>alert(1)</script>"})
    assert response.status_code == 400
    assert "<script>alert(1)" not in response.content.decode()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in response.content.decode()


def test_a_suspended_tenant_is_still_found(staff_client, spend, globex):
    Tenant.objects.filter(pk=globex.pk).update(status=Tenant.Status.SUSPENDED)
    assert staff_client.get(URL, {"tenant": "cus_globex"}).status_code == 200
