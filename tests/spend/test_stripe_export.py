"""Captured spend reaches Stripe meter events once per ledger row, in whole units, with
remainders carried, identifiers fixed per batch, and failures retried with backoff."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from spend import stripe_export
from spend.models import MeterAccount, MeterReport, SpendEntry
from spend.tasks import report_usage_to_stripe

from .conftest import METER_EVENTS_URL, meter_event_reply, sent_events

pytestmark = pytest.mark.django_db


def accept(stripe_api) -> None:
    stripe_api.add_callback("POST", METER_EVENTS_URL, callback=meter_event_reply)


def test_it_reports_whole_units_per_customer_and_carries_the_remainder(
    stripe_api, charge, acme, globex
):
    accept(stripe_api)
    charge(acme, 1_500)
    latest = charge(acme, 2_700)
    charge(globex, 999)  # under one micro-USD: waits for more

    assert report_usage_to_stripe() == {"enabled": True, "claimed": 1, "sent": 1, "failed": 0}

    report = MeterReport.objects.get()
    assert sent_events(stripe_api.calls) == [
        {
            "event_name": "llm_spend",
            "payload[stripe_customer_id]": "cus_acme",
            "payload[value]": "4",
            "identifier": report.identifier,
            "timestamp": str(int(latest.created_at.timestamp())),
        }
    ]
    assert report.identifier.startswith("sg_usage_")
    assert (report.amount, report.value, report.status) == (4_200, 4, "reported")
    assert set(SpendEntry.objects.filter(tenant=acme).values_list("reported_at", flat=True)) == {
        report.reported_at
    }
    assert SpendEntry.objects.get(tenant=globex).reported_at is None

    charge(acme, 850)  # 200 carried + 850 = 1.05 micro-USD
    charge(globex, 1)  # 999 + 1 = 1 micro-USD
    report_usage_to_stripe()

    values = {
        e["payload[stripe_customer_id]"]: e["payload[value]"]
        for e in sent_events(stripe_api.calls)[1:]
    }
    assert values == {"cus_acme": "1", "cus_globex": "1"}
    # What Stripe has is always floor(ledger / unit).
    assert MeterAccount.objects.get(tenant=acme).claimed_units == (1_500 + 2_700 + 850) // 1_000
    assert MeterAccount.objects.get(tenant=acme).claimed_amount == 5_050
    assert not SpendEntry.objects.filter(reported_at__isnull=True).exists()


def test_it_never_reports_a_row_twice(stripe_api, charge, acme):
    accept(stripe_api)
    charge(acme, 3_000)
    report_usage_to_stripe()
    report_usage_to_stripe()
    stripe_export.export_usage(now=timezone.now() + timedelta(days=1))
    assert len(stripe_api.calls) == 1


def test_it_does_nothing_until_stripe_is_configured(settings, charge, acme):
    settings.STRIPE_SECRET_KEY = ""
    settings.STRIPE_METER_EVENT_NAME = "llm_spend"
    charge(acme, 5_000)
    # No mock is active: any HTTP call would go out for real and fail the test.
    assert report_usage_to_stripe() == {"enabled": False, "claimed": 0, "sent": 0, "failed": 0}
    assert not MeterReport.objects.exists()


def test_it_retries_after_a_500_with_the_same_identifier(stripe_api, charge, acme):
    stripe_api.add(
        "POST",
        METER_EVENTS_URL,
        status=500,
        json={"error": {"type": "api_error", "message": "An unknown error occurred"}},
    )
    accept(stripe_api)
    charge(acme, 12_345)

    assert report_usage_to_stripe()["failed"] == 1

    report = MeterReport.objects.get()
    assert (report.status, report.attempts) == ("pending", 1)
    assert report.last_error == "APIError (500): An unknown error occurred"
    assert SpendEntry.objects.get().reported_at is None
    # Not due yet: the next run waits out the backoff.
    report_usage_to_stripe()
    assert len(stripe_api.calls) == 1

    result = stripe_export.export_usage(now=report.next_attempt_at)

    assert (result.sent, result.failed) == (1, 0)
    first, second = sent_events(stripe_api.calls)
    assert first == second
    assert second["identifier"] == report.identifier and second["payload[value]"] == "12"
    report.refresh_from_db()
    assert (report.status, report.attempts, report.last_error) == ("reported", 2, "")
    assert SpendEntry.objects.get().reported_at == report.reported_at


def test_it_backs_off_exponentially_up_to_an_hour():
    waits = [stripe_export.backoff(n).total_seconds() for n in (1, 2, 3, 8, 20)]
    assert waits == [30, 60, 120, 3600, 3600]


def test_a_stripe_outage_stops_the_run(stripe_api, charge, acme, globex):
    stripe_api.add("POST", METER_EVENTS_URL, status=503, json={"error": {"message": "down"}})
    charge(acme, 2_000)
    charge(globex, 2_000)
    result = report_usage_to_stripe()
    assert (result["claimed"], result["failed"], len(stripe_api.calls)) == (2, 1, 1)


def test_a_refused_event_does_not_hold_up_other_customers(stripe_api, charge, acme, globex):
    stripe_api.add(
        "POST",
        METER_EVENTS_URL,
        status=400,
        json={
            "error": {"type": "invalid_request_error", "message": "No such customer: 'cus_acme'"}
        },
    )
    accept(stripe_api)
    charge(acme, 2_000)
    charge(globex, 3_000)

    result = report_usage_to_stripe()

    assert (result["sent"], result["failed"]) == (1, 1)
    assert MeterReport.objects.get(tenant=acme).last_error.startswith("InvalidRequestError (400)")
    assert MeterReport.objects.get(tenant=globex).status == "reported"


def test_a_run_that_died_mid_send_is_resent_with_the_same_identifier(stripe_api, charge, acme):
    accept(stripe_api)
    charge(acme, 7_000)
    now = timezone.now()
    [report] = stripe_export.claim_usage(now, "llm_spend", "micro_usd")
    # A run took the report and died before recording Stripe's answer.
    MeterReport.objects.filter(pk=report.pk).update(
        attempts=1, next_attempt_at=now + stripe_export.LEASE
    )
    assert stripe_export.export_usage(now=now).sent == 0

    assert stripe_export.export_usage(now=now + stripe_export.LEASE).sent == 1
    assert sent_events(stripe_api.calls)[0]["identifier"] == report.identifier


def test_it_reports_tokens_when_the_unit_is_tokens(stripe_api, settings, charge, acme):
    settings.STRIPE_METER_UNIT = "tokens"
    accept(stripe_api)
    charge(acme, 1_000, completion_tokens=234)
    charge(acme, 1)
    report_usage_to_stripe()
    assert sent_events(stripe_api.calls)[0]["payload[value]"] == "1235"


def test_old_spend_is_dated_within_what_stripe_accepts(stripe_api, charge, acme):
    accept(stripe_api)
    entry = charge(acme, 5_000)
    SpendEntry.objects.filter(pk=entry.pk).update(created_at=timezone.now() - timedelta(days=60))
    now = timezone.now()
    stripe_export.export_usage(now=now)
    sent = int(sent_events(stripe_api.calls)[0]["timestamp"])
    assert sent == int((now - stripe_export.MAX_EVENT_AGE).timestamp())


def test_rows_worth_nothing_are_settled_without_a_call(stripe_meter, charge, acme):
    for _ in range(3):
        charge(acme, 0)
    reports = stripe_export.claim_usage(timezone.now(), "llm_spend", "micro_usd", batch_size=2)
    # A full batch of zero cost is settled; the last row waits for company.
    assert [(r.value, r.status) for r in reports] == [(0, "reported")]
    assert SpendEntry.objects.filter(reported_at__isnull=True).count() == 1
