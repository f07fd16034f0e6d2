"""Alerts for budget events and spend spikes, through webhook and email channels.

Two steps, each safe to run twice at once (the deliver_alerts task runs both):

1. Enqueue: every budget event and spike seen in the last ALERT_LOOKBACK_HOURS becomes
   one AlertDelivery per enabled channel that wants its kind and tenant. The row is
   unique per (channel, source), inserted with ON CONFLICT DO NOTHING, so an alert is
   queued once however often (or however concurrently) this runs. The alert's content
   is fixed here, so what the delivery log shows is what was sent.
2. Send: each due delivery is claimed with a conditional UPDATE that pushes its next
   attempt a lease into the future (`... WHERE status = pending AND next_attempt_at <=
   now`); only the run whose UPDATE changed the row sends it. Each delivery is sent on
   its own with a short timeout, so one failing channel delays nobody else; a failure
   backs off exponentially until ALERT_MAX_ATTEMPTS, then the delivery is marked failed.

The gateway never sends alerts itself: it only records events, so a slow or broken
channel can never hold up a call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import requests
from django.conf import settings
from django.core.mail import send_mail
from django.db.models import QuerySet
from django.urls import NoReverseMatch, reverse
from django.utils import timezone

from budgets.models import BudgetEvent, EventKind, Tenant
from budgets.money import nanos_to_usd
from spend.models import Spike

from .models import AlertChannel, AlertDelivery, AlertKind

log = logging.getLogger(__name__)

# How long a run owns a delivery it claimed; past it, another run may send it again.
# Far longer than one send can take (ALERT_TIMEOUT_SECONDS).
LEASE = timedelta(minutes=5)
BACKOFF_MAX = timedelta(hours=1)
ENQUEUE_BATCH = 5000
SEND_BATCH = 500
SUBJECT_PREFIX = "[Spend Governance]"

BUDGET_PHRASES = {
    EventKind.WARNED: "crossed its warning threshold",
    EventKind.DEGRADED: "is degraded: calls go to cheaper models",
    EventKind.STOPPED: "is stopped: calls are refused",
    EventKind.RESET: "was reset",
    EventKind.RECOVERED: "recovered",
}


@dataclass
class DeliveryResult:
    enqueued: int = 0
    sent: int = 0
    retrying: int = 0
    failed: int = 0


class DeliveryFailed(Exception):
    """A channel did not take an alert; the message is safe to store and log."""


# --- Formatting ---------------------------------------------------------------------


def is_slack(url: str) -> bool:
    """Slack's incoming webhooks (https://hooks.slack.com/services/...) take {"text": ...}."""
    parts = urlsplit(url)
    return parts.hostname == "hooks.slack.com" and parts.path.startswith("/services/")


def _admin_link(view: str, pk: int, tenant: Tenant) -> str | None:
    base = settings.CONSOLE_BASE_URL.rstrip("/")
    if not base:
        return None
    try:
        path = reverse(view, args=[pk])
    except NoReverseMatch:  # the model has no admin page: the tenant's will do
        path = reverse("admin:budgets_tenant_change", args=[tenant.pk])
    return f"{base}{path}"


def _moment(value: datetime) -> str:
    return f"{value.astimezone(UTC):%Y-%m-%d %H:%M} UTC"


def _text(subject: str, sentences: list[str], link: str | None) -> str:
    text = " ".join(sentences)
    return f"{subject}\n{text}\n{link}" if link else f"{subject}\n{text}"


