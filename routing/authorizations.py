"""The authorization API, for agents that call Mistral themselves: authorize before the
call, capture the usage after it, or void. The same decisions as the gateway (one
plan_call), idempotent by request id, and a key sees only its own tenant's holds."""

from __future__ import annotations

import re
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from budgets import engine
from budgets.errors import GovernanceError, HoldNotFound, InvalidRequest
from budgets.models import Hold
from budgets.money import nanos_to_usd
from spend.models import SpendEntry

from . import gateway
from .catalog import get_catalog
from .views import bearer_key, governance_error, in_thread, read_json

REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,100}$")


def _non_negative_int(body: dict[str, Any], name: str, required: bool = True) -> int | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequest(
            f"'{name}' must be a non-negative integer", {"fields": {name: ["non-negative integer"]}}
        )
    return value


def _hold_json(hold: Hold, plan: gateway.CallPlan | None = None) -> dict[str, Any]:
    data = {
        "id": hold.request_id,
        "status": hold.status,
        "model": hold.model,
        "max_tokens": hold.max_output_tokens,
        "input_tokens": hold.input_tokens,
        "hold_usd": nanos_to_usd(hold.amount_nanos),
        "expires_at": hold.expires_at.isoformat(),
    }
    if plan is not None:
        data.update(
            requested_model=plan.requested_model,
            downgraded_from=plan.downgraded_from,
            disabled_tools=plan.removed_tools,
            budget_state=plan.scope.state,
            remaining_usd=None
            if plan.scope.remaining_nanos is None
            else nanos_to_usd(plan.scope.remaining_nanos),
        )
    return data


def _entry_json(entry: SpendEntry) -> dict[str, Any]:
    return {
        "id": entry.request_id,
        "status": "captured",
        "model": entry.model_used,
        "prompt_tokens": entry.prompt_tokens,
        "completion_tokens": entry.completion_tokens,
        "cost_usd": nanos_to_usd(entry.cost_nanos),
        "hold_usd": nanos_to_usd(entry.held_nanos),
        "over_hold": entry.over_hold,
    }


def _authorize(raw_key: str, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The hold as JSON, and whether this call created it."""
    key = gateway.authenticate(raw_key)
    request_id = body.get("request_id")
    if not isinstance(request_id, str) or not REQUEST_ID.match(request_id):
        raise InvalidRequest("'request_id' must be 1-100 letters, digits or . _ : -")
    input_tokens = _non_negative_int(body, "input_tokens", required=not body.get("messages"))
    user_key = body.get("user") or ""
    if not isinstance(user_key, str):
        raise InvalidRequest("'user' must be a string")
    existing = Hold.objects.filter(request_id=request_id, tenant=key.agent.tenant).first()
    if existing is not None:
        return _hold_json(existing), False
    plan = gateway.plan_call(
        key, body, request_id=request_id, user_key=user_key.strip(), input_tokens=input_tokens
    )
    return _hold_json(plan.hold, plan), True


def _own_hold(raw_key: str, request_id: str) -> Hold:
    key = gateway.authenticate(raw_key)
    hold = Hold.objects.filter(request_id=request_id, tenant=key.agent.tenant).first()
    if hold is None:
        # Another tenant's hold is as unknown as a missing one.
        raise HoldNotFound(f"no authorization {request_id!r}")
    return hold


def _capture(raw_key: str, request_id: str, body: dict[str, Any]) -> dict[str, Any]:
    hold = _own_hold(raw_key, request_id)
    prompt_tokens = _non_negative_int(body, "prompt_tokens")
    completion_tokens = _non_negative_int(body, "completion_tokens")
    model = body.get("model") or hold.model
    if not isinstance(model, str):
        raise InvalidRequest("'model' must be a string")
    spec = gateway.resolve_model(get_catalog(), model)
    prices = None if spec.id == hold.model else spec.prices
    entry = engine.capture(
        hold,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        model=spec.id,
        prices=prices,
    )
    return _entry_json(entry)


def _void(raw_key: str, request_id: str) -> dict[str, Any]:
    return _hold_json(engine.void(_own_hold(raw_key, request_id)))


async def _respond(request: HttpRequest, work, *args) -> HttpResponse:
    request_id = args[0] if args and isinstance(args[0], str) else ""
    if request.method != "POST":
        return JsonResponse(
            {"object": "error", "message": "use POST", "code": "method_not_allowed"}, status=405
        )
    try:
        result = await in_thread(work)(bearer_key(request), *args)
    except GovernanceError as exc:
        return governance_error(exc, request_id)
    return JsonResponse(result)


@csrf_exempt
async def authorize(request: HttpRequest) -> HttpResponse:
    if request.method != "POST":
        return JsonResponse(
            {"object": "error", "message": "use POST", "code": "method_not_allowed"}, status=405
        )
    try:
        raw_key = bearer_key(request)
        body = gateway.validate_chat_request(read_json(request), messages_required=False)
        result, created = await in_thread(_authorize)(raw_key, body)
    except GovernanceError as exc:
        return governance_error(exc, "")
    return JsonResponse(result, status=201 if created else 200)


@csrf_exempt
async def capture(request: HttpRequest, request_id: str) -> HttpResponse:
    try:
        body = read_json(request)
    except GovernanceError as exc:
        return governance_error(exc, request_id)
    return await _respond(request, lambda raw, rid: _capture(raw, rid, body), request_id)


@csrf_exempt
async def void(request: HttpRequest, request_id: str) -> HttpResponse:
    return await _respond(request, _void, request_id)
