"""Budgets on the operator API: list, detail, create or update, delete, reset."""

from __future__ import annotations

from decimal import Decimal

import pytest

from budgets import services
from budgets.models import BudgetPeriod, BudgetPolicy, EventKind, PeriodState
from spend.models import SpendEntry

from .conftest import assert_error, charge

USD = 1_000_000_000


@pytest.fixture
def budgets(acme, globex, invoice_bot, churn_bot, globex_bot):
    """Tenant budgets for both tenants, agent budgets for acme's two agents, a user budget."""
    services.set_policy(acme, "tenant", limit_nanos=100 * USD)
    services.set_policy(globex, "tenant", limit_nanos=50 * USD)
    services.set_policy(acme, "agent", agent=invoice_bot, limit_nanos=10 * USD)
    services.set_policy(acme, "agent", agent=churn_bot, limit_nanos=2 * USD, enabled=False)
    services.set_policy(acme, "user", user_key="user-42", limit_nanos=1 * USD)
    charge(acme, 6 * USD, invoice_bot)  # invoice-bot's budget: warned (0.6)


def keys(response) -> list[str]:
    assert response.status_code == 200, response.content
    return [row["scope_key"] for row in response.json()["results"]]


# --- list ---------------------------------------------------------------------------


def test_it_lists_every_budget_with_its_current_period(api, budgets):
    response = api.get("/api/budgets")
    assert keys(response) == [
        "cus_acme",
        "cus_acme:churn-bot",
        "cus_acme:invoice-bot",
        "cus_acme:user-42",
        "cus_globex",
    ]
    invoice = response.json()["results"][2]
    assert invoice["scope_type"] == "agent"
    assert invoice["tenant"] == "cus_acme"
    assert invoice["agent"] == "invoice-bot"
    assert invoice["user"] is None
    assert invoice["limit_usd"] == "10"
    period = invoice["current_period"]
    assert period["spent_usd"] == "6"
    assert period["held_usd"] == "0"
    assert period["remaining_usd"] == "4"
    assert period["state"] == "warned"
    assert period["utilization"] == "0.6"
    assert period["window_start"].endswith("T00:00:00Z")
    assert period["window_end"].endswith("T00:00:00Z")


def test_it_filters_budgets(api, budgets):
    assert keys(api.get("/api/budgets", scope_type="agent")) == [
        "cus_acme:churn-bot",
        "cus_acme:invoice-bot",
    ]
    assert keys(api.get("/api/budgets", state="warned")) == ["cus_acme:invoice-bot"]
    assert "cus_acme:invoice-bot" not in keys(api.get("/api/budgets", state="active"))
    assert keys(api.get("/api/budgets", tenant="cus_globex")) == ["cus_globex"]
    assert keys(api.get("/api/budgets", enabled="false")) == ["cus_acme:churn-bot"]
    assert keys(api.get("/api/budgets", search="user-4")) == ["cus_acme:user-42"]
    assert keys(api.get("/api/budgets", search="Globex")) == ["cus_globex"]


def test_a_budget_with_no_period_yet_counts_as_active(api, budgets, globex):
    BudgetPeriod.objects.filter(policy__scope_key="cus_globex").delete()
    assert "cus_globex" in keys(api.get("/api/budgets", state="active"))
    assert keys(api.get("/api/budgets", tenant="cus_globex"))  # and a period is opened
    assert BudgetPeriod.objects.filter(policy__scope_key="cus_globex").count() == 1


def test_it_pages_budgets(api, budgets):
    first = api.get("/api/budgets", page_size=2).json()
    assert first["count"] == 5
    assert len(first["results"]) == 2
    assert "page=2" in first["next"]
    last = api.get("/api/budgets", page_size=2, page=3).json()
    assert [row["scope_key"] for row in last["results"]] == ["cus_globex"]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"scope_type": "planet"}, "scope_type"),
        ({"state": "melting"}, "state"),
        ({"enabled": "perhaps"}, "enabled"),
        ({"page_size": "x", "tenant": "x" * 81}, "tenant"),
    ],
)
def test_it_refuses_bad_filters(api, budgets, params, field):
    error = assert_error(api.get("/api/budgets", **params), 400, "invalid_request")
    assert field in error["details"]["fields"]