def budget_event_alert(event: BudgetEvent) -> dict[str, Any]:
    """The alert of one budget event, with period, policy and tenant loaded."""
    period, policy = event.period, event.period.policy
    tenant = policy.tenant
    budget = f"{policy.scope_type} budget {policy.scope_key}"
    window_end = period.ends_at
    spent, limit = nanos_to_usd(event.spent_nanos), nanos_to_usd(event.limit_nanos)
    subject = f"{SUBJECT_PREFIX} {tenant.name}: {budget} {event.kind}"
    window = f"the {policy.window} window {_moment(period.window_start)} to {_moment(window_end)}"
    if event.kind == EventKind.RESET:
        sentences = [
            f"The {budget} of {tenant.name} ({tenant.stripe_customer_id}) was reset;"
            f" {window} starts at zero.",
            f"The previous period spent USD {spent} of USD {limit}.",
        ]
    else:
        sentences = [
            f"The {budget} of {tenant.name} ({tenant.stripe_customer_id})"
            f" {BUDGET_PHRASES[event.kind]}.",
            f"Spent USD {spent} of USD {limit} in {window}.",
        ]
    if event.detail:
        sentences.append(f"({event.detail})")
    link = _admin_link("admin:budgets_budgetevent_change", event.pk, tenant)
    return {
        "alert_id": f"budget_event-{event.pk}",
        "source": AlertDelivery.Source.BUDGET_EVENT,
        "kind": event.kind,
        "tenant": {"name": tenant.name, "stripe_customer_id": tenant.stripe_customer_id},
        "scope": {"type": policy.scope_type, "key": policy.scope_key},
        "spent_usd": spent,
        "limit_usd": limit,
        "window": {
            "name": policy.window,
            "start": period.window_start.isoformat(),
            "end": window_end.isoformat(),
        },
        "detail": event.detail,
        "occurred_at": event.created_at.isoformat(),
        "url": link,
        "subject": subject,
        "text": _text(subject, sentences, link),
    }


def spike_alert(spike: Spike) -> dict[str, Any]:
    """The alert of one spike, with tenant and agent loaded."""
    tenant = spike.tenant
    if spike.agent_id:
        scope = {"type": "agent", "key": f"{tenant.stripe_customer_id}:{spike.agent.name}"}
        who = f"agent {spike.agent.name} of {tenant.name} ({tenant.stripe_customer_id})"
    else:
        scope = {"type": "tenant", "key": tenant.stripe_customer_id}
        who = f"{tenant.name} ({tenant.stripe_customer_id})"
    spent, threshold = nanos_to_usd(spike.spend_nanos), nanos_to_usd(spike.threshold_nanos)
    baseline = nanos_to_usd(spike.baseline_nanos)
    hour_end = spike.hour + timedelta(hours=1)
    subject = f"{SUBJECT_PREFIX} {tenant.name}: {spike.kind} spend spike ({scope['key']})"
    sentences = [
        f"Spend of {who} is {Spike.Kind(spike.kind).label}:",
        f"USD {spent} in the hour from {_moment(spike.hour)}, over USD {threshold}"
        f" (baseline USD {baseline} an hour).",
    ]
    if spike.agent_paused:
        sentences.append("The agent was paused.")
    link = _admin_link("admin:spend_spike_change", spike.pk, tenant)
    return {
        "alert_id": f"spike-{spike.pk}",
        "source": AlertDelivery.Source.SPIKE,
        "kind": AlertKind.SPIKE,
        "spike_kind": spike.kind,
        "tenant": {"name": tenant.name, "stripe_customer_id": tenant.stripe_customer_id},
        "scope": scope,
        "spent_usd": spent,
        "limit_usd": threshold,
        "baseline_usd": baseline,
        "agent_paused": spike.agent_paused,
        "window": {"name": "hour", "start": spike.hour.isoformat(), "end": hour_end.isoformat()},
        "occurred_at": spike.detected_at.isoformat(),
        "url": link,
        "subject": subject,
        "text": _text(subject, sentences, link),
    }


def webhook_body(channel: AlertChannel, alert: dict[str, Any]) -> dict[str, Any]:
    slack = channel.format == AlertChannel.Format.SLACK or (
        channel.format == AlertChannel.Format.AUTO and is_slack(channel.target)
    )
    return {"text": alert["text"]} if slack else alert


# --- Enqueue ------------------------------------------------------------------------


