"""A runaway agent is paused by the spike task and then refused by the gateway."""

from __future__ import annotations

from budgets import services
from budgets.models import Agent, ScopeType
from spend.models import SpendEntry, Spike
from spend.tasks import detect_spikes

from .test_gateway_http import chat


def test_a_runaway_agent_is_paused_and_refused(gateway_url, simulator, acme, invoice_bot, acme_key):
    simulator()
    services.set_policy(
        acme, ScopeType.AGENT, agent=invoice_bot, limit_nanos=10**12,
        velocity_limit_nanos=50_000, auto_pause=True,
    )  # fmt: skip
    while sum(SpendEntry.objects.values_list("cost_nanos", flat=True)) <= 50_000:
        assert chat(gateway_url, acme_key, max_tokens=200).status_code == 200
    detect_spikes()
    spike = Spike.objects.get(agent=invoice_bot, kind="velocity")
    assert spike.agent_paused
    assert Agent.objects.get(pk=invoice_bot.pk).paused
    refused = chat(gateway_url, acme_key, max_tokens=20)
    assert refused.status_code == 403
    assert refused.json()["code"] == "agent_paused"
    assert "runaway" in refused.json()["message"]
    # An operator resumes it; calls go through again.
    services.set_agent_paused(Agent.objects.get(pk=invoice_bot.pk), False)
    assert chat(gateway_url, acme_key, max_tokens=20).status_code == 200
