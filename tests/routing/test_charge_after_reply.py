"""A plain call is answered first and charged just after (its hold keeps the budget
meanwhile); a charge that fails never withholds the answer and is never silent."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import httpx2
from django.db import OperationalError

from budgets import services
from budgets.models import Hold, HoldStatus
from governance import asgi, metrics
from governance.asgi import application, django_application, lifespan
from routing import gateway, views
from routing.views import wait_for_charges
from spend.models import SpendEntry
from tests.asgi_server import serving

from .test_gateway_http import MESSAGES, chat


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


def test_shutdown_waits_for_charges_and_names_those_it_gave_up_on(caplog, monkeypatch):
    async def shut_down():
        messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

        async def receive():
            return next(messages)

        async def send(message):
            pass

        quick = views._settling_task(asyncio.sleep(0.05))
        stuck = views._settling_task(asyncio.sleep(60))
        await lifespan(receive, send)
        assert quick.done() and not stuck.done()
        stuck.cancel()

    caplog.set_level(logging.ERROR, logger="governance.gateway")
    monkeypatch.setattr(asgi, "SHUTDOWN_CHARGE_SECONDS", 0.5)
    asyncio.run(shut_down())
    assert "1 answered calls were still being charged at shutdown" in caplog.text


def test_a_charge_cut_off_by_shutdown_says_what_the_call_used(
    transactional_db, invoice_bot, monkeypatch, caplog
):
    key = services.authenticate_key(services.issue_key(invoice_bot)[1])
    body = {"model": "mistral-small-latest", "messages": MESSAGES, "max_tokens": 20}
    plan = gateway.plan_call(key, body, request_id="gw-cut-off", user_key="")
    capturing, may_finish = threading.Event(), threading.Event()

    def blocked_capture(plan, **usage):
        capturing.set()
        assert may_finish.wait(10)

    monkeypatch.setattr(gateway, "capture", blocked_capture)
    before = metrics.UNCHARGED.labels("mistral-small")._value.get()
    caplog.set_level(logging.ERROR, logger="governance.gateway")

    async def cut_off():
        charge = views._settling_task(views._charge(plan, (12, 7), estimated=False, latency_ms=5))
        while not capturing.is_set():
            await asyncio.sleep(0.005)
        charge.cancel()
        try:
            await charge
        except asyncio.CancelledError:
            return True
        return False

    try:
        assert asyncio.run(cut_off())
    finally:
        may_finish.set()
    (record,) = [r for r in caplog.records if "cut off by shutdown" in r.getMessage()]
    assert record.request_id == "gw-cut-off"
    assert "12 prompt and 7 completion tokens on mistral-small" in record.getMessage()
    assert metrics.UNCHARGED.labels("mistral-small")._value.get() == before + 1


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