def _budget_events(channel: AlertChannel, since: datetime) -> QuerySet[BudgetEvent]:
    kinds = [kind for kind in channel.kinds if kind in EventKind.values]
    events = BudgetEvent.objects.filter(created_at__gte=since, kind__in=kinds)
    if channel.tenant_id:
        events = events.filter(period__policy__tenant_id=channel.tenant_id)
    return events.select_related("period__policy__tenant")


def _spikes(channel: AlertChannel, since: datetime) -> QuerySet[Spike]:
    if AlertKind.SPIKE not in channel.kinds:
        return Spike.objects.none()
    spikes = Spike.objects.filter(detected_at__gte=since)
    if channel.tenant_id:
        spikes = spikes.filter(tenant_id=channel.tenant_id)
    return spikes.select_related("tenant", "agent")


def _not_queued(channel: AlertChannel, source_type: str, sources: QuerySet) -> QuerySet:
    queued = AlertDelivery.objects.filter(channel=channel, source_type=source_type)
    return sources.exclude(id__in=queued.values("source_id")).order_by("id")[:ENQUEUE_BATCH]


def enqueue(now: datetime | None = None) -> int:
    """Queue a delivery of every recent budget event and spike for each enabled channel
    that wants its kind and tenant; how many were queued. A channel gets what happened
    from its creation on, never older than ALERT_LOOKBACK_HOURS."""
    now = now or timezone.now()
    lookback = now - timedelta(hours=settings.ALERT_LOOKBACK_HOURS)
    rendered: dict[tuple[str, int], dict[str, Any]] = {}

    def alert(source_type: str, source: BudgetEvent | Spike) -> dict[str, Any]:
        key = (source_type, source.pk)
        if key not in rendered:
            is_event = source_type == AlertDelivery.Source.BUDGET_EVENT
            rendered[key] = budget_event_alert(source) if is_event else spike_alert(source)
        return rendered[key]

    rows: list[AlertDelivery] = []
    for channel in AlertChannel.objects.filter(enabled=True).order_by("id"):
        since = max(lookback, channel.created_at)
        source_type = AlertDelivery.Source.BUDGET_EVENT
        for event in _not_queued(channel, source_type, _budget_events(channel, since)):
            rows.append(
                AlertDelivery(
                    channel=channel,
                    source_type=source_type,
                    source_id=event.pk,
                    tenant_id=event.period.policy.tenant_id,
                    kind=event.kind,
                    payload=alert(source_type, event),
                    next_attempt_at=now,
                )
            )
        source_type = AlertDelivery.Source.SPIKE
        for spike in _not_queued(channel, source_type, _spikes(channel, since)):
            rows.append(
                AlertDelivery(
                    channel=channel,
                    source_type=source_type,
                    source_id=spike.pk,
                    tenant_id=spike.tenant_id,
                    kind=AlertKind.SPIKE,
                    payload=alert(source_type, spike),
                    next_attempt_at=now,
                )
            )
    # A run at the same time may have queued some of these: the unique constraint keeps one.
    AlertDelivery.objects.bulk_create(rows, batch_size=1000, ignore_conflicts=True)
    return len(rows)


# --- Send ---------------------------------------------------------------------------


def backoff(attempts: int) -> timedelta:
    """The wait after the `attempts`-th failed attempt: base, 2x base, 4x base, ... 1 h."""
    base = timedelta(seconds=settings.ALERT_RETRY_SECONDS)
    return min(base * 2 ** max(attempts - 1, 0), BACKOFF_MAX)


def _safe(message: str, channel: AlertChannel) -> str:
    # A webhook URL can carry a secret (Slack's do, in the path): never store or log it.
    return message.replace(channel.target, channel.destination)[:1000]


def _post(channel: AlertChannel, alert: dict[str, Any]) -> None:
    try:
        response = requests.post(
            channel.target,
            json=webhook_body(channel, alert),
            timeout=settings.ALERT_TIMEOUT_SECONDS,
            allow_redirects=False,
        )
    except requests.RequestException as exc:
        # requests' messages name the URL; the exception's type says enough.
        raise DeliveryFailed(f"{type(exc).__name__} calling {channel.destination}") from None
    if not 200 <= response.status_code < 300:
        raise DeliveryFailed(
            f"{channel.destination} answered HTTP {response.status_code}: {response.text[:200]}"
        )


