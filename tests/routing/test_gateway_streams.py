"""Streams that do not end well: the upstream cuts, forgets usage, or the agent leaves.
Every path ends with the hold captured (a conservative partial charge), never open."""

from __future__ import annotations

import time

import httpx2
import pytest

from budgets.models import BudgetPeriod, Hold, HoldStatus
from routing.catalog import get_catalog
from spend.models import SpendEntry

MESSAGES = [{"role": "user", "content": "Write a long churn analysis."}]


def stream(gateway_url, key, **body):
    return httpx2.stream(
        "POST",
        f"{gateway_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "mistral-small-latest", "messages": MESSAGES, "stream": True, **body},
        timeout=30,
    )


def wait_for_entry(seconds=10) -> SpendEntry:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        entry = SpendEntry.objects.first()
        if entry is not None:
            return entry
        time.sleep(0.05)
    raise AssertionError("the call was never charged")


def test_a_cut_stream_is_charged_for_what_was_seen_and_leaves_no_hold(
    gateway_url, simulator, acme, acme_key
):
    simulator(cut_after=5)
    with stream(gateway_url, acme_key, max_tokens=500) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert "[DONE]" not in "".join(lines)
    assert "upstream_unavailable" in lines[-1]
    entry = wait_for_entry()
    hold = Hold.objects.get()
    assert entry.usage_estimated
    assert entry.prompt_tokens == hold.input_tokens
    assert 5 <= entry.completion_tokens <= 500
    assert hold.status == HoldStatus.CAPTURED
    period = BudgetPeriod.objects.get(policy__tenant=acme)
    assert (period.held_nanos, period.spent_nanos) == (0, entry.cost_nanos)


def test_a_stream_without_usage_is_charged_conservatively(gateway_url, simulator, acme_key):
    simulator(no_usage=True)
    with stream(gateway_url, acme_key, max_tokens=500) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    entry = wait_for_entry()
    assert entry.usage_estimated
    words = sum(1 for line in lines if '"content": "' in line and '"content": ""' not in line)
    # At least one token per word seen, never more than max_tokens.
    assert words <= entry.completion_tokens <= 500
    assert entry.prompt_tokens == Hold.objects.get().input_tokens


def test_an_agent_that_disconnects_is_charged_for_what_it_received(
    gateway_url, simulator, acme, acme_key
):
    simulator(token_latency_ms=50)
    with stream(gateway_url, acme_key, max_tokens=1000) as response:
        received = []
        for line in response.iter_lines():
            if line:
                received.append(line)
            if len(received) >= 4:
                break
    entry = wait_for_entry()
    assert entry.usage_estimated
    words = sum(1 for line in received if '"content": "' in line and '"content": ""' not in line)
    assert words <= entry.completion_tokens < 1000  # at least what the agent received
    assert Hold.objects.get().status == HoldStatus.CAPTURED
    assert BudgetPeriod.objects.get(policy__tenant=acme).held_nanos == 0


# --- An agent that hangs up while the upstream has its call ---------------------------


def _hang_up_during_the_upstream_call(gateway_url, key, **body):
    with pytest.raises(httpx2.ReadTimeout):
        httpx2.post(
            f"{gateway_url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "mistral-small-latest", "messages": MESSAGES, **body},
            timeout=0.4,
        )


def test_a_plain_call_whose_agent_hangs_up_is_charged_for_what_the_upstream_used(
    gateway_url, simulator, acme, acme_key
):
    """The upstream goes on generating (and billing) the answer: the call is captured
    from its usage, and the budget's hold is not left open until it expires."""
    simulator(latency_ms=1000)
    _hang_up_during_the_upstream_call(gateway_url, acme_key, max_tokens=30)
    entry = wait_for_entry()
    assert not entry.usage_estimated  # the upstream's own usage
    prices = get_catalog().resolve(entry.model_used).prices
    assert entry.cost_nanos == prices.cost_nanos(entry.prompt_tokens, entry.completion_tokens)
    assert Hold.objects.get().status == HoldStatus.CAPTURED
    assert BudgetPeriod.objects.get(policy__tenant=acme).held_nanos == 0


def test_a_stream_whose_agent_hangs_up_before_it_opens_is_closed_and_charged_its_prompt(
    gateway_url, simulator, acme, acme_key
):
    sim = simulator(latency_ms=1000)
    _hang_up_during_the_upstream_call(gateway_url, acme_key, max_tokens=30, stream=True)
    entry = wait_for_entry()
    assert entry.usage_estimated and entry.completion_tokens == 0
    assert entry.prompt_tokens == Hold.objects.get().input_tokens
    assert Hold.objects.get().status == HoldStatus.CAPTURED
    assert BudgetPeriod.objects.get(policy__tenant=acme).held_nanos == 0
    assert len(httpx2.get(f"{sim}/_sim/requests").json()["data"]) == 1


