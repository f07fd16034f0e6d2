"""The common call's hold sent from the event loop (budgets.pgloop), PostgreSQL only.

The loop's connections are its own, so these tests commit their data
(transactional_db): a test transaction would hide it from them.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import psycopg
import pytest
from django.db import IntegrityError, OperationalError, ProgrammingError, connection

from budgets import engine, pgloop, services
from budgets.errors import InvalidRequest
from budgets.models import BudgetEvent, BudgetPeriod, Hold, HoldLine, HoldStatus, ScopeType
from budgets.money import nanos_to_usd, usd_to_nanos
from governance import metrics
from governance.asgi import application
from routing import gateway, views
from routing.views import wait_for_charges
from spend.models import SpendEntry
from tests.asgi_server import serving

pytestmark = pytest.mark.usefixtures("require_postgres", "transactional_db")

BODY = {
    "model": "mistral-large-latest",
    "messages": [{"role": "user", "content": "Summarise this invoice."}],
    "max_tokens": 200,
}


@pytest.fixture
def acme():
    tenant = services.create_tenant("Acme", "cus_acme")
    services.set_policy(tenant, ScopeType.TENANT, limit_nanos=usd_to_nanos("10"))
    return tenant


@pytest.fixture
def key(acme):
    agent = services.create_agent(acme, "invoice-bot")
    return services.authenticate_key(services.issue_key(agent)[1])


@pytest.fixture
def threads_plan(monkeypatch):
    """Every plan_call run in a database thread, by its keyword arguments."""
    calls = []
    real = gateway.plan_call

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(gateway, "plan_call", spy)
    return calls


def plan(key, request_id="req-1", body=BODY):
    async def main():
        views.use_loop_database()  # as the server does at start-up
        try:
            return await views._plan(key, body, request_id, "", None)
        finally:
            await views.close_loop_database()

    return asyncio.run(main())


def gone(pid: int, database_name: str, seconds: float = 5) -> bool:
    """Whether the server process `pid` has ended (a closed connection's backend exits
    a moment later)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT 1 FROM pg_stat_activity WHERE datname = %s AND pid = %s",
                [database_name, pid],
            )
            if cursor.fetchone() is None:
                return True
        time.sleep(0.05)
    return False


# --- The gateway's plan -----------------------------------------------------------


def test_a_plain_call_is_held_from_the_event_loop(key, threads_plan):
    gateway.plan_call(key, BODY, request_id="opens-the-period")
    threads_plan.clear()

    decision = plan(key)

    assert threads_plan == []  # no database thread decided it
    hold = Hold.objects.get(request_id="req-1")
    assert decision.hold.pk == hold.pk and hold.amount_nanos == decision.hold.amount_nanos
    (period,) = BudgetPeriod.objects.all()
    assert dict(HoldLine.objects.filter(hold=hold).values_list("period_id", "amount_nanos")) == {
        period.pk: hold.amount_nanos
    }
    assert period.held_nanos == 2 * hold.amount_nanos
    # The plan's scope is the one after the hold, as the thread's would be.
    assert [p.held_nanos for p in decision.scope.periods] == [period.held_nanos]
    assert decision.scope.remaining_nanos == usd_to_nanos("10") - 2 * hold.amount_nanos


def test_a_call_that_is_not_plain_goes_on_in_a_thread_from_the_budgets_read(
    acme, key, threads_plan, spend
):
    spend(acme, usd_to_nanos("8.5"))  # past the soft cap: downgraded

    decision = plan(key)

    assert (decision.model.id, decision.downgraded_from) == ("mistral-small", "mistral-large")
    (call,) = threads_plan
    assert call["read"] is not None and call["rows"]  # went on from what the loop read
    assert Hold.objects.get(request_id="req-1").model == "mistral-small"


