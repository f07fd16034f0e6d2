"""Admin actions go through the same services as the API and console: resets ask a
reason and leave the reset event, pausing and suspending carry theirs."""

from __future__ import annotations

from django.urls import reverse

from budgets.models import Agent, BudgetEvent, EventKind, Tenant

POLICIES = reverse("admin:budgets_budgetpolicy_changelist")
AGENTS = reverse("admin:budgets_agent_changelist")
TENANTS = reverse("admin:budgets_tenant_changelist")


def test_the_reset_action_asks_a_reason_first(admin_client, populated):
    response = admin_client.post(
        POLICIES, {"action": "reset_budget", "_selected_action": [populated.pk]}
    )
    assert response.status_code == 200
    page = response.content.decode()
    assert "Reason" in page
    assert str(populated) in page
    assert not populated.periods.filter(closed_at__isnull=False).exists()


def test_the_reset_action_resets_with_the_reason(admin_client, admin_user, populated):
    spent = populated.periods.get().spent_nanos
    response = admin_client.post(
        POLICIES,
        {
            "action": "reset_budget",
            "_selected_action": [populated.pk],
            "apply": "Reset budgets",
            "reason": "customer bought a top-up",
        },
    )
    assert response.status_code == 302
    closed = populated.periods.get(closed_at__isnull=False)
    assert (closed.close_reason, closed.closed_by) == ("customer bought a top-up", "admin")
    fresh = populated.periods.get(closed_at__isnull=True)
    event = BudgetEvent.objects.get(period=fresh, kind=EventKind.RESET)
    assert event.spent_nanos == spent
    assert event.detail == "reset by admin: customer bought a top-up"
    assert fresh.spent_nanos == 0


def test_a_reset_without_a_reason_is_refused(admin_client, populated):
    response = admin_client.post(
        POLICIES,
        {
            "action": "reset_budget",
            "_selected_action": [populated.pk],
            "apply": "Reset budgets",
            "reason": "",
        },
    )
    assert response.status_code == 200
    assert "This field is required" in response.content.decode()
    assert not populated.periods.filter(closed_at__isnull=False).exists()


def test_pause_asks_a_reason_and_resume_clears_it(admin_client, invoice_bot, churn_bot):
    asked = admin_client.post(AGENTS, {"action": "pause", "_selected_action": [invoice_bot.pk]})
    assert asked.status_code == 200
    assert not Agent.objects.get(pk=invoice_bot.pk).paused

    admin_client.post(
        AGENTS,
        {
            "action": "pause",
            "_selected_action": [invoice_bot.pk],
            "apply": "Pause agents",
            "reason": "runaway loop",
        },
    )

    paused = Agent.objects.get(pk=invoice_bot.pk)
    assert (paused.paused, paused.paused_reason) == (True, "runaway loop")
    assert paused.paused_at is not None
    assert not Agent.objects.get(pk=churn_bot.pk).paused

    admin_client.post(AGENTS, {"action": "resume", "_selected_action": [invoice_bot.pk]})

    resumed = Agent.objects.get(pk=invoice_bot.pk)
    assert (resumed.paused, resumed.paused_reason, resumed.paused_at) == (False, "", None)


def test_pausing_is_not_a_field_of_the_agent_form(admin_client, invoice_bot):
    page = admin_client.get(reverse("admin:budgets_agent_change", args=[invoice_bot.pk]))
    assert 'name="paused"' not in page.content.decode()


def test_suspend_and_resume_tenants(admin_client, acme, globex):
    admin_client.post(
        TENANTS,
        {
            "action": "suspend",
            "_selected_action": [acme.pk],
            "apply": "Suspend tenants",
            "reason": "abuse",
        },
    )
    acme.refresh_from_db()
    globex.refresh_from_db()
    assert (acme.status, acme.status_reason) == (Tenant.Status.SUSPENDED, "abuse")
    assert globex.status == Tenant.Status.ACTIVE

    admin_client.post(TENANTS, {"action": "resume", "_selected_action": [acme.pk]})
    acme.refresh_from_db()
    assert (acme.status, acme.status_reason) == (Tenant.Status.ACTIVE, "")


def test_tenants_and_agents_are_created_through_the_services(admin_client, db):
    response = admin_client.post(
        reverse("admin:budgets_tenant_add"), {"name": " Initech ", "stripe_customer_id": "cus_ini"}
    )
    assert response.status_code == 302
    tenant = Tenant.objects.get(stripe_customer_id="cus_ini")
    assert tenant.name == "Initech"

    response = admin_client.post(
        reverse("admin:budgets_agent_add"), {"tenant": tenant.pk, "name": "invoice-bot"}
    )
    assert response.status_code == 302
    assert Agent.objects.get(tenant=tenant).name == "invoice-bot"


def test_a_tenant_with_spend_cannot_be_deleted_and_the_page_says_why(admin_client, populated):
    tenant = populated.tenant
    response = admin_client.get(reverse("admin:budgets_tenant_delete", args=[tenant.pk]))
    assert response.status_code == 200
    page = response.content.decode()
    assert "1 spend entries (the ledger is append-only" in page
    response = admin_client.post(
        reverse("admin:budgets_tenant_delete", args=[tenant.pk]), {"post": "yes"}
    )
    assert Tenant.objects.filter(pk=tenant.pk).exists()
