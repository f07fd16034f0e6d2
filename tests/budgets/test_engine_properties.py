"""Random sequences of authorize, capture (usage at or under the hold), void, expire,
reset and clock moves against the real database. After every step:

- spent + held <= hard limit, for every period;
- each period's spent equals the ledger rows charged to it;
- each period's held equals the live holds on it (no hold counted twice, none lost);
- no event kind repeats in a period.
"""

import contextlib
from datetime import timedelta

import pytest
from django.db import transaction
from django.db.models import Count, Sum
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from budgets import engine, services
from budgets.errors import BudgetExceeded, InvalidRequest
from budgets.models import (
    BudgetEvent,
    BudgetPeriod,
    BudgetPolicy,
    Hold,
    HoldLine,
    HoldStatus,
    ScopeType,
)
from budgets.money import Prices
from spend.models import SpendEntry

PRICES = Prices(10, 30)

operations = st.one_of(
    st.tuples(
        st.just("authorize"),
        st.sampled_from([None, "invoice-bot", "churn-bot"]),
        st.sampled_from(["", "user-1", "user-2"]),
        st.integers(0, 3000),
        st.integers(1, 5000),
    ),
    st.tuples(st.just("capture"), st.integers(0, 50), st.floats(0, 1), st.floats(0, 1)),
    st.tuples(st.just("void"), st.integers(0, 50)),
    st.tuples(st.just("expire")),
    st.tuples(st.just("reset"), st.sampled_from(["tenant", "agent", "user"])),
    st.tuples(st.just("advance"), st.integers(1, 36 * 60)),
)


def check_invariants():
    charged = dict(
        HoldLine.objects.filter(hold__entry__isnull=False)
        .values("period")
        .annotate(total=Sum("hold__entry__cost_nanos"))
        .values_list("period", "total")
    )
    live = dict(
        HoldLine.objects.filter(hold__status=HoldStatus.HELD)
        .values("period")
        .annotate(total=Sum("amount_nanos"))
        .values_list("period", "total")
    )
    for period in BudgetPeriod.objects.all():
        assert period.spent_nanos + period.held_nanos <= period.hard_nanos, period
        assert period.spent_nanos == charged.get(period.pk, 0), period
        assert period.held_nanos == live.get(period.pk, 0), period
    assert SpendEntry.objects.filter(hold__isnull=True).count() == 0
    repeated = BudgetEvent.objects.values("period", "kind").annotate(n=Count("id")).filter(n__gt=1)
    assert not repeated.exists()


@pytest.mark.django_db
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=st.lists(operations, max_size=30))
def test_budgets_are_never_overspent(acme, invoice_bot, churn_bot, now, steps):
    agents = {"invoice-bot": invoice_bot, "churn-bot": churn_bot, None: None}
    with transaction.atomic():
        services.set_policy(acme, ScopeType.TENANT, limit_nanos=300_000, window="day", now=now)
        services.set_policy(
            acme, ScopeType.AGENT, agent=invoice_bot, limit_nanos=120_000, window="hour", now=now
        )
        services.set_policy(
            acme, ScopeType.USER, user_key="user-1", limit_nanos=90_000, window="week", now=now
        )
        clock = now
        holds: list[Hold] = []
        for number, step in enumerate(steps):
            kind = step[0]
            if kind == "authorize":
                _, agent, user, input_tokens, max_output = step
                try:
                    scope = engine.state_of(acme, agents[agent], user, now=clock)
                    holds.append(
                        engine.authorize(
                            scope,
                            request_id=f"r{number}",
                            model="m",
                            prices=PRICES,
                            input_tokens=input_tokens,
                            max_output_tokens=max_output,
                            ttl=timedelta(minutes=10),
                        )
                    )
                except BudgetExceeded:
                    pass
            elif kind == "capture" and holds:
                _, index, prompt_share, completion_share = step
                hold = holds[index % len(holds)]
                hold.refresh_from_db()
                if hold.status == HoldStatus.HELD:
                    engine.capture(
                        hold,
                        prompt_tokens=int(hold.input_tokens * prompt_share),
                        completion_tokens=int(hold.max_output_tokens * completion_share),
                    )
            elif kind == "void" and holds:
                hold = holds[step[1] % len(holds)]
                hold.refresh_from_db()
                if hold.status != HoldStatus.CAPTURED:
                    engine.void(hold)
            elif kind == "expire":
                engine.expire_holds(clock)
            elif kind == "reset":
                policy = BudgetPolicy.objects.get(tenant=acme, scope_type=step[1])
                with contextlib.suppress(InvalidRequest):  # reset twice at the same instant
                    engine.reset(policy, reason="property test", by="hypothesis", now=clock)
            elif kind == "advance":
                clock += timedelta(minutes=step[1])
            check_invariants()
        transaction.set_rollback(True)
