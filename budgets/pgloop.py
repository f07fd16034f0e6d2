"""PostgreSQL statements sent from the event loop itself, without a thread.

The gateway's common call is two statements: one places its hold (sql.read_and_hold_sql)
and one captures it after the reply (sql.capture_sql). On a database thread each cost a
hop each way and a contest for the interpreter lock with the event loop at every step
of psycopg's cursor (bench/RESULTS.md). Here they go out on connections of the loop's
own: the loop sends the statement, goes on with other work (the SDK builds the upstream
request meanwhile), and reads the rows when the socket says they are there.

Only single statements in autocommit, each its own transaction: nothing here ever holds
a transaction open across an await. The ORM never runs here (Django refuses it on an
event loop); the connections are Django's (its adapters, time zone and error classes),
opened in a thread and used only by this module.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import select
import threading
import time
from collections.abc import Callable
from typing import Any

from django.db import DEFAULT_DB_ALIAS, DatabaseError, OperationalError, connections
from django.db.backends.base.base import BaseDatabaseWrapper
from psycopg import errors, pq
from psycopg._queries import PostgresQuery
from psycopg.adapt import Transformer

from . import sql

log = logging.getLogger("governance.gateway")

# For a statement abandoned on the loop (shutdown) to answer in a thread, then as long
# again for its cancellation: within `manage.py serve`'s margin before it kills.
FINISH_SECONDS = 2


class OutcomeUnknown(DatabaseError):
    """A statement was sent, and neither its rows nor its failure came back in time."""


class LoopConnection:
    """One connection, one statement at a time, driven by the event loop's reader.
    psycopg's errors come out as Django's (django.db.IntegrityError and so on)."""

    def __init__(self, wrapper: BaseDatabaseWrapper) -> None:
        self.wrapper = wrapper  # Django's: its ops convert rows into model fields
        self._connection = wrapper.connection
        self._cursor = sql.PreparedCursor(self._connection)  # int8 for every int
        self._pgconn = self._connection.pgconn
        self._pgconn.nonblocking = 1
        self.fd = self._pgconn.socket
        self._prepared: dict[tuple[bytes, tuple[int, ...]], bytes] = {}
        self.opened = time.monotonic()
        # One statement at a time: one adaptation context, whose dumpers and loaders
        # stay cached from one statement to the next (as a psycopg cursor's do).
        self._transformer = Transformer(self._cursor)
        self.in_flight: Transformer | None = None  # a statement sent, its rows not read
        self._received: list[pq.abc.PGresult] = []

    @property
    def usable(self) -> bool:
        return (
            self.in_flight is None
            and self._pgconn.status == pq.ConnStatus.OK
            and self._pgconn.transaction_status == pq.TransactionStatus.IDLE
        )

    async def execute(
        self, query: str, params: dict[str, Any], sent: Callable[[], None] | None = None
    ) -> list[tuple]:
        """The rows of `query` (named parameters), prepared on this connection on first
        use. `sent` is called once the statement is on its way. Cancelled once it was
        sent, the statement stays `in_flight`: its answer is still to come (finish)."""
        with self.wrapper.wrap_database_errors:
            transformer = self._transformer
            converted = PostgresQuery(transformer)
            converted.convert(query, params)
            signature = (converted.query, tuple(converted.types or ()))
            name = self._prepared.get(signature)
            if name is None:
                name = f"sg_loop_{len(self._prepared)}".encode()
                self._pgconn.send_prepare(name, converted.query, converted.types)
                self._raise_for(await self._answer())
                self._prepared[signature] = name
            self._pgconn.send_query_prepared(name, converted.params, converted.formats)
            self.in_flight = transformer
            if sent is not None:
                sent()
            try:
                results = await self._answer()
            except asyncio.CancelledError:
                raise
            except BaseException:
                self.in_flight = None
                raise
            self.in_flight = None
            return self._rows(transformer, results)

    def _rows(self, transformer: Transformer, results: list[pq.abc.PGresult]) -> list[tuple]:
        result = self._raise_for(results)
        transformer.set_pgresult(result)
        return transformer.load_rows(0, result.ntuples, tuple)

    def _raise_for(self, results: list[pq.abc.PGresult]) -> pq.abc.PGresult:
        """The statement's result, or its error (psycopg's: the caller translates it)."""
        for result in results:
            if result.status == pq.ExecStatus.FATAL_ERROR:
                raise errors.error_from_result(result, encoding=self._connection.info.encoding)
        if not results:
            raise errors.OperationalError("the database sent no result")
        return results[-1]

    async def _answer(self) -> list[pq.abc.PGresult]:
        """Every result of what was sent, once the server has sent them all."""
        loop = asyncio.get_running_loop()
        pgconn, fd = self._pgconn, self.fd
        results = self._received = []  # this statement's, also for finish()
        while pgconn.flush():  # the socket's buffer is full: wait until it takes more
            writable = loop.create_future()
            loop.add_writer(fd, _set_once, writable)
            try:
                await writable
            finally:
                loop.remove_writer(fd)
        done: asyncio.Future[list[pq.abc.PGresult]] = loop.create_future()

        def readable() -> bool:
            """Read what came; once the answer is whole (or the connection broke), stop
            watching the socket (still ours: libpq closes it only inside this call)."""
            try:
                pgconn.consume_input()
                while not pgconn.is_busy():
                    result = pgconn.get_result()
                    if result is None:
                        if not done.done():
                            done.set_result(results)
                        return True
                    results.append(result)
            except Exception as exc:  # the connection broke
                if not done.done():
                    done.set_exception(exc)
                return True
            return False

        def on_readable() -> None:
            if readable():
                loop.remove_reader(fd)

        if readable():  # flushing may have read the answer already
            return await done
        loop.add_reader(fd, on_readable)
        try:
            return await done
        finally:
            if done.cancelled():  # the socket is still ours and still watched
                loop.remove_reader(fd)

    def finish(self, seconds: float) -> list[tuple]:
        """Blocking, in a thread: the rows of the statement in flight, whose caller gave
        up waiting on the loop; then close the connection. After `seconds` the statement
        is cancelled, and its outcome (its rows if it had already committed, or its
        cancellation's error) waited for as long again. Only the statement's own error
        means it did not commit: a connection that breaks, or no answer at all, is
        OutcomeUnknown."""
        try:
            results = self._finish_results(seconds)
            with self.wrapper.wrap_database_errors:
                return self._rows(self.in_flight, results)
        finally:
            self.in_flight = None
            self.close()

    def _finish_results(self, seconds: float) -> list[pq.abc.PGresult]:
        pgconn, results = self._pgconn, self._received  # what the loop read already
        cancelled = False
        deadline = time.monotonic() + seconds
        try:
            poller = select.poll()
            poller.register(self.fd, select.POLLIN | select.POLLOUT)
            while pgconn.flush():
                poller.poll(max(0.0, deadline - time.monotonic()) * 1000)
            poller.modify(self.fd, select.POLLIN)
            while True:
                if not pgconn.is_busy():
                    result = pgconn.get_result()
                    if result is None:
                        return results
                    results.append(result)
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    if cancelled:
                        raise OutcomeUnknown(
                            f"the database answered neither the statement nor its "
                            f"cancellation within {2 * seconds} s"
                        )
                    with contextlib.suppress(Exception):  # then wait on regardless
                        self._connection.cancel_safe(timeout=seconds)
                    cancelled, deadline = True, time.monotonic() + seconds
                    continue
                if poller.poll(left * 1000):
                    pgconn.consume_input()
        except OutcomeUnknown:
            raise
        except Exception as exc:
            raise OutcomeUnknown(f"the connection failed before the answer: {exc}") from exc

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._connection.close()


def _set_once(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _connect(alias: str) -> BaseDatabaseWrapper:
    wrapper = connections.create_connection(alias)
    wrapper.ensure_connection()
    wrapper.set_autocommit(True)
    return wrapper


class _Opening:
    """A connection being opened in a thread for the loop. Its caller may give up
    (cancelled, or the loop ended): then it is closed, by whichever side is last."""

    def __init__(self, alias: str) -> None:
        self.alias = alias
        self._lock = threading.Lock()
        self._abandoned = False
        self._wrapper: BaseDatabaseWrapper | None = None

    def connect(self) -> BaseDatabaseWrapper:
        wrapper = _connect(self.alias)
        with self._lock:
            if self._abandoned:
                wrapper.connection.close()
            self._wrapper = wrapper
        return wrapper

    def abandon(self) -> None:
        with self._lock:
            self._abandoned = True
            if self._wrapper is not None:
                with contextlib.suppress(Exception):
                    self._wrapper.connection.close()


class LoopDatabase:
    """The event loop's connections: at most `size`, opened as calls need them (in a
    thread), each running one statement at a time (a call waits for a free one), and
    closed after `max_age` seconds, as Django's CONN_MAX_AGE."""

    def __init__(
        self, size: int, max_age: float | None = None, alias: str = DEFAULT_DB_ALIAS
    ) -> None:
        self.size = size
        self.max_age = max_age  # seconds a connection is kept (None: as long as it works)
        self.alias = alias
        # Never connected: its ops adapt parameters and convert rows (as the ORM would).
        self.db = connections.create_connection(alias)
        self._idle: list[LoopConnection] = []
        self._opened = 0
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False

    async def execute(
        self,
        query: str,
        params: dict[str, Any],
        sent: Callable[[], None] | None = None,
        abandoned: Callable[[Callable[[], list[tuple]]], None] | None = None,
    ) -> list[tuple]:
        """The rows of one autocommit statement. A connection whose statement failed
        is kept if it is still idle and sound; one that broke is closed.

        A statement whose caller is cancelled once it was sent may still commit. It is
        closed with its connection, unless `abandoned` is given: it is then called with
        a blocking function that returns the statement's rows (LoopConnection.finish,
        for a thread) and closes the connection after."""
        connection = await self._acquire()
        try:
            rows = await connection.execute(query, params, sent)
        except asyncio.CancelledError:
            if abandoned is not None and connection.in_flight is not None:
                self._hand_over(connection)
                try:
                    abandoned(functools.partial(connection.finish, FINISH_SECONDS))
                except Exception:
                    connection.close()
                    log.exception("a statement's answer could not be waited for")
            else:
                self._discard(connection)
            raise
        except BaseException:
            if connection.usable:  # the statement failed (a taken request id): no harm
                self._release(connection)
            else:
                self._discard(connection)
            raise
        self._release(connection)
        return rows

    async def read_and_hold(self, plain, sent: Callable[[], None] | None = None):
        """engine.place_plain_hold's statement for `plain` (an engine.PlainHold):
        (hold id or None, [(policy, period or None)], {period id: (spent, held, state)})
        as sql.read_and_hold_postgres returns them."""
        rows = await self.execute(sql.read_and_hold_sql(), plain.params(self.db), sent)
        return sql.read_and_hold_rows(rows, self.db)

    async def capture(self, hold, entry, now, abandoned=None):
        """engine.capture's one statement for a held hold (sql.capture_postgres):
        (entry id, [(period id, old state, new state, spent, limit)]), or None when the
        hold is no longer held. `abandoned`: as execute()'s, its function returning
        what this would have."""

        def handed_over(finish: Callable[[], list[tuple]]) -> None:
            abandoned(lambda: sql.capture_rows(finish()))

        rows = await self.execute(
            sql.capture_sql(type(entry)),
            sql.capture_params(hold, entry, now, self.db),
            abandoned=handed_over if abandoned is not None else None,
        )
        return sql.capture_rows(rows)

    async def _acquire(self) -> LoopConnection:
        while True:
            if self._closed:
                raise OperationalError("the event loop's database connections are closed")
            while self._idle:
                connection = self._idle.pop()
                if connection.usable and not self._too_old(connection):
                    return connection
                self._discard(connection)
            if self._opened < self.size:
                return await self._open()
            waiter = asyncio.get_running_loop().create_future()
            self._waiting.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # pass the turn on
                raise

    async def _open(self) -> LoopConnection:
        self._opened += 1
        opening = _Opening(self.alias)
        try:
            wrapper = await asyncio.get_running_loop().run_in_executor(None, opening.connect)
            if self._closed:
                wrapper.connection.close()
                raise OperationalError("the event loop's database connections are closed")
            return LoopConnection(wrapper)
        except BaseException:
            opening.abandon()
            self._opened -= 1
            self._wake()
            raise

    def _release(self, connection: LoopConnection) -> None:
        if self._closed or self._too_old(connection):
            self._discard(connection)
            return
        self._idle.append(connection)
        self._wake()

    def _too_old(self, connection: LoopConnection) -> bool:
        return self.max_age is not None and time.monotonic() - connection.opened >= self.max_age

    def _discard(self, connection: LoopConnection) -> None:
        self._hand_over(connection)
        connection.close()

    def _hand_over(self, connection: LoopConnection) -> None:
        """`connection` is no longer this database's (closed, or closing elsewhere).
        Nothing of it is watched by the loop any more (LoopConnection._answer)."""
        self._opened -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        """Close the idle connections; those running a statement close when it ends,
        and no statement starts after this."""
        self._closed = True
        while self._idle:
            self._idle.pop().close()
            self._opened -= 1
        for waiter in self._waiting:
            if not waiter.done():
                waiter.set_result(None)  # to find the database closed
