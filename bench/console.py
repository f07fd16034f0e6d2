"""Console and admin pages over a large ledger: 1,000 tenants, 1,000,000 spend rows.

    .venv/bin/python bench/console.py                 # SQLite (a fresh file in a temp dir)
    .venv/bin/python bench/console.py --database-url postgres://postgres@127.0.0.1:5432/sg_bench_console

A PostgreSQL database named in --database-url is dropped and created again. The data:
tenants on three plans (a few suspended), a few agents each with their keys, tenant,
agent and end-user policies with their periods over the last --days days (spent summed
from the ledger, limits chosen so current periods are active, warned, degraded or
stopped), the threshold and reset events those imply, one hold per ledger row plus a
few in flight, the hourly rollups (computed by spend.rollups, the real code), spikes
(spend.spikes.detect on bursts in the last hour, plus older ones), Stripe events,
meter reports and alert deliveries. Tenant activity is skewed (a few tenants make most
of the calls), like a real SaaS.

Then a staff superuser fetches, through Django's test client, every page under
/console/ (discovered from governance/console_urls.py, so pages added later are
included; budget detail for a tenant, an agent and an end user), the variants each
page links to or offers in a GET form (page 2, filters, ranges, a search), and the
admin: every changelist, and for the big tables page 2, a search, a filter and one
change page. One warm-up, then --runs timed runs each. It prints the median and max
and the SQL statements of each page, and exits 1 if any page answers something other
than 200 or takes half a second or more (median).
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import math
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from html import unescape
from html.parser import HTMLParser
from itertools import islice
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LIMIT_SECONDS = 0.5
AGENT_NAMES = ["invoice-bot", "churn-bot", "support-bot", "summarizer", "classifier"]
# Share of calls per catalog model (ids from routing/catalog.yaml).
MODEL_MIX = {"mistral-small": 50, "mistral-medium": 25, "mistral-large": 15, "ministral-8b": 10}
# Target state of current periods: mostly active, some on each threshold.
STATE_MIX = {"active": 60, "warned": 20, "degraded": 12, "stopped": 8}
CROSSED = {
    "active": [],
    "warned": ["warned"],
    "degraded": ["warned", "degraded"],
    "stopped": ["warned", "degraded", "stopped"],
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database-url", default="")
    parser.add_argument("--tenants", type=int, default=1_000)
    parser.add_argument("--rows", type=int, default=1_000_000, help="ledger rows")
    parser.add_argument("--days", type=int, default=30, help="days of history")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per page")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", default="", help="also write the results to this file")
    parser.add_argument(
        "--keep", action="store_true", help="keep the SQLite file (to look into a page)"
    )
    args = parser.parse_args()

    scratch = None if args.database_url else tempfile.mkdtemp(prefix="sg-bench-console-")
    database_url = args.database_url or f"sqlite:///{scratch}/console.sqlite3"
    if scratch and args.keep:
        print(f"the database stays in {scratch}/console.sqlite3", file=sys.stderr)
    elif scratch:
        # About 0.8 GB for a million ledger rows.
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    if database_url.startswith(("postgres://", "postgresql://")):
        recreate_postgres_database(database_url)
    os.environ["DATABASE_URL"] = database_url
    os.environ["DJANGO_SETTINGS_MODULE"] = "governance.settings"
    # The test client's host name; quiet logs so request lines do not drown the table.
    os.environ["ALLOWED_HOSTS"] = "testserver"
    os.environ.setdefault("LOG_LEVEL", "WARNING")

    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection

    call_command("migrate", verbosity=0)
    started = time.perf_counter()
    world = populate(args.tenants, args.rows, args.days, random.Random(args.seed))
    print(
        f"{connection.vendor}: {world.counts_text()} in {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    results = measure(world, args.runs)
    print_table(results)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"database": connection.vendor, "counts": world.counts, "pages": results},
                indent=2,
            )
        )
    slow = [
        r
        for r in results
        if r["counts"] and (r["status"] != 200 or r["median_ms"] >= LIMIT_SECONDS * 1000)
    ]
    if slow:
        print(f"\n{len(slow)} page(s) failed or took {LIMIT_SECONDS} s or more (median):")
        for r in slow:
            print(f"  {r['page']}: {r['status']}, {r['median_ms']:.0f} ms")
            print(f"    slowest statement ({r['slowest_sql_ms']:.0f} ms): {r['slowest_sql']}")
        sys.exit(1)


def recreate_postgres_database(url: str) -> None:
    import psycopg

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or name in ("postgres", "template1"):
        sys.exit(f"refusing to drop and create the database {name!r}")
    maintenance = parts._replace(path="/postgres", scheme="postgresql").geturl()
    with psycopg.connect(maintenance, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


# --- Data ---------------------------------------------------------------------------


@dataclass
class World:
    now: datetime
    counts: dict[str, int] = field(default_factory=dict)
    # Sample scopes and rows the pages are opened with.
    top_customer: str = ""
    quiet_customer: str = ""
    agent_scope: str = ""
    user_scope: str = ""
    top_tenant_id: int = 0
    top_agent_id: int = 0

    def counts_text(self) -> str:
        return ", ".join(f"{n:,} {what}" for what, n in self.counts.items())


def bulk_insert(model, columns: list[str], rows, chunk: int = 50_000) -> int:
    """Insert rows (database-ready values in `columns` order): COPY on PostgreSQL,
    executemany in big transactions on SQLite."""
    from django.db import connection, transaction

    qn = connection.ops.quote_name
    table = qn(model._meta.db_table)
    names = ", ".join(qn(model._meta.get_field(c).column) for c in columns)
    count = 0
    with transaction.atomic(), connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            with cursor.cursor.copy(f"COPY {table} ({names}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
                    count += 1
        else:
            sql = f"INSERT INTO {table} ({names}) VALUES ({', '.join(['%s'] * len(columns))})"
            rows = iter(rows)
            while part := list(islice(rows, chunk)):
                cursor.executemany(sql, part)
                count += len(part)
    return count


def reset_sequences(*models) -> None:
    from django.core.management.color import no_style
    from django.db import connection

    with connection.cursor() as cursor:
        for sql in connection.ops.sequence_reset_sql(no_style(), list(models)):
            cursor.execute(sql)


def populate(n_tenants: int, n_rows: int, days: int, rng: random.Random) -> World:
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.db.models import Count
    from django.utils import timezone

    from budgets import engine
    from budgets.models import (
        Agent,
        ApiKey,
        BudgetEvent,
        BudgetPeriod,
        BudgetPolicy,
        Hold,
        HoldLine,
        HoldStatus,
        Plan,
        PolicySource,
        ScopeType,
        Tenant,
        Window,
    )
    from budgets.windows import add_months, window_bounds
    from governance.models import AlertChannel, AlertDelivery
    from routing.catalog import load_catalog
    from spend import rollups, spikes
    from spend.models import MeterReport, SpendEntry, Spike
    from webhooks.models import StripeEvent

    def db_time(moment: datetime):
        return connection.ops.adapt_datetimefield_value(moment)

    now = timezone.now()
    world = World(now=now)
    first = now - timedelta(days=days)
    catalog = load_catalog(settings.MODEL_CATALOG_PATH)
    models = [catalog.models[m] for m in MODEL_MIX]

    # Plans, tenants, agents, keys.
    plans = Plan.objects.bulk_create(
        [
            Plan(name=name, stripe_price=f"price_{name}", limit_nanos=usd * 10**9, window=window)
            for name, usd, window in (
                ("starter", 50, Window.BILLING_CYCLE),
                ("pro", 500, Window.BILLING_CYCLE),
                ("enterprise", 5000, Window.MONTH),
            )
        ]
    )
    tenants = []
    for i in range(n_tenants):
        anchor = (now - timedelta(days=rng.randrange(0, 28))).replace(
            hour=0, minute=0, second=0, microsecond=0
        )
        tenants.append(
            Tenant(
                name=f"Tenant {i:04d}",
                stripe_customer_id=f"cus_bench{i:04d}",
                plan=plans[i % 3],
                status=Tenant.Status.SUSPENDED if i % 50 == 49 else Tenant.Status.ACTIVE,
                billing_period_start=anchor if i % 3 != 2 else None,
                billing_period_end=add_months(anchor, 1) if i % 3 != 2 else None,
            )
        )
    tenants = Tenant.objects.bulk_create(tenants, batch_size=500)
    agents = Agent.objects.bulk_create(
        [
            Agent(tenant=t, name=AGENT_NAMES[j], paused=(i * 7 + j) % 100 == 0)
            for i, t in enumerate(tenants)
            for j in range(1 + i % len(AGENT_NAMES))
        ],
        batch_size=500,
    )
    agents_of: dict[int, list[Agent]] = {}
    for a in agents:
        agents_of.setdefault(a.tenant_id, []).append(a)
    keys = []
    for a in agents:
        for revoked in (False, True) if a.pk % 10 == 0 else (False,):
            key_id = f"{a.pk:06x}{int(revoked):06x}"
            keys.append(
                ApiKey(
                    agent=a,
                    key_id=key_id,
                    key_hash=hashlib.sha256(key_id.encode()).hexdigest(),
                    label="old" if revoked else "prod",
                    revoked_at=now - timedelta(days=3) if revoked else None,
                )
            )
    ApiKey.objects.bulk_create(keys, batch_size=500)

    # The ledger, with one captured hold per row: tenant activity is Zipf-like.
    tenant_weight = [1 / (rank + 1) ** 1.1 for rank in range(n_tenants)]
    choices, weights = [], []
    for t, w in zip(tenants, tenant_weight, strict=True):
        mine = agents_of[t.pk]
        share = [1 / (j + 1) for j in range(len(mine))]
        for a, s in zip(mine, share, strict=True):
            choices.append(a)
            weights.append(w * s / sum(share))
    span = (now - first).total_seconds() - 1
    n_burst = min(n_rows // 100, 10_000)
    # Bursts in the last half hour: a few agents running away (spend.spikes finds them).
    runaways = [choices[k] for k in (3, 10, 40, 120, 400) if k < len(choices)]
    calls = [
        *((rng.random() * span, a) for a in rng.choices(choices, weights, k=n_rows - n_burst)),
        *((span - rng.random() * 1800, runaways[k % len(runaways)]) for k in range(n_burst)),
    ]
    calls.sort(key=lambda call: call[0])
    model_picks = rng.choices(models, weights=list(MODEL_MIX.values()), k=n_rows)
    tokens = [(rng.randrange(100, 4000), rng.randrange(20, 1000)) for _ in range(n_rows)]
    reported_before = now - timedelta(hours=1)

    def rows():
        """(id, created, agent, spec, prompt, completion, held, user) per call, in time order."""
        for row_id, ((offset, agent), spec, (prompt, completion)) in enumerate(
            zip(calls, model_picks, tokens, strict=True), start=1
        ):
            held = (prompt + 1000) * spec.prices.input_nanos + 1000 * spec.prices.output_nanos
            user = f"user-{row_id % 20}" if row_id % 5 == 0 else ""
            yield (
                row_id,
                first + timedelta(seconds=offset),
                agent,
                spec,
                prompt,
                completion,
                held,
                user,
            )

    bulk_insert(
        Hold,
        [
            "id",
            "request_id",
            "tenant",
            "agent",
            "user_key",
            "model",
            "input_price_nanos",
            "output_price_nanos",
            "input_tokens",
            "max_output_tokens",
            "amount_nanos",
            "status",
            "expires_at",
            "created_at",
            "finished_at",
        ],
        (
            (
                row_id,
                f"bench-{row_id:07d}",
                agent.tenant_id,
                agent.pk,
                user,
                spec.id,
                spec.prices.input_nanos,
                spec.prices.output_nanos,
                prompt + 1000,
                1000,
                held,
                HoldStatus.CAPTURED,
                db_time(created + timedelta(minutes=10)),
                db_time(created),
                db_time(created),
            )
            for row_id, created, agent, spec, prompt, completion, held, user in rows()
        ),
    )
    bulk_insert(
        SpendEntry,
        [
            "id",
            "tenant",
            "agent",
            "user_key",
            "request_id",
            "hold",
            "model_requested",
            "model_used",
            "prompt_tokens",
            "completion_tokens",
            "input_price_nanos",
            "output_price_nanos",
            "cost_nanos",
            "held_nanos",
            "over_hold",
            "usage_estimated",
            "latency_ms",
            "created_at",
            "reported_at",
        ],
        (
            (
                row_id,
                agent.tenant_id,
                agent.pk,
                user,
                f"bench-{row_id:07d}",
                row_id,
                spec.id,
                spec.id,
                prompt,
                completion,
                spec.prices.input_nanos,
                spec.prices.output_nanos,
                prompt * spec.prices.input_nanos + completion * spec.prices.output_nanos,
                held,
                False,
                False,
                200 + completion * 9,
                db_time(created),
                db_time(created) if created < reported_before else None,
            )
            for row_id, created, agent, spec, prompt, completion, held, user in rows()
        ),
    )
    for done in (calls, model_picks, tokens):
        done.clear()
    reset_sequences(Hold, SpendEntry)

    # Policies: every tenant; half of the agents; two end users of the busiest tenants.
    policies = []
    for i, t in enumerate(tenants):
        window = [Window.BILLING_CYCLE, Window.BILLING_CYCLE, Window.MONTH, Window.DAY][i % 4]
        policies.append(
            BudgetPolicy(
                tenant=t,
                scope_type=ScopeType.TENANT,
                scope_key=t.stripe_customer_id,
                limit_nanos=1,
                window=window,
                source=PolicySource.PLAN if i % 2 else PolicySource.OPERATOR,
            )
        )
        for a in agents_of[t.pk][::2]:
            policies.append(
                BudgetPolicy(
                    tenant=t,
                    agent=a,
                    scope_type=ScopeType.AGENT,
                    scope_key=f"{t.stripe_customer_id}:{a.name}",
                    limit_nanos=1,
                    window=Window.DAY,
                    velocity_limit_nanos=5 * 10**9 if i % 10 == 0 else None,
                )
            )
        if i < 100:
            for user in ("user-0", "user-5"):
                policies.append(
                    BudgetPolicy(
                        tenant=t,
                        scope_type=ScopeType.USER,
                        scope_key=f"{t.stripe_customer_id}:{user}",
                        user_key=user,
                        limit_nanos=1,
                        window=Window.DAY,
                    )
                )
    policies = BudgetPolicy.objects.bulk_create(policies, batch_size=500)
    tenant_by_id = {t.pk: t for t in tenants}

    # Periods: every window from the start of the history to now; one in twenty
    # policies was reset by hand in its current window.
    period_rows = []
    for p in policies:
        t = tenant_by_id[p.tenant_id]
        bounds = []
        moment = first
        while moment < now:
            start, end = window_bounds(
                p.window,
                moment,
                billing_period_start=t.billing_period_start,
                billing_period_end=t.billing_period_end,
            )
            if bounds and start < bounds[-1][1]:
                start = bounds[-1][1]
            bounds.append((start, end))
            moment = end
        reset_at = None
        if p.pk % 20 == 0 and bounds[-1][0] < now - timedelta(minutes=30):
            reset_at = now - timedelta(minutes=30)
        for start, end in bounds:
            closed = reset_at if reset_at and (start, end) == bounds[-1] else None
            period_rows.append([p.pk, start, end, closed])
            if closed:
                period_rows.append([p.pk, closed, end, None])
    bulk_insert(
        BudgetPeriod,
        [
            "policy",
            "window_start",
            "window_end",
            "limit_nanos",
            "warn_nanos",
            "soft_nanos",
            "hard_nanos",
            "spent_nanos",
            "held_nanos",
            "state",
            "closed_at",
            "close_reason",
            "closed_by",
            "created_at",
        ],
        (
            (
                policy_id,
                db_time(start),
                db_time(end),
                1,
                0,
                0,
                1,
                0,
                0,
                "active",
                db_time(closed) if closed else None,
                "bench reset" if closed else "",
                "bench" if closed else "",
                db_time(start),
            )
            for policy_id, start, end, closed in period_rows
        ),
    )

    # Spent, summed from the ledger in SQL for each scope type.
    ends = "COALESCE(pe.closed_at, pe.window_end)"
    scope_match = {
        "tenant": "e.tenant_id = po.tenant_id",
        "agent": "e.agent_id = po.agent_id",
        "user": "e.tenant_id = po.tenant_id AND e.user_key = po.user_key",
    }
    with connection.cursor() as cursor:
        for scope_type, match in scope_match.items():
            cursor.execute(
                f"""
                UPDATE budgets_budgetperiod AS pe SET spent_nanos = COALESCE((
                    SELECT SUM(e.cost_nanos) FROM spend_spendentry e, budgets_budgetpolicy po
                    WHERE po.id = pe.policy_id AND {match}
                      AND e.created_at >= pe.window_start AND e.created_at < {ends}
                ), 0)
                WHERE pe.policy_id IN (
                    SELECT id FROM budgets_budgetpolicy WHERE scope_type = %s
                )
                """,
                [scope_type],
            )

    # Limits: the current period lands in the state drawn for the policy; a past period
    # that spent more had a higher limit then (never spent over its hard limit).
    periods_of: dict[int, list[BudgetPeriod]] = {}
    for period in BudgetPeriod.objects.order_by("window_start").only(
        "id", "policy_id", "window_start", "window_end", "closed_at", "spent_nanos"
    ):
        periods_of.setdefault(period.policy_id, []).append(period)
    states = rng.choices(list(STATE_MIX), weights=list(STATE_MIX.values()), k=len(policies))
    fraction = {"active": (0.05, 0.45), "warned": (0.5, 0.78), "degraded": (0.8, 0.98)}
    policy_limits, period_updates, event_rows = [], [], []
    for p, state in zip(policies, states, strict=True):
        mine = periods_of[p.pk]
        spent_now = mine[-1].spent_nanos
        if spent_now == 0:
            limit = 10 * 10**9
        elif state == "stopped":
            limit = spent_now
        else:
            limit = math.ceil(spent_now / rng.uniform(*fraction[state]))
        policy_limits.append((limit, p.pk))
        for index, period in enumerate(mine):
            own = max(limit, period.spent_nanos)
            warn, soft = own // 2, own * 8 // 10
            period_state = engine.state_for(period.spent_nanos, warn, soft, own)
            period_updates.append((own, warn, soft, own, period_state, period.pk))
            if index:
                event_rows.append(
                    (period.pk, "reset", mine[index - 1].spent_nanos, own, "", period.window_start)
                )
            length = period.ends_at - period.window_start
            for kind, at in zip(CROSSED[period_state], (0.4, 0.6, 0.8), strict=False):
                crossed = min(period.window_start + length * at, now - timedelta(minutes=5))
                event_rows.append((period.pk, kind, period.spent_nanos, own, "", crossed))
    with connection.cursor() as cursor:
        cursor.executemany(
            "UPDATE budgets_budgetpolicy SET limit_nanos = %s WHERE id = %s", policy_limits
        )
        cursor.executemany(
            "UPDATE budgets_budgetperiod SET limit_nanos = %s, warn_nanos = %s, soft_nanos = %s,"
            " hard_nanos = %s, state = %s WHERE id = %s",
            period_updates,
        )
    bulk_insert(
        BudgetEvent,
        ["period", "kind", "spent_nanos", "limit_nanos", "detail", "created_at"],
        ((p, k, s, lim, d, db_time(at)) for p, k, s, lim, d, at in event_rows),
    )

    # Holds in flight on active tenant periods with room left.
    open_periods = list(
        BudgetPeriod.objects.filter(
            policy__scope_type=ScopeType.TENANT,
            closed_at__isnull=True,
            window_start__lte=now,
            window_end__gt=now,
            state="active",
        ).select_related("policy")[:40]
    )
    for k, period in enumerate(open_periods):
        amount = min(50_000_000, max(0, period.hard_nanos - period.spent_nanos) // 2)
        hold = Hold.objects.create(
            request_id=f"bench-live-{k}",
            tenant_id=period.policy.tenant_id,
            model="mistral-small",
            input_price_nanos=100,
            output_price_nanos=300,
            input_tokens=1000,
            max_output_tokens=1000,
            amount_nanos=amount,
            expires_at=now + timedelta(minutes=9),
        )
        HoldLine.objects.create(hold=hold, period=period, amount_nanos=amount)
        BudgetPeriod.objects.filter(pk=period.pk).update(held_nanos=amount)

    # Hourly rollups from the ledger, with the real code; then spikes.
    rollups.rollup_hours(now, lookback=now - first + timedelta(hours=2))
    spikes.detect(now)
    Spike.objects.bulk_create(
        [
            Spike(
                scope_type="agent",
                tenant_id=a.tenant_id,
                agent=a,
                kind=Spike.Kind.ANOMALY,
                hour=(now - timedelta(days=d)).replace(minute=0, second=0, microsecond=0),
                spend_nanos=3 * 10**9,
                baseline_nanos=10**8,
                threshold_nanos=10**9,
            )
            for d in range(1, days)
            for a in choices[d * 7 : d * 7 + 5]
        ]
    )

    # Stripe events, meter reports, alert channels and deliveries.
    event_types = ["customer.subscription.updated", "invoice.paid", "invoice.payment_failed"]
    bulk_insert(
        StripeEvent,
        [
            "stripe_id",
            "type",
            "api_version",
            "livemode",
            "created",
            "customer_id",
            "payload",
            "status",
            "attempts",
            "note",
            "warning",
            "error",
            "received_at",
            "handled_at",
        ],
        (
            (
                f"evt_bench{i:07d}",
                event_types[i % 3],
                "2025-03-31.basil",
                False,
                db_time(first + timedelta(minutes=10 * i)),
                t.stripe_customer_id,
                json.dumps({"id": f"evt_bench{i:07d}", "object": "event", "data": {"object": {}}}),
                "failed" if i % 97 == 0 else "processed",
                1,
                "",
                "",
                "KeyError: 'items'" if i % 97 == 0 else "",
                db_time(first + timedelta(minutes=10 * i)),
                db_time(first + timedelta(minutes=10 * i)),
            )
            for i, t in ((i, tenants[i % n_tenants]) for i in range(n_tenants * 5))
        ),
    )
    bulk_insert(
        MeterReport,
        [
            "tenant",
            "stripe_customer_id",
            "event_name",
            "unit",
            "identifier",
            "amount",
            "value",
            "timestamp",
            "status",
            "attempts",
            "next_attempt_at",
            "last_error",
            "created_at",
            "reported_at",
        ],
        (
            (
                t.pk,
                t.stripe_customer_id,
                "llm_spend",
                "micro_usd",
                f"mr_{t.pk}_{d}",
                10**9,
                10**6,
                db_time(first + timedelta(days=d)),
                "reported",
                1,
                db_time(first + timedelta(days=d)),
                "",
                db_time(first + timedelta(days=d)),
                db_time(first + timedelta(days=d)),
            )
            for d in range(days)
            for t in tenants
        ),
    )
    channels = AlertChannel.objects.bulk_create(
        [
            AlertChannel(name="ops slack", type="webhook", target="https://hooks.example.com/x"),
            AlertChannel(name="ops email", type="email", target="ops@example.com"),
            AlertChannel(
                name="acme email", type="email", target="a@example.com", tenant=tenants[0]
            ),
        ]
    )
    tenant_of_period = dict(BudgetPeriod.objects.values_list("pk", "policy__tenant_id").order_by())
    bulk_insert(
        AlertDelivery,
        [
            "channel",
            "source_type",
            "source_id",
            "tenant",
            "kind",
            "payload",
            "status",
            "attempts",
            "next_attempt_at",
            "last_error",
            "created_at",
            "sent_at",
        ],
        (
            (
                channel.pk,
                "budget_event",
                k,
                tenant_of_period[period_id],
                kind,
                json.dumps({"text": f"{kind} on period {period_id}"}),
                "sent",
                1,
                db_time(at),
                "",
                db_time(at),
                db_time(at),
            )
            for k, (period_id, kind, _s, _l, _d, at) in enumerate(event_rows, start=1)
            if kind != "reset"
            for channel in channels[:2]
        ),
    )
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")  # fresh statistics, as autovacuum would have by now

    get_user_model().objects.create_superuser("bench", "bench@example.com", "bench")

    by_tenant = dict(
        SpendEntry.objects.values("tenant_id")
        .annotate(n=Count("id"))
        .order_by()
        .values_list("tenant_id", "n")
    )
    top = tenant_by_id[max(by_tenant, key=by_tenant.__getitem__)]
    world.top_customer = top.stripe_customer_id
    world.top_tenant_id = top.pk
    world.quiet_customer = tenant_by_id[
        min(by_tenant, key=by_tenant.__getitem__)
    ].stripe_customer_id
    top_agent = agents_of[top.pk][0]
    world.top_agent_id = top_agent.pk
    world.agent_scope = f"{top.stripe_customer_id}:{top_agent.name}"
    user_policy = (
        BudgetPolicy.objects.filter(scope_type=ScopeType.USER, tenant=top).first()
        or BudgetPolicy.objects.filter(scope_type=ScopeType.USER).first()
    )
    world.user_scope = user_policy.scope_key if user_policy else ""
    from spend.models import HourlyRollup

    world.counts = {
        "tenants": Tenant.objects.count(),
        "agents": Agent.objects.count(),
        "keys": ApiKey.objects.count(),
        "policies": BudgetPolicy.objects.count(),
        "periods": BudgetPeriod.objects.count(),
        "budget events": BudgetEvent.objects.count(),
        "ledger rows": SpendEntry.objects.count(),
        "holds": Hold.objects.count(),
        "hourly rollups": HourlyRollup.objects.count(),
        "spikes": Spike.objects.count(),
        "Stripe events": StripeEvent.objects.count(),
        "meter reports": MeterReport.objects.count(),
        "alert deliveries": AlertDelivery.objects.count(),
    }
    return world


# --- Pages --------------------------------------------------------------------------


class GetForms(HTMLParser):
    """Links and GET-form choices a page offers: the variants an operator would open."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.choices: list[tuple[str, str]] = []
        self.text_inputs: list[str] = []
        self._form_method: str | None = None
        self._select: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "a" and a.get("href"):
            self.links.append(unescape(a["href"]))
        elif tag == "form":
            self._form_method = (a.get("method") or "get").lower()
        elif self._form_method == "get":
            if tag == "select" and a.get("name"):
                self._select = a["name"]
            elif tag == "option" and self._select and a.get("value"):
                self.choices.append((self._select, a["value"]))
            elif tag == "input" and a.get("type", "text") in ("text", "search") and a.get("name"):
                self.text_inputs.append(a["name"])

    def handle_endtag(self, tag):
        if tag == "form":
            self._form_method = None
        elif tag == "select":
            self._select = None


