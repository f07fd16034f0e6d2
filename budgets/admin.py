from django.contrib import admin, messages

from . import engine, services
from .models import (
    Agent,
    ApiKey,
    BudgetEvent,
    BudgetPeriod,
    BudgetPolicy,
    Hold,
    HoldLine,
    Plan,
    Tenant,
)
from .money import nanos_to_usd


def usd(field: str, label: str):
    def show(obj):
        return nanos_to_usd(getattr(obj, field))

    show.short_description = label
    show.admin_order_field = field
    return show


@admin.register(Plan)
class PlanAdmin(admin.ModelAdmin):
    list_display = (
        "name",
        "stripe_price",
        usd("limit_nanos", "limit (USD)"),
        "window",
        "is_default",
    )
    search_fields = ("name", "stripe_price")


class AgentInline(admin.TabularInline):
    model = Agent
    extra = 0
    fields = ("name", "paused", "paused_reason", "created_at")
    readonly_fields = ("created_at",)
    show_change_link = True


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = (
        "name",
        "stripe_customer_id",
        "status",
        "plan",
        "billing_period_end",
        "created_at",
    )
    list_filter = ("status", "plan")
    search_fields = ("name", "stripe_customer_id")
    inlines = [AgentInline]


class ApiKeyInline(admin.TabularInline):
    model = ApiKey
    extra = 0
    fields = ("prefix", "label", "created_at", "last_used_at", "revoked_at")
    readonly_fields = ("prefix", "created_at", "last_used_at")
    can_delete = False

    def has_add_permission(self, request, obj=None):
        # Keys are issued with `manage.py create_agent_key`, which shows the secret once.
        return False


@admin.register(Agent)
class AgentAdmin(admin.ModelAdmin):
    list_display = ("name", "tenant", "paused", "created_at")
    list_filter = ("paused",)
    search_fields = ("name", "tenant__name", "tenant__stripe_customer_id")
    list_select_related = ("tenant",)
    inlines = [ApiKeyInline]
    actions = ["pause", "resume"]

    @admin.action(description="Pause selected agents")
    def pause(self, request, queryset):
        for agent in queryset:
            services.set_agent_paused(agent, True, reason=f"paused by {request.user}")
        self.message_user(request, f"Paused {queryset.count()} agent(s).")

    @admin.action(description="Resume selected agents")
    def resume(self, request, queryset):
        for agent in queryset:
            services.set_agent_paused(agent, False)
        self.message_user(request, f"Resumed {queryset.count()} agent(s).")


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ("prefix", "agent", "label", "created_at", "last_used_at", "revoked_at")
    list_filter = ("revoked_at",)
    search_fields = ("key_id", "agent__name", "label")
    readonly_fields = ("agent", "key_id", "created_at", "last_used_at", "revoked_at")
    list_select_related = ("agent__tenant",)
    actions = ["revoke"]

    def has_add_permission(self, request):
        return False

    @admin.action(description="Revoke selected keys")
    def revoke(self, request, queryset):
        for key in queryset:
            services.revoke_key(key)
        self.message_user(request, f"Revoked {queryset.count()} key(s).")


class PeriodInline(admin.TabularInline):
    model = BudgetPeriod
    extra = 0
    can_delete = False
    fields = (
        "window_start",
        "window_end",
        "spent_nanos",
        "held_nanos",
        "limit_nanos",
        "state",
        "closed_at",
    )
    readonly_fields = fields
    ordering = ("-window_start",)
    max_num = 0

    def get_queryset(self, request):
        # Only the most recent periods: a long-lived hourly policy has thousands.
        ids = list(
            super()
            .get_queryset(request)
            .order_by("-window_start")
            .values_list("id", flat=True)[:10]
        )
        return super().get_queryset(request).filter(id__in=ids)


@admin.register(BudgetPolicy)
class BudgetPolicyAdmin(admin.ModelAdmin):
    list_display = (
        "scope_type",
        "scope_key",
        usd("limit_nanos", "limit (USD)"),
        "window",
        "enabled",
        "source",
    )
    list_filter = ("scope_type", "window", "enabled", "source")
    search_fields = ("scope_key",)
    readonly_fields = ("scope_key", "created_at", "updated_at")
    list_select_related = ("tenant",)
    inlines = [PeriodInline]
    actions = ["reset_budget"]

    @admin.action(description="Reset the current period of selected budgets")
    def reset_budget(self, request, queryset):
        for policy in queryset:
            engine.reset(policy, reason="reset from the admin", by=str(request.user))
        self.message_user(request, f"Reset {queryset.count()} budget(s).", messages.SUCCESS)


@admin.register(BudgetPeriod)
class BudgetPeriodAdmin(admin.ModelAdmin):
    list_display = (
        "policy",
        "window_start",
        "window_end",
        usd("spent_nanos", "spent (USD)"),
        usd("held_nanos", "held (USD)"),
        usd("limit_nanos", "limit (USD)"),
        "state",
        "closed_at",
    )
    list_filter = ("state", "policy__scope_type")
    search_fields = ("policy__scope_key",)
    date_hierarchy = "window_start"
    list_select_related = ("policy",)
    readonly_fields = [f.name for f in BudgetPeriod._meta.fields]

    def has_add_permission(self, request):
        return False


class HoldLineInline(admin.TabularInline):
    model = HoldLine
    extra = 0
    can_delete = False
    readonly_fields = ("period", "amount_nanos")


@admin.register(Hold)
class HoldAdmin(admin.ModelAdmin):
    list_display = (
        "request_id",
        "tenant",
        "agent",
        "model",
        usd("amount_nanos", "held (USD)"),
        "status",
        "expires_at",
    )
    list_filter = ("status",)
    search_fields = ("request_id", "tenant__stripe_customer_id")
    list_select_related = ("tenant", "agent")
    readonly_fields = [f.name for f in Hold._meta.fields]
    inlines = [HoldLineInline]
    date_hierarchy = "created_at"

    def has_add_permission(self, request):
        return False


@admin.register(BudgetEvent)
class BudgetEventAdmin(admin.ModelAdmin):
    list_display = (
        "created_at",
        "kind",
        "period",
        usd("spent_nanos", "spent (USD)"),
        usd("limit_nanos", "limit (USD)"),
    )
    list_filter = ("kind",)
    search_fields = ("period__policy__scope_key",)
    list_select_related = ("period__policy",)
    readonly_fields = ("period", "kind", "spent_nanos", "limit_nanos", "detail", "created_at")
    date_hierarchy = "created_at"

    def has_add_permission(self, request):
        return False


admin.site.empty_value_display = "—"
