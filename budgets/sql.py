"""The engine's hot statements, in SQL.

Every gateway call reads its budgets, places a hold and captures it. Through the ORM
that was 15 statements, and compiling them cost more than the database did
(bench/RESULTS.md). Here each statement is written once per database and run with
parameters; rows come back as model instances through the fields' own converters, as
the ORM would build them. Only table and column names from the models are formatted
into SQL; every value is a parameter.

PostgreSQL locks periods in id order (`SELECT ... ORDER BY id FOR UPDATE` inside the
statement that updates them), the order every writer uses, so two calls never wait on
each other in a circle. SQLite takes the database's write lock at BEGIN
(transaction_mode IMMEDIATE), so there a statement needs no row locks.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext
from datetime import datetime

import psycopg
from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.db.models import Model
from psycopg.types.numeric import Int8Dumper

from .models import BudgetPeriod, BudgetPolicy, Hold, HoldLine, HoldStatus, PeriodState, ScopeType


def _db():
    """This thread's connection (the `connection` proxy looks it up on every attribute)."""
    return connections[DEFAULT_DB_ALIAS]


@functools.cache
def _table(model: type[Model], vendor: str) -> str:
    return _db().ops.quote_name(model._meta.db_table)


@functools.cache
def _columns(model: type[Model], alias: str, vendor: str) -> str:
    """The select list of every concrete field of `model`, in field order."""
    qn = _db().ops.quote_name
    return ", ".join(f"{alias}.{qn(f.column)}" for f in model._meta.concrete_fields)


_converters: dict[tuple[type[Model], object], list] = {}


def _field_converters(model: type[Model], db) -> list:
    """Per field: the backend's and the field's converters, and the column they take."""
    found = _converters.get((model, db.ops))
    if found is None:
        found = []
        for field in model._meta.concrete_fields:
            col = field.get_col(model._meta.db_table)
            found.append((db.ops.get_db_converters(col) + field.get_db_converters(db), col))
        _converters[(model, db.ops)] = found  # the same list from any thread: no lock
    return found


def _instance(model: type[Model], values, db) -> Model:
    """A model instance from one row of `_columns(model, ...)`, converted as the ORM does."""
    converted = []
    for value, (converters, col) in zip(values, _field_converters(model, db), strict=True):
        for converter in converters:
            value = converter(value, col, db)
        converted.append(value)
    return model.from_db(db.alias, None, converted)


@functools.cache
def _insert_sql(model: type[Model], vendor: str) -> str:
    qn = _db().ops.quote_name
    fields = [f for f in model._meta.concrete_fields if not f.primary_key]
    return (
        f"INSERT INTO {_table(model, vendor)} ({', '.join(qn(f.column) for f in fields)}) "  # noqa: S608
        f"VALUES ({', '.join(['%s'] * len(fields))}) RETURNING {qn(model._meta.pk.column)}"
    )


def _insert_values(obj: Model, db) -> list:
    """The values to INSERT for every field but the primary key, in field order, as the
    ORM would save them (auto_now_add and defaults applied)."""
    fields = [f for f in obj._meta.concrete_fields if not f.primary_key]
    return [f.get_db_prep_save(f.pre_save(obj, True), db) for f in fields]


def insert(obj: Model) -> Model:
    """INSERT one instance (auto_now_add and defaults applied) and set its primary key."""
    db = _db()
    with db.cursor() as cursor:
        cursor.execute(_insert_sql(type(obj), db.vendor), _insert_values(obj, db))
        obj.pk = cursor.fetchone()[0]
    obj._state.adding, obj._state.db = False, db.alias
    return obj


def _in(count: int) -> str:
    return ", ".join(["%s"] * count)


# --- Reading the budgets of a call --------------------------------------------------


