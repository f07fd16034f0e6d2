"""Who may call the operator API, and the one error shape every refusal has."""

from __future__ import annotations

import pytest
from django.test import Client
from rest_framework.authtoken.models import Token

from budgets import services

from .conftest import Api, assert_error

READS = [
    "/api/budgets",
    "/api/budgets/tenant/cus_acme",
    "/api/spend/tenant/cus_acme",
    "/api/spend/tenant/cus_acme/history",
    "/api/spend/tenant/cus_acme/spikes",
    "/api/tenants",
    "/api/tenants/cus_acme",
    "/api/agents",
]
STAFF_ONLY_READS = ["/api/tenants", "/api/tenants/cus_acme", "/api/agents"]


@pytest.mark.parametrize("path", READS)
def test_it_refuses_anonymous_callers(anon, acme, path):
    response = anon.get(path)
    assert_error(response, 401, "not_authenticated")
    assert response["WWW-Authenticate"] == "Token"


@pytest.mark.parametrize("path", ["/api/budgets", "/api/tenants", "/api/agents"])
def test_it_refuses_anonymous_writes(anon, acme, path):
    assert_error(anon.post(path, {}), 401, "not_authenticated")


def test_it_refuses_an_unknown_token(acme):
    assert_error(Api("Token nope").get("/api/budgets"), 401, "authentication_failed")


def test_it_refuses_a_token_of_an_inactive_user(staff, staff_token):
    staff.is_active = False
    staff.save()
    assert_error(Api(f"Token {staff_token}").get("/api/budgets"), 401, "authentication_failed")


@pytest.mark.parametrize("path", READS)
def test_it_refuses_users_who_are_not_staff(user_api, acme, path):
    assert_error(user_api.get(path), 403, "forbidden")


@pytest.mark.parametrize(
    "header", ["Bearer sgk_nope_nope", "Bearer not-a-key", "Bearer a b", "Bearer"]
)
def test_it_refuses_a_bad_agent_key(acme, header):
    error = assert_error(Api(header).get("/api/budgets"), 401, "invalid_api_key")
    assert "key" in error["message"]


def test_it_refuses_a_revoked_agent_key(invoice_bot):
    key, raw = services.issue_key(invoice_bot)
    services.revoke_key(key)
    error = assert_error(Api(f"Bearer {raw}").get("/api/budgets"), 401, "invalid_api_key")
    assert "revoked" in error["message"]


@pytest.mark.parametrize("path", STAFF_ONLY_READS)
def test_an_agent_key_reads_only_budgets_and_spend(acme_api, path):
    error = assert_error(acme_api.get(path), 403, "forbidden")
    assert error["message"] == "an agent key can only read budgets and spend"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("post", "/api/budgets"),
        ("delete", "/api/budgets/tenant/cus_acme"),
        ("post", "/api/budgets/tenant/cus_acme/reset"),
        ("post", "/api/tenants"),
        ("patch", "/api/tenants/cus_acme"),
        ("post", "/api/agents"),
        ("patch", "/api/agents/1"),
        ("post", "/api/agents/1/keys"),
        ("delete", "/api/agents/1/keys/abc"),
    ],
)
def test_an_agent_key_cannot_change_anything(acme_api, method, path):
    response = acme_api.delete(path) if method == "delete" else acme_api.send(method, path, {})
    error = assert_error(response, 403, "forbidden")
    assert error["message"] == "an agent key can only read"


def test_a_staff_token_created_by_drf_create_token_works(staff, acme):
    from django.core.management import call_command

    call_command("drf_create_token", staff.username)
    token = Token.objects.get(user=staff).key
    assert Api(f"Token {token}").get("/api/tenants").status_code == 200


def test_it_lets_staff_in_by_session(staff, acme):
    client = Client(enforce_csrf_checks=True)
    client.force_login(staff)
    assert client.get("/api/tenants").status_code == 200


def test_a_session_write_needs_the_csrf_token(staff, acme):
    client = Client(enforce_csrf_checks=True)
    client.force_login(staff)
    response = client.patch(
        "/api/tenants/cus_acme", {"suspended": True}, content_type="application/json"
    )
    error = assert_error(response, 403, "forbidden")
    assert "CSRF" in error["message"]


def test_it_reads_malformed_json_as_a_400(api):
    error = assert_error(api.post("/api/tenants", '{"name": "x",'), 400, "malformed_json")
    assert "JSON parse error" in error["message"]


@pytest.mark.parametrize("body", ['{"name": NaN}', '{"name": Infinity}'])
def test_it_refuses_json_constants(api, body):
    assert_error(api.post("/api/tenants", body), 400, "malformed_json")


def test_it_refuses_a_body_that_is_not_json(api):
    response = api.post("/api/tenants", "name=x", content_type="application/x-www-form-urlencoded")
    assert_error(response, 415, "unsupported_media_type")


def test_it_refuses_a_body_that_is_not_an_object(api):
    error = assert_error(api.post("/api/tenants", [1, 2]), 400, "invalid_request")
    assert "non_field_errors" in error["details"]["fields"]


def test_it_names_the_methods_it_allows(api):
    response = api.send("put", "/api/tenants", {})
    assert_error(response, 405, "method_not_allowed")
    assert "POST" in response["Allow"]


def test_an_out_of_range_page_is_not_found(api, acme):
    assert_error(api.get("/api/tenants", page=99), 404, "not_found")


def test_it_answers_options_without_a_body_schema(api):
    response = api.client.options("/api/budgets", headers=api.headers)
    assert response.status_code == 200
    assert response.json()["parses"] == ["application/json"]


@pytest.mark.parametrize(
    ("params", "field"),
    [({"page": "0"}, "page"), ({"page": "x"}, "page"), ({"page_size": "201"}, "page_size")],
)
def test_it_refuses_a_bad_page(api, acme, params, field):
    error = assert_error(api.get("/api/tenants", **params), 400, "invalid_request")
    assert list(error["details"]["fields"]) == [field]


def test_an_empty_filter_is_a_bad_filter_not_a_missing_one(api, acme):
    error = assert_error(api.get("/api/budgets", state=""), 400, "invalid_request")
    assert list(error["details"]["fields"]) == ["state"]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("get", "/api/budgets/tenant/cus_%00acme", None),
        ("get", "/api/spend/user/cus_acme:user%00/history", None),
        ("get", "/api/tenants/cus_%00", None),
        ("post", "/api/agents", {"tenant": "cus_\x00acme", "name": "bot"}),
        ("post", "/api/tenants", {"name": "X", "stripe_customer_id": "cus_x", "plan": "\x00"}),
        ("get", "/api/budgets?tenant=cus_%00acme", None),
    ],
)
def test_it_refuses_nul_characters_which_postgresql_cannot_store(api, acme, method, path, body):
    response = api.get(path) if method == "get" else api.post(path, body)
    assert response.status_code in (400, 404), response.content
    assert set(response.json()) == {"error"}
