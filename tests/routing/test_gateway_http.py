"""The gateway over real HTTP: agents built on the official mistralai and openai SDKs,
a live ASGI server, and the Mistral simulator as upstream."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx2
import openai
import pytest
from mistralai.client import Mistral
from mistralai.client.errors import SDKError

from budgets import services
from budgets.models import BudgetPeriod, Hold, HoldStatus, ScopeType
from budgets.money import nanos_to_usd, usd_to_nanos
from routing import upstream
from routing.catalog import get_catalog
from routing.views import wait_for_charges
from spend.models import SpendEntry

MESSAGES = [{"role": "user", "content": "Summarise the invoice from Acme for March."}]


def settle(response):
    """An httpx2 response hook: a plain call is charged just after its reply is sent,
    so a test that reads the ledger next waits for that first."""
    wait_for_charges()


def mistral(url, key, **options):
    client = httpx2.Client(event_hooks={"response": [settle]}, timeout=120)
    return Mistral(api_key=key, server_url=url, client=client, **options)


def chat(gateway_url, key, **body):
    """POST a chat completion with the agent's key; body fields default to a small call."""
    response = httpx2.post(
        f"{gateway_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "mistral-small-latest", "messages": MESSAGES, **body},
        timeout=30,
    )
    wait_for_charges()
    return response


def upstream_requests(sim_url):
    return httpx2.get(f"{sim_url}/_sim/requests").json()["data"]


def assert_charged_exactly(entry: SpendEntry, model_id: str):
    prices = get_catalog().resolve(model_id).prices
    assert entry.model_used == model_id
    assert entry.cost_nanos == prices.cost_nanos(entry.prompt_tokens, entry.completion_tokens)
    assert not entry.usage_estimated


def test_a_plain_call_with_the_mistral_sdk_is_charged_exactly(
    gateway_url, simulator, acme, acme_key
):
    simulator()
    response = mistral(gateway_url, acme_key).chat.complete(
        model="mistral-small-latest", messages=MESSAGES, max_tokens=200
    )
    entry = SpendEntry.objects.get()
    assert response.usage.prompt_tokens == entry.prompt_tokens
    assert response.usage.completion_tokens == entry.completion_tokens
    assert response.choices[0].message.content
    assert_charged_exactly(entry, "mistral-small")
    period = BudgetPeriod.objects.get(policy__tenant=acme)
    assert (period.spent_nanos, period.held_nanos) == (entry.cost_nanos, 0)


def test_a_streaming_call_with_the_mistral_sdk_is_charged_exactly(gateway_url, simulator, acme_key):
    simulator()
    chunks = list(
        mistral(gateway_url, acme_key).chat.stream(
            model="mistral-small-latest", messages=MESSAGES, max_tokens=300
        )
    )
    usage = chunks[-1].data.usage
    assert usage is not None
    text = "".join(c.data.choices[0].delta.content or "" for c in chunks if c.data.choices)
    assert text
    entry = SpendEntry.objects.get()
    assert (entry.prompt_tokens, entry.completion_tokens) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    assert_charged_exactly(entry, "mistral-small")
    assert not Hold.objects.filter(status=HoldStatus.HELD).exists()


def test_the_openai_sdk_works_plain_and_streaming(gateway_url, simulator, acme_key):
    simulator()
    client = openai.OpenAI(api_key=acme_key, base_url=f"{gateway_url}/v1", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="ministral-8b-latest", messages=MESSAGES, max_tokens=50
    )
    completion = raw.parse()
    wait_for_charges()
    assert completion.choices[0].message.content
    assert raw.headers["X-Governance-Model"] == "ministral-8b"
    assert raw.headers["X-Budget-State"] == "active"
    assert raw.headers["X-Request-Id"].startswith("gw-")
    stream = client.chat.completions.create(
        model="ministral-8b-latest", messages=MESSAGES, max_tokens=50, stream=True
    )
    pieces = [chunk.choices[0].delta.content for chunk in stream if chunk.choices]
    assert "".join(p for p in pieces if p)
    assert SpendEntry.objects.count() == 2
    for entry in SpendEntry.objects.all():
        assert_charged_exactly(entry, "ministral-8b")


