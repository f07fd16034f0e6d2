"""The admin's raw records of budgets. Every change that has a service goes through it
(issuing and revoking keys, pausing agents, suspending tenants, setting policies,
resets), so the admin leaves the same events and audit trail as the API and console."""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import OuterRef, Subquery
from django.http import HttpRequest, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.cache import add_never_cache_headers
from django.utils.html import format_html

from governance.admin_lists import AgentFilter, LargeTable, TenantFilter, tenant_filter
from spend.models import SpendEntry

from . import engine, services
from .errors import InvalidRequest
from .models import (
    Agent,
    ApiKey,
    BudgetEvent,
    BudgetPeriod,
    BudgetPolicy,
    Hold,
    HoldLine,
    HoldStatus,
    Plan,
    PolicySource,
    Tenant,
)
from .money import InvalidAmount, nanos_to_usd, usd_to_nanos

# More related rows than this and a delete confirmation counts them instead of listing.
LISTED_ON_DELETE = 500


def usd(field: str, label: str):
    def show(obj):
        value = getattr(obj, field)
        return None if value is None else nanos_to_usd(value)

    show.short_description = label
    show.admin_order_field = field
    return show


class UsdField(forms.CharField):
    """An amount in nanodollars, shown and typed as a USD decimal string ("12.5")."""

    def prepare_value(self, value):
        return nanos_to_usd(value) if isinstance(value, int) else value

    def to_python(self, value):
        value = super().to_python(value)
        if value in self.empty_values:
            return None
        try:
            return usd_to_nanos(value)
        except InvalidAmount as exc:
            raise ValidationError(str(exc)) from None


USD_FIELDS = {
    "limit_nanos": ("Limit (USD)", "Budget per window, in USD, e.g. 12.5"),
    "velocity_limit_nanos": (
        "Velocity limit (USD per hour)",
        "Spend per rolling hour, per agent, that is a runaway.",
    ),
}


class UsdFieldsMixin:
    def formfield_for_dbfield(self, db_field, request, **kwargs):
        if db_field.name in USD_FIELDS:
            label, help_text = USD_FIELDS[db_field.name]
            return UsdField(label=label, help_text=help_text, required=not db_field.null)
        return super().formfield_for_dbfield(db_field, request, **kwargs)


class ReasonForm(forms.Form):
    reason = forms.CharField(max_length=500, widget=forms.TextInput(attrs={"size": 60}))


def ask_reason(modeladmin, request, queryset, *, action: str, title: str, apply) -> object:
    """An action's intermediate page asking for a reason (Django's delete-confirmation
    pattern). Once posted with a reason, `apply(obj, reason)` runs for each object."""
    form = ReasonForm(request.POST if "apply" in request.POST else None)
    if form.is_bound and form.is_valid():
        done, refused = 0, []
        for obj in queryset:
            try:
                apply(obj, form.cleaned_data["reason"])
                done += 1
            except InvalidRequest as exc:
                refused.append(f"{obj}: {exc.message}")
        modeladmin.message_user(request, f"{title}: {done} done.", messages.SUCCESS)
        for problem in refused:
            modeladmin.message_user(request, problem, messages.ERROR)
        return None
    return TemplateResponse(
        request,
        "admin/action_reason.html",
        {
            **modeladmin.admin_site.each_context(request),
            "title": title,
            "opts": modeladmin.model._meta,
            "objects": queryset,
            "form": form,
            "action": action,
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
        },
    )


