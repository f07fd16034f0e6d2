"""What the gateway decides for one call, before and after the upstream answers.

Plain synchronous functions over the budget engine; the async views call them in a
thread. Decision per call: suspended tenant or paused agent are refused; a stopped
budget refuses; the routing strategy picks a model; a degraded budget moves it one step
down its downgrade chain and removes the policy's disabled tools; then a hold for the
upper-bound cost, clamping max_tokens to what the budgets can pay for, and stepping
down to cheaper models while even the minimum does not fit.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

from budgets import engine, services
from budgets.errors import BudgetExceeded, InvalidRequest
from budgets.models import STATE_SEVERITY, ApiKey, Hold, PeriodState, ScopeType
from budgets.money import Prices, nanos_to_usd
from spend.models import SpendEntry

from .catalog import Catalog, ModelSpec, NoCapableModel, UnknownModel, UnknownStrategy, get_catalog

log = logging.getLogger(__name__)


class UnknownModelError(InvalidRequest):
    code = "unknown_model"


# --- Keys ---------------------------------------------------------------------------

_key_cache: dict[str, tuple[float, ApiKey]] = {}
_key_cache_lock = threading.Lock()


def cached_key(raw_key: str) -> ApiKey | None:
    """The key if this process checked it less than KEY_CACHE_SECONDS ago (no database)."""
    with _key_cache_lock:
        cached = _key_cache.get(raw_key)
    if cached is not None and cached[0] > time.monotonic():
        return cached[1]
    return None


def authenticate(raw_key: str) -> ApiKey:
    """The key, its agent and tenant, cached for KEY_CACHE_SECONDS per process."""
    cached = cached_key(raw_key)
    if cached is not None:
        return cached
    now = time.monotonic()
    key = services.authenticate_key(raw_key)
    if settings.KEY_CACHE_SECONDS:
        with _key_cache_lock:
            if len(_key_cache) > 10_000:
                _key_cache.clear()
            _key_cache[raw_key] = (now + settings.KEY_CACHE_SECONDS, key)
    return key


def forget_keys() -> None:
    with _key_cache_lock:
        _key_cache.clear()


# --- Requests -----------------------------------------------------------------------


def prompt_token_bound(body: dict[str, Any]) -> int:
    """An upper bound of the prompt's tokens without a tokenizer: the UTF-8 bytes of the
    messages and tools as JSON. A token is at least one byte, and the JSON punctuation
    around each message outweighs the few control tokens of the chat template."""
    payload = {"messages": body.get("messages"), "tools": body.get("tools")}
    try:
        return len(json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode())
    except UnicodeEncodeError:  # JSON may escape half of a surrogate pair alone
        raise InvalidRequest("the messages or tools hold text that is not valid Unicode") from None


def validate_chat_request(body: Any, *, messages_required: bool = True) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a string")
    messages = body.get("messages", [] if not messages_required else None)
    if not isinstance(messages, list) or (messages_required and not messages):
        raise InvalidRequest("'messages' must be a non-empty list")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(f"messages[{index}] must be an object with a 'role'")
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise InvalidRequest("'max_tokens' must be a positive integer")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise InvalidRequest("'stream' must be true or false")
    n = body.get("n")
    if n is not None and n != 1:
        # n completions cost up to n times max_tokens: more than the call's hold, which
        # keeps a budget from being overspent, is for.
        raise InvalidRequest("'n' must be 1 through the gateway (send one call per completion)")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise InvalidRequest("'tools' must be a list")
    return body


def required_capabilities(body: dict[str, Any]) -> frozenset[str]:
    needed = {"chat"}
    if body.get("tools"):
        needed.add("tools")
    for message in body.get("messages") or []:
        content = message.get("content")
        if isinstance(content, list) and any(
            isinstance(part, dict) and part.get("type") in ("image_url", "image")
            for part in content
        ):
            needed.add("vision")
    return frozenset(needed)


def _tool_name(tool: Any) -> str | None:
    if isinstance(tool, dict):
        function = tool.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return function["name"]
    return None


def remove_tools(body: dict[str, Any], disabled: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The body without the disabled tools, and the names actually removed."""
    tools = body.get("tools")
    if not disabled or not tools:
        return body, []
    kept = [t for t in tools if _tool_name(t) not in disabled]
    removed = [name for t in tools if (name := _tool_name(t)) in disabled]
    body = {**body, "tools": kept or None}
    if not kept:
        body.pop("tools")
        body.pop("tool_choice", None)
    return body, removed


# --- The decision -------------------------------------------------------------------


@dataclass
class CallPlan:
    """What governance decided for one upstream attempt."""

    request_id: str
    key: ApiKey
    hold: Hold
    model: ModelSpec
    requested_model: str
    body: dict[str, Any]
    input_bound: int
    scope: engine.BudgetScope
    downgraded_from: str | None = None
    removed_tools: list[str] = field(default_factory=list)

    @property
    def max_tokens(self) -> int:
        return self.hold.max_output_tokens