def test_the_openai_sdk_gets_refusals_as_its_own_errors(
    gateway_url, simulator, acme, acme_key, spend
):
    simulator()
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("1"))
    spend(acme, usd_to_nanos("1"))
    client = openai.OpenAI(api_key=acme_key, base_url=f"{gateway_url}/v1", max_retries=0)
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model="ministral-8b-latest", messages=MESSAGES)
    assert refused.value.status_code == 402
    assert refused.value.code == "budget_exceeded"
    assert refused.value.body["details"]["scope_type"] == "tenant"
    bad_key = openai.OpenAI(api_key="sgk_nope_nope", base_url=f"{gateway_url}/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.chat.completions.create(model="ministral-8b-latest", messages=MESSAGES)


def test_every_response_says_what_governance_did(gateway_url, simulator, acme, acme_key):
    simulator()
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("5"))
    response = chat(gateway_url, acme_key, max_tokens=20)
    assert response.status_code == 200
    entry = SpendEntry.objects.get()
    assert response.headers["X-Request-Id"] == entry.request_id
    assert response.headers["X-Governance-Model"] == "mistral-small"
    assert response.headers["X-Budget-State"] == "active"
    assert response.headers["X-Budget-Remaining-Usd"] == nanos_to_usd(
        usd_to_nanos("5") - entry.cost_nanos
    )
    assert "X-Governance-Downgraded-From" not in response.headers


def test_the_soft_cap_downgrades_and_removes_disabled_tools(
    gateway_url, simulator, acme, acme_key, spend
):
    sim = simulator()
    services.set_policy(
        acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("1"), disabled_tools=["web_search"]
    )
    spend(acme, usd_to_nanos("0.85"))
    tools = [
        {"type": "function", "function": {"name": "web_search", "parameters": {"type": "object"}}},
        {
            "type": "function",
            "function": {"name": "lookup_invoice", "parameters": {"type": "object"}},
        },
    ]
    response = chat(gateway_url, acme_key, model="mistral-large-latest", tools=tools, max_tokens=30)
    assert response.status_code == 200, response.text
    assert response.headers["X-Governance-Model"] == "mistral-small"
    assert response.headers["X-Governance-Downgraded-From"] == "mistral-large"
    assert response.headers["X-Governance-Disabled-Tools"] == "web_search"
    assert response.headers["X-Budget-State"] == "degraded"
    sent = upstream_requests(sim)[-1]["body"]
    assert sent["model"] == "mistral-small-latest"
    assert [t["function"]["name"] for t in sent["tools"]] == ["lookup_invoice"]
    assert SpendEntry.objects.exclude(request_id="earlier-call").get().model_used == "mistral-small"


def test_max_tokens_is_clamped_to_what_the_budget_can_pay(gateway_url, simulator, acme, acme_key):
    sim = simulator()
    services.set_policy(
        acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("0.001"), warn_at="1", soft_cap="1"
    )
    response = chat(gateway_url, acme_key, max_tokens=100_000)
    assert response.status_code == 200, response.text
    (sent,) = upstream_requests(sim)  # only the clamped request (none prepared unclamped)
    hold = Hold.objects.get()
    assert sent["body"]["max_tokens"] == hold.max_output_tokens < 100_000
    period = BudgetPeriod.objects.get(policy__tenant=acme)
    assert period.spent_nanos <= period.hard_nanos


def test_the_hard_cap_refuses_with_when_it_resets(gateway_url, simulator, acme, acme_key, spend):
    simulator()
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("1"))
    spend(acme, usd_to_nanos("1"))
    with pytest.raises(SDKError) as refused:
        mistral(gateway_url, acme_key).chat.complete(
            model="mistral-small-latest", messages=MESSAGES
        )
    assert refused.value.status_code == 402
    body = json.loads(refused.value.body)
    assert body["code"] == "budget_exceeded"
    assert body["details"]["scope_type"] == "tenant"
    assert body["details"]["limit_usd"] == "1"
    assert body["details"]["spent_usd"] == "1"
    assert body["details"]["resets_at"].endswith("+00:00")
    assert SpendEntry.objects.count() == 1  # only the earlier call