class BoundedDeletion:
    """Django's delete confirmation lists every related row, and a busy tenant has
    millions. Past LISTED_ON_DELETE rows they are counted instead; rows of the ledger
    (which is append-only and protects its tenant and agent) refuse the deletion."""

    # (related model, lookup from it to the deleted objects)
    counted_relations: tuple[tuple[type, str], ...] = ()
    ledger_lookup = ""

    def get_deleted_objects(self, objs, request):
        pks = [obj.pk for obj in objs]
        if self.ledger_lookup:
            spent = SpendEntry.objects.filter(**{f"{self.ledger_lookup}__in": pks}).count()
            if spent:
                protected = [
                    f"{spent:,} spend entries (the ledger is append-only: what has spent "
                    "stays; suspend or pause it instead)"
                ]
                return [str(obj) for obj in objs], {}, set(), protected
        counts = {
            model: model.objects.filter(**{f"{lookup}__in": pks}).count()
            for model, lookup in self.counted_relations
        }
        if sum(counts.values()) <= LISTED_ON_DELETE:
            return super().get_deleted_objects(objs, request)
        perms_needed = {
            model._meta.verbose_name
            for model, count in counts.items()
            if count
            and model in self.admin_site._registry
            and not self.admin_site._registry[model].has_delete_permission(request)
        }
        model_count = {self.model._meta.verbose_name_plural: len(pks)} | {
            model._meta.verbose_name_plural: count for model, count in counts.items() if count
        }
        listed = [str(obj) for obj in objs] + [
            [f"{count:,} {model._meta.verbose_name_plural}" for model, count in counts.items()]
        ]
        return listed, model_count, perms_needed, []


class InlinesOnChange:
    """Inlines list what an object already has: nothing to show while adding it."""

    def get_inlines(self, request, obj):
        return self.inlines if obj is not None else []


def policies_named(term: str) -> list[int]:
    """Policies whose scope key starts with the term ("cus_acme" finds the tenant's
    own, its agents' and its users'): read from the policies, a small table, so the
    periods and events are then filtered on an indexed id."""
    found = BudgetPolicy.objects.filter(scope_key__startswith=term.strip())
    return list(found.values_list("pk", flat=True)[:1000])


class ViewOnly:
    """Records the engine writes: visible, never added or edited by hand. Deletion stays
    possible (a deleted policy takes its periods along) but not as a bulk action."""

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def get_actions(self, request):
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)
        return actions


# --- Plans and tenants --------------------------------------------------------------


@admin.register(Plan)
class PlanAdmin(UsdFieldsMixin, admin.ModelAdmin):
    list_display = (
        "name",
        "stripe_price",
        usd("limit_nanos", "limit (USD)"),
        "window",
        "strategy",
        "is_default",
    )
    list_filter = ("window", "is_default")
    search_fields = ("name", "stripe_price")


class AgentInline(admin.TabularInline):
    """A tenant's agents, read-only: agents are added on their own page and paused with
    the Agents actions, so a pause always carries its time and reason."""

    model = Agent
    extra = 0
    fields = ("name", "paused", "paused_reason", "created_at")
    readonly_fields = fields
    show_change_link = True
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Tenant)
class TenantAdmin(InlinesOnChange, BoundedDeletion, admin.ModelAdmin):
    list_display = (
        "name",
        "stripe_customer_id",
        "status",
        "plan",
        "billing_period_end",
        "created_at",
    )
    list_filter = ("status", "plan")
    search_fields = ("name", "=stripe_customer_id")
    list_select_related = ("plan",)
    inlines = [AgentInline]
    actions = ["suspend", "resume"]
    ledger_lookup = "tenant"
    counted_relations = (
        (Hold, "tenant"),
        (BudgetPeriod, "policy__tenant"),
        (BudgetEvent, "period__policy__tenant"),
    )

    def get_readonly_fields(self, request, obj=None):
        # Status moves through the suspend/resume actions (with a reason); plan and
        # billing period come from Stripe's subscription events.
        fixed = ["status", "status_reason", "billing_period_start", "billing_period_end"]
        fixed += ["created_at", "updated_at"]
        return fixed + (["stripe_customer_id", "plan"] if obj else [])

    def save_model(self, request, obj, form, change):
        if change:
            return super().save_model(request, obj, form, change)
        tenant = services.create_tenant(obj.name, obj.stripe_customer_id, obj.plan)
        obj.pk, obj.created_at, obj.updated_at = tenant.pk, tenant.created_at, tenant.updated_at
        obj._state.adding = False

    @admin.action(description="Suspend selected tenants (their calls are refused)")
    def suspend(self, request, queryset):
        return ask_reason(
            self,
            request,
            queryset,
            action="suspend",
            title="Suspend tenants",
            apply=lambda tenant, reason: services.set_tenant_suspended(tenant, True, reason),
        )

    @admin.action(description="Resume selected tenants")
    def resume(self, request, queryset):
        for tenant in queryset:
            services.set_tenant_suspended(tenant, False)
        self.message_user(request, f"Resumed {queryset.count()} tenant(s).", messages.SUCCESS)


