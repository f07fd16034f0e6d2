"""The upstream request is built while the hold is placed, and sent only once the plan
asks for exactly that request: a refused, downgraded, clamped or abandoned call never
lets the prepared request out."""

from __future__ import annotations

import asyncio
import gc
import threading
import time

import httpx2
import pytest
from django.conf import settings
from pydantic import ValidationError

from budgets import services
from budgets.models import Hold, HoldStatus, ScopeType
from budgets.money import usd_to_nanos
from routing import gateway, prepared, upstream
from routing.simulator import running_simulator
from spend.models import SpendEntry

from .test_gateway_http import MESSAGES, chat, upstream_requests

SMALL = {"model": "mistral-small-latest", "messages": MESSAGES, "max_tokens": 20}


def prepared_calls_pending(caplog) -> list:
    """Prepared calls still waiting, in any event loop (the live server's included), or
    dropped while waiting (collected, asyncio logs "Task was destroyed but it is
    pending")."""
    gc.collect()
    pending = [
        task
        for task in gc.get_objects()
        # type(), not isinstance(): a dead weak proxy left by another test raises there
        if issubclass(type(task), asyncio.Task)
        and task.get_name() == prepared.TASK_NAME
        and not task.done()
    ]
    dropped = [
        record
        for record in caplog.records
        if record.name == "asyncio" and prepared.TASK_NAME in record.getMessage()
    ]
    return pending + dropped


def spy_on(monkeypatch, name: str) -> list[prepared.PreparedCall]:
    """The prepared calls whose method `name` ran (sent, or withdrawn)."""
    seen, real = [], getattr(prepared.PreparedCall, name)

    def spy(self, *args, **kwargs):
        seen.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(prepared.PreparedCall, name, spy)
    return seen


def test_the_common_call_sends_its_prepared_request_once(
    gateway_url, simulator, acme_key, monkeypatch, caplog
):
    sim = simulator()
    sent_prepared = spy_on(monkeypatch, "send")
    response = chat(gateway_url, acme_key, max_tokens=20)
    assert response.status_code == 200, response.text
    assert len(sent_prepared) == 1  # the request built while the hold was placed
    (sent,) = upstream_requests(sim)
    assert sent["body"]["model"] == "mistral-small-latest"
    assert sent["body"]["max_tokens"] == 20
    assert sent["body"]["messages"] == MESSAGES
    assert SpendEntry.objects.get().request_id == response.headers["X-Request-Id"]
    assert prepared_calls_pending(caplog) == []


def test_a_prepared_stream_is_sent_once(gateway_url, simulator, acme_key, monkeypatch, caplog):
    sim = simulator()
    sent_prepared = spy_on(monkeypatch, "send")
    with httpx2.stream(
        "POST",
        f"{gateway_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {acme_key}"},
        json={**SMALL, "stream": True},
        timeout=30,
    ) as response:
        assert response.status_code == 200
        assert response.read().endswith(b"data: [DONE]\n\n")
    assert len(sent_prepared) == 1
    (sent,) = upstream_requests(sim)
    assert sent["body"]["stream"] is True
    assert prepared_calls_pending(caplog) == []


def test_after_an_upstream_failure_the_fallback_sends_its_own_request(
    gateway_url, simulator, acme_key, caplog
):
    sim = simulator(fail_models={"mistral-large-latest": 500})
    response = chat(gateway_url, acme_key, model="mistral-large-latest", max_tokens=20)
    assert response.status_code == 200, response.text
    models = [sent["body"]["model"] for sent in upstream_requests(sim)]
    assert models[0] == "mistral-large-latest"  # the prepared request, answered 500
    assert models[1:] == [
        gateway.get_catalog().resolve(response.headers["X-Governance-Model"]).upstream_name
    ]
    assert prepared_calls_pending(caplog) == []


def test_a_refused_call_sends_nothing_upstream(
    gateway_url, simulator, acme, acme_key, spend, caplog
):
    sim = simulator()
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("1"))
    spend(acme, usd_to_nanos("1"))
    response = chat(gateway_url, acme_key, max_tokens=20)
    assert response.status_code == 402
    assert upstream_requests(sim) == []
    assert prepared_calls_pending(caplog) == []


def test_a_paused_agent_sends_nothing_upstream(
    gateway_url, simulator, invoice_bot, acme_key, caplog
):
    sim = simulator()
    services.set_agent_paused(invoice_bot, True)
    response = chat(gateway_url, acme_key, max_tokens=20)
    assert response.status_code == 403
    assert upstream_requests(sim) == []
    assert prepared_calls_pending(caplog) == []


def test_a_downgraded_call_sends_only_the_plans_request(
    gateway_url, simulator, acme, acme_key, spend, caplog
):
    """The request prepared for mistral-large is withdrawn; the downgraded one goes."""
    sim = simulator()
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("1"))
    spend(acme, usd_to_nanos("0.85"))
    response = chat(gateway_url, acme_key, model="mistral-large-latest", max_tokens=20)
    assert response.status_code == 200, response.text
    assert response.headers["X-Governance-Downgraded-From"] == "mistral-large"
    (sent,) = upstream_requests(sim)
    assert sent["body"]["model"] == "mistral-small-latest"
    assert prepared_calls_pending(caplog) == []


