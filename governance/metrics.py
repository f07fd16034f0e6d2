"""Prometheus metrics, served at /metrics to staff sessions and to the metrics token.

Counters live in the process that counts them: with several uvicorn workers each would
show only its own share. Set PROMETHEUS_MULTIPROC_DIR (an empty directory, emptied at
every start, shared by the workers of a host) in their environment before they start:
prometheus_client then keeps every worker's values in files there and /metrics sums
them. Holds in flight are counted from the database at scrape time, so they are right
in either mode.

Spend is exported in USD as a float because Prometheus values are floats; it is
converted from the exact integer nanodollars at each increment and is for graphs
only. The ledger (spend.SpendEntry) stays the truth about money.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterator

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric

from budgets.models import Hold, HoldStatus
from budgets.money import NANOS_PER_USD


class Outcome:
    """What became of a governed call (the `outcome` label)."""

    ALLOWED = "allowed"
    DOWNGRADED = "downgraded"
    REFUSED = "refused"
    UPSTREAM_ERROR = "upstream_error"
    ERROR = "error"


# Label for calls refused before a model was chosen. Model labels only ever come from
# the catalog, never from the request, so an agent cannot blow up the label set.
NO_MODEL = "none"
# Upstream calls take from a fraction of a second to minutes.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)

CALLS = Counter(
    "governance_calls",
    "Governed chat completion calls, by outcome and model.",
    ["outcome", "model"],
)
DOWNGRADES = Counter(
    "governance_downgrades",
    "Calls governance moved to a cheaper model.",
    ["from_model", "to_model"],
)
REFUSALS = Counter("governance_refusals", "Calls refused, by error code.", ["reason"])
SPEND = Counter("governance_spend_usd", "Spend captured by the gateway, in USD (float).", ["model"])
UNCHARGED = Counter(
    "governance_uncharged_calls",
    "Calls answered whose capture failed after retries: each is logged at ERROR with its"
    " tokens, and its hold expires uncharged. Alert on any.",
    ["model"],
)
UPSTREAM_LATENCY = Histogram(
    "governance_upstream_latency_seconds",
    "Time until the upstream answered (for streams: until the stream opened).",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
WEBHOOK_EVENTS = Counter(
    "governance_webhook_events",
    "Stripe webhook deliveries, by event type and result.",
    ["type", "result"],
)


def outcome_of_error(code: str) -> str:
    """The outcome of a call answered with a governance error of this code."""
    return Outcome.UPSTREAM_ERROR if code == "upstream_unavailable" else Outcome.REFUSED


def count_call(
    outcome: str,
    model: str | None,
    *,
    downgraded_from: str | None = None,
    reason: str | None = None,
) -> None:
    CALLS.labels(outcome, model or NO_MODEL).inc()
    if downgraded_from and model:
        DOWNGRADES.labels(downgraded_from, model).inc()
    if outcome == Outcome.REFUSED and reason:
        REFUSALS.labels(reason).inc()


def add_spend(model: str, cost_nanos: int) -> None:
    SPEND.labels(model).inc(cost_nanos / NANOS_PER_USD)


def count_uncharged(model: str) -> None:
    UNCHARGED.labels(model).inc()


def observe_upstream_latency(model: str, seconds: float) -> None:
    UPSTREAM_LATENCY.labels(model).observe(seconds)


def count_webhook(event_type: str, result: str) -> None:
    WEBHOOK_EVENTS.labels(event_type or "unknown", result).inc()


# --- Exposition ---------------------------------------------------------------------


class HoldsInFlight:
    """Holds not yet captured, voided or expired, counted when scraped."""

    name = "governance_holds_in_flight"
    documentation = "Holds placed and not yet captured, voided or expired."

    def describe(self) -> list[Metric]:
        return [GaugeMetricFamily(self.name, self.documentation)]

    def collect(self) -> Iterator[Metric]:
        count = Hold.objects.filter(status=HoldStatus.HELD).count()
        yield GaugeMetricFamily(self.name, self.documentation, value=count)


class ThisProcess:
    """The default registry: this process's counters and its process metrics."""

    def collect(self) -> Iterator[Metric]:
        return REGISTRY.collect()


def exposition() -> bytes:
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(ThisProcess())
    registry.register(HoldsInFlight())
    return generate_latest(registry)


def _refusal(request: HttpRequest) -> HttpResponse | None:
    """None if the caller may read metrics, else the response that says why not."""
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, token = header.partition(" ")
        expected = settings.METRICS_TOKEN
        if (
            scheme.lower() == "bearer"
            and expected
            and hmac.compare_digest(token.strip().encode(), expected.encode())
        ):
            return None
        return _unauthorized("the metrics token is not valid")
    if not request.user.is_authenticated:
        return _unauthorized("sign in as staff or send 'Authorization: Bearer <METRICS_TOKEN>'")
    if not request.user.is_staff:
        return HttpResponse("metrics are for staff\n", status=403, content_type="text/plain")
    return None


def _unauthorized(message: str) -> HttpResponse:
    response = HttpResponse(f"{message}\n", status=401, content_type="text/plain")
    response["WWW-Authenticate"] = 'Bearer realm="metrics"'
    return response


@never_cache
@require_safe
def metrics_view(request: HttpRequest) -> HttpResponse:
    refusal = _refusal(request)
    if refusal is not None:
        return refusal
    return HttpResponse(exposition(), content_type=CONTENT_TYPE_LATEST)
