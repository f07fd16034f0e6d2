"""The common call read and held in one statement (PostgreSQL), and every case that is
not common going the general way with the budgets that statement read.

On SQLite the same decisions are checked through the general path; the statement
counts are PostgreSQL's.
"""

import psycopg
import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from budgets import engine, services
from budgets.errors import BudgetExceeded, InvalidRequest
from budgets.models import BudgetPeriod, BudgetPolicy, Hold, HoldLine, ScopeType
from budgets.money import usd_to_nanos
from routing import gateway
from routing.catalog import get_catalog
from tests.budgets.test_statements import statements

LARGE = "mistral-large"


@pytest.fixture
def key(invoice_bot):
    _, raw = services.issue_key(invoice_bot)
    return services.authenticate_key(raw)


def body(model="mistral-large-latest", max_tokens=200, **extra):
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Summarise this invoice."}],
        "max_tokens": max_tokens,
        **extra,
    }


def plan_counted(key, request, request_id="req-1", **kwargs):
    with CaptureQueriesContext(connection) as sent:
        decision = gateway.plan_call(key, request, request_id=request_id, **kwargs)
    return decision, len(statements(sent))


def on_postgres() -> bool:
    return connection.vendor == "postgresql"


def held_by_period(hold: Hold) -> dict[int, int]:
    return dict(HoldLine.objects.filter(hold=hold).values_list("period_id", "amount_nanos"))


def test_a_plain_call_is_one_statement_and_holds_on_every_budget(acme, invoice_bot, key):
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("10"))
    services.set_policy(acme, ScopeType.AGENT, agent=invoice_bot, limit_nanos=usd_to_nanos("5"))
    services.set_policy(acme, ScopeType.USER, user_key="u-1", limit_nanos=usd_to_nanos("1"))
    gateway.plan_call(key, body(), request_id="warm-up", user_key="u-1")  # opens the periods

    decision, sent = plan_counted(key, body(), user_key="u-1")

    large = get_catalog().resolve(LARGE)
    amount = large.prices.cost_nanos(decision.input_bound, 200)
    assert (decision.model.id, decision.max_tokens, decision.downgraded_from) == (LARGE, 200, None)
    assert decision.hold.pk is not None and decision.hold.amount_nanos == amount
    assert decision.hold.expires_at > decision.scope.now
    periods = {p.pk: p for p in BudgetPeriod.objects.all()}
    assert held_by_period(decision.hold) == {pk: amount for pk in periods}
    assert all(p.held_nanos == 2 * amount for p in periods.values())  # warm-up + this call
    # The scope the plan carries is the one after the hold (response headers use it).
    assert [p.pk for p in decision.scope.periods] == sorted(periods)
    assert [p.held_nanos for p in decision.scope.periods] == [2 * amount] * 3
    assert decision.scope.remaining_nanos == usd_to_nanos("1") - 2 * amount
    if on_postgres():
        assert sent == 1


def test_a_plain_call_without_any_budget_holds_with_no_lines(acme, key, settings):
    settings.DEFAULT_DAILY_BUDGET_NANOS = None
    decision, sent = plan_counted(key, body())
    assert decision.scope.periods == []
    assert decision.scope.remaining_nanos is None
    assert Hold.objects.filter(pk=decision.hold.pk).exists()
    assert held_by_period(decision.hold) == {}
    if on_postgres():
        assert sent == 1


def test_a_call_that_would_create_a_default_budget_goes_the_general_way(
    acme, invoice_bot, key, settings
):
    settings.DEFAULT_AGENT_DAILY_BUDGET_NANOS = usd_to_nanos("2")
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("10"))
    gateway.plan_call(key, body(), request_id="opens-tenant")
    BudgetPolicy.objects.filter(scope_type=ScopeType.AGENT).delete()

    first, _ = plan_counted(key, body(), request_id="first")
    agent_policy = BudgetPolicy.objects.get(scope_type=ScopeType.AGENT)
    assert agent_policy.limit_nanos == usd_to_nanos("2")
    assert len(held_by_period(first.hold)) == 2  # the new agent budget is held on too

    second, sent = plan_counted(key, body(), request_id="second")
    assert len(held_by_period(second.hold)) == 2
    if on_postgres():
        assert sent == 1