def test_a_circuit_that_opens_during_the_hold_withdraws_the_prepared_request(
    gateway_url, simulator, acme_key, monkeypatch, caplog
):
    sim = simulator()
    real_plan_call = gateway.plan_call

    def plan_call_while_large_fails(*args, **kwargs):
        if not upstream.breaker.is_open("mistral-large"):  # another call saw it fail
            for _ in range(settings.CIRCUIT_BREAKER_FAILURES):
                upstream.breaker.record_failure("mistral-large")
        return real_plan_call(*args, **kwargs)

    monkeypatch.setattr(gateway, "plan_call", plan_call_while_large_fails)
    response = chat(gateway_url, acme_key, model="mistral-large-latest", max_tokens=20)
    assert response.status_code == 200, response.text
    assert response.headers["X-Governance-Model"] != "mistral-large"
    (sent,) = upstream_requests(sim)
    assert sent["body"]["model"] != "mistral-large-latest"
    assert prepared_calls_pending(caplog) == []


def test_an_agent_that_hangs_up_during_the_hold_sends_nothing_upstream(
    gateway_url, simulator, acme_key, monkeypatch, caplog
):
    """The hold is placed only once the agent is gone and its call withdrawn."""
    sim = simulator()
    withdrawn = spy_on(monkeypatch, "withdraw")
    real_plan_call, planned = gateway.plan_call, threading.Event()

    def plan_call_once_withdrawn(*args, **kwargs):
        try:
            for _ in range(500):
                if withdrawn:
                    break
                threading.Event().wait(0.01)
            return real_plan_call(*args, **kwargs)
        finally:
            planned.set()

    monkeypatch.setattr(gateway, "plan_call", plan_call_once_withdrawn)
    with pytest.raises(httpx2.ReadTimeout):
        httpx2.post(
            f"{gateway_url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {acme_key}"},
            json=SMALL,
            timeout=0.2,
        )
    assert planned.wait(10)
    assert len(withdrawn) == 1
    threading.Event().wait(0.2)  # time for a request that should not be sent
    assert upstream_requests(sim) == []
    assert prepared_calls_pending(caplog) == []
    # The hold placed after the agent left is voided once placed (views._void_when_planned).
    deadline = time.monotonic() + 5
    while Hold.objects.get().status == HoldStatus.HELD and time.monotonic() < deadline:
        time.sleep(0.02)
    assert Hold.objects.get().status == HoldStatus.VOIDED


# --- PreparedCall itself, against the simulator ---------------------------------------


@pytest.fixture
def sim(settings):
    with running_simulator() as url:
        settings.MISTRAL_SERVER_URL = url
        upstream.reset_client()
        yield url
    upstream.reset_client()


def call_for(**body) -> prepared.PreparedCall:
    known = {"model": "mistral-small-latest", "messages": MESSAGES, "max_tokens": 20, **body}
    return prepared.PreparedCall(known, {}, stream=False)


def run_collecting_loop_errors(main):
    """Run `main`, and return its result and what the loop reported as unhandled (a
    task's exception nobody retrieved, a task destroyed while pending)."""
    errors = []

    async def wrapped():
        asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
        try:
            return await main()
        finally:
            await upstream.close_client()

    result = asyncio.run(wrapped())
    gc.collect()  # a task dropped with its exception unread reports it when collected
    return result, errors


def test_nothing_is_sent_before_send_and_once_after(sim):
    async def main():
        call = call_for()
        call.start()
        await asyncio.sleep(0.3)  # built, and held back
        before = len(upstream_requests(sim))
        response = await call.send()
        return before, response, upstream.last_json_body()

    (before, response, raw), errors = run_collecting_loop_errors(main)
    assert before == 0
    assert len(upstream_requests(sim)) == 1
    assert response.usage.completion_tokens > 0
    assert raw is not None and b'"usage"' in raw  # the upstream's bytes, for the reply
    assert errors == []


def test_a_withdrawn_call_is_never_sent(sim, caplog):
    async def main():
        call = call_for()
        call.start()
        await asyncio.sleep(0.3)
        call.withdraw()
        await asyncio.sleep(0.3)
        assert prepared_calls_pending(caplog) == []
        never_started = call_for()
        never_started.withdraw()
        never_started.start()  # too late: withdrawn calls build nothing
        await asyncio.sleep(0.1)
        with pytest.raises(RuntimeError, match="withdrawn"):
            await call.send()

    _, errors = run_collecting_loop_errors(main)
    assert upstream_requests(sim) == []
    assert errors == []


def test_a_request_the_sdk_refuses_to_build_fails_at_send_or_is_dropped_quietly(sim):
    async def main():
        refused = call_for(messages=[{"role": "nobody", "content": "hi"}])
        refused.start()
        await asyncio.sleep(0.1)
        with pytest.raises(ValidationError):
            await refused.send()
        dropped = call_for(messages=[{"role": "nobody", "content": "hi"}])
        dropped.start()
        await asyncio.sleep(0.1)
        dropped.withdraw()

    _, errors = run_collecting_loop_errors(main)
    assert upstream_requests(sim) == []
    assert errors == []


def test_a_withdrawn_call_fails_through_the_sdks_error_hooks(sim):
    """Withdrawn at the gate with an exception, not a cancellation: hooks such as the
    SDK's tracing span see the call end."""
    seen = []

    class Recorder:
        def after_error(self, hook_ctx, response, error):
            seen.append(error)
            return response, error

    async def main():
        hooks = upstream.client().sdk_configuration.__dict__["_hooks"]
        hooks.register_after_error_hook(Recorder())
        call = call_for()
        call.start()
        await asyncio.sleep(0.2)  # at the gate
        call.withdraw()
        await asyncio.sleep(0.1)

    _, errors = run_collecting_loop_errors(main)
    assert [type(error) for error in seen] == [prepared.Withdrawn]
    assert upstream_requests(sim) == []
    assert errors == []