def _policies_and_periods(vendor: str, now: str) -> str:
    """Policies `p`, each LEFT JOINed to its period `x` open at `now` (a placeholder)."""
    period, policy = _table(BudgetPeriod, vendor), _table(BudgetPolicy, vendor)
    return (
        f"{policy} p LEFT JOIN {period} x ON x.policy_id = p.id AND x.closed_at IS NULL "
        f"AND x.window_start <= {now} AND x.window_end > {now}"
    )


def _matching(tenant: str, agent: str, user: str) -> str:
    """The condition on policies `p` that govern a call by this tenant, agent and end
    user (placeholders); scope types are the model's own constants."""
    return (
        f"p.tenant_id = {tenant} AND (p.scope_type = '{ScopeType.TENANT}' "
        f"OR (p.scope_type = '{ScopeType.AGENT}' AND p.agent_id = {agent}) "
        f"OR (p.scope_type = '{ScopeType.USER}' AND p.user_key = {user}))"
    )


@functools.cache
def _scope_sql(vendor: str) -> str:
    return (
        f"SELECT {_columns(BudgetPolicy, 'p', vendor)}, {_columns(BudgetPeriod, 'x', vendor)} "  # noqa: S608
        f"FROM {_policies_and_periods(vendor, '%s')} WHERE {_matching('%s', '%s', '%s')} "
        "ORDER BY p.id, x.window_start"
    )


def _scope_rows(rows, db, offset: int = 0) -> list[tuple[BudgetPolicy, BudgetPeriod | None]]:
    """(policy, its open period or None) from rows of policy then period columns,
    starting at `offset`. A row without a policy (no match) is skipped."""
    width = len(BudgetPolicy._meta.concrete_fields)
    period_at = offset + width
    return [
        (
            _instance(BudgetPolicy, row[offset:period_at], db),
            # A miss of the LEFT JOIN has a NULL period id; a period always has one.
            _instance(BudgetPeriod, row[period_at:], db) if row[period_at] is not None else None,
        )
        for row in rows
        if row[offset] is not None
    ]


def policies_with_open_periods(
    tenant_id: int, agent_id: int | None, user_key: str, now: datetime
) -> list[tuple[BudgetPolicy, BudgetPeriod | None]]:
    """Every policy of the tenant that matches this agent and end user, each with its
    period open at `now` (None when it has none yet): one statement."""
    db = _db()
    moment = db.ops.adapt_datetimefield_value(now)
    # No end user matches no user policy.
    params = [moment, moment, tenant_id, agent_id, user_key or None]
    with _cursor(db) as cursor:
        cursor.execute(_scope_sql(db.vendor), params)
        return _scope_rows(cursor.fetchall(), db)


# --- Holds --------------------------------------------------------------------------


@functools.cache
def _take_sql(vendor: str, count: int) -> str:
    period = _table(BudgetPeriod, vendor)
    if vendor == "postgresql":
        return (
            f"WITH locked AS (SELECT id FROM {period} WHERE id IN ({_in(count)}) "  # noqa: S608
            f"ORDER BY id FOR UPDATE) UPDATE {period} p SET held_nanos = p.held_nanos + %s "
            "FROM locked WHERE p.id = locked.id AND p.closed_at IS NULL "
            "AND p.spent_nanos + p.held_nanos <= p.hard_nanos - %s "
            "RETURNING p.id, p.spent_nanos, p.held_nanos"
        )
    return (
        f"UPDATE {period} SET held_nanos = held_nanos + %s "  # noqa: S608
        f"WHERE id IN ({_in(count)}) AND closed_at IS NULL "
        "AND spent_nanos + held_nanos <= hard_nanos - %s "
        "RETURNING id, spent_nanos, held_nanos"
    )


def take(period_ids: list[int], amount: int) -> dict[int, tuple[int, int]]:
    """Add `amount` to held on each open period that can still pay for it (spent + held
    + amount <= hard). Returns {period id: (spent, held)} of the periods it updated; the
    caller rolls back unless that is all of them."""
    db = _db()
    if db.vendor == "postgresql":
        params = [*period_ids, amount, amount]
    else:
        params = [amount, *period_ids, amount]
    with db.cursor() as cursor:
        cursor.execute(_take_sql(db.vendor, len(period_ids)), params)
        return {pk: (spent, held) for pk, spent, held in cursor.fetchall()}


