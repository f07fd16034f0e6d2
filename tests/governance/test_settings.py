"""Settings come from the environment; bad values stop the start with a message that
names the variable, and production settings pass Django's deployment checks."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PRODUCTION = {
    "SECRET_KEY": "x" * 64 + "-production-secret-for-the-deploy-check",
    "DEBUG": "false",
    "ALLOWED_HOSTS": "governance.example.com",
    "SECURE_SSL_REDIRECT": "true",
    "SESSION_COOKIE_SECURE": "true",
    "CSRF_COOKIE_SECURE": "true",
    "SECURE_HSTS_SECONDS": "31536000",
    "SECURE_PROXY_SSL_HEADER": "true",
}


def manage(*args, env=None):
    clean = {k: v for k, v in os.environ.items() if k not in PRODUCTION}
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_production_settings_pass_the_deploy_check():
    result = manage("check", "--deploy", "--fail-level", "WARNING", env=PRODUCTION)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("DEFAULT_DAILY_BUDGET", "ten", "DEFAULT_DAILY_BUDGET='ten'"),
        ("DEFAULT_DAILY_BUDGET", "-3", "must be a positive amount"),
        ("DEFAULT_AGENT_DAILY_BUDGET", "0.0000000001", "more precision than one nanodollar"),
        ("HOLD_TTL_SECONDS", "soon", "HOLD_TTL_SECONDS"),
        ("HOLD_TTL_SECONDS", "0", "HOLD_TTL_SECONDS: must be a positive"),
        ("MIN_OUTPUT_TOKENS", "-1", "MIN_OUTPUT_TOKENS"),
        ("DEBUG", "maybe", "DEBUG"),
        ("DATABASE_URL", "nosuchdb://x", "DATABASE_URL"),
        ("MODEL_CATALOG_PATH", "/nonexistent/catalog.yaml", "/nonexistent/catalog.yaml"),
        ("GATEWAY_MAX_BODY_BYTES", "0", "GATEWAY_MAX_BODY_BYTES"),
        ("KEY_CACHE_SECONDS", "-1", "KEY_CACHE_SECONDS"),
        ("DB_CONN_MAX_AGE", "-5", "DB_CONN_MAX_AGE: cannot be negative"),
        ("DB_CONN_MAX_AGE", "forever", "DB_CONN_MAX_AGE"),
    ],
)
def test_a_bad_variable_stops_the_start_and_is_named(variable, value, message):
    result = manage("check", env={variable: value})
    assert result.returncode != 0
    assert message in result.stderr
    assert "ImproperlyConfigured" in result.stderr or "CatalogError" in result.stderr


def test_the_example_env_file_works_as_it_is(tmp_path):
    values = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name] = value
    result = manage("check", env=values)
    assert result.returncode == 0, result.stderr


def test_every_variable_read_by_settings_is_documented():
    source = (ROOT / "governance" / "settings.py").read_text()
    read = set(re.findall(r'env\.\w+\(\s*"([A-Z_]+)"', source))
    read |= set(re.findall(r'_(?:usd_)?setting\(\s*"([A-Z_]+)"', source))
    documented = set(re.findall(r"^([A-Z_]+)=", (ROOT / ".env.example").read_text(), re.M))
    assert read, "the pattern found no variables"
    assert read <= documented, f"undocumented: {sorted(read - documented)}"
