"""GET /api/health: anonymous, 200 when serving, 503 naming the failing parts."""

from __future__ import annotations

import pytest


def test_it_reports_every_part_to_anyone(anon):
    response = anon.get("/api/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["failing"] == []
    assert set(body["checks"]) == {"database", "cache", "broker", "upstream", "stripe"}
    assert all(check["ok"] for check in body["checks"].values())


def test_it_ignores_bad_credentials(db):
    from .conftest import Api

    assert Api("Token wrong").get("/api/health").status_code == 200


def test_it_says_plainly_when_the_upstream_is_simulated(anon, settings):
    settings.UPSTREAM_SIMULATED = True
    upstream = anon.get("/api/health").json()["checks"]["upstream"]
    assert upstream["mode"] == "simulated"
    assert upstream["detail"].startswith("simulated")
    settings.UPSTREAM_SIMULATED = False
    assert anon.get("/api/health").json()["checks"]["upstream"]["mode"] == "mistral"


def test_stripe_not_configured_is_no_failure(anon, settings):
    settings.STRIPE_SECRET_KEY = settings.STRIPE_WEBHOOK_SECRET = ""
    settings.STRIPE_METER_EVENT_NAME = ""
    response = anon.get("/api/health")
    assert response.status_code == 200
    stripe = response.json()["checks"]["stripe"]
    assert stripe == {
        "ok": True,
        "detail": "not configured: Stripe features are off",
        "secret_key": False,
        "webhook_secret": False,
        "meter_event_name": False,
    }
    settings.STRIPE_SECRET_KEY = "sk_test_x"
    settings.STRIPE_WEBHOOK_SECRET = "whsec_x"
    stripe = anon.get("/api/health").json()["checks"]["stripe"]
    assert stripe["detail"] == "partly configured: no meter_event_name"
    assert "sk_test_x" not in str(stripe)


def test_a_cache_that_forgets_is_a_503(anon, settings):
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.dummy.DummyCache"}}
    response = anon.get("/api/health")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "failing"
    assert body["failing"] == ["cache"]
    assert body["checks"]["database"]["ok"]


def test_an_unreachable_broker_is_a_503(anon, settings):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    response = anon.get("/api/health")
    assert response.status_code == 503
    broker = response.json()["checks"]["broker"]
    assert broker["ok"] is False
    assert broker["configured"] is True
    assert "127.0.0.1" not in broker["detail"]


def test_a_database_that_fails_is_a_503(anon, monkeypatch):
    from django.db.backends.utils import CursorWrapper

    def fail(*args, **kwargs):
        raise RuntimeError("database is gone")

    with monkeypatch.context() as patch:
        patch.setattr(CursorWrapper, "execute", fail)
        response = anon.get("/api/health")
    assert response.status_code == 503
    assert response.json()["failing"] == ["database"]


@pytest.mark.usefixtures("require_redis")
def test_the_broker_answers_when_configured(anon, settings):
    import os

    settings.REDIS_URL = os.environ["REDIS_URL"]
    assert anon.get("/api/health").json()["checks"]["broker"]["detail"] == "ok (redis)"


def test_an_unwritable_embedded_broker_is_a_503(anon, settings, tmp_path):
    settings.REDIS_URL = ""
    folder = tmp_path / "queue"
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {"data_folder_in": str(folder)}
    response = anon.get("/api/health")
    assert response.status_code == 503
    assert response.json()["failing"] == ["broker"]
    folder.mkdir()
    broker = anon.get("/api/health").json()["checks"]["broker"]
    assert (broker["ok"], broker["configured"]) == (True, False)
