"""Usage to Stripe Billing meter events, from the ledger as an outbox.

Two steps, each safe to run twice at once:

1. Claim: per tenant, under a lock on its meter account (skipped if another run holds
   it), unclaimed ledger rows are attached to a new MeterReport with a conditional
   UPDATE (`... WHERE meter_report IS NULL`). The account's running totals turn the
   batch into whole units; the remainder under one unit carries to the next batch, so
   units claimed always equal floor(amount claimed / unit).
2. Send: each due report is taken with a conditional UPDATE that pushes its next attempt
   a lease into the future, then sent with the identifier fixed at claim time, so a
   resend (a crash after Stripe accepted, a lease that ran out) is a no-op at Stripe.
   Only after Stripe accepts are the report and its rows marked reported; a failure
   backs off exponentially.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

import stripe
from django.conf import settings
from django.db import transaction
from django.db.models import F, Q, Sum
from django.db.models.functions import Coalesce
from django.utils import timezone

from budgets.models import Tenant

from .models import MeterAccount, MeterReport, MeterUnit, SpendEntry

log = logging.getLogger(__name__)

# What one meter unit is worth, in the amount a ledger row is counted in: nanodollars
# for the money units, tokens for the tokens unit.
UNIT_SIZES = {
    MeterUnit.MICRO_USD: 1_000,
    MeterUnit.MILLI_USD: 1_000_000,
    MeterUnit.CENTS: 10_000_000,
    MeterUnit.TOKENS: 1,
}
BATCH_SIZE = 1000
# Stripe takes meter events up to 35 days old; a margin keeps a retry inside it.
MAX_EVENT_AGE = timedelta(days=34)
# How long a run owns a report it is sending; past it, another run may resend it.
LEASE = timedelta(minutes=5)
BACKOFF_BASE = timedelta(seconds=30)
BACKOFF_MAX = timedelta(hours=1)


@dataclass
class ExportResult:
    enabled: bool
    claimed: int = 0
    sent: int = 0
    failed: int = 0


def is_enabled() -> bool:
    return bool(settings.STRIPE_SECRET_KEY and settings.STRIPE_METER_EVENT_NAME)


def stripe_client() -> stripe.StripeClient:
    return stripe.StripeClient(
        settings.STRIPE_SECRET_KEY,
        base_addresses={"api": settings.STRIPE_API_BASE, "meter_events": settings.STRIPE_API_BASE},
        max_network_retries=0,
    )


def backoff(attempts: int) -> timedelta:
    """The wait after the `attempts`-th failed attempt: 30 s, 1 min, 2 min, ... 1 h."""
    return min(BACKOFF_BASE * 2 ** max(attempts - 1, 0), BACKOFF_MAX)


def _amount_expression(unit: str):
    if unit == MeterUnit.TOKENS:
        return F("prompt_tokens") + F("completion_tokens")
    return F("cost_nanos")


# --- Claiming -----------------------------------------------------------------------


def _claim_batch(
    tenant: Tenant, event_name: str, unit: str, now: datetime, batch_size: int
) -> tuple[MeterReport | None, bool]:
    """Claim up to batch_size unclaimed rows of the tenant into one report. Returns the
    report (None if nothing was claimed) and whether more rows may be waiting."""
    size = UNIT_SIZES[unit]
    with transaction.atomic():
        account = (
            MeterAccount.objects.select_for_update(skip_locked=True)
            .filter(tenant=tenant, event_name=event_name, unit=unit)
            .first()
        )
        if account is None:
            return None, False  # another run is claiming this tenant's rows
        rows = list(
            SpendEntry.objects.filter(tenant=tenant, meter_report__isnull=True)
            .order_by("id")
            .annotate(amount=_amount_expression(unit))
            .values_list("id", "amount", "created_at")[:batch_size]
        )
        if not rows:
            return None, False
        full = len(rows) == batch_size
        amount = sum(row[1] for row in rows)
        value = (account.claimed_amount + amount) // size - account.claimed_units
        if value == 0 and not full:
            # Under one unit: leave the rows for a batch that reaches one.
            return None, False
        latest = max(row[2] for row in rows)
        report = MeterReport.objects.create(
            tenant=tenant,
            stripe_customer_id=tenant.stripe_customer_id,
            event_name=event_name,
            unit=unit,
            identifier=f"sg_usage_{uuid.uuid4().hex}",
            amount=amount,
            value=value,
            timestamp=min(max(latest, now - MAX_EVENT_AGE), now),
            next_attempt_at=now,
            # A batch worth no whole unit has nothing to send: its amount is carried.
            status=MeterReport.Status.PENDING if value else MeterReport.Status.REPORTED,
            reported_at=None if value else now,
        )
        ids = [row[0] for row in rows]
        claimed = SpendEntry.objects.filter(id__in=ids, meter_report__isnull=True).update(
            meter_report=report, reported_at=None if value else now
        )
        if claimed != len(ids):
            # Someone claimed some of these rows without the account lock (a run with
            # another meter or unit): give this batch up, whole.
            transaction.set_rollback(True)
            return None, False
        MeterAccount.objects.filter(pk=account.pk).update(
            claimed_amount=F("claimed_amount") + amount, claimed_units=F("claimed_units") + value
        )
    return report, full


def claim_usage(
    now: datetime, event_name: str, unit: str, batch_size: int = BATCH_SIZE
) -> list[MeterReport]:
    """Claim every tenant's unclaimed ledger rows into meter reports."""
    if unit not in UNIT_SIZES:
        raise ValueError(f"unknown meter unit {unit!r}")
    tenant_ids = (
        SpendEntry.objects.filter(meter_report__isnull=True)
        .order_by()
        .values_list("tenant_id", flat=True)
        .distinct()
    )
    reports = []
    for tenant in Tenant.objects.filter(id__in=list(tenant_ids)).order_by("id"):
        MeterAccount.objects.get_or_create(tenant=tenant, event_name=event_name, unit=unit)
        more = True
        while more:
            report, more = _claim_batch(tenant, event_name, unit, now, batch_size)
            if report is not None:
                reports.append(report)
    return reports


