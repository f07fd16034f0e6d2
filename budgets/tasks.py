"""Celery tasks of the budgets app: thin wrappers, idempotent and safe to run twice."""

from __future__ import annotations

from celery import shared_task

from . import engine


@shared_task(name="budgets.expire_holds", ignore_result=True)
def expire_holds() -> int:
    """Release holds past their expiry (a crashed worker's)."""
    return engine.expire_holds()


@shared_task(name="budgets.materialize_periods", ignore_result=True)
def materialize_periods() -> int:
    """Open the new window's period (and its reset event) of every enabled policy."""
    return engine.materialize_periods()