def test_a_new_budget_is_created_by_the_thread(acme, key, threads_plan):
    """The period of the day does not exist yet: the statement holds nothing, and the
    general decision (ORM, in a thread) opens it and holds."""
    decision = plan(key)
    assert len(threads_plan) == 1
    (period,) = BudgetPeriod.objects.all()
    assert period.held_nanos == decision.hold.amount_nanos


def test_a_request_id_used_again_is_the_same_hold(key):
    first = gateway.plan_call(key, BODY, request_id="again")
    (period,) = BudgetPeriod.objects.all()
    assert plan(key, request_id="again").hold.pk == first.hold.pk
    assert BudgetPeriod.objects.get().held_nanos == period.held_nanos


def test_another_tenants_request_id_is_refused_and_changes_nothing(key):
    globex = services.create_tenant("Globex", "cus_globex")
    theirs = services.authenticate_key(
        services.issue_key(services.create_agent(globex, "globex-bot"))[1]
    )
    gateway.plan_call(theirs, BODY, request_id="shared-id")
    gateway.plan_call(key, BODY, request_id="opens-the-period")
    held = {p.pk: p.held_nanos for p in BudgetPeriod.objects.all()}
    with pytest.raises(InvalidRequest, match="already used"):
        plan(key, request_id="shared-id")
    assert Hold.objects.filter(request_id="shared-id").count() == 1
    assert {p.pk: p.held_nanos for p in BudgetPeriod.objects.all()} == held


def test_the_loop_can_be_turned_off(key, threads_plan, settings):
    settings.GATEWAY_LOOP_STATEMENTS = False
    gateway.plan_call(key, BODY, request_id="opens-the-period")
    threads_plan.clear()
    plan(key)
    assert len(threads_plan) == 1


# --- The loop's database ------------------------------------------------------------


def run(coroutine_function, size=2):
    async def main():
        database = pgloop.LoopDatabase(size)
        try:
            return await coroutine_function(database)
        finally:
            database.close()

    return asyncio.run(main())


def test_rows_come_back_typed_as_the_database_gives_them():
    async def main(database):
        return await database.execute(
            "SELECT %(n)s::bigint + 1, %(t)s::text, now() IS NOT NULL, NULL::int",
            {"n": 41, "t": "x"},
        )

    assert run(main) == [(42, "x", True, None)]


def test_a_statement_is_prepared_once_per_connection_and_parameter_types():
    query = "SELECT CAST(%(v)s AS bigint) IS NULL"

    async def main(database):
        results = [await database.execute(query, {"v": v}) for v in (1, 2, None, 3)]
        prepared = await database.execute(
            "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE %(q)s",
            {"q": "SELECT CAST($1 AS bigint) IS NULL"},
        )
        return results, prepared

    results, prepared = run(main, size=1)
    assert results == [[(False,)], [(False,)], [(True,)], [(False,)]]
    assert prepared == [(2,)]  # one for an int, one for a NULL


def test_a_failed_statement_raises_djangos_error_and_keeps_the_connection():
    async def main(database):
        await database.execute("CREATE TEMP TABLE once (id int PRIMARY KEY)", {})
        await database.execute("INSERT INTO once VALUES (%(id)s)", {"id": 1})
        with pytest.raises(IntegrityError, match="once_pkey"):
            await database.execute("INSERT INTO once VALUES (%(id)s)", {"id": 1})
        with pytest.raises(ProgrammingError):
            await database.execute("SELECT nothing FROM nowhere", {})
        # The same session (its temporary table) served every statement.
        return await database.execute("SELECT count(*) FROM once", {}), database._opened

    assert run(main, size=1) == ([(1,)], 1)


def terminate(pid: int) -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
    assert gone(pid, connection.settings_dict["NAME"])
    connection.close()  # this thread's


def test_a_broken_connection_is_replaced():
    async def main(database):
        ((first,),) = await database.execute("SELECT pg_backend_pid()", {})
        await asyncio.to_thread(terminate, first)
        with pytest.raises(OperationalError):
            await database.execute("SELECT pg_backend_pid()", {})
        ((second,),) = await database.execute("SELECT pg_backend_pid()", {})
        return first, second, database._opened

    first, second, opened = run(main, size=1)
    assert first != second and opened == 1


