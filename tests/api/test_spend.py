"""Spend on the operator API: the current period with rate and projection, the ledger
history, and spikes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.utils import timezone

from budgets import services
from budgets.money import nanos_to_usd
from spend import queries
from spend import spikes as spike_detection
from spend.models import Spike

from .conftest import assert_error, charge, ledger_row

USD = 1_000_000_000


def parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# --- total, rate, projection --------------------------------------------------------


def test_it_reports_the_period_the_rate_and_a_projection(api, acme, globex, invoice_bot):
    services.set_policy(acme, "tenant", limit_nanos=100 * USD)
    charge(acme, 3 * USD, invoice_bot)
    ledger_row(acme, 7 * USD, timezone.now() - timedelta(hours=2))  # outside the rate window
    charge(globex, 5 * USD)

    response = api.get("/api/spend/tenant/cus_acme")
    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["scope_type"], body["scope_key"]) == ("tenant", "cus_acme")
    assert body["period"]["spent_usd"] == "3"
    assert body["period"]["limit_usd"] == "100"
    assert body["rate"] == {
        "hours": 1,
        "since": body["rate"]["since"],
        "spent_usd": "3",
        "usd_per_hour": "3",
    }
    as_of, end = parse(body["as_of"]), parse(body["period"]["window_end"])
    assert parse(body["rate"]["since"]) == as_of - timedelta(hours=1)
    left = (end - as_of) // timedelta(seconds=1)
    projected = 3 * USD + 3 * USD * left // 3600
    assert body["projection"]["spend_usd"] == nanos_to_usd(projected)
    assert body["projection"]["period_end"] == body["period"]["window_end"]
    assert body["projection"]["exceeds_hard_cap"] is (projected >= 100 * USD)


def test_the_rate_window_is_chosen_by_the_caller(api, acme):
    charge(acme, 1 * USD)
    ledger_row(acme, 5 * USD, timezone.now() - timedelta(hours=2))
    rate = api.get("/api/spend/tenant/cus_acme", rate_hours=3).json()["rate"]
    assert rate["hours"] == 3
    assert rate["spent_usd"] == "6"
    assert rate["usd_per_hour"] == "2"


@pytest.mark.parametrize("hours", ["0", "745", "x"])
def test_it_refuses_a_bad_rate_window(api, acme, hours):
    response = api.get("/api/spend/tenant/cus_acme", rate_hours=hours)
    assert "rate_hours" in assert_error(response, 400, "invalid_request")["details"]["fields"]


def test_a_scope_without_a_budget_has_no_period(api, acme, invoice_bot):
    charge(acme, 2 * USD, invoice_bot)
    body = api.get("/api/spend/agent/cus_acme:invoice-bot").json()
    assert body["period"] is None
    assert body["projection"] is None
    assert body["rate"]["spent_usd"] == "2"


def test_it_reports_an_agent_and_a_user_scope(api, acme, invoice_bot, churn_bot):
    services.set_policy(acme, "agent", agent=invoice_bot, limit_nanos=10 * USD)
    charge(acme, 4 * USD, invoice_bot, user_key="user-42")
    charge(acme, 1 * USD, churn_bot)
    agent = api.get("/api/spend/agent/cus_acme:invoice-bot").json()
    assert agent["period"]["spent_usd"] == "4"
    assert agent["rate"]["spent_usd"] == "4"
    user = api.get("/api/spend/user/cus_acme:user-42").json()
    assert user["period"] is None
    assert user["rate"]["spent_usd"] == "4"


def test_the_projection_says_when_the_hard_cap_is_reached():
    now = datetime(2026, 11, 18, 12, tzinfo=UTC)
    period = queries.BudgetPeriod(
        window_start=now.replace(hour=0),
        window_end=now.replace(hour=0) + timedelta(days=1),
        limit_nanos=10 * USD,
        warn_nanos=5 * USD,
        soft_nanos=8 * USD,
        hard_nanos=10 * USD,
        spent_nanos=4 * USD,
    )
    rate = queries.SpendRate(hours=2, since=now - timedelta(hours=2), spent_nanos=1 * USD)
    projection = queries.project(period, rate, now)
    assert projection.spend_nanos == 4 * USD + 6 * USD  # 12 hours at 0.5 USD an hour
    assert projection.exceeds_hard_cap
    assert projection.stop_at == now + timedelta(hours=12)
    slower = queries.SpendRate(hours=2, since=now, spent_nanos=USD // 2)
    assert queries.project(period, slower, now).stop_at is None
    assert not queries.project(period, slower, now).exceeds_hard_cap


@pytest.mark.parametrize(
    "path",
    [
        "/api/spend/tenant/cus_nobody",
        "/api/spend/agent/cus_acme:nobody",
        "/api/spend/agent/cus_acme",
        "/api/spend/tenant/cus_acme:invoice-bot",
        "/api/spend/user/cus_acme",
    ],
)
def test_a_missing_scope_is_a_404(api, acme, path):
    assert_error(api.get(path), 404, "not_found")


def test_an_unknown_scope_type_is_a_400(api, acme):
    error = assert_error(api.get("/api/spend/planet/cus_acme"), 400, "invalid_request")
    assert "scope_type" in error["details"]["fields"]


def test_an_agent_key_reads_its_own_tenants_spend(acme_api, acme, churn_bot):
    charge(acme, 1 * USD, churn_bot)
    body = acme_api.get("/api/spend/agent/cus_acme:churn-bot").json()
    assert body["rate"]["spent_usd"] == "1"


@pytest.mark.parametrize("suffix", ["", "/history", "/spikes"])
def test_an_agent_key_cannot_read_another_tenants_spend(acme_api, globex_api, globex_bot, suffix):
    charge(globex_bot.tenant, 1 * USD, globex_bot)
    assert_error(acme_api.get(f"/api/spend/tenant/cus_globex{suffix}"), 404, "not_found")
    response = acme_api.get(f"/api/spend/agent/cus_globex:globex-bot{suffix}")
    assert_error(response, 404, "not_found")
    assert globex_api.get(f"/api/spend/tenant/cus_globex{suffix}").status_code == 200


# --- history ------------------------------------------------------------------------


@pytest.fixture
def ledger(acme, globex, invoice_bot, churn_bot):
    base = timezone.now().replace(microsecond=0) - timedelta(hours=10)
    rows = {
        "a": ledger_row(acme, 1, base, invoice_bot, model="mistral-small"),
        "b": ledger_row(acme, 2, base + timedelta(hours=1), churn_bot, model="mistral-large"),
        "c": ledger_row(
            acme, 3, base + timedelta(hours=2), invoice_bot, "user-42", "mistral-small"
        ),
        "g": ledger_row(globex, 4, base + timedelta(hours=1), model="mistral-small"),
    }
    return base, rows


def ids(response) -> list[str]:
    assert response.status_code == 200, response.content
    return [row["request_id"] for row in response.json()["results"]]


def test_it_lists_the_ledger_newest_first(api, ledger):
    _, rows = ledger
    response = api.get("/api/spend/tenant/cus_acme/history")
    assert ids(response) == [rows["c"].request_id, rows["b"].request_id, rows["a"].request_id]
    newest = response.json()["results"][0]
    assert newest["agent"] == "invoice-bot"
    assert newest["user"] == "user-42"
    assert newest["cost_usd"] == "0.000000003"
    assert newest["output_price_usd_per_million"] == "0.001"
    assert newest["created_at"].endswith("Z")


def test_it_filters_the_ledger(api, ledger):
    base, rows = ledger
    path = "/api/spend/tenant/cus_acme/history"
    assert ids(api.get(path, model="mistral-large")) == [rows["b"].request_id]
    assert ids(api.get(path, agent="invoice-bot")) == [rows["c"].request_id, rows["a"].request_id]
    since, until = (base + timedelta(hours=1)).isoformat(), (base + timedelta(hours=2)).isoformat()
    assert ids(api.get(path, since=since, until=until)) == [rows["b"].request_id]
    assert ids(api.get("/api/spend/user/cus_acme:user-42/history")) == [rows["c"].request_id]
    assert ids(api.get("/api/spend/agent/cus_acme:churn-bot/history")) == [rows["b"].request_id]
    assert ids(api.get("/api/spend/tenant/cus_globex/history")) == [rows["g"].request_id]


def test_it_pages_the_ledger(api, ledger):
    body = api.get("/api/spend/tenant/cus_acme/history", page_size=2, page=2).json()
    assert body["count"] == 3
    assert len(body["results"]) == 1


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"since": "yesterday"}, "since"),
        ({"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, "until"),
        ({"model": "m" * 101}, "model"),
    ],
)
def test_it_refuses_bad_history_filters(api, ledger, params, field):
    response = api.get("/api/spend/tenant/cus_acme/history", **params)
    assert field in assert_error(response, 400, "invalid_request")["details"]["fields"]


# --- spikes -------------------------------------------------------------------------


def hours_ago(n: int) -> datetime:
    return timezone.now().replace(minute=0, second=0, microsecond=0) - timedelta(hours=n)


def stored_spike(tenant, hour, agent=None, kind=Spike.Kind.ANOMALY, spend=5 * USD):
    return Spike.objects.create(
        scope_type="agent" if agent else "tenant",
        tenant=tenant,
        agent=agent,
        kind=kind,
        hour=hour,
        spend_nanos=spend,
        baseline_nanos=USD // 100,
        threshold_nanos=USD,
    )


@pytest.fixture
def spikes(acme, globex, invoice_bot, churn_bot, globex_bot):
    return {
        "acme": stored_spike(acme, hours_ago(1)),
        "invoice": stored_spike(acme, hours_ago(0), invoice_bot, Spike.Kind.VELOCITY),
        "churn-old": stored_spike(acme, hours_ago(30), churn_bot),
        "globex": stored_spike(globex, hours_ago(0), globex_bot),
    }


def test_it_lists_a_tenants_detected_spikes_and_its_agents(api, spikes):
    response = api.get("/api/spend/tenant/cus_acme/spikes")
    assert response.status_code == 200, response.content
    rows = response.json()["results"]
    assert [(r["scope_type"], r["agent"], r["kind"]) for r in rows] == [
        ("agent", "invoice-bot", "velocity"),
        ("tenant", None, "anomaly"),
    ]
    assert rows[1] == {
        "scope_type": "tenant",
        "tenant": "cus_acme",
        "agent": None,
        "kind": "anomaly",
        "hour_start": rows[1]["hour_start"],
        "spend_usd": "5",
        "baseline_usd": "0.01",
        "threshold_usd": "1",
        "agent_paused": False,
        "detected_at": rows[1]["detected_at"],
    }
    assert parse(rows[1]["hour_start"]) == spikes["acme"].hour


def test_it_looks_back_as_many_hours_as_asked(api, spikes):
    kinds = lambda r: [(row["agent"], row["kind"]) for row in r.json()["results"]]  # noqa: E731
    assert kinds(api.get("/api/spend/agent/cus_acme:churn-bot/spikes")) == []
    assert kinds(api.get("/api/spend/agent/cus_acme:churn-bot/spikes", hours=31)) == [
        ("churn-bot", "anomaly")
    ]
    assert kinds(api.get("/api/spend/tenant/cus_acme/spikes", hours=1)) == [
        ("invoice-bot", "velocity")
    ]


def test_an_agents_spikes_are_its_own(api, spikes):
    rows = api.get("/api/spend/agent/cus_acme:invoice-bot/spikes").json()["results"]
    assert [r["agent"] for r in rows] == ["invoice-bot"]
    rows = api.get("/api/spend/tenant/cus_globex/spikes").json()["results"]
    assert [r["agent"] for r in rows] == ["globex-bot"]


def test_an_end_user_has_no_spikes_of_its_own(api, spikes):
    assert api.get("/api/spend/user/cus_acme:user-42/spikes").json()["results"] == []


def test_the_spikes_the_detection_stores_are_listed(api, acme, invoice_bot, settings):
    settings.SPIKE_MIN_NANOS_PER_HOUR = USD
    charge(acme, 3 * USD, invoice_bot)
    [found, *_] = spike_detection.detect()
    rows = api.get("/api/spend/agent/cus_acme:invoice-bot/spikes").json()["results"]
    assert [(r["kind"], r["spend_usd"]) for r in rows] == [(found.kind, "3")]


@pytest.mark.parametrize(
    ("params", "field"), [({"hours": "0"}, "hours"), ({"hours": "745"}, "hours")]
)
def test_it_refuses_bad_spike_parameters(api, acme, params, field):
    response = api.get("/api/spend/tenant/cus_acme/spikes", **params)
    assert field in assert_error(response, 400, "invalid_request")["details"]["fields"]
