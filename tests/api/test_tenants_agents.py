"""Tenants, agents and keys on the operator API: staff only."""

from __future__ import annotations

import pytest

from budgets import services
from budgets.errors import InvalidApiKey
from budgets.models import Agent, ApiKey, Plan, Tenant

from .conftest import Api, assert_error

# --- tenants ------------------------------------------------------------------------


def test_it_lists_tenants(api, acme, globex):
    response = api.get("/api/tenants")
    assert response.status_code == 200
    rows = response.json()["results"]
    assert [t["stripe_customer_id"] for t in rows] == ["cus_acme", "cus_globex"]
    assert rows[0] == {
        "stripe_customer_id": "cus_acme",
        "name": "Acme",
        "status": "active",
        "status_reason": "",
        "plan": None,
        "billing_period_start": None,
        "billing_period_end": None,
        "created_at": rows[0]["created_at"],
        "updated_at": rows[0]["updated_at"],
    }


def test_it_filters_tenants(api, acme, globex):
    services_suspend = api.patch("/api/tenants/cus_globex", {"suspended": True})
    assert services_suspend.status_code == 200
    ids = lambda r: [t["stripe_customer_id"] for t in r.json()["results"]]  # noqa: E731
    assert ids(api.get("/api/tenants", status="suspended")) == ["cus_globex"]
    assert ids(api.get("/api/tenants", search="acm")) == ["cus_acme"]
    error = assert_error(api.get("/api/tenants", status="gone"), 400, "invalid_request")
    assert "status" in error["details"]["fields"]


def test_it_creates_a_tenant(api, db):
    Plan.objects.create(name="pro", limit_nanos=10**10)
    response = api.post(
        "/api/tenants", {"name": "Initech", "stripe_customer_id": "cus_initech", "plan": "pro"}
    )
    assert response.status_code == 201, response.content
    assert response.json()["plan"] == "pro"
    assert Tenant.objects.get(stripe_customer_id="cus_initech").name == "Initech"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "Again", "stripe_customer_id": "cus_acme"}, "stripe_customer_id"),
        ({"name": "Bad", "stripe_customer_id": "acme"}, "stripe_customer_id"),
        ({"stripe_customer_id": "cus_new"}, "name"),
        ({"name": "X", "stripe_customer_id": "cus_new", "plan": "gold"}, "plan"),
    ],
)
def test_it_refuses_a_bad_tenant(api, acme, body, field):
    error = assert_error(api.post("/api/tenants", body), 400, "invalid_request")
    assert field in error["details"]["fields"]
    assert Tenant.objects.count() == 1


def test_it_suspends_and_resumes_a_tenant(api, acme, globex):
    response = api.patch("/api/tenants/cus_acme", {"suspended": True, "reason": "abuse"})
    assert response.status_code == 200
    assert (response.json()["status"], response.json()["status_reason"]) == ("suspended", "abuse")
    globex.refresh_from_db()
    assert globex.status == "active"
    response = api.patch("/api/tenants/cus_acme", {"suspended": False})
    assert (response.json()["status"], response.json()["status_reason"]) == ("active", "")


def test_a_patch_without_a_change_changes_nothing(api, acme):
    assert api.patch("/api/tenants/cus_acme", {}).json()["status"] == "active"


def test_it_refuses_a_bad_tenant_change(api, acme):
    error = assert_error(
        api.patch("/api/tenants/cus_acme", {"suspended": "maybe"}), 400, "invalid_request"
    )
    assert "suspended" in error["details"]["fields"]


def test_a_missing_tenant_is_a_404(api, acme):
    assert_error(api.get("/api/tenants/cus_nobody"), 404, "not_found")
    assert_error(api.patch("/api/tenants/cus_nobody", {"suspended": True}), 404, "not_found")


def test_non_staff_cannot_touch_tenants(user_api, acme):
    assert_error(user_api.patch("/api/tenants/cus_acme", {"suspended": True}), 403, "forbidden")
    acme.refresh_from_db()
    assert acme.status == "active"


# --- agents -------------------------------------------------------------------------


def test_it_lists_agents_with_their_keys(api, invoice_bot, churn_bot, globex_bot):
    key, _ = services.issue_key(invoice_bot, label="prod")
    rows = api.get("/api/agents").json()["results"]
    assert [(a["tenant"], a["name"]) for a in rows] == [
        ("cus_acme", "churn-bot"),
        ("cus_acme", "invoice-bot"),
        ("cus_globex", "globex-bot"),
    ]
    assert rows[1]["scope_key"] == "cus_acme:invoice-bot"
    assert rows[1]["keys"] == [
        {
            "key_id": key.key_id,
            "prefix": f"sgk_{key.key_id}",
            "label": "prod",
            "created_at": rows[1]["keys"][0]["created_at"],
            "revoked_at": None,
            "last_used_at": None,
        }
    ]


