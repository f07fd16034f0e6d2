"""The console's agents page: spend today and velocity per agent, search, pause/resume
and key revocation (issue 7)."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone

from budgets import services
from budgets.errors import InvalidApiKey
from budgets.models import Agent, ApiKey
from spend.models import SpendEntry
from spend.rollups import rollup_hours

from .conftest import charge

URL = "/console/agents/"
# A fixed "now" at noon today (UTC): "earlier today" and "over an hour ago" never straddle
# midnight, whatever time the tests run.
NOON = timezone.now().replace(hour=12, minute=0, second=0, microsecond=0)


def text(response) -> str:
    return re.sub(r"\s+", " ", response.content.decode())


def table(response) -> str:
    page = text(response)
    start = page.index('id="agents"')
    return page[start : page.index("</table>", start)]


def row(response, agent: Agent) -> str:
    page = text(response)
    start = page.index(f'id="agent-{agent.pk}"')
    return page[start : page.index("</tr>", start)]


def spend_at(entry: SpendEntry, when) -> None:
    SpendEntry.objects.filter(pk=entry.pk).update(created_at=when)


@pytest.fixture
def at_noon(monkeypatch):
    monkeypatch.setattr(timezone, "now", lambda: NOON)
    return NOON


@pytest.fixture
def report_bot(globex):
    return services.create_agent(globex, "report-bot")


@pytest.fixture
def agent_spend(acme, globex, acme_budget, globex_budget, invoice_bot, churn_bot, report_bot):
    """invoice-bot (acme): USD 4 two hours ago, 2 half an hour ago, 1 yesterday.
    report-bot (globex): USD 1 ten minutes ago. churn-bot (acme): nothing."""
    spend_at(charge(acme, "4", invoice_bot), NOON - timedelta(hours=2))
    spend_at(charge(acme, "2", invoice_bot), NOON - timedelta(minutes=30))
    spend_at(charge(acme, "1", invoice_bot), NOON - timedelta(hours=13))
    spend_at(charge(globex, "1", report_bot), NOON - timedelta(minutes=10))
    rollup_hours(NOON, lookback=timedelta(hours=14))


# --- Access -------------------------------------------------------------------------


def test_it_redirects_anonymous_visitors_to_the_admin_login(client, db):
    response = client.get(URL)
    assert response.status_code == 302
    assert response["Location"] == f"/admin/login/?next={URL}"
    response = client.post(URL, {"action": "pause", "agent": "1"})
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")


def test_it_refuses_signed_in_non_staff(user_client, invoice_bot):
    key, _ = services.issue_key(invoice_bot)
    assert user_client.get(URL).status_code == 403
    assert user_client.post(URL, {"action": "pause", "agent": invoice_bot.pk}).status_code == 403
    revoke = {"action": "revoke", "key": key.pk, "confirm": "on"}
    assert user_client.post(URL, revoke).status_code == 403
    invoice_bot.refresh_from_db()
    key.refresh_from_db()
    assert not invoice_bot.paused
    assert key.revoked_at is None


def test_it_links_the_page_from_the_nav(staff_client):
    page = text(staff_client.get("/console/"))
    assert f'<a href="{URL}"' in page


# --- List, spend and velocity --------------------------------------------------------


def test_it_lists_both_tenants_agents_with_spend_today_and_velocity(
    staff_client, agent_spend, at_noon, invoice_bot, churn_bot, report_bot
):
    response = staff_client.get(URL)
    assert response.status_code == 200
    invoice = row(response, invoice_bot)
    assert "cus_acme" in invoice and "invoice-bot" in invoice
    assert 'data-col="spend-today">6<' in invoice  # yesterday's USD 1 is not today
    assert 'data-col="velocity">2<' in invoice  # only the last 60 minutes
    report = row(response, report_bot)
    assert "cus_globex" in report and "report-bot" in report
    assert 'data-col="spend-today">1<' in report
    assert 'data-col="velocity">1<' in report
    churn = row(response, churn_bot)
    assert 'data-col="spend-today">0<' in churn
    assert 'data-col="velocity">0<' in churn


def test_it_shows_keys_and_pause_reasons(staff_client, invoice_bot, report_bot):
    live, _ = services.issue_key(invoice_bot, "prod")
    old, _ = services.issue_key(invoice_bot)
    services.revoke_key(old)
    services.set_agent_paused(report_bot, True, "runaway loop")
    response = staff_client.get(URL)
    invoice = row(response, invoice_bot)
    assert f"{live.prefix}…" in invoice and "prod" in invoice and "last used never" in invoice
    assert f"{old.prefix}…" in invoice and "revoked" in invoice
    assert invoice.count('value="revoke"') == 1  # only the live key can be revoked
    report = row(response, report_bot)
    assert "paused" in report and "runaway loop" in report and 'value="resume"' in report


def test_it_searches_by_customer_id_or_agent_name(staff_client, invoice_bot, churn_bot, report_bot):
    by_customer = table(staff_client.get(URL, {"q": "cus_glob"}))
    assert "report-bot" in by_customer
    assert "invoice-bot" not in by_customer and "churn-bot" not in by_customer
    by_name = table(staff_client.get(URL, {"q": "CHURN"}))
    assert "churn-bot" in by_name
    assert "invoice-bot" not in by_name and "report-bot" not in by_name
    assert "No agents match." in table(staff_client.get(URL, {"q": "nobody"}))


def test_it_pages_sixty_agents_in_a_constant_number_of_queries(
    staff_client, acme, globex, acme_budget, globex_budget, django_assert_max_num_queries
):
    agents = [services.create_agent(acme if i % 2 else globex, f"bot-{i:02}") for i in range(60)]
    for agent in agents:
        services.issue_key(agent)
    for agent in agents[:6]:
        charge(agent.tenant, "0.5", agent)
    rollup_hours()
    # Session, user, count, agents, keys, rollups, ledger.
    with django_assert_max_num_queries(8):
        first = staff_client.get(URL)
    assert text(first).count('id="agent-') == 50
    assert "page 1 of 2" in text(first)
    with django_assert_max_num_queries(8):
        second = staff_client.get(URL, {"page": "2"})
    assert text(second).count('id="agent-') == 10


# --- Pause and resume ----------------------------------------------------------------


def test_it_pauses_with_a_reason_and_resumes(staff_client, invoice_bot):
    url = f"{URL}?q=invoice"
    response = staff_client.post(
        url, {"action": "pause", "agent": invoice_bot.pk, "reason": " loops "}
    )
    assert response.status_code == 302
    assert response["Location"] == url  # back to the same search
    invoice_bot.refresh_from_db()
    assert invoice_bot.paused and invoice_bot.paused_reason == "loops"
    assert invoice_bot.paused_at is not None
    assert "invoice-bot @ cus_acme paused." in text(staff_client.get(response["Location"]))

    response = staff_client.post(url, {"action": "resume", "agent": invoice_bot.pk}, follow=True)
    assert "invoice-bot @ cus_acme resumed." in text(response)
    invoice_bot.refresh_from_db()
    assert not invoice_bot.paused and invoice_bot.paused_reason == ""


def test_it_pauses_without_a_reason(staff_client, invoice_bot):
    assert staff_client.post(URL, {"action": "pause", "agent": invoice_bot.pk}).status_code == 302
    invoice_bot.refresh_from_db()
    assert invoice_bot.paused and invoice_bot.paused_reason == ""


def test_it_refuses_unknown_agents_and_actions(staff_client, invoice_bot):
    assert staff_client.post(URL, {"action": "pause", "agent": 999999}).status_code == 404
    assert staff_client.post(URL, {"action": "pause", "agent": "x"}).status_code == 400
    assert staff_client.post(URL, {"action": "explode"}).status_code == 400
    assert staff_client.put(URL).status_code == 405


def test_it_requires_a_csrf_token(invoice_bot):
    client = Client(enforce_csrf_checks=True)
    client.force_login(get_user_model().objects.create_user("carol", is_staff=True))
    response = client.post(URL, {"action": "pause", "agent": invoice_bot.pk})
    assert response.status_code == 403
    invoice_bot.refresh_from_db()
    assert not invoice_bot.paused

    client.get(URL)  # the page's forms set the CSRF cookie
    token = client.cookies["csrftoken"].value
    response = client.post(
        URL, {"action": "pause", "agent": invoice_bot.pk, "csrfmiddlewaretoken": token}
    )
    assert response.status_code == 302
    invoice_bot.refresh_from_db()
    assert invoice_bot.paused


# --- Revoking keys -------------------------------------------------------------------


def test_it_revokes_a_key_only_once_confirmed(staff_client, invoice_bot):
    key, raw = services.issue_key(invoice_bot)
    assert services.authenticate_key(raw).pk == key.pk

    response = staff_client.post(URL, {"action": "revoke", "key": key.pk})
    assert response.status_code == 400
    assert "Tick the confirmation to revoke a key." in text(response)
    assert services.authenticate_key(raw).pk == key.pk  # still live

    response = staff_client.post(URL, {"action": "revoke", "key": key.pk, "confirm": "on"})
    assert response.status_code == 302
    assert response["Location"] == URL
    assert f"Key {key.prefix}… of invoice-bot @ cus_acme revoked." in text(staff_client.get(URL))
    assert ApiKey.objects.get(pk=key.pk).revoked_at is not None
    with pytest.raises(InvalidApiKey):
        services.authenticate_key(raw)


def test_it_refuses_unknown_keys(staff_client, db):
    response = staff_client.post(URL, {"action": "revoke", "key": 999999, "confirm": "on"})
    assert response.status_code == 404