def test_an_agent_key_lists_its_own_tenants_budgets_only(acme_api, globex_api, budgets):
    assert keys(acme_api.get("/api/budgets")) == [
        "cus_acme",
        "cus_acme:churn-bot",
        "cus_acme:invoice-bot",
        "cus_acme:user-42",
    ]
    assert keys(acme_api.get("/api/budgets", tenant="cus_globex")) == []
    assert keys(globex_api.get("/api/budgets")) == ["cus_globex"]


# --- detail -------------------------------------------------------------------------


def test_it_shows_one_budget_with_its_periods_and_events(api, budgets):
    response = api.get("/api/budgets/agent/cus_acme:invoice-bot")
    assert response.status_code == 200
    budget = response.json()
    assert budget["scope_key"] == "cus_acme:invoice-bot"
    assert budget["current_period"]["spent_usd"] == "6"
    assert [p["spent_usd"] for p in budget["periods"]] == ["6"]
    assert [e["kind"] for e in budget["events"]] == [EventKind.WARNED]
    assert budget["events"][0]["spent_usd"] == "6"
    assert budget["events"][0]["limit_usd"] == "10"


def test_it_shows_a_user_budget(api, budgets):
    budget = api.get("/api/budgets/user/cus_acme:user-42").json()
    assert budget["user"] == "user-42"
    assert budget["agent"] is None


def test_an_unknown_scope_type_is_a_400(api, budgets):
    error = assert_error(api.get("/api/budgets/planet/cus_acme"), 400, "invalid_request")
    assert error["details"]["fields"] == {"scope_type": ["use one of tenant, agent, user"]}


@pytest.mark.parametrize(
    "path",
    [
        "/api/budgets/agent/cus_acme:nobody",
        "/api/budgets/tenant/cus_acme:invoice-bot",
        "/api/budgets/agent/cus_acme",
    ],
)
def test_a_missing_budget_is_a_404(api, budgets, path):
    assert_error(api.get(path), 404, "not_found")


def test_an_agent_key_reads_its_own_tenants_budget(acme_api, budgets):
    assert acme_api.get("/api/budgets/agent/cus_acme:churn-bot").status_code == 200


def test_an_agent_key_cannot_read_another_tenants_budget(acme_api, globex_api, budgets):
    assert_error(acme_api.get("/api/budgets/tenant/cus_globex"), 404, "not_found")
    assert_error(globex_api.get("/api/budgets/tenant/cus_acme"), 404, "not_found")


# --- create and update --------------------------------------------------------------


def test_it_creates_a_budget(api, acme, globex, invoice_bot):
    response = api.post(
        "/api/budgets",
        {
            "scope_type": "agent",
            "tenant": "cus_acme",
            "agent": "invoice-bot",
            "limit_usd": "25.000000001",
            "window": "week",
            "warn_at": "0.25",
            "soft_cap": 0.75,
            "hard_cap": 1,
            "disabled_tools": ["web_search"],
        },
    )
    assert response.status_code == 201, response.content
    budget = response.json()
    assert budget["scope_key"] == "cus_acme:invoice-bot"
    assert budget["limit_usd"] == "25.000000001"
    assert budget["window"] == "week"
    assert (budget["warn_at"], budget["soft_cap"], budget["hard_cap"]) == ("0.25", "0.75", "1")
    assert budget["disabled_tools"] == ["web_search"]
    assert budget["source"] == "operator"
    assert budget["current_period"]["hard_usd"] == "25.000000001"
    policy = BudgetPolicy.objects.get(scope_key="cus_acme:invoice-bot")
    assert policy.limit_nanos == 25_000_000_001
    assert policy.soft_cap == Decimal("0.75")
    assert not BudgetPolicy.objects.filter(tenant=globex).exists()


def test_it_takes_the_limit_as_a_json_number_without_float_rounding(api, acme):
    response = api.post(
        "/api/budgets", '{"scope_type": "tenant", "tenant": "cus_acme", "limit_usd": 0.1}'
    )
    assert response.status_code == 201, response.content
    assert BudgetPolicy.objects.get(scope_key="cus_acme").limit_nanos == 100_000_000