def insert_lines(hold_id: int, period_ids: list[int], amount: int) -> None:
    db = _db()
    values = ", ".join(["(%s, %s, %s)"] * len(period_ids))
    with db.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {_table(HoldLine, db.vendor)} (hold_id, period_id, amount_nanos) "  # noqa: S608
            f"VALUES {values}",
            [value for pk in period_ids for value in (hold_id, pk, amount)],
        )


@functools.cache
def _claim_sql(vendor: str) -> tuple[str, str]:
    hold = _table(Hold, vendor)
    lock = " FOR UPDATE" if vendor == "postgresql" else ""
    select = (
        f"SELECT {_columns(Hold, 'h', vendor)} FROM {hold} h WHERE h.request_id = %s "  # noqa: S608
        f"AND h.status IN (%s, %s){lock}"
    )
    update = f"UPDATE {hold} SET status = %s, finished_at = %s WHERE id = %s"  # noqa: S608
    return select, update


def claim_hold(request_id: str, now: datetime) -> Hold | None:
    """Lock the hold of `request_id` if it is held or expired, and mark it captured.
    Returns it as it was (its status tells whether its amount is still held), or None
    when there is no hold to capture (none, captured or voided)."""
    db = _db()
    select, update = _claim_sql(db.vendor)
    with db.cursor() as cursor:
        cursor.execute(select, [request_id, HoldStatus.HELD, HoldStatus.EXPIRED])
        row = cursor.fetchone()
        if row is None:
            return None
        found = _instance(Hold, row, db)
        moment = db.ops.adapt_datetimefield_value(now)
        cursor.execute(update, [HoldStatus.CAPTURED, moment, found.pk])
    return found


def _state_case(spent: str, alias: str = "") -> str:
    """SQL for the state of a period at `spent` (engine.state_for in SQL); the states
    are the model's own constants."""
    return (
        f"CASE WHEN {spent} >= {alias}hard_nanos THEN '{PeriodState.STOPPED}' "
        f"WHEN {spent} >= {alias}soft_nanos THEN '{PeriodState.DEGRADED}' "
        f"WHEN {spent} >= {alias}warn_nanos THEN '{PeriodState.WARNED}' "
        f"ELSE '{PeriodState.ACTIVE}' END"
    )


def _lock_and_charge(guard: str = "", release: str = "") -> str:
    """PostgreSQL: the CTEs `locked` (the hold's periods, locked in id order, with their
    states before) and `charged` (the cost moved into spent, the hold's lines given
    back, the new states), over the named parameters %(hold)s and %(cost)s. `guard`
    narrows which periods are locked; `release` prefixes the line amounts given back.

    The periods are looked up as an array of ids, so by primary key whatever the planner
    guesses of the tables' sizes: a join here was planned once per connection (prepared)
    as a sequential scan of the periods, whose hot rows collect dead versions between
    vacuums (bench/RESULTS.md)."""
    period, line = _table(BudgetPeriod, "postgresql"), _table(HoldLine, "postgresql")
    return (
        f"locked AS (SELECT id, state FROM {period} WHERE id = ANY(ARRAY("  # noqa: S608
        f"SELECT period_id FROM {line} WHERE hold_id = %(hold)s)) {guard}"
        "ORDER BY id FOR UPDATE), "
        f"charged AS (UPDATE {period} x SET spent_nanos = x.spent_nanos + %(cost)s, "
        f"held_nanos = x.held_nanos - {release}l.amount_nanos, "
        f"state = {_state_case('x.spent_nanos + %(cost)s', 'x.')} FROM {line} l "
        "WHERE x.id = ANY(ARRAY(SELECT id FROM locked)) AND l.hold_id = %(hold)s "
        "AND l.period_id = x.id RETURNING x.id, x.state, x.spent_nanos, x.limit_nanos) "
    )