def test_a_statement_abandoned_by_its_caller_closes_its_connection():
    database_name = connection.settings_dict["NAME"]

    async def main(database):
        ((pid,),) = await database.execute("SELECT pg_backend_pid()", {})
        task = asyncio.create_task(database.execute("SELECT pg_sleep(0.3)", {}))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        opened = database._opened
        ((again,),) = await database.execute("SELECT pg_backend_pid()", {})
        return pid, again, opened

    pid, again, opened = run(main, size=1)
    assert opened == 0 and again != pid
    assert gone(pid, database_name)


def test_no_more_connections_than_its_size_and_the_rest_wait():
    async def main(database):
        statements = [
            database.execute("SELECT pg_backend_pid(), pg_sleep(0.05)", {}) for _ in range(6)
        ]
        rows = await asyncio.gather(*statements)
        return {pid for ((pid, _),) in rows}, database._opened

    pids, opened = run(main, size=2)
    assert len(pids) == 2 and opened == 2


def test_a_connection_is_opened_with_djangos_settings():
    """Time zone and adapters as Django's own connections: a timestamptz is aware UTC."""

    async def main(database):
        return await database.execute("SELECT TIMESTAMPTZ '2026-12-07 10:00+02'", {})

    ((moment,),) = run(main)
    assert moment.utcoffset().total_seconds() == 0 and moment.hour == 8


def test_the_server_closes_its_loop_connections_on_shutdown(simulator, acme_key, settings):
    settings.KEY_CACHE_SECONDS = 0
    simulator()
    headers = {"Authorization": f"Bearer {acme_key}"}
    with serving(application, lifespan="on") as url:
        for _ in range(2):  # the second call is plain: the period exists
            reply = httpx.post(f"{url}/v1/chat/completions", json=BODY, headers=headers)
            assert reply.status_code == 200
        wait_for_charges()
        (database,) = [d for d in views._loop_databases.values() if d is not None]
        pids = [idle._pgconn.backend_pid for idle in database._idle]
    assert pids and all(gone(pid, connection.settings_dict["NAME"]) for pid in pids)


# --- The charge of a plain call, from the loop ---------------------------------------


@contextmanager
def locked_row(table: str, pk: int):
    """Hold a row lock from another connection: a statement that updates the row waits."""
    settings_dict = connection.settings_dict
    with psycopg.connect(
        dbname=settings_dict["NAME"],
        user=settings_dict["USER"],
        host=settings_dict["HOST"],
        port=settings_dict["PORT"],
    ) as other:
        other.execute(f"SELECT 1 FROM {table} WHERE id = %s FOR UPDATE", [pk])  # noqa: S608
        yield
        other.rollback()


def waiting_on_a_lock(database_name: str) -> bool:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT 1 FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'",
            [database_name],
        )
        return cursor.fetchone() is not None


@pytest.fixture
def plain_plan(key):
    gateway.plan_call(key, BODY, request_id="opens-the-period")
    return gateway.plan_call(key, BODY, request_id="gw-loop")


def charge(plan, *, cancel_when=None, tokens=(12, 7)):
    """Run the charge of `plan` on a new event loop; with `cancel_when` (a function), cancel
    it once that is true (as the server's loop does to a charge still running at its end)."""

    async def main():
        views.use_loop_database()
        task = views._settling_task(
            views._charge(plan, tokens, estimated=False, latency_ms=5), plan.request_id
        )
        try:
            if cancel_when is None:
                await task
                return
            while not await asyncio.to_thread(cancel_when):
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            await views.close_loop_database()

    asyncio.run(main())


