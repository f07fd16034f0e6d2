"""A live gateway (uvicorn, ASGI, on loopback) in front of the Mistral simulator."""

from __future__ import annotations

import pytest

from budgets import services
from governance.asgi import application
from routing import gateway, upstream
from routing.simulator import running_simulator
from routing.views import wait_for_charges
from tests.asgi_server import serving


@pytest.fixture
def simulator(settings):
    """Start a simulator with options; the gateway is pointed at the last one started."""
    started = []

    def start(**options):
        context = running_simulator(**options)
        url = context.__enter__()
        started.append(context)
        settings.MISTRAL_SERVER_URL = url
        upstream.reset_client()
        return url

    yield start
    for context in reversed(started):
        context.__exit__(None, None, None)


@pytest.fixture
def gateway_url(transactional_db, settings):
    settings.KEY_CACHE_SECONDS = 0
    upstream.reset_client()
    upstream.breaker.reset()
    gateway.forget_keys()
    with serving(application, lifespan="on") as url:
        yield url
        wait_for_charges()  # a reply can reach the test before its ledger row is written
    upstream.reset_client()
    upstream.breaker.reset()


@pytest.fixture
def acme_key(acme, invoice_bot):
    return services.issue_key(invoice_bot)[1]


@pytest.fixture
def globex_key(globex):
    return services.issue_key(services.create_agent(globex, "globex-bot"))[1]


@pytest.fixture
def spend():
    """Record real spend for a tenant through the engine (a call on the cheapest model)."""
    from budgets import engine
    from routing.catalog import get_catalog

    def record(tenant, nanos: int, request_id: str = "earlier-call"):
        cheapest = get_catalog().resolve("ministral-3b")
        tokens = nanos // cheapest.prices.output_nanos
        scope = engine.state_of(tenant)
        hold = engine.authorize(
            scope,
            request_id=request_id,
            model=cheapest.id,
            prices=cheapest.prices,
            input_tokens=0,
            max_output_tokens=tokens,
            min_output_tokens=1,
        )
        return engine.capture(hold, prompt_tokens=0, completion_tokens=tokens)

    return record
