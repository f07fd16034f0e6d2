"""The upstream request is built while the hold is placed, and sent only once the plan
asks for exactly that request: a refused, downgraded, clamped or abandoned call never
lets the prepared request out."""

from __future__ import annotations

import asyncio
import gc
import threading

import httpx2
import pytest
from pydantic import ValidationError

from budgets import services
from budgets.models import Hold, HoldStatus, ScopeType
from budgets.money import usd_to_nanos
from routing import gateway, upstream
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
        if isinstance(task, asyncio.Task)
        and task.get_name() == upstream.PREPARED_TASK_NAME
        and not task.done()
    ]
    dropped = [
        record
        for record in caplog.records
        if record.name == "asyncio" and upstream.PREPARED_TASK_NAME in record.getMessage()
    ]
    return pending + dropped


def test_the_common_call_sends_its_prepared_request_once(gateway_url, simulator, acme_key, caplog):
    sim = simulator()
    response = chat(gateway_url, acme_key, max_tokens=20)
    assert response.status_code == 200, response.text
    (sent,) = upstream_requests(sim)
    assert sent["body"]["model"] == "mistral-small-latest"
    assert prepared_calls_pending(caplog) == []
    assert sent["body"]["max_tokens"] == 20
    assert sent["body"]["messages"] == MESSAGES
    assert SpendEntry.objects.get().request_id == response.headers["X-Request-Id"]


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


def test_a_clamped_call_sends_only_the_clamped_request(gateway_url, simulator, acme, acme_key):
    sim = simulator()
    services.set_policy(
        acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("0.001"), warn_at="1", soft_cap="1"
    )
    response = chat(gateway_url, acme_key, max_tokens=100_000)
    assert response.status_code == 200, response.text
    (sent,) = upstream_requests(sim)
    assert sent["body"]["max_tokens"] == Hold.objects.get().max_output_tokens < 100_000


def test_an_agent_that_hangs_up_during_the_hold_sends_nothing_upstream(
    gateway_url, simulator, acme_key, monkeypatch, caplog
):
    sim = simulator()
    real_plan_call, planned = gateway.plan_call, threading.Event()

    def slow_plan_call(*args, **kwargs):
        try:
            threading.Event().wait(0.6)  # the agent gives up meanwhile
            return real_plan_call(*args, **kwargs)
        finally:
            planned.set()

    monkeypatch.setattr(gateway, "plan_call", slow_plan_call)
    with pytest.raises(httpx2.ReadTimeout):
        httpx2.post(
            f"{gateway_url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {acme_key}"},
            json=SMALL,
            timeout=0.2,
        )
    assert planned.wait(5)
    threading.Event().wait(0.3)  # time for a request that should not be sent
    assert upstream_requests(sim) == []
    assert prepared_calls_pending(caplog) == []
    # The hold placed after the agent left is released when it expires.
    assert Hold.objects.get().status == HoldStatus.HELD


# --- PreparedCall itself, against the simulator ---------------------------------------


@pytest.fixture
def sim(settings):
    with running_simulator() as url:
        settings.MISTRAL_SERVER_URL = url
        upstream.reset_client()
        yield url
    upstream.reset_client()


def prepared(**body) -> upstream.PreparedCall:
    known = {"model": "mistral-small-latest", "messages": MESSAGES, "max_tokens": 20, **body}
    return upstream.PreparedCall(known, {}, stream=False)


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
        call = prepared()
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
        call = prepared()
        call.start()
        await asyncio.sleep(0.3)
        call.withdraw()
        await asyncio.sleep(0.3)
        assert prepared_calls_pending(caplog) == []
        never_started = prepared()
        never_started.withdraw()
        never_started.start()  # too late: withdrawn calls build nothing
        await asyncio.sleep(0.1)

    _, errors = run_collecting_loop_errors(main)
    assert upstream_requests(sim) == []
    assert errors == []


def test_a_request_the_sdk_refuses_to_build_fails_at_send_or_is_dropped_quietly(sim):
    async def main():
        refused = prepared(messages=[{"role": "nobody", "content": "hi"}])
        refused.start()
        await asyncio.sleep(0.1)
        with pytest.raises(ValidationError):
            await refused.send()
        dropped = prepared(messages=[{"role": "nobody", "content": "hi"}])
        dropped.start()
        await asyncio.sleep(0.1)
        dropped.withdraw()

    _, errors = run_collecting_loop_errors(main)
    assert upstream_requests(sim) == []
    assert errors == []
