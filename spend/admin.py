from __future__ import annotations

from django.contrib import admin
from django.utils.html import format_html

from budgets.models import Agent
from budgets.money import nanos_to_usd
from governance.admin_lists import AgentFilter, LargeTable, TenantFilter, any_of, tenant_ids

from .models import MeterAccount, MeterReport, SpendEntry, Spike

# The model filter offers the models of this many most recent calls (read from the
# primary key's index): a SELECT DISTINCT over the whole ledger is a full scan.
RECENT_CALLS = 1000
FLAG_PARAMS = ("over_hold__exact", "usage_estimated__exact")


class ModelFilter(admin.SimpleListFilter):
    title = "model used"
    parameter_name = "model"

    def lookups(self, request, model_admin):
        recent = SpendEntry.objects.order_by("-pk").values_list("model_used", flat=True)
        names = set(recent[:RECENT_CALLS])
        if self.value():
            names.add(self.value())
        return [(name, name) for name in sorted(names)]

    def queryset(self, request, queryset):
        if self.value():
            return queryset.filter(model_used=self.value())
        return queryset


class ReadOnly:
    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(SpendEntry)
class SpendEntryAdmin(ReadOnly, LargeTable, admin.ModelAdmin):
    """The ledger is append-only: visible, never editable. Every filter and the search
    land on an index (tenant, agent, request id, time); none reads the whole table."""

    list_display = (
        "created_at",
        "tenant_link",
        "agent_link",
        "user_key",
        "model_link",
        "prompt_tokens",
        "completion_tokens",
        "cost_usd",
        "over_hold",
        "usage_estimated",
    )
    list_filter = (TenantFilter, AgentFilter, ModelFilter, "over_hold", "usage_estimated")
    search_fields = ("request_id",)
    search_help_text = (
        "A request id, a Stripe customer id (cus_...), an agent or tenant name, or "
        "cus_...:name for one agent or end user of a tenant (exact matches)."
    )
    date_hierarchy = "created_at"
    ordering = ("-created_at", "-id")
    list_select_related = ("tenant", "agent")

    def get_ordering(self, request):
        # Flagged rows are rare and the flags have no index: the whole table is read
        # to find them, in rowid order (one pass) rather than through the time index
        # (a lookup per row, ~4x slower on SQLite). Ids follow time, so the order holds.
        if any(flag in request.GET for flag in FLAG_PARAMS):
            return ("-id",)
        return super().get_ordering(request)

    @admin.display(description="cost (USD)", ordering="cost_nanos")
    def cost_usd(self, obj):
        return nanos_to_usd(obj.cost_nanos)

    @admin.display(description="tenant", ordering="tenant")
    def tenant_link(self, obj):
        return format_html(
            '<a href="?tenant={}" title="only this tenant">{}</a>',
            obj.tenant.stripe_customer_id,
            obj.tenant,
        )

    @admin.display(description="agent", ordering="agent")
    def agent_link(self, obj):
        if obj.agent is None:
            return None
        return format_html(
            '<a href="?agent={}" title="only this agent">{}</a>', obj.agent_id, obj.agent.name
        )

    @admin.display(description="model", ordering="model_used")
    def model_link(self, obj):
        return format_html(
            '<a href="?model={}" title="only this model">{}</a>', obj.model_used, obj.model_used
        )

    def get_search_results(self, request, queryset, search_term):
        """Exact matches, each resolved first to ids of an indexed column of the ledger:
        Django's default (icontains over joined columns) reads every row."""
        term = search_term.strip()
        if not term:
            return queryset, False
        customer, _, name = term.partition(":")
        if customer.startswith("cus_") and name:
            tenants = tenant_ids(customer)
            agents = Agent.objects.filter(tenant_id__in=tenants, name=name)
            agent_ids = list(agents.values_list("pk", flat=True))
            users = queryset.filter(tenant_id__in=tenants, user_key=name)
            if agent_ids:
                return queryset.filter(agent_id__in=agent_ids), False
            return users, False
        by_request = SpendEntry.objects.filter(request_id=term).values_list("pk", flat=True)
        agents = Agent.objects.filter(name=term).values_list("pk", flat=True)
        match = any_of(
            pk=list(by_request), tenant_id=tenant_ids(term), agent_id=list(agents[:1000])
        )
        return queryset.filter(match), False


@admin.register(MeterReport)
class MeterReportAdmin(ReadOnly, LargeTable, admin.ModelAdmin):
    """Usage batches sent (or waiting to be sent) to Stripe meter events."""

    list_display = (
        "created_at",
        "stripe_customer_id",
        "value",
        "unit",
        "status",
        "attempts",
        "next_attempt_at",
        "last_error",
    )
    list_filter = ("status", "unit", TenantFilter)
    search_fields = ("=identifier", "=tenant__stripe_customer_id")
    search_help_text = "A meter event identifier or a Stripe customer id (cus_...)."

    def get_search_results(self, request, queryset, search_term):
        term = search_term.strip()
        if not term:
            return queryset, False
        by_identifier = MeterReport.objects.filter(identifier=term).values_list("pk", flat=True)
        match = any_of(pk=list(by_identifier), tenant_id=tenant_ids(term))
        return queryset.filter(match), False

    date_hierarchy = "created_at"
    readonly_fields = [f.name for f in MeterReport._meta.fields]


@admin.register(MeterAccount)
class MeterAccountAdmin(ReadOnly, admin.ModelAdmin):
    list_display = ("tenant", "event_name", "unit", "claimed_amount", "claimed_units", "updated_at")
    list_filter = ("unit", TenantFilter)
    list_select_related = ("tenant",)
    readonly_fields = [f.name for f in MeterAccount._meta.fields]


@admin.register(Spike)
class SpikeAdmin(ReadOnly, LargeTable, admin.ModelAdmin):
    """Spend far above a scope's baseline, or over its velocity limit (spend.spikes)."""

    list_display = (
        "hour",
        "kind",
        "scope_type",
        "tenant",
        "agent",
        "spend_usd",
        "baseline_usd",
        "threshold_usd",
        "agent_paused",
        "detected_at",
    )
    list_filter = ("kind", "scope_type", "agent_paused", TenantFilter)
    list_select_related = ("tenant", "agent__tenant")
    date_hierarchy = "detected_at"
    readonly_fields = [f.name for f in Spike._meta.fields]

    @admin.display(description="spend in the hour (USD)", ordering="spend_nanos")
    def spend_usd(self, obj):
        return nanos_to_usd(obj.spend_nanos)

    @admin.display(description="baseline (USD/hour)")
    def baseline_usd(self, obj):
        return nanos_to_usd(obj.baseline_nanos)

    @admin.display(description="threshold (USD)")
    def threshold_usd(self, obj):
        return nanos_to_usd(obj.threshold_nanos)