def test_a_refusal_and_an_upstream_failure_still_say_what_governance_did(
    gateway_url, simulator, settings, acme, invoice_bot, acme_key, spend
):
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("1"))
    spend(acme, usd_to_nanos("0.75"))
    # The upstream refuses (4xx): the plan's model, its budget, the hold given back.
    simulator(fail_models={"mistral-small-latest": 422})
    failed = chat(gateway_url, acme_key, max_tokens=20)
    assert failed.status_code == 422
    assert failed.headers["X-Governance-Model"] == "mistral-small"
    assert failed.headers["X-Budget-State"] == "warned"  # past 75%
    assert failed.headers["X-Budget-Remaining-Usd"] == "0.25"
    # Nothing answers (timeout): the same, with 502.
    settings.MISTRAL_TIMEOUT_MS = 300
    simulator(latency_ms=2000)
    timed_out = chat(gateway_url, acme_key, max_tokens=20)
    assert timed_out.status_code == 502
    assert timed_out.headers["X-Budget-Remaining-Usd"] == "0.25"
    assert "X-Governance-Model" in timed_out.headers
    # The budget refuses (402): the model asked for, the budget stopped, nothing left.
    spend(acme, usd_to_nanos("0.25"), request_id="later-call")
    refused = chat(gateway_url, acme_key, max_tokens=20)
    assert refused.status_code == 402
    assert refused.headers["X-Governance-Model"] == "mistral-small"
    assert refused.headers["X-Budget-State"] == "stopped"
    assert refused.headers["X-Budget-Remaining-Usd"] == "0"
    # Refused before any budget is read: the model asked for, and the request id.
    services.set_agent_paused(invoice_bot, True, reason="runaway")
    paused = chat(gateway_url, acme_key)
    assert paused.status_code == 403 and paused.headers["X-Governance-Model"] == "mistral-small"
    assert "X-Budget-State" not in paused.headers and paused.headers["X-Request-Id"]


def test_an_upstream_500_falls_back_to_the_next_model(gateway_url, simulator, acme_key, caplog):
    simulator(fail_models={"mistral-large-latest": 500})
    caplog.set_level(logging.INFO, logger="governance.gateway")
    response = chat(gateway_url, acme_key, model="mistral-large-latest", max_tokens=20)
    assert response.status_code == 200, response.text
    fallback = get_catalog().fallbacks("mistral-large")[0].id
    assert response.headers["X-Governance-Model"] == fallback
    entry = SpendEntry.objects.get()
    assert_charged_exactly(entry, fallback)
    statuses = sorted(Hold.objects.values_list("status", flat=True))
    assert statuses == ["captured", "voided"]
    # The decision is logged under the id the agent was given (the fallback's).
    (served,) = [r for r in caplog.records if getattr(r, "decision", None) == "allowed"]
    assert served.request_id == response.headers["X-Request-Id"]
    assert served.cost_usd == nanos_to_usd(entry.cost_nanos)


def test_a_402_for_a_call_too_big_for_what_is_left_gives_the_budgets_own_state(
    gateway_url, simulator, acme, acme_key
):
    simulator()
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("0.001"))
    big = [{"role": "user", "content": "x" * 100_000}]
    refused = chat(gateway_url, acme_key, messages=big, max_tokens=5)
    assert refused.status_code == 402
    assert refused.headers["X-Budget-State"] == "active"  # usable, just not for this
    assert refused.headers["X-Budget-Remaining-Usd"] == "0.001"
    assert chat(gateway_url, acme_key, max_tokens=5).status_code == 200


def test_a_fallbacks_4xx_carries_the_fallbacks_headers(gateway_url, simulator, acme_key):
    simulator(fail_models={"mistral-small-latest": 500, "ministral-8b-latest": 422})
    response = chat(gateway_url, acme_key, max_tokens=20)
    assert response.status_code == 422
    assert response.headers["X-Governance-Model"] == "ministral-8b"


def test_nan_and_infinity_are_not_json(gateway_url, simulator, acme_key):
    simulator()
    response = httpx2.post(
        f"{gateway_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {acme_key}", "Content-Type": "application/json"},
        content=b'{"model": "mistral-small-latest", "messages": [], "temperature": NaN}',
        timeout=30,
    )
    assert response.status_code == 400
    assert "NaN is not a JSON number" in response.json()["message"]


def test_fallbacks_follow_the_requested_models_chain_in_order(gateway_url, simulator, acme_key):
    """mistral-small falls back to ministral-8b, then mistral-medium: when ministral-8b
    fails too, the call goes on along mistral-small's chain, not ministral-8b's."""
    sim = simulator(fail_models={"mistral-small-latest": 500, "ministral-8b-latest": 500})
    response = chat(gateway_url, acme_key, model="mistral-small-latest", max_tokens=20)
    assert response.status_code == 200, response.text
    chain = [m.id for m in get_catalog().fallbacks("mistral-small")]
    assert chain[:2] == ["ministral-8b", "mistral-medium"]
    sent = [get_catalog().resolve(r["body"]["model"]).id for r in upstream_requests(sim)]
    assert sent == ["mistral-small", "ministral-8b", "mistral-medium"]
    assert response.headers["X-Governance-Model"] == "mistral-medium"
    request_ids = sorted(Hold.objects.values_list("request_id", flat=True))
    base = request_ids[0]
    assert request_ids == [base, f"{base}.1", f"{base}.2"]  # not nested: .1.2