# --- Agents and keys ----------------------------------------------------------------


class ApiKeyInline(admin.TabularInline):
    model = ApiKey
    extra = 0
    fields = ("prefix", "label", "created_at", "last_used_at", "revoked_at")
    readonly_fields = fields
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None):
        # Issued on the key's own add page, which shows the secret once.
        return False


@admin.register(Agent)
class AgentAdmin(InlinesOnChange, BoundedDeletion, admin.ModelAdmin):
    list_display = ("name", "tenant", "paused", "paused_reason", "strategy", "created_at")
    list_filter = ("paused", TenantFilter)
    search_fields = ("name", "=tenant__stripe_customer_id", "tenant__name")
    list_select_related = ("tenant",)
    autocomplete_fields = ("tenant",)
    inlines = [ApiKeyInline]
    actions = ["pause", "resume"]
    ledger_lookup = "agent"
    counted_relations = ((BudgetPeriod, "policy__agent"), (BudgetEvent, "period__policy__agent"))

    def get_readonly_fields(self, request, obj=None):
        fixed = ["paused", "paused_reason", "paused_at", "created_at"]
        return fixed + (["tenant", "issue_key"] if obj else [])

    @admin.display(description="keys")
    def issue_key(self, obj: Agent) -> str:
        url = reverse("admin:budgets_apikey_add") + f"?agent={obj.pk}"
        return format_html('<a class="addlink" href="{}">Issue a new key</a>', url)

    def save_model(self, request, obj, form, change):
        if change:
            return super().save_model(request, obj, form, change)
        agent = services.create_agent(obj.tenant, obj.name)
        obj.pk, obj.created_at = agent.pk, agent.created_at
        obj._state.adding = False

    @admin.action(description="Pause selected agents (their calls are refused)")
    def pause(self, request, queryset):
        return ask_reason(
            self,
            request,
            queryset,
            action="pause",
            title="Pause agents",
            apply=lambda agent, reason: services.set_agent_paused(agent, True, reason),
        )

    @admin.action(description="Resume selected agents")
    def resume(self, request, queryset):
        for agent in queryset:
            services.set_agent_paused(agent, False)
        self.message_user(request, f"Resumed {queryset.count()} agent(s).", messages.SUCCESS)


