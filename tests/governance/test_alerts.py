"""Alerts for budget events and spikes reach webhook and email channels once each, with
retries, and a failing channel holds back no one else. Webhooks are delivered to a real
HTTP server on loopback."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.core.exceptions import ValidationError
from django.db import connection
from django.urls import reverse
from django.utils import timezone

from budgets import engine, services
from budgets.models import ScopeType
from budgets.money import usd_to_nanos
from governance.alerts import is_slack
from governance.models import AlertChannel, AlertDelivery
from governance.tasks import deliver_alerts
from spend.models import Spike
from tests.threads import in_threads


@pytest.fixture(autouse=True)
def alert_settings(settings):
    settings.ALERT_LOOKBACK_HOURS = 24
    settings.ALERT_MAX_ATTEMPTS = 4
    settings.ALERT_RETRY_SECONDS = 60
    settings.ALERT_TIMEOUT_SECONDS = 5
    settings.ALERT_FROM_EMAIL = "alerts@governance.test"
    settings.CONSOLE_BASE_URL = "https://console.example.com"


class Receiver(ThreadingHTTPServer):
    """Records every POST; fails the next `failures` with a 500, answers after `delay`,
    and runs `during_next_request` (once) before it answers."""

    daemon_threads = True
    block_on_close = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ReceiverHandler)
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.failures = 0
        self.delay = 0.0
        self.during_next_request: Callable[[], None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    @property
    def delivered(self) -> list[dict]:
        """Bodies of the requests answered 200."""
        return [r["body"] for r in self.requests if r["status"] == 200]


class ReceiverHandler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            status = 200
            if self.server.failures > 0:
                self.server.failures -= 1
                status = 500
            self.server.requests.append({"path": self.path, "body": body, "status": status})
            work, self.server.during_next_request = self.server.during_next_request, None
        if work is not None:
            try:
                work()
            finally:
                connection.close()
        time.sleep(self.server.delay)
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok" if status == 200 else b"no")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def receiver():
    started = []

    def start() -> Receiver:
        server = Receiver()
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


def webhook(url: str, tenant=None, **fields) -> AlertChannel:
    return AlertChannel.objects.create(
        name=fields.pop("name", "ops webhook"), type="webhook", target=url, tenant=tenant, **fields
    )


def email(address: str, tenant=None, **fields) -> AlertChannel:
    return AlertChannel.objects.create(
        name="ops email", type="email", target=address, tenant=tenant, **fields
    )


@pytest.fixture
def warn(spend):
    """Spend 6 USD of a 10 USD daily tenant budget: one `warned` event."""

    def cross(tenant, request_id: str = "warn-call") -> None:
        services.set_policy(tenant, ScopeType.TENANT, limit_nanos=usd_to_nanos("10"))
        spend(tenant, usd_to_nanos("6"), request_id)

    return cross


def test_it_delivers_a_budget_event_to_a_webhook_once(db, acme, receiver, warn):
    server = receiver()
    channel = webhook(f"{server.url}/hooks/governance")
    warn(acme)

    result = deliver_alerts(now=timezone.now())
    again = deliver_alerts(now=timezone.now() + timedelta(hours=1))

    assert result == {"enqueued": 1, "sent": 1, "retrying": 0, "failed": 0}
    assert again == {"enqueued": 0, "sent": 0, "retrying": 0, "failed": 0}
    assert len(server.requests) == 1
    assert server.requests[0]["path"] == "/hooks/governance"
    body = server.delivered[0]
    assert body["kind"] == "warned"
    assert body["tenant"] == {"name": "Acme", "stripe_customer_id": "cus_acme"}
    assert body["scope"] == {"type": "tenant", "key": "cus_acme"}
    assert (body["spent_usd"], body["limit_usd"]) == ("6", "10")
    assert body["window"]["name"] == "day"
    assert body["url"].startswith("https://console.example.com/admin/budgets/budgetevent/")
    assert "Spent USD 6 of USD 10 in the day window" in body["text"]
    delivery = AlertDelivery.objects.get()
    assert (delivery.channel, delivery.status, delivery.attempts) == (channel, "sent", 1)


def test_it_retries_a_failed_delivery_after_a_backoff(db, acme, receiver, warn):
    server = receiver()
    server.failures = 1
    webhook(server.url)
    warn(acme)
    now = timezone.now()

    first = deliver_alerts(now=now)
    delivery = AlertDelivery.objects.get()
    assert first["retrying"] == 1
    assert (delivery.status, delivery.attempts) == ("pending", 1)
    assert "answered HTTP 500" in delivery.last_error
    assert delivery.next_attempt_at == now + timedelta(seconds=60)

    assert deliver_alerts(now=now + timedelta(seconds=59))["sent"] == 0
    assert deliver_alerts(now=now + timedelta(seconds=60))["sent"] == 1

    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts, delivery.last_error) == ("sent", 2, "")
    assert [r["status"] for r in server.requests] == [500, 200]
    assert server.delivered[0]["kind"] == "warned"


def test_it_gives_up_after_the_last_attempt_and_an_operator_can_retry(
    db, acme, receiver, warn, settings, admin_client
):
    settings.ALERT_MAX_ATTEMPTS = 2
    server = receiver()
    server.failures = 2
    webhook(server.url)
    warn(acme)
    now = timezone.now()

    deliver_alerts(now=now)
    assert deliver_alerts(now=now + timedelta(minutes=1))["failed"] == 1
    assert deliver_alerts(now=now + timedelta(days=1))["sent"] == 0
    delivery = AlertDelivery.objects.get()
    assert (delivery.status, delivery.attempts) == ("failed", 2)

    response = admin_client.post(
        reverse("admin:governance_alertdelivery_changelist"),
        {"action": "retry", "_selected_action": [delivery.pk]},
    )
    assert response.status_code == 302
    assert deliver_alerts()["sent"] == 1
    assert [r["status"] for r in server.requests] == [500, 500, 200]


def test_it_sends_slack_shaped_text_to_a_slack_channel(db, acme, receiver, warn):
    server = receiver()
    webhook(f"{server.url}/services/T000/B000/XXXX", format="slack", name="slack")
    webhook(f"{server.url}/services/T000/B000/YYYY", name="auto: not slack's host")
    warn(acme)

    deliver_alerts(now=timezone.now())

    bodies = {r["path"]: r["body"] for r in server.requests}
    slack = bodies["/services/T000/B000/XXXX"]
    assert list(slack) == ["text"]
    assert "Acme (cus_acme)" in slack["text"]
    assert "Spent USD 6 of USD 10" in slack["text"]
    assert bodies["/services/T000/B000/YYYY"]["kind"] == "warned"


@pytest.mark.parametrize(
    ("url", "slack"),
    [
        ("https://hooks.slack.com/services/T000/B000/XXXX", True),
        ("https://HOOKS.SLACK.COM/services/T000/B000/XXXX", True),
        ("https://hooks.slack.com/workflows/T000/A000/123", False),
        ("https://hooks.slack.com.example.com/services/T000", False),
        ("https://example.com/services/T000/B000/XXXX", False),
        ("http://127.0.0.1:9000/services/T000/B000/XXXX", False),
    ],
)
def test_it_recognises_slack_webhook_urls(url, slack):
    assert is_slack(url) is slack


def test_it_emails_an_alert(db, acme, warn, mailoutbox):
    email("oncall@acme.test")
    warn(acme)

    assert deliver_alerts(now=timezone.now())["sent"] == 1

    [message] = mailoutbox
    assert message.to == ["oncall@acme.test"]
    assert message.from_email == "alerts@governance.test"
    assert message.subject == "[Spend Governance] Acme: tenant budget cus_acme warned"
    assert "Spent USD 6 of USD 10" in message.body
    assert "https://console.example.com/admin/budgets/budgetevent/" in message.body
    assert AlertDelivery.objects.get().status == "sent"


def test_a_failing_or_slow_channel_does_not_hold_back_the_others(
    db, acme, receiver, warn, mailoutbox, settings
):
    settings.ALERT_TIMEOUT_SECONDS = 0.3
    broken, slow, healthy = receiver(), receiver(), receiver()
    broken.failures = 100
    slow.delay = 1.5
    webhook(broken.url, name="broken")
    webhook(slow.url, name="slow")
    webhook("http://127.0.0.1:9/refused", name="nobody listens")
    webhook(healthy.url, name="healthy")
    email("oncall@acme.test")
    warn(acme)

    started = time.monotonic()
    result = deliver_alerts(now=timezone.now())

    assert time.monotonic() - started < 1.5
    assert (result["sent"], result["retrying"]) == (2, 3)
    assert [b["kind"] for b in healthy.delivered] == ["warned"]
    assert len(mailoutbox) == 1
    errors = dict(
        AlertDelivery.objects.filter(status="pending").values_list("channel__name", "last_error")
    )
    assert errors["slow"].startswith("ReadTimeout calling 127.0.0.1:")
    assert errors["nobody listens"] == "ConnectionError calling 127.0.0.1:9"
    assert "answered HTTP 500" in errors["broken"]


def test_a_tenant_channel_gets_only_its_own_tenants_alerts(db, acme, globex, receiver, warn):
    acme_server, everyone = receiver(), receiver()
    webhook(acme_server.url, tenant=acme, name="acme only")
    webhook(everyone.url, name="all tenants")
    warn(acme, "acme-call")
    warn(globex, "globex-call")

    deliver_alerts(now=timezone.now())

    assert [b["tenant"]["stripe_customer_id"] for b in acme_server.delivered] == ["cus_acme"]
    assert sorted(b["tenant"]["stripe_customer_id"] for b in everyone.delivered) == [
        "cus_acme",
        "cus_globex",
    ]


def test_a_channel_gets_only_the_kinds_it_chose(db, acme, invoice_bot, receiver, spend, now):
    default, stops = receiver(), receiver()
    webhook(default.url, name="default kinds")
    webhook(stops.url, name="stops only", kinds=["stopped"])
    policy = services.set_policy(acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("10"))
    spend(acme, usd_to_nanos("10"), "all-of-it")
    engine.reset(policy, reason="new contract", by="ops")
    Spike.objects.create(
        scope_type="agent",
        tenant=acme,
        agent=invoice_bot,
        kind=Spike.Kind.VELOCITY,
        hour=now.replace(minute=0),
        spend_nanos=usd_to_nanos("3.5"),
        baseline_nanos=usd_to_nanos("0.1"),
        threshold_nanos=usd_to_nanos("1"),
        agent_paused=True,
    )

    deliver_alerts(now=timezone.now())

    # A reset is not alerted unless chosen: every tenant has one each window.
    assert sorted(b["kind"] for b in default.delivered) == [
        "degraded",
        "spike",
        "stopped",
        "warned",
    ]
    assert [b["kind"] for b in stops.delivered] == ["stopped"]
    spike = next(b for b in default.delivered if b["kind"] == "spike")
    assert spike["scope"] == {"type": "agent", "key": "cus_acme:invoice-bot"}
    assert (spike["spent_usd"], spike["limit_usd"], spike["baseline_usd"]) == ("3.5", "1", "0.1")
    assert "agent invoice-bot of Acme (cus_acme) is over its USD-per-hour limit" in spike["text"]
    assert "The agent was paused." in spike["text"]


def test_it_only_looks_at_recent_events_after_the_channel_was_created(
    db, acme, globex, receiver, warn
):
    server = receiver()
    warn(acme, "acme-call")
    webhook(server.url)
    warn(globex, "globex-call")

    assert deliver_alerts(now=timezone.now() + timedelta(hours=25))["enqueued"] == 0
    deliver_alerts(now=timezone.now())

    assert [b["tenant"]["stripe_customer_id"] for b in server.delivered] == ["cus_globex"]


def test_a_run_does_not_send_what_another_run_is_sending(transactional_db, acme, receiver, warn):
    server = receiver()
    webhook(server.url)
    warn(acme)
    now = timezone.now()
    second_run = []
    # The second run starts while the first one waits for the receiver's answer.
    server.during_next_request = lambda: second_run.append(deliver_alerts(now=now))

    first_run = deliver_alerts(now=now)

    assert first_run["sent"] == 1
    assert second_run == [{"enqueued": 0, "sent": 0, "retrying": 0, "failed": 0}]
    assert len(server.requests) == 1


def test_two_runs_at_once_send_each_alert_once(
    require_postgres, transactional_db, acme, globex, receiver, warn
):
    server = receiver()
    server.delay = 0.1
    webhook(server.url, name="one")
    webhook(server.url, name="two")
    warn(acme, "acme-call")
    warn(globex, "globex-call")
    now = timezone.now()

    in_threads(4, lambda i: deliver_alerts(now=now))

    seen = Counter((r["path"], r["body"]["alert_id"]) for r in server.requests)
    assert len(seen) == 2
    assert set(seen.values()) == {2}  # one per channel
    assert len(server.requests) == 4
    assert set(AlertDelivery.objects.values_list("status", flat=True)) == {"sent"}


@pytest.mark.parametrize(
    ("fields", "error_field"),
    [
        ({"type": "webhook", "target": "ftp://example.com/hook"}, "target"),
        ({"type": "webhook", "target": "not a url"}, "target"),
        ({"type": "email", "target": "not-an-address"}, "target"),
        ({"type": "email", "target": "ops@example.com", "kinds": []}, "kinds"),
        ({"type": "email", "target": "ops@example.com", "kinds": ["panic"]}, "kinds"),
        ({"type": "sms", "target": "+33600000000"}, "type"),
    ],
)
def test_it_validates_channel_input(db, fields, error_field):
    channel = AlertChannel(name="bad", **fields)
    with pytest.raises(ValidationError) as error:
        channel.full_clean()
    assert error_field in error.value.message_dict


def test_it_accepts_valid_channels(db):
    AlertChannel(name="hook", type="webhook", target=" https://example.com/hook ").full_clean()
    AlertChannel(name="mail", type="email", target="ops@example.com").full_clean()


def test_the_delivery_log_is_read_only_and_filterable(db, acme, receiver, warn, admin_client):
    server = receiver()
    server.failures = 1
    channel = webhook(f"{server.url}/services/T000/B000/SECRET")
    warn(acme)
    deliver_alerts(now=timezone.now())
    delivery = AlertDelivery.objects.get()

    listing = admin_client.get(
        reverse("admin:governance_alertdelivery_changelist"), {"status": "pending"}
    )
    page = admin_client.get(reverse("admin:governance_alertdelivery_change", args=[delivery.pk]))
    channels = admin_client.get(reverse("admin:governance_alertchannel_changelist"))

    assert listing.status_code == page.status_code == channels.status_code == 200
    assert "answered HTTP 500" in listing.content.decode()
    assert "Spent USD 6 of USD 10" in page.content.decode()
    assert b'name="_save"' not in page.content
    assert "SECRET" not in channels.content.decode()
    assert "SECRET" not in delivery.last_error
    assert admin_client.get(reverse("admin:governance_alertdelivery_add")).status_code == 403
    assert channel.destination in channels.content.decode()


def test_a_channel_is_configured_in_the_admin(db, acme, admin_client):
    response = admin_client.post(
        reverse("admin:governance_alertchannel_add"),
        {
            "name": "Acme on-call",
            "tenant": acme.pk,
            "type": "email",
            "target": "oncall@acme.test",
            "format": "auto",
            "kinds": ["stopped", "spike"],
            "enabled": "on",
        },
    )
    assert response.status_code == 302, response.content.decode()
    channel = AlertChannel.objects.get()
    assert (channel.tenant, channel.kinds) == (acme, ["stopped", "spike"])
