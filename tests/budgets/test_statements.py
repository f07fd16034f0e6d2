"""A governed call costs a handful of statements (the issue's "a handful of database
round trips at most"), however many budgets govern it."""

import pytest
from django.db import OperationalError, connection
from django.test.utils import CaptureQueriesContext

from budgets import engine, services
from budgets.models import BudgetEvent, EventKind, ScopeType
from budgets.money import Prices
from spend.models import SpendEntry

PRICES = Prices(100, 1000)


def statements(captured) -> list[str]:
    """The statements sent, without transaction control (BEGIN, COMMIT, SAVEPOINT).
    Django logs a prepared statement's text as None (psycopg keeps only its name)."""
    control = ("BEGIN", "COMMIT", "SAVEPOINT", "RELEASE", "ROLLBACK")
    sent = [q["sql"] or "(prepared)" for q in captured]
    return [sql for sql in sent if not sql.upper().startswith(control)]


def test_a_call_governed_by_three_budgets_takes_a_handful_of_statements(acme, invoice_bot, now):
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=1_000_000, now=now)
    services.set_policy(acme, ScopeType.AGENT, agent=invoice_bot, limit_nanos=500_000, now=now)
    services.set_policy(acme, ScopeType.USER, user_key="u-1", limit_nanos=100_000, now=now)
    engine.state_of(acme, invoice_bot, "u-1", now=now)  # opens the periods

    with CaptureQueriesContext(connection) as read:
        scope = engine.state_of(acme, invoice_bot, "u-1", now=now)
    with CaptureQueriesContext(connection) as held:
        hold = engine.authorize(
            scope,
            request_id="r-1",
            model="mistral-small-latest",
            prices=PRICES,
            input_tokens=10,
            max_output_tokens=50,
        )
    with CaptureQueriesContext(connection) as charged:
        engine.capture(hold, prompt_tokens=10, completion_tokens=40)

    assert len(scope.periods) == 3
    assert len(statements(read)) == 1
    if connection.vendor == "postgresql":
        # One statement each (data-modifying CTEs), so in autocommit one round trip.
        assert len(statements(held)) == 1
        assert len(statements(charged)) == 1
    else:
        assert len(statements(held)) == 3  # take the periods, the hold, its lines
        assert len(statements(charged)) == 5  # claim (2), ledger row, periods (2)


def test_a_capture_that_crosses_thresholds_records_each_once(acme, now):
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=100_000, now=now)
    scope = engine.state_of(acme, now=now)
    hold = engine.authorize(
        scope,
        request_id="r-1",
        model="mistral-small-latest",
        prices=PRICES,
        input_tokens=0,
        max_output_tokens=90,
    )
    engine.capture(hold, prompt_tokens=0, completion_tokens=90)  # 90% of the limit

    (period,) = engine.state_of(acme, now=now).periods
    assert period.state == "degraded"
    kinds = set(BudgetEvent.objects.filter(period=period).values_list("kind", flat=True))
    assert kinds == {EventKind.WARNED, EventKind.DEGRADED}


def test_a_capture_retried_after_its_events_failed_still_records_them(acme, now, monkeypatch):
    """On PostgreSQL the capture commits in one statement before its events are written.
    If writing them fails, the caller retries the capture, which finds the hold captured
    and records the crossings its periods show. (On SQLite the failure rolls the whole
    capture back and the retry does it again.)"""
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=100_000, now=now)
    hold = engine.authorize(
        engine.state_of(acme, now=now),
        request_id="r-1",
        model="mistral-small-latest",
        prices=PRICES,
        input_tokens=0,
        max_output_tokens=90,
    )
    record_transitions = engine.record_transitions

    def connection_lost(changes):
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(engine, "record_transitions", connection_lost)
    with pytest.raises(OperationalError):
        engine.capture(hold, prompt_tokens=0, completion_tokens=90)
    monkeypatch.setattr(engine, "record_transitions", record_transitions)
    entry = engine.capture(hold, prompt_tokens=0, completion_tokens=90)

    assert SpendEntry.objects.get() == entry
    (period,) = engine.state_of(acme, now=now).periods
    assert (period.state, period.spent_nanos) == ("degraded", entry.cost_nanos)
    kinds = set(BudgetEvent.objects.filter(period=period).values_list("kind", flat=True))
    assert kinds == {EventKind.WARNED, EventKind.DEGRADED}


def test_on_postgresql_the_hot_statements_are_prepared_once_per_connection(
    require_postgres, acme, invoice_bot, now
):
    """Django connects with prepared statements off; the engine's three statements
    must still be prepared (parsed and planned once), and nothing else of the ORM's."""
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=10_000_000, now=now)
    for n in range(3):
        scope = engine.state_of(acme, invoice_bot, now=now)
        hold = engine.authorize(
            scope,
            request_id=f"r-{n}",
            model="mistral-small-latest",
            prices=PRICES,
            input_tokens=10,
            max_output_tokens=50,
        )
        engine.capture(hold, prompt_tokens=10, completion_tokens=40)

    with connection.cursor() as cursor:
        cursor.execute("SELECT statement, generic_plans + custom_plans FROM pg_prepared_statements")
        prepared = cursor.fetchall()
    assert len(prepared) == 3
    assert all(uses == 3 for _, uses in prepared)
    texts = " ".join(text for text, _ in prepared)
    assert "FOR UPDATE" in texts and "INSERT INTO" in texts