def _email(channel: AlertChannel, alert: dict[str, Any]) -> None:
    try:
        send_mail(alert["subject"], alert["text"], settings.ALERT_FROM_EMAIL, [channel.target])
    except Exception as exc:  # SMTP, DNS and socket errors alike: the backend's business
        raise DeliveryFailed(f"{type(exc).__name__}: {exc}") from None


def send(delivery: AlertDelivery) -> None:
    """Send one delivery through its channel; raises DeliveryFailed."""
    channel = delivery.channel
    if channel.type == AlertChannel.Type.WEBHOOK:
        _post(channel, delivery.payload)
    else:
        _email(channel, delivery.payload)


def _claim(delivery_id: int, now: datetime) -> bool:
    claimed = AlertDelivery.objects.filter(
        pk=delivery_id, status=AlertDelivery.Status.PENDING, next_attempt_at__lte=now
    ).update(next_attempt_at=now + LEASE)
    return claimed == 1


def _attempt(delivery: AlertDelivery, now: datetime) -> str:
    """Send a claimed delivery and record the outcome: sent, retrying or failed."""
    channel = delivery.channel
    attempts = delivery.attempts + 1
    fields = {"channel_id": channel.pk, "delivery_id": delivery.pk, "kind": delivery.kind}
    try:
        send(delivery)
    except DeliveryFailed as exc:
        error = _safe(str(exc), channel)
    except Exception as exc:  # a bug in one channel must not stop the others
        error = _safe(f"{type(exc).__name__}: {exc}", channel)
        log.error("alert delivery crashed: %s", error, extra=fields)
    else:
        AlertDelivery.objects.filter(pk=delivery.pk).update(
            status=AlertDelivery.Status.SENT, attempts=attempts, sent_at=now, last_error=""
        )
        log.info("alert sent", extra=fields)
        return "sent"
    done = attempts >= settings.ALERT_MAX_ATTEMPTS
    AlertDelivery.objects.filter(pk=delivery.pk).update(
        status=AlertDelivery.Status.FAILED if done else AlertDelivery.Status.PENDING,
        attempts=attempts,
        last_error=error,
        next_attempt_at=now if done else now + backoff(attempts),
    )
    log.warning("alert delivery failed (%s)%s", error, ", giving up" if done else "", extra=fields)
    return "failed" if done else "retrying"


def send_due(now: datetime | None = None, limit: int = SEND_BATCH) -> DeliveryResult:
    """Send the deliveries that are due, each claimed first so that no two runs send
    the same one."""
    now = now or timezone.now()
    result = DeliveryResult()
    due = list(
        AlertDelivery.objects.filter(
            status=AlertDelivery.Status.PENDING, next_attempt_at__lte=now, channel__enabled=True
        )
        .order_by("next_attempt_at", "id")
        .values_list("id", flat=True)[:limit]
    )
    for delivery_id in due:
        if not _claim(delivery_id, now):
            continue  # another run got there first
        delivery = AlertDelivery.objects.select_related("channel").get(pk=delivery_id)
        outcome = _attempt(delivery, now)
        setattr(result, outcome, getattr(result, outcome) + 1)
    return result


def deliver(now: datetime | None = None) -> DeliveryResult:
    """Queue what is new, then send what is due."""
    now = now or timezone.now()
    enqueued = enqueue(now)
    result = send_due(now)
    result.enqueued = enqueued
    return result


def retry(deliveries: QuerySet[AlertDelivery], now: datetime | None = None) -> int:
    """Send failed deliveries again (an operator's action, once the channel is fixed)."""
    return deliveries.filter(status=AlertDelivery.Status.FAILED).update(
        status=AlertDelivery.Status.PENDING,
        attempts=0,
        next_attempt_at=now or timezone.now(),
        last_error="",
    )
