"""Admin changelists for tables of millions of rows (the ledger, holds, periods, events).

Django's defaults read whole tables on every page: a related-field filter lists every
tenant, `list_filter` on a plain field runs SELECT DISTINCT over the table,
`date_hierarchy` runs SELECT DISTINCT of every row's day, month or year, and the
paginator counts every matching row. The pieces here do the same jobs from indexes:
filters that take a value (a Stripe customer id, an agent) instead of listing every
choice, a date drill-down that reads the first and last row and lists the years,
months or days between them, and a count that stops at COUNT_CAP.
"""

from __future__ import annotations

import calendar
from datetime import date

from django.contrib import admin
from django.contrib.admin.views.main import PAGE_VAR
from django.core.paginator import Paginator
from django.db.models import Q, QuerySet
from django.utils import timezone
from django.utils.formats import date_format
from django.utils.functional import cached_property
from django.utils.text import capfirst

from budgets.models import Agent, Tenant

# Counting stops here: "more than 10,000" reads from at most that many index entries,
# an exact count of a million rows reads them all.
COUNT_CAP = 10_000


def is_id(value: str) -> bool:
    """A row id as typed: decimal digits that fit a BigAutoField."""
    return value.isascii() and value.isdecimal() and len(value) <= 18


class ValueFilter(admin.SimpleListFilter):
    """A sidebar filter with a text box: the value is typed (or linked to), never
    chosen from a list read from the table."""

    template = "admin/value_filter.html"
    placeholder = ""

    def lookups(self, request, model_admin):
        return ()

    def has_output(self) -> bool:
        return True

    def choices(self, changelist):
        keep = {PAGE_VAR, self.parameter_name}
        yield {
            "parameter_name": self.parameter_name,
            "value": self.value() or "",
            "placeholder": self.placeholder,
            "hidden": [
                (name, value)
                for name, values in changelist.filter_params.items()
                if name not in keep
                for value in values
            ],
            "clear_link": changelist.get_query_string(remove=[self.parameter_name]),
        }


class TenantFilter(ValueFilter):
    """Rows of one tenant: `?tenant=cus_...` (or the tenant's id). `field` is the lookup
    path from the listed model to its tenant."""

    title = "tenant"
    parameter_name = "tenant"
    placeholder = "cus_... or tenant id"
    field = "tenant"

    def queryset(self, request, queryset: QuerySet) -> QuerySet:
        value = (self.value() or "").strip()
        if not value:
            return queryset
        # Resolved first, so the listed table is filtered on an indexed id column.
        found = Tenant.objects.filter(
            Q(pk=int(value)) if is_id(value) else Q(stripe_customer_id=value)
        ).values_list("pk", flat=True)
        return queryset.filter(**{f"{self.field}_id__in": list(found)})


class AgentFilter(ValueFilter):
    """Rows of one agent: `?agent=<id>`, `?agent=cus_...:<name>`, or a name (that
    agent in every tenant)."""

    title = "agent"
    parameter_name = "agent"
    placeholder = "id, cus_...:name or name"
    field = "agent"

    def queryset(self, request, queryset: QuerySet) -> QuerySet:
        value = (self.value() or "").strip()
        if not value:
            return queryset
        if is_id(value):
            found = Agent.objects.filter(pk=int(value))
        elif ":" in value:
            customer, _, name = value.partition(":")
            found = Agent.objects.filter(tenant__stripe_customer_id=customer, name=name)
        else:
            found = Agent.objects.filter(name=value)
        return queryset.filter(
            **{f"{self.field}_id__in": list(found.values_list("pk", flat=True)[:1000])}
        )


def any_of(**matches: list) -> Q:
    """Rows whose column is in any of the given id lists; the empty lists are left out,
    so the common case is one condition on one index (an OR of conditions on several
    columns is a scan). Nothing matches when every list is empty."""
    found = [Q(**{f"{column}__in": ids}) for column, ids in matches.items() if ids]
    if not found:
        return Q(pk__in=[])
    condition = found[0]
    for more in found[1:]:
        condition |= more
    return condition


def tenant_ids(term: str) -> list[int]:
    """Tenants a search term names: a Stripe customer id, or a name (any case)."""
    return list(
        Tenant.objects.filter(Q(stripe_customer_id=term) | Q(name__iexact=term)).values_list(
            "pk", flat=True
        )[:100]
    )


def tenant_filter(path: str) -> type[TenantFilter]:
    """A TenantFilter for a model whose tenant is at `path` (e.g. "period__policy__tenant")."""
    return type(f"TenantFilter_{path}", (TenantFilter,), {"field": path})