def variants(path: str, html: str, search_term: str, cap: int = 8) -> list[tuple[str, bool]]:
    """Same-page URLs with a query string that the page links to (one per distinct set
    of parameters: page 2, filters, ranges) or offers in a GET form (every choice of a
    select, a search term in a text box), each with whether it came from a link. A
    form's choice may need other fields (a custom range needs its dates), so only a
    link must answer 200."""
    found = GetForms()
    found.feed(html)
    urls: dict[tuple, tuple[str, bool]] = {}
    for href in found.links:
        parts = urlsplit(href)
        if parts.query and parts.path in ("", path) and not parts.netloc:
            key = tuple(sorted(k for k, v in parse_qsl(parts.query) if v))
            if key and key not in urls:
                urls[key] = (f"{path}?{parts.query}", True)
    for name, value in found.choices:
        urls.setdefault((name, value), (f"{path}?{urlencode({name: value})}", False))
    for name in found.text_inputs:
        urls.setdefault((name, "search"), (f"{path}?{urlencode({name: search_term})}", False))
    return list(urls.values())[:cap]


def console_pages(world: World) -> list[tuple[str, str]]:
    """(label, URL) of every console page: the URL patterns of governance/console_urls.py,
    with sample arguments for those that take some."""
    from django.urls import URLPattern, reverse

    from governance import console_urls

    samples = [
        {"scope_type": "tenant", "scope_key": world.top_customer},
        {"scope_type": "agent", "scope_key": world.agent_scope},
        {"scope_type": "user", "scope_key": world.user_scope},
        {"scope_type": "tenant", "scope_key": world.quiet_customer},
        {"customer_id": world.top_customer, "tenant": world.top_customer},
        {"tenant_id": world.top_tenant_id, "pk": world.top_tenant_id},
        {"agent_id": world.top_agent_id},
    ]
    pages = []
    for pattern in console_urls.urlpatterns:
        if not isinstance(pattern, URLPattern) or not pattern.name:
            continue
        name = f"{console_urls.app_name}:{pattern.name}"
        params = list(getattr(pattern.pattern, "converters", {}))  # in URL order
        if not params:
            pages.append((name, reverse(name)))
            continue
        matched = [s for s in samples if set(params) <= set(s)]
        if not matched:
            print(f"skipped {name}: no sample arguments for {params}", file=sys.stderr)
        for sample in matched:
            kwargs = {k: sample[k] for k in params}
            pages.append(
                (f"{name} {'/'.join(map(str, kwargs.values()))}", reverse(name, kwargs=kwargs))
            )
    return pages