def test_a_call_whose_agent_hung_up_and_whose_upstream_failed_is_voided(
    gateway_url, simulator, acme, acme_key
):
    simulator(latency_ms=1000, fail_models={"mistral-small-latest": 400})
    _hang_up_during_the_upstream_call(gateway_url, acme_key, max_tokens=30)
    deadline = time.monotonic() + 10
    while Hold.objects.get().status == HoldStatus.HELD:
        assert time.monotonic() < deadline, "the hold was left open"
        time.sleep(0.05)
    assert Hold.objects.get().status == HoldStatus.VOIDED
    assert not SpendEntry.objects.exists()
    assert BudgetPeriod.objects.get(policy__tenant=acme).held_nanos == 0


def test_a_call_whose_agent_hangs_up_while_its_hold_is_placed_sends_nothing_and_keeps_no_hold(
    require_postgres, gateway_url, simulator, acme, acme_key
):
    """The hold's statement waits on a lock; the agent gives up meanwhile. Once placed,
    the hold is voided and the upstream is never asked."""
    import psycopg
    from django.db import connection

    sim = simulator()
    assert chat_ok(gateway_url, acme_key)  # the budget's period exists
    httpx2.post(f"{sim}/_sim/reset")
    period = BudgetPeriod.objects.get(policy__tenant=acme)
    dsn = connection.get_connection_params()
    with psycopg.connect(**dsn) as blocker:
        blocker.execute("SELECT id FROM budgets_budgetperiod WHERE id = %s FOR UPDATE", [period.pk])
        _hang_up_during_the_upstream_call(gateway_url, acme_key, max_tokens=30)
        blocker.rollback()  # the hold's statement goes on
    deadline = time.monotonic() + 10
    while True:  # the first call's hold, captured, and this call's, once placed
        statuses = list(Hold.objects.order_by("id").values_list("status", flat=True))
        if len(statuses) == 2 and statuses[1] != HoldStatus.HELD:
            break
        assert time.monotonic() < deadline, f"the hold was left open: {statuses}"
        time.sleep(0.05)
    assert Hold.objects.latest("id").status == HoldStatus.VOIDED
    assert httpx2.get(f"{sim}/_sim/requests").json()["data"] == []
    period.refresh_from_db()
    assert period.held_nanos == 0
    assert SpendEntry.objects.count() == 1  # only the first call


def chat_ok(gateway_url, key) -> bool:
    response = httpx2.post(
        f"{gateway_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "mistral-small-latest", "messages": MESSAGES, "max_tokens": 5},
        timeout=30,
    )
    return response.status_code == 200


def test_no_fallback_is_sent_for_an_agent_that_left(gateway_url, simulator, acme, acme_key):
    """The first model fails after the agent hung up: its hold is voided, and nothing
    else is sent upstream or charged."""
    sim = simulator(latency_ms=1000, fail_models={"mistral-small-latest": 500})
    _hang_up_during_the_upstream_call(gateway_url, acme_key, max_tokens=30)
    deadline = time.monotonic() + 10
    while Hold.objects.get().status == HoldStatus.HELD:
        assert time.monotonic() < deadline, "the hold was left open"
        time.sleep(0.05)
    time.sleep(0.3)  # time for a fallback that should not come
    assert len(httpx2.get(f"{sim}/_sim/requests").json()["data"]) == 1
    assert list(Hold.objects.values_list("status", flat=True)) == [HoldStatus.VOIDED]
    assert not SpendEntry.objects.exists()


def test_an_abandoned_streams_charge_that_fails_is_retried_and_logged(
    gateway_url, simulator, acme, acme_key, monkeypatch, caplog
):
    from django.db import OperationalError

    from routing import gateway

    simulator(latency_ms=1000)
    attempts = []

    def capture(*args, **kwargs):
        attempts.append(1)
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(gateway, "capture", capture)
    monkeypatch.setattr("routing.views._loop_database", lambda: None)  # the thread's way
    _hang_up_during_the_upstream_call(gateway_url, acme_key, max_tokens=30, stream=True)
    deadline = time.monotonic() + 10
    while not any("not charged" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, "the failed charge was never logged"
        time.sleep(0.05)
    assert len(attempts) == 3  # _charge's attempts
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


def test_a_streams_charge_is_retried_after_a_database_error(
    gateway_url, simulator, acme, acme_key, monkeypatch
):
    from django.db import OperationalError

    from routing import gateway

    simulator()
    real_capture, failures = gateway.capture, []

    def capture_failing_once(*args, **kwargs):
        if not failures:
            failures.append(1)
            raise OperationalError("server closed the connection unexpectedly")
        return real_capture(*args, **kwargs)

    monkeypatch.setattr(gateway, "capture", capture_failing_once)
    monkeypatch.setattr("routing.views._loop_database", lambda: None)  # the thread's way
    with stream(gateway_url, acme_key, max_tokens=20) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    entry = wait_for_entry()
    assert failures == [1] and not entry.usage_estimated
    assert Hold.objects.get().status == HoldStatus.CAPTURED
    assert BudgetPeriod.objects.get(policy__tenant=acme).held_nanos == 0