def test_a_disabled_budget_is_neither_held_on_nor_replaced_by_a_default(acme, key, settings):
    settings.DEFAULT_DAILY_BUDGET_NANOS = usd_to_nanos("100")
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("1"))
    BudgetPolicy.objects.filter(tenant=acme).update(enabled=False)
    decision, sent = plan_counted(key, body())
    assert decision.scope.periods == []
    assert held_by_period(decision.hold) == {}
    assert BudgetPolicy.objects.filter(tenant=acme).count() == 1
    if on_postgres():
        assert sent == 1


def test_at_the_soft_cap_the_general_way_downgrades_with_the_budgets_already_read(acme, key, spend):
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("1"))
    spend(acme, usd_to_nanos("0.85"))
    decision, sent = plan_counted(key, body())
    assert (decision.model.id, decision.downgraded_from) == ("mistral-small", LARGE)
    (period,) = BudgetPeriod.objects.all()
    assert held_by_period(decision.hold) == {period.pk: decision.hold.amount_nanos}
    if on_postgres():
        assert sent == 2  # the one statement (read, nothing held), then the hold


def test_when_max_tokens_does_not_fit_the_general_way_clamps(acme, key):
    services.set_policy(
        acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("0.001"), soft_cap="1", warn_at="1"
    )
    engine.state_of(acme, key.agent)  # opens the period
    decision, sent = plan_counted(key, body(max_tokens=100_000))
    assert decision.model.id == LARGE and decision.max_tokens < 100_000
    (period,) = BudgetPeriod.objects.all()
    assert period.held_nanos == decision.hold.amount_nanos <= period.limit_nanos
    if on_postgres():
        assert sent == 2


def test_a_policy_strategy_is_applied_by_the_general_way(acme, key):
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("10"))
    BudgetPolicy.objects.filter(tenant=acme).update(strategy="cost-optimized")
    engine.state_of(acme, key.agent)  # opens the period
    decision, sent = plan_counted(key, body())
    assert decision.model.id == "ministral-3b"
    if on_postgres():
        assert sent == 2


def test_the_agents_own_strategy_overrides_a_policy_strategy_in_one_statement(acme, key):
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("10"))
    BudgetPolicy.objects.filter(tenant=acme).update(strategy="cost-optimized")
    key.agent.strategy = "quality"
    gateway.plan_call(key, body(), request_id="opens")
    decision, sent = plan_counted(key, body(model="ministral-3b-latest"))
    assert decision.model.id == LARGE
    if on_postgres():
        assert sent == 1


def test_a_used_up_budget_is_refused_and_nothing_is_held(acme, key, spend):
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("0.01"))
    spend(acme, usd_to_nanos("0.01"))
    with pytest.raises(BudgetExceeded, match="used up"):
        gateway.plan_call(key, body(), request_id="refused")
    assert not Hold.objects.filter(request_id="refused").exists()
    assert BudgetPeriod.objects.get().held_nanos == 0


def test_another_tenants_request_id_is_refused_and_changes_nothing(acme, globex, key):
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("10"))
    theirs = engine.authorize(
        engine.state_of(globex),
        request_id="shared-id",
        model=LARGE,
        prices=get_catalog().resolve(LARGE).prices,
        input_tokens=1,
        max_output_tokens=1,
    )
    with pytest.raises(InvalidRequest, match="already used"):
        gateway.plan_call(key, body(), request_id="shared-id")
    assert Hold.objects.get(request_id="shared-id").pk == theirs.pk
    assert all(p.held_nanos == 0 for p in BudgetPeriod.objects.filter(policy__tenant=acme))


