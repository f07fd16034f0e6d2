"""Periodic work of the Stripe webhooks, as thin Celery tasks."""

from __future__ import annotations

from celery import shared_task

from . import services


@shared_task(name="webhooks.suspend_overdue_tenants", ignore_result=True)
def suspend_overdue_tenants() -> int:
    """Suspend tenants whose failed payment outlived PAYMENT_FAILED_GRACE_HOURS."""
    return services.suspend_overdue()