def test_it_creates_a_user_budget(api, acme):
    response = api.post(
        "/api/budgets",
        {"scope_type": "user", "tenant": "cus_acme", "user": "user-7", "limit_usd": "1"},
    )
    assert response.status_code == 201
    assert response.json()["scope_key"] == "cus_acme:user-7"


def test_an_update_keeps_the_values_it_does_not_name(api, budgets):
    response = api.post(
        "/api/budgets",
        {"scope_type": "agent", "tenant": "cus_acme", "agent": "invoice-bot", "limit_usd": "5"},
    )
    assert response.status_code == 200, response.content
    budget = response.json()
    assert budget["limit_usd"] == "5"
    assert budget["window"] == "day"
    # The lower limit applies to the current period at once: 6 of 5 spent.
    assert budget["current_period"]["state"] == PeriodState.STOPPED
    response = api.post(
        "/api/budgets",
        {"scope_type": "agent", "tenant": "cus_acme", "agent": "churn-bot", "enabled": True},
    )
    assert response.json()["enabled"] is True
    assert response.json()["limit_usd"] == "2"


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"limit_usd": "0.0000000001"}, "limit_usd", "more precision than one nanodollar"),
        ({"limit_usd": 0.0000000001}, "limit_usd", "more precision than one nanodollar"),
        ({"limit_usd": "0"}, "limit_usd", "positive"),
        ({"limit_usd": "-1"}, "limit_usd", "positive"),
        ({"limit_usd": "ten"}, "limit_usd", "not a decimal number"),
        ({"limit_usd": True}, "limit_usd", "not an amount"),
        ({"limit_usd": "1e12"}, "limit_usd", "larger than the maximum"),
        ({"soft_cap": "0.9", "hard_cap": "0.8"}, "soft_cap", "soft_cap must not exceed hard_cap"),
        ({"warn_at": "0.9"}, "warn_at", "warn_at must not exceed soft_cap"),
        ({"hard_cap": "11"}, "hard_cap", "at most 10"),
        ({"warn_at": "0.12345"}, "warn_at", "at most 4 decimals"),
        ({"warn_at": "half"}, "warn_at", "not a number"),
        ({"warn_at": [0.5]}, "warn_at", "decimal string or a number"),
        ({"window": "fortnight"}, "window", "not a valid choice"),
        ({"disabled_tools": ["ok", ""]}, "disabled_tools.1", "blank"),
        ({"disabled_tools": "web_search"}, "disabled_tools", "list"),
    ],
)
def test_it_refuses_bad_values_with_field_messages(api, acme, change, field, message):
    body = {"scope_type": "tenant", "tenant": "cus_acme", "limit_usd": "10", **change}
    error = assert_error(api.post("/api/budgets", body), 400, "invalid_request")
    assert list(error["details"]["fields"]) == [field]
    assert message in " ".join(error["details"]["fields"][field])
    assert not BudgetPolicy.objects.filter(scope_key="cus_acme", source="operator").exists()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"scope_type": "tenant"}, "tenant"),
        ({"scope_type": "tenant", "tenant": "cus_nobody", "limit_usd": "1"}, "tenant"),
        ({"scope_type": "tenant", "tenant": "cus_acme"}, "limit_usd"),
        ({"scope_type": "galaxy", "tenant": "cus_acme", "limit_usd": "1"}, "scope_type"),
        ({"scope_type": "agent", "tenant": "cus_acme", "limit_usd": "1"}, "agent"),
        ({"scope_type": "agent", "tenant": "cus_acme", "agent": "x", "limit_usd": "1"}, "agent"),
        ({"scope_type": "user", "tenant": "cus_acme", "limit_usd": "1"}, "user"),
        (
            {"scope_type": "tenant", "tenant": "cus_acme", "agent": "invoice-bot", "limit_usd": 1},
            "agent",
        ),
        ({"scope_type": "user", "tenant": "cus_acme", "user": "a\tb", "limit_usd": 1}, "user"),
    ],
)
def test_it_refuses_a_scope_it_cannot_name(api, acme, invoice_bot, body, field):
    error = assert_error(api.post("/api/budgets", body), 400, "invalid_request")
    assert field in error["details"]["fields"]


