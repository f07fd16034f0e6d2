"""The gateway's decision for a call, without HTTP: model, tools, max_tokens, hold."""

import json

import pytest

from budgets import services
from budgets.errors import AgentPaused, BudgetExceeded, InvalidRequest, SubscriptionInactive
from budgets.models import ScopeType, Tenant
from budgets.money import usd_to_nanos
from routing import gateway
from routing.catalog import get_catalog

SEARCH_TOOL = {"type": "function", "function": {"name": "web_search", "parameters": {}}}
CALC_TOOL = {"type": "function", "function": {"name": "calculator", "parameters": {}}}


@pytest.fixture
def key(invoice_bot):
    _, raw = services.issue_key(invoice_bot)
    return services.authenticate_key(raw)


def body(model="mistral-large-latest", text="Summarise this invoice.", **extra):
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def plan(key, request, request_id="req-1", **kwargs):
    return gateway.plan_call(key, request, request_id=request_id, **kwargs)


def test_an_active_budget_gets_the_requested_model(acme, key):
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("10"))
    decision = plan(key, body(max_tokens=500))
    assert decision.model.id == "mistral-large"
    assert decision.requested_model == "mistral-large"
    assert decision.max_tokens == 500
    assert decision.downgraded_from is None
    large = get_catalog().resolve("mistral-large")
    assert decision.hold.amount_nanos == large.prices.cost_nanos(decision.input_bound, 500)


def test_without_max_tokens_the_hold_is_for_the_models_maximum_output(acme, key):
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("10"))
    decision = plan(key, body())
    assert decision.max_tokens == get_catalog().resolve("mistral-large").max_output_tokens


def test_a_degraded_budget_downgrades_and_removes_disabled_tools(acme, key, spend):
    services.set_policy(
        acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("1"), disabled_tools=["web_search"]
    )
    spend(acme, usd_to_nanos("0.85"))
    decision = plan(key, body(tools=[SEARCH_TOOL, CALC_TOOL], tool_choice="auto", max_tokens=100))
    assert decision.scope.state == "degraded"
    assert decision.model.id == "mistral-small"
    assert decision.downgraded_from == "mistral-large"
    assert decision.removed_tools == ["web_search"]
    assert decision.body["tools"] == [CALC_TOOL]
    headers = gateway.governance_headers(decision)
    assert headers["X-Governance-Downgraded-From"] == "mistral-large"
    assert headers["X-Governance-Disabled-Tools"] == "web_search"
    assert headers["X-Budget-State"] == "degraded"


def test_removing_every_tool_drops_tool_choice(acme, key, spend):
    services.set_policy(
        acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("1"), disabled_tools=["web_search"]
    )
    spend(acme, usd_to_nanos("0.9"))
    decision = plan(key, body(tools=[SEARCH_TOOL], tool_choice="any", max_tokens=10))
    assert "tools" not in decision.body and "tool_choice" not in decision.body


def test_tools_stay_while_the_budget_is_not_degraded(acme, key):
    services.set_policy(
        acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("1"), disabled_tools=["web_search"]
    )
    decision = plan(key, body(tools=[SEARCH_TOOL], max_tokens=10))
    assert decision.body["tools"] == [SEARCH_TOOL]
    assert decision.removed_tools == []


def test_max_tokens_is_clamped_to_what_is_left(acme, key):
    services.set_policy(
        acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("0.001"), soft_cap="1", warn_at="1"
    )
    decision = plan(key, body(max_tokens=100_000))
    large = get_catalog().resolve("mistral-large")
    left = usd_to_nanos("0.001") - decision.input_bound * large.prices.input_nanos
    assert decision.model.id == "mistral-large"
    assert decision.max_tokens == left // large.prices.output_nanos < 100_000


