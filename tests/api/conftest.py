"""The operator API through its HTTP door: staff by token and by session, agent keys of
acme and globex, a non-staff user, and anonymous callers."""

from __future__ import annotations

import json
import logging
from itertools import count
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from rest_framework.authtoken.models import Token

from budgets import engine, services
from budgets.money import Prices
from spend.models import SpendEntry

# One nanodollar per output token: a call of n tokens costs exactly n nanos.
NANO_PRICES = Prices(input_nanos=0, output_nanos=1)
_request_ids = count(1)


@pytest.fixture(autouse=True)
def quiet_refusals():
    """Django logs every 4xx as a warning; these tests make thousands on purpose."""
    logger = logging.getLogger("django.request")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


class Api:
    """A test client speaking JSON with one Authorization header (or none)."""

    def __init__(self, authorization: str | None = None, client: Client | None = None) -> None:
        self.client = client or Client()
        self.headers = {"Authorization": authorization} if authorization else {}

    def get(self, path: str, **params: Any):
        return self.client.get(path, params, headers=self.headers)

    def send(self, method: str, path: str, body: Any = None, content_type="application/json"):
        data = body if isinstance(body, str | bytes) or body is None else json.dumps(body)
        return getattr(self.client, method)(
            path, data or "", content_type=content_type, headers=self.headers
        )

    def post(self, path: str, body: Any = None, **kwargs: Any):
        return self.send("post", path, body, **kwargs)

    def patch(self, path: str, body: Any = None, **kwargs: Any):
        return self.send("patch", path, body, **kwargs)

    def delete(self, path: str):
        return self.client.delete(path, headers=self.headers)


@pytest.fixture
def staff(db):
    return get_user_model().objects.create_user("operator", is_staff=True)


@pytest.fixture
def staff_token(staff) -> str:
    return Token.objects.create(user=staff).key


@pytest.fixture
def api(staff_token) -> Api:
    return Api(f"Token {staff_token}")


@pytest.fixture
def anon(db) -> Api:
    return Api()


@pytest.fixture
def user_api(db) -> Api:
    user = get_user_model().objects.create_user("customer")
    return Api(f"Token {Token.objects.create(user=user).key}")


@pytest.fixture
def acme_api(invoice_bot) -> Api:
    """invoice-bot's key: acme's agent."""
    return Api(f"Bearer {services.issue_key(invoice_bot)[1]}")


@pytest.fixture
def globex_bot(globex):
    return services.create_agent(globex, "globex-bot")


@pytest.fixture
def globex_api(globex_bot) -> Api:
    return Api(f"Bearer {services.issue_key(globex_bot)[1]}")


def charge(tenant, nanos: int, agent=None, user_key: str = "", model: str = "test-model"):
    """Spend `nanos` through the budget engine, as a real call would."""
    scope = engine.state_of(tenant, agent, user_key)
    hold = engine.authorize(
        scope,
        request_id=f"call-{next(_request_ids)}",
        model=model,
        prices=NANO_PRICES,
        input_tokens=0,
        max_output_tokens=nanos,
        min_output_tokens=1,
    )
    return engine.capture(hold, prompt_tokens=0, completion_tokens=nanos)


def ledger_row(tenant, nanos: int, at, agent=None, user_key: str = "", model: str = "test-model"):
    """A ledger row written at `at` (history and spikes read only the ledger)."""
    entry = SpendEntry.objects.create(
        tenant=tenant,
        agent=agent,
        user_key=user_key,
        request_id=f"row-{next(_request_ids)}",
        model_requested=model,
        model_used=model,
        prompt_tokens=0,
        completion_tokens=nanos,
        input_price_nanos=0,
        output_price_nanos=1,
        cost_nanos=nanos,
    )
    SpendEntry.objects.filter(pk=entry.pk).update(created_at=at)
    entry.created_at = at
    return entry


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    return body["error"]
