"""200 agents calling at once against a budget that pays for about 50 of them."""

from __future__ import annotations

import asyncio

import httpx2
import pytest
from django.db.models import Sum

from budgets import services
from budgets.models import BudgetPeriod, Hold, HoldStatus, ScopeType
from routing.catalog import get_catalog
from routing.gateway import prompt_token_bound
from routing.views import wait_for_charges
from spend.models import SpendEntry

pytestmark = pytest.mark.usefixtures("require_postgres")

CALLS = 200
MESSAGES = [{"role": "user", "content": "Classify this support ticket."}]


def test_concurrent_calls_never_overspend(gateway_url, simulator, acme, acme_key):
    simulator(latency_ms=20)
    small = get_catalog().resolve("mistral-small")
    body = {"model": "mistral-small-latest", "messages": MESSAGES, "max_tokens": 200}
    hold = small.prices.cost_nanos(prompt_token_bound(body), 200)
    policy = services.set_policy(
        acme, ScopeType.TENANT, limit_nanos=hold * 50, warn_at="1", soft_cap="1"
    )

    async def call_all():
        limits = httpx2.Limits(max_connections=CALLS)
        async with httpx2.AsyncClient(timeout=60, limits=limits) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        f"{gateway_url}/v1/chat/completions",
                        headers={"Authorization": f"Bearer {acme_key}"},
                        json=body,
                    )
                    for _ in range(CALLS)
                )
            )

    responses = asyncio.run(call_all())
    wait_for_charges()
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 402}, {
        r.status_code: r.text for r in responses if r.status_code not in (200, 402)
    }
    assert statuses.count(200) >= 50
    for refused in (r for r in responses if r.status_code == 402):
        assert refused.json()["code"] == "budget_exceeded"

    period = BudgetPeriod.objects.get(policy=policy)
    ledger = SpendEntry.objects.aggregate(total=Sum("cost_nanos"))["total"]
    assert SpendEntry.objects.count() == statuses.count(200)
    assert period.spent_nanos == ledger
    assert period.spent_nanos <= period.hard_nanos
    assert period.held_nanos == 0
    assert not Hold.objects.filter(status=HoldStatus.HELD).exists()