def test_it_cannot_put_a_budget_on_another_tenants_agent(api, acme, globex_bot):
    body = {"scope_type": "agent", "tenant": "cus_acme", "agent": "globex-bot", "limit_usd": 1}
    error = assert_error(api.post("/api/budgets", body), 400, "invalid_request")
    assert error["details"]["fields"] == {"agent": ["no agent 'globex-bot' in tenant cus_acme"]}
    assert not BudgetPolicy.objects.filter(scope_type="agent").exists()


def test_non_staff_cannot_set_a_budget(user_api, acme):
    body = {"scope_type": "tenant", "tenant": "cus_acme", "limit_usd": "1"}
    assert_error(user_api.post("/api/budgets", body), 403, "forbidden")


# --- delete -------------------------------------------------------------------------


def test_it_deletes_a_budget_and_keeps_the_ledger(api, budgets):
    response = api.delete("/api/budgets/agent/cus_acme:invoice-bot")
    assert response.status_code == 204
    assert not BudgetPolicy.objects.filter(scope_key="cus_acme:invoice-bot").exists()
    assert SpendEntry.objects.filter(agent__name="invoice-bot").count() == 1
    assert_error(api.get("/api/budgets/agent/cus_acme:invoice-bot"), 404, "not_found")
    assert_error(api.delete("/api/budgets/agent/cus_acme:invoice-bot"), 404, "not_found")


def test_a_deleted_tenant_budget_comes_back_from_settings_on_next_use(api, budgets, acme):
    assert api.delete("/api/budgets/tenant/cus_acme").status_code == 204
    charge(acme, 1)
    assert BudgetPolicy.objects.get(scope_key="cus_acme").source == "default"


def test_it_cannot_delete_another_tenants_budget_by_a_wrong_key(api, budgets):
    assert_error(api.delete("/api/budgets/agent/cus_globex:invoice-bot"), 404, "not_found")
    assert BudgetPolicy.objects.filter(scope_key="cus_acme:invoice-bot").exists()


# --- reset --------------------------------------------------------------------------


def test_it_resets_a_budget(api, budgets):
    response = api.post("/api/budgets/agent/cus_acme:invoice-bot/reset", {"reason": "top-up"})
    assert response.status_code == 200, response.content
    assert response.json()["current_period"]["spent_usd"] == "0"
    assert response.json()["current_period"]["state"] == "active"
    closed = BudgetPeriod.objects.get(
        policy__scope_key="cus_acme:invoice-bot", closed_at__isnull=False
    )
    assert (closed.spent_nanos, closed.close_reason, closed.closed_by) == (
        6 * USD,
        "top-up",
        "operator",
    )
    detail = api.get("/api/budgets/agent/cus_acme:invoice-bot").json()
    assert [p["spent_usd"] for p in detail["periods"]] == ["0", "6"]
    assert detail["events"][0]["kind"] == EventKind.RESET
    # Globex's budget is untouched.
    assert not BudgetPeriod.objects.filter(
        policy__tenant__stripe_customer_id="cus_globex", closed_at__isnull=False
    ).exists()


@pytest.mark.parametrize("body", [{}, {"reason": ""}, {"reason": "x" * 501}])
def test_a_reset_needs_a_reason(api, budgets, body):
    response = api.post("/api/budgets/agent/cus_acme:invoice-bot/reset", body)
    error = assert_error(response, 400, "invalid_request")
    assert "reason" in error["details"]["fields"]


def test_it_cannot_reset_a_missing_budget(api, budgets):
    response = api.post("/api/budgets/agent/cus_acme:nobody/reset", {"reason": "x"})
    assert_error(response, 404, "not_found")


def test_a_reset_needs_json(api, budgets):
    response = api.post(
        "/api/budgets/tenant/cus_acme/reset",
        "reason=x",
        content_type="multipart/form-data; boundary=x",
    )
    assert_error(response, 415, "unsupported_media_type")
