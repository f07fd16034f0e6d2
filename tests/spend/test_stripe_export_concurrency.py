"""Two export runs at once never report a ledger row twice (PostgreSQL, real threads)."""

from __future__ import annotations

import time

import pytest
from django.utils import timezone

from budgets import services
from spend import stripe_export
from spend.models import MeterReport, SpendEntry
from spend.tasks import report_usage_to_stripe
from tests.threads import in_threads

from .conftest import METER_EVENTS_URL, meter_event_reply, sent_events

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("require_postgres")]

TENANTS = 6
ROWS_PER_TENANT = 5


def slow_reply(request):
    # Long enough for the other run to reach the same report while this one sends it.
    time.sleep(0.02)
    return meter_event_reply(request)


@pytest.fixture
def ledger(charge):
    totals = {}
    for t in range(TENANTS):
        tenant = services.create_tenant(f"Tenant {t}", f"cus_t{t}")
        totals[tenant.stripe_customer_id] = 0
        for r in range(ROWS_PER_TENANT):
            nanos = 1_000 * (t + 1) + 137 * r
            charge(tenant, nanos)
            totals[tenant.stripe_customer_id] += nanos
    return totals


def assert_reported_once(calls, totals):
    events = sent_events(calls)
    identifiers = [e["identifier"] for e in events]
    assert (
        len(identifiers) == len(set(identifiers)) == MeterReport.objects.filter(value__gt=0).count()
    )
    reported = {customer: 0 for customer in totals}
    for e in events:
        reported[e["payload[stripe_customer_id]"]] += int(e["payload[value]"])
    assert reported == {customer: total // 1_000 for customer, total in totals.items()}
    assert not SpendEntry.objects.filter(meter_report__isnull=True).exists()
    assert not SpendEntry.objects.filter(reported_at__isnull=True).exists()


def test_two_runs_at_once_report_each_row_once(stripe_api, ledger):
    stripe_api.add_callback("POST", METER_EVENTS_URL, callback=slow_reply)

    results = in_threads(2, lambda i: report_usage_to_stripe())

    assert sum(r["claimed"] for r in results) == TENANTS
    assert sum(r["sent"] for r in results) == TENANTS
    assert_reported_once(stripe_api.calls, ledger)


def test_two_senders_at_once_send_each_report_once(stripe_api, ledger):
    stripe_api.add_callback("POST", METER_EVENTS_URL, callback=slow_reply)
    now = timezone.now()
    stripe_export.claim_usage(now, "llm_spend", "micro_usd", batch_size=2)
    client = stripe_export.stripe_client()

    sent = in_threads(4, lambda i: stripe_export.send_due_reports(now, client)[0])

    assert sum(sent) == MeterReport.objects.filter(value__gt=0).count()
    assert_reported_once(stripe_api.calls, ledger)
