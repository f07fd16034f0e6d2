"""manage.py stripe_reconcile: per tenant, the ledger against what Stripe accepted."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from spend.models import SpendEntry
from spend.tasks import report_usage_to_stripe

from .conftest import METER_EVENTS_URL, meter_event_reply

pytestmark = pytest.mark.django_db


def reconcile(capsys, *args: str) -> list[str]:
    call_command("stripe_reconcile", *args)
    return capsys.readouterr().out.splitlines()


def test_it_shows_each_tenants_ledger_against_what_was_reported(
    stripe_api, charge, acme, globex, capsys
):
    stripe_api.add_callback("POST", METER_EVENTS_URL, callback=meter_event_reply)
    charge(acme, 2_500_000)
    report_usage_to_stripe()
    charge(acme, 1_000)  # not reported yet
    charge(globex, 999)  # under one unit

    lines = reconcile(capsys)

    assert lines[0] == "Meter llm_spend, unit micro_usd, all time"
    assert lines[1].split() == [
        "tenant",
        "customer",
        "ledger",
        "USD",
        "due",
        "units",
        "reported",
        "pending",
        "difference",
    ]
    assert lines[2].split() == ["Acme", "cus_acme", "0.002501", "2501", "2500", "0", "1"]
    assert lines[3].split() == ["Globex", "cus_globex", "0.000000999", "0", "0", "0", "0"]
    assert lines[4].startswith("1 tenant(s) with a difference")


def test_it_says_when_everything_is_reported(stripe_api, charge, acme, capsys):
    stripe_api.add_callback("POST", METER_EVENTS_URL, callback=meter_event_reply)
    charge(acme, 3_000)
    report_usage_to_stripe()
    assert reconcile(capsys)[-1] == "Every tenant's spend is reported."


def test_it_counts_pending_reports(stripe_api, charge, acme, capsys):
    stripe_api.add("POST", METER_EVENTS_URL, status=500, json={"error": {"message": "x"}})
    charge(acme, 3_000)
    report_usage_to_stripe()
    assert reconcile(capsys)[2].split()[-4:] == ["3", "0", "3", "3"]


def test_it_limits_to_spend_since_a_date(stripe_meter, charge, acme, capsys):
    old = charge(acme, 5_000)
    SpendEntry.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(days=40))
    charge(acme, 2_000)
    since = (timezone.now() - timedelta(days=1)).date().isoformat()

    lines = reconcile(capsys, "--since", since)

    assert lines[0] == f"Meter llm_spend, unit micro_usd, since {since} 00:00 UTC"
    assert lines[2].split()[2:4] == ["0.000002", "2"]


def test_it_says_when_export_is_off(settings, acme, capsys):
    settings.STRIPE_SECRET_KEY = ""
    lines = reconcile(capsys)
    assert "Usage export is off" in lines[1]
    assert lines[-1] == "No spend in the ledger."


def test_it_refuses_a_bad_date(db):
    with pytest.raises(CommandError, match="--since 'last tuesday'"):
        call_command("stripe_reconcile", "--since", "last tuesday")
