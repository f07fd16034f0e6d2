import hashlib
from datetime import timedelta

import pytest
from django.utils import timezone

from budgets import services
from budgets.errors import InvalidApiKey
from budgets.models import ApiKey


def test_a_key_is_shown_once_and_only_its_hash_is_stored(invoice_bot):
    key, raw = services.issue_key(invoice_bot, label="prod")
    assert raw.startswith(f"sgk_{key.key_id}_")
    assert len(raw) > 50
    stored = ApiKey.objects.get(pk=key.pk)
    assert stored.key_hash == hashlib.sha256(raw.encode()).hexdigest()
    assert raw not in {str(v) for v in ApiKey.objects.values().get(pk=key.pk).values()}
    assert stored.prefix == f"sgk_{key.key_id}"


def test_keys_are_unique(invoice_bot):
    raws = {services.issue_key(invoice_bot)[1] for _ in range(20)}
    assert len(raws) == 20


def test_a_valid_key_authenticates_to_its_agent_and_tenant(invoice_bot, acme):
    _, raw = services.issue_key(invoice_bot)
    key = services.authenticate_key(raw)
    assert key.agent == invoice_bot
    assert key.agent.tenant == acme
    assert key.last_used_at is not None


@pytest.mark.parametrize(
    "mangle",
    [
        lambda raw: raw[:-1] + ("A" if raw[-1] != "A" else "B"),
        lambda raw: "sgk_000000000000_" + raw.split("_", 2)[2],
        lambda raw: raw.replace("sgk_", "xyz_"),
        lambda raw: "",
        lambda raw: "sgk__",
        lambda raw: "Bearer " + raw,
    ],
)
def test_a_wrong_key_is_refused(invoice_bot, mangle):
    _, raw = services.issue_key(invoice_bot)
    with pytest.raises(InvalidApiKey):
        services.authenticate_key(mangle(raw))


def test_a_revoked_key_is_refused(invoice_bot):
    key, raw = services.issue_key(invoice_bot)
    services.revoke_key(key)
    with pytest.raises(InvalidApiKey, match="revoked"):
        services.authenticate_key(raw)


def test_last_used_is_written_at_most_once_a_minute(invoice_bot):
    key, raw = services.issue_key(invoice_bot)
    services.authenticate_key(raw)
    first = ApiKey.objects.get(pk=key.pk).last_used_at
    services.authenticate_key(raw)
    assert ApiKey.objects.get(pk=key.pk).last_used_at == first
    ApiKey.objects.filter(pk=key.pk).update(last_used_at=timezone.now() - timedelta(minutes=2))
    services.authenticate_key(raw)
    assert ApiKey.objects.get(pk=key.pk).last_used_at > first