class IssueKeyForm(forms.ModelForm):
    class Meta:
        model = ApiKey
        fields = ("agent", "label")


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    """Adding a key issues one through budgets.services.issue_key and shows the secret
    on the page that answers the form, once: it is never stored (only its SHA-256),
    never put in a URL, a message or a log."""

    list_display = ("prefix", "agent", "label", "created_at", "last_used_at", "revoked_at")
    list_filter = ("revoked_at", "created_at")
    search_fields = ("=key_id", "label", "agent__name", "=agent__tenant__stripe_customer_id")
    list_select_related = ("agent__tenant",)
    autocomplete_fields = ("agent",)
    actions = ["revoke"]
    change_form_template = "admin/budgets/apikey/change_form.html"

    def get_form(self, request, obj=None, change=False, **kwargs):
        if obj is None:
            kwargs["form"] = IssueKeyForm
        return super().get_form(request, obj, change, **kwargs)

    def get_fields(self, request, obj=None):
        if obj is None:
            return ("agent", "label")
        return ("agent", "prefix", "label", "created_at", "last_used_at", "revoked_at")

    def get_readonly_fields(self, request, obj=None):
        if obj is None:
            return ()
        return ("agent", "prefix", "created_at", "last_used_at", "revoked_at")

    def save_model(self, request, obj, form, change):
        if change:
            return super().save_model(request, obj, form, change)
        key, secret = services.issue_key(obj.agent, obj.label)
        obj.pk, obj.key_id, obj.key_hash = key.pk, key.key_id, key.key_hash
        obj.created_at = key.created_at
        obj._state.adding = False
        # Handed to response_add on this request only.
        request._issued_key_secret = secret

    def response_add(self, request, obj, post_url_continue=None):
        secret = getattr(request, "_issued_key_secret", None)
        if secret is None:
            return super().response_add(request, obj, post_url_continue)
        response = TemplateResponse(
            request,
            "admin/budgets/apikey/issued.html",
            {
                **self.admin_site.each_context(request),
                "title": "Key issued",
                "opts": self.model._meta,
                "key": obj,
                "secret": secret,
                "change_url": reverse("admin:budgets_apikey_change", args=[obj.pk]),
                "add_url": reverse("admin:budgets_apikey_add") + f"?agent={obj.agent_id}",
            },
        )
        add_never_cache_headers(response)
        return response

    def get_urls(self):
        return [
            path(
                "<path:object_id>/revoke/",
                self.admin_site.admin_view(self.revoke_view),
                name="budgets_apikey_revoke",
            ),
            *super().get_urls(),
        ]

    def revoke_view(self, request: HttpRequest, object_id: str):
        """The change page's Revoke button: a confirmation page, then the revocation."""
        key = get_object_or_404(ApiKey.objects.select_related("agent__tenant"), pk=object_id)
        if not self.has_change_permission(request, key):
            raise PermissionDenied
        change_url = reverse("admin:budgets_apikey_change", args=[key.pk])
        if request.method == "POST":
            services.revoke_key(key)
            self.log_change(request, key, [{"changed": {"fields": ["revoked_at"]}}])
            self.message_user(request, f"Key {key.prefix}… revoked.", messages.SUCCESS)
            return HttpResponseRedirect(change_url)
        return self._revoke_confirmation(request, [key], cancel_url=change_url)

    def _revoke_confirmation(self, request, keys, cancel_url: str, action: str = ""):
        return TemplateResponse(
            request,
            "admin/budgets/apikey/revoke_confirmation.html",
            {
                **self.admin_site.each_context(request),
                "title": "Revoke keys?",
                "opts": self.model._meta,
                "keys": keys,
                "action": action,
                "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
                "cancel_url": cancel_url,
            },
        )

    @admin.action(description="Revoke selected keys")
    def revoke(self, request, queryset):
        if request.POST.get("post") != "yes":
            return self._revoke_confirmation(
                request,
                list(queryset.select_related("agent__tenant")),
                cancel_url=reverse("admin:budgets_apikey_changelist"),
                action="revoke",
            )
        for key in queryset:
            services.revoke_key(key)
            self.log_change(request, key, [{"changed": {"fields": ["revoked_at"]}}])
        self.message_user(request, f"Revoked {queryset.count()} key(s).", messages.SUCCESS)
        return None


# --- Policies and periods -----------------------------------------------------------


class PeriodInline(admin.TabularInline):
    """The current period first, then the ones before it."""

    model = BudgetPeriod
    verbose_name_plural = "periods (the current one and the nine before)"
    extra = 0
    can_delete = False
    fields = (
        "window_start",
        "window_end",
        "spent_usd",
        "held_usd",
        "limit_usd",
        "state",
        "closed_at",
        "close_reason",
    )
    readonly_fields = fields
    ordering = ("-window_start",)
    max_num = 0
    show_change_link = True

    @admin.display(description="spent (USD)")
    def spent_usd(self, period: BudgetPeriod) -> str:
        return usd("spent_nanos", "")(period)

    @admin.display(description="held (USD)")
    def held_usd(self, period: BudgetPeriod) -> str:
        return usd("held_nanos", "")(period)

    @admin.display(description="limit (USD)")
    def limit_usd(self, period: BudgetPeriod) -> str:
        return usd("limit_nanos", "")(period)

    def get_queryset(self, request):
        # Only the most recent periods: a long-lived hourly policy has thousands.
        now = timezone.now()
        ids = list(
            super()
            .get_queryset(request)
            .filter(window_start__lte=now)
            .order_by("-window_start")
            .values_list("id", flat=True)[:10]
        )
        return super().get_queryset(request).filter(id__in=ids)


