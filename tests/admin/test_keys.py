"""Keys are issued from the admin through budgets.services: the secret is shown once, on
the page that answers the form, and only its hash is kept. Revoking asks first."""

from __future__ import annotations

import re

import pytest
from django.contrib.admin.models import LogEntry
from django.urls import reverse

from budgets import services
from budgets.errors import InvalidApiKey
from budgets.models import ApiKey

ADD = reverse("admin:budgets_apikey_add")
CHANGELIST = reverse("admin:budgets_apikey_changelist")


def issue(admin_client, agent, label: str = "prod"):
    return admin_client.post(ADD, {"agent": agent.pk, "label": label})


def secret_in(page: str) -> str:
    found = re.findall(r"sgk_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", page)
    assert len(set(found)) == 1, found
    return found[0]


def test_it_shows_the_new_secret_once_and_stores_only_its_hash(admin_client, invoice_bot):
    response = issue(admin_client, invoice_bot)

    assert response.status_code == 200
    page = response.content.decode()
    secret = secret_in(page)
    assert "it will not be shown again" in page
    assert "no-store" in response["Cache-Control"]
    key = ApiKey.objects.get()
    assert (key.agent, key.label) == (invoice_bot, "prod")
    assert secret.startswith(f"sgk_{key.key_id}_")
    assert services.authenticate_key(secret) == key
    assert secret not in key.key_hash
    assert all(secret not in str(value) for value in vars(key).values())


def test_the_secret_is_nowhere_after_that_page(admin_client, invoice_bot):
    secret = secret_in(issue(admin_client, invoice_bot).content.decode())
    key = ApiKey.objects.get()

    change = admin_client.get(reverse("admin:budgets_apikey_change", args=[key.pk]))
    listing = admin_client.get(CHANGELIST)
    history = admin_client.get(reverse("admin:budgets_apikey_history", args=[key.pk]))

    for page in (change, listing, history):
        assert page.status_code == 200
        assert secret not in page.content.decode()
        assert key.prefix in page.content.decode()
    assert all(secret not in entry.change_message for entry in LogEntry.objects.all())
    assert all(secret not in entry.object_repr for entry in LogEntry.objects.all())
    # Not carried in the session for a later page either (e.g. as a message).
    assert secret not in str(dict(admin_client.session))


def test_each_issue_makes_a_new_key(admin_client, invoice_bot):
    first = secret_in(issue(admin_client, invoice_bot).content.decode())
    second = secret_in(issue(admin_client, invoice_bot).content.decode())
    assert first != second
    assert ApiKey.objects.count() == 2


def test_it_refuses_a_key_without_an_agent(admin_client, db):
    response = admin_client.post(ADD, {"label": "prod"})
    assert response.status_code == 200
    assert "This field is required" in response.content.decode()
    assert not ApiKey.objects.exists()


def test_the_add_page_can_start_from_an_agent(admin_client, invoice_bot):
    agent_page = admin_client.get(reverse("admin:budgets_agent_change", args=[invoice_bot.pk]))
    assert f"{ADD}?agent={invoice_bot.pk}" in agent_page.content.decode()
    form = admin_client.get(ADD, {"agent": invoice_bot.pk}).content.decode()
    assert f'<option value="{invoice_bot.pk}" selected>' in form


def test_revoking_from_the_key_page_asks_then_revokes(admin_client, invoice_bot):
    key, secret = services.issue_key(invoice_bot)
    change = admin_client.get(reverse("admin:budgets_apikey_change", args=[key.pk]))
    revoke_url = reverse("admin:budgets_apikey_revoke", args=[key.pk])
    assert revoke_url in change.content.decode()

    confirmation = admin_client.get(revoke_url)

    assert confirmation.status_code == 200
    assert "Yes, revoke" in confirmation.content.decode()
    key.refresh_from_db()
    assert key.revoked_at is None

    done = admin_client.post(revoke_url, {"post": "yes"})

    assert done.status_code == 302
    key.refresh_from_db()
    assert key.revoked_at is not None
    with pytest.raises(InvalidApiKey):
        services.authenticate_key(secret)
    assert revoke_url not in admin_client.get(done["Location"]).content.decode()


def test_the_revoke_action_asks_then_revokes(admin_client, invoice_bot, churn_bot):
    kept, _ = services.issue_key(churn_bot)
    key, _ = services.issue_key(invoice_bot)
    chosen = {"action": "revoke", "_selected_action": [key.pk]}

    confirmation = admin_client.post(CHANGELIST, chosen)

    assert confirmation.status_code == 200
    assert key.prefix in confirmation.content.decode()
    key.refresh_from_db()
    assert key.revoked_at is None

    done = admin_client.post(CHANGELIST, {**chosen, "post": "yes"})

    assert done.status_code == 302
    key.refresh_from_db()
    kept.refresh_from_db()
    assert key.revoked_at is not None
    assert kept.revoked_at is None


def test_revoking_needs_a_post(admin_client, invoice_bot):
    key, _ = services.issue_key(invoice_bot)
    admin_client.get(reverse("admin:budgets_apikey_revoke", args=[key.pk]), {"post": "yes"})
    key.refresh_from_db()
    assert key.revoked_at is None
