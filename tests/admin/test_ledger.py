"""The ledger in the admin: read-only, filtered by tenant, agent and model, drilled down
by date, and never read whole (no SELECT DISTINCT, no scan for a filter's choices)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from budgets import engine
from governance.admin_lists import CappedCountPaginator
from spend.models import SpendEntry

LEDGER = reverse("admin:spend_spendentry_changelist")


@pytest.fixture
def ledger(populated, globex, churn_bot, prices):
    """acme's invoice-bot (call-1, mistral-small) and churn-bot (call-3, mistral-large),
    and globex (call-4): four rows in all, one a month old."""
    for request_id, tenant, agent, model in (
        ("call-3", churn_bot.tenant, churn_bot, "mistral-large"),
        ("call-4", globex, None, "mistral-small"),
    ):
        hold = engine.authorize(
            engine.state_of(tenant, agent),
            request_id=request_id,
            model=model,
            prices=prices,
            input_tokens=10,
            max_output_tokens=10,
        )
        engine.capture(hold, prompt_tokens=10, completion_tokens=10)
    SpendEntry.objects.filter(request_id="call-4").update(
        created_at=timezone.now() - timedelta(days=40)
    )


def listed(response) -> set[str]:
    return {row.request_id for row in response.context["cl"].result_list}


def test_the_ledger_cannot_be_added_to_changed_or_deleted(admin_client, ledger):
    entry = SpendEntry.objects.get(request_id="call-1")
    assert admin_client.get(reverse("admin:spend_spendentry_add")).status_code == 403
    page = admin_client.get(reverse("admin:spend_spendentry_change", args=[entry.pk]))
    assert page.status_code == 200
    assert page.context["has_change_permission"] is False
    assert 'name="cost_nanos"' not in page.content.decode()
    assert (
        admin_client.get(reverse("admin:spend_spendentry_delete", args=[entry.pk])).status_code
        == 403
    )
    response = admin_client.post(
        reverse("admin:spend_spendentry_change", args=[entry.pk]), {"cost_nanos": "0"}
    )
    assert response.status_code == 403
    listing = admin_client.get(LEDGER)
    assert "delete_selected" not in listing.content.decode()
    assert SpendEntry.objects.count() == 3


@pytest.mark.parametrize(
    "query, expected",
    [
        ({"tenant": "cus_acme"}, {"call-1", "call-3"}),
        ({"tenant": "cus_globex"}, {"call-4"}),
        ({"tenant": "cus_nobody"}, set()),
        ({"agent": "cus_acme:churn-bot"}, {"call-3"}),
        ({"agent": "invoice-bot"}, {"call-1"}),
        ({"model": "mistral-large"}, {"call-3"}),
        ({"tenant": "cus_acme", "model": "mistral-small"}, {"call-1"}),
        ({"q": "call-3"}, {"call-3"}),
        ({"q": "cus_globex"}, {"call-4"}),
        ({"q": "churn-bot"}, {"call-3"}),
        ({"q": "cus_acme:invoice-bot"}, {"call-1"}),
        ({"q": "Globex"}, {"call-4"}),
        ({"q": "call"}, set()),  # exact matches only: a substring would scan every row
    ],
)
def test_it_filters_the_ledger(admin_client, ledger, query, expected):
    response = admin_client.get(LEDGER, query)
    assert response.status_code == 200
    assert listed(response) == expected


def test_the_tenant_filter_keeps_the_other_filters(admin_client, ledger):
    page = admin_client.get(LEDGER, {"tenant": "cus_acme", "model": "mistral-small"})
    html = page.content.decode()
    assert 'name="tenant" value="cus_acme"' in html
    assert '<input type="hidden" name="model" value="mistral-small">' in html


def test_rows_link_to_their_tenant_agent_and_model(admin_client, ledger):
    html = admin_client.get(LEDGER).content.decode()
    assert 'href="?tenant=cus_acme"' in html
    assert 'href="?model=mistral-large"' in html


def test_the_date_drill_down_lists_the_range_without_reading_every_row(admin_client, ledger):
    with CaptureQueriesContext(connection) as queries:
        response = admin_client.get(LEDGER)
    assert response.status_code == 200
    assert not [q["sql"] for q in queries if "DISTINCT" in q["sql"].upper()]
    drilldown = response.context_data["date_drilldown"]
    first = (timezone.now() - timedelta(days=40)).date()
    titles = [choice["title"] for choice in drilldown["choices"]]
    if first.year == timezone.now().year:
        assert first.strftime("%B") in " ".join(titles)
    else:
        assert str(first.year) in titles

    today = timezone.now()
    response = admin_client.get(
        LEDGER,
        {
            "created_at__year": today.year,
            "created_at__month": today.month,
            "created_at__day": today.day,
        },
    )
    assert listed(response) == {"call-1", "call-3"}


def test_the_model_filter_offers_the_recent_models(admin_client, ledger):
    response = admin_client.get(LEDGER)
    html = response.content.decode()
    assert "?model=mistral-large" in html
    assert "?model=mistral-small" in html


def test_counting_stops_at_the_cap(admin_client, ledger, monkeypatch):
    monkeypatch.setattr(CappedCountPaginator, "cap", 2)
    response = admin_client.get(LEDGER)
    assert response.context["cl"].paginator.count == 3
    assert "more than 2 spend entries" in response.content.decode()
    narrowed = admin_client.get(LEDGER, {"tenant": "cus_globex"})
    assert "1 spend entry" in narrowed.content.decode()


def test_holds_are_found_by_their_exact_request_id(admin_client, ledger):
    holds = reverse("admin:budgets_hold_changelist")
    assert listed(admin_client.get(holds, {"q": "call-3"})) == {"call-3"}
    assert listed(admin_client.get(holds, {"q": "CALL-3"})) == set()
