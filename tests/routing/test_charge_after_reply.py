"""A plain call is answered first and charged just after (its hold keeps the budget
meanwhile); a charge that fails never withholds the answer and is never silent."""

from __future__ import annotations

import logging
import threading

import httpx2
from django.db import OperationalError

from budgets.models import Hold, HoldStatus
from governance import metrics
from governance.asgi import django_application, lifespan
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


def test_under_djangos_own_handler_the_charge_comes_before_the_reply(
    transactional_db, simulator, acme_key, settings
):
    """Only the gateway's lean server charges after the reply; Django's own handler (a
    deployment under a path prefix goes through it) charges first."""
    settings.KEY_CACHE_SECONDS = 0
    simulator()
    with serving(through_django, lifespan="on") as url:
        response = httpx_post(url, acme_key)
        assert response.status_code == 200
        assert not views._settling
        entry = SpendEntry.objects.get()
    assert entry.request_id == response.headers["X-Request-Id"]


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
