"""Demo data for the embedded default, so the console has something to show.
Idempotent: running it again changes nothing that exists."""

import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from budgets import services
from budgets.models import Agent, BudgetPolicy, ScopeType, Tenant, Window
from budgets.money import usd_to_nanos

DEMO_CUSTOMER = "cus_demo"
DEMO_AGENTS = ("invoice-bot", "support-bot")


class Command(BaseCommand):
    help = "Create (once) a demo tenant with two agents and budgets, and a demo admin user."

    def add_arguments(self, parser):
        parser.add_argument("--admin-user", default="admin")

    def handle(self, *args, admin_user, **options):
        tenant = Tenant.objects.filter(stripe_customer_id=DEMO_CUSTOMER).first()
        if tenant is None:
            tenant = services.create_tenant("Demo Tenant", DEMO_CUSTOMER)
            self.stdout.write(f"Created demo tenant {DEMO_CUSTOMER}")
        for name in DEMO_AGENTS:
            if not Agent.objects.filter(tenant=tenant, name=name).exists():
                agent = services.create_agent(tenant, name)
                services.issue_key(agent, label="demo")
                self.stdout.write(f"Created demo agent {name}")
        if not BudgetPolicy.objects.filter(tenant=tenant, scope_type=ScopeType.TENANT).exists():
            services.set_policy(
                tenant, ScopeType.TENANT, limit_nanos=usd_to_nanos("50"), window=Window.MONTH
            )
            support = Agent.objects.get(tenant=tenant, name="support-bot")
            services.set_policy(
                tenant,
                ScopeType.AGENT,
                agent=support,
                limit_nanos=usd_to_nanos("5"),
                window=Window.DAY,
            )
            self.stdout.write(
                "Created demo budgets: USD 50 a month for the tenant, USD 5 a day for support-bot"
            )
        self._admin(admin_user)

    def _admin(self, username: str) -> None:
        """The demo admin's password lives in var/ so `make run` can print it every time."""
        path = settings.VAR_DIR / "admin-password"
        user_model = get_user_model()
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_urlsafe(12))
            path.chmod(0o600)
        password = path.read_text().strip()
        user = user_model.objects.filter(username=username).first()
        if user is None:
            user_model.objects.create_superuser(username, "", password)
            self.stdout.write(f"Created admin user {username}")
        self.stdout.write(f"Log in as {username} / {password}")