def admin_pages(world: World) -> list[tuple[str, str]]:
    from django.contrib import admin
    from django.urls import reverse

    from budgets.models import BudgetEvent, BudgetPeriod, BudgetPolicy, Hold, Tenant
    from governance.models import AlertDelivery
    from spend.models import MeterReport, SpendEntry
    from webhooks.models import StripeEvent

    def url(model, view: str, *args) -> str:
        return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_{view}", args=args)

    pages = [("admin index", reverse("admin:index"))]
    for model in sorted(admin.site._registry, key=lambda m: m._meta.label):
        pages.append((f"admin {model._meta.label} list", url(model, "changelist")))
    big = [SpendEntry, Hold, BudgetPeriod, BudgetEvent, StripeEvent, MeterReport, AlertDelivery]
    for model in big:
        label = f"admin {model._meta.label}"
        changelist = url(model, "changelist")
        pages.append((f"{label} page 2", f"{changelist}?p=2"))
        pages.append((f"{label} search", f"{changelist}?{urlencode({'q': world.top_customer})}"))
        last = model.objects.order_by("-pk").values_list("pk", flat=True).first()
        pages.append((f"{label} change", url(model, "change", last)))
    ledger = url(SpendEntry, "changelist")
    # The last page the capped count lets one reach (page 200 of a million rows).
    paging = admin.site._registry[SpendEntry]
    counted = min(SpendEntry.objects.count(), paging.paginator.cap + 1)
    last_page = max(1, math.ceil(counted / paging.list_per_page))
    year, month, day = world.now.year, world.now.month, world.now.day
    pages += [
        (f"admin ledger tenant={world.top_customer}", f"{ledger}?tenant={world.top_customer}"),
        ("admin ledger model=mistral-large", f"{ledger}?model=mistral-large"),
        ("admin ledger agent + page 3", f"{ledger}?agent={world.top_agent_id}&p=3"),
        ("admin ledger year", f"{ledger}?created_at__year={year}"),
        ("admin ledger month", f"{ledger}?created_at__year={year}&created_at__month={month}"),
        (
            "admin ledger day",
            f"{ledger}?created_at__year={year}&created_at__month={month}&created_at__day={day}",
        ),
        ("admin ledger search request id", f"{ledger}?q=bench-0500000"),
        (f"admin ledger last page ({last_page})", f"{ledger}?p={last_page}"),
        ("admin ledger over_hold (no row has it)", f"{ledger}?over_hold__exact=1"),
        ("admin holds in flight", f"{url(Hold, 'changelist')}?status__exact=held"),
    ]
    top_policy = BudgetPolicy.objects.get(scope_type="tenant", scope_key=world.top_customer)
    pages += [
        ("admin tenant change (top)", url(Tenant, "change", world.top_tenant_id)),
        ("admin policy change (top)", url(BudgetPolicy, "change", top_policy.pk)),
        (
            "admin agent change (top)",
            reverse("admin:budgets_agent_change", args=[world.top_agent_id]),
        ),
        ("admin key add", reverse("admin:budgets_apikey_add")),
        ("admin policy add", url(BudgetPolicy, "add")),
    ]
    return pages