def strategy_for(key: ApiKey, scope: engine.BudgetScope) -> str:
    if key.agent.strategy:
        return key.agent.strategy
    by_specificity = {ScopeType.USER: 0, ScopeType.AGENT: 1, ScopeType.TENANT: 2}
    for period in sorted(scope.periods, key=lambda p: by_specificity[p.policy.scope_type]):
        if period.policy.strategy:
            return period.policy.strategy
    return get_catalog().default_strategy


def resolve_model(catalog: Catalog, name: str) -> ModelSpec:
    try:
        return catalog.resolve(name)
    except UnknownModel as exc:
        raise UnknownModelError(
            f"unknown model {name!r}; allowed: {', '.join(exc.allowed)}",
            {"allowed": list(exc.allowed)},
        ) from None


def plain_model(key: ApiKey, body: dict[str, Any], requested: ModelSpec) -> ModelSpec | None:
    """The model a plain call is sent to: the one the agent's strategy (or the catalog's
    default) picks for what the body needs. None when no strategy can pick one."""
    catalog = get_catalog()
    try:
        return catalog.choose(
            key.agent.strategy or catalog.default_strategy,
            requested.id,
            required_capabilities(body),
        )
    except (UnknownStrategy, NoCapableModel):
        return None


def asked_max_tokens(body: dict[str, Any], model: ModelSpec) -> int:
    """max_tokens as the body asks (the model's most when it does not), never more than
    the model allows: what a call holds for unless the budgets clamp it."""
    return min(body.get("max_tokens") or model.max_output_tokens, model.max_output_tokens)


@dataclass
class PlainCall:
    """The common call decided up to its hold, which one statement places: from a
    database thread (engine.place_plain_hold) or from the event loop (budgets.pgloop).
    `plan(...)` is then the call's plan."""

    key: ApiKey
    body: dict[str, Any]
    requested: ModelSpec
    request_id: str
    model: ModelSpec
    input_bound: int
    hold: engine.PlainHold

    def plan(self, scope: engine.BudgetScope, hold: Hold) -> CallPlan:
        return CallPlan(
            request_id=self.request_id,
            key=self.key,
            hold=hold,
            model=self.model,
            requested_model=self.requested.id,
            body=self.body,
            input_bound=self.input_bound,
            scope=scope,
        )


def _plain_call(
    key: ApiKey,
    body: dict[str, Any],
    requested: ModelSpec,
    *,
    request_id: str,
    user_key: str,
    input_tokens: int | None,
) -> PlainCall | None:
    """The common call on the model the strategy picks, all of max_tokens held. None
    where no plain plan can be made."""
    model = plain_model(key, body, requested)
    if model is None:
        return None  # the general decision answers, after the budget checks
    input_bound = prompt_token_bound(body) if input_tokens is None else input_tokens
    if input_bound >= model.context_window:
        return None
    hold = engine.plain_hold(
        key.agent.tenant,
        key.agent,
        user_key,
        request_id=request_id,
        model=model.id,
        prices=model.prices,
        input_tokens=input_bound,
        max_output_tokens=asked_max_tokens(body, model),
        policy_strategy_matters=not key.agent.strategy,
    )
    return PlainCall(key, body, requested, request_id, model, input_bound, hold)


def _plain_plan(
    key: ApiKey,
    body: dict[str, Any],
    requested: ModelSpec,
    *,
    request_id: str,
    user_key: str,
    input_tokens: int | None,
) -> tuple[engine.BudgetScope | None, CallPlan | None]:
    """The common call in one statement (engine.place_plain_hold): every budget below
    its soft cap (so no downgrade and no tools removed), none picking a strategy the
    agent does not override, and all of max_tokens affordable on the model the strategy
    picks. That is the plan the general decision below would make. Otherwise no plan,
    and the budgets as read (None where nothing was read) for the general decision."""
    if not engine.authorizes_in_one_statement():
        return None, None
    call = _plain_call(
        key, body, requested, request_id=request_id, user_key=user_key, input_tokens=input_tokens
    )
    if call is None:
        return None, None
    scope, hold = engine.place_plain_hold(call.hold)
    if hold is None:
        return scope, None
    return scope, call.plan(scope, hold)


def plain_call(
    key: ApiKey, body: dict[str, Any], *, request_id: str, user_key: str = ""
) -> PlainCall | None:
    """plan_call's common case up to the statement that holds: None where it does not
    apply (the general decision, plan_call, answers). Raises what plan_call would raise
    before reading the budgets (access, an unknown model, a bad request id)."""
    engine.check_access(key.agent.tenant, key.agent)
    requested = resolve_model(get_catalog(), body["model"])
    return _plain_call(
        key, body, requested, request_id=request_id, user_key=user_key, input_tokens=None
    )


