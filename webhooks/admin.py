import json

from django.contrib import admin, messages
from django.utils.html import format_html

from governance.admin_lists import LargeTable

from . import services
from .handlers import HANDLERS
from .models import EventStatus, StripeEvent, StripeSubscription


class HasWarning(admin.SimpleListFilter):
    title = "warning"
    parameter_name = "warning"

    def lookups(self, request, model_admin):
        return [("yes", "with a warning"), ("no", "without")]

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return queryset.exclude(warning="")
        if self.value() == "no":
            return queryset.filter(warning="")
        return queryset


class EventTypeFilter(admin.SimpleListFilter):
    """The types we handle, and the rest: listing the stored types would be a
    SELECT DISTINCT over every event."""

    title = "type"
    parameter_name = "type"

    def lookups(self, request, model_admin):
        return [(name, name) for name in sorted(HANDLERS)] + [("other", "other (not handled)")]

    def queryset(self, request, queryset):
        if self.value() == "other":
            return queryset.exclude(type__in=list(HANDLERS))
        if self.value():
            return queryset.filter(type=self.value())
        return queryset


@admin.register(StripeEvent)
class StripeEventAdmin(LargeTable, admin.ModelAdmin):
    """Events are Stripe's record: visible, re-runnable, never edited."""

    list_display = ("received_at", "type", "stripe_id", "customer_id", "status", "warning")
    list_filter = ("status", HasWarning, EventTypeFilter, "livemode")
    search_fields = ("=stripe_id", "=customer_id")
    search_help_text = "An event id (evt_...) or a Stripe customer id (cus_...)."
    date_hierarchy = "received_at"
    readonly_fields = (
        "stripe_id",
        "type",
        "api_version",
        "livemode",
        "created",
        "customer_id",
        "status",
        "attempts",
        "note",
        "warning",
        "error",
        "received_at",
        "handled_at",
        "pretty_payload",
    )
    exclude = ("payload",)
    actions = ["rerun"]

    @admin.display(description="payload")
    def pretty_payload(self, obj):
        return format_html("<pre>{}</pre>", json.dumps(obj.payload, indent=2, sort_keys=True))

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    @admin.action(description="Re-run selected events that failed or were not handled")
    def rerun(self, request, queryset):
        outcomes: dict[str, int] = {}
        skipped = 0
        for event in queryset.order_by("created", "id"):
            if event.status in (EventStatus.PROCESSED, EventStatus.IGNORED):
                skipped += 1
                continue
            event = services.rerun(event)
            outcomes[event.status] = outcomes.get(event.status, 0) + 1
        summary = ", ".join(f"{count} {status}" for status, count in outcomes.items())
        failed = outcomes.get(EventStatus.FAILED, 0) + outcomes.get(EventStatus.REJECTED, 0)
        self.message_user(
            request,
            f"Re-ran {sum(outcomes.values())} event(s): {summary or 'none'}"
            + (f"; {skipped} already handled, left alone" if skipped else ""),
            messages.WARNING if failed else messages.SUCCESS,
        )


@admin.register(StripeSubscription)
class StripeSubscriptionAdmin(admin.ModelAdmin):
    list_display = (
        "stripe_id",
        "customer_id",
        "status",
        "plan",
        "price_id",
        "current_period_end",
        "payment_failed_at",
        "warning",
    )
    list_filter = ("status", HasWarning, "plan")
    search_fields = ("stripe_id", "customer_id", "price_id", "price_lookup_key")
    list_select_related = ("plan",)
    readonly_fields = [f.name for f in StripeSubscription._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False
