from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command

from budgets import services
from budgets.models import Agent, BudgetPolicy, Plan, Tenant


def run(*args):
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def test_create_tenant(db):
    output = run("create_tenant", "--name", "Acme Inc", "--stripe-customer", "cus_acme")
    assert "cus_acme" in output
    assert Tenant.objects.get(stripe_customer_id="cus_acme").name == "Acme Inc"


def test_create_tenant_with_a_plan(db):
    Plan.objects.create(name="pro", limit_nanos=1000, window="month")
    run("create_tenant", "--name", "Acme", "--stripe-customer", "cus_acme", "--plan", "pro")
    assert Tenant.objects.get().plan.name == "pro"


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--name", "Acme", "--stripe-customer", "acme"], "Stripe customer id"),
        (
            ["--name", "Acme", "--stripe-customer", "cus_acme", "--plan", "gold"],
            "no plan named 'gold'",
        ),
    ],
)
def test_create_tenant_refuses_bad_input(db, args, problem):
    with pytest.raises(CommandError, match=problem):
        run("create_tenant", *args)
    assert not Tenant.objects.exists()


def test_create_agent_key_prints_a_working_key_on_its_last_line(acme):
    output = run("create_agent_key", "--tenant", "cus_acme", "--agent", "invoice-bot")
    raw = output.strip().splitlines()[-1]
    key = services.authenticate_key(raw)
    assert key.agent.name == "invoice-bot"
    assert key.agent.tenant == acme
    # A second key for the same agent reuses the agent.
    run("create_agent_key", "--tenant", "cus_acme", "--agent", "invoice-bot")
    assert Agent.objects.filter(tenant=acme).count() == 1
    assert key.agent.keys.count() == 2


def test_create_agent_key_refuses_an_unknown_tenant(db):
    with pytest.raises(CommandError, match="no tenant with Stripe customer id 'cus_nope'"):
        run("create_agent_key", "--tenant", "cus_nope", "--agent", "bot")


def test_create_agent_key_refuses_a_bad_agent_name(acme):
    with pytest.raises(CommandError, match="letters, digits"):
        run("create_agent_key", "--tenant", "cus_acme", "--agent", "bad name")


def test_seed_demo_is_idempotent(db, settings, tmp_path):
    settings.VAR_DIR = tmp_path
    first = run("seed_demo")
    second = run("seed_demo")
    assert "Created demo tenant" in first and "Created demo tenant" not in second
    assert Tenant.objects.count() == 1
    assert Agent.objects.count() == 2
    assert BudgetPolicy.objects.count() == 2
    password = (tmp_path / "admin-password").read_text()
    assert f"admin / {password}" in second
    assert get_user_model().objects.get(username="admin").check_password(password)
