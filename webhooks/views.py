"""The Stripe webhook endpoint: parse, call one service, answer."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from governance.http import status_for

from . import services


def _error(code: str, message: str, status: int, event_id: str = "") -> JsonResponse:
    body = {"error": {"code": code, "message": message}}
    if event_id:
        body["error"]["event"] = event_id
    return JsonResponse(body, status=status)


@csrf_exempt
def stripe_webhook(request: HttpRequest) -> JsonResponse:
    if request.method != "POST":
        response = _error("method_not_allowed", "POST Stripe events here", 405)
        response["Allow"] = "POST"
        return response
    try:
        receipt = services.receive(request.body, request.headers.get("Stripe-Signature"))
    except services.WebhookError as exc:
        return _error(
            exc.code, exc.message, status_for(exc.code), exc.event.stripe_id if exc.event else ""
        )
    event = receipt.event
    return JsonResponse(
        {
            "received": True,
            "id": event.stripe_id,
            "status": event.status,
            "duplicate": receipt.duplicate,
        }
    )