def test_it_filters_agents(api, invoice_bot, churn_bot, globex_bot):
    services.set_agent_paused(churn_bot, True)
    names = lambda r: [a["name"] for a in r.json()["results"]]  # noqa: E731
    assert names(api.get("/api/agents", tenant="cus_globex")) == ["globex-bot"]
    assert names(api.get("/api/agents", paused="true")) == ["churn-bot"]
    assert names(api.get("/api/agents", paused="false", tenant="cus_acme")) == ["invoice-bot"]
    assert names(api.get("/api/agents", search="voice")) == ["invoice-bot"]


def test_it_creates_an_agent(api, acme, globex):
    response = api.post("/api/agents", {"tenant": "cus_globex", "name": "support-bot"})
    assert response.status_code == 201, response.content
    assert response.json()["scope_key"] == "cus_globex:support-bot"
    assert Agent.objects.get(name="support-bot").tenant == globex


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"tenant": "cus_acme", "name": "invoice-bot"}, "non_field_errors"),
        ({"tenant": "cus_acme", "name": "bad name!"}, "name"),
        ({"tenant": "cus_nobody", "name": "bot"}, "tenant"),
        ({"tenant": 7, "name": "bot"}, "tenant"),
        ({"name": "bot"}, "tenant"),
    ],
)
def test_it_refuses_a_bad_agent(api, invoice_bot, body, field):
    error = assert_error(api.post("/api/agents", body), 400, "invalid_request")
    assert field in error["details"]["fields"]


def test_the_same_agent_name_may_live_in_another_tenant(api, invoice_bot, globex):
    response = api.post("/api/agents", {"tenant": "cus_globex", "name": "invoice-bot"})
    assert response.status_code == 201


def test_it_pauses_and_resumes_an_agent(api, invoice_bot, churn_bot):
    response = api.patch(f"/api/agents/{invoice_bot.pk}", {"paused": True, "reason": "loop"})
    assert response.status_code == 200
    assert (response.json()["paused"], response.json()["paused_reason"]) == (True, "loop")
    assert response.json()["paused_at"] is not None
    churn_bot.refresh_from_db()
    assert not churn_bot.paused
    response = api.patch(f"/api/agents/{invoice_bot.pk}", {"paused": False})
    assert (response.json()["paused"], response.json()["paused_at"]) == (False, None)


def test_a_missing_agent_is_a_404(api, acme):
    assert_error(api.get("/api/agents/999"), 404, "not_found")
    assert_error(api.patch("/api/agents/999", {"paused": True}), 404, "not_found")
    assert_error(api.post("/api/agents/999/keys", {}), 404, "not_found")


def test_non_staff_cannot_touch_agents(user_api, invoice_bot):
    response = user_api.patch(f"/api/agents/{invoice_bot.pk}", {"paused": True})
    assert_error(response, 403, "forbidden")
    invoice_bot.refresh_from_db()
    assert not invoice_bot.paused


# --- keys ---------------------------------------------------------------------------


def test_it_issues_a_key_shown_once(api, invoice_bot):
    response = api.post(f"/api/agents/{invoice_bot.pk}/keys", {"label": "prod"})
    assert response.status_code == 201, response.content
    issued = response.json()
    assert issued["key"].startswith(f"sgk_{issued['key_id']}_")
    assert services.authenticate_key(issued["key"]).agent == invoice_bot
    listed = api.get(f"/api/agents/{invoice_bot.pk}").json()["keys"]
    assert "key" not in listed[0]
    # The new key reads its tenant's budgets.
    assert Api(f"Bearer {issued['key']}").get("/api/budgets").status_code == 200


def test_it_refuses_a_bad_key_label(api, invoice_bot):
    response = api.post(f"/api/agents/{invoice_bot.pk}/keys", {"label": "x" * 101})
    assert "label" in assert_error(response, 400, "invalid_request")["details"]["fields"]


def test_it_revokes_a_key(api, invoice_bot):
    key, raw = services.issue_key(invoice_bot)
    response = api.delete(f"/api/agents/{invoice_bot.pk}/keys/{key.key_id}")
    assert response.status_code == 200
    assert response.json()["revoked_at"] is not None
    with pytest.raises(InvalidApiKey):
        services.authenticate_key(raw)
    again = api.delete(f"/api/agents/{invoice_bot.pk}/keys/{key.key_id}")
    assert again.json()["revoked_at"] == response.json()["revoked_at"]


def test_it_cannot_revoke_another_agents_key(api, invoice_bot, globex_bot):
    key, _ = services.issue_key(globex_bot)
    response = api.delete(f"/api/agents/{invoice_bot.pk}/keys/{key.key_id}")
    assert_error(response, 404, "not_found")
    assert ApiKey.objects.get(pk=key.pk).revoked_at is None


def test_an_agent_key_cannot_revoke_keys(acme_api, invoice_bot):
    key, _ = services.issue_key(invoice_bot)
    response = acme_api.delete(f"/api/agents/{invoice_bot.pk}/keys/{key.key_id}")
    assert_error(response, 403, "forbidden")
    assert ApiKey.objects.get(pk=key.pk).revoked_at is None