@functools.cache
def _charge_sql(vendor: str) -> tuple[str, ...]:
    period, line = _table(BudgetPeriod, vendor), _table(HoldLine, vendor)
    if vendor == "postgresql":
        return (
            f"WITH {_lock_and_charge(release='%(release)s * ')}"  # noqa: S608
            "SELECT charged.id, locked.state, charged.state, charged.spent_nanos, "
            "charged.limit_nanos FROM charged JOIN locked ON locked.id = charged.id",
        )
    return (
        f"SELECT x.id, x.state FROM {period} x JOIN {line} l ON l.period_id = x.id "  # noqa: S608
        "WHERE l.hold_id = %s",
        f"UPDATE {period} SET spent_nanos = spent_nanos + %s, held_nanos = held_nanos - "  # noqa: S608
        f"%s * (SELECT l.amount_nanos FROM {line} l WHERE l.hold_id = %s "
        f"AND l.period_id = {period}.id), state = {_state_case('spent_nanos + %s')} "
        f"WHERE id IN (SELECT period_id FROM {line} WHERE hold_id = %s) "
        "RETURNING id, state, spent_nanos, limit_nanos",
    )


def charge(hold_id: int, cost: int, release_hold: bool) -> list[tuple[int, str, str, int, int]]:
    """Move `cost` into spent on every period of the hold, give back what each line
    held (if `release_hold`), and store each period's new state.
    Returns (period id, old state, new state, spent, limit) per period."""
    db = _db()
    release = 1 if release_hold else 0
    statements = _charge_sql(db.vendor)
    with db.cursor() as cursor:
        if db.vendor == "postgresql":
            cursor.execute(statements[0], {"hold": hold_id, "cost": cost, "release": release})
            return cursor.fetchall()
        cursor.execute(statements[0], [hold_id])
        before = dict(cursor.fetchall())
        cursor.execute(statements[1], [cost, release, hold_id, cost, cost, cost, hold_id])
        return [
            (pk, before[pk], state, spent, limit) for pk, state, spent, limit in cursor.fetchall()
        ]


# --- PostgreSQL: a hold and a capture in one statement each -------------------------
#
# In autocommit a single statement is its own transaction: no BEGIN and COMMIT round
# trips. Data-modifying CTEs run to completion with one snapshot; the periods are
# locked (in id order) by the first CTE that reads them, so every value the statement
# decides on is the committed latest.


@functools.cache
def _insert_select(model: type[Model], prefix: str, vendor: str) -> tuple[str, str]:
    """The column list and the SELECT list of an INSERT ... SELECT of `model`, each value
    a named parameter cast to its column's type (a NULL parameter has none of its own)."""
    db = _db()
    fields = [f for f in model._meta.concrete_fields if not f.primary_key]
    columns = ", ".join(db.ops.quote_name(f.column) for f in fields)
    values = ", ".join(
        f"CAST(%({prefix}{i})s AS {f.cast_db_type(db)})" for i, f in enumerate(fields)
    )
    return columns, values


def _insert_params(prefix: str, obj: Model, db) -> dict:
    """_insert_values as the named parameters of _insert_select's SELECT list."""
    return {f"{prefix}{i}": value for i, value in enumerate(_insert_values(obj, db))}


class PreparedCursor(psycopg.Cursor):
    """Server-side binding, prepared on first use: parsing and planning these
    statements (half a millisecond each, bench/RESULTS.md) is done once per connection.

    Every int is sent as int8 (the columns' type): psycopg would otherwise pick int2,
    int4 or int8 by each value's size, and each combination of types would be another
    prepared statement."""

    def __init__(self, connection, **kwargs):
        super().__init__(connection, **kwargs)
        self.adapters.register_dumper(int, Int8Dumper)

    def execute(self, query, params=None, *, prepare=None, binary=None):
        return super().execute(query, params, prepare=True, binary=binary)