def test_a_plain_call_is_charged_from_the_event_loop(plain_plan, monkeypatch):
    in_threads = []
    monkeypatch.setattr(gateway, "capture", lambda *args, **kwargs: in_threads.append(args))
    charge(plain_plan)
    entry = SpendEntry.objects.get(request_id="gw-loop")
    assert in_threads == []
    assert (entry.prompt_tokens, entry.completion_tokens, entry.over_hold) == (12, 7, False)
    assert Hold.objects.get(request_id="gw-loop").status == HoldStatus.CAPTURED
    period = BudgetPeriod.objects.get()
    assert period.spent_nanos == entry.cost_nanos
    assert period.held_nanos == Hold.objects.get(request_id="opens-the-period").amount_nanos


def test_a_charge_that_crosses_a_threshold_records_its_event(acme, plain_plan):
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("0.001"))
    charge(plain_plan, tokens=(1000, 1000))  # over every threshold of 0.001 USD
    kinds = set(BudgetEvent.objects.values_list("kind", flat=True))
    assert {"warned", "degraded", "stopped"} <= kinds


def test_a_hold_voided_meanwhile_is_left_to_the_general_way(plain_plan, caplog):
    engine.void(plain_plan.hold.request_id)
    caplog.set_level(logging.ERROR, logger="governance.gateway")
    charge(plain_plan)
    assert not SpendEntry.objects.exists()
    assert "was voided" in caplog.text and "not charged" in caplog.text


def test_a_database_error_in_the_loops_capture_is_retried(plain_plan, monkeypatch, caplog):
    monkeypatch.setattr(views, "CHARGE_RETRY_SECONDS", 0.001)
    real_capture, attempts = pgloop.LoopDatabase.capture, []

    async def flaky_capture(self, *args, **kwargs):
        attempts.append(1)
        if len(attempts) == 1:
            raise OperationalError("server closed the connection unexpectedly")
        return await real_capture(self, *args, **kwargs)

    monkeypatch.setattr(pgloop.LoopDatabase, "capture", flaky_capture)
    caplog.set_level(logging.WARNING, logger="governance.gateway")
    charge(plain_plan)
    assert len(attempts) == 2 and SpendEntry.objects.count() == 1
    assert "attempt 1 of 3" in caplog.text


def test_a_capture_sent_when_shutdown_cuts_it_off_finishes_in_a_thread(plain_plan, caplog):
    """The statement is in the database (waiting on a row lock) when the loop gives up
    on it: a thread waits for its answer, and the call is logged as charged."""
    database_name = connection.settings_dict["NAME"]
    before = metrics.UNCHARGED.labels(plain_plan.model.id)._value.get()
    caplog.set_level(logging.INFO, logger="governance.gateway")
    with locked_row("budgets_hold", plain_plan.hold.pk):
        charge(plain_plan, cancel_when=lambda: waiting_on_a_lock(database_name))
        assert not SpendEntry.objects.exists()
    wait_for(lambda: any(getattr(r, "decision", None) for r in caplog.records))

    entry = SpendEntry.objects.get(request_id="gw-loop")
    assert (entry.prompt_tokens, entry.completion_tokens) == (12, 7)
    assert not [r for r in caplog.records if "not charged" in r.getMessage()]
    (served,) = [r for r in caplog.records if getattr(r, "decision", None) == "allowed"]
    assert served.cost_usd == nanos_to_usd(entry.cost_nanos)
    assert metrics.UNCHARGED.labels(plain_plan.model.id)._value.get() == before


def test_a_capture_cut_off_before_it_was_sent_says_so(plain_plan, monkeypatch, caplog):
    """Waiting for a free connection when shutdown cuts it off: not charged, logged."""
    monkeypatch.setattr(views, "_db_thread_count", 1)
    waiting = threading.Event()
    real_acquire = pgloop.LoopDatabase._acquire

    async def never_free(self):
        waiting.set()
        await asyncio.sleep(60)
        return await real_acquire(self)

    monkeypatch.setattr(pgloop.LoopDatabase, "_acquire", never_free)
    caplog.set_level(logging.ERROR, logger="governance.gateway")
    charge(plain_plan, cancel_when=waiting.is_set)
    assert "not charged (cut off by shutdown)" in caplog.text
    assert not SpendEntry.objects.exists()
    assert Hold.objects.get(request_id="gw-loop").status == HoldStatus.HELD