class PolicyForm(forms.ModelForm):
    class Meta:
        model = BudgetPolicy
        fields = (
            "tenant",
            "scope_type",
            "agent",
            "user_key",
            "limit_nanos",
            "window",
            "warn_at",
            "soft_cap",
            "hard_cap",
            "enabled",
            "disabled_tools",
            "strategy",
            "velocity_limit_nanos",
            "auto_pause",
        )

    def clean(self):
        data = super().clean()
        tools = data.get("disabled_tools")
        if tools is not None and not (
            isinstance(tools, list) and all(isinstance(t, str) and 0 < len(t) <= 64 for t in tools)
        ):
            self.add_error("disabled_tools", 'A list of tool names, e.g. ["web_search"].')
        velocity = data.get("velocity_limit_nanos")
        if velocity is not None and velocity <= 0:
            self.add_error("velocity_limit_nanos", "A positive amount of USD per hour.")
        if self.instance.pk is None and data.get("tenant") and data.get("scope_type"):
            try:
                scope = services.policy_scope(
                    data["scope_type"], data["tenant"], data.get("agent"), data.get("user_key", "")
                )
            except InvalidRequest as exc:
                raise ValidationError(exc.message) from None
            existing = BudgetPolicy.objects.filter(
                scope_type=data["scope_type"], scope_key=scope["scope_key"]
            ).first()
            if existing is not None:
                raise ValidationError(f"{existing} already has a policy: change that one.")
        return data


def _current_period(field: str):
    return Subquery(
        BudgetPeriod.objects.filter(
            policy=OuterRef("pk"),
            closed_at__isnull=True,
            window_start__lte=timezone.now(),
            window_end__gt=timezone.now(),
        )
        .order_by("-window_start")
        .values(field)[:1]
    )


@admin.register(BudgetPolicy)
class BudgetPolicyAdmin(UsdFieldsMixin, InlinesOnChange, BoundedDeletion, admin.ModelAdmin):
    """Saved through budgets.services.set_policy, like the API and the console: a changed
    limit or threshold applies to the open period at once."""

    form = PolicyForm
    list_display = (
        "scope_type",
        "scope_key",
        usd("limit_nanos", "limit (USD)"),
        "window",
        "current_state",
        "current_spent",
        "enabled",
        "source",
    )
    list_filter = ("scope_type", "window", "enabled", "source", TenantFilter)
    search_fields = ("^scope_key",)
    list_select_related = ("tenant",)
    autocomplete_fields = ("tenant", "agent")
    inlines = [PeriodInline]
    actions = ["reset_budget"]
    counted_relations = ((BudgetPeriod, "policy"), (BudgetEvent, "period__policy"))
    fieldsets = (
        ("Scope", {"fields": ("tenant", "scope_type", "agent", "user_key", "scope_key")}),
        (
            "Budget",
            {
                "fields": (
                    "limit_nanos",
                    "window",
                    ("warn_at", "soft_cap", "hard_cap"),
                    "enabled",
                    "disabled_tools",
                    "strategy",
                    ("velocity_limit_nanos", "auto_pause"),
                )
            },
        ),
        ("Record", {"fields": ("source", "created_at", "updated_at")}),
    )

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .annotate(
                current_state_value=_current_period("state"),
                current_spent_nanos=_current_period("spent_nanos"),
            )
        )

    @admin.display(description="state now")
    def current_state(self, obj):
        return obj.current_state_value or "active (no period yet)"

    @admin.display(description="spent this period (USD)")
    def current_spent(self, obj):
        return nanos_to_usd(obj.current_spent_nanos or 0)

    def get_readonly_fields(self, request, obj=None):
        fixed = ["scope_key", "source", "created_at", "updated_at"]
        # The scope is what a policy is; another scope is another policy.
        return fixed + (["tenant", "scope_type", "agent", "user_key"] if obj else [])

    def save_model(self, request, obj, form, change):
        try:
            policy = services.set_policy(
                obj.tenant,
                obj.scope_type,
                agent=obj.agent,
                user_key=obj.user_key,
                limit_nanos=obj.limit_nanos,
                window=obj.window,
                warn_at=obj.warn_at,
                soft_cap=obj.soft_cap,
                hard_cap=obj.hard_cap,
                disabled_tools=obj.disabled_tools,
                enabled=obj.enabled,
                strategy=obj.strategy,
                velocity_limit_nanos=obj.velocity_limit_nanos,
                auto_pause=obj.auto_pause,
                source=PolicySource.OPERATOR,
            )
        except InvalidRequest as exc:
            # The form checked what set_policy checks; this is a race with another save.
            self.message_user(request, exc.message, messages.ERROR)
            raise
        obj.pk, obj.scope_key, obj.source = policy.pk, policy.scope_key, policy.source
        obj.created_at, obj.updated_at = policy.created_at, policy.updated_at
        obj._state.adding = False

    @admin.action(description="Reset the current period of selected budgets (asks a reason)")
    def reset_budget(self, request, queryset):
        by = request.user.get_username()
        return ask_reason(
            self,
            request,
            queryset.select_related("tenant"),
            action="reset_budget",
            title="Reset budgets",
            apply=lambda policy, reason: engine.reset(policy, reason=reason, by=by),
        )