# --- Sending ------------------------------------------------------------------------


def _stops_the_run(error: stripe.StripeError) -> bool:
    """Stripe down, unreachable or asking us to slow down: the other reports would fail
    the same way, so they wait for the next run."""
    status = error.http_status
    return status is None or status == 429 or status >= 500


def send_report(report: MeterReport, client: stripe.StripeClient) -> None:
    client.v1.billing.meter_events.create(
        {
            "event_name": report.event_name,
            "payload": {
                "stripe_customer_id": report.stripe_customer_id,
                "value": str(report.value),
            },
            "identifier": report.identifier,
            "timestamp": int(report.timestamp.timestamp()),
        }
    )


def send_due_reports(now: datetime, client: stripe.StripeClient) -> tuple[int, int]:
    """Send every pending report whose attempt is due; (sent, failed)."""
    sent = failed = 0
    due = MeterReport.objects.filter(status=MeterReport.Status.PENDING, next_attempt_at__lte=now)
    for report_id in list(due.order_by("id").values_list("id", flat=True)):
        taken = MeterReport.objects.filter(
            pk=report_id, status=MeterReport.Status.PENDING, next_attempt_at__lte=now
        ).update(next_attempt_at=now + LEASE, attempts=F("attempts") + 1)
        if taken != 1:
            continue  # another run is sending it
        report = MeterReport.objects.get(pk=report_id)
        try:
            send_report(report, client)
        except stripe.StripeError as exc:
            failed += 1
            log.warning("meter report %s failed: %s", report.identifier, exc)
            MeterReport.objects.filter(pk=report_id, status=MeterReport.Status.PENDING).update(
                next_attempt_at=now + backoff(report.attempts),
                last_error=f"{type(exc).__name__} ({exc.http_status}): {exc}"[:2000],
            )
            if _stops_the_run(exc):
                break
            continue
        with transaction.atomic():
            MeterReport.objects.filter(pk=report_id).update(
                status=MeterReport.Status.REPORTED, reported_at=now, last_error=""
            )
            SpendEntry.objects.filter(meter_report_id=report_id).update(reported_at=now)
        sent += 1
    return sent, failed


def export_usage(
    now: datetime | None = None, client: stripe.StripeClient | None = None
) -> ExportResult:
    """Claim new spend and send what is due. Does nothing until Stripe is configured."""
    if not is_enabled():
        return ExportResult(enabled=False)
    now = now or timezone.now()
    claimed = claim_usage(now, settings.STRIPE_METER_EVENT_NAME, settings.STRIPE_METER_UNIT)
    sent, failed = send_due_reports(now, client or stripe_client())
    return ExportResult(enabled=True, claimed=len(claimed), sent=sent, failed=failed)


# --- Reconciling --------------------------------------------------------------------


@dataclass(frozen=True)
class Reconciliation:
    tenant: Tenant
    ledger_amount: int
    due_units: int
    reported_units: int
    pending_units: int
    unclaimed_amount: int

    @property
    def difference(self) -> int:
        """Units Stripe should have that it has not accepted yet."""
        return self.due_units - self.reported_units


def reconcile(unit: str, since: datetime | None = None) -> list[Reconciliation]:
    """Per tenant, the ledger against what was reported in this unit. With `since`,
    ledger rows and reports from then on (a report's carried remainder may straddle it)."""
    size = UNIT_SIZES[unit]
    amount = _amount_expression(unit)
    entries = SpendEntry.objects.all()
    reports = MeterReport.objects.filter(unit=unit)
    if since is not None:
        entries = entries.filter(created_at__gte=since)
        reports = reports.filter(timestamp__gte=since)
    ledger = {
        row["tenant_id"]: row
        for row in entries.order_by()
        .values("tenant_id")
        .annotate(
            total=Sum(amount),
            unclaimed=Coalesce(Sum(amount, filter=Q(meter_report__isnull=True)), 0),
        )
    }
    sent = {
        row["tenant_id"]: row
        for row in reports.order_by()
        .values("tenant_id")
        .annotate(
            reported=Coalesce(Sum("value", filter=Q(status=MeterReport.Status.REPORTED)), 0),
            pending=Coalesce(Sum("value", filter=Q(status=MeterReport.Status.PENDING)), 0),
        )
    }
    results = []
    for tenant in Tenant.objects.filter(id__in=set(ledger) | set(sent)).order_by("name", "id"):
        spent, reported = ledger.get(tenant.pk, {}), sent.get(tenant.pk, {})
        total = spent.get("total") or 0
        results.append(
            Reconciliation(
                tenant=tenant,
                ledger_amount=total,
                due_units=total // size,
                reported_units=reported.get("reported", 0),
                pending_units=reported.get("pending", 0),
                unclaimed_amount=spent.get("unclaimed", 0),
            )
        )
    return results
