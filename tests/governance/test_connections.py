"""Database connections under ASGI: Django's own requests (each in a thread made for
it) close theirs at the end of the request; the gateway's few long-lived database
threads keep theirs between calls."""

from __future__ import annotations

import asyncio
import time

import httpx2
from django.conf import settings
from django.db import connection, connections

from governance.asgi import application
from routing.views import in_thread
from tests.asgi_server import serving


def backends_of_this_database() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()"
        )
        return cursor.fetchone()[0]


def test_django_requests_leave_no_connection_open(require_postgres, transactional_db):
    before = backends_of_this_database()
    with serving(application) as url:
        for _ in range(10):
            assert httpx2.get(f"{url}/api/health", timeout=10).status_code == 200
        deadline = time.monotonic() + 5
        while backends_of_this_database() > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert backends_of_this_database() <= before


def test_gateway_threads_keep_their_connection_between_calls(transactional_db):
    def state():
        wrapper = connections["default"]
        wrapper.ensure_connection()
        return wrapper.settings_dict["CONN_MAX_AGE"], id(wrapper.connection)

    async def twice():
        # One call at a time: each finds a thread, and with it that thread's connection.
        return [await in_thread(state)() for _ in range(2 * settings.GATEWAY_DB_THREADS)]

    seen = asyncio.run(twice())
    assert {max_age for max_age, _ in seen} == {settings.GATEWAY_DB_CONN_MAX_AGE}
    assert len({conn for _, conn in seen}) <= settings.GATEWAY_DB_THREADS
    assert connection.settings_dict["CONN_MAX_AGE"] == 0  # everyone else's
