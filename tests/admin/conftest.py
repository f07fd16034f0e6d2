from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from budgets import engine, services
from budgets.models import Plan, ScopeType
from budgets.money import Prices, usd_to_nanos
from governance.models import AlertChannel, AlertDelivery
from spend import rollups
from spend.models import MeterAccount, MeterReport, Spike
from tests.webhooks.conftest import period, plans  # noqa: F401
from webhooks.models import EventStatus, StripeEvent, StripeSubscription


@pytest.fixture
def populated(acme, globex, invoice_bot, prices):
    """A row in every table the admin lists: acme has spent past its warning threshold
    (a ledger row, a captured hold, a period, a warned event), holds one call in flight,
    and has a spike, a meter report, a Stripe event and an alert delivery."""
    now = timezone.now()
    plan = Plan.objects.create(name="Basic", stripe_price="price_basic", limit_nanos=10**10)
    acme.plan = plan
    acme.save()
    services.issue_key(invoice_bot, "prod")
    policy = services.set_policy(acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("0.001"))
    services.set_policy(globex, ScopeType.TENANT, limit_nanos=usd_to_nanos("5"))
    hold = engine.authorize(
        engine.state_of(acme, invoice_bot),
        request_id="call-1",
        model="mistral-small",
        prices=prices,
        input_tokens=1000,
        max_output_tokens=1000,
    )
    engine.capture(hold, prompt_tokens=1000, completion_tokens=800)
    engine.authorize(
        engine.state_of(acme, invoice_bot),
        request_id="call-2",
        model="mistral-small",
        prices=Prices(1, 1),
        input_tokens=10,
        max_output_tokens=10,
    )
    rollups.rollup_hours(now)
    hour = now.replace(minute=0, second=0, microsecond=0)
    Spike.objects.create(
        scope_type="agent",
        tenant=acme,
        agent=invoice_bot,
        kind=Spike.Kind.ANOMALY,
        hour=hour,
        spend_nanos=3,
        baseline_nanos=1,
        threshold_nanos=2,
    )
    MeterAccount.objects.create(tenant=acme, event_name="llm_spend", unit="micro_usd")
    MeterReport.objects.create(
        tenant=acme,
        stripe_customer_id="cus_acme",
        event_name="llm_spend",
        unit="micro_usd",
        identifier="mr_1",
        amount=1000,
        value=1,
        timestamp=now,
        next_attempt_at=now,
    )
    StripeEvent.objects.create(
        stripe_id="evt_1",
        type="invoice.paid",
        created=now - timedelta(minutes=1),
        customer_id="cus_acme",
        payload={"id": "evt_1", "object": "event", "data": {"object": {}}},
        status=EventStatus.FAILED,
        error="KeyError: 'lines'",
    )
    StripeSubscription.objects.create(stripe_id="sub_1", customer_id="cus_acme", plan=plan)
    channel = AlertChannel.objects.create(
        name="ops", type="email", target="ops@example.com", tenant=acme
    )
    AlertDelivery.objects.create(
        channel=channel,
        source_type="budget_event",
        source_id=1,
        tenant=acme,
        kind="warned",
        payload={"text": "acme warned"},
        next_attempt_at=now,
    )
    return policy