class Statements:
    """Counts the SQL statements of a request and keeps the slowest."""

    def __init__(self) -> None:
        self.count, self.slowest, self.slowest_sql = 0, 0.0, ""

    def __call__(self, execute, sql, params, many, context):
        started = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            elapsed = time.perf_counter() - started
            self.count += 1
            if elapsed > self.slowest:
                self.slowest, self.slowest_sql = elapsed, sql


def measure(world: World, runs: int) -> list[dict]:
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client

    client = Client(raise_request_exception=False)
    client.force_login(get_user_model().objects.get(username="bench"))
    results = []

    def timed(label: str, url: str, must_answer: bool = True) -> str:
        statements = Statements()
        started = time.perf_counter()
        with connection.execute_wrapper(statements):
            response = client.get(url)  # warm-up, and the statements it runs
        first = time.perf_counter() - started
        seconds = []
        for _ in range(runs):
            started = time.perf_counter()
            client.get(url)
            seconds.append(time.perf_counter() - started)
        results.append(
            {
                "page": label,
                "url": url,
                "status": response.status_code,
                "counts": must_answer or response.status_code == 200,
                "first_ms": first * 1000,
                "median_ms": statistics.median(seconds) * 1000,
                "max_ms": max(seconds) * 1000,
                "queries": statements.count,
                "slowest_sql_ms": statements.slowest * 1000,
                "slowest_sql": statements.slowest_sql,
            }
        )
        print(f"  {results[-1]['median_ms']:7.0f} ms  {label}", file=sys.stderr, flush=True)
        return response.content.decode() if response.status_code == 200 else ""

    for label, url in console_pages(world):
        html = timed(label, url)
        for variant, linked in variants(urlsplit(url).path, html, world.top_customer):
            timed(f"{label} ?{urlsplit(variant).query}", variant, must_answer=linked)
    for label, url in admin_pages(world):
        timed(label, url)
    return results


def print_table(results: list[dict]) -> None:
    print(
        "\n| page | median ms | max ms | first (cold) ms | SQL statements"
        " | slowest statement ms (cold) | status |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in results:
        flag = " **slow**" if r["median_ms"] >= LIMIT_SECONDS * 1000 else ""
        status = r["status"] if r["counts"] else f"{r['status']} (a form choice; not counted)"
        print(
            f"| {r['page']} | {r['median_ms']:.0f}{flag} | {r['max_ms']:.0f} |"
            f" {r['first_ms']:.0f} | {r['queries']} |"
            f" {r['slowest_sql_ms']:.0f} | {status} |"
        )


if __name__ == "__main__":
    main()
