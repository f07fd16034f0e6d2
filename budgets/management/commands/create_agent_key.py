from django.core.management.base import BaseCommand, CommandError

from budgets import services
from budgets.errors import InvalidRequest
from budgets.models import Agent, Tenant


class Command(BaseCommand):
    help = (
        "Issue an API key for an agent of a tenant (the agent is created if it does not "
        "exist). The key is printed once, on the last line."
    )

    def add_arguments(self, parser):
        parser.add_argument("--tenant", required=True, help="The tenant's Stripe customer id")
        parser.add_argument("--agent", required=True, help="Agent name, e.g. invoice-bot")
        parser.add_argument("--label", default="", help="A note to recognise the key by")

    def handle(self, *args, tenant, agent, label, **options):
        tenant_row = Tenant.objects.filter(stripe_customer_id=tenant).first()
        if tenant_row is None:
            raise CommandError(f"no tenant with Stripe customer id {tenant!r}")
        try:
            agent_row = Agent.objects.filter(tenant=tenant_row, name=agent).first()
            if agent_row is None:
                agent_row = services.create_agent(tenant_row, agent)
                self.stdout.write(f"Created agent {agent_row.name}")
        except InvalidRequest as exc:
            raise CommandError(exc.message) from None
        key, raw_key = services.issue_key(agent_row, label)
        self.stdout.write(
            f"Key {key.prefix}… for agent {agent_row.name} of {tenant_row.stripe_customer_id}. "
            "It is shown only now; store it safely:"
        )
        self.stdout.write(raw_key)
