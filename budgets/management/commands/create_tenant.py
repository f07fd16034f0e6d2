from django.core.management.base import BaseCommand, CommandError

from budgets import services
from budgets.errors import InvalidRequest
from budgets.models import Plan


class Command(BaseCommand):
    help = "Create a tenant (a Stripe customer whose agents' LLM spend is governed)."

    def add_arguments(self, parser):
        parser.add_argument("--name", required=True, help="Display name, e.g. 'Acme Inc'")
        parser.add_argument("--stripe-customer", required=True, help="Stripe customer id, cus_...")
        parser.add_argument("--plan", help="Name of an existing plan")

    def handle(self, *args, name, stripe_customer, plan=None, **options):
        plan_row = None
        if plan:
            plan_row = Plan.objects.filter(name=plan).first()
            if plan_row is None:
                known = ", ".join(Plan.objects.values_list("name", flat=True)) or "none"
                raise CommandError(f"no plan named {plan!r} (known plans: {known})")
        try:
            tenant = services.create_tenant(name, stripe_customer, plan=plan_row)
        except InvalidRequest as exc:
            raise CommandError(exc.message) from None
        self.stdout.write(f"Created tenant {tenant.name} ({tenant.stripe_customer_id})")