class CappedCountPaginator(Paginator):
    """Counts up to COUNT_CAP + 1 rows (a COUNT over a LIMITed subquery): pages past
    the cap are reached by narrowing the list (filters, dates), not by paging."""

    cap = COUNT_CAP

    @cached_property
    def count(self) -> int:
        return self.object_list.order_by()[: self.cap + 1].count()

    @property
    def count_is_capped(self) -> bool:
        return self.count > self.cap

    @property
    def cap_text(self) -> str:
        return f"{self.cap:,}"


class LargeTable:
    """A ModelAdmin mixin for big tables: capped counts, no full-table count, and
    `date_hierarchy` without a scan. The drill-down lists every year, month or day
    between the table's first and last row (read from an index: the date field's own,
    or the primary key's when `date_hierarchy_by_pk` says the dates follow it), not
    only those that hold rows, which only a scan of every row could tell."""

    change_list_template = "admin/large_table_change_list.html"
    paginator = CappedCountPaginator
    show_full_result_count = False
    # Rendering a row costs more than reading it: 100 rows are ~0.1 s of templates.
    list_per_page = 50
    # Facet counts are a COUNT per filter choice over the whole table.
    show_facets = admin.ShowFacets.NEVER
    date_hierarchy_by_pk = False

    def get_search_results(self, request, queryset, search_term):
        """ "=field" search fields match exactly (case-sensitive), so an index can answer:
        Django's "=" is iexact, which no plain index serves."""
        exact = [f[1:] for f in self.search_fields if f.startswith("=")]
        term = search_term.strip()
        if not term or len(exact) != len(self.search_fields):
            return super().get_search_results(request, queryset, search_term)
        match = Q()
        for field in exact:
            match |= Q(**{field: term})
        return queryset.filter(match), False

    def date_bounds(self, queryset: QuerySet) -> tuple[date, date] | None:
        field = self.date_hierarchy
        # Two one-row reads: a single MIN(), MAX() query is a full scan on SQLite.
        order = "pk" if self.date_hierarchy_by_pk else field
        dates = queryset.filter(**{f"{field}__isnull": False}).values_list(field, flat=True)
        first = dates.order_by(order).first()
        last = dates.order_by(f"-{order}").first()
        if first is None or last is None:
            return None
        if hasattr(first, "hour"):
            first, last = timezone.localtime(first).date(), timezone.localtime(last).date()
        return min(first, last), max(first, last)

    def date_drilldown(self, changelist) -> dict:
        """The context Django's admin/date_hierarchy.html expects."""
        field = self.date_hierarchy
        params = changelist.params

        def number(name: str) -> int | None:
            value = params.get(f"{field}__{name}")
            return int(value) if value and str(value).isdigit() else None

        def link(filters: dict) -> str:
            return changelist.get_query_string(filters, [f"{field}__"])

        year, month, day = number("year"), number("month"), number("day")
        bounds = self.date_bounds(changelist.root_queryset)
        if bounds is None:
            return {"show": False}
        first, last = bounds
        if year is None and first.year == last.year:
            year = first.year
            if first.month == last.month:
                month = first.month
        y, m = f"{field}__year", f"{field}__month"
        if year and month and day:
            shown = date(year, month, day)
            return {
                "show": True,
                "back": {
                    "link": link({y: year, m: month}),
                    "title": capfirst(date_format(shown, "YEAR_MONTH_FORMAT")),
                },
                "choices": [{"title": capfirst(date_format(shown, "MONTH_DAY_FORMAT"))}],
            }
        if year and month:
            days = [
                date(year, month, d)
                for d in range(1, calendar.monthrange(year, month)[1] + 1)
                if first <= date(year, month, d) <= last
            ]
            return {
                "show": True,
                "back": {"link": link({y: year}), "title": str(year)},
                "choices": [
                    {
                        "link": link({y: year, m: month, f"{field}__day": d.day}),
                        "title": capfirst(date_format(d, "MONTH_DAY_FORMAT")),
                    }
                    for d in days
                ],
            }
        if year:
            months = [
                date(year, mo, 1)
                for mo in range(1, 13)
                if (first.year, first.month) <= (year, mo) <= (last.year, last.month)
            ]
            return {
                "show": True,
                "back": {"link": link({}), "title": "All dates"},
                "choices": [
                    {
                        "link": link({y: year, m: mo.month}),
                        "title": capfirst(date_format(mo, "YEAR_MONTH_FORMAT")),
                    }
                    for mo in months
                ],
            }
        return {
            "show": True,
            "back": None,
            "choices": [
                {"link": link({y: str(yr)}), "title": str(yr)}
                for yr in range(first.year, last.year + 1)
            ],
        }

    def changelist_view(self, request, extra_context=None):
        response = super().changelist_view(request, extra_context)
        changelist = getattr(response, "context_data", {}).get("cl")
        if changelist is not None and self.date_hierarchy:
            response.context_data["date_drilldown"] = self.date_drilldown(changelist)
        return response
