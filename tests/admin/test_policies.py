"""Policies saved in the admin go through budgets.services.set_policy: limits in USD,
the scope checked, and a change applied to the open period at once."""

from __future__ import annotations

from django.urls import reverse

from budgets.models import BudgetEvent, BudgetPolicy, EventKind, PeriodState, PolicySource

ADD = reverse("admin:budgets_budgetpolicy_add")


def form(**values) -> dict:
    return {
        "limit_nanos": "10",
        "window": "day",
        "warn_at": "0.5",
        "soft_cap": "0.8",
        "hard_cap": "1.0",
        "enabled": "on",
        "disabled_tools": "[]",
        "strategy": "",
        "velocity_limit_nanos": "",
        **values,
    }


def inlines(page) -> dict:
    """What a browser posts back for the change page's inlines: their management forms
    and the ids of the rows they show."""
    data = {}
    for inline in page.context["inline_admin_formsets"]:
        formset = inline.formset
        for name in formset.management_form.fields:
            data[f"{formset.prefix}-{name}"] = formset.management_form[name].value()
        for row in formset.forms:
            data[f"{row.prefix}-id"] = row["id"].value()
            data[f"{row.prefix}-policy"] = row["policy"].value()
    return data


def test_it_creates_a_policy_with_its_limit_in_usd(admin_client, acme, invoice_bot):
    response = admin_client.post(
        ADD, form(tenant=acme.pk, scope_type="agent", agent=invoice_bot.pk, limit_nanos="2.5")
    )
    assert response.status_code == 302
    policy = BudgetPolicy.objects.get()
    assert (policy.scope_key, policy.limit_nanos) == ("cus_acme:invoice-bot", 2_500_000_000)
    assert policy.source == PolicySource.OPERATOR


def test_it_refuses_a_scope_that_does_not_fit(admin_client, acme, globex):
    foreign = globex.agents.create(name="other-bot")
    response = admin_client.post(ADD, form(tenant=acme.pk, scope_type="agent", agent=foreign.pk))
    assert response.status_code == 200
    assert "an agent policy needs an agent of this tenant" in response.content.decode()
    assert not BudgetPolicy.objects.exists()


def test_it_refuses_a_second_policy_for_the_same_scope(admin_client, populated):
    response = admin_client.post(ADD, form(tenant=populated.tenant.pk, scope_type="tenant"))
    assert response.status_code == 200
    assert "already has a policy" in response.content.decode()
    assert BudgetPolicy.objects.filter(tenant=populated.tenant).count() == 1


def test_it_refuses_an_amount_finer_than_a_nanodollar(admin_client, acme):
    response = admin_client.post(
        ADD, form(tenant=acme.pk, scope_type="tenant", limit_nanos="0.0000000001")
    )
    assert response.status_code == 200
    assert "more precision than one nanodollar" in response.content.decode()


def test_raising_the_limit_applies_to_the_open_period_at_once(admin_client, populated):
    period = populated.periods.get()
    assert period.state != PeriodState.ACTIVE
    change = reverse("admin:budgets_budgetpolicy_change", args=[populated.pk])
    page = admin_client.get(change)
    assert 'value="0.001"' in page.content.decode()  # the limit shown in USD

    response = admin_client.post(change, form(limit_nanos="100", **inlines(page)))

    assert response.status_code == 302
    period.refresh_from_db()
    assert (period.limit_nanos, period.state) == (100_000_000_000, PeriodState.ACTIVE)
    assert BudgetEvent.objects.filter(period=period, kind=EventKind.RECOVERED).exists()


def test_the_scope_of_a_policy_cannot_be_changed(admin_client, populated, globex):
    change = reverse("admin:budgets_budgetpolicy_change", args=[populated.pk])
    page = admin_client.get(change)
    response = admin_client.post(
        change, form(tenant=globex.pk, scope_type="user", user_key="u1", **inlines(page))
    )
    assert response.status_code == 302
    populated.refresh_from_db()
    assert (populated.tenant_id, populated.scope_type) == (populated.tenant.pk, "tenant")
    assert populated.scope_key == "cus_acme"
