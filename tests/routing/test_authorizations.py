"""The authorization API for agents that call Mistral themselves."""

from __future__ import annotations

import pytest

from budgets import services
from budgets.models import BudgetPeriod, Hold, HoldStatus, ScopeType
from budgets.money import usd_to_nanos
from routing.catalog import get_catalog
from spend.models import SpendEntry

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def no_key_cache(settings):
    settings.KEY_CACHE_SECONDS = 0


def post(client, path, key, body=None, content_type="application/json"):
    headers = {"HTTP_AUTHORIZATION": f"Bearer {key}"} if key else {}
    import json

    data = body if isinstance(body, (bytes, str)) else json.dumps(body or {})
    return client.post(path, data=data, content_type=content_type, **headers)


def authorize(client, key, request_id="call-1", **fields):
    body = {
        "request_id": request_id,
        "model": "mistral-small-latest",
        "input_tokens": 1000,
        "max_tokens": 500,
    }
    return post(client, "/api/authorizations", key, {**body, **fields})


def test_it_authorizes_with_a_hold_and_an_expiry(client, acme, acme_key):
    response = authorize(client, acme_key)
    assert response.status_code == 201, response.content
    data = response.json()
    small = get_catalog().resolve("mistral-small")
    assert data["id"] == "call-1"
    assert data["model"] == "mistral-small"
    assert data["max_tokens"] == 500
    assert data["hold_usd"] == "0.00045"  # 1000 * 150 + 500 * 600 nanos
    assert small.prices.cost_nanos(1000, 500) == 450_000
    assert data["expires_at"].endswith("+00:00")
    assert data["budget_state"] == "active"
    assert BudgetPeriod.objects.get(policy__tenant=acme).held_nanos == 450_000


def test_it_counts_messages_when_no_token_count_is_given(client, acme_key):
    response = post(
        client,
        "/api/authorizations",
        acme_key,
        {
            "request_id": "m1",
            "model": "mistral-small-latest",
            "messages": [{"role": "user", "content": "hi"}],
        },
    )
    assert response.status_code == 201, response.content
    assert response.json()["input_tokens"] > 0


def test_authorizing_twice_returns_the_same_hold(client, acme, acme_key):
    first = authorize(client, acme_key).json()
    again = authorize(client, acme_key)
    assert again.status_code == 200
    assert again.json()["hold_usd"] == first["hold_usd"]
    assert Hold.objects.count() == 1
    assert BudgetPeriod.objects.get(policy__tenant=acme).held_nanos == 450_000


def test_capture_records_the_spend_and_is_idempotent(client, acme, acme_key):
    authorize(client, acme_key)
    response = post(
        client,
        "/api/authorizations/call-1/capture",
        acme_key,
        {"prompt_tokens": 900, "completion_tokens": 100},
    )
    assert response.status_code == 200, response.content
    assert response.json()["cost_usd"] == "0.000195"  # 900 * 150 + 100 * 600
    again = post(
        client,
        "/api/authorizations/call-1/capture",
        acme_key,
        {"prompt_tokens": 900, "completion_tokens": 100},
    )
    assert again.json() == response.json()
    assert SpendEntry.objects.count() == 1
    period = BudgetPeriod.objects.get(policy__tenant=acme)
    assert (period.spent_nanos, period.held_nanos) == (195_000, 0)


def test_capturing_more_than_was_held_is_recorded_and_flagged(client, acme_key):
    authorize(client, acme_key)
    response = post(
        client,
        "/api/authorizations/call-1/capture",
        acme_key,
        {"prompt_tokens": 1000, "completion_tokens": 5000},
    )
    assert response.json()["over_hold"] is True
    assert SpendEntry.objects.get().cost_nanos == 1000 * 150 + 5000 * 600


def test_capture_on_a_cheaper_model_uses_its_prices(client, acme_key):
    authorize(client, acme_key)
    response = post(
        client,
        "/api/authorizations/call-1/capture",
        acme_key,
        {"prompt_tokens": 10, "completion_tokens": 10, "model": "ministral-3b-latest"},
    )
    assert response.json()["model"] == "ministral-3b"
    assert SpendEntry.objects.get().cost_nanos == get_catalog().resolve(
        "ministral-3b"
    ).prices.cost_nanos(10, 10)


def test_void_releases_the_hold(client, acme, acme_key):
    authorize(client, acme_key)
    response = post(client, "/api/authorizations/call-1/void", acme_key)
    assert response.status_code == 200
    assert response.json()["status"] == "voided"
    assert post(client, "/api/authorizations/call-1/void", acme_key).status_code == 200
    assert BudgetPeriod.objects.get(policy__tenant=acme).held_nanos == 0
    captured = post(
        client,
        "/api/authorizations/call-1/capture",
        acme_key,
        {"prompt_tokens": 1, "completion_tokens": 1},
    )
    assert (captured.status_code, captured.json()["code"]) == (409, "hold_conflict")


def test_another_tenants_key_cannot_touch_the_authorization(client, acme_key, globex_key):
    authorize(client, acme_key)
    for action, body in (("capture", {"prompt_tokens": 1, "completion_tokens": 1}), ("void", {})):
        response = post(client, f"/api/authorizations/call-1/{action}", globex_key, body)
        assert (response.status_code, response.json()["code"]) == (404, "hold_not_found")
    assert Hold.objects.get().status == HoldStatus.HELD
    # Nor can it reuse the request id to read the other tenant's hold.
    response = authorize(client, globex_key)
    assert response.status_code == 400
    assert "already used" in response.json()["message"]


def test_a_stopped_budget_refuses_like_the_gateway(client, acme, acme_key, spend):
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("1"))
    spend(acme, usd_to_nanos("1"))
    response = authorize(client, acme_key)
    assert response.status_code == 402
    assert response.json()["code"] == "budget_exceeded"
    assert response.json()["details"]["resets_at"]


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"request_id": ""}, "request_id"),
        ({"request_id": "has space"}, "request_id"),
        ({"input_tokens": -1}, "input_tokens"),
        ({"input_tokens": "many"}, "input_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"model": "gpt-4o"}, "unknown model"),
        ({"user": 5}, "'user'"),
    ],
)
def test_bad_authorizations_are_refused(client, acme_key, fields, problem):
    response = authorize(client, acme_key, **fields)
    assert response.status_code == 400
    assert problem in response.json()["message"]
    assert not Hold.objects.exists()


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"prompt_tokens": -1, "completion_tokens": 1}, "prompt_tokens"),
        ({"completion_tokens": 1}, "prompt_tokens"),
        ({"prompt_tokens": 1, "completion_tokens": 1.5}, "completion_tokens"),
        (b"{oops", "not valid JSON"),
    ],
)
def test_bad_captures_are_refused(client, acme_key, body, problem):
    authorize(client, acme_key)
    response = post(client, "/api/authorizations/call-1/capture", acme_key, body)
    assert response.status_code == 400
    assert problem in response.json()["message"]
    assert Hold.objects.get().status == HoldStatus.HELD


def test_it_needs_a_valid_key_and_post(client, acme_key):
    assert authorize(client, None).status_code == 401
    assert authorize(client, "sgk_x_y").status_code == 401
    response = client.get("/api/authorizations", HTTP_AUTHORIZATION=f"Bearer {acme_key}")
    assert response.status_code == 405


def test_capturing_an_unknown_authorization_is_404(client, acme_key):
    response = post(
        client,
        "/api/authorizations/nope/capture",
        acme_key,
        {"prompt_tokens": 1, "completion_tokens": 1},
    )
    assert response.status_code == 404
