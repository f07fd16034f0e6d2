"""Set-based periodic work at scale: open 100,000 periods and expire 100,000 holds.

    .venv/bin/python bench/periodic.py                    # SQLite (a fresh file)
    .venv/bin/python bench/periodic.py --database-url postgres://postgres@127.0.0.1:5432/sg_bench_periodic

Counts the SQL statements each task runs as well as its time: the claim is that the
work is a few statements per batch, not a loop of statements over rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database-url", default="")
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    os.environ["DATABASE_URL"] = (
        args.database_url or f"sqlite:///{tempfile.mkdtemp()}/periodic.sqlite3"
    )
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "governance.settings")

    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection
    from django.test.utils import CaptureQueriesContext
    from django.utils import timezone

    from budgets import engine
    from budgets.models import BudgetPeriod, BudgetPolicy, Hold, HoldLine, ScopeType, Tenant

    call_command("migrate", verbosity=0)
    n = args.rows
    stamp = int(time.time())
    tenants = Tenant.objects.bulk_create(
        [Tenant(name=f"t{i}", stripe_customer_id=f"cus_b{stamp}x{i}") for i in range(n)],
        batch_size=5000,
    )
    BudgetPolicy.objects.bulk_create(
        [
            BudgetPolicy(
                tenant=t,
                scope_type=ScopeType.TENANT,
                scope_key=t.stripe_customer_id,
                limit_nanos=10**12,
            )
            for t in tenants
        ],
        batch_size=5000,
    )
    results: dict[str, object] = {"database": connection.vendor, "rows": n}

    now = timezone.now()
    with CaptureQueriesContext(connection) as queries:
        started = time.perf_counter()
        opened = engine.materialize_periods(now)
        results["materialize_seconds"] = round(time.perf_counter() - started, 2)
    results["periods_opened"] = opened
    results["materialize_statements"] = len(queries)

    periods = list(
        BudgetPeriod.objects.filter(policy__tenant__in=tenants)
        .select_related("policy")
        .order_by("pk")
    )
    expires = now - timedelta(seconds=1)
    holds = Hold.objects.bulk_create(
        [
            Hold(
                request_id=f"b{stamp}-{p.pk}",
                tenant_id=p.policy.tenant_id,
                model="m",
                input_price_nanos=1,
                output_price_nanos=1,
                input_tokens=1,
                max_output_tokens=1,
                amount_nanos=2,
                expires_at=expires,
            )
            for p in periods
        ],
        batch_size=5000,
    )
    HoldLine.objects.bulk_create(
        [HoldLine(hold=h, period=p, amount_nanos=2) for h, p in zip(holds, periods, strict=True)],
        batch_size=5000,
    )
    BudgetPeriod.objects.filter(pk__in=[p.pk for p in periods[:1]]).update(held_nanos=2)
    from django.db.models import F

    BudgetPeriod.objects.filter(policy__tenant__in=tenants).update(
        held_nanos=F("held_nanos") * 0 + 2
    )
    with CaptureQueriesContext(connection) as queries:
        started = time.perf_counter()
        expired = engine.expire_holds(now)
        results["expire_seconds"] = round(time.perf_counter() - started, 2)
    results["holds_expired"] = expired
    results["expire_statements"] = len(queries)
    results["held_left"] = sum(
        BudgetPeriod.objects.filter(policy__tenant__in=tenants).values_list("held_nanos", flat=True)
    )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
