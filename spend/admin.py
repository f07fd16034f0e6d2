from django.contrib import admin

from budgets.money import nanos_to_usd

from .models import MeterAccount, MeterReport, SpendEntry


@admin.register(SpendEntry)
class SpendEntryAdmin(admin.ModelAdmin):
    """The ledger is append-only: visible, never editable."""

    list_display = (
        "created_at",
        "tenant",
        "agent",
        "model_used",
        "prompt_tokens",
        "completion_tokens",
        "cost_usd",
        "over_hold",
        "usage_estimated",
    )
    list_filter = ("model_used", "over_hold", "usage_estimated")
    search_fields = ("request_id", "tenant__stripe_customer_id", "agent__name", "user_key")
    date_hierarchy = "created_at"
    list_select_related = ("tenant", "agent")
    show_full_result_count = False

    @admin.display(description="cost (USD)", ordering="cost_nanos")
    def cost_usd(self, obj):
        return nanos_to_usd(obj.cost_nanos)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(MeterReport)
class MeterReportAdmin(admin.ModelAdmin):
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
    list_filter = ("status", "unit")
    search_fields = ("identifier", "stripe_customer_id")
    date_hierarchy = "created_at"
    list_select_related = ("tenant",)
    readonly_fields = [f.name for f in MeterReport._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(MeterAccount)
class MeterAccountAdmin(admin.ModelAdmin):
    list_display = ("tenant", "event_name", "unit", "claimed_amount", "claimed_units", "updated_at")
    list_select_related = ("tenant",)
    readonly_fields = [f.name for f in MeterAccount._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
