"""/metrics in Prometheus text format: what the live gateway and the Stripe webhook
counted, readable by staff sessions and the metrics token only."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx2
import pytest
from django.conf import settings as django_settings
from prometheus_client.parser import text_string_to_metric_families

from budgets import engine, services
from budgets.models import ScopeType
from budgets.money import NANOS_PER_USD, Prices, usd_to_nanos
from routing.views import wait_for_charges
from spend.models import SpendEntry
from tests.webhooks.stripe_objects import SECRET, event, post, resource

TOKEN = "metrics-token-7c1f"
MESSAGES = [{"role": "user", "content": "Summarise the invoice from Acme for March."}]


@pytest.fixture(autouse=True)
def metrics_token(settings):
    settings.METRICS_TOKEN = TOKEN


def scrape(base_url: str, token: str = TOKEN) -> str:
    response = httpx2.get(
        f"{base_url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    return response.text


def value(text: str, name: str, **labels: str) -> float:
    """A sample's value in an exposition, 0 if it is not there (yet)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def chat(gateway_url: str, key: str, **body) -> httpx2.Response:
    response = httpx2.post(
        f"{gateway_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "mistral-small-latest", "messages": MESSAGES, **body},
        timeout=30,
    )
    wait_for_charges()  # a plain call is counted once charged, just after its reply
    return response


def test_it_counts_gateway_calls_refusals_spend_and_latency(
    gateway_url, simulator, acme, acme_key, spend
):
    simulator()
    before = scrape(gateway_url)

    assert chat(gateway_url, acme_key, max_tokens=50).status_code == 200
    assert chat(gateway_url, acme_key[:-4] + "xxxx").status_code == 401
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("1"))
    spend(acme, usd_to_nanos("0.85"))
    downgraded = chat(gateway_url, acme_key, model="mistral-large-latest", max_tokens=30)
    assert downgraded.headers["X-Governance-Downgraded-From"] == "mistral-large"
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("0.5"))
    assert chat(gateway_url, acme_key).status_code == 402

    after = scrape(gateway_url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("governance_calls_total", outcome="allowed", model="mistral-small") == 1
    assert delta("governance_calls_total", outcome="downgraded", model="mistral-small") == 1
    assert delta("governance_calls_total", outcome="refused", model="none") == 2
    downgrades = delta(
        "governance_downgrades_total", from_model="mistral-large", to_model="mistral-small"
    )
    assert downgrades == 1
    assert delta("governance_refusals_total", reason="invalid_api_key") == 1
    assert delta("governance_refusals_total", reason="budget_exceeded") == 1
    charged = sum(
        SpendEntry.objects.filter(request_id__startswith="gw-").values_list("cost_nanos", flat=True)
    )
    assert charged > 0
    assert delta("governance_spend_usd_total", model="mistral-small") == pytest.approx(
        charged / NANOS_PER_USD
    )
    assert delta("governance_upstream_latency_seconds_count", model="mistral-small") == 2
    assert (
        delta("governance_upstream_latency_seconds_bucket", model="mistral-small", le="+Inf") == 2
    )
    assert value(after, "governance_holds_in_flight") == 0


def test_it_counts_the_spend_of_a_stream_when_it_ends(gateway_url, simulator, acme_key):
    simulator()
    before = scrape(gateway_url)
    with httpx2.stream(
        "POST",
        f"{gateway_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {acme_key}"},
        json={"model": "mistral-small-latest", "messages": MESSAGES, "stream": True},
        timeout=30,
    ) as response:
        assert response.status_code == 200
        assert list(response.iter_lines())[-2:] == ["data: [DONE]", ""]
    after = scrape(gateway_url)
    entry = SpendEntry.objects.get()
    spent = value(after, "governance_spend_usd_total", model="mistral-small") - value(
        before, "governance_spend_usd_total", model="mistral-small"
    )
    assert spent == pytest.approx(entry.cost_nanos / NANOS_PER_USD)


def test_it_counts_holds_in_flight_when_scraped(admin_client, acme):
    scope = engine.state_of(acme)
    for request_id in ("held-1", "held-2", "captured"):
        hold = engine.authorize(
            scope,
            request_id=request_id,
            model="m",
            prices=Prices(1, 1),
            input_tokens=10,
            max_output_tokens=10,
        )
    engine.capture(hold, prompt_tokens=10, completion_tokens=5)

    text = admin_client.get("/metrics").content.decode()

    assert value(text, "governance_holds_in_flight") == 2


def test_it_counts_stripe_webhook_events_by_type_and_result(admin_client, client, settings):
    settings.STRIPE_WEBHOOK_SECRET = SECRET
    before = admin_client.get("/metrics").content.decode()
    body = event("customer.created", resource("customer"))

    assert post(client, body).status_code == 200
    assert post(client, body).status_code == 200
    assert post(client, body, secret="whsec_wrong").status_code == 400

    after = admin_client.get("/metrics").content.decode()

    def delta(**labels: str) -> float:
        name = "governance_webhook_events_total"
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta(type="customer.created", result="ignored") == 1
    assert delta(type="customer.created", result="duplicate") == 1
    assert delta(type="unknown", result="invalid_signature") == 1


def test_staff_sessions_read_metrics(admin_client):
    response = admin_client.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=")
    assert "no-cache" in response["Cache-Control"]
    assert b"# TYPE governance_calls_total counter" in response.content


def test_the_metrics_token_reads_metrics(client, db):
    response = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert response.status_code == 200
    assert b"governance_holds_in_flight" in response.content


def test_anonymous_callers_are_refused(client, db):
    response = client.get("/metrics")
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert b"governance_" not in response.content


@pytest.mark.parametrize("header", [f"Bearer {TOKEN}x", "Bearer ", f"Basic {TOKEN}", TOKEN])
def test_a_wrong_token_is_refused(client, db, header):
    response = client.get("/metrics", HTTP_AUTHORIZATION=header)
    assert response.status_code == 401
    assert b"governance_" not in response.content


def test_no_token_is_accepted_when_none_is_configured(client, db, settings):
    settings.METRICS_TOKEN = ""
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer ").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer").status_code == 401


def test_signed_in_users_who_are_not_staff_are_refused(client, django_user_model):
    user = django_user_model.objects.create_user("agent-owner", password="not-staff-9f2")
    client.force_login(user)
    response = client.get("/metrics")
    assert response.status_code == 403
    assert b"governance_" not in response.content


def test_metrics_are_only_read(admin_client):
    assert admin_client.post("/metrics").status_code == 405


COUNT_IN_A_WORKER = """
import django
django.setup()
from governance import metrics
metrics.count_call(metrics.Outcome.ALLOWED, "mistral-small")
metrics.add_spend("mistral-small", 250_000_000)
"""


def test_it_sums_the_workers_of_a_multiprocess_deployment(admin_client, tmp_path, monkeypatch):
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
        "DJANGO_SETTINGS_MODULE": "governance.settings",
    }
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", COUNT_IN_A_WORKER], env=env, cwd=django_settings.BASE_DIR
        )
        for _ in range(2)
    ]
    assert [worker.wait(timeout=60) for worker in workers] == [0, 0]
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))

    text = admin_client.get("/metrics").content.decode()

    assert value(text, "governance_calls_total", outcome="allowed", model="mistral-small") == 2
    assert value(text, "governance_spend_usd_total", model="mistral-small") == 0.5
    assert value(text, "governance_holds_in_flight") == 0
