"""Where service errors become HTTP statuses: the one table for every interface."""

from __future__ import annotations

from budgets.errors import BudgetExceeded, GovernanceError
from budgets.money import nanos_to_usd

STATUS_BY_CODE = {
    "invalid_request": 400,
    "unknown_model": 400,
    "invalid_api_key": 401,
    "not_authenticated": 401,
    "authentication_failed": 401,
    "malformed_json": 400,
    "not_acceptable": 406,
    "throttled": 429,
    "budget_exceeded": 402,
    "subscription_inactive": 403,
    "agent_paused": 403,
    "forbidden": 403,
    "hold_not_found": 404,
    "not_found": 404,
    "method_not_allowed": 405,
    "hold_conflict": 409,
    "request_too_large": 413,
    "unsupported_media_type": 415,
    "upstream_unavailable": 502,
    "internal_error": 500,
    # Stripe webhooks: a 5xx makes Stripe retry the delivery; a 4xx does not.
    "invalid_signature": 400,
    "invalid_payload": 400,
    "event_rejected": 400,
    "webhook_error": 400,
    "handler_failed": 500,
    "webhooks_not_configured": 503,
}


def status_for(code: str) -> int:
    return STATUS_BY_CODE.get(code, 400)


def error_details(error: GovernanceError) -> dict:
    """The details of an error for a JSON body; money in USD strings, times in ISO 8601."""
    details = dict(error.details)
    if isinstance(error, BudgetExceeded):
        details.update(
            scope_type=error.scope_type,
            scope_key=error.scope_key,
            spent_usd=nanos_to_usd(error.spent_nanos),
            held_usd=nanos_to_usd(error.held_nanos),
            limit_usd=nanos_to_usd(error.limit_nanos),
            resets_at=error.resets_at.isoformat() if error.resets_at else None,
        )
    return details