@admin.register(BudgetPeriod)
class BudgetPeriodAdmin(ViewOnly, LargeTable, admin.ModelAdmin):
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
    list_filter = ("state", "policy__scope_type", tenant_filter("policy__tenant"))
    search_fields = ("^policy__scope_key",)
    search_help_text = "The start of a scope key: cus_... (a tenant and its agents and users)."
    date_hierarchy = "window_start"

    def get_search_results(self, request, queryset, search_term):
        if not search_term.strip():
            return queryset, False
        return queryset.filter(policy_id__in=policies_named(search_term)), False

    list_select_related = ("policy",)
    readonly_fields = [f.name for f in BudgetPeriod._meta.fields]


class HoldLineInline(admin.TabularInline):
    model = HoldLine
    extra = 0
    can_delete = False
    fields = readonly_fields = ("period", "amount_nanos")

    def has_add_permission(self, request, obj=None):
        return False

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("period__policy")


@admin.register(Hold)
class HoldAdmin(ViewOnly, LargeTable, admin.ModelAdmin):
    list_display = (
        "request_id",
        "tenant",
        "agent",
        "model",
        usd("amount_nanos", "held (USD)"),
        "status",
        "created_at",
        "expires_at",
    )
    list_filter = ("status", TenantFilter, AgentFilter)
    search_fields = ("=request_id",)
    list_select_related = ("tenant", "agent__tenant")
    readonly_fields = [f.name for f in Hold._meta.fields]
    inlines = [HoldLineInline]
    date_hierarchy = "created_at"
    # Holds are created in id order and created_at has no index of its own.
    date_hierarchy_by_pk = True

    def get_ordering(self, request):
        # One status is read through the (status, expires_at) index: in-flight holds
        # soonest to expire first, the others latest first.
        status = request.GET.get("status__exact")
        if status == HoldStatus.HELD:
            return ("expires_at", "id")
        if status:
            return ("-expires_at", "-id")
        return super().get_ordering(request)


@admin.register(BudgetEvent)
class BudgetEventAdmin(ViewOnly, LargeTable, admin.ModelAdmin):
    list_display = (
        "created_at",
        "kind",
        "period",
        usd("spent_nanos", "spent (USD)"),
        usd("limit_nanos", "limit (USD)"),
        "detail",
    )
    list_filter = ("kind", tenant_filter("period__policy__tenant"))
    search_fields = ("^period__policy__scope_key",)
    search_help_text = "The start of a scope key: cus_... (a tenant and its agents and users)."
    list_select_related = ("period__policy",)

    def get_search_results(self, request, queryset, search_term):
        if not search_term.strip():
            return queryset, False
        return queryset.filter(period__policy_id__in=policies_named(search_term)), False

    readonly_fields = ("period", "kind", "spent_nanos", "limit_nanos", "detail", "created_at")
    date_hierarchy = "created_at"


admin.site.empty_value_display = "—"
