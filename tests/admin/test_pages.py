"""Every admin page opens for staff with rows present, and turns anonymous visitors to
the login page."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib import admin
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from budgets import engine, services
from budgets.models import Hold, HoldStatus
from budgets.money import Prices
from spend.models import Spike

MODELS = sorted(admin.site._registry, key=lambda m: m._meta.label)


def admin_url(model, view: str, *args) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_{view}", args=args)


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m._meta.label)
def test_each_changelist_and_change_page_opens(admin_client, populated, model):
    response = admin_client.get(admin_url(model, "changelist"))
    assert response.status_code == 200
    first = model.objects.order_by("pk").first()
    if first is not None:
        response = admin_client.get(admin_url(model, "change", first.pk))
        assert response.status_code == 200


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m._meta.label)
def test_each_add_page_opens_or_is_refused_for_records_nobody_adds(admin_client, populated, model):
    response = admin_client.get(admin_url(model, "add"))
    model_admin = admin.site._registry[model]
    can_add = model_admin.has_add_permission(response.wsgi_request)
    assert response.status_code == (200 if can_add else 403)


@pytest.mark.parametrize(
    "label", ["budgets.Tenant", "budgets.Agent", "budgets.ApiKey", "budgets.Plan"]
)
def test_records_operators_create_have_an_add_page(admin_client, db, label):
    model = next(m for m in MODELS if m._meta.label == label)
    assert admin_client.get(admin_url(model, "add")).status_code == 200


def test_the_holds_in_flight_can_be_listed(admin_client, populated):
    response = admin_client.get(admin_url(Hold, "changelist"), {"status__exact": "held"})
    assert response.status_code == 200
    page = response.content.decode()
    assert "call-2" in page
    assert "call-1" not in page
    assert Hold.objects.get(request_id="call-2").status == HoldStatus.HELD


def test_the_model_prices_page_shows_the_catalog(admin_client, db):
    index = admin_client.get(reverse("admin:index")).content.decode()
    assert reverse("model-prices") in index
    page = admin_client.get(reverse("model-prices")).content.decode()
    assert "mistral-small" in page
    assert "USD / 1M tokens" in page


def test_anonymous_visitors_are_sent_to_login(client, db):
    for url in (reverse("admin:budgets_tenant_changelist"), reverse("model-prices")):
        response = client.get(url)
        assert response.status_code == 302
        assert "/admin/login/" in response["Location"]


def test_the_celery_beat_schedules_are_in_the_admin(admin_client, db):
    response = admin_client.get(reverse("admin:django_celery_beat_periodictask_changelist"))
    assert response.status_code == 200
    assert "spend.rollup_hourly" in response.content.decode()


@pytest.fixture
def more_rows(populated, invoice_bot, churn_bot):
    """Enough holds, ledger rows, keys and spikes that a query per row would show."""
    for n in range(8):
        agent = invoice_bot if n % 2 else churn_bot
        services.issue_key(agent)
        hold = engine.authorize(
            engine.state_of(agent.tenant, agent),
            request_id=f"more-{n}",
            model="mistral-small",
            prices=Prices(1, 1),
            input_tokens=1,
            max_output_tokens=1,
        )
        engine.capture(hold, prompt_tokens=1, completion_tokens=1)
        Spike.objects.create(
            scope_type="agent",
            tenant=agent.tenant,
            agent=agent,
            kind=Spike.Kind.VELOCITY,
            hour=timezone.now() - timedelta(hours=n + 1),
            spend_nanos=3,
            baseline_nanos=0,
            threshold_nanos=2,
        )


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m._meta.label)
def test_each_changelist_reads_its_page_in_a_few_statements(admin_client, more_rows, model):
    with CaptureQueriesContext(connection) as queries:
        response = admin_client.get(admin_url(model, "changelist"))
    assert response.status_code == 200
    # Session, user, count, the page, and a filter's or the date drill-down's own reads:
    # never one per listed row.
    assert len(queries) <= 10, "\n".join(q["sql"] for q in queries)
