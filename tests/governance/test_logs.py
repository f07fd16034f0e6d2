"""Structured logs: one JSON object a line, a record of every gateway decision and
webhook delivery with its id, and never a key, a secret or a signature."""

from __future__ import annotations

import json
import logging
import sys

import httpx2
import pytest

from governance.logs import JsonFormatter, TextFormatter, redact
from routing.views import wait_for_charges
from tests.webhooks.stripe_objects import SECRET, event, resource, sign

MESSAGES = [{"role": "user", "content": "Summarise the invoice from Acme for March."}]


def record(message: str, *args, level: int = logging.INFO, **extra) -> logging.LogRecord:
    return logging.getLogger("governance.test").makeRecord(
        "governance.test", level, __file__, 1, message, args, None, extra=extra
    )


def lines(caplog) -> list[dict]:
    formatter = JsonFormatter()
    return [json.loads(formatter.format(r)) for r in caplog.records]


def test_it_writes_one_json_object_a_line_with_the_extra_fields():
    line = JsonFormatter().format(
        record("call %s allowed", "gw-1", request_id="gw-1", tenant="cus_acme", status=200)
    )
    entry = json.loads(line)
    assert "\n" not in line
    assert entry["time"].endswith("+00:00")
    assert (entry["level"], entry["logger"], entry["message"]) == (
        "INFO",
        "governance.test",
        "call gw-1 allowed",
    )
    assert (entry["request_id"], entry["tenant"], entry["status"]) == ("gw-1", "cus_acme", 200)


def test_it_includes_the_exception_on_the_same_line():
    try:
        raise ValueError("the database went away")
    except ValueError:
        failed = logging.getLogger("governance.test").makeRecord(
            "governance.test", logging.ERROR, __file__, 1, "boom", (), sys.exc_info()
        )
    line = JsonFormatter().format(failed)
    assert "\n" not in line
    assert "ValueError: the database went away" in json.loads(line)["exception"]


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("key sgk_0123456789ab_Zx-9_abcDEF12345 used", "key sgk_0123456789ab_[redacted] used"),
        ("secret whsec_test_3f9a1c in config", "secret [redacted] in config"),
        ("stripe sk_live_51HabcDEF123", "stripe [redacted]"),
        ("Authorization: Bearer abc.def-ghi", "Authorization: Bearer [redacted]"),
        ("t=1700000000,v1=" + "a" * 64, "t=1700000000,[redacted]"),
        ("t=1700000000,v0=" + "b" * 64, "t=1700000000,[redacted]"),
        ("restricted rk_live_9Zq", "restricted [redacted]"),
        ("restricted rk_test_1", "restricted [redacted]"),
        ("stripe sk_test_2", "stripe [redacted]"),
        ("header bearer tok-123", "header bearer [redacted]"),
        ("an ordinary message about cus_acme", "an ordinary message about cus_acme"),
    ],
)
def test_it_masks_anything_shaped_like_a_secret(text, shown):
    assert redact(text) == shown
    assert json.loads(JsonFormatter().format(record("%s", text)))["message"] == shown
    assert TextFormatter("%(levelname)s %(message)s").format(record("%s", text)) == f"INFO {shown}"


def test_it_masks_fields_named_like_secrets():
    entry = json.loads(
        JsonFormatter().format(record("hi", authorization="Basic dXNlcjpwYXNz", api_key="k1"))
    )
    assert (entry["authorization"], entry["api_key"]) == ("[redacted]", "[redacted]")


def test_it_logs_decisions_and_webhooks_without_any_key_or_secret(
    gateway_url, simulator, acme_key, client, settings, caplog
):
    settings.STRIPE_WEBHOOK_SECRET = SECRET
    caplog.set_level(logging.DEBUG)
    simulator()
    wrong_key = acme_key[:-6] + "wrong0"

    allowed = httpx2.post(
        f"{gateway_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {acme_key}"},
        json={"model": "mistral-small-latest", "messages": MESSAGES, "max_tokens": 20},
        timeout=30,
    )
    wait_for_charges()  # a plain call is logged once charged, just after its reply
    refused = httpx2.post(
        f"{gateway_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {wrong_key}"},
        json={"model": "mistral-small-latest", "messages": MESSAGES},
        timeout=30,
    )
    payload = json.dumps(event("customer.created", resource("customer"))).encode()
    signature = sign(payload)
    webhook = client.post(
        "/api/webhooks/stripe",
        data=payload,
        content_type="application/json",
        HTTP_STRIPE_SIGNATURE=signature,
    )
    assert (allowed.status_code, refused.status_code, webhook.status_code) == (200, 401, 200)

    secrets = [acme_key, acme_key.split("_", 2)[2], wrong_key, SECRET, signature]
    # What was logged, before the formatter masks anything: nothing may rely on masking.
    raw = "\n".join(f"{r.getMessage()} {vars(r)!r} {r.exc_text or ''}" for r in caplog.records)
    written = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    for secret in secrets:
        assert secret not in raw
        assert secret not in written
    assert "v1=" not in written

    decisions = [e for e in lines(caplog) if e["logger"] == "governance.gateway"]
    served = next(e for e in decisions if e["decision"] == "allowed")
    assert served["request_id"] == allowed.headers["X-Request-Id"]
    assert (served["tenant"], served["agent"], served["model"]) == (
        "cus_acme",
        "invoice-bot",
        "mistral-small",
    )
    assert served["status"] == 200
    assert served["cost_usd"]
    denied = next(e for e in decisions if e["decision"] == "refused")
    assert denied["request_id"] == refused.headers["X-Request-Id"]
    assert (denied["code"], denied["status"]) == ("invalid_api_key", 401)
    assert "tenant" not in denied
    [handled] = [e for e in lines(caplog) if e["logger"] == "governance.webhooks"]
    assert handled["event_id"] == webhook.json()["id"]
    assert (handled["event_type"], handled["status"]) == ("customer.created", "ignored")
