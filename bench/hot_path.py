"""The gateway's hot path in one process, with alternatives interleaved call by call.

    .venv/bin/python bench/hot_path.py --database-url postgres://postgres@127.0.0.1:5432/sg_bench

This machine's speed drifts by half from one minute to the next, which hides a change
of a few hundred microseconds between two runs of bench/gateway.py. Here each
alternative runs right after the other, thousands of times, so both see the same
machine; the medians compare them:

- placing a hold: the one-statement path of the common call (read and hold together,
  `gateway.plan_call`) against the general path (`engine.state_of`, then
  `engine.authorize`), each followed by its capture;
- PostgreSQL, from an event loop: the plan and charge of the common call with its two
  statements sent from a database thread against from the loop itself (budgets.pgloop);
- the SDK call: mistralai over httpx2's own AsyncClient against `DirectAsyncClient`
  (both over the HTTP/1.1 transport), against a Mistral simulator on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BODY = {
    "model": "ministral-3b-latest",
    "messages": [{"role": "user", "content": "Classify this support ticket: my invoice is wrong."}],
    "max_tokens": 40,
}


def _setup(database_url: str) -> None:
    os.environ["DATABASE_URL"] = database_url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "governance.settings")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def _medians(samples: dict[str, list[float]], skip: int) -> dict[str, float]:
    return {name: round(statistics.median(values[skip:]), 3) for name, values in samples.items()}


def hold_paths(calls: int) -> dict[str, float]:
    """Milliseconds to authorize and capture one call, by path (medians)."""
    from budgets import engine, services
    from budgets.models import Tenant
    from routing import gateway
    from routing.catalog import get_catalog

    tenant = Tenant.objects.filter(stripe_customer_id="cus_hotpath").first()
    if tenant is None:
        tenant = services.create_tenant("Hot path", "cus_hotpath")
    agent = services.create_agent(tenant, f"bench-{time.time_ns()}")
    key = services.authenticate_key(services.issue_key(agent)[1])
    model = get_catalog().resolve(BODY["model"])
    bound = gateway.prompt_token_bound(BODY)

    def one_statement(request_id):
        return gateway.plan_call(key, BODY, request_id=request_id).hold

    def general(request_id):
        scope = engine.state_of(tenant, agent)
        return engine.authorize(
            scope,
            request_id=request_id,
            model=model.id,
            prices=model.prices,
            input_tokens=bound,
            max_output_tokens=BODY["max_tokens"],
        )

    samples: dict[str, list[float]] = {"one_statement": [], "general": []}
    for n in range(calls):
        for name, place in (("one_statement", one_statement), ("general", general)):
            started = time.perf_counter()
            hold = place(f"hot-{name}-{n}-{time.time_ns()}")
            engine.capture(hold, prompt_tokens=bound, completion_tokens=BODY["max_tokens"])
            samples[name].append((time.perf_counter() - started) * 1000)
    return _medians(samples, skip=calls // 10)


def statements_from(calls: int) -> dict[str, float]:
    """Milliseconds to plan and charge one common call from an event loop (PostgreSQL),
    by where its two statements run: a database thread (plan_call, capture) or the
    loop itself (budgets.pgloop), as the gateway's view does (medians)."""
    import uvloop
    from django.db import connection

    from budgets import services
    from budgets.models import Tenant
    from routing import gateway, views

    if connection.vendor != "postgresql":
        return {}
    tenant = Tenant.objects.filter(stripe_customer_id="cus_hotpath").first()
    if tenant is None:
        tenant = services.create_tenant("Hot path", "cus_hotpath")
    agent = services.create_agent(tenant, f"bench-{time.time_ns()}")
    key = services.authenticate_key(services.issue_key(agent)[1])
    tokens = (gateway.prompt_token_bound(BODY), BODY["max_tokens"])

    async def thread(request_id):
        plan = await views.in_thread(gateway.plan_call)(key, BODY, request_id=request_id)
        await views.in_thread(gateway.capture)(
            plan, prompt_tokens=tokens[0], completion_tokens=tokens[1]
        )

    async def loop(request_id):
        plan = await views._plan(key, BODY, request_id, "", None)
        await views._Capture(plan, tokens, False, 1).run()

    async def run():
        views.use_loop_database()
        samples: dict[str, list[float]] = {"thread": [], "loop": []}
        try:
            for n in range(calls):
                for name, call in (("thread", thread), ("loop", loop)):
                    started = time.perf_counter()
                    await call(f"hot-{name}-{n}-{time.time_ns()}")
                    samples[name].append((time.perf_counter() - started) * 1000)
        finally:
            await views.close_loop_database()
        return _medians(samples, skip=calls // 10)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run())


def sdk_clients(calls: int) -> dict[str, float]:
    """Milliseconds for one chat completion through the SDK, by HTTP client (medians)."""
    import httpx2
    from mistralai.client import Mistral

    from routing.simulator import running_simulator
    from routing.transport import DirectAsyncClient, Http11Transport
    from routing.upstream import AsSentTransport

    def sdk(url, client_class):
        transport = AsSentTransport(Http11Transport())
        return Mistral(
            api_key="bench",
            server_url=url,
            async_client=client_class(transport=transport, timeout=None),
        )

    async def run(url):
        clients = {"httpx2": sdk(url, httpx2.AsyncClient), "direct": sdk(url, DirectAsyncClient)}
        samples: dict[str, list[float]] = {name: [] for name in clients}
        for _ in range(calls):
            for name, client in clients.items():
                started = time.perf_counter()
                await client.chat.complete_async(**BODY)
                samples[name].append((time.perf_counter() - started) * 1000)
        return _medians(samples, skip=calls // 10)

    with running_simulator() as url:
        return asyncio.run(run(url))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database-url", default="", help="default: a fresh SQLite file")
    parser.add_argument("--calls", type=int, default=2000, help="calls per alternative")
    args = parser.parse_args()
    database_url = args.database_url or (
        f"sqlite:///{Path(tempfile.mkdtemp(prefix='sg-hot-')) / 'bench.sqlite3'}"
    )
    _setup(database_url)
    holds = hold_paths(args.calls)
    print(f"authorize + capture, ms (median of {args.calls}): {holds}")
    statements = statements_from(args.calls)
    if statements:
        print(f"plan + charge from an event loop, ms (median of {args.calls}): {statements}")
    clients = sdk_clients(args.calls)
    print(f"SDK chat completion, ms (median of {args.calls}): {clients}")


if __name__ == "__main__":
    main()