def plan_call(
    key: ApiKey,
    body: dict[str, Any],
    *,
    request_id: str,
    user_key: str = "",
    force_model: str | None = None,
    skip_models: frozenset[str] = frozenset(),
    input_tokens: int | None = None,
    read: engine.PlainHold | None = None,
    rows: list | None = None,
) -> CallPlan:
    """Decide the model and max_tokens of one upstream attempt and hold its cost.
    `force_model` is a fallback after an upstream failure: no strategy, no downgrade.
    `read` and `rows`: a PlainCall's statement that placed no hold, and the budgets it
    read, which the general decision starts from."""
    tenant, agent = key.agent.tenant, key.agent
    engine.check_access(tenant, agent)
    catalog = get_catalog()
    requested = resolve_model(catalog, body["model"])
    scope = None
    if read is not None:
        scope = engine.scope_of(tenant, agent, user_key, read.now, rows)
    elif force_model is None and not skip_models:
        scope, plan = _plain_plan(
            key,
            body,
            requested,
            request_id=request_id,
            user_key=user_key,
            input_tokens=input_tokens,
        )
        if plan is not None:
            return plan
    if scope is None:
        scope = engine.state_of(tenant, agent, user_key)
    stopped = scope.stopped_period
    if stopped is not None:
        raise engine.budget_exceeded(
            stopped, f"the {stopped.policy.scope_type} budget {stopped.policy.scope_key} is used up"
        )
    downgraded_from = None
    body, removed = remove_tools(body, scope.disabled_tools)
    needed = required_capabilities(body)
    if force_model is not None:
        model = catalog.resolve(force_model)
    else:
        try:
            model = catalog.choose(strategy_for(key, scope), requested.id, needed)
        except (UnknownStrategy, NoCapableModel) as exc:
            raise InvalidRequest(str(exc)) from None
        if STATE_SEVERITY[scope.state] >= STATE_SEVERITY[PeriodState.DEGRADED]:
            cheaper = catalog.next_down(model.id, required_capabilities=needed)
            if cheaper is not None:
                downgraded_from, model = model.id, cheaper
    input_bound = prompt_token_bound(body) if input_tokens is None else input_tokens

    candidates = (
        [model]
        if force_model
        else [model, *catalog.downgrade_chain(model.id, required_capabilities=needed)]
    )
    candidates = [c for c in candidates if c.id not in skip_models] or candidates[:1]
    refusal: BudgetExceeded | None = None
    for candidate in candidates:
        if input_bound >= candidate.context_window:
            continue
        wanted = asked_max_tokens(body, candidate)
        try:
            hold = engine.authorize(
                scope,
                request_id=request_id,
                model=candidate.id,
                prices=candidate.prices,
                input_tokens=input_bound,
                max_output_tokens=wanted,
            )
        except BudgetExceeded as exc:
            refusal = exc
            continue
        if candidate.id != model.id:
            downgraded_from = downgraded_from or model.id
        return CallPlan(
            request_id=request_id,
            key=key,
            hold=hold,
            model=candidate,
            requested_model=requested.id,
            body=body,
            input_bound=input_bound,
            scope=scope,
            downgraded_from=downgraded_from,
            removed_tools=removed,
        )
    if refusal is None:
        raise InvalidRequest(
            f"the prompt (up to {input_bound} tokens) does not fit the context window of {model.id}"
        )
    raise refusal


def capture(
    plan: CallPlan,
    *,
    prompt_tokens: int,
    completion_tokens: int,
    usage_estimated: bool = False,
    latency_ms: int | None = None,
) -> SpendEntry:
    return engine.capture(
        plan.hold,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        usage_estimated=usage_estimated,
        latency_ms=latency_ms,
    )


def cost_of(plan: CallPlan, prompt_tokens: int, completion_tokens: int) -> int:
    """What capture() charges for these tokens: the hold's prices, so the reply's budget
    headers can be written before the ledger row is."""
    hold = plan.hold
    return Prices(hold.input_price_nanos, hold.output_price_nanos).cost_nanos(
        prompt_tokens, completion_tokens
    )


def void(plan: CallPlan) -> None:
    engine.void(plan.hold)


def governance_headers(plan: CallPlan, cost_nanos: int | None = None) -> dict[str, str]:
    """What governance did, for the response headers. Budget numbers are as of the call:
    the hold replaced by the actual cost when it is known."""
    headers = {
        "X-Request-Id": plan.request_id,
        "X-Governance-Model": plan.model.id,
        "X-Budget-State": plan.scope.state,
    }
    remaining = plan.scope.remaining_nanos
    if remaining is not None:
        if cost_nanos is not None:
            remaining = max(0, remaining + plan.hold.amount_nanos - cost_nanos)
        headers["X-Budget-Remaining-Usd"] = nanos_to_usd(remaining)
    else:
        headers["X-Budget-Remaining-Usd"] = "unlimited"
    if plan.downgraded_from:
        headers["X-Governance-Downgraded-From"] = plan.downgraded_from
    if plan.removed_tools:
        headers["X-Governance-Disabled-Tools"] = ",".join(plan.removed_tools)
    return headers