# Django connects with prepare_threshold=None (no prepared statements, for poolers in
# transaction mode), and psycopg then ignores prepare=True. A threshold no query count
# reaches prepares only what asks to be: these statements, never the ORM's (whose
# cursors bind on the client and cannot be prepared anyway).
_ONLY_WHEN_ASKED = 1 << 62


def _prepared_cursor(db):
    """A Django cursor (error translation, query logging) over a prepared cursor."""
    db.ensure_connection()
    if db.connection.prepare_threshold is None:
        db.connection.prepare_threshold = _ONLY_WHEN_ASKED
    cursor = PreparedCursor(db.connection)
    return db.make_debug_cursor(cursor) if db.queries_logged else db.make_cursor(cursor)


def _cursor(db):
    """A prepared cursor on PostgreSQL, Django's own elsewhere."""
    return _prepared_cursor(db) if db.vendor == "postgresql" else db.cursor()


def _one_statement(db):
    """In autocommit a statement is its own transaction. Inside a caller's transaction,
    a savepoint keeps a failing statement (a reused request id) from aborting it."""
    return transaction.atomic(using=db.alias) if db.in_atomic_block else nullcontext()


def place_hold_postgres(hold: Hold, period_ids: list[int]) -> tuple[int | None, dict, int | None]:
    """Take `hold.amount_nanos` on every period and insert the hold with its lines, or
    change nothing if any period cannot pay (or is closed). Returns (hold id or None,
    {period id: (spent, held)}, the first period that refused)."""
    db = _db()
    period, line = _table(BudgetPeriod, db.vendor), _table(HoldLine, db.vendor)
    columns, placeholders = _insert_select(Hold, "h", db.vendor)
    sql = (
        f"WITH locked AS (SELECT id, spent_nanos, held_nanos, hard_nanos, closed_at "  # noqa: S608
        f"FROM {period} WHERE id = ANY(%(ids)s) ORDER BY id FOR UPDATE), "
        "refused AS (SELECT min(id) AS id FROM locked WHERE closed_at IS NOT NULL "
        "OR spent_nanos + held_nanos > hard_nanos - %(amount)s), "
        "decision AS (SELECT (SELECT id FROM refused) IS NULL "
        "AND (SELECT count(*) FROM locked) = %(count)s AS ok), "
        f"taken AS (UPDATE {period} p SET held_nanos = p.held_nanos + %(amount)s "
        "WHERE p.id = ANY(ARRAY(SELECT id FROM locked)) AND (SELECT ok FROM decision) "
        "RETURNING p.id, p.spent_nanos, p.held_nanos), "
        f"created AS (INSERT INTO {_table(Hold, db.vendor)} ({columns}) "
        f"SELECT {placeholders} WHERE (SELECT ok FROM decision) RETURNING id), "
        f"lines AS (INSERT INTO {line} (hold_id, period_id, amount_nanos) "
        "SELECT created.id, taken.id, %(amount)s FROM created, taken) "
        "SELECT (SELECT id FROM created), (SELECT id FROM refused), "
        "taken.id, taken.spent_nanos, taken.held_nanos FROM (SELECT 1) one "
        "LEFT JOIN taken ON TRUE"
    )
    params = {
        **_insert_params("h", hold, db),
        "ids": period_ids,
        "amount": hold.amount_nanos,
        "count": len(period_ids),
    }
    with _one_statement(db), _prepared_cursor(db) as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    hold_id, refused = rows[0][0], rows[0][1]
    taken = {pk: (spent, held) for _, _, pk, spent, held in rows if pk is not None}
    return hold_id, taken, refused


