"""The configured backing services work (PostgreSQL and Redis in CI)."""

import uuid

from django.core.cache import cache, caches
from django.db import connection


def test_the_cache_stores_and_reads(require_redis):
    key = f"probe-{uuid.uuid4()}"
    cache.set(key, "value", 10)
    assert cache.get(key) == "value"
    assert type(caches["default"]).__name__ == "RedisCache"


def test_the_database_is_postgresql(require_postgres, db):
    with connection.cursor() as cursor:
        cursor.execute("select version()")
        assert "PostgreSQL" in cursor.fetchone()[0]
