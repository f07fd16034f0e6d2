from __future__ import annotations

from datetime import UTC, datetime

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.utils.dateparse import parse_date, parse_datetime

from budgets.money import nanos_to_usd
from spend import stripe_export
from spend.models import MeterUnit


def _since(value: str) -> datetime:
    moment = parse_datetime(value)
    if moment is None:
        day = parse_date(value)
        if day is None:
            raise CommandError(f"--since {value!r}: use a date (2026-11-01) or an ISO 8601 time")
        moment = datetime(day.year, day.month, day.day)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class Command(BaseCommand):
    help = (
        "Per tenant: ledger spend against what was reported to Stripe meter events, and "
        "any difference."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--since", type=_since, help="Only spend and reports from then on (UTC date or time)"
        )
        parser.add_argument(
            "--unit",
            choices=MeterUnit.values,
            default=None,
            help="Meter unit (default: STRIPE_METER_UNIT)",
        )

    def handle(self, *args, since=None, unit=None, **options):
        unit = unit or settings.STRIPE_METER_UNIT
        event = settings.STRIPE_METER_EVENT_NAME or "(STRIPE_METER_EVENT_NAME not set)"
        self.stdout.write(
            f"Meter {event}, unit {unit}"
            + (f", since {since:%Y-%m-%d %H:%M} UTC" if since else ", all time")
        )
        if not stripe_export.is_enabled():
            self.stdout.write(
                "Usage export is off: set STRIPE_SECRET_KEY and STRIPE_METER_EVENT_NAME."
            )
        rows = stripe_export.reconcile(unit, since)
        if not rows:
            self.stdout.write("No spend in the ledger.")
            return
        ledger_header = "ledger tokens" if unit == MeterUnit.TOKENS else "ledger USD"
        header = (
            f"{'tenant':<24} {'customer':<24} {ledger_header:>16} {'due units':>12} "
            f"{'reported':>12} {'pending':>10} {'difference':>11}"
        )
        self.stdout.write(header)
        behind = 0
        for row in rows:
            ledger = (
                str(row.ledger_amount)
                if unit == MeterUnit.TOKENS
                else nanos_to_usd(row.ledger_amount)
            )
            self.stdout.write(
                f"{row.tenant.name[:24]:<24} {row.tenant.stripe_customer_id[:24]:<24} "
                f"{ledger:>16} {row.due_units:>12} {row.reported_units:>12} "
                f"{row.pending_units:>10} {row.difference:>11}"
            )
            behind += row.difference != 0
        if behind:
            self.stdout.write(
                f"{behind} tenant(s) with a difference: pending reports are sent by the "
                "report_usage_to_stripe task; rows under one unit wait for more spend."
            )
        else:
            self.stdout.write("Every tenant's spend is reported.")
