"""The operator console: staff-only pages for the daily work. Views parse the request,
call one query or service function, and render; budgets/ holds the rules."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from functools import wraps
from urllib.parse import urlencode

from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseForbidden
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_http_methods

from budgets import engine, services
from budgets.errors import InvalidRequest
from budgets.models import BudgetPolicy, PeriodState, PolicySource, ScopeType, Window
from budgets.money import nanos_to_usd

from . import console_queries as queries
from . import console_spend as spend

# --- Access -------------------------------------------------------------------------


def staff_only(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Anonymous visitors go to the admin login; signed-in non-staff are refused, not
    sent to a login page they already passed."""

    @wraps(view)
    def wrapped(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        if not request.user.is_authenticated:
            return redirect_to_login(request.get_full_path(), reverse("admin:login"))
        if not (request.user.is_active and request.user.is_staff):
            raise PermissionDenied("The console is for staff.")
        return view(request, *args, **kwargs)

    return wrapped


def staff_only_fragment(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """A piece of a page that htmx fetches again every few seconds. A redirect would be
    followed by the browser and swap the login form into the page, so an anonymous
    visitor (a session that expired) gets 403 with HX-Refresh: htmx then reloads the
    whole page, which sends the visitor to the login page."""

    @wraps(view)
    def wrapped(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        if not request.user.is_authenticated:
            response = HttpResponseForbidden("Signed out: reload the page to sign in again.")
            response["HX-Refresh"] = "true"
            return response
        if not (request.user.is_active and request.user.is_staff):
            raise PermissionDenied("The console is for staff.")
        return view(request, *args, **kwargs)

    return wrapped


def _live(request: HttpRequest, name: str, *args) -> dict:
    """What a page's live region needs: the fragment to fetch (with the page's own query
    string) and how often."""
    url = reverse(f"console:{name}-fragment", args=args)
    query = request.GET.urlencode()
    return {
        "fragment_url": f"{url}?{query}" if query else url,
        "refresh_seconds": settings.CONSOLE_REFRESH_SECONDS,
        "updated_at": timezone.now(),
    }


def _fragment(
    request: HttpRequest, template: str, context: dict, status: int = 200
) -> HttpResponse:
    return render(request, template, {"fragment": True, **context}, status=status)


def _render(request: HttpRequest, template: str, context: dict) -> HttpResponse:
    banners = []
    if settings.UPSTREAM_SIMULATED:
        banners.append("The upstream is simulated: calls are answered by the local simulator.")
    if not settings.STRIPE_SECRET_KEY:
        banners.append("Stripe is not configured: usage is not reported and no webhooks arrive.")
    return render(request, template, {"banners": banners, **context})


# --- Overview -----------------------------------------------------------------------


def _overview(now: datetime) -> dict:
    holds = queries.holds_in_flight()
    return {
        "now": now,
        "tenant_states": queries.tenants_by_state(now).items(),
        "spend_today_usd": nanos_to_usd(queries.spend_today_nanos(now)),
        "spend_period_usd": nanos_to_usd(queries.spend_this_period_nanos(now)),
        "holds_count": holds.count,
        "holds_usd": nanos_to_usd(holds.amount_nanos),
        "top_spenders": queries.in_usd(queries.top_spenders(now)),
        "events": queries.in_usd(queries.recent_events()),
        "spikes": queries.in_usd(queries.recent_spikes()),
        "chart": spend.recent_series(now),
    }


@staff_only
@require_http_methods(["GET"])
def overview(request: HttpRequest) -> HttpResponse:
    context = _overview(timezone.now()) | _live(request, "overview")
    return _render(request, "console/overview.html", context)


@staff_only_fragment
@require_http_methods(["GET"])
def overview_fragment(request: HttpRequest) -> HttpResponse:
    context = _overview(timezone.now()) | _live(request, "overview")
    return _fragment(request, "console/fragments/overview.html", context)


# --- Budgets ------------------------------------------------------------------------


def _budgets(request: HttpRequest) -> dict:
    q = request.GET.get("q", "").strip()[:200]
    scope_type = request.GET.get("scope_type", "")
    scope_type = scope_type if scope_type in ScopeType.values else ""
    state = request.GET.get("state", "")
    state = state if state in PeriodState.values else ""
    page, rows = queries.budget_page(timezone.now(), request.GET.get("page"), q, scope_type, state)
    return {
        "page": page,
        "rows": queries.in_usd(rows),
        "q": q,
        "scope_type": scope_type,
        "state": state,
        "scope_types": ScopeType.values,
        "states": PeriodState.values,
    } | _live(request, "budgets")


@staff_only
@require_http_methods(["GET"])
def budgets(request: HttpRequest) -> HttpResponse:
    return _render(request, "console/budgets.html", _budgets(request))


@staff_only_fragment
@require_http_methods(["GET"])
def budgets_fragment(request: HttpRequest) -> HttpResponse:
    return _fragment(request, "console/fragments/budgets.html", _budgets(request))


# --- Budget detail ------------------------------------------------------------------


def _fraction_text(value: Decimal) -> str:
    # normalize() alone would show 10 as "1E+1".
    return format(value.normalize(), "f")


class PolicyForm(forms.Form):
    limit = forms.CharField(label="Limit (USD)", max_length=40)
    window = forms.ChoiceField(choices=Window.choices)
    warn_at = forms.CharField(max_length=20, help_text="Fraction of the limit, e.g. 0.5")
    soft_cap = forms.CharField(max_length=20, help_text="Degrade from this fraction")
    hard_cap = forms.CharField(max_length=20, help_text="Stop at this fraction")
    disabled_tools = forms.CharField(
        required=False, max_length=2000, help_text="Comma-separated tool names"
    )

    @classmethod
    def of(cls, policy: BudgetPolicy) -> PolicyForm:
        return cls(
            initial={
                "limit": nanos_to_usd(policy.limit_nanos),
                "window": policy.window,
                "warn_at": _fraction_text(policy.warn_at),
                "soft_cap": _fraction_text(policy.soft_cap),
                "hard_cap": _fraction_text(policy.hard_cap),
                "disabled_tools": ", ".join(policy.disabled_tools),
            }
        )


class ResetForm(forms.Form):
    reason = forms.CharField(max_length=500, help_text="Recorded on the closed period")
    confirm = forms.BooleanField(
        label="I understand the spend of this period starts again from zero"
    )


# Service error field names as the form names them.
_FORM_FIELD = {"limit": "limit", "limit_nanos": "limit", "window": "window"} | {
    name: name for name in ("warn_at", "soft_cap", "hard_cap", "disabled_tools")
}


def _add_service_error(form: forms.Form, exc: InvalidRequest) -> None:
    fields = exc.details.get("fields") or {}
    placed = False
    for name, problems in fields.items():
        if name in _FORM_FIELD:
            for problem in problems if isinstance(problems, list) else [problems]:
                form.add_error(_FORM_FIELD[name], str(problem))
            placed = True
    if not placed:
        form.add_error(None, exc.message)


def _save_policy(policy: BudgetPolicy, form: PolicyForm) -> BudgetPolicy | None:
    """Parse every field with the services' own parsers, then save through set_policy.
    Returns None (and fills the form's errors) if anything is refused: nothing is saved."""
    data = form.cleaned_data
    parsed: dict = {}
    for name, parse in (
        ("limit", services.parse_limit),
        ("warn_at", lambda v: services.parse_fraction("warn_at", v)),
        ("soft_cap", lambda v: services.parse_fraction("soft_cap", v)),
        ("hard_cap", lambda v: services.parse_fraction("hard_cap", v)),
    ):
        try:
            parsed[name] = parse(data[name])
        except InvalidRequest as exc:
            form.add_error(name, exc.message)
    if form.errors:
        return None
    tools = [t.strip() for t in data["disabled_tools"].split(",") if t.strip()]
    try:
        return services.set_policy(
            policy.tenant,
            policy.scope_type,
            agent=policy.agent,
            user_key=policy.user_key,
            limit_nanos=parsed["limit"],
            window=data["window"],
            warn_at=parsed["warn_at"],
            soft_cap=parsed["soft_cap"],
            hard_cap=parsed["hard_cap"],
            disabled_tools=tools,
            enabled=policy.enabled,
            strategy=policy.strategy,
            velocity_limit_nanos=policy.velocity_limit_nanos,
            auto_pause=policy.auto_pause,
            source=PolicySource.OPERATOR,
        )
    except InvalidRequest as exc:
        if "disabled_tools" in exc.message:
            form.add_error("disabled_tools", exc.message)
        else:
            _add_service_error(form, exc)
        return None


def _policy_or_404(scope_type: str, scope_key: str) -> BudgetPolicy:
    policy = queries.policy_at(scope_type, scope_key) if scope_type in ScopeType.values else None
    if policy is None:
        raise Http404(f"No {scope_type} budget {scope_key!r}.")
    return policy


def _budget_detail(request: HttpRequest, policy: BudgetPolicy) -> dict:
    now = timezone.now()
    period = queries.current_period(policy, now)
    return {
        "policy": queries.InUsd(policy),
        "period": queries.InUsd(period) if period else None,
        "utilization": queries.percent(period.spent_nanos, period.limit_nanos) if period else 0,
        "chart": spend.period_series(policy, period) if period else None,
        "past_periods": queries.in_usd(queries.past_periods(policy, now)),
        "ledger": queries.in_usd(queries.ledger(policy)),
        "events": queries.in_usd(queries.policy_events(policy)),
    } | _live(request, "budget-detail", policy.scope_type, policy.scope_key)


@staff_only_fragment
@require_http_methods(["GET"])
def budget_detail_fragment(request: HttpRequest, scope_type: str, scope_key: str) -> HttpResponse:
    policy = _policy_or_404(scope_type, scope_key)
    return _fragment(
        request, "console/fragments/budget_detail.html", _budget_detail(request, policy)
    )


@staff_only
@require_http_methods(["GET", "POST"])
def budget_detail(request: HttpRequest, scope_type: str, scope_key: str) -> HttpResponse:
    policy = _policy_or_404(scope_type, scope_key)
    policy_form, reset_form = PolicyForm.of(policy), ResetForm()
    status = 200
    if request.method == "POST":
        action = request.POST.get("action")
        if action == "policy":
            policy_form = PolicyForm(request.POST)
            if policy_form.is_valid() and _save_policy(policy, policy_form):
                messages.success(request, "Policy saved.")
                return redirect(request.path)
        elif action == "reset":
            reset_form = ResetForm(request.POST)
            if reset_form.is_valid():
                try:
                    engine.reset(
                        policy,
                        reason=reset_form.cleaned_data["reason"],
                        by=request.user.get_username(),
                    )
                except InvalidRequest as exc:
                    reset_form.add_error(None, exc.message)
                else:
                    messages.success(request, "Budget reset: a new period has started.")
                    return redirect(request.path)
        else:
            return HttpResponse("Unknown action.", status=400)
        status = 400

    response = _render(
        request,
        "console/budget_detail.html",
        {"policy_form": policy_form, "reset_form": reset_form} | _budget_detail(request, policy),
    )
    response.status_code = status
    return response


# --- Agents -------------------------------------------------------------------------


class PauseForm(forms.Form):
    agent = forms.IntegerField(widget=forms.HiddenInput)
    reason = forms.CharField(required=False, max_length=200)


class ResumeForm(forms.Form):
    agent = forms.IntegerField(widget=forms.HiddenInput)


class RevokeForm(forms.Form):
    key = forms.IntegerField(widget=forms.HiddenInput)
    confirm = forms.BooleanField(label="I understand calls with this key are refused from now on")


def _agent_action(request: HttpRequest) -> str | None:
    """Perform the posted action. Returns the success message, or None after adding an
    error message (the form was refused)."""
    action = request.POST.get("action")
    if action in ("pause", "resume"):
        form = (PauseForm if action == "pause" else ResumeForm)(request.POST)
        if not form.is_valid():
            messages.error(request, "The request was not understood.")
            return None
        agent = queries.agent_by_id(form.cleaned_data["agent"])
        if agent is None:
            raise Http404("No such agent.")
        reason = form.cleaned_data.get("reason", "").strip()
        services.set_agent_paused(agent, action == "pause", reason)
        return f"{agent} {'paused' if action == 'pause' else 'resumed'}."
    if action == "revoke":
        form = RevokeForm(request.POST)
        if not form.is_valid():
            if "confirm" in form.errors:
                messages.error(request, "Tick the confirmation to revoke a key.")
            else:
                messages.error(request, "The request was not understood.")
            return None
        key = queries.key_by_id(form.cleaned_data["key"])
        if key is None:
            raise Http404("No such key.")
        services.revoke_key(key)
        return f"Key {key.prefix}… of {key.agent} revoked."
    messages.error(request, "Unknown action.")
    return None


@staff_only
@require_http_methods(["GET", "POST"])
def agents(request: HttpRequest) -> HttpResponse:
    status = 200
    if request.method == "POST":
        done = _agent_action(request)
        if done is not None:
            messages.success(request, done)
            # Back to the same search and page (the form posts to the page's own URL).
            return redirect(request.get_full_path())
        status = 400
    response = _render(request, "console/agents.html", _agents(request))
    response.status_code = status
    return response


def _agents(request: HttpRequest) -> dict:
    q = request.GET.get("q", "").strip()[:200]
    page, rows = queries.agent_page(timezone.now(), request.GET.get("page"), q)
    return {"page": page, "rows": queries.in_usd(rows), "q": q} | _live(request, "agents")


@staff_only_fragment
@require_http_methods(["GET"])
def agents_fragment(request: HttpRequest) -> HttpResponse:
    return _fragment(request, "console/fragments/agents.html", _agents(request))


# --- Spend analysis -------------------------------------------------------------------


def _spend(request: HttpRequest) -> tuple[dict, int]:
    """The analysis the query string asks for, or what is wrong with it (status 400)."""
    params = {name: request.GET.get(name, "").strip()[:200] for name in spend.PARAMS}
    chosen = params["range"] or ("custom" if params["from"] or params["to"] else "")
    context = {
        "params": params,
        "chosen_range": chosen or spend.DEFAULT_PRESET,
        "presets": spend.PRESETS,
        "max_days": spend.MAX_RANGE_DAYS,
        # The range without the tenant, for the links that filter by one.
        "range_query": urlencode({k: params[k] for k in ("range", "from", "to") if params[k]}),
    }
    now = timezone.now()
    try:
        spend_range = spend.parse_range(params["range"], params["from"], params["to"], now)
        tenant = spend.tenant_named(params["tenant"])
    except InvalidRequest as exc:
        return context | {"error": exc.message}, 400
    analysis = spend.analyse(spend_range, tenant, now)
    return context | {
        "analysis": analysis,
        "chart": analysis.chart,
        "spikes": queries.in_usd(analysis.spikes),
    } | _live(request, "spend"), 200


@staff_only
@require_http_methods(["GET"])
def spend_analysis(request: HttpRequest) -> HttpResponse:
    context, status = _spend(request)
    response = _render(request, "console/spend.html", context)
    response.status_code = status
    return response


@staff_only_fragment
@require_http_methods(["GET"])
def spend_fragment(request: HttpRequest) -> HttpResponse:
    context, status = _spend(request)
    return _fragment(request, "console/fragments/spend.html", context, status)