@functools.cache
def read_and_hold_sql() -> str:
    vendor = "postgresql"
    period, line = _table(BudgetPeriod, vendor), _table(HoldLine, vendor)
    columns, placeholders = _insert_select(Hold, "h", vendor)
    source = _policies_and_periods(vendor, "%(now)s")
    matching = _matching("%(tenant)s", "%(agent)s", "%(user)s")
    below_soft_cap = f"('{PeriodState.ACTIVE}', '{PeriodState.WARNED}')"
    return (
        f"WITH scope AS (SELECT p.id AS policy_id, p.scope_type, p.enabled, p.strategy, "  # noqa: S608
        "x.id AS period_id, x.state, x.spent_nanos + x.held_nanos <= x.hard_nanos - %(amount)s "
        f"AS affordable FROM {source} WHERE {matching}), "
        # Plain as read: every enabled policy has one open period, below its soft cap and
        # able to pay; no policy picks a strategy (when asked); every scope that would get
        # a default policy has a policy. Only then are the periods locked (and checked
        # again as they are now).
        "plain AS (SELECT coalesce(bool_and(NOT enabled OR (period_id IS NOT NULL "
        f"AND state IN {below_soft_cap} AND affordable)), TRUE) "
        "AND count(*) FILTER (WHERE enabled) = count(DISTINCT policy_id) FILTER (WHERE enabled) "
        "AND (NOT %(no_policy_strategy)s "
        "OR coalesce(bool_and(NOT enabled OR strategy = ''), TRUE)) "
        "AND CAST(%(required)s AS text[]) <@ "
        "coalesce(array_agg(CAST(scope_type AS text)), CAST('{}' AS text[])) AS ok FROM scope), "
        "locked AS (SELECT id, spent_nanos, held_nanos, hard_nanos, closed_at, state "
        f"FROM {period} WHERE id = ANY(ARRAY("
        "SELECT period_id FROM scope WHERE enabled AND period_id IS NOT NULL)) "
        "AND (SELECT ok FROM plain) ORDER BY id FOR UPDATE), "
        "refused AS (SELECT min(id) AS id FROM locked WHERE closed_at IS NOT NULL "
        f"OR state NOT IN {below_soft_cap} OR spent_nanos + held_nanos > hard_nanos - %(amount)s), "
        "decision AS (SELECT (SELECT ok FROM plain) AND (SELECT id FROM refused) IS NULL "
        "AND (SELECT count(*) FROM locked) = "
        "(SELECT count(*) FROM scope WHERE enabled AND period_id IS NOT NULL) AS ok), "
        f"taken AS (UPDATE {period} u SET held_nanos = u.held_nanos + %(amount)s "
        "WHERE u.id = ANY(ARRAY(SELECT id FROM locked)) AND (SELECT ok FROM decision) "
        "RETURNING u.id, u.spent_nanos, u.held_nanos, u.state), "
        f"created AS (INSERT INTO {_table(Hold, vendor)} ({columns}) "
        f"SELECT {placeholders} WHERE (SELECT ok FROM decision) RETURNING id), "
        f"lines AS (INSERT INTO {line} (hold_id, period_id, amount_nanos) "
        "SELECT created.id, taken.id, %(amount)s FROM created, taken) "
        "SELECT (SELECT id FROM created), locked.id, coalesce(taken.spent_nanos, "
        "locked.spent_nanos), coalesce(taken.held_nanos, locked.held_nanos), locked.state, "
        f"{_columns(BudgetPolicy, 'p', vendor)}, {_columns(BudgetPeriod, 'x', vendor)} "
        f"FROM (SELECT 1) one LEFT JOIN ({source}) ON {matching} "
        "LEFT JOIN locked ON locked.id = x.id LEFT JOIN taken ON taken.id = x.id "
        "ORDER BY p.id, x.window_start"
    )


def read_and_hold_params(
    hold: Hold,
    agent_id: int | None,
    now: datetime,
    *,
    required: list[str],
    no_policy_strategy: bool,
    db,
) -> dict:
    """The parameters of read_and_hold_sql() for this hold (read_and_hold_postgres)."""
    return {
        **_insert_params("h", hold, db),
        "now": db.ops.adapt_datetimefield_value(now),
        "tenant": hold.tenant_id,
        "agent": agent_id,
        "user": hold.user_key or None,  # no end user matches no user policy
        "amount": hold.amount_nanos,
        "required": required,
        "no_policy_strategy": no_policy_strategy,
    }


