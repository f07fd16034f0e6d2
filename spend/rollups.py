"""Hourly spend buckets per tenant, agent and model, recomputed from the ledger."""

from __future__ import annotations

from datetime import datetime, timedelta

from django.db import connection, transaction
from django.db.models import Count, Sum
from django.db.models.functions import TruncHour
from django.utils import timezone

from .models import HourlyRollup, SpendEntry

# Recomputing a few hours back covers captures that land late (long streams).
DEFAULT_LOOKBACK = timedelta(hours=3)
_ROLLUP_LOCK = 0x5350454E44  # "SPEND": one rollup at a time on PostgreSQL


def rollup_hours(now: datetime | None = None, lookback: timedelta = DEFAULT_LOOKBACK) -> int:
    """Recompute every bucket from the start of the hour `lookback` ago. The same ledger
    gives the same buckets, so a second run (or two at once, serialized by a lock)
    changes nothing. Returns the number of buckets written."""
    now = now or timezone.now()
    start = (now - lookback).replace(minute=0, second=0, microsecond=0)
    buckets = (
        SpendEntry.objects.filter(created_at__gte=start)
        .annotate(bucket=TruncHour("created_at"))
        .values("bucket", "tenant_id", "agent_id", "model_used")
        .annotate(
            calls=Count("id"),
            prompt=Sum("prompt_tokens"),
            completion=Sum("completion_tokens"),
            cost=Sum("cost_nanos"),
        )
        .order_by()
    )
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_ROLLUP_LOCK])
        HourlyRollup.objects.filter(hour__gte=start).delete()
        rows = HourlyRollup.objects.bulk_create(
            [
                HourlyRollup(
                    hour=b["bucket"],
                    tenant_id=b["tenant_id"],
                    agent_id=b["agent_id"],
                    model=b["model_used"],
                    calls=b["calls"],
                    prompt_tokens=b["prompt"],
                    completion_tokens=b["completion"],
                    cost_nanos=b["cost"],
                )
                for b in buckets
            ],
            batch_size=5000,
        )
    return len(rows)
