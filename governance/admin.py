from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.utils.html import format_html

from routing.catalog import get_catalog

from . import alerts
from .admin_lists import LargeTable, TenantFilter, any_of, tenant_ids
from .models import AlertChannel, AlertDelivery, AlertKind, default_kinds


class AlertChannelForm(forms.ModelForm):
    kinds = forms.MultipleChoiceField(
        choices=AlertKind.choices,
        widget=forms.CheckboxSelectMultiple,
        initial=default_kinds,
        help_text="Alert kinds this channel gets.",
    )

    class Meta:
        model = AlertChannel
        fields = ("name", "tenant", "type", "target", "format", "kinds", "enabled")


@admin.register(AlertChannel)
class AlertChannelAdmin(admin.ModelAdmin):
    """Where alerts go. A channel gets the events of its tenant (of all tenants when it
    has none) from its creation on; disabling it holds its pending alerts back."""

    form = AlertChannelForm
    list_display = ("name", "tenant", "type", "destination", "format", "kinds_list", "enabled")
    list_filter = ("type", "enabled", "format")
    search_fields = ("name", "target", "tenant__name", "tenant__stripe_customer_id")
    list_select_related = ("tenant",)
    autocomplete_fields = ("tenant",)

    @admin.display(description="kinds")
    def kinds_list(self, obj: AlertChannel) -> str:
        return ", ".join(obj.kinds)


@admin.register(AlertDelivery)
class AlertDeliveryAdmin(LargeTable, admin.ModelAdmin):
    """The delivery log: one row per alert and channel, read-only."""

    list_display = (
        "created_at",
        "kind",
        "tenant",
        "channel",
        "status",
        "attempts",
        "next_attempt_at",
        "sent_at",
        "last_error",
    )
    list_filter = ("status", "kind", "source_type", "channel", TenantFilter)
    search_fields = ("=tenant__stripe_customer_id", "=channel__name")
    search_help_text = "A Stripe customer id (cus_...), a tenant's or a channel's name."
    date_hierarchy = "created_at"
    list_select_related = ("tenant", "channel")
    fields = (
        "channel",
        "tenant",
        "kind",
        "source_type",
        "source_id",
        "message",
        "payload",
        "status",
        "attempts",
        "next_attempt_at",
        "last_error",
        "created_at",
        "sent_at",
    )
    readonly_fields = fields
    actions = ("retry",)

    def get_search_results(self, request, queryset, search_term):
        """Resolved to tenant and channel ids first: a search over the joined names
        would read every delivery."""
        term = search_term.strip()
        if not term:
            return queryset, False
        channels = AlertChannel.objects.filter(name=term).values_list("pk", flat=True)
        return queryset.filter(any_of(tenant_id=tenant_ids(term), channel_id=list(channels))), False

    @admin.display(description="message")
    def message(self, obj: AlertDelivery) -> str:
        return format_html("<pre>{}</pre>", obj.payload.get("text", ""))

    @admin.action(description="Retry the selected failed deliveries")
    def retry(self, request, queryset) -> None:
        count = alerts.retry(queryset)
        self.message_user(request, f"{count} deliveries will be sent again.", messages.SUCCESS)

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


def model_prices(request: HttpRequest) -> TemplateResponse:
    """The model catalog's prices, read-only: they are edited in the catalog file
    (MODEL_CATALOG_PATH) and checked when the server starts."""
    catalog = get_catalog()
    return TemplateResponse(
        request,
        "admin/model_prices.html",
        {
            **admin.site.each_context(request),
            "title": "Model prices",
            "catalog": catalog,
            "models": [(model, sorted(model.capabilities)) for model in catalog.models.values()],
            "downgrades": [
                [model.id, *(step.id for step in catalog.downgrade_chain(model.id))]
                for model in catalog.models.values()
                if model.id in catalog.downgrades
            ],
            "fallbacks": [
                [model_id, *alternatives] for model_id, alternatives in catalog.fallback_ids.items()
            ],
        },
    )
