from __future__ import annotations

import json
import uuid
from urllib.parse import parse_qs

import pytest
import responses

from budgets import engine
from budgets.models import Tenant
from budgets.money import Prices
from spend.models import SpendEntry
from tests.webhooks.stripe_objects import resource

STRIPE_BASE = "https://stripe.test"
METER_EVENTS_URL = f"{STRIPE_BASE}/v1/billing/meter_events"


@pytest.fixture
def stripe_meter(settings):
    settings.STRIPE_SECRET_KEY = "sk_test_51Hx"
    settings.STRIPE_METER_EVENT_NAME = "llm_spend"
    settings.STRIPE_METER_UNIT = "micro_usd"
    settings.STRIPE_API_BASE = STRIPE_BASE


def meter_event_reply(request) -> tuple[int, dict, str]:
    """Stripe's answer to a meter event: the event as created."""
    form = parse_qs(request.body)
    reply = resource("billing.meter_event")
    reply.update(
        event_name=form["event_name"][0],
        identifier=form["identifier"][0],
        timestamp=int(form["timestamp"][0]),
        payload={
            "stripe_customer_id": form["payload[stripe_customer_id]"][0],
            "value": form["payload[value]"][0],
        },
    )
    return 200, {}, json.dumps(reply)


def sent_events(calls) -> list[dict[str, str]]:
    """The meter events Stripe received, as flat dicts of their form fields."""
    return [
        {key: values[0] for key, values in parse_qs(call.request.body).items()}
        for call in calls
        if call.request.url == METER_EVENTS_URL
    ]


@pytest.fixture
def stripe_api(stripe_meter):
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def charge():
    """Capture a call that costs exactly `nanos` (one nanodollar per prompt token)."""

    def charge(tenant: Tenant, nanos: int, completion_tokens: int = 0) -> SpendEntry:
        hold = engine.authorize(
            engine.state_of(tenant),
            request_id=f"call-{uuid.uuid4().hex}",
            model="m",
            prices=Prices(1, 0),
            input_tokens=nanos,
            max_output_tokens=max(completion_tokens, 1),
            min_output_tokens=1,
        )
        return engine.capture(hold, prompt_tokens=nanos, completion_tokens=completion_tokens)

    return charge
