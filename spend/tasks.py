"""Celery tasks of the spend app: thin wrappers around plain functions."""

from __future__ import annotations

from celery import shared_task

from . import rollups, spikes, stripe_export


@shared_task(name="spend.report_usage_to_stripe", ignore_result=True)
def report_usage_to_stripe() -> dict:
    """Report captured spend to Stripe meter events (off until Stripe is configured)."""
    result = stripe_export.export_usage()
    return {
        "enabled": result.enabled,
        "claimed": result.claimed,
        "sent": result.sent,
        "failed": result.failed,
    }


@shared_task(name="spend.rollup_hourly", ignore_result=True)
def rollup_hourly() -> int:
    """Recompute the recent hourly spend buckets from the ledger."""
    return rollups.rollup_hours()


@shared_task(name="spend.detect_spikes", ignore_result=True)
def detect_spikes() -> int:
    """Store this hour's spikes and pause runaway agents whose policy says so."""
    return len(spikes.detect())