def read_and_hold_rows(rows, db):
    """What read_and_hold_postgres returns, from the statement's rows (`db`: the
    Django connection they were read on)."""
    locked = {pk: (spent, held, state) for _, pk, spent, held, state, *_ in rows if pk is not None}
    return rows[0][0], _scope_rows(rows, db, offset=5), locked


def read_and_hold_postgres(plain):
    """PostgreSQL, the common call in one statement: read the budgets of the hold's
    tenant, agent and end user, and take `hold.amount_nanos` on every period and insert
    the hold with its lines if the case is plain: every enabled policy has its open
    period, the scopes in `required` have a policy, no policy picks a strategy (if
    `no_policy_strategy`), and every period is below its soft cap and can pay.
    `plain` is an engine.PlainHold (its hold and those parameters).

    Returns (hold id or None, [(policy, period or None)] as policies_with_open_periods
    reads them, {period id: (spent, held, state)} of the periods it locked, after the
    hold if it placed one). Periods are locked only when they look plain as read; if,
    locked, one no longer is (a concurrent call or reset), nothing changes and the
    values it locked are the latest. The gateway sends the same statement from its
    event loop (budgets.pgloop)."""
    db = _db()
    with _one_statement(db), _prepared_cursor(db) as cursor:
        cursor.execute(read_and_hold_sql(), plain.params(db))
        rows = cursor.fetchall()
    return read_and_hold_rows(rows, db)


@functools.cache
def capture_sql(entry_model: type[Model]) -> str:
    """capture_postgres' statement; `entry_model` is the ledger's (spend.SpendEntry)."""
    columns, placeholders = _insert_select(entry_model, "e", "postgresql")
    return (
        f"WITH claimed AS (UPDATE {_table(Hold, 'postgresql')} SET status = %(captured)s, "  # noqa: S608
        "finished_at = %(now)s WHERE id = %(hold)s AND status = %(held)s RETURNING id), "
        f"entry AS (INSERT INTO {_table(entry_model, 'postgresql')} ({columns}) "
        f"SELECT {placeholders} FROM claimed RETURNING id), "
        f"{_lock_and_charge(guard='AND EXISTS (SELECT 1 FROM claimed) ')}"
        "SELECT (SELECT id FROM entry), charged.id, locked.state, charged.state, "
        "charged.spent_nanos, charged.limit_nanos FROM (SELECT 1) one "
        "LEFT JOIN (charged JOIN locked ON locked.id = charged.id) ON TRUE"
    )


def capture_params(hold: Hold, entry: Model, now: datetime, db) -> dict:
    """The parameters of capture_sql() (capture_postgres); `db`: the Django connection
    it runs on."""
    return {
        **_insert_params("e", entry, db),
        "captured": HoldStatus.CAPTURED,
        "held": HoldStatus.HELD,
        "now": now,
        "hold": hold.pk,
        "cost": entry.cost_nanos,
    }


def capture_rows(rows):
    """What capture_postgres returns, from the statement's rows."""
    entry_id = rows[0][0]
    if entry_id is None:
        return None
    return entry_id, [row[1:] for row in rows if row[1] is not None]


def capture_postgres(hold: Hold, entry: Model, now: datetime):
    """Charge a held hold in one statement: mark it captured, write the ledger row, move
    the cost into spent and release the hold on its periods, storing their new states.
    Returns (entry id, [(period id, old state, new state, spent, limit)]), or None when
    the hold is no longer held (voided, expired or captured meanwhile): nothing changed.
    The gateway sends the same statement from its event loop (budgets.pgloop)."""
    db = _db()
    with _one_statement(db), _prepared_cursor(db) as cursor:
        cursor.execute(capture_sql(type(entry)), capture_params(hold, entry, now, db))
        return capture_rows(cursor.fetchall())
