"""Every admin page opens for staff and turns anonymous visitors to the login page."""

import pytest
from django.contrib import admin
from django.urls import reverse

from budgets import engine, services
from budgets.models import Agent, BudgetPolicy, ScopeType

MODELS = sorted(admin.site._registry, key=lambda m: m._meta.label)


@pytest.fixture
def populated(acme, invoice_bot, now):
    services.issue_key(invoice_bot)
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=10_000_000)
    scope = engine.state_of(acme, invoice_bot)
    from budgets.money import Prices

    hold = engine.authorize(
        scope, request_id="r1", model="m", prices=Prices(1, 1), input_tokens=1, max_output_tokens=1
    )
    engine.capture(hold, prompt_tokens=1, completion_tokens=1)


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m._meta.label)
def test_each_changelist_and_change_page_opens(admin_client, populated, model):
    opts = model._meta
    response = admin_client.get(reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist"))
    assert response.status_code == 200
    first = model.objects.first()
    if first is not None:
        response = admin_client.get(
            reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[first.pk])
        )
        assert response.status_code == 200


def test_anonymous_visitors_are_sent_to_login(client, db):
    response = client.get(reverse("admin:budgets_tenant_changelist"))
    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]


def test_the_reset_action_resets_budgets(admin_client, populated, acme):
    policy = BudgetPolicy.objects.get(tenant=acme)
    response = admin_client.post(
        reverse("admin:budgets_budgetpolicy_changelist"),
        {"action": "reset_budget", "_selected_action": [policy.pk]},
    )
    assert response.status_code == 302
    assert policy.periods.filter(closed_at__isnull=False).count() == 1


def test_the_pause_action_pauses_agents(admin_client, invoice_bot):
    admin_client.post(
        reverse("admin:budgets_agent_changelist"),
        {"action": "pause", "_selected_action": [invoice_bot.pk]},
    )
    assert Agent.objects.get(pk=invoice_bot.pk).paused
