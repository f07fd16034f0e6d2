"""The committed openapi.yaml is the schema the code generates: change one, change both."""

from __future__ import annotations

import difflib
from pathlib import Path

import yaml
from django.conf import settings
from django.core.management import call_command

COMMITTED = Path(settings.BASE_DIR) / "openapi.yaml"
REGENERATE = ["spectacular", "--validate", "--file"]
HOW = (
    "openapi.yaml is out of date. Regenerate it and commit the result:\n"
    "    .venv/bin/python manage.py " + " ".join(REGENERATE) + " openapi.yaml"
)


def test_it_matches_the_committed_schema(tmp_path):
    generated = tmp_path / "openapi.yaml"
    call_command(*REGENERATE, str(generated))
    committed = COMMITTED.read_text() if COMMITTED.exists() else ""
    if generated.read_text() != committed:
        diff = "".join(
            list(
                difflib.unified_diff(
                    committed.splitlines(keepends=True),
                    generated.read_text().splitlines(keepends=True),
                    "openapi.yaml (committed)",
                    "openapi.yaml (generated)",
                )
            )[:80]
        )
        raise AssertionError(f"{HOW}\n\n{diff}")


def test_it_documents_every_operation_with_the_error_shape():
    schema = yaml.safe_load(COMMITTED.read_text())
    operations = [
        (path, method, operation)
        for path, item in schema["paths"].items()
        for method, operation in item.items()
    ]
    assert len(operations) == 19
    for path, method, operation in operations:
        assert operation.get("summary"), (path, method)
        if path == "/api/health":
            assert operation["security"] == [{}]
            continue
        for status in ("401", "403"):
            content = operation["responses"][status]["content"]["application/json"]
            assert content["schema"] == {"$ref": "#/components/schemas/Error"}, (path, method)


def test_agent_keys_are_offered_only_for_reading_budgets_and_spend():
    schema = yaml.safe_load(COMMITTED.read_text())
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            agent = {"agentKey": []} in operation.get("security", [])
            readable = method == "get" and path.startswith(("/api/budgets", "/api/spend"))
            assert agent is readable, (path, method)


def test_it_serves_the_schema_and_its_docs_to_anyone(client, settings):
    schema = client.get("/api/schema/")
    assert schema.status_code == 200
    assert yaml.safe_load(schema.content) == yaml.safe_load(COMMITTED.read_text())
    docs = client.get("/api/docs/")
    assert docs.status_code == 200
    assert b"swagger" in docs.content.lower()


def test_the_docs_page_works_without_internet_access(client, db):
    page = client.get("/api/docs/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "swagger-ui" in html
    assert "cdn" not in html.lower() and "https://" not in html
    assert "/static/drf_spectacular_sidecar/" in html
