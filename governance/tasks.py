"""Celery tasks of the governance app: thin wrappers around plain functions."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime

from celery import shared_task

from . import alerts


@shared_task(name="governance.deliver_alerts", ignore_result=True)
def deliver_alerts(now: datetime | None = None) -> dict[str, int]:
    """Queue alerts for new budget events and spikes, then send those that are due."""
    return asdict(alerts.deliver(now))