def test_it_steps_down_to_a_cheaper_model_when_even_the_minimum_does_not_fit(acme, key):
    large = get_catalog().resolve("mistral-large")
    request = body(max_tokens=1000)
    bound = gateway.prompt_token_bound(request)
    # Enough for the prompt and 10 output tokens on large: below MIN_OUTPUT_TOKENS (16).
    limit = large.prices.cost_nanos(bound, 10)
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=limit, warn_at="1", soft_cap="1")
    decision = plan(key, request)
    assert decision.model.id == "mistral-small"
    assert decision.downgraded_from == "mistral-large"
    assert decision.max_tokens >= 16


def test_it_refuses_when_no_model_fits(acme, key):
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=10, warn_at="1", soft_cap="1")
    with pytest.raises(BudgetExceeded) as refused:
        plan(key, body(max_tokens=1000))
    assert refused.value.scope_type == "tenant"


def test_a_stopped_budget_refuses_before_anything_is_held(acme, key, spend):
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("0.01"))
    spend(acme, usd_to_nanos("0.01"))
    with pytest.raises(BudgetExceeded, match="used up") as refused:
        plan(key, body())
    assert refused.value.resets_at is not None


def test_suspended_and_paused_are_refused(acme, key, invoice_bot):
    services.set_agent_paused(invoice_bot, True)
    key.agent.paused = True
    with pytest.raises(AgentPaused):
        plan(key, body())
    Tenant.objects.filter(pk=acme.pk).update(status="suspended")
    key.agent.tenant.status = "suspended"
    with pytest.raises(SubscriptionInactive):
        plan(key, body())


def test_an_unknown_model_lists_the_allowed_ones(acme, key):
    with pytest.raises(gateway.UnknownModelError, match="unknown model 'gpt-4'") as refused:
        plan(key, body(model="gpt-4"))
    assert "mistral-small-latest" in refused.value.details["allowed"]


def test_cost_optimized_strategy_picks_the_cheapest_capable_model(acme, key):
    key.agent.strategy = "cost-optimized"
    key.agent.save()
    assert plan(key, body()).model.id == "ministral-3b"
    assert plan(key, body(tools=[CALC_TOOL]), request_id="r2").model.supports({"tools"})


def test_a_policy_strategy_applies_when_the_agent_has_none(acme, key):
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("10"))
    policy = acme.policies.get()
    policy.strategy = "quality"
    policy.save()
    assert plan(key, body(model="ministral-3b-latest")).model.id == "mistral-large"


def test_a_vision_request_is_never_downgraded_to_a_text_model(acme, key, spend):
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("1"))
    spend(acme, usd_to_nanos("0.85"))
    image = {
        "role": "user",
        "content": [{"type": "image_url", "image_url": "data:image/png;base64,AAAA"}],
    }
    decision = plan(key, {"model": "mistral-large-latest", "messages": [image], "max_tokens": 10})
    assert decision.model.supports({"vision"})


@pytest.mark.parametrize(
    ("request_body", "problem"),
    [
        ([], "JSON object"),
        ({"messages": [{"role": "user", "content": "x"}]}, "'model' is required"),
        ({"model": "m"}, "'messages' must be a non-empty list"),
        ({"model": "m", "messages": []}, "'messages' must be a non-empty list"),
        ({"model": "m", "messages": ["hi"]}, "messages\\[0\\]"),
        ({"model": "m", "messages": [{"role": "user"}], "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "messages": [{"role": "user"}], "max_tokens": "10"}, "max_tokens"),
        ({"model": "m", "messages": [{"role": "user"}], "max_tokens": True}, "max_tokens"),
        ({"model": "m", "messages": [{"role": "user"}], "stream": "yes"}, "stream"),
        ({"model": "m", "messages": [{"role": "user"}], "tools": {}}, "tools"),
    ],
)
def test_it_validates_requests(request_body, problem):
    with pytest.raises(InvalidRequest, match=problem):
        gateway.validate_chat_request(request_body)


def test_the_prompt_bound_covers_every_byte():
    request = body(text="héllo wörld " * 50, tools=[SEARCH_TOOL])
    texts = json.dumps(request["messages"], ensure_ascii=False) + json.dumps(request["tools"])
    assert gateway.prompt_token_bound(request) >= len(texts.encode()) - 20