def test_an_upstream_timeout_answers_502_and_charges_nothing(
    gateway_url, simulator, settings, acme, acme_key
):
    settings.MISTRAL_TIMEOUT_MS = 300
    simulator(latency_ms=2000)
    response = chat(gateway_url, acme_key, model="ministral-3b-latest", max_tokens=20)
    assert response.status_code == 502
    assert response.json()["code"] == "upstream_unavailable"
    assert not SpendEntry.objects.exists()
    assert set(Hold.objects.values_list("status", flat=True)) == {"voided"}
    assert BudgetPeriod.objects.get(policy__tenant=acme).held_nanos == 0


def test_an_upstream_4xx_is_passed_through_and_charges_nothing(gateway_url, simulator, acme_key):
    from routing.simulator import error_body

    simulator(fail_models={"mistral-small-latest": 422})
    response = chat(gateway_url, acme_key, max_tokens=20)
    assert response.status_code == 422
    assert response.json() == error_body(422)  # the upstream's own message and shape
    assert not SpendEntry.objects.exists()
    assert set(Hold.objects.values_list("status", flat=True)) == {"voided"}


def test_unknown_request_fields_reach_the_upstream_unchanged(gateway_url, simulator, acme_key):
    sim = simulator()
    response = chat(
        gateway_url, acme_key, max_tokens=20, temperature=0.3, experimental_feature={"level": 2}
    )
    assert response.status_code == 200, response.text
    sent = upstream_requests(sim)[-1]["body"]
    assert sent["experimental_feature"] == {"level": 2}
    assert sent["temperature"] == 0.3


def test_unknown_fields_inside_known_ones_reach_the_upstream_unchanged(
    gateway_url, simulator, acme_key
):
    """The SDK's models keep only the fields they know, at every level."""
    sim = simulator()
    messages = [{"role": "user", "content": "Hello", "x_new": {"a": 1}}]
    tools = [
        {
            "type": "function",
            "function": {"name": "lookup", "parameters": {"type": "object"}, "x_tool": True},
        }
    ]
    response = chat(
        gateway_url,
        acme_key,
        messages=messages,
        tools=tools,
        response_format={"type": "json_object", "x_extra": "kept"},
        max_tokens=20,
    )
    assert response.status_code == 200, response.text
    sent = upstream_requests(sim)[-1]["body"]
    assert sent["messages"] == messages
    assert sent["tools"] == tools
    assert sent["response_format"] == {"type": "json_object", "x_extra": "kept"}
    assert sent["max_tokens"] == 20 and sent["stream"] is False  # ours and the SDK's


@pytest.mark.parametrize(
    ("headers", "body", "status", "code"),
    [
        ({}, {"model": "mistral-small-latest", "messages": MESSAGES}, 401, "invalid_api_key"),
        (
            {"Authorization": "Bearer sgk_nope_nope"},
            {"model": "m", "messages": MESSAGES},
            401,
            "invalid_api_key",
        ),
        (
            {"Authorization": "Basic abc"},
            {"model": "m", "messages": MESSAGES},
            401,
            "invalid_api_key",
        ),
        (None, b"{not json", 400, "invalid_request"),
        (None, {"model": "gpt-4o", "messages": MESSAGES}, 400, "unknown_model"),
        (None, {"model": "mistral-small-latest"}, 400, "invalid_request"),
        (
            None,
            {"model": "mistral-small-latest", "messages": MESSAGES, "max_tokens": -5},
            400,
            "invalid_request",
        ),
        (  # half a surrogate pair, escaped: valid JSON, not valid Unicode
            None,
            b'{"model": "mistral-small-latest", '
            b'"messages": [{"role": "user", "content": "\\ud800"}]}',
            400,
            "invalid_request",
        ),
        (  # n completions would cost n times what the hold covers
            None,
            {"model": "mistral-small-latest", "messages": MESSAGES, "n": 3},
            400,
            "invalid_request",
        ),
    ],
)
def test_bad_requests_get_clear_errors(
    gateway_url, simulator, acme_key, headers, body, status, code
):
    simulator()
    headers = {"Authorization": f"Bearer {acme_key}"} if headers is None else headers
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx2.post(
        f"{gateway_url}/v1/chat/completions",
        headers={**headers, "Content-Type": "application/json"},
        content=content,
    )
    assert response.status_code == status
    assert response.json()["code"] == code
    assert response.json()["message"]
    assert not Hold.objects.exists()


