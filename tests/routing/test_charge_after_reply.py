"""A plain call is answered first and charged just after (its hold keeps the budget
meanwhile); a charge that fails never withholds the answer and is never silent."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import httpx2
import pytest
from django.db import OperationalError

from budgets import services
from budgets.models import Hold, HoldStatus
from budgets.money import nanos_to_usd
from governance import metrics
from governance.asgi import application, django_application, lifespan
from routing import gateway, views
from routing.views import wait_for_charges
from spend.models import SpendEntry
from tests.asgi_server import serving

from .test_gateway_http import MESSAGES, chat


@pytest.fixture(autouse=True)
def captures_in_threads(settings):
    """These tests hold or break the capture in its database thread (gateway.capture).
    On PostgreSQL the gateway sends a plain call's capture from its event loop instead:
    tests/routing/test_loop_statements.py does the same to that one."""
    settings.GATEWAY_LOOP_STATEMENTS = False


def test_the_reply_does_not_wait_for_the_charge_and_the_hold_covers_it(
    gateway_url, simulator, acme_key, monkeypatch
):
    simulator()
    may_charge = threading.Event()
    real_capture = gateway.capture

    def slow_capture(plan, **usage):
        assert may_charge.wait(10)
        return real_capture(plan, **usage)

    monkeypatch.setattr(gateway, "capture", slow_capture)
    response = httpx_post(gateway_url, acme_key)
    assert response.status_code == 200
    # The agent has its answer; the call is not charged yet, and its hold still holds.
    assert not SpendEntry.objects.exists()
    hold = Hold.objects.get()
    assert hold.status == HoldStatus.HELD
    may_charge.set()
    wait_for_charges()
    entry = SpendEntry.objects.get()
    hold.refresh_from_db()
    assert (hold.status, entry.request_id) == (HoldStatus.CAPTURED, hold.request_id)
    assert entry.completion_tokens == response.json()["usage"]["completion_tokens"]


def test_a_database_error_in_the_charge_is_retried(gateway_url, simulator, acme_key, monkeypatch):
    simulator()
    monkeypatch.setattr(views, "CHARGE_RETRY_SECONDS", 0.001)
    real_capture, attempts = gateway.capture, []

    def flaky_capture(plan, **usage):
        attempts.append(plan.request_id)
        if len(attempts) < views.CHARGE_ATTEMPTS:
            raise OperationalError("server closed the connection unexpectedly")
        return real_capture(plan, **usage)

    monkeypatch.setattr(gateway, "capture", flaky_capture)
    assert chat(gateway_url, acme_key, max_tokens=20).status_code == 200
    assert len(attempts) == views.CHARGE_ATTEMPTS
    assert SpendEntry.objects.get().request_id == attempts[0]
    assert not Hold.objects.filter(status=HoldStatus.HELD).exists()


def test_a_charge_that_keeps_failing_still_answers_and_says_so(
    gateway_url, simulator, acme_key, monkeypatch, caplog
):
    simulator()
    monkeypatch.setattr(views, "CHARGE_RETRY_SECONDS", 0.001)

    def broken_capture(plan, **usage):
        raise OperationalError("the database is down")

    monkeypatch.setattr(gateway, "capture", broken_capture)
    before = metrics.UNCHARGED.labels("mistral-small")._value.get()
    caplog.set_level(logging.ERROR, logger="governance.gateway")
    response = chat(gateway_url, acme_key, max_tokens=20)
    assert response.status_code == 200
    usage = response.json()["usage"]
    (failure,) = [r for r in caplog.records if "not charged" in r.getMessage()]
    assert failure.levelno == logging.ERROR
    assert failure.request_id == response.headers["X-Request-Id"]
    message = failure.getMessage()
    assert f"{usage['prompt_tokens']} prompt and {usage['completion_tokens']} completion" in message
    assert metrics.UNCHARGED.labels("mistral-small")._value.get() == before + 1
    # Nothing charged, and the hold is left for expire_holds to release.
    assert not SpendEntry.objects.exists()
    assert Hold.objects.get().status == HoldStatus.HELD


def test_the_server_finishes_a_call_only_once_it_is_charged(
    gateway_url, simulator, acme_key, monkeypatch
):
    """Uvicorn's graceful shutdown waits for the requests in flight: a call whose charge
    is still running is one of them."""
    simulator()
    monkeypatch.setattr(gateway, "capture", slowed(gateway.capture))
    settled_when_done = []

    async def recording(scope, receive, send):
        await application(scope, receive, send)
        settled_when_done.append(not views._settling)

    with serving(recording) as url:
        assert httpx_post(url, acme_key).status_code == 200
        wait_for_charges()
        deadline = time.monotonic() + 5
        while not settled_when_done and time.monotonic() < deadline:
            time.sleep(0.01)
    assert settled_when_done == [True]
    assert SpendEntry.objects.count() == 1


def test_shutdown_waits_for_charges_and_names_those_it_gave_up_on(caplog, settings):
    settings.GATEWAY_SHUTDOWN_CHARGE_SECONDS = 0.5

    async def shut_down():
        messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

        async def receive():
            return next(messages)

        async def send(message):
            pass

        quick = views._settling_task(asyncio.sleep(0.05), "gw-quick")
        stuck = views._settling_task(asyncio.sleep(60), "gw-stuck")
        await lifespan(receive, send)
        assert quick.done() and not stuck.done()
        stuck.cancel()

    caplog.set_level(logging.ERROR, logger="governance.gateway")
    asyncio.run(shut_down())
    assert "1 answered calls were still being charged at shutdown: gw-stuck" in caplog.text


@pytest.fixture
def plan(transactional_db, invoice_bot):
    """A plain call authorized (its hold placed), as the gateway has it before charging."""
    key = services.authenticate_key(services.issue_key(invoice_bot)[1])
    body = {"model": "mistral-small-latest", "messages": MESSAGES, "max_tokens": 20}
    return gateway.plan_call(key, body, request_id="gw-cut-off", user_key="")


def cut_off(plan, when_to_cancel: threading.Event) -> None:
    """Run the charge of `plan` and cancel it once `when_to_cancel` is set (as asyncio.run
    does to a charge still running when the server's loop ends)."""

    async def run():
        charge = views._settling_task(
            views._charge(plan, (12, 7), estimated=False, latency_ms=5), plan.request_id
        )
        while not when_to_cancel.is_set():
            await asyncio.sleep(0.005)
        charge.cancel()
        with pytest.raises(asyncio.CancelledError):
            await charge

    asyncio.run(run())


def test_a_capture_running_when_shutdown_cuts_it_off_finishes_and_is_logged(
    plan, monkeypatch, caplog
):
    capturing, may_finish = threading.Event(), threading.Event()
    real_capture = gateway.capture

    def blocked_capture(plan, **usage):
        capturing.set()
        assert may_finish.wait(10)
        return real_capture(plan, **usage)

    monkeypatch.setattr(gateway, "capture", blocked_capture)
    before = metrics.UNCHARGED.labels("mistral-small")._value.get()
    caplog.set_level(logging.INFO, logger="governance.gateway")
    try:
        cut_off(plan, capturing)
    finally:
        may_finish.set()
    deadline = time.monotonic() + 10  # the capture goes on in its thread
    while not any(getattr(r, "decision", None) for r in caplog.records):
        assert time.monotonic() < deadline, "the capture never finished"
        time.sleep(0.01)

    entry = SpendEntry.objects.get(request_id="gw-cut-off")
    assert (entry.prompt_tokens, entry.completion_tokens) == (12, 7)
    assert not [r for r in caplog.records if "not charged" in r.getMessage()]
    (served,) = [r for r in caplog.records if getattr(r, "decision", None) == "allowed"]
    assert served.cost_usd == nanos_to_usd(entry.cost_nanos)
    assert metrics.UNCHARGED.labels("mistral-small")._value.get() == before


def test_a_charge_cut_off_before_its_capture_says_what_the_call_used(plan, monkeypatch, caplog):
    """Cut off while waiting to retry: nothing is charged, and the log says so."""
    monkeypatch.setattr(views, "CHARGE_RETRY_SECONDS", 60)
    failed = threading.Event()

    def failing_capture(plan, **usage):
        failed.set()
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(gateway, "capture", failing_capture)
    before = metrics.UNCHARGED.labels("mistral-small")._value.get()
    caplog.set_level(logging.ERROR, logger="governance.gateway")
    cut_off(plan, failed)

    (record,) = [r for r in caplog.records if "cut off by shutdown" in r.getMessage()]
    assert record.request_id == "gw-cut-off"
    assert "not charged" in record.getMessage()
    assert "12 prompt and 7 completion tokens on mistral-small" in record.getMessage()
    assert metrics.UNCHARGED.labels("mistral-small")._value.get() == before + 1
    assert not SpendEntry.objects.exists()
    assert Hold.objects.get().status == HoldStatus.HELD


def test_a_failure_to_count_a_charged_call_is_logged_and_the_call_kept(
    gateway_url, simulator, acme_key, monkeypatch, caplog
):
    simulator()

    def broken(*args, **kwargs):
        raise RuntimeError("the metrics registry is broken")

    monkeypatch.setattr(metrics, "add_spend", broken)
    caplog.set_level(logging.ERROR, logger="governance.gateway")
    response = chat(gateway_url, acme_key, max_tokens=20)
    assert response.status_code == 200
    assert SpendEntry.objects.get().request_id == response.headers["X-Request-Id"]
    (record,) = [r for r in caplog.records if "charged but not counted" in r.getMessage()]
    assert record.exc_info[0] is RuntimeError


def test_a_call_whose_reply_cannot_be_built_is_still_charged(
    gateway_url, simulator, acme_key, monkeypatch
):
    simulator()

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the headers")

    monkeypatch.setattr(gateway, "governance_headers", broken)
    response = chat(gateway_url, acme_key, max_tokens=20)
    assert response.status_code == 500
    assert response.json()["code"] == "internal_error"
    assert SpendEntry.objects.count() == 1
    assert Hold.objects.get().status == HoldStatus.CAPTURED


def test_under_djangos_own_handler_the_charge_comes_before_the_reply(
    transactional_db, simulator, acme_key, settings, monkeypatch
):
    """Only the gateway's lean server charges after the reply; Django's own handler (a
    deployment under a path prefix goes through it) charges first."""
    settings.KEY_CACHE_SECONDS = 0
    simulator()
    monkeypatch.setattr(gateway, "capture", slowed(gateway.capture))
    with serving(through_django, lifespan="on") as url:
        response = httpx_post(url, acme_key)
        assert response.status_code == 200
        assert not views._settling
        entry = SpendEntry.objects.get()
    assert entry.request_id == response.headers["X-Request-Id"]


def test_under_djangos_own_handler_an_agent_that_hangs_up_is_still_charged(
    transactional_db, simulator, acme_key, settings, monkeypatch
):
    """Django's handler cancels the view when the agent disconnects; the charge (here
    still retrying a failed capture) must not be cancelled with it."""
    settings.KEY_CACHE_SECONDS = 0
    simulator()
    monkeypatch.setattr(views, "CHARGE_RETRY_SECONDS", 0.001)
    real_capture, attempts = gateway.capture, []

    def slow_then_flaky(plan, **usage):
        attempts.append(plan.request_id)
        if len(attempts) == 1:
            time.sleep(1.0)  # the agent gives up meanwhile
            raise OperationalError("server closed the connection unexpectedly")
        return real_capture(plan, **usage)

    monkeypatch.setattr(gateway, "capture", slow_then_flaky)
    with serving(through_django, lifespan="on") as url:
        with pytest.raises(httpx2.ReadTimeout):
            httpx2.post(
                f"{url}/v1/chat/completions",
                headers={"Authorization": f"Bearer {acme_key}"},
                json={"model": "mistral-small-latest", "messages": MESSAGES, "max_tokens": 20},
                timeout=0.5,
            )
        wait_for_charges()
    assert len(attempts) == 2
    assert SpendEntry.objects.get().request_id == attempts[0]
    assert Hold.objects.get().status == HoldStatus.CAPTURED


def test_under_djangos_own_handler_a_failed_charge_still_answers(
    transactional_db, simulator, acme_key, settings, monkeypatch, caplog
):
    settings.KEY_CACHE_SECONDS = 0
    simulator()
    monkeypatch.setattr(views, "CHARGE_RETRY_SECONDS", 0.001)

    def broken_capture(plan, **usage):
        raise OperationalError("the database is down")

    monkeypatch.setattr(gateway, "capture", broken_capture)
    caplog.set_level(logging.WARNING, logger="governance.gateway")
    with serving(through_django, lifespan="on") as url:
        response = httpx_post(url, acme_key)
    assert response.status_code == 200
    request_id = response.headers["X-Request-Id"]
    retries = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert [r.levelno for r in retries] == [logging.WARNING] * (views.CHARGE_ATTEMPTS - 1)
    (failure,) = [r for r in caplog.records if "not charged" in r.getMessage()]
    assert failure.request_id == request_id
    assert not SpendEntry.objects.exists()


def slowed(capture, seconds: float = 0.2):
    def slow_capture(plan, **usage):
        time.sleep(seconds)
        return capture(plan, **usage)

    return slow_capture


async def through_django(scope, receive, send):
    """Every path through Django's own handler; the lifespan closes upstream connections."""
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
    else:
        await django_application(scope, receive, send)


def httpx_post(gateway_url, key):
    """A chat call that, unlike chat(), does not wait for its charge."""
    return httpx2.post(
        f"{gateway_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "mistral-small-latest", "messages": MESSAGES, "max_tokens": 20},
        timeout=30,
    )