def test_the_reply_does_not_wait_for_the_loops_capture(simulator, gateway_url, acme, acme_key):
    simulator(latency_ms=300)
    services.set_policy(acme, ScopeType.TENANT, limit_nanos=usd_to_nanos("10"))
    headers = {"Authorization": f"Bearer {acme_key}"}
    url = f"{gateway_url}/v1/chat/completions"
    assert httpx.post(url, json=BODY, headers=headers).status_code == 200  # opens the period
    wait_for_charges()

    with ThreadPoolExecutor(1) as agent:
        reply = agent.submit(httpx.post, url, json=BODY, headers=headers, timeout=10)
        wait_for(lambda: Hold.objects.filter(status=HoldStatus.HELD).exists())
        hold = Hold.objects.get(status=HoldStatus.HELD)
        with locked_row("budgets_hold", hold.pk):  # the capture will wait on it
            assert reply.result().status_code == 200
            assert not SpendEntry.objects.filter(request_id=hold.request_id).exists()
            assert Hold.objects.get(pk=hold.pk).status == HoldStatus.HELD
    wait_for_charges()
    assert SpendEntry.objects.get(request_id=hold.request_id).hold_id == hold.pk


def wait_for(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_connection_is_kept_for_its_max_age_only():
    async def main():
        database = pgloop.LoopDatabase(1, max_age=0.2)
        try:
            pids = [await database.execute("SELECT pg_backend_pid()", {}) for _ in range(2)]
            await asyncio.sleep(0.3)
            pids.append(await database.execute("SELECT pg_backend_pid()", {}))
            return pids
        finally:
            database.close()

    first, kept, aged = asyncio.run(main())
    assert first == kept != aged


def test_with_no_max_age_a_statement_has_a_connection_of_its_own():
    """DB_CONN_MAX_AGE=0 (a connection per call, as for the threads)."""

    async def main():
        database = pgloop.LoopDatabase(1, max_age=0)
        try:
            return [await database.execute("SELECT pg_backend_pid()", {}) for _ in range(2)]
        finally:
            database.close()

    first, second = asyncio.run(main())
    assert first != second


def test_a_capture_with_no_answer_in_time_is_cancelled_and_says_not_charged(
    plain_plan, monkeypatch, caplog
):
    """The thread finishing a cut-off capture gives up after FINISH_SECONDS: it cancels
    the statement, so "not charged" in the log is what the ledger shows."""
    monkeypatch.setattr(pgloop, "FINISH_SECONDS", 0.3)
    database_name = connection.settings_dict["NAME"]
    caplog.set_level(logging.ERROR, logger="governance.gateway")
    with locked_row("budgets_hold", plain_plan.hold.pk):
        charge(plain_plan, cancel_when=lambda: waiting_on_a_lock(database_name))
        wait_for(lambda: "not charged" in caplog.text)
    time.sleep(0.3)  # the lock is gone: a statement still running would commit now
    assert not SpendEntry.objects.exists()
    assert Hold.objects.get(request_id="gw-loop").status == HoldStatus.HELD
    assert "canceling statement" in caplog.text


def test_a_capture_finishes_in_a_thread_whatever_its_descriptor(plain_plan, caplog):
    """poll(), not select(): a process with many sockets has descriptors past 1024."""
    fillers = [socket.socket() for _ in range(1100)]
    try:
        database_name = connection.settings_dict["NAME"]
        caplog.set_level(logging.INFO, logger="governance.gateway")
        with locked_row("budgets_hold", plain_plan.hold.pk):
            charge(plain_plan, cancel_when=lambda: waiting_on_a_lock(database_name))
        wait_for(lambda: any(getattr(r, "decision", None) for r in caplog.records))
    finally:
        for filler in fillers:
            filler.close()
    assert SpendEntry.objects.filter(request_id="gw-loop").exists()
    assert "not charged" not in caplog.text


def test_a_call_charged_before_a_later_failure_is_never_called_not_charged(
    plain_plan, monkeypatch, caplog
):
    """The capture committed, writing its threshold events failed, and shutdown came
    during the retry's wait: the log says charged."""
    monkeypatch.setattr(views, "CHARGE_RETRY_SECONDS", 60)
    monkeypatch.setattr(engine, "has_transitions", lambda changes: True)
    failed = threading.Event()

    def connection_lost(changes):
        failed.set()
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(engine, "record_transitions", connection_lost)
    before = metrics.UNCHARGED.labels(plain_plan.model.id)._value.get()
    caplog.set_level(logging.INFO, logger="governance.gateway")
    charge(plain_plan, cancel_when=failed.is_set)
    assert SpendEntry.objects.filter(request_id="gw-loop").exists()
    assert "not charged" not in caplog.text
    assert [r for r in caplog.records if getattr(r, "decision", None) == "allowed"]
    assert metrics.UNCHARGED.labels(plain_plan.model.id)._value.get() == before


def test_closing_the_database_closes_a_connection_once_its_statement_ends():
    async def main():
        database = pgloop.LoopDatabase(2)
        running = asyncio.create_task(
            database.execute("SELECT pg_backend_pid(), pg_sleep(0.2)", {})
        )
        await asyncio.sleep(0.05)
        database.close()
        ((pid, _),) = await running
        with pytest.raises(OperationalError, match="closed"):
            await database.execute("SELECT 1", {})
        return pid, database._idle, database._opened

    pid, idle, opened = asyncio.run(main())
    assert (idle, opened) == ([], 0)
    assert gone(pid, connection.settings_dict["NAME"])


def test_after_shutdown_closed_its_database_a_loop_goes_back_to_the_threads():
    async def main():
        views.use_loop_database()
        opened = views._loop_database()
        await views.close_loop_database()
        return opened, views._loop_database()

    opened, after = asyncio.run(main())
    assert opened is not None and after is None


def test_only_a_server_loop_that_asked_for_it_has_a_database():
    """A loop made for one call (async_to_sync, Django's test client) would leave its
    connections behind: the thread path serves it."""

    async def main():
        return views._loop_database()

    assert asyncio.run(main()) is None


def test_a_parameter_psycopg_cannot_send_is_djangos_error():
    async def main(database):
        with pytest.raises(ProgrammingError):
            await database.execute("SELECT %(v)s", {"v": object()})
        return database._opened

    assert run(main, size=1) in (0, 1)


def uncharged(plan):
    return metrics.UNCHARGED.labels(plan.model.id)._value.get()


def failing_events(monkeypatch):
    def connection_lost(changes):
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(engine, "record_transitions", connection_lost)


def test_a_thread_capture_that_committed_before_its_events_failed_is_called_charged(
    plain_plan, monkeypatch, caplog
):
    """The threads' capture (no loop database) commits, and writing its threshold events
    fails on every attempt: the call is charged, and the log says what is missing."""
    monkeypatch.setattr(views, "CHARGE_RETRY_SECONDS", 0.001)
    monkeypatch.setattr(engine, "has_transitions", lambda changes: True)
    failing_events(monkeypatch)
    before = uncharged(plain_plan)
    caplog.set_level(logging.INFO, logger="governance.gateway")

    async def main():  # no use_loop_database(): the threads' path
        await views._charge(plain_plan, (12, 7), estimated=False, latency_ms=5)

    asyncio.run(main())
    assert SpendEntry.objects.filter(request_id="gw-loop").exists()
    assert "not charged" not in caplog.text
    assert "threshold events may be missing" in caplog.text
    assert uncharged(plain_plan) == before


def test_a_cut_off_capture_that_committed_before_its_events_failed_is_called_charged(
    plain_plan, monkeypatch, caplog
):
    database_name = connection.settings_dict["NAME"]
    failing_events(monkeypatch)
    before = uncharged(plain_plan)
    caplog.set_level(logging.INFO, logger="governance.gateway")
    with locked_row("budgets_hold", plain_plan.hold.pk):
        charge(plain_plan, cancel_when=lambda: waiting_on_a_lock(database_name))
    wait_for(lambda: "threshold events may be missing" in caplog.text)
    assert SpendEntry.objects.filter(request_id="gw-loop").exists()
    assert "not charged" not in caplog.text
    assert uncharged(plain_plan) == before


def test_a_cut_off_capture_whose_cancellation_fails_is_of_unknown_outcome(
    plain_plan, monkeypatch, caplog
):
    """Neither an answer nor a cancellation: the log says to check the ledger (the
    statement may still commit, and here it does once the lock goes)."""
    monkeypatch.setattr(pgloop, "FINISH_SECONDS", 0.3)

    def cannot_cancel(self, timeout=None):
        raise psycopg.OperationalError("could not connect to server for the cancel request")

    monkeypatch.setattr(psycopg.Connection, "cancel_safe", cannot_cancel)
    database_name = connection.settings_dict["NAME"]
    caplog.set_level(logging.INFO, logger="governance.gateway")
    with locked_row("budgets_hold", plain_plan.hold.pk):
        charge(plain_plan, cancel_when=lambda: waiting_on_a_lock(database_name))
        wait_for(lambda: "got no answer" in caplog.text)
    assert "check the ledger for gw-loop" in caplog.text
    assert "not charged" not in caplog.text


def _broken_while_its_socket_number_is_reused(loop_factory, by_a_transport):
    """A connection breaks while its statement waits; libpq closes its socket, and the
    same descriptor number goes to another socket of the loop before the statement's
    task resumes. Returns what the statement raised and whether the other socket is
    still watched."""
    kept, seen = [], {}

    async def main():
        database = pgloop.LoopDatabase(1)
        try:
            ((pid,),) = await database.execute("SELECT pg_backend_pid()", {})
            connection_ = database._idle[0]
            loop = asyncio.get_running_loop()
            real = connection_._pgconn

            class Reusing:
                def __getattr__(self, name):
                    return getattr(real, name)

                def consume_input(self):
                    try:
                        return real.consume_input()
                    except Exception:
                        for _ in range(64):
                            other = socket.socket()
                            kept.append(other)
                            if other.fileno() == connection_.fd:
                                break
                        seen["reused"] = other.fileno() == connection_.fd
                        if by_a_transport:
                            kept.append(
                                loop.create_task(
                                    loop.connect_accepted_socket(asyncio.Protocol, other)
                                )
                            )
                        else:
                            loop.call_soon(loop.add_reader, other.fileno(), lambda: None)
                            seen["other"] = other
                        raise

            connection_._pgconn = Reusing()
            statement = asyncio.create_task(database.execute("SELECT pg_sleep(5)", {}))
            await asyncio.sleep(0.3)
            await asyncio.to_thread(terminate, pid)
            try:
                await statement
            except BaseException as exc:  # what it raised is the point
                seen["raised"] = exc
            if "other" in seen:
                watched = loop._selector.get_map().get(seen["other"].fileno())
                seen["other_watched"] = watched is not None
        finally:
            database.close()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())
    for other in kept:
        if isinstance(other, socket.socket):
            other.close()
    return seen


def test_a_broken_connection_is_djangos_error_under_uvloop_whoever_took_its_number():
    import uvloop

    seen = _broken_while_its_socket_number_is_reused(uvloop.new_event_loop, True)
    assert seen["reused"] and isinstance(seen["raised"], OperationalError)


def test_a_broken_connection_leaves_the_socket_that_took_its_number_watched():
    seen = _broken_while_its_socket_number_is_reused(asyncio.new_event_loop, False)
    assert seen["reused"] and isinstance(seen["raised"], OperationalError)
    assert seen["other_watched"]