def test_an_unknown_model_lists_the_allowed_ones(gateway_url, simulator, acme_key):
    simulator()
    response = chat(gateway_url, acme_key, model="gpt-4o")
    assert "mistral-small-latest" in response.json()["details"]["allowed"]
    assert "mistral-small-latest" in response.json()["message"]


def test_an_oversized_body_is_refused_with_413(gateway_url, simulator, settings, acme_key):
    simulator()
    settings.GATEWAY_MAX_BODY_BYTES = 10_000
    response = chat(gateway_url, acme_key, messages=[{"role": "user", "content": "x" * 20_000}])
    assert response.status_code == 413
    assert response.json()["code"] == "request_too_large"


def test_an_oversized_body_without_a_length_is_refused_without_keeping_it(
    gateway_url, simulator, settings, acme_key
):
    """A chunked body has no Content-Length to check first: the gateway's ASGI handler
    counts what arrives and keeps nothing past the limit."""
    simulator()
    settings.GATEWAY_MAX_BODY_BYTES = 10_000
    body = json.dumps(
        {"model": "mistral-small-latest", "messages": [{"role": "user", "content": "x" * 50_000}]}
    ).encode()

    def chunks():
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096]

    response = httpx2.post(
        f"{gateway_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {acme_key}", "Content-Type": "application/json"},
        content=chunks(),
    )
    assert response.status_code == 413
    assert response.json()["code"] == "request_too_large"
    assert response.headers["X-Request-Id"].startswith("gw-")
    assert upstream_requests(settings.MISTRAL_SERVER_URL) == []


def test_gateway_responses_are_not_sniffed(gateway_url, simulator, acme_key):
    simulator()
    assert chat(gateway_url, acme_key).headers["X-Content-Type-Options"] == "nosniff"
    assert chat(gateway_url, "sk_bad").headers["X-Content-Type-Options"] == "nosniff"


def test_other_paths_go_through_django_and_its_middleware(gateway_url):
    """Only the gateway's own paths skip Django's middleware: the admin keeps its
    clickjacking and security headers, and a path near the gateway's is not served by it."""
    login = httpx2.get(f"{gateway_url}/admin/login/")
    assert login.status_code == 200
    assert login.headers["X-Frame-Options"] == "DENY"
    assert httpx2.get(f"{gateway_url}/v1/chat/completions/extra").status_code == 404


def test_a_wrong_content_type_is_refused(gateway_url, simulator, acme_key):
    simulator()
    response = httpx2.post(
        f"{gateway_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {acme_key}", "Content-Type": "text/plain"},
        content=b"hello",
    )
    assert response.status_code == 400
    assert "application/json" in response.json()["message"]


def test_models_lists_prices(gateway_url, acme_key):
    response = httpx2.get(
        f"{gateway_url}/v1/models", headers={"Authorization": f"Bearer {acme_key}"}
    )
    assert response.status_code == 200
    small = next(m for m in response.json()["data"] if m["id"] == "mistral-small")
    assert small["pricing"]["input_usd_per_million"] == "0.15"
    assert "mistral-small-latest" in small["aliases"]
    assert httpx2.get(f"{gateway_url}/v1/models").status_code == 401


def test_a_suspended_tenant_and_a_paused_agent_are_refused(
    gateway_url, simulator, acme, invoice_bot, acme_key
):
    simulator()
    services.set_agent_paused(invoice_bot, True, reason="runaway")
    response = chat(gateway_url, acme_key)
    assert (response.status_code, response.json()["code"]) == (403, "agent_paused")
    services.set_agent_paused(invoice_bot, False)
    acme.status = "suspended"
    acme.save()
    response = chat(gateway_url, acme_key)
    assert (response.status_code, response.json()["code"]) == (403, "subscription_inactive")


def test_an_unexpected_failure_is_answered_in_json(gateway_url, simulator, acme_key, monkeypatch):
    simulator()

    def broken(*args, **kwargs):
        raise RuntimeError("database went away")

    monkeypatch.setattr("routing.gateway.plan_call", broken)
    response = chat(gateway_url, acme_key)
    assert response.status_code == 500
    assert response.json()["code"] == "internal_error"
    assert response.headers["X-Request-Id"].startswith("gw-")