def test_a_closed_period_is_not_held_on(acme, key):
    """A period closed (a reset) since the last read: the next call holds on its new one."""
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("10"))
    first = gateway.plan_call(key, body(), request_id="first")
    (old,) = first.scope.periods
    engine.reset(old.policy, reason="test", by="tests")
    second = gateway.plan_call(key, body(), request_id="second")
    (new,) = second.scope.periods
    assert new.pk != old.pk
    assert held_by_period(second.hold) == {new.pk: second.hold.amount_nanos}


def test_on_postgresql_a_plain_call_is_two_prepared_statements(require_postgres, acme, key):
    """Read-and-hold and capture: each parsed and planned once per connection."""
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("10"))
    engine.state_of(acme, key.agent)  # opens the period

    def prepared() -> dict[str, int]:
        with connection.cursor() as cursor:
            cursor.execute("SELECT name, generic_plans + custom_plans FROM pg_prepared_statements")
            return dict(cursor.fetchall())

    before = prepared()
    # Values of every size (psycopg would send 10 as int2 and 40,000 as int4): still
    # one statement each, every value sent as int8.
    for n, max_tokens in enumerate((10, 40_000, 300)):
        decision = gateway.plan_call(key, body(max_tokens=max_tokens), request_id=f"r-{n}")
        gateway.capture(decision, prompt_tokens=10, completion_tokens=max_tokens)
    after = prepared()

    used = {name: uses - before.get(name, 0) for name, uses in after.items()}
    assert sorted(uses for uses in used.values() if uses) == [3, 3]


def test_a_new_end_user_with_a_default_budget_goes_the_general_way_once(acme, key, settings):
    settings.DEFAULT_USER_DAILY_BUDGET_NANOS = usd_to_nanos("1")
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("10"))
    engine.state_of(acme, key.agent)  # opens the tenant's period

    first, _ = plan_counted(key, body(), request_id="first", user_key="u-9")
    user_policy = BudgetPolicy.objects.get(scope_type=ScopeType.USER, user_key="u-9")
    assert user_policy.limit_nanos == usd_to_nanos("1")
    assert len(held_by_period(first.hold)) == 2

    second, sent = plan_counted(key, body(), request_id="second", user_key="u-9")
    assert len(held_by_period(second.hold)) == 2
    if on_postgres():
        assert sent == 1


def test_the_same_request_id_again_is_the_same_hold(acme, key):
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("10"))
    engine.state_of(acme, key.agent)  # opens the period
    first = gateway.plan_call(key, body(), request_id="again")
    second = gateway.plan_call(key, body(), request_id="again")
    assert second.hold.pk == first.hold.pk
    assert BudgetPeriod.objects.get().held_nanos == first.hold.amount_nanos


def test_a_budget_past_its_soft_cap_is_read_not_locked(require_postgres, transactional_db, spend):
    """Read as degraded, the periods are not locked (the general path locks them next):
    inside a caller's transaction another connection can still lock them at once."""
    acme = services.create_tenant("Acme", "cus_acme")
    agent = services.create_agent(acme, "invoice-bot")
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("1"))
    spend(acme, usd_to_nanos("0.85"))
    (period,) = BudgetPeriod.objects.all()
    settings_dict = connection.settings_dict
    with transaction.atomic():
        scope, hold = engine.place_plain_hold(
            engine.plain_hold(
                acme,
                agent,
                "",
                request_id="not-plain",
                model=LARGE,
                prices=get_catalog().resolve(LARGE).prices,
                input_tokens=10,
                max_output_tokens=10,
                policy_strategy_matters=True,
            )
        )
        with psycopg.connect(
            dbname=settings_dict["NAME"],
            user=settings_dict["USER"],
            host=settings_dict["HOST"],
            port=settings_dict["PORT"],
            autocommit=False,
        ) as other:
            other.execute(
                "SELECT id FROM budgets_budgetperiod WHERE id = %s FOR UPDATE NOWAIT", [period.pk]
            )
    assert hold is None and scope.state == "degraded"