def test_the_server_shutdown_closes_the_upstream_connections(settings):
    """ASGI lifespan: start-up is acknowledged; shutdown closes the SDK's connection pool."""
    from governance.asgi import application
    from routing import upstream

    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent = []

    async def receive():
        return next(messages)

    async def send(message):
        sent.append(message["type"])

    upstream.reset_client()
    upstream.client()
    asyncio.run(application({"type": "lifespan"}, receive, send))
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert upstream._client is None


def test_a_plain_reply_is_the_upstreams_json_as_it_was_sent(gateway_url, acme_key, settings):
    """Fields the SDK's models do not know (a newer API's) reach the agent, and nothing
    the upstream did not send is added."""
    sent = json.dumps(
        {
            "id": "cmpl-1",
            "object": "chat.completion",
            "model": "mistral-small-latest",
            "created": 1,
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": "Done."},
                }
            ],
            "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14},
            "newer_api_field": {"cached_tokens": 3},
        }
    ).encode()

    class Upstream(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(sent)))
            self.end_headers()
            self.wfile.write(sent)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        settings.MISTRAL_SERVER_URL = f"http://127.0.0.1:{server.server_port}"
        upstream.reset_client()
        response = chat(gateway_url, acme_key, max_tokens=20)
    finally:
        server.shutdown()
        server.server_close()
    assert response.status_code == 200, response.text
    assert response.content == sent
    entry = SpendEntry.objects.get()
    assert (entry.prompt_tokens, entry.completion_tokens) == (12, 2)


def test_a_failing_model_is_skipped_while_its_circuit_is_open(
    gateway_url, simulator, acme_key, monkeypatch
):
    monkeypatch.setattr(upstream.breaker, "threshold", 2)
    monkeypatch.setattr(upstream.breaker, "cooldown_seconds", 1.0)
    sim = simulator(fail_models={"mistral-large-latest": 500})

    def tried():
        sent = [r["body"]["model"] for r in upstream_requests(sim)]
        httpx2.post(f"{sim}/_sim/reset")
        return [get_catalog().resolve(model).id for model in sent]

    for _ in range(2):  # two failures open the circuit; each call falls back
        assert chat(gateway_url, acme_key, model="mistral-large-latest").status_code == 200
        assert tried() == ["mistral-large", "mistral-medium"]
    assert chat(gateway_url, acme_key, model="mistral-large-latest").status_code == 200
    assert tried() == ["mistral-medium"]  # skipped without being asked
    time.sleep(1.1)  # the cooldown is over: asked again
    assert chat(gateway_url, acme_key, model="mistral-large-latest").status_code == 200
    assert tried() == ["mistral-large", "mistral-medium"]


def test_a_revoked_key_or_paused_agent_is_refused_once_the_key_cache_expires(
    gateway_url, simulator, settings, acme, invoice_bot
):
    """README: a revocation or a pause takes effect within KEY_CACHE_SECONDS."""
    simulator()
    settings.KEY_CACHE_SECONDS = 1
    key, raw = services.issue_key(invoice_bot)
    assert chat(gateway_url, raw, max_tokens=5).status_code == 200  # now cached
    services.revoke_key(key)
    time.sleep(1.1)
    assert chat(gateway_url, raw, max_tokens=5).status_code == 401
    _, other = services.issue_key(invoice_bot)
    assert chat(gateway_url, other, max_tokens=5).status_code == 200
    services.set_agent_paused(invoice_bot, True, reason="runaway")
    time.sleep(1.1)
    response = chat(gateway_url, other, max_tokens=5)
    assert (response.status_code, response.json()["code"]) == (403, "agent_paused")


def test_an_end_user_header_applies_that_users_budget(gateway_url, simulator, acme, acme_key):
    simulator()
    services.set_policy(acme, ScopeType.USER, user_key="u-1", limit_nanos=1)

    def as_user(user):
        return httpx2.post(
            f"{gateway_url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {acme_key}", "X-End-User": user},
            json={"model": "mistral-small-latest", "messages": MESSAGES, "max_tokens": 5},
            timeout=30,
        )

    refused = as_user("u-1")
    assert refused.status_code == 402, refused.text
    assert refused.json()["details"]["scope_type"] == "user"
    assert as_user("u-2").status_code == 200
    wait_for_charges()
    assert SpendEntry.objects.get().user_key == "u-2"
